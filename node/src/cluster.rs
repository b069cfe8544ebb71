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
//!   ├── NodeServer (ractor_cluster)   sessions to peers, cookie challenge, process groups
//!   ├── Router (net::router)          the one actor peers can message
//!   ├── Links (net::links)            accepts on the cluster port and dials the members the
//!   │                                 membership wants (through net::transport), drops dead ones
//!   └── Membership                    UDP heartbeats → the view (who is up, quorum) → watchers
//! ```
//!
//! The view reaches the rest of the node through a watch channel ([`Views`]): membership
//! publishes, the actors that place rooms and users follow it.

pub mod detector;
pub mod membership;
pub mod ring;
pub mod view;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use chat_protocol::peer::MemberInfo;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use ractor_cluster::RactorMessage;
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::watch;

use crate::clock::now_ms;
use crate::net::Net;
use crate::net::datagram::{self, Sealer};
use crate::net::links::{Links, LinksArgs};
use crate::net::router::Router;
use crate::net::transport::{Tls, Transport};
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
    /// Node-to-node TLS, when configured.
    pub tls: Option<Tls>,
    /// Heartbeat timing and bootstrap.
    pub detector: detector::DetectorConfig,
}

/// The bound node-to-node port: TCP for sessions, UDP for heartbeats, one port number.
#[derive(Debug, Clone)]
pub struct Port {
    /// Node-to-node sessions.
    pub tcp: Arc<TcpListener>,
    /// Heartbeats.
    pub udp: Arc<UdpSocket>,
}

impl Port {
    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.udp.local_addr()
    }
}

/// Binds the node-to-node port, both sides: done once, before the actors start, so that a taken
/// port fails the start with a clear error.
pub async fn bind(listen: &str) -> anyhow::Result<Port> {
    let addr = tokio::net::lookup_host(listen)
        .await
        .with_context(|| format!("resolving `cluster-listen` {listen}"))?
        .next()
        .with_context(|| format!("`cluster-listen` {listen} resolves to nothing"))?;
    // Port 0 picks the TCP port first; the UDP side takes the same number (retried if taken).
    for attempt in 1.. {
        let tcp = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the node-to-node port tcp/{addr}"))?;
        let bound = tcp.local_addr()?;
        match UdpSocket::bind(bound).await {
            Ok(udp) => {
                return Ok(Port {
                    tcp: Arc::new(tcp),
                    udp: Arc::new(udp),
                });
            }
            Err(_) if addr.port() == 0 && attempt < 10 => continue,
            Err(e) => {
                return Err(e).with_context(|| format!("binding the heartbeat port udp/{bound}"));
            }
        }
    }
    unreachable!("the loop returns")
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
    /// The bound node-to-node port.
    pub port: Port,
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
        let addr: SocketAddr = args.port.local_addr()?;
        let me = args.net.me().clone();
        let host = args
            .config
            .advertise
            .rsplit_once(':')
            .map_or(args.config.advertise.as_str(), |(h, _)| h)
            .to_owned();
        let cell = myself.get_cell();
        let transport = Transport::new(args.config.tls.clone(), args.net.metrics().clone());
        // The node server's own listener cannot be turned off: it gets an ephemeral loopback
        // port that nothing dials (the cluster port is the transport's).
        let server = ractor_cluster::NodeServer::new(
            0,
            args.config.cookie.clone(),
            me.to_string(),
            host,
            Some(transport.incoming_mode()),
            Some(ractor_cluster::node::NodeConnectionMode::Isolated),
        )
        .with_listen_addr(Ipv4Addr::LOCALHOST.into())
        .with_max_inbound_frame_size(ractor_cluster::DEFAULT_MAX_INBOUND_FRAME_SIZE);
        let (server, _) = Actor::spawn_linked(None, server, (), cell.clone()).await?;
        Actor::spawn_linked(None, Router, args.net.clone(), cell.clone()).await?;
        let links_args = LinksArgs {
            net: args.net.clone(),
            server,
            transport,
            listener: args.port.tcp.clone(),
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
            socket: args.port.udp.clone(),
            sealer: Arc::new(Sealer::new(datagram::key(
                &args.config.cookie,
                args.config.tls.as_ref().map(Tls::ca),
            ))),
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
