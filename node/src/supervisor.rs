//! The Root actor: supervisor of the node's long-lived actors, and their restart policy.
//!
//! ```text
//!  Root
//!   ├── LogKeeper                 this node's copies of room logs
//!   ├── Directory                 where the users homed here are connected
//!   ├── RoomHost ── Room*         rooms this node owns (policy in rooms::host)
//!   ├── Hub                       this node's connections: requests, replies, fan-out
//!   ├── Sessions ── Session*      one per WebSocket (policy in gateway::sessions)
//!   └── Cluster ── NodeServer, Router, Links, Membership   (cluster mode; policy in cluster)
//! ```
//!
//! Policy, decided here only:
//! - any child that stops or fails is started again, with the same arguments; a child that
//!   fails to start (a port its old instance still held, say) is tried again after
//!   [`RETRY_START_AFTER`];
//! - when the Hub fails, every connection is closed first (1011): the hub held their outboxes
//!   and subscriptions, so they could not be served; clients reconnect and resume with `since`;
//! - the state of the others is rebuilt on start: the LogKeeper reads the store, the RoomHost
//!   rescans placements and rooms claim again, the Directory asks hubs to announce their users;
//! - more than [`MAX_RESTARTS`] restarts within [`RESTART_WINDOW`] stop the node (a node that
//!   keeps failing is better dead, so that the cluster routes around it).

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use chat_protocol::RoomId;
use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use ractor_cluster::RactorMessage;

use crate::actors::Slot;
use crate::cluster::{Cluster, ClusterArgs, ClusterMessage, Views};
use crate::directory::Directory;
use crate::gateway::outbox::Closing;
use crate::gateway::sessions::{Sessions, SessionsMessage};
use crate::hub::{Hub, HubArgs, HubMessage};
use crate::metrics::Metrics;
use crate::net::Net;
use crate::rooms::core::RoomConfig;
use crate::rooms::host::{HostArgs, HostMessage, RoomHost};
use crate::rooms::keeper::{KeeperArgs, LogKeeper};
use crate::store::{Store, Writer};

/// Restarts of the node's actors allowed within [`RESTART_WINDOW`].
pub const MAX_RESTARTS: usize = 10;
/// The window over which restarts are counted.
pub const RESTART_WINDOW: Duration = Duration::from_secs(60);
/// How long before a child that failed to start is tried again.
pub const RETRY_START_AFTER: Duration = Duration::from_millis(500);

/// The root supervisor.
#[derive(Debug)]
pub struct Root;

/// What the root needs to start its children.
#[derive(Debug, Clone)]
pub struct RootArgs {
    /// The node-to-node layer.
    pub net: Net,
    /// The cluster view.
    pub views: Views,
    /// Cluster mode, if configured.
    pub cluster: Option<ClusterArgs>,
    /// The store.
    pub store: Store,
    /// The store writer.
    pub writer: Writer,
    /// Room settings.
    pub room: RoomConfig,
    /// How long a request may wait for its reply.
    pub request_timeout: Duration,
    /// Rooms one connection may have joined at once.
    pub max_rooms_per_connection: usize,
    /// `direct` messages per second one user receives; 0 = unlimited.
    pub direct_rate: u32,
    /// Where the current hub is published (for the gateway).
    pub hub: Slot<HubMessage>,
    /// Where the current supervisor of sessions is published (for the gateway).
    pub sessions: Slot<SessionsMessage>,
}

/// The children of the root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Child {
    /// The log keeper.
    Keeper,
    /// The directory.
    Directory,
    /// The room host (and its rooms).
    Host,
    /// The hub.
    Hub,
    /// The supervisor of sessions.
    Sessions,
    /// The supervisor of the cluster-mode actors.
    Cluster,
}

impl Child {
    fn label(self) -> &'static str {
        match self {
            Child::Keeper => "keeper",
            Child::Directory => "directory",
            Child::Host => "host",
            Child::Hub => "hub",
            Child::Sessions => "sessions",
            Child::Cluster => "cluster",
        }
    }
}

/// The root's state.
pub struct RootState {
    args: RootArgs,
    children: HashMap<ActorId, Child>,
    restarts: VecDeque<Instant>,
    host: Option<ActorRef<HostMessage>>,
    cluster: Option<ActorRef<ClusterMessage>>,
}

/// Messages of the root.
#[derive(Debug, RactorMessage)]
pub enum RootMessage {
    /// Makes a child fail (tests of the restart policy): the hub.
    CrashHub,
    /// Makes the actor of a room fail, if this node runs it (tests of the restart policy).
    CrashRoom(RoomId),
    /// Makes the cluster supervisor fail (tests of the restart policy).
    CrashCluster,
    /// Closes every client connection (the node is stopping).
    CloseAll(Closing),
    /// Tells the cluster this node is leaving (graceful stop), then answers.
    Leave(RpcReplyPort<()>),
    /// Starts a child again whose previous start failed.
    Retry(Child),
}

