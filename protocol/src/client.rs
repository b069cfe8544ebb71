//! Client frames: the JSON objects exchanged over the WebSocket (`docs/protocol.md`).
//!
//! Requests are parsed by hand from a loosely typed frame so that every mistake maps to the
//! right error code (`bad_request` versus `invalid_room`) and the request's `ref` is echoed even
//! when the rest of the frame is invalid. Replies and events are rendered with serde.

use serde::Serialize;
use serde::ser::SerializeMap;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::ids::{RoomId, UserName};

/// The most messages one `history` request returns.
pub const MAX_HISTORY_LIMIT: u32 = 500;
/// Messages returned by `history` when the request gives no `limit`.
pub const DEFAULT_HISTORY_LIMIT: u32 = 50;
/// The longest client message id (`send.id`), in bytes.
pub const MAX_CLIENT_ID_LEN: usize = 64;

/// The length of `text` once rendered as a JSON string, quotes included: what a message costs
/// in a frame (control characters take up to six bytes each).
pub fn json_string_len(text: &str) -> usize {
    let escapes: usize = text
        .bytes()
        .map(|b| match b {
            b'"' | b'\\' | b'\n' | b'\r' | b'\t' | 0x08 | 0x0c => 1,
            0..0x20 => 5,
            _ => 0,
        })
        .sum();
    text.len() + escapes + 2
}

/// The stable error codes a client can see.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Not JSON, unknown type, missing or mistyped field.
    BadRequest,
    /// The room name is not valid.
    InvalidRoom,
    /// `send` to a room the connection has not joined.
    NotJoined,
    /// `text` is longer than the configured limit.
    TooLarge,
    /// Over the connection's rate limit; the request was not carried out.
    RateLimited,
    /// The addressee of a `direct` has no connection anywhere.
    Offline,
    /// The room cannot be reached right now; retry later.
    Unavailable,
    /// A fault on the node's side.
    Internal,
    /// A `join` past the rooms one connection may have joined at once.
    TooManyRooms,
    /// A `refresh` whose token is invalid or names another user; nothing changed.
    Unauthorized,
}

impl ErrorCode {
    /// Every code, in the order of the protocol document.
    pub const ALL: [ErrorCode; 10] = [
        ErrorCode::BadRequest,
        ErrorCode::InvalidRoom,
        ErrorCode::NotJoined,
        ErrorCode::TooLarge,
        ErrorCode::RateLimited,
        ErrorCode::Offline,
        ErrorCode::Unavailable,
        ErrorCode::Internal,
        ErrorCode::TooManyRooms,
        ErrorCode::Unauthorized,
    ];

    /// The code as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::InvalidRoom => "invalid_room",
            ErrorCode::NotJoined => "not_joined",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Offline => "offline",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
            ErrorCode::TooManyRooms => "too_many_rooms",
            ErrorCode::Unauthorized => "unauthorized",
        }
    }
}

/// The `ref` of a request, kept as the exact JSON text the client sent so it is echoed verbatim.
pub type Ref = Box<RawValue>;

/// A request from a client, with its optional `ref`.
#[derive(Debug)]
pub struct ClientRequest {
    /// The client's correlation value, echoed in every reply.
    pub reference: Option<Ref>,
    /// What the client asks for.
    pub body: Request,
}

/// The requests of the protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Joins a room, replaying stored messages with `seq > since` first.
    Join {
        /// The room to join.
        room: RoomId,
        /// Replay messages after this sequence number.
        since: Option<u64>,
    },
    /// Leaves a room.
    Leave {
        /// The room to leave.
        room: RoomId,
    },
    /// Publishes a message to a joined room.
    Send {
        /// The room to publish to.
        room: RoomId,
        /// The message text.
        text: String,
        /// Optional client message id: a retried `send` with the same id is stored once.
        client_id: Option<String>,
    },
    /// Reads stored messages.
    History {
        /// The room to read.
        room: RoomId,
        /// Only messages with `seq < before`.
        before: Option<u64>,
        /// How many messages, at most.
        limit: u32,
    },
    /// Lists the users joined to a room on every node.
    Who {
        /// The room to list.
        room: RoomId,
    },
    /// Sends a private message to every connection of a user.
    Direct {
        /// The addressee.
        to: UserName,
        /// The message text.
        text: String,
    },
    /// Asks for a `pong`.
    Ping,
    /// Replaces the connection's token with a fresher one of the same user.
    Refresh {
        /// The new token (JWT).
        token: String,
    },
    /// Authenticates a connection that gave no token in its upgrade request; valid only as the
    /// first frame.
    Auth {
        /// The token (JWT).
        token: String,
    },
}

