//! The datagrams of the membership service: heartbeats encoded with the protocol's codec,
//! stamped and sealed with an HMAC-SHA256, so that a process without the key is never heard and
//! a captured datagram cannot be played again.
//!
//! ```text
//!   counter u64 BE │ sent_ms u64 BE │ to u64 │ codec(Heartbeat) │ HMAC-SHA256(key, all before)
//! ```
//!
//! - The key is derived from the cookie (and from the cluster CA's certificate when node links
//!   use TLS): it never crosses the network.
//! - The counter grows with every datagram a node sends in one life (incarnation). A receiver
//!   keeps, per sender, the highest counter it saw and which of the [`WINDOW`] below it arrived
//!   (the anti-replay window of IPsec): a datagram seen before, older than the window, or from
//!   an earlier incarnation than one already heard is refused. Datagrams may still arrive out of
//!   order within the window.
//! - `to` names the receiver (a tag of its node name), so that a datagram captured on its way
//!   to one node is refused by every other. A ping to a seed whose name the sender does not know
//!   yet carries 0: those are accepted only past the highest counter heard from their sender,
//!   never inside the window.
//! - The send time bounds what a receiver with no memory of the sender (it just restarted)
//!   accepts: a datagram sent more than [`MAX_AGE_MS`] ago, by the receiver's clock, is refused.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use chat_protocol::NodeName;
use chat_protocol::codec::{self, CodecError};
use chat_protocol::peer::Heartbeat;
use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};

/// Length of the HMAC tag at the end of every datagram.
const TAG_LEN: usize = 32;
/// Length of the stamp (counter, send time, receiver) at the start of every datagram.
const STAMP_LEN: usize = 24;
/// How many counters below the highest one a receiver still accepts (reordering).
pub const WINDOW: u64 = 64;
/// How old (or how far in the future) a datagram may be, by the receiver's clock: covers the
/// clock skew between nodes.
pub const MAX_AGE_MS: u64 = 60_000;

/// Why a datagram was refused.
#[derive(Debug, thiserror::Error)]
pub enum DatagramError {
    /// The tag does not match: another cookie or CA, or tampering.
    #[error("bad seal (wrong cookie or cluster CA?)")]
    Seal,
    /// The payload is not a heartbeat.
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// The datagram was received before, or is older than what the sender sent since.
    #[error("replayed")]
    Replayed,
    /// The datagram was sealed for another node.
    #[error("sealed for another node")]
    Misdirected,
    /// The send time is too far from this node's clock.
    #[error("sent {skew_ms} ms away from this node's clock")]
    Stale {
        /// How far off the send time is.
        skew_ms: u64,
    },
}

/// The datagram key, derived from the cookie and, when node links use TLS, the cluster CA's
/// certificate (DER): a node that trusts another CA never hears this cluster, nor is heard.
pub fn key(cookie: &str, ca: Option<&[u8]>) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(b"chat-cluster heartbeat key v2\0");
    hasher.update((cookie.len() as u64).to_be_bytes());
    hasher.update(cookie.as_bytes());
    if let Some(ca) = ca {
        hasher.update(ca);
    }
    hasher.finalize().into()
}

/// Seals the datagrams one node sends: one counter for the node's life.
#[derive(Debug)]
pub struct Sealer {
    key: [u8; 32],
    counter: AtomicU64,
}

impl Sealer {
    /// A sealer whose counter starts at 1.
    pub fn new(key: [u8; 32]) -> Sealer {
        Sealer {
            key,
            counter: AtomicU64::new(1),
        }
    }

    /// Stamps, encodes and seals a heartbeat for the node named `to` (`None`: a seed not known
    /// by name yet), sent at `now_ms`.
    pub fn seal(
        &self,
        heartbeat: &Heartbeat,
        to: Option<&NodeName>,
        now_ms: u64,
    ) -> Result<Vec<u8>, CodecError> {
        let counter = self.counter.fetch_add(1, Ordering::Relaxed);
        let mut payload = Vec::with_capacity(STAMP_LEN + 256 + TAG_LEN);
        payload.extend_from_slice(&counter.to_be_bytes());
        payload.extend_from_slice(&now_ms.to_be_bytes());
        payload.extend_from_slice(&to.map_or(0, receiver_tag).to_be_bytes());
        payload.extend_from_slice(&codec::encode(heartbeat)?);
        let tag = tag(&self.key, &payload);
        payload.extend_from_slice(&tag);
        Ok(payload)
    }

