//! The Session actor: one per WebSocket connection.
//!
//! It owns what is per connection: the user and the rate limit. Frames arrive as messages from
//! the reader task; the session validates them (JSON shape, room names, text size, rate) and
//! answers mistakes itself with an error frame. Valid requests go to the hub, which knows the
//! rooms the connection joined, routes them to the room's owner and delivers the replies. `ping`
//! and `refresh` are answered here.
//!
//! With `--auth-secret` the session also owns its token's expiry: a timer closes the connection
//! (1008) once `exp` plus the leeway has passed, and a `refresh` with a newer token of the same
//! user moves it.
//!
//! Cleanup lives in a guard dropped with the actor's state, which happens on a normal stop and
//! after a panic alike (ractor skips `post_stop` after a panic): the hub forgets the connection
//! and the socket is closed, with 1011 when the session failed.

use std::time::Instant;

use chat_protocol::client::{ClientRequest, ErrorFrame, Request, ServerFrame, parse_request};
use chat_protocol::peer::{RoomOp, SessionId};
use chat_protocol::{ErrorCode, NodeName, UserName};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use ractor_cluster::RactorMessage;
use serde_json::value::RawValue;
use tokio::sync::OwnedSemaphorePermit;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::clock::now_ms;
use crate::gateway::admission::Ticket;
use crate::gateway::auth::{Verifier, close_in};
use crate::gateway::outbox::{Closing, Outbox};
use crate::gateway::rate::RateLimit;
use crate::hub::{HubMessage, HubRequest};
use crate::metrics::Metrics;

/// Per-connection limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Longest `text` of `send` / `direct`, in bytes.
    pub max_text_bytes: usize,
    /// `send` + `direct` per second; 0 = unlimited.
    pub rate_limit: u32,
    /// `join` + `leave` + `history` + `who` per second; 0 = unlimited.
    pub request_rate: u32,
}

/// The Session actor.
#[derive(Debug)]
pub struct Session;

/// What a session starts with.
#[derive(Debug)]
pub struct SessionArgs {
    /// The connection's id, unique on this node (random, so not reused after a restart).
    pub id: SessionId,
    /// The authenticated user.
    pub user: UserName,
    /// The queue towards the client.
    pub outbox: Outbox,
    /// The node's hub.
    pub hub: ActorRef<HubMessage>,
    /// Limits.
    pub limits: Limits,
    /// This node's name, for the welcome frame.
    pub node: NodeName,
    /// Metrics.
    pub metrics: Metrics,
    /// The connection's place under the per-user and per-address caps.
    pub ticket: Ticket,
    /// Verifies the tokens of `refresh`; `None` when the node checks no tokens.
    pub verifier: Option<Verifier>,
    /// The token's `exp` (seconds since the Unix epoch), when the user came with a token.
    pub exp_secs: Option<u64>,
}

/// Messages of a session.
#[derive(Debug, RactorMessage)]
pub enum SessionMessage {
    /// A text frame from the client; the permit is released once it is handled.
    Frame(Utf8Bytes, OwnedSemaphorePermit),
    /// A binary frame (not part of the protocol).
    Binary,
    /// The socket closed.
    Closed,
    /// Panics inside the handler: lets tests prove that a failing session is contained.
    Crash,
    /// The token's expiry timer fired: closes the connection unless a `refresh` moved `exp`.
    ExpiryDue,
}

/// The pending [`SessionMessage::ExpiryDue`], cancelled when replaced or when the session ends
/// (a timer left behind would hold its task until a long-lived token's `exp`).
struct ExpiryTimer(tokio::task::JoinHandle<Result<(), ractor::MessagingErr<SessionMessage>>>);

impl Drop for ExpiryTimer {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Cleans up after the connection, however the actor ends.
struct Guard {
    id: SessionId,
    hub: ActorRef<HubMessage>,
    outbox: Outbox,
    metrics: Metrics,
    closing: Closing,
    _ticket: Ticket,
}

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.hub.cast(HubMessage::Unregister { session: self.id });
        self.outbox.close(self.closing);
        self.metrics.connections.dec();
    }
}