impl Request {
    /// The request's `type`, for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Request::Join { .. } => "join",
            Request::Leave { .. } => "leave",
            Request::Send { .. } => "send",
            Request::History { .. } => "history",
            Request::Who { .. } => "who",
            Request::Direct { .. } => "direct",
            Request::Ping => "ping",
            Request::Refresh { .. } => "refresh",
            Request::Auth { .. } => "auth",
        }
    }
}

/// A request that could not be parsed: the error to send back.
#[derive(Debug)]
pub struct RequestError {
    /// The request's `ref`, when the frame was an object carrying one.
    pub reference: Option<Ref>,
    /// `bad_request` or `invalid_room`.
    pub code: ErrorCode,
    /// Human-readable detail.
    pub message: String,
}

/// Parses one text frame into a request.
pub fn parse_request(frame: &str) -> Result<ClientRequest, RequestError> {
    let object: Map<String, Value> = match serde_json::from_str::<Value>(frame) {
        Ok(Value::Object(object)) => object,
        Ok(_) => return Err(bad(None, "a frame must be a JSON object")),
        Err(e) => return Err(bad(None, format!("not JSON: {e}"))),
    };
    let reference = object.get("ref").map(raw);
    let fields = Fields {
        object: &object,
        reference: &reference,
    };
    if let Some(value) = object.get("ref")
        && !(value.is_string() || value.is_i64() || value.is_u64())
    {
        return Err(fields.bad("`ref` must be a string or an integer"));
    }
    let kind = match object.get("type") {
        Some(Value::String(kind)) => kind.as_str(),
        Some(_) => return Err(fields.bad("`type` must be a string")),
        None => return Err(fields.bad("missing field `type`")),
    };
    let body = match kind {
        "join" => Request::Join {
            room: fields.room()?,
            since: fields.optional_u64("since")?,
        },
        "leave" => Request::Leave {
            room: fields.room()?,
        },
        "send" => Request::Send {
            room: fields.room()?,
            text: fields.string("text")?,
            client_id: fields.client_id()?,
        },
        "history" => Request::History {
            room: fields.room()?,
            before: fields.optional_u64("before")?,
            limit: fields.limit()?,
        },
        "who" => Request::Who {
            room: fields.room()?,
        },
        "direct" => Request::Direct {
            to: fields.user("to")?,
            text: fields.string("text")?,
        },
        "ping" => Request::Ping,
        "refresh" => Request::Refresh {
            token: fields.string("token")?,
        },
        "auth" => Request::Auth {
            token: fields.string("token")?,
        },
        other => {
            let mut shown: String = other.chars().take(32).collect();
            if shown.len() < other.len() {
                shown.push('…');
            }
            return Err(fields.bad(format!("unknown type {shown:?}")));
        }
    };
    Ok(ClientRequest { reference, body })
}

fn raw(value: &Value) -> Ref {
    // Serialising a `Value` cannot fail and always yields valid JSON.
    let text = serde_json::to_string(value).unwrap_or_else(|_| "null".to_owned());
    RawValue::from_string(text).unwrap_or_else(|_| null_ref())
}

fn null_ref() -> Ref {
    // "null" is valid JSON, so this cannot fail; the fallback keeps clippy's no-panic rule.
    RawValue::from_string("null".to_owned()).unwrap_or_default()
}

fn bad(reference: Option<Ref>, message: impl Into<String>) -> RequestError {
    RequestError {
        reference,
        code: ErrorCode::BadRequest,
        message: message.into(),
    }
}

struct Fields<'a> {
    object: &'a Map<String, Value>,
    reference: &'a Option<Ref>,
}

