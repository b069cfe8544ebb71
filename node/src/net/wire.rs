//! What crosses a node-to-node link: encoded envelopes, and the flow control of each link.
//!
//! Every message to a peer is encoded here, once, with the protocol's codec, and cast to the
//! peer's router as bytes ([`RouterMessage::Deliver`]); the router decodes it here too. A link
//! counts the bytes it sent that the peer has not credited back yet: past
//! [`MAX_UNCREDITED_BYTES`] the peer counts as congested and further messages are refused
//! instead of growing ractor_cluster's unbounded writer queue.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use chat_protocol::NodeName;
use chat_protocol::codec::{self, CodecError};
use chat_protocol::peer::{Envelope, PeerMessage};
use ractor::ActorRef;
use ractor_cluster::RactorClusterMessage;

/// Bytes sent to a peer and not yet credited back before the link counts as congested; further
/// messages to it are dropped (and counted) instead of growing an unbounded queue.
pub const MAX_UNCREDITED_BYTES: u64 = 32 << 20;
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

/// A ready session to a peer: its router, and the flow-control counter of the link.
#[derive(Clone)]
pub struct Link {
    router: ActorRef<RouterMessage>,
    uncredited: Arc<AtomicU64>,
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
    /// A link to the peer whose router is `router`.
    pub fn new(router: ActorRef<RouterMessage>) -> Link {
        Link {
            router,
            uncredited: Arc::new(AtomicU64::new(0)),
        }
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
        self.router
            .cast(RouterMessage::Deliver(bytes))
            .map_err(|_| LinkError::Closed)
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