/// A session's state.
pub struct SessionState {
    id: SessionId,
    user: UserName,
    outbox: Outbox,
    hub: ActorRef<HubMessage>,
    limits: Limits,
    metrics: Metrics,
    rate: RateLimit,
    requests: RateLimit,
    guard: Guard,
    span: tracing::Span,
    myself: ActorRef<SessionMessage>,
    verifier: Option<Verifier>,
    exp_secs: Option<u64>,
    expiry_timer: Option<ExpiryTimer>,
}

impl Actor for Session {
    type Msg = SessionMessage;
    type State = SessionState;
    type Arguments = SessionArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<SessionMessage>,
        args: SessionArgs,
    ) -> Result<SessionState, ActorProcessingErr> {
        args.metrics.connections.inc();
        args.metrics.connections_opened.inc();
        let session = format!("{:016x}", args.id);
        args.outbox.push_text(
            ServerFrame::Welcome {
                node: args.node.as_str(),
                user: args.user.as_str(),
                session: &session,
            }
            .to_json(),
        );
        let _ = args.hub.cast(HubMessage::Register {
            session: args.id,
            user: args.user.clone(),
            outbox: args.outbox.clone(),
        });
        let span = tracing::info_span!("session", session = %session, user = %args.user);
        let mut state = SessionState {
            guard: Guard {
                id: args.id,
                hub: args.hub.clone(),
                outbox: args.outbox.clone(),
                metrics: args.metrics.clone(),
                closing: Closing::Internal,
                _ticket: args.ticket,
            },
            id: args.id,
            user: args.user,
            outbox: args.outbox,
            hub: args.hub,
            limits: args.limits,
            metrics: args.metrics,
            rate: RateLimit::new(args.limits.rate_limit, Instant::now()),
            requests: RateLimit::new(args.limits.request_rate, Instant::now()),
            span,
            myself,
            verifier: args.verifier,
            exp_secs: args.exp_secs,
            expiry_timer: None,
        };
        state.arm_expiry();
        Ok(state)
    }

    async fn handle(
        &self,
        myself: ActorRef<SessionMessage>,
        message: SessionMessage,
        state: &mut SessionState,
    ) -> Result<(), ActorProcessingErr> {
        // Every log line of the connection carries its session and user.
        let span = state.span.clone();
        let _entered = span.enter();
        match message {
            SessionMessage::Frame(text, permit) => {
                state.metrics.messages_in.inc();
                match parse_request(&text) {
                    Ok(request) => state.handle(request),
                    Err(e) => state.error(e.reference.as_deref(), e.code, &e.message),
                }
                drop(permit);
            }
            SessionMessage::Binary => {
                state.metrics.messages_in.inc();
                state.error(
                    None,
                    ErrorCode::BadRequest,
                    "binary frames are not part of the protocol; send JSON text frames",
                );
            }
            SessionMessage::Closed => {
                state.guard.closing = Closing::Normal;
                myself.stop(None);
            }
            SessionMessage::Crash => panic!("injected failure in session {:x}", state.id),
            SessionMessage::ExpiryDue => state.check_expiry(),
        }
        Ok(())
    }
}

impl SessionState {
    fn handle(&mut self, request: ClientRequest) {
        let reference = request.reference;
        let reads_a_room = matches!(
            request.body,
            Request::Join { .. }
                | Request::Leave { .. }
                | Request::History { .. }
                | Request::Who { .. }
        );
        if reads_a_room && !self.requests.allow(Instant::now()) {
            self.error(
                reference.as_deref(),
                ErrorCode::RateLimited,
                "too many join, leave, history or who requests; slow down",
            );
            return;
        }
        match request.body {
            Request::Ping => {
                self.outbox.push_text(
                    ServerFrame::Pong {
                        reference: reference.as_deref(),
                    }
                    .to_json(),
                );
            }
            Request::Join { room, since } => {
                let op = RoomOp::Join {
                    session: self.id,
                    user: self.user.clone(),
                    since,
                };
                self.to_hub(reference, HubRequest::Room { room, op });
            }
            Request::Leave { room } => {
                let op = RoomOp::Leave {
                    session: self.id,
                    user: self.user.clone(),
                };
                self.to_hub(reference, HubRequest::Room { room, op });
            }
            Request::Send {
                room,
                text,
                client_id,
            } => {
                if !self.admit(reference.as_deref(), &text) {
                    return;
                }
                let op = RoomOp::Publish {
                    user: self.user.clone(),
                    text,
                    client_id,
                };
                self.to_hub(reference, HubRequest::Room { room, op });
            }
            Request::History {
                room,
                before,
                limit,
            } => {
                let op = RoomOp::GetHistory { before, limit };
                self.to_hub(reference, HubRequest::Room { room, op });
            }
            Request::Who { room } => {
                self.to_hub(
                    reference,
                    HubRequest::Room {
                        room,
                        op: RoomOp::GetMembers,
                    },
                );
            }
            Request::Direct { to, text } => {
                if !self.admit(reference.as_deref(), &text) {
                    return;
                }
                self.to_hub(
                    reference,
                    HubRequest::Direct {
                        from: self.user.clone(),
                        to,
                        text,
                    },
                );
            }
            Request::Refresh { token } => self.refresh(reference.as_deref(), &token),
            Request::Auth { .. } => self.error(
                reference.as_deref(),
                ErrorCode::BadRequest,
                "`auth` is only valid as the first frame of a connection without a token; \
                 use `refresh` to replace the token",
            ),
        }
    }