impl Fields<'_> {
    fn bad(&self, message: impl Into<String>) -> RequestError {
        bad(self.reference.clone(), message)
    }

    fn string(&self, name: &str) -> Result<String, RequestError> {
        match self.object.get(name) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(_) => Err(self.bad(format!("`{name}` must be a string"))),
            None => Err(self.bad(format!("missing field `{name}`"))),
        }
    }

    fn room(&self) -> Result<RoomId, RequestError> {
        let name = self.string("room")?;
        RoomId::new(&name).map_err(|e| RequestError {
            reference: self.reference.clone(),
            code: ErrorCode::InvalidRoom,
            message: e.to_string(),
        })
    }

    fn user(&self, field: &str) -> Result<UserName, RequestError> {
        let name = self.string(field)?;
        UserName::new(&name).map_err(|e| self.bad(format!("`{field}`: {e}")))
    }

    fn optional_u64(&self, name: &str) -> Result<Option<u64>, RequestError> {
        match self.object.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(value) => value
                .as_u64()
                .map(Some)
                .ok_or_else(|| self.bad(format!("`{name}` must be a non-negative integer"))),
        }
    }

    fn limit(&self) -> Result<u32, RequestError> {
        match self.optional_u64("limit")? {
            None => Ok(DEFAULT_HISTORY_LIMIT),
            Some(0) => Err(self.bad("`limit` must be at least 1")),
            Some(n) => Ok(n.min(u64::from(MAX_HISTORY_LIMIT)) as u32),
        }
    }

    fn client_id(&self) -> Result<Option<String>, RequestError> {
        match self.object.get("id") {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(id)) if !id.is_empty() && id.len() <= MAX_CLIENT_ID_LEN => {
                Ok(Some(id.clone()))
            }
            Some(_) => Err(self.bad(format!(
                "`id` must be a string of 1 to {MAX_CLIENT_ID_LEN} bytes"
            ))),
        }
    }
}

/// A chat message as clients see it: a `message` event and an element of `history.messages`
/// (both carry `"type":"message"`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageView<'a> {
    /// The room.
    pub room: &'a str,
    /// The message's position in the room.
    pub seq: u64,
    /// The sender.
    pub from: &'a str,
    /// The text.
    pub text: &'a str,
    /// Milliseconds since the Unix epoch when the room sequenced it.
    pub ts: u64,
    /// The sender's client message id, when it gave one.
    pub id: Option<&'a str>,
}

impl Serialize for MessageView<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("type", "message")?;
        map.serialize_entry("room", self.room)?;
        map.serialize_entry("seq", &self.seq)?;
        map.serialize_entry("from", self.from)?;
        map.serialize_entry("text", self.text)?;
        map.serialize_entry("ts", &self.ts)?;
        if let Some(id) = self.id {
            map.serialize_entry("id", id)?;
        }
        map.end()
    }
}

impl MessageView<'_> {
    /// Renders the `message` event as JSON text.
    pub fn to_json(&self) -> String {
        // Strings and numbers only: serialisation cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// A presence change in a room.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PresenceEvent {
    /// A user's first connection joined the room.
    Join,
    /// A user's last connection left the room.
    Leave,
}

/// A frame from the node to a client (a reply or an event).
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ServerFrame<'a> {
    /// The first frame on every connection.
    Welcome {
        /// The node's name.
        node: &'a str,
        /// The authenticated user.
        user: &'a str,
        /// An opaque id of this connection.
        session: &'a str,
    },
    /// Reply to `join`.
    Joined {
        /// The request's ref.
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<&'a RawValue>,
        /// The room.
        room: &'a str,
        /// The room's latest sequence number when the join took effect.
        seq: u64,
        /// The room's horizon, when `since` reached below it: the messages after `since` and
        /// before this seq were dropped by retention.
        #[serde(skip_serializing_if = "Option::is_none")]
        horizon: Option<u64>,
    },
    /// Reply to `leave`.
    Left {
        /// The request's ref.
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<&'a RawValue>,
        /// The room.
        room: &'a str,
    },
    /// Reply to `send` (with room and seq) and to `direct` (without).
    Ack {
        /// The request's ref.
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<&'a RawValue>,
        /// The room, for `send`.
        #[serde(skip_serializing_if = "Option::is_none")]
        room: Option<&'a str>,
        /// The stored message's sequence number, for `send`.
        #[serde(skip_serializing_if = "Option::is_none")]
        seq: Option<u64>,
    },
    /// Reply to `history`.
    History {
        /// The request's ref.
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<&'a RawValue>,
        /// The room.
        room: &'a str,
        /// Messages, oldest first.
        messages: &'a [MessageView<'a>],
        /// The room's horizon (the smallest seq still kept), when the request reached below
        /// it: older messages were dropped by retention.
        #[serde(skip_serializing_if = "Option::is_none")]
        horizon: Option<u64>,
    },
    /// Reply to `who`.
    Members {
        /// The request's ref.
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<&'a RawValue>,
        /// The room.
        room: &'a str,
        /// Joined users, each once, sorted.
        users: &'a [&'a str],
    },
    /// Reply to `ping`.
    Pong {
        /// The request's ref.
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<&'a RawValue>,
    },
    /// Reply to `refresh`.
    Refreshed {
        /// The request's ref.
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<&'a RawValue>,
        /// The new token's `exp` (seconds since the Unix epoch); absent when the node checks no
        /// tokens.
        #[serde(skip_serializing_if = "Option::is_none")]
        exp: Option<u64>,
    },
    /// A private message.
    Direct {
        /// The sender.
        from: &'a str,
        /// The text.
        text: &'a str,
        /// Milliseconds since the Unix epoch when it was sent.
        ts: u64,
    },
    /// A user's first connection joined, or last connection left, a room.
    Presence {
        /// The room.
        room: &'a str,
        /// The user.
        user: &'a str,
        /// `join` or `leave`.
        event: PresenceEvent,
    },
    /// Messages of a joined room that this connection had not received yet were dropped by
    /// retention (the node caught up with a room that moved): the next `message` of the room has
    /// `seq >= horizon`.
    Horizon {
        /// The room.
        room: &'a str,
        /// The room's horizon, the smallest seq still kept.
        horizon: u64,
    },
    /// A request failed.
    Error(ErrorFrame<'a>),
}

