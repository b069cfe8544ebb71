//! A node of the chat cluster.
//!
//! Clients hold WebSocket connections to any node; every room is an actor on the node chosen
//! for it by consistent hashing over the live members, which sequences its messages and
//! replicates its log to the next nodes on the ring before acknowledging them.
//!
//! Map of the parts, from the bottom up (each layer imports only the layers below it):
//! - [`net`]: the node-to-node layer: sends typed peer messages to any node, encodes them (the
//!   only place that does), the router peers message, the ractor_cluster sessions.
//! - [`cluster`]: membership and failure detection over heartbeats, the view, placement (the
//!   ring), and the supervisor of the cluster-mode actors.
//! - [`store`]: the redb database of room logs, with a group-committing writer thread.
//! - [`rooms`]: Room actors (owner side), the log keeper (replica side), the pure log rules.
//! - [`directory`]: where users are connected, for `direct`.
//! - [`hub`]: this node's connections: requests out, replies and fan-out in.
//! - [`gateway`]: HTTP + WebSocket on one port; one Session actor per connection.
//! - [`supervisor`]: the root supervisor and the restart policy.
//! - [`settings`], [`metrics`], [`telemetry`], [`clock`], [`actors`]: configuration, Prometheus
//!   metrics, logs, wall-clock time, helpers shared by actor shells.
//!
//! [`start_node`] starts everything and returns a [`NodeHandle`]; the binary and the tests use
//! it alike.

pub mod actors;
pub mod clock;
pub mod cluster;
pub mod directory;
pub mod fds;
pub mod gateway;
pub mod hub;
pub mod metrics;
pub mod net;
pub mod rooms;
pub mod settings;
pub mod store;
pub mod supervisor;
pub mod telemetry;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use chat_protocol::RoomId;
use ractor::{Actor, ActorRef};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::actors::Slot;
use crate::cluster::detector::DetectorConfig;
use crate::cluster::view::View;
use crate::cluster::{ClusterArgs, ClusterConfig, Views};
use crate::gateway::auth::Verifier;
use crate::gateway::http::{Gateway, GatewayConfig, GatewayLinks};
use crate::gateway::outbox::Closing;
use crate::gateway::session::Limits;
use crate::gateway::sessions::SessionsMessage;
use crate::metrics::Metrics;
use crate::net::Net;
use crate::net::transport::Tls;
use crate::rooms::core::RoomConfig;
use crate::settings::Settings;
use crate::store::{Memory, Store, Writer};
use crate::supervisor::{Root, RootArgs, RootMessage};

/// A running node.
pub struct NodeHandle {
    http_addr: SocketAddr,
    cluster_addr: Option<SocketAddr>,
    views: Views,
    metrics: Metrics,
    serving: watch::Sender<bool>,
    stop: watch::Sender<bool>,
    root: ActorRef<RootMessage>,
    root_done: Option<tokio::task::JoinHandle<()>>,
    sessions: Slot<SessionsMessage>,
    writer_thread: Option<std::thread::JoinHandle<()>>,
    grace: Duration,
}

impl std::fmt::Debug for NodeHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeHandle")
            .field("http_addr", &self.http_addr)
            .finish()
    }
}

/// Opens the store. A brand-new data directory on a full disk cannot hold even an empty store:
/// the node then answers every HTTP request on `listener` with 503 (`"reason":"store"`) and
/// tries again every [`store::PROBE_INTERVAL`], rather than exiting; any other failure to open
/// the store stops the start with an error naming the data directory.
async fn open_store(settings: &Settings, listener: &TcpListener) -> anyhow::Result<Store> {
    let dir = &settings.data_dir;
    let mut waiting = false;
    loop {
        let error = match Store::open(dir) {
            Ok(store) => {
                if waiting {
                    tracing::info!(dir = %dir.display(), "store created: starting");
                }
                return Ok(store);
            }
            Err(error) => error,
        };
        if !disk_full(dir) {
            return Err(error).with_context(|| format!("opening the store in {}", dir.display()));
        }
        if !waiting {
            waiting = true;
            tracing::error!(dir = %dir.display(), %error, "no space for the store: answering 503 until it can be created");
        }
        let retry = tokio::time::sleep(store::PROBE_INTERVAL);
        tokio::pin!(retry);
        loop {
            tokio::select! {
                () = &mut retry => break,
                accepted = listener.accept() => {
                    if let Ok((stream, _)) = accepted {
                        let node = settings.name.clone();
                        tokio::spawn(gateway::http::store_unavailable(stream, node));
                    }
                }
            }
        }
    }
}

