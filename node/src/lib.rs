//! A node of the chat cluster.
//!
//! Clients hold WebSocket connections to any node; every room is an actor on the node chosen
//! for it by consistent hashing over the live members, which sequences its messages and
//! replicates its log to the next nodes on the ring before acknowledging them.
//!
//! Map of the parts:
//! - [`settings`]: layered configuration (defaults < file < `CHAT_*` env < flags).
//! - [`gateway`]: HTTP + WebSocket on one port; one Session actor per connection.
//! - [`hub`]: this node's connections: requests out, replies and fan-out in.
//! - [`rooms`]: Room actors (owner side), the log keeper (replica side), the pure log rules.
//! - [`directory`]: where users are connected, for `direct`.
//! - [`cluster`]: membership and failure detection, placement (the ring), node-to-node messaging.
//! - [`store`]: the redb database of room logs, with a group-committing writer thread.
//! - [`supervisor`]: the root supervisor and the restart policy.
//! - [`metrics`], [`telemetry`]: Prometheus metrics and logs.
//!
//! [`start_node`] starts everything and returns a [`NodeHandle`]; the binary and the tests use
//! it alike.

pub mod cluster;
pub mod directory;
pub mod gateway;
pub mod hub;
pub mod metrics;
pub mod rooms;
pub mod settings;
pub mod store;
pub mod supervisor;
pub mod telemetry;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use chat_protocol::RoomId;
use ractor::{Actor, ActorRef};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::cluster::detector::DetectorConfig;
use crate::cluster::view::View;
use crate::cluster::{Cluster, ClusterConfig, ClusterNode};
use crate::gateway::auth::Verifier;
use crate::gateway::http::{Gateway, GatewayConfig};
use crate::gateway::session::Limits;
use crate::gateway::socket::Closing;
use crate::hub::HubMessage;
use crate::metrics::Metrics;
use crate::rooms::host::HostMessage;
use crate::rooms::room::RoomConfig;
use crate::settings::Settings;
use crate::store::{Store, Writer};
use crate::supervisor::{Root, RootArgs, RootMessage};

