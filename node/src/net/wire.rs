//! What crosses a node-to-node link: encoded envelopes, batched, and the flow control of each
//! link.
//!
//! Every message to a peer is encoded here, once, with the protocol's codec. A link queues the
//! envelopes and casts them to the peer's router in batches ([`RouterMessage::DeliverBatch`],
//! each envelope preceded by its length): whatever the node's tasks send to one peer while a
//! flush is pending goes in one cast, so that ractor_cluster's per-message work (a stand-in
//! actor, the session actor, a protobuf frame, the peer's reader and router hops) is paid once
//! per batch instead of once per message. The router decodes each envelope here too.
//!
//! A link counts the bytes it sent that the peer has not credited back yet: past
//! [`MAX_UNCREDITED_BYTES`] the peer counts as congested and further messages are refused
//! instead of growing ractor_cluster's unbounded writer queue.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use chat_protocol::NodeName;
use chat_protocol::codec::{self, CodecError};
use chat_protocol::peer::{Envelope, PeerMessage};
use ractor::ActorRef;
use ractor_cluster::RactorClusterMessage;

/// Bytes sent to a peer and not yet credited back before the link counts as congested; further
/// messages to it are dropped (and counted) instead of growing an unbounded queue.
pub const MAX_UNCREDITED_BYTES: u64 = 32 << 20;
/// The most bytes of envelopes one batch carries (ractor_cluster drops a whole session on a
/// frame over 16 MiB).
pub const MAX_BATCH_BYTES: usize = 256 << 10;
/// Bytes received from a peer between two credits sent back to it.
pub const CREDIT_EVERY: u64 = 256 << 10;
/// The process-group scope of routers.
pub const SCOPE: &str = "chat";

/// The process group of `node`'s router (how peers find it).
pub fn group(node: &NodeName) -> String {
    format!("router.{node}")
}

/// Messages of the router, the one remotable actor of a node (they cross nodes).
#[derive(Debug, RactorClusterMessage)]
pub enum RouterMessage {
    /// An encoded [`Envelope`] from a peer.
    Deliver(Vec<u8>),
    /// Encoded envelopes from a peer, each preceded by its length (u32, big-endian): what its
    /// link queued while a flush was pending ([`frames`]).
    DeliverBatch(Vec<u8>),
}

/// Encodes a message from `from`.
pub fn encode(from: &NodeName, message: PeerMessage) -> Result<Vec<u8>, CodecError> {
    codec::encode(&Envelope {
        from: from.clone(),
        message,
    })
}

/// Decodes what a peer sent.
pub fn decode(bytes: &[u8]) -> Result<Envelope, CodecError> {
    codec::decode(bytes)
}

/// Appends `envelope` to `batch`, preceded by its length.
fn put(batch: &mut Vec<u8>, envelope: &[u8]) {
    let len = u32::try_from(envelope.len()).unwrap_or(u32::MAX);
    batch.extend_from_slice(&len.to_be_bytes());
    batch.extend_from_slice(envelope);
}

/// The framing of a batch is broken: a length runs past its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("broken batch framing at byte {0}")]
pub struct BrokenBatch(pub usize);

/// The envelopes of a batch, in order. A broken framing ends it with one error.
pub fn frames(batch: &[u8]) -> impl Iterator<Item = Result<&[u8], BrokenBatch>> {
    let mut at = 0;
    std::iter::from_fn(move || {
        if at >= batch.len() {
            return None;
        }
        let header = batch
            .get(at..at + 4)
            .and_then(|h| <[u8; 4]>::try_from(h).ok());
        let frame = header.and_then(|h| {
            let len = u32::from_be_bytes(h) as usize;
            batch.get(at + 4..(at + 4).checked_add(len)?)
        });
        match frame {
            Some(frame) => {
                at += 4 + frame.len();
                Some(Ok(frame))
            }
            None => {
                let broken = at;
                at = batch.len();
                Some(Err(BrokenBatch(broken)))
            }
        }
    })
}

/// A ready session to a peer: its router, the envelopes queued for it, and the flow-control
/// counter of the link.
#[derive(Clone)]
pub struct Link {
    router: ActorRef<RouterMessage>,
    uncredited: Arc<AtomicU64>,
    outgoing: Arc<Mutex<Outgoing>>,
    /// Where flushes run: senders include threads outside the runtime (the store's writer).
    runtime: tokio::runtime::Handle,
}

