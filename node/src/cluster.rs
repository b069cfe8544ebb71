//! The cluster: membership, placement and node-to-node messaging.
//!
//! - [`Cluster`] is the one way any part of the node talks to a node, itself included:
//!   [`Cluster::send`] hands a [`PeerMessage`] to the right local actor, or encodes it once and
//!   casts it to the peer's router.
//! - [`view`]: the current membership and the placement of rooms and users on it.
//! - [`ring`]: the pure consistent-hash ring.
//! - [`router`]: the one remotable actor per node; it decodes what peers send.
//! - [`membership`]: heartbeats over UDP, failure detection and the write lease (quorum).
//! - [`links`]: the ractor_cluster node server and the sessions to peers.
//!
//! ```text
//!   node A                                             node B
//!   Session ─┐                                     ┌─> RoomHost ─> Room
//!   Room ────┼─> Cluster::send ─> router(B) ══TCP══> router(B) ─> Hub ─> sessions
//!   Hub ─────┘        │ (to A itself)              └─> LogKeeper, Directory
//!                     └─> local actor, no encoding
//! ```

pub mod detector;
pub mod links;
pub mod membership;
pub mod ring;
pub mod router;
pub mod view;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use chat_protocol::NodeName;
use chat_protocol::codec;
use chat_protocol::peer::{Envelope, PeerMessage};
use ractor::ActorRef;
use tokio::sync::watch;

use crate::directory::DirectoryMessage;
use crate::hub::HubMessage;
use crate::metrics::{Direction, Metrics};
use crate::rooms::host::HostMessage;
use crate::rooms::keeper::KeeperMessage;
use router::RouterMessage;
use view::View;

/// Bytes sent to a peer and not yet credited back before the link counts as congested; further
/// messages to it are dropped (and counted) instead of growing an unbounded queue.
pub const MAX_UNCREDITED_BYTES: u64 = 32 << 20;

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
    /// The local actor for this message is not running.
    #[error("local actor not running")]
    NotRunning,
}

/// The local actors that receive peer messages; each registers itself when it starts.
#[derive(Default)]
struct Locals {
    hub: Option<ActorRef<HubMessage>>,
    host: Option<ActorRef<HostMessage>>,
    keeper: Option<ActorRef<KeeperMessage>>,
    directory: Option<ActorRef<DirectoryMessage>>,
    sessions: Option<ractor::ActorCell>,
}

/// A session to a peer: its router, and the flow-control counter of the link.
#[derive(Clone)]
pub struct Link {
    router: ActorRef<RouterMessage>,
    uncredited: Arc<AtomicU64>,
}

struct Inner {
    me: NodeName,
    metrics: Metrics,
    locals: RwLock<Locals>,
    links: RwLock<HashMap<NodeName, Link>>,
    view_tx: watch::Sender<Arc<View>>,
}

/// The node's handle on the cluster. Cheap to clone.
#[derive(Clone)]
pub struct Cluster {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("me", &self.inner.me)
            .finish()
    }
}

