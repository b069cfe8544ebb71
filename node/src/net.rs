//! The node-to-node layer: the bottom of the node. It knows the wire types of the protocol and
//! no actor of the layers above.
//!
//! ```text
//!   Room, Hub, LogKeeper, Directory, Membership           (layers above: they register inboxes)
//!        │ Net::send(node, PeerMessage)        ▲ inbox(ToRooms | ToKeeper | ToHub | ToDirectory)
//!        ▼                                     │
//!   Net ── to this node: straight to the inbox, unencoded
//!     └─── to a peer: wire::encode once ─> Link (batches) ══ractor_cluster══> Router(peer) ─> wire::decode
//!                                                                      ─> the peer's Net inboxes
//! ```
//!
//! - [`Net`]: sends a [`PeerMessage`] to any node, itself included, and hands what arrives to
//!   the inbox registered for its destination. Messages are typed by destination, so routing is
//!   one match and each part of the node only ever sees its own messages.
//! - [`wire`]: the one encoding of node-to-node traffic, and the flow control of a link.
//! - [`router`]: the one remotable actor of a node: decodes what peers send.
//! - [`links`]: the ractor_cluster node server's sessions to peers: dials the members it is told
//!   to keep, records ready sessions here, drops dead ones.
//! - [`transport`]: the cluster port's TCP side: TLS, and the deadline and caps on streams that
//!   have not authenticated yet.
//! - [`datagram`]: the sealed UDP heartbeats of the membership service.

pub mod datagram;
pub mod links;
pub mod router;
pub mod transport;
pub mod wire;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use chat_protocol::NodeName;
use chat_protocol::RoomId;
use chat_protocol::peer::{PeerMessage, ToDirectory, ToHub, ToKeeper, ToRoom, ToRooms};
use tokio::sync::watch;

use crate::metrics::{Direction, Metrics};
use wire::{Link, LinkError};

/// Why a message could not be handed over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// No session to that node (down, not yet connected).
    #[error("node unreachable")]
    Unreachable,
    /// The link to that node is congested (a slow or frozen peer).
    #[error("link congested")]
    Congested,
    /// The message encodes to more than the codec allows.
    #[error("message too large")]
    TooLarge,
    /// No part of this node takes that message right now (it is restarting).
    #[error("local receiver not running")]
    NotRunning,
}

impl SendError {
    fn label(self) -> &'static str {
        match self {
            SendError::Unreachable => "unreachable",
            SendError::Congested => "congested",
            SendError::TooLarge => "too_large",
            SendError::NotRunning => "not_running",
        }
    }
}

/// Where messages for one destination go: usually a cast to the current actor, which returns
/// false once that actor is gone.
pub type Inbox<T> = Box<dyn Fn(T) -> bool + Send + Sync>;

#[derive(Default)]
struct Inboxes {
    rooms: Option<Inbox<ToRooms>>,
    keeper: Option<Inbox<ToKeeper>>,
    hub: Option<Inbox<ToHub>>,
    directory: Option<Inbox<ToDirectory>>,
}

struct Inner {
    me: NodeName,
    metrics: Metrics,
    inboxes: RwLock<Inboxes>,
    /// Ready sessions, each with the number it was given when it became ready.
    links: RwLock<HashMap<NodeName, (Link, u64)>>,
    links_changed: watch::Sender<u64>,
}

/// The node's handle on the node-to-node layer. Cheap to clone.
#[derive(Clone)]
pub struct Net {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Net").field("me", &self.inner.me).finish()
    }
}