impl Actor for Root {
    type Msg = RootMessage;
    type State = RootState;
    type Arguments = RootArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<RootMessage>,
        args: RootArgs,
    ) -> Result<RootState, ActorProcessingErr> {
        let cluster_mode = args.cluster.is_some();
        let mut state = RootState {
            args,
            children: HashMap::new(),
            restarts: VecDeque::new(),
            host: None,
            cluster: None,
        };
        for child in [
            Child::Keeper,
            Child::Directory,
            Child::Host,
            Child::Hub,
            Child::Sessions,
        ] {
            state.start(&myself, child).await?;
        }
        if cluster_mode {
            state.start(&myself, Child::Cluster).await?;
        }
        Ok(state)
    }

    async fn handle(
        &self,
        myself: ActorRef<RootMessage>,
        message: RootMessage,
        state: &mut RootState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            RootMessage::Retry(child) => state.restart(&myself, child).await?,
            RootMessage::CrashHub => {
                if let Some(hub) = state.args.hub.get() {
                    hub.kill();
                }
            }
            RootMessage::CrashRoom(room) => {
                if let Some(host) = &state.host {
                    let _ = host.cast(HostMessage::Crash(room));
                }
            }
            RootMessage::CrashCluster => {
                if let Some(cluster) = &state.cluster {
                    cluster.kill();
                }
            }
            RootMessage::CloseAll(why) => {
                if let Some(hub) = state.args.hub.get() {
                    let _ = hub.cast(HubMessage::CloseAll(why));
                }
            }
            RootMessage::Leave(reply) => {
                if let Some(cluster) = &state.cluster {
                    let _ = cluster
                        .call(ClusterMessage::Leave, Some(Duration::from_secs(1)))
                        .await;
                }
                let _ = reply.send(());
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<RootMessage>,
        event: SupervisionEvent,
        state: &mut RootState,
    ) -> Result<(), ActorProcessingErr> {
        let (cell, failure) = match event {
            SupervisionEvent::ActorFailed(cell, error) => (cell, Some(error.to_string())),
            SupervisionEvent::ActorTerminated(cell, _, reason) => (cell, reason),
            _ => return Ok(()),
        };
        let Some(child) = state.children.remove(&cell.get_id()) else {
            return Ok(());
        };
        tracing::error!(?child, reason = ?failure, "node actor stopped; restarting");
        if child == Child::Hub
            && let Some(sessions) = state.args.sessions.get()
        {
            // Their outboxes and rooms died with the hub: close them so clients resume.
            sessions.stop_children(Some("hub restarted".into()));
        }
        state.restart(&myself, child).await
    }
}

impl RootState {
    /// Starts `child` again, within the restart budget; a failed start is retried later.
    async fn restart(
        &mut self,
        myself: &ActorRef<RootMessage>,
        child: Child,
    ) -> Result<(), ActorProcessingErr> {
        Metrics::count(&self.args.net.metrics().actor_restarts, child.label());
        let now = Instant::now();
        self.restarts.push_back(now);
        while self
            .restarts
            .front()
            .is_some_and(|t| now.duration_since(*t) > RESTART_WINDOW)
        {
            self.restarts.pop_front();
        }
        if self.restarts.len() > MAX_RESTARTS {
            return Err(
                format!("{MAX_RESTARTS} restarts within {RESTART_WINDOW:?}; giving up").into(),
            );
        }
        if let Err(e) = self.start(myself, child).await {
            tracing::error!(?child, error = %e, "node actor failed to start; trying again");
            myself.send_after(RETRY_START_AFTER, move || RootMessage::Retry(child));
        }
        Ok(())
    }

    async fn start(
        &mut self,
        myself: &ActorRef<RootMessage>,
        child: Child,
    ) -> Result<(), ActorProcessingErr> {
        let a = &self.args;
        let cell = myself.get_cell();
        let id = match child {
            Child::Keeper => {
                let args = KeeperArgs {
                    net: a.net.clone(),
                    store: a.store.clone(),
                    writer: a.writer.clone(),
                };
                Actor::spawn_linked(None, LogKeeper, args, cell)
                    .await?
                    .0
                    .get_id()
            }
            Child::Directory => {
                let args = (a.net.clone(), a.views.clone(), a.direct_rate);
                Actor::spawn_linked(None, Directory, args, cell)
                    .await?
                    .0
                    .get_id()
            }
            Child::Host => {
                let args = HostArgs {
                    net: a.net.clone(),
                    views: a.views.clone(),
                    store: a.store.clone(),
                    config: a.room.clone(),
                };
                let (host, _) = Actor::spawn_linked(None, RoomHost, args, cell).await?;
                self.host = Some(host.clone());
                host.get_id()
            }
            Child::Hub => {
                let args = HubArgs {
                    net: a.net.clone(),
                    views: a.views.clone(),
                    request_timeout: a.request_timeout,
                    max_rooms_per_connection: a.max_rooms_per_connection,
                };
                let (hub, _) = Actor::spawn_linked(None, Hub, args, cell).await?;
                a.hub.set(hub.clone());
                hub.get_id()
            }
            Child::Sessions => {
                let (actor, _) =
                    Actor::spawn_linked(None, Sessions, a.net.metrics().clone(), cell).await?;
                a.sessions.set(actor.clone());
                actor.get_id()
            }
            Child::Cluster => {
                let Some(args) = a.cluster.clone() else {
                    return Ok(());
                };
                let (cluster, _) = Actor::spawn_linked(None, Cluster, args, cell).await?;
                self.cluster = Some(cluster.clone());
                cluster.get_id()
            }
        };
        self.children.insert(id, child);
        Ok(())
    }
}