impl Cluster {
    /// Creates the handle with an initial view.
    pub fn new(me: NodeName, metrics: Metrics, view: View) -> Cluster {
        let (view_tx, _) = watch::channel(Arc::new(view));
        Cluster {
            inner: Arc::new(Inner {
                me,
                metrics,
                locals: RwLock::default(),
                links: RwLock::default(),
                view_tx,
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

    /// The current view.
    pub fn view(&self) -> Arc<View> {
        self.inner.view_tx.borrow().clone()
    }

    /// Publishes a new view and tells the local actors that depend on it.
    pub fn set_view(&self, view: View) {
        let view = Arc::new(view);
        self.inner.metrics.members.set(view.up_count() as i64);
        self.inner.metrics.quorum.set(i64::from(view.quorum));
        self.inner.view_tx.send_replace(view.clone());
        let locals = self.locals();
        if let Some(host) = &locals.host {
            let _ = host.cast(HostMessage::ViewChanged(view.clone()));
        }
        if let Some(hub) = &locals.hub {
            let _ = hub.cast(HubMessage::ViewChanged(view.clone()));
        }
        if let Some(directory) = &locals.directory {
            let _ = directory.cast(DirectoryMessage::ViewChanged(view));
        }
    }

    fn locals(&self) -> std::sync::RwLockReadGuard<'_, Locals> {
        // A poisoned lock only means a writer panicked mid-assignment of an Option: still valid.
        self.inner
            .locals
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn locals_mut(&self) -> std::sync::RwLockWriteGuard<'_, Locals> {
        self.inner
            .locals
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Registers the hub (called from its `pre_start`).
    pub fn set_hub(&self, hub: ActorRef<HubMessage>) {
        self.locals_mut().hub = Some(hub);
    }

    /// Registers the room host.
    pub fn set_host(&self, host: ActorRef<HostMessage>) {
        self.locals_mut().host = Some(host);
    }

    /// Registers the log keeper.
    pub fn set_keeper(&self, keeper: ActorRef<KeeperMessage>) {
        self.locals_mut().keeper = Some(keeper);
    }

    /// Registers the directory.
    pub fn set_directory(&self, directory: ActorRef<DirectoryMessage>) {
        self.locals_mut().directory = Some(directory);
    }

    /// Registers the supervisor of sessions.
    pub fn set_sessions(&self, sessions: ractor::ActorCell) {
        self.locals_mut().sessions = Some(sessions);
    }

    /// The local hub, if running.
    pub fn hub(&self) -> Option<ActorRef<HubMessage>> {
        self.locals().hub.clone()
    }

    /// The local room host, if running.
    pub fn host(&self) -> Option<ActorRef<HostMessage>> {
        self.locals().host.clone()
    }

    /// The supervisor of sessions, if running.
    pub fn sessions(&self) -> Option<ractor::ActorCell> {
        self.locals().sessions.clone()
    }

    /// Records a ready session to `node` whose router is `router`.
    pub fn add_link(&self, node: NodeName, router: ActorRef<RouterMessage>) {
        let link = Link {
            router,
            uncredited: Arc::new(AtomicU64::new(0)),
        };
        self.links_mut().insert(node, link);
    }

    /// Forgets the session to `node` (it went down or its session closed).
    pub fn remove_link(&self, node: &NodeName) {
        self.links_mut().remove(node);
    }

    /// Whether a session to `node` is ready.
    pub fn has_link(&self, node: &NodeName) -> bool {
        self.links().contains_key(node)
    }

    /// Records that `node` processed `bytes` more of what this node sent it.
    pub fn credit(&self, node: &NodeName, bytes: u64) {
        if let Some(link) = self.links().get(node) {
            let _ = link
                .uncredited
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                    Some(v.saturating_sub(bytes))
                });
        }
    }

    fn links(&self) -> std::sync::RwLockReadGuard<'_, HashMap<NodeName, Link>> {
        self.inner
            .links
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn links_mut(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<NodeName, Link>> {
        self.inner
            .links
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Sends `message` to `node`: dispatched locally when `node` is this node, else encoded and
    /// cast to the peer's router. Never blocks; failures are counted and returned.
    pub fn send(&self, node: &NodeName, message: PeerMessage) -> Result<(), SendError> {
        if node == &self.inner.me {
            return self.dispatch(message);
        }
        let kind = message.kind();
        let result = self.send_remote(node, message);
        if let Err(e) = result {
            let reason = match e {
                SendError::Unreachable => "unreachable",
                SendError::Congested => "congested",
                SendError::TooLarge => "too_large",
                SendError::NotRunning => "not_running",
            };
            Metrics::count(&self.inner.metrics.peer_dropped, reason);
            tracing::debug!(peer = %node, kind, reason, "peer message not sent");
        }
        result
    }

    fn send_remote(&self, node: &NodeName, message: PeerMessage) -> Result<(), SendError> {
        let link = self
            .links()
            .get(node)
            .cloned()
            .ok_or(SendError::Unreachable)?;
        let kind = message.kind();
        let credit = matches!(message, PeerMessage::Credit { .. });
        let envelope = Envelope {
            from: self.inner.me.clone(),
            message,
        };
        let bytes = codec::encode(&envelope).map_err(|e| {
            tracing::error!(peer = %node, kind, error = %e, "peer message not encodable");
            SendError::TooLarge
        })?;
        let len = bytes.len() as u64;
        // Credits themselves are exempt, or two congested peers could never recover.
        if !credit {
            let before = link.uncredited.fetch_add(len, Ordering::Relaxed);
            if before > MAX_UNCREDITED_BYTES {
                link.uncredited.fetch_sub(len, Ordering::Relaxed);
                return Err(SendError::Congested);
            }
        }
        self.inner.metrics.peer(Direction::Sent, kind, bytes.len());
        link.router
            .cast(RouterMessage::Deliver(bytes))
            .map_err(|_| SendError::Unreachable)
    }

    /// Hands a message to the local actor that handles it.
    pub fn dispatch(&self, message: PeerMessage) -> Result<(), SendError> {
        let locals = self.locals();
        if let PeerMessage::SessionsReset { .. } = &message {
            // For both the rooms and the directory.
            let to_host = locals
                .host
                .as_ref()
                .is_some_and(|a| a.cast(HostMessage::Peer(message.clone())).is_ok());
            let to_directory = locals
                .directory
                .as_ref()
                .is_some_and(|a| a.cast(DirectoryMessage::Peer(message)).is_ok());
            return if to_host && to_directory {
                Ok(())
            } else {
                Err(SendError::NotRunning)
            };
        }
        let sent = match message {
            PeerMessage::Room { .. }
            | PeerMessage::Subscribe { .. }
            | PeerMessage::Activate { .. }
            | PeerMessage::Promised { .. }
            | PeerMessage::Appended { .. }
            | PeerMessage::Fetched { .. } => locals
                .host
                .as_ref()
                .map(|a| a.cast(HostMessage::Peer(message)).is_ok()),
            PeerMessage::Reply { .. }
            | PeerMessage::Fanout { .. }
            | PeerMessage::Presence { .. }
            | PeerMessage::DeliverDirect { .. }
            | PeerMessage::RoomActive { .. }
            | PeerMessage::Reannounce { .. } => locals
                .hub
                .as_ref()
                .map(|a| a.cast(HubMessage::Peer(message)).is_ok()),
            PeerMessage::Presences { .. } | PeerMessage::Direct { .. } => locals
                .directory
                .as_ref()
                .map(|a| a.cast(DirectoryMessage::Peer(message)).is_ok()),
            PeerMessage::Promise { .. }
            | PeerMessage::Append { .. }
            | PeerMessage::Fetch { .. } => locals
                .keeper
                .as_ref()
                .map(|a| a.cast(KeeperMessage::Peer(message)).is_ok()),
            PeerMessage::Credit { .. } | PeerMessage::SessionsReset { .. } => Some(true),
        };
        match sent {
            Some(true) => Ok(()),
            _ => Err(SendError::NotRunning),
        }
    }

    /// Counts a message that arrived from a peer.
    pub fn count_received(&self, kind: &'static str, bytes: usize) {
        self.inner.metrics.peer(Direction::Received, kind, bytes);
    }

    /// Counts a payload from a peer that failed to decode.
    pub fn count_decode_failure(&self) {
        self.inner.metrics.peer_decode_failures.inc();
    }
}

/// The cluster-mode actors of a node, started by [`start`].
pub struct ClusterNode {
    membership: ActorRef<membership::MembershipMessage>,
    links: ActorRef<links::LinksMessage>,
    router: ActorRef<RouterMessage>,
    server: ActorRef<ractor_cluster::NodeServerMessage>,
    /// The bound node-to-node address (TCP and UDP).
    pub addr: std::net::SocketAddr,
    done: Vec<tokio::task::JoinHandle<()>>,
}

/// What cluster mode needs from the settings.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// Address to bind the node-to-node port on (TCP sessions, UDP heartbeats).
    pub listen: String,
    /// `host:port` peers use to reach this node.
    pub advertise: String,
    /// Seed addresses.
    pub seeds: Vec<String>,
    /// The shared secret.
    pub cookie: String,
    /// The URL browsers use to reach this node.
    pub public_url: Option<String>,
    /// Heartbeat timing and bootstrap.
    pub detector: detector::DetectorConfig,
}

/// Starts the node server, the router, the links and the membership.
pub async fn start(
    cluster: &Cluster,
    config: ClusterConfig,
    store: &crate::store::Store,
    writer: &crate::store::Writer,
) -> anyhow::Result<ClusterNode> {
    use anyhow::Context as _;
    use ractor::Actor;

    let addr = tokio::net::lookup_host(&config.listen)
        .await
        .with_context(|| format!("resolving `cluster-listen` {}", config.listen))?
        .next()
        .with_context(|| format!("`cluster-listen` {} resolves to nothing", config.listen))?;
    let socket = tokio::net::UdpSocket::bind(addr)
        .await
        .with_context(|| format!("binding the heartbeat port udp/{addr}"))?;
    let addr = socket.local_addr()?;
    let host = config
        .advertise
        .rsplit_once(':')
        .map_or(config.advertise.as_str(), |(h, _)| h)
        .to_owned();
    let server = ractor_cluster::NodeServer::new(
        addr.port(),
        config.cookie.clone(),
        cluster.me().to_string(),
        host,
        None,
        Some(ractor_cluster::node::NodeConnectionMode::Isolated),
    )
    .with_listen_addr(addr.ip())
    .with_max_inbound_frame_size(ractor_cluster::DEFAULT_MAX_INBOUND_FRAME_SIZE);
    let (server, server_done) = Actor::spawn(None, server, ())
        .await
        .context("starting the node server")?;
    let (router, router_done) = Actor::spawn(None, router::Router, cluster.clone())
        .await
        .context("starting the router")?;
    let (links, links_done) = Actor::spawn(
        None,
        links::Links,
        links::LinksArgs {
            cluster: cluster.clone(),
            server: server.clone(),
        },
    )
    .await
    .context("starting the links")?;
    // Milliseconds since the Unix epoch as a floor: a node restarted with an empty data
    // directory must not reuse an incarnation its peers saw (they would ignore it as stale).
    let incarnation = store.next_incarnation(crate::rooms::room::now_ms())?;
    let me = chat_protocol::peer::MemberInfo {
        name: cluster.me().clone(),
        incarnation,
        addr: config.advertise.clone(),
        public_url: config.public_url.clone(),
    };
    let (membership, membership_done) = Actor::spawn(
        None,
        membership::Membership,
        membership::MembershipArgs {
            cluster: cluster.clone(),
            me,
            socket: std::sync::Arc::new(socket),
            key: membership::datagram_key(&config.cookie),
            seeds: config.seeds,
            config: config.detector,
            store: store.clone(),
            writer: writer.clone(),
            links: links.clone(),
        },
    )
    .await
    .context("starting the membership")?;
    links.cast(links::LinksMessage::SetMembership(membership.clone()))?;
    Ok(ClusterNode {
        membership,
        links,
        router,
        server,
        addr,
        done: vec![server_done, router_done, links_done, membership_done],
    })
}

impl ClusterNode {
    /// Tells every member this node is leaving (they drop it at once).
    pub async fn leave(&self) {
        let _ = ractor::call_t!(self.membership, membership::MembershipMessage::Leave, 1000);
    }

    /// Stops the cluster-mode actors.
    pub async fn stop(self) {
        self.membership.stop(None);
        self.links.stop(None);
        self.router.stop(None);
        self.server.stop(None);
        for done in self.done {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(2), done).await;
        }
    }

    /// Waits until one of the cluster-mode actors stops by itself.
    pub async fn stopped(&mut self) {
        if self.done.is_empty() {
            return std::future::pending().await;
        }
        let (_, _, rest) = futures_util::future::select_all(self.done.drain(..)).await;
        self.done = rest;
    }
}
