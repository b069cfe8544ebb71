//! The datagrams of the membership service: heartbeats encoded with the protocol's codec and
//! sealed with an HMAC-SHA256 keyed by the cluster cookie, so that a process without the cookie
//! is never heard.

use chat_protocol::codec::{self, CodecError};
use chat_protocol::peer::Heartbeat;
use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};

/// Length of the HMAC tag at the end of every datagram.
const TAG_LEN: usize = 32;

/// Why a datagram was refused.
#[derive(Debug, thiserror::Error)]
pub enum DatagramError {
    /// The tag does not match: another cookie, or tampering.
    #[error("bad seal (wrong cookie?)")]
    Seal,
    /// The payload is not a heartbeat.
    #[error(transparent)]
    Codec(#[from] CodecError),
}

/// The datagram key derived from the cookie.
pub fn key(cookie: &str) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(b"chat-cluster heartbeat key v1\0");
    hasher.update(cookie.as_bytes());
    hasher.finalize().into()
}

/// Encodes and seals a heartbeat.
pub fn seal(key: &[u8; 32], heartbeat: &Heartbeat) -> Result<Vec<u8>, CodecError> {
    let mut payload = codec::encode(heartbeat)?;
    let tag = tag(key, &payload);
    payload.extend_from_slice(&tag);
    Ok(payload)
}

/// The heartbeat in a sealed datagram, if its tag is valid and it decodes.
pub fn open(key: &[u8; 32], datagram: &[u8]) -> Result<Heartbeat, DatagramError> {
    let payload = verify(key, datagram).ok_or(DatagramError::Seal)?;
    Ok(codec::decode(payload)?)
}

fn verify<'a>(key: &[u8; 32], datagram: &'a [u8]) -> Option<&'a [u8]> {
    let split = datagram.len().checked_sub(TAG_LEN)?;
    let (payload, tag) = datagram.split_at(split);
    let mut mac = Hmac::<Sha256>::new_from_slice(key).ok()?;
    mac.update(payload);
    mac.verify_slice(tag).ok()?;
    Some(payload)
}

fn tag(key: &[u8; 32], payload: &[u8]) -> Vec<u8> {
    match Hmac::<Sha256>::new_from_slice(key) {
        Ok(mut mac) => {
            mac.update(payload);
            mac.finalize().into_bytes().to_vec()
        }
        // HMAC accepts keys of any length.
        Err(_) => vec![0; TAG_LEN],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chat_protocol::NodeName;
    use chat_protocol::peer::{HeartbeatKind, MemberInfo};

    fn heartbeat() -> Heartbeat {
        Heartbeat {
            from: MemberInfo {
                name: NodeName::new("a").unwrap(),
                incarnation: 1,
                addr: "a:7000".into(),
                public_url: None,
            },
            kind: HeartbeatKind::Ping { nonce: 7 },
            members: Vec::new(),
            departed: Vec::new(),
        }
    }

    #[test]
    fn sealed_datagrams_open_only_with_the_same_cookie() {
        let k = key("secret");
        let datagram = seal(&k, &heartbeat()).unwrap();
        assert_eq!(open(&k, &datagram).unwrap(), heartbeat());
        assert!(matches!(
            open(&key("other"), &datagram),
            Err(DatagramError::Seal)
        ));
        let mut tampered = datagram.clone();
        tampered[0] ^= 1;
        assert!(matches!(open(&k, &tampered), Err(DatagramError::Seal)));
        assert!(matches!(open(&k, b"short"), Err(DatagramError::Seal)));
    }
}