    /// An opener, for the node named `me`, of the datagrams sealed with the same key.
    pub fn opener(&self, me: &NodeName) -> Opener {
        Opener {
            key: self.key,
            me: receiver_tag(me),
            senders: HashMap::new(),
        }
    }
}

/// The `to` of the datagrams for the node named `name`: never 0.
fn receiver_tag(name: &NodeName) -> u64 {
    let digest = Sha256::digest(name.as_str().as_bytes());
    let mut tag = [0; 8];
    tag.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(tag).max(1)
}

/// What a receiver remembers of one sender.
#[derive(Debug, Clone, Copy)]
struct Seen {
    incarnation: u64,
    highest: u64,
    /// Bit `i` set: counter `highest - i` was received.
    bits: u64,
}

impl Seen {
    /// Records `counter` of `incarnation` (inside the window only when `addressed`), or says
    /// it is refused.
    fn accept(&mut self, incarnation: u64, counter: u64, addressed: bool) -> bool {
        if incarnation != self.incarnation {
            if incarnation < self.incarnation {
                return false;
            }
            *self = Seen {
                incarnation,
                highest: counter,
                bits: 1,
            };
            return true;
        }
        if counter > self.highest {
            let shift = counter - self.highest;
            self.bits = if shift >= WINDOW {
                0
            } else {
                self.bits << shift
            } | 1;
            self.highest = counter;
            return true;
        }
        let age = self.highest - counter;
        if !addressed || age >= WINDOW || self.bits & (1 << age) != 0 {
            return false;
        }
        self.bits |= 1 << age;
        true
    }
}

/// Opens datagrams and refuses replays: one per receiving socket.
#[derive(Debug)]
pub struct Opener {
    key: [u8; 32],
    /// The `to` of datagrams for this node.
    me: u64,
    senders: HashMap<NodeName, Seen>,
}

impl Opener {
    /// The heartbeat in a sealed datagram received at `now_ms`, if its tag is valid, it decodes,
    /// it is recent and it was not received before.
    pub fn open(&mut self, datagram: &[u8], now_ms: u64) -> Result<Heartbeat, DatagramError> {
        let payload = verify(&self.key, datagram).ok_or(DatagramError::Seal)?;
        let (stamp, body) = payload
            .split_at_checked(STAMP_LEN)
            .ok_or(DatagramError::Seal)?;
        let field = |i: usize| {
            let mut bytes = [0; 8];
            bytes.copy_from_slice(&stamp[i * 8..i * 8 + 8]);
            u64::from_be_bytes(bytes)
        };
        let (counter, sent_ms, to) = (field(0), field(1), field(2));
        if to != 0 && to != self.me {
            return Err(DatagramError::Misdirected);
        }
        let skew_ms = now_ms.abs_diff(sent_ms);
        if skew_ms > MAX_AGE_MS {
            return Err(DatagramError::Stale { skew_ms });
        }
        let heartbeat: Heartbeat = codec::decode(body)?;
        let from = &heartbeat.from;
        let fresh = match self.senders.get_mut(&from.name) {
            Some(seen) => seen.accept(from.incarnation, counter, to != 0),
            None => {
                self.senders.insert(
                    from.name.clone(),
                    Seen {
                        incarnation: from.incarnation,
                        highest: counter,
                        bits: 1,
                    },
                );
                true
            }
        };
        if fresh {
            Ok(heartbeat)
        } else {
            Err(DatagramError::Replayed)
        }
    }
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
    use chat_protocol::peer::{HeartbeatKind, MemberInfo};

    const NOW: u64 = 1_800_000_000_000;

    /// The receiver of the datagrams of these tests.
    fn b() -> NodeName {
        NodeName::new("b").unwrap()
    }

    fn heartbeat(incarnation: u64) -> Heartbeat {
        Heartbeat {
            from: MemberInfo {
                name: NodeName::new("a").unwrap(),
                incarnation,
                addr: "a:7000".into(),
                public_url: None,
            },
            kind: HeartbeatKind::Ping { nonce: 7 },
            members: Vec::new(),
            departed: Vec::new(),
        }
    }