/// Whether the file system of `dir` is full: a 1 MiB write there fails for lack of space.
fn disk_full(dir: &std::path::Path) -> bool {
    let probe = dir.join(".space-probe");
    let written = std::fs::create_dir_all(dir).and_then(|()| std::fs::write(&probe, [0; 1 << 20]));
    let _ = std::fs::remove_file(&probe);
    written.is_err_and(|e| {
        matches!(
            e.kind(),
            std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
        )
    })
}

/// Starts a node: opens the store, starts the actors, joins the cluster (in cluster mode) and
/// serves HTTP on `settings.listen`.
pub async fn start_node(settings: Settings) -> anyhow::Result<NodeHandle> {
    settings.validate()?;
    let metrics = Metrics::new();
    let listener = TcpListener::bind(&settings.listen)
        .await
        .with_context(|| format!("binding `listen` {}", settings.listen))?;
    let http_addr = listener.local_addr()?;
    let store = open_store(&settings, &listener).await?;
    let (writer, writer_thread) =
        Writer::start(store.clone(), metrics.clone()).context("starting the store writer")?;

    let me = settings.name.clone();
    let mut view = View::single(
        me.clone(),
        settings
            .advertised_cluster_addr()
            .unwrap_or_else(|| http_addr.to_string()),
        settings.public_url.clone(),
    );
    let net = Net::new(me.clone(), metrics.clone());
    let mut cluster = None;
    let mut cluster_addr = None;
    if let (Some(listen), Some(cookie)) = (&settings.cluster_listen, &settings.cookie) {
        // In cluster mode nothing is written before the membership finds a quorum.
        view = View::new(me.clone(), view.members.clone(), false, 0);
        let port = cluster::bind(listen).await?;
        cluster_addr = Some(port.local_addr()?);
        let tls = match settings.cluster_tls() {
            Some((cert, key, ca)) => Some(Tls::load(cert, key, ca)?),
            None => None,
        };
        cluster = Some(ClusterConfig {
            advertise: settings
                .advertised_cluster_addr()
                .unwrap_or_else(|| listen.clone()),
            seeds: settings.seeds.clone(),
            cookie: cookie.clone(),
            public_url: settings.public_url.clone(),
            tls,
            detector: DetectorConfig {
                interval: Duration::from_millis(settings.heartbeat_interval_ms),
                failure_timeout: Duration::from_millis(settings.failure_timeout_ms),
                bootstrap_expect: settings.bootstrap_expect,
            },
        })
        .map(|config| (config, port));
    }
    if cluster.is_none() && store.memory() != Memory::Intact {
        // Alone, a node has nobody else's copies to compare with: a new store is just new.
        store.set_memory(Memory::Intact)?;
    }
    let (views_tx, views) = watch::channel(Arc::new(view));
    let cluster = cluster.map(|(config, port)| ClusterArgs {
        net: net.clone(),
        views: views_tx.clone(),
        config,
        port,
        store: store.clone(),
        writer: writer.clone(),
    });

    let room = RoomConfig {
        replication_factor: settings.replication_factor,
        replay_cap: settings.replay_cap,
        idle: Duration::from_millis(settings.room_idle_ms),
        queue_timeout: Duration::from_millis(settings.request_timeout_ms * 4 / 5),
        retention: settings.retention(),
        flaw: None,
    };
    let hub = Slot::default();
    let sessions = Slot::default();
    let root_args = RootArgs {
        net: net.clone(),
        views: views.clone(),
        cluster,
        store: store.clone(),
        writer: writer.clone(),
        room,
        request_timeout: Duration::from_millis(settings.request_timeout_ms),
        max_rooms_per_connection: settings.max_rooms_per_connection,
        direct_rate: settings.direct_rate,
        hub: hub.clone(),
        sessions: sessions.clone(),
    };
    let (root, root_done) = Actor::spawn(None, Root, root_args)
        .await
        .context("starting the node's actors")?;
    drop(writer);
    // Single-node mode: nobody publishes another view (receivers keep the last one).
    drop(views_tx);

    let (serving, serving_rx) = watch::channel(false);
    let (stop, stop_rx) = watch::channel(false);
    let gateway_config = GatewayConfig {
        max_connections: fds::connection_limit(settings.max_connections, fds::open_files_limit()),
        max_frame_bytes: settings.max_frame_bytes,
        client_queue: settings.client_queue,
        client_queue_bytes: settings.client_queue_bytes,
        idle_timeout: Duration::from_millis(settings.idle_timeout_ms),
        limits: Limits {
            max_text_bytes: settings.max_text_bytes,
            rate_limit: settings.rate_limit,
            request_rate: settings.request_rate,
        },
        verifier: settings.auth_secret.as_deref().map(Verifier::new),
        max_connections_per_user: settings.max_connections_per_user,
        max_connections_per_address: settings.max_connections_per_address,
        replication_factor: settings.replication_factor,
    };
    let links = GatewayLinks {
        me: me.clone(),
        metrics: metrics.clone(),
        views: views.clone(),
        hub,
        sessions: sessions.clone(),
        store: store.clone(),
    };
    let gateway = Gateway::new(gateway_config, links, serving_rx);
    tokio::spawn(gateway::http::serve(listener, gateway, stop_rx));
    serving.send_replace(true);
    tracing::info!(node = %me, http = %http_addr, data_dir = %settings.data_dir.display(), "node serving");

    Ok(NodeHandle {
        http_addr,
        cluster_addr,
        views,
        metrics,
        serving,
        stop,
        root,
        root_done: Some(root_done),
        sessions,
        writer_thread: Some(writer_thread),
        grace: Duration::from_millis(settings.shutdown_grace_ms),
    })
}