/// What a link has not cast yet.
#[derive(Default)]
struct Outgoing {
    /// Batches, oldest first; only the last one still grows.
    batches: VecDeque<Vec<u8>>,
    /// A flush is scheduled: it casts everything queued, what arrives meanwhile included.
    flushing: bool,
    /// A cast failed: the session is gone, and so is what was queued.
    closed: bool,
}

/// Why a message was not handed to a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkError {
    /// Past the uncredited-bytes bound.
    Congested,
    /// The session is gone.
    Closed,
}

impl Link {
    /// A link to the peer whose router is `router`; its flushes run on `runtime`.
    pub fn new(router: ActorRef<RouterMessage>, runtime: tokio::runtime::Handle) -> Link {
        Link {
            router,
            uncredited: Arc::new(AtomicU64::new(0)),
            outgoing: Arc::default(),
            runtime,
        }
    }

    fn outgoing(&self) -> std::sync::MutexGuard<'_, Outgoing> {
        self.outgoing.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sends encoded bytes; credits themselves are exempt from the bound, or two congested
    /// peers could never recover.
    pub fn send(&self, bytes: Vec<u8>, is_credit: bool) -> Result<(), LinkError> {
        let len = bytes.len() as u64;
        if !is_credit {
            let before = self.uncredited.fetch_add(len, Ordering::Relaxed);
            if before > MAX_UNCREDITED_BYTES {
                self.uncredited.fetch_sub(len, Ordering::Relaxed);
                return Err(LinkError::Congested);
            }
        }
        let mut outgoing = self.outgoing();
        if outgoing.closed {
            return Err(LinkError::Closed);
        }
        match outgoing.batches.back_mut() {
            Some(batch) if batch.len() + 4 + bytes.len() <= MAX_BATCH_BYTES => put(batch, &bytes),
            _ => {
                let mut batch = Vec::with_capacity((4 + bytes.len()).max(4096));
                put(&mut batch, &bytes);
                outgoing.batches.push_back(batch);
            }
        }
        if !outgoing.flushing {
            outgoing.flushing = true;
            drop(outgoing);
            self.runtime.spawn(self.clone().flush());
        }
        Ok(())
    }

    /// Casts the queued batches, in order, until none is left.
    async fn flush(self) {
        // The tasks ready to run go first: what they send to this peer joins the batch.
        tokio::task::yield_now().await;
        loop {
            let batch = {
                let mut outgoing = self.outgoing();
                match outgoing.batches.pop_front() {
                    Some(batch) => batch,
                    None => {
                        outgoing.flushing = false;
                        return;
                    }
                }
            };
            if self
                .router
                .cast(RouterMessage::DeliverBatch(batch))
                .is_err()
            {
                let mut outgoing = self.outgoing();
                outgoing.closed = true;
                outgoing.batches.clear();
                outgoing.flushing = false;
                return;
            }
        }
    }

    /// The peer processed `bytes` more of what was sent.
    pub fn credit(&self, bytes: u64) {
        let _ = self
            .uncredited
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                Some(v.saturating_sub(bytes))
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_gives_back_its_envelopes_in_order() {
        let mut batch = Vec::new();
        for envelope in [&b"one"[..], b"", b"three"] {
            put(&mut batch, envelope);
        }
        let frames: Vec<_> = frames(&batch).collect();
        assert_eq!(
            frames,
            vec![Ok(&b"one"[..]), Ok(&b""[..]), Ok(&b"three"[..])]
        );
    }

    #[test]
    fn a_broken_batch_ends_with_one_error() {
        let mut batch = Vec::new();
        put(&mut batch, b"whole");
        batch.extend_from_slice(&[0, 0, 0, 9, b'x']);
        let frames: Vec<_> = frames(&batch).collect();
        assert_eq!(frames, vec![Ok(&b"whole"[..]), Err(BrokenBatch(9))]);
        assert_eq!(frames_of(&[0, 0]), vec![Err(BrokenBatch(0))]);
    }

    fn frames_of(batch: &[u8]) -> Vec<Result<&[u8], BrokenBatch>> {
        frames(batch).collect()
    }
}