/// The body of an `error` frame.
#[derive(Debug)]
pub struct ErrorFrame<'a> {
    /// The request's ref.
    pub reference: Option<&'a RawValue>,
    /// The stable code.
    pub code: ErrorCode,
    /// Human-readable detail.
    pub message: &'a str,
}

impl Serialize for ErrorFrame<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        if let Some(reference) = self.reference {
            map.serialize_entry("ref", reference)?;
        }
        map.serialize_entry("code", &self.code)?;
        map.serialize_entry("message", self.message)?;
        map.end()
    }
}

impl ServerFrame<'_> {
    /// Renders the frame as JSON text.
    pub fn to_json(&self) -> String {
        // Every field is a string, a number or raw JSON, so serialisation cannot fail.
        serde_json::to_string(self).unwrap_or_else(|e| {
            format!(r#"{{"type":"error","code":"internal","message":"render failed: {e}"}}"#)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_string_len_is_the_rendered_length() {
        for text in [
            "",
            "hi",
            "\"quoted\" \\ back",
            "line\nbreak\ttab",
            "\u{1}\u{1f}\u{7f}",
            "héllo ✓",
        ] {
            let rendered = serde_json::to_string(text).unwrap();
            assert_eq!(json_string_len(text), rendered.len(), "{text:?}");
        }
    }

    fn parse(frame: &str) -> Request {
        parse_request(frame).unwrap().body
    }

    fn error(frame: &str) -> (Option<String>, ErrorCode) {
        let e = parse_request(frame).unwrap_err();
        (e.reference.map(|r| r.get().to_owned()), e.code)
    }

    #[test]
    fn parses_every_request_of_the_protocol() {
        assert_eq!(
            parse(r#"{"type":"join","ref":1,"room":"lobby","since":41}"#),
            Request::Join {
                room: RoomId::new("lobby").unwrap(),
                since: Some(41)
            }
        );
        assert_eq!(
            parse(r#"{"type":"leave","room":"lobby"}"#),
            Request::Leave {
                room: RoomId::new("lobby").unwrap()
            }
        );
        assert_eq!(
            parse(r#"{"type":"send","room":"lobby","text":"hi"}"#),
            Request::Send {
                room: RoomId::new("lobby").unwrap(),
                text: "hi".into(),
                client_id: None
            }
        );
        assert_eq!(
            parse(r#"{"type":"history","room":"lobby","before":58,"limit":5000}"#),
            Request::History {
                room: RoomId::new("lobby").unwrap(),
                before: Some(58),
                limit: MAX_HISTORY_LIMIT
            }
        );
        assert_eq!(
            parse(r#"{"type":"history","room":"lobby"}"#),
            Request::History {
                room: RoomId::new("lobby").unwrap(),
                before: None,
                limit: DEFAULT_HISTORY_LIMIT
            }
        );
        assert_eq!(
            parse(r#"{"type":"who","room":"lobby"}"#),
            Request::Who {
                room: RoomId::new("lobby").unwrap()
            }
        );
        assert_eq!(
            parse(r#"{"type":"direct","to":"bob","text":"psst"}"#),
            Request::Direct {
                to: UserName::new("bob").unwrap(),
                text: "psst".into()
            }
        );
        assert_eq!(
            parse(r#"{"type":"ping","ref":"x","extra":true}"#),
            Request::Ping
        );
        assert_eq!(
            parse(r#"{"type":"refresh","ref":8,"token":"a.b.c"}"#),
            Request::Refresh {
                token: "a.b.c".into()
            }
        );
        assert_eq!(
            parse(r#"{"type":"auth","token":"a.b.c"}"#),
            Request::Auth {
                token: "a.b.c".into()
            }
        );
    }

    #[test]
    fn ref_is_echoed_verbatim_even_when_the_frame_is_invalid() {
        assert_eq!(
            error(r#"{"type":"nope","ref":"a\"b"}"#),
            (Some(r#""a\"b""#.into()), ErrorCode::BadRequest)
        );
        assert_eq!(
            error(r#"{"ref":7}"#),
            (Some("7".into()), ErrorCode::BadRequest)
        );
        assert_eq!(
            error(r#"{"type":"join","ref":3,"room":"bad room"}"#),
            (Some("3".into()), ErrorCode::InvalidRoom)
        );
        assert_eq!(
            error(r#"{"type":"ping","ref":{"x":1}}"#),
            (Some(r#"{"x":1}"#.into()), ErrorCode::BadRequest)
        );
    }

    #[test]
    fn mistakes_map_to_their_codes() {
        assert_eq!(error("not json"), (None, ErrorCode::BadRequest));
        assert_eq!(error("[1,2]"), (None, ErrorCode::BadRequest));
        assert_eq!(
            error(r#"{"type":"send","room":"x"}"#).1,
            ErrorCode::BadRequest
        );
        assert_eq!(
            error(r#"{"type":"send","room":5,"text":"x"}"#).1,
            ErrorCode::BadRequest
        );
        assert_eq!(
            error(r#"{"type":"join","room":"x","since":-1}"#).1,
            ErrorCode::BadRequest
        );
        assert_eq!(
            error(r#"{"type":"history","room":"x","limit":0}"#).1,
            ErrorCode::BadRequest
        );
        assert_eq!(
            error(r#"{"type":"direct","to":"no one","text":"x"}"#).1,
            ErrorCode::BadRequest
        );
        assert_eq!(
            error(r#"{"type":"join","room":""}"#).1,
            ErrorCode::InvalidRoom
        );
        assert_eq!(error(r#"{"type":"refresh"}"#).1, ErrorCode::BadRequest);
    }

    #[test]
    fn frames_render_as_the_protocol_shows() {
        let r = RawValue::from_string("1".into()).unwrap();
        assert_eq!(
            ServerFrame::Joined {
                reference: Some(&r),
                room: "lobby",
                seq: 57,
                horizon: None,
            }
            .to_json(),
            r#"{"type":"joined","ref":1,"room":"lobby","seq":57}"#
        );
        assert_eq!(
            ServerFrame::Joined {
                reference: Some(&r),
                room: "lobby",
                seq: 57,
                horizon: Some(40),
            }
            .to_json(),
            r#"{"type":"joined","ref":1,"room":"lobby","seq":57,"horizon":40}"#
        );
        assert_eq!(
            ServerFrame::Ack {
                reference: None,
                room: None,
                seq: None
            }
            .to_json(),
            r#"{"type":"ack"}"#
        );
        let m = MessageView {
            room: "lobby",
            seq: 58,
            from: "alice",
            text: "hi",
            ts: 1732240000000,
            id: None,
        };
        assert_eq!(
            m.to_json(),
            r#"{"type":"message","room":"lobby","seq":58,"from":"alice","text":"hi","ts":1732240000000}"#
        );
        assert_eq!(
            ServerFrame::History {
                reference: None,
                room: "lobby",
                messages: &[m],
                horizon: None,
            }
            .to_json(),
            r#"{"type":"history","room":"lobby","messages":[{"type":"message","room":"lobby","seq":58,"from":"alice","text":"hi","ts":1732240000000}]}"#
        );
        assert_eq!(
            ServerFrame::History {
                reference: None,
                room: "lobby",
                messages: &[],
                horizon: Some(1234),
            }
            .to_json(),
            r#"{"type":"history","room":"lobby","messages":[],"horizon":1234}"#
        );
        assert_eq!(
            ServerFrame::Error(ErrorFrame {
                reference: Some(&r),
                code: ErrorCode::NotJoined,
                message: "join first"
            })
            .to_json(),
            r#"{"type":"error","ref":1,"code":"not_joined","message":"join first"}"#
        );
        assert_eq!(
            ServerFrame::Refreshed {
                reference: Some(&r),
                exp: Some(1732243600)
            }
            .to_json(),
            r#"{"type":"refreshed","ref":1,"exp":1732243600}"#
        );
        assert_eq!(
            ServerFrame::Presence {
                room: "lobby",
                user: "bob",
                event: PresenceEvent::Join
            }
            .to_json(),
            r#"{"type":"presence","room":"lobby","user":"bob","event":"join"}"#
        );
        assert_eq!(
            ServerFrame::Horizon {
                room: "lobby",
                horizon: 1234
            }
            .to_json(),
            r#"{"type":"horizon","room":"lobby","horizon":1234}"#
        );
    }
}
