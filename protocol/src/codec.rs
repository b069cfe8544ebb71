//! The one binary codec for node-to-node traffic: serde + bincode 2, behind a version byte.
//!
//! Switching the format (postcard, wincode, a future bincode) touches this file only. Decoding is
//! bounded: a payload larger than [`MAX_MESSAGE_BYTES`] or one that claims a longer collection
//! than it holds is refused before anything large is allocated.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// The first byte of every encoded payload; bumped when the encoding changes incompatibly.
pub const WIRE_VERSION: u8 = 2;

/// The largest encoded message, in bytes. Far below ractor_cluster's 16 MiB frame limit, where
/// one oversized frame would drop the whole connection to a node.
pub const MAX_MESSAGE_BYTES: usize = 8 << 20;

const CONFIG: bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Varint,
    bincode::config::Limit<MAX_MESSAGE_BYTES>,
> = bincode::config::standard().with_limit::<MAX_MESSAGE_BYTES>();

/// Why a payload could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The message encodes to more than [`MAX_MESSAGE_BYTES`].
    #[error("message of {0} bytes is over the {MAX_MESSAGE_BYTES}-byte limit")]
    TooLarge(usize),
    /// The payload is empty.
    #[error("empty payload")]
    Empty,
    /// The payload was written by an incompatible version.
    #[error("wire version {0}, expected {WIRE_VERSION}")]
    Version(u8),
    /// The payload is not a valid encoding of the expected type.
    #[error("malformed payload: {0}")]
    Malformed(String),
}

/// Encodes `value` as a version byte followed by its bincode encoding.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, CodecError> {
    encode_versioned(WIRE_VERSION, value)
}

/// Decodes a payload made by [`encode`]; trailing bytes are an error.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    let (&version, body) = bytes.split_first().ok_or(CodecError::Empty)?;
    if version != WIRE_VERSION {
        return Err(CodecError::Version(version));
    }
    decode_body(body)
}

/// Encodes `value` behind the version byte `version` (formats with their own versions, such as
/// the store's, use the same encoding).
pub fn encode_versioned<T: Serialize>(version: u8, value: &T) -> Result<Vec<u8>, CodecError> {
    let mut bytes = vec![version];
    bincode::serde::encode_into_std_write(value, &mut bytes, CONFIG)
        .map_err(|e| CodecError::Malformed(e.to_string()))?;
    if bytes.len() > MAX_MESSAGE_BYTES {
        return Err(CodecError::TooLarge(bytes.len()));
    }
    Ok(bytes)
}

/// Decodes an encoding without its version byte; trailing bytes are an error.
pub fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, CodecError> {
    if body.len() >= MAX_MESSAGE_BYTES {
        return Err(CodecError::TooLarge(body.len() + 1));
    }
    let (value, read) = bincode::serde::decode_from_slice(body, CONFIG)
        .map_err(|e| CodecError::Malformed(e.to_string()))?;
    if read != body.len() {
        return Err(CodecError::Malformed(format!(
            "{} trailing bytes",
            body.len() - read
        )));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{NodeName, RoomId, UserName};
    use crate::peer::{Entry, Origin, PeerMessage, RoomOp, ToHub, ToRoom, ToRooms};

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn publish() -> PeerMessage {
        PeerMessage::Rooms(ToRooms::Room {
            room: RoomId::new("lobby").unwrap(),
            message: ToRoom::Request {
                origin: Origin {
                    node: NodeName::new("n1").unwrap(),
                    req: 300,
                },
                op: RoomOp::Publish {
                    user: UserName::new("alice").unwrap(),
                    text: "hi".into(),
                    client_id: None,
                },
                hops: 0,
            },
        })
    }

    #[test]
    fn encoding_is_pinned() {
        // Changing these bytes breaks mixed-version clusters: bump WIRE_VERSION when you must.
        assert_eq!(
            hex(&encode(&publish()).unwrap()),
            "020000056c6f62627900026e31fb2c010205616c6963650268690000"
        );
        let fanout = PeerMessage::Hub(ToHub::Fanout {
            room: RoomId::new("r").unwrap(),
            entries: vec![Entry {
                seq: 58,
                epoch: 3,
                from: UserName::new("bob").unwrap(),
                text: "yo".into(),
                ts: 1_732_240_000_000,
                client_id: Some("c1".into()),
            }],
        });
        assert_eq!(
            hex(&encode(&fanout).unwrap()),
            "0202010172013a0303626f6202796ffd00c48c519301000001026331"
        );
        // Added last to `ToHub`: the earlier variants keep their tags.
        let horizon = PeerMessage::Hub(ToHub::Horizon {
            room: RoomId::new("r").unwrap(),
            horizon: 1234,
        });
        assert_eq!(hex(&encode(&horizon).unwrap()), "0202060172fbd204");
    }

    #[test]
    fn round_trips() {
        let message = publish();
        assert_eq!(
            decode::<PeerMessage>(&encode(&message).unwrap()).unwrap(),
            message
        );
    }

    #[test]
    fn refuses_garbage_without_panicking() {
        assert!(matches!(decode::<PeerMessage>(&[]), Err(CodecError::Empty)));
        assert!(matches!(
            decode::<PeerMessage>(&[9, 0]),
            Err(CodecError::Version(9))
        ));
        assert!(matches!(
            decode::<PeerMessage>(&[WIRE_VERSION, 200, 1, 2]),
            Err(CodecError::Malformed(_))
        ));
        let mut trailing = encode(&publish()).unwrap();
        trailing.push(0);
        assert!(matches!(
            decode::<PeerMessage>(&trailing),
            Err(CodecError::Malformed(_))
        ));
        // A length prefix claiming 2^60 entries must fail on the limit, not allocate.
        let huge = [WIRE_VERSION, 2, 1, 1, b'r', 0xff, 0, 0, 0, 0, 0, 0, 0x10, 0];
        assert!(decode::<PeerMessage>(&huge).is_err());
    }

    #[test]
    fn invalid_identifiers_from_a_peer_are_refused() {
        let mut bytes = encode(&publish()).unwrap();
        // "lobby" -> "lo by": the room id fails validation while decoding.
        bytes[6] = b' ';
        assert!(matches!(
            decode::<PeerMessage>(&bytes),
            Err(CodecError::Malformed(_))
        ));
    }

    #[test]
    fn oversized_messages_are_refused_at_encode() {
        let message = PeerMessage::Hub(ToHub::Fanout {
            room: RoomId::new("r").unwrap(),
            entries: vec![
                Entry {
                    seq: 1,
                    epoch: 1,
                    from: UserName::new("u").unwrap(),
                    text: "x".repeat(1 << 20),
                    ts: 0,
                    client_id: None,
                };
                9
            ],
        });
        assert!(matches!(encode(&message), Err(CodecError::TooLarge(_))));
    }
}
