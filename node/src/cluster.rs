//! Cluster mode: membership, failure detection and placement, above the node-to-node layer.
//!
//! - [`detector`]: the pure failure detector and write lease over heartbeats.
//! - [`membership`]: the Membership actor: heartbeats over UDP, and the [`View`] it publishes.
//! - [`view`]: the current membership and the placement of rooms and users on it.
//! - [`ring`]: the pure consistent-hash ring.
//! - [`Cluster`]: the supervisor of the cluster-mode actors.
//!
//! ```text
//!  Cluster (supervisor; any child stopping fails it, and Root restarts the whole subtree)
//!   ├── NodeServer (ractor_cluster)   TCP sessions to peers, cookie challenge, process groups
//!   ├── Router (net::router)          the one actor peers can message
//!   ├── Links (net::links)            dials the members the membership wants, drops dead ones
//!   └── Membership                    UDP heartbeats → the view (who is up, quorum) → watchers
//! ```
//!
//! The view reaches the rest of the node through a watch channel ([`Views`]): membership
//! publishes, the actors that place rooms and users follow it.

pub mod detector;
pub mod membership;
pub mod ring;
pub mod view;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use chat_protocol::peer::MemberInfo;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use ractor_cluster::RactorMessage;
use tokio::net::UdpSocket;
use tokio::sync::watch;

use crate::clock::now_ms;
use crate::net::Net;
use crate::net::datagram;
use crate::net::links::{Links, LinksArgs};
use crate::net::router::Router;
use crate::store::{Store, Writer};
use membership::{Membership, MembershipArgs, MembershipMessage};
use view::View;

/// The receiving end of the views the membership publishes.
pub type Views = watch::Receiver<Arc<View>>;

/// What cluster mode needs from the settings.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
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

/// Binds the node-to-node port's UDP side (the TCP side is the node server's): done once, before
/// the actors start, so that a taken port fails the start with a clear error.
pub async fn bind(listen: &str) -> anyhow::Result<Arc<UdpSocket>> {
    let addr = tokio::net::lookup_host(listen)
        .await
        .with_context(|| format!("resolving `cluster-listen` {listen}"))?
        .next()
        .with_context(|| format!("`cluster-listen` {listen} resolves to nothing"))?;
    let socket = UdpSocket::bind(addr)
        .await
        .with_context(|| format!("binding the heartbeat port udp/{addr}"))?;
    Ok(Arc::new(socket))
}

/// The supervisor of the cluster-mode actors.
#[derive(Debug)]
pub struct Cluster;

/// What the cluster-mode actors need.
#[derive(Debug, Clone)]
pub struct ClusterArgs {
    /// The node-to-node layer.
    pub net: Net,
    /// Where the membership publishes the view.
    pub views: watch::Sender<Arc<View>>,
    /// Settings.
    pub config: ClusterConfig,
    /// The bound node-to-node port (UDP side).
    pub socket: Arc<UdpSocket>,
    /// For the known members and the incarnation.
    pub store: Store,
    /// For persisting the known members.
    pub writer: Writer,
}

/// Messages of the cluster supervisor.
#[derive(Debug, RactorMessage)]
pub enum ClusterMessage {
    /// The node is shutting down: tell every member, then answer.
    Leave(RpcReplyPort<()>),
}

/// The cluster supervisor's state.
pub struct ClusterState {
    membership: ActorRef<MembershipMessage>,
}

impl Actor for Cluster {
    type Msg = ClusterMessage;
    type State = ClusterState;
    type Arguments = ClusterArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<ClusterMessage>,
        args: ClusterArgs,
    ) -> Result<ClusterState, ActorProcessingErr> {
        let addr: SocketAddr = args.socket.local_addr()?;
        let me = args.net.me().clone();
        let host = args
            .config
            .advertise
            .rsplit_once(':')
            .map_or(args.config.advertise.as_str(), |(h, _)| h)
            .to_owned();
        let cell = myself.get_cell();
        let server = ractor_cluster::NodeServer::new(
            addr.port(),
            args.config.cookie.clone(),
            me.to_string(),
            host,
            None,
            Some(ractor_cluster::node::NodeConnectionMode::Isolated),
        )
        .with_listen_addr(addr.ip())
        .with_max_inbound_frame_size(ractor_cluster::DEFAULT_MAX_INBOUND_FRAME_SIZE);
        let (server, _) = Actor::spawn_linked(None, server, (), cell.clone()).await?;
        Actor::spawn_linked(None, Router, args.net.clone(), cell.clone()).await?;
        let links_args = LinksArgs {
            net: args.net.clone(),
            server,
        };
        let (links, _) = Actor::spawn_linked(None, Links, links_args, cell.clone()).await?;
        // Milliseconds since the Unix epoch as a floor: a node restarted with an empty data
        // directory must not reuse an incarnation its peers saw (they would ignore it as stale).
        let incarnation = args.store.next_incarnation(now_ms())?;
        let membership_args = MembershipArgs {
            net: args.net.clone(),
            views: args.views.clone(),
            me: MemberInfo {
                name: me,
                incarnation,
                addr: args.config.advertise.clone(),
                public_url: args.config.public_url.clone(),
            },
            socket: args.socket.clone(),
            key: datagram::key(&args.config.cookie),
            seeds: args.config.seeds.clone(),
            config: args.config.detector,
            store: args.store.clone(),
            writer: args.writer.clone(),
            links,
        };
        let (membership, _) = Actor::spawn_linked(None, Membership, membership_args, cell).await?;
        tracing::info!(cluster = %addr, seeds = ?args.config.seeds, "cluster mode");
        Ok(ClusterState { membership })
    }

    async fn handle(
        &self,
        _myself: ActorRef<ClusterMessage>,
        message: ClusterMessage,
        state: &mut ClusterState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            ClusterMessage::Leave(reply) => {
                let _ = state
                    .membership
                    .call(MembershipMessage::Leave, Some(Duration::from_secs(1)))
                    .await;
                let _ = reply.send(());
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        _myself: ActorRef<ClusterMessage>,
        event: SupervisionEvent,
        _state: &mut ClusterState,
    ) -> Result<(), ActorProcessingErr> {
        // The four depend on each other (sessions, their routers, the links recorded in Net, the
        // view built from both): one stopping restarts them all, under Root's restart budget.
        match event {
            SupervisionEvent::ActorFailed(cell, error) => {
                Err(format!("cluster actor {} failed: {error}", cell.get_id()).into())
            }
            SupervisionEvent::ActorTerminated(cell, _, reason) => Err(format!(
                "cluster actor {} stopped: {}",
                cell.get_id(),
                reason.unwrap_or_default()
            )
            .into()),
            _ => Ok(()),
        }
    }
}