impl NodeHandle {
    /// The address HTTP and WebSocket are served on.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// The bound node-to-node address, in cluster mode.
    pub fn cluster_addr(&self) -> Option<SocketAddr> {
        self.cluster_addr
    }

    /// The node's current view of the cluster.
    pub fn view(&self) -> Arc<View> {
        self.views.borrow().clone()
    }

    /// Makes the actor of `room` panic, if this node runs it (tests of the restart policy).
    pub fn crash_room(&self, room: &RoomId) {
        let _ = self.root.cast(RootMessage::CrashRoom(room.clone()));
    }

    /// The supervisor of this node's sessions (tests of the restart policy).
    pub fn sessions(&self) -> Option<ActorRef<SessionsMessage>> {
        self.sessions.get()
    }

    /// Makes the supervisor of the cluster-mode actors fail (tests of the restart policy).
    pub fn crash_cluster(&self) {
        let _ = self.root.cast(RootMessage::CrashCluster);
    }

    /// Makes the hub fail (tests of the restart policy).
    pub fn crash_hub(&self) {
        let _ = self.root.cast(RootMessage::CrashHub);
    }

    /// Waits until the node's actors stop by themselves (repeated failures).
    pub async fn stopped(&mut self) {
        if let Some(done) = self.root_done.as_mut() {
            let _ = done.await;
        }
        self.root_done = None;
    }

    /// Stops gracefully: refuses new connections, closes clients with 1001 (after what was
    /// queued for them), stops the actors and flushes the store.
    pub async fn shutdown(mut self) {
        tracing::info!("shutting down");
        self.serving.send_replace(false);
        self.stop.send_replace(true);
        // Peers drop this node at once and take its rooms over, instead of waiting for the
        // failure timeout.
        let _ = self
            .root
            .call(RootMessage::Leave, Some(Duration::from_secs(2)))
            .await;
        let _ = self.root.cast(RootMessage::CloseAll(Closing::Shutdown));
        let deadline = Instant::now() + self.grace;
        while self.metrics.connections.get() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = self
            .root
            .stop_and_wait(Some("shutdown".into()), Some(self.grace))
            .await;
        if let Some(done) = self.root_done.take() {
            let _ = tokio::time::timeout(self.grace, done).await;
        }
        if let Some(thread) = self.writer_thread.take() {
            // The writer commits what is queued, then ends once its last handle is dropped.
            let joined = tokio::task::spawn_blocking(move || thread.join());
            if tokio::time::timeout(self.grace, joined).await.is_err() {
                tracing::warn!("store writer did not finish in time");
            }
        }
        tracing::info!("stopped");
    }
}