    /// Takes a fresher token of the same user; a refused one changes nothing.
    fn refresh(&mut self, reference: Option<&RawValue>, token: &str) {
        let Some(verifier) = &self.verifier else {
            // The node checks no tokens, so none expires: nothing to replace.
            let frame = ServerFrame::Refreshed {
                reference,
                exp: None,
            };
            self.outbox.push_text(frame.to_json());
            return;
        };
        match verifier.verify(token, now_ms() / 1000) {
            Ok(grant) if grant.user == self.user => {
                self.exp_secs = Some(grant.exp_secs);
                self.arm_expiry();
                tracing::debug!(exp = grant.exp_secs, "token refreshed");
                let frame = ServerFrame::Refreshed {
                    reference,
                    exp: Some(grant.exp_secs),
                };
                self.outbox.push_text(frame.to_json());
            }
            Ok(grant) => {
                let message = format!(
                    "the token is for {}, this connection for {}",
                    grant.user, self.user
                );
                self.error(reference, ErrorCode::Unauthorized, &message);
            }
            Err(e) => self.error(reference, ErrorCode::Unauthorized, &e.to_string()),
        }
    }

    /// (Re)starts the timer that closes the connection when its token expires.
    fn arm_expiry(&mut self) {
        let Some(exp_secs) = self.exp_secs else {
            return;
        };
        let wait = close_in(exp_secs, now_ms());
        self.expiry_timer = Some(ExpiryTimer(
            self.myself.send_after(wait, || SessionMessage::ExpiryDue),
        ));
    }

    /// Closes the connection if its token has expired; else waits again (the wall clock the
    /// deadline is in may lag the timer's monotonic one).
    fn check_expiry(&mut self) {
        match self.exp_secs {
            Some(exp_secs) if close_in(exp_secs, now_ms()).is_zero() => {
                tracing::info!(exp = exp_secs, "token expired; closing the connection");
                self.outbox.close(Closing::Expired);
            }
            _ => self.arm_expiry(),
        }
    }

    /// Checks the size and the rate limit of a `send` or `direct`.
    fn admit(&mut self, reference: Option<&RawValue>, text: &str) -> bool {
        if !self.rate.allow(Instant::now()) {
            self.error(
                reference,
                ErrorCode::RateLimited,
                "too many messages; slow down",
            );
            return false;
        }
        if text.len() > self.limits.max_text_bytes {
            let message = format!(
                "text is {} bytes; the limit is {}",
                text.len(),
                self.limits.max_text_bytes
            );
            self.error(reference, ErrorCode::TooLarge, &message);
            return false;
        }
        true
    }

    fn to_hub(&self, reference: Option<Box<RawValue>>, request: HubRequest) {
        let message = HubMessage::Request {
            session: self.id,
            reference,
            request,
            received: Instant::now(),
        };
        if self.hub.cast(message).is_err() {
            // The hub is restarting: this connection is about to be closed anyway.
            self.outbox.close(Closing::Internal);
        }
    }

    fn error(&self, reference: Option<&RawValue>, code: ErrorCode, message: &str) {
        self.metrics.error(code);
        self.outbox.push_text(
            ServerFrame::Error(ErrorFrame {
                reference,
                code,
                message,
            })
            .to_json(),
        );
    }
}