    #[test]
    fn sealed_datagrams_open_only_with_the_same_key() {
        let sealer = Sealer::new(key("secret", None));
        let datagram = sealer.seal(&heartbeat(1), Some(&b()), NOW).unwrap();
        assert_eq!(
            sealer.opener(&b()).open(&datagram, NOW).unwrap(),
            heartbeat(1)
        );
        for other in [key("other", None), key("secret", Some(b"another CA"))] {
            let result = Sealer::new(other).opener(&b()).open(&datagram, NOW);
            assert!(matches!(result, Err(DatagramError::Seal)));
        }
        let mut tampered = datagram.clone();
        tampered[0] ^= 1;
        let mut opener = sealer.opener(&b());
        assert!(matches!(
            opener.open(&tampered, NOW),
            Err(DatagramError::Seal)
        ));
        assert!(matches!(
            opener.open(b"short", NOW),
            Err(DatagramError::Seal)
        ));
    }

    #[test]
    fn a_datagram_opens_once() {
        let sealer = Sealer::new(key("secret", None));
        let mut opener = sealer.opener(&b());
        let first = sealer.seal(&heartbeat(1), Some(&b()), NOW).unwrap();
        assert!(opener.open(&first, NOW).is_ok());
        assert!(matches!(
            opener.open(&first, NOW),
            Err(DatagramError::Replayed)
        ));
    }

    #[test]
    fn datagrams_may_arrive_out_of_order_within_the_window() {
        let sealer = Sealer::new(key("secret", None));
        let sent: Vec<Vec<u8>> = (0..WINDOW + 10)
            .map(|_| sealer.seal(&heartbeat(1), Some(&b()), NOW).unwrap())
            .collect();
        let mut opener = sealer.opener(&b());
        // The newest first, then the rest backwards: the ones inside the window open, once.
        for (i, datagram) in sent.iter().enumerate().rev() {
            let age = sent.len() - 1 - i;
            let opened = opener.open(datagram, NOW);
            assert_eq!(opened.is_ok(), (age as u64) < WINDOW, "age {age}");
            assert!(opener.open(datagram, NOW).is_err());
        }
    }

    #[test]
    fn an_earlier_life_is_refused_once_a_later_one_was_heard() {
        let old = Sealer::new(key("secret", None));
        let new = Sealer::new(key("secret", None));
        let captured = old.seal(&heartbeat(1), Some(&b()), NOW).unwrap();
        let mut opener = new.opener(&b());
        assert!(
            opener
                .open(&new.seal(&heartbeat(2), Some(&b()), NOW).unwrap(), NOW)
                .is_ok()
        );
        assert!(matches!(
            opener.open(&captured, NOW),
            Err(DatagramError::Replayed)
        ));
    }

    #[test]
    fn old_datagrams_are_refused_by_a_receiver_without_memory() {
        let sealer = Sealer::new(key("secret", None));
        let captured = sealer.seal(&heartbeat(1), Some(&b()), NOW).unwrap();
        let later = NOW + MAX_AGE_MS + 1;
        let result = sealer.opener(&b()).open(&captured, later);
        assert!(matches!(result, Err(DatagramError::Stale { .. })));
        assert!(
            sealer
                .opener(&b())
                .open(&captured, NOW + MAX_AGE_MS)
                .is_ok()
        );
    }

    #[test]
    fn a_datagram_for_one_node_is_refused_by_the_others() {
        let sealer = Sealer::new(key("secret", None));
        let for_b = sealer.seal(&heartbeat(1), Some(&b()), NOW).unwrap();
        let result = sealer
            .opener(&NodeName::new("c").unwrap())
            .open(&for_b, NOW);
        assert!(matches!(result, Err(DatagramError::Misdirected)));
        assert!(sealer.opener(&b()).open(&for_b, NOW).is_ok());
    }

    #[test]
    fn an_unaddressed_datagram_is_accepted_only_past_the_highest_counter() {
        let sealer = Sealer::new(key("secret", None));
        let early_seed_ping = sealer.seal(&heartbeat(1), None, NOW).unwrap();
        let to_c = sealer
            .seal(&heartbeat(1), Some(&NodeName::new("c").unwrap()), NOW)
            .unwrap();
        let mut c = sealer.opener(&NodeName::new("c").unwrap());
        assert!(c.open(&to_c, NOW).is_ok());
        // Captured earlier, played to c after something newer: refused even inside the window.
        assert!(matches!(
            c.open(&early_seed_ping, NOW),
            Err(DatagramError::Replayed)
        ));
        let late_seed_ping = sealer.seal(&heartbeat(1), None, NOW).unwrap();
        assert!(c.open(&late_seed_ping, NOW).is_ok());
    }
}