/// A running node.
pub struct NodeHandle {
    http_addr: SocketAddr,
    cluster: Cluster,
    serving: watch::Sender<bool>,
    stop: watch::Sender<bool>,
    root: ActorRef<RootMessage>,
    root_done: Option<tokio::task::JoinHandle<()>>,
    cluster_node: Option<ClusterNode>,
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

/// Starts a node: opens the store, starts the actors, joins the cluster (in cluster mode) and
/// serves HTTP on `settings.listen`.
pub async fn start_node(settings: Settings) -> anyhow::Result<NodeHandle> {
    settings.validate()?;
    let metrics = Metrics::new();
    let store = Store::open(&settings.data_dir)
        .with_context(|| format!("opening the store in {}", settings.data_dir.display()))?;
    let (writer, writer_thread) =
        Writer::start(store.clone(), metrics.clone()).context("starting the store writer")?;

    let listener = TcpListener::bind(&settings.listen)
        .await
        .with_context(|| format!("binding `listen` {}", settings.listen))?;
    let http_addr = listener.local_addr()?;

    let me = settings.name.clone();
    let mut view = View::single(
        me.clone(),
        settings
            .advertised_cluster_addr()
            .unwrap_or_else(|| http_addr.to_string()),
        settings.public_url.clone(),
    );
    if settings.cluster_listen.is_some() {
        // In cluster mode nothing is written before the membership finds a quorum.
        view = View::new(me.clone(), view.members.clone(), false, 0);
    }
    let cluster = Cluster::new(me.clone(), metrics.clone(), view);

    let room = RoomConfig {
        replication_factor: settings.replication_factor,
        replay_cap: settings.replay_cap,
        idle: Duration::from_millis(settings.room_idle_ms),
        queue_timeout: Duration::from_millis(settings.request_timeout_ms * 4 / 5),
    };
    let root_args = RootArgs {
        cluster: cluster.clone(),
        store: store.clone(),
        writer: writer.clone(),
        room,
        request_timeout: Duration::from_millis(settings.request_timeout_ms),
    };
    let (root, root_done) = Actor::spawn(None, Root, root_args)
        .await
        .context("starting the node's actors")?;

    let cluster_node = match (&settings.cluster_listen, &settings.cookie) {
        (Some(listen), Some(cookie)) => {
            let config = ClusterConfig {
                listen: listen.clone(),
                advertise: settings
                    .advertised_cluster_addr()
                    .unwrap_or_else(|| listen.clone()),
                seeds: settings.seeds.clone(),
                cookie: cookie.clone(),
                public_url: settings.public_url.clone(),
                detector: DetectorConfig {
                    interval: Duration::from_millis(settings.heartbeat_interval_ms),
                    failure_timeout: Duration::from_millis(settings.failure_timeout_ms),
                    bootstrap_expect: settings.bootstrap_expect,
                },
            };
            let node = cluster::start(&cluster, config, &store, &writer).await?;
            tracing::info!(cluster = %node.addr, seeds = ?settings.seeds, "cluster mode");
            Some(node)
        }
        _ => None,
    };
    drop(writer);

    let (serving, serving_rx) = watch::channel(false);
    let (stop, stop_rx) = watch::channel(false);
    let gateway_config = GatewayConfig {
        max_connections: settings.max_connections,
        max_frame_bytes: settings.max_frame_bytes,
        client_queue: settings.client_queue,
        limits: Limits {
            max_text_bytes: settings.max_text_bytes,
            rate_limit: settings.rate_limit,
        },
        verifier: settings.auth_secret.as_deref().map(Verifier::new),
        replication_factor: settings.replication_factor,
    };
    let gateway = Gateway::new(gateway_config, cluster.clone(), serving_rx);
    tokio::spawn(gateway::http::serve(listener, gateway, stop_rx));
    serving.send_replace(true);
    tracing::info!(node = %me, http = %http_addr, data_dir = %settings.data_dir.display(), "node serving");

    Ok(NodeHandle {
        http_addr,
        cluster,
        serving,
        stop,
        root,
        root_done: Some(root_done),
        cluster_node,
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
        self.cluster_node.as_ref().map(|c| c.addr)
    }

    /// The node's cluster handle.
    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    /// Makes the actor of `room` panic, if this node runs it (tests of the restart policy).
    pub fn crash_room(&self, room: &RoomId) {
        if let Some(host) = self.cluster.host() {
            let _ = host.cast(HostMessage::Crash(room.clone()));
        }
    }

    /// Makes the hub fail (tests of the restart policy).
    pub fn crash_hub(&self) {
        let _ = self.root.cast(RootMessage::CrashHub);
    }

    /// Waits until the node's actors stop by themselves (repeated failures).
    pub async fn stopped(&mut self) {
        let Some(done) = self.root_done.as_mut() else {
            return;
        };
        match self.cluster_node.as_mut() {
            Some(cluster) => {
                tokio::select! {
                    _ = done => {}
                    () = cluster.stopped() => {}
                }
            }
            None => {
                let _ = done.await;
            }
        }
        self.root_done = None;
    }

    /// Stops gracefully: refuses new connections, closes clients with 1001 (after what was
    /// queued for them), stops the actors and flushes the store.
    pub async fn shutdown(mut self) {
        tracing::info!("shutting down");
        self.serving.send_replace(false);
        self.stop.send_replace(true);
        if let Some(cluster) = &self.cluster_node {
            // Peers drop this node at once and take its rooms over, instead of waiting for
            // the failure timeout.
            cluster.leave().await;
        }
        if let Some(hub) = self.cluster.hub() {
            let _ = hub.cast(HubMessage::CloseAll(Closing::Shutdown));
        }
        let deadline = Instant::now() + self.grace;
        while self.cluster.metrics().connections.get() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = self
            .root
            .stop_and_wait(Some("shutdown".into()), Some(self.grace))
            .await;
        if let Some(done) = self.root_done.take() {
            let _ = tokio::time::timeout(self.grace, done).await;
        }
        if let Some(cluster) = self.cluster_node.take() {
            cluster.stop().await;
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