/// Reads a lock, ignoring poisoning: writers only replace whole values.
fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Net {
    /// The layer of node `me`, with no inbox and no link yet.
    pub fn new(me: NodeName, metrics: Metrics) -> Net {
        let (links_changed, _) = watch::channel(0);
        Net {
            inner: Arc::new(Inner {
                me,
                metrics,
                inboxes: RwLock::default(),
                links: RwLock::default(),
                links_changed,
            }),
        }
    }

    /// This node's name.
    pub fn me(&self) -> &NodeName {
        &self.inner.me
    }

    /// The node's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    // ---- inboxes ----

    /// Registers where messages for this node's rooms go (the room host).
    pub fn serve_rooms(&self, inbox: Inbox<ToRooms>) {
        write(&self.inner.inboxes).rooms = Some(inbox);
    }

    /// Registers where messages for this node's log keeper go.
    pub fn serve_keeper(&self, inbox: Inbox<ToKeeper>) {
        write(&self.inner.inboxes).keeper = Some(inbox);
    }

    /// Registers where messages for this node's hub go.
    pub fn serve_hub(&self, inbox: Inbox<ToHub>) {
        write(&self.inner.inboxes).hub = Some(inbox);
    }

    /// Registers where messages for this node's directory go.
    pub fn serve_directory(&self, inbox: Inbox<ToDirectory>) {
        write(&self.inner.inboxes).directory = Some(inbox);
    }

    // ---- sending ----

    /// Sends `message` to `node`: handed to the local inbox when `node` is this node, else
    /// encoded once and cast to the peer's router. Never blocks; failures are counted and
    /// returned.
    pub fn send(&self, node: &NodeName, message: PeerMessage) -> Result<(), SendError> {
        if node == &self.inner.me {
            return self.deliver(message);
        }
        let kind = message.kind();
        let result = self.send_remote(node, message);
        if let Err(e) = result {
            Metrics::count(&self.inner.metrics.peer_dropped, e.label());
            tracing::debug!(peer = %node, kind, reason = e.label(), "peer message not sent");
        }
        result
    }

    /// Sends a message for the actor of `room` on `node`.
    pub fn to_room(&self, node: &NodeName, room: RoomId, message: ToRoom) -> Result<(), SendError> {
        self.send(node, PeerMessage::Rooms(ToRooms::Room { room, message }))
    }

    /// Sends a message for the rooms of `node`.
    pub fn to_rooms(&self, node: &NodeName, message: ToRooms) -> Result<(), SendError> {
        self.send(node, PeerMessage::Rooms(message))
    }

    /// Sends a message for the log keeper of `node`.
    pub fn to_keeper(&self, node: &NodeName, message: ToKeeper) -> Result<(), SendError> {
        self.send(node, PeerMessage::Keeper(message))
    }

    /// Sends a message for the hub of `node`.
    pub fn to_hub(&self, node: &NodeName, message: ToHub) -> Result<(), SendError> {
        self.send(node, PeerMessage::Hub(message))
    }

    /// Sends a message for the directory of `node`.
    pub fn to_directory(&self, node: &NodeName, message: ToDirectory) -> Result<(), SendError> {
        self.send(node, PeerMessage::Directory(message))
    }

    fn send_remote(&self, node: &NodeName, message: PeerMessage) -> Result<(), SendError> {
        let (link, _) = read(&self.inner.links)
            .get(node)
            .cloned()
            .ok_or(SendError::Unreachable)?;
        let kind = message.kind();
        let is_credit = matches!(message, PeerMessage::Credit { .. });
        let bytes = wire::encode(&self.inner.me, message).map_err(|e| {
            tracing::error!(peer = %node, kind, error = %e, "peer message not encodable");
            SendError::TooLarge
        })?;
        let len = bytes.len();
        link.send(bytes, is_credit).map_err(|e| match e {
            LinkError::Congested => SendError::Congested,
            LinkError::Closed => SendError::Unreachable,
        })?;
        self.inner.metrics.peer(Direction::Sent, kind, len);
        Ok(())
    }

    /// Hands a message (from this node or a peer) to the inbox of its destination.
    pub fn deliver(&self, message: PeerMessage) -> Result<(), SendError> {
        let inboxes = read(&self.inner.inboxes);
        let handed = match message {
            PeerMessage::Rooms(m) => inboxes.rooms.as_ref().map(|inbox| inbox(m)),
            PeerMessage::Keeper(m) => inboxes.keeper.as_ref().map(|inbox| inbox(m)),
            PeerMessage::Hub(m) => inboxes.hub.as_ref().map(|inbox| inbox(m)),
            PeerMessage::Directory(m) => inboxes.directory.as_ref().map(|inbox| inbox(m)),
            PeerMessage::Credit { .. } => Some(true),
        };
        match handed {
            Some(true) => Ok(()),
            _ => Err(SendError::NotRunning),
        }
    }

    // ---- links ----

    /// Records a ready session to `node` (it replaces any previous one).
    pub fn add_link(&self, node: NodeName, link: Link) {
        let mut number = 0;
        self.inner.links_changed.send_modify(|v| {
            *v += 1;
            number = *v;
        });
        write(&self.inner.links).insert(node, (link, number));
    }

    /// Forgets the session to `node` (it went down or its session closed).
    pub fn remove_link(&self, node: &NodeName) {
        if write(&self.inner.links).remove(node).is_some() {
            self.inner.links_changed.send_modify(|v| *v += 1);
        }
    }

    /// Whether a session to `node` is ready.
    pub fn has_link(&self, node: &NodeName) -> bool {
        read(&self.inner.links).contains_key(node)
    }

    /// The number of the ready session to `node`, if any: a new number is a new session.
    pub fn link_session(&self, node: &NodeName) -> Option<u64> {
        read(&self.inner.links).get(node).map(|(_, number)| *number)
    }

    /// Changes whenever a session becomes ready or closes.
    pub fn links_changed(&self) -> watch::Receiver<u64> {
        self.inner.links_changed.subscribe()
    }

    /// Records that `node` processed `bytes` more of what this node sent it.
    pub fn credit(&self, node: &NodeName, bytes: u64) {
        if let Some((link, _)) = read(&self.inner.links).get(node) {
            link.credit(bytes);
        }
    }
}
