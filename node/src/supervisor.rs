//! The Root actor: supervisor of the node's long-lived actors, and their restart policy.
//!
//! ```text
//!  Root
//!   ├── LogKeeper                 this node's copies of room logs
//!   ├── Directory                 where the users homed here are connected
//!   ├── RoomHost ── Room*         rooms this node owns (policy in rooms::host)
//!   ├── Hub                       this node's connections: requests, replies, fan-out
//!   └── Sessions ── Session*      one per WebSocket (policy in gateway::sessions)
//! ```
//!
//! Policy, decided here only:
//! - any child that stops or fails is started again, with the same arguments;
//! - when the Hub fails, every connection is closed first (1011): the hub held their outboxes
//!   and subscriptions, so they could not be served; clients reconnect and resume with `since`;
//! - the state of the others is rebuilt on start: the LogKeeper reads the store, the RoomHost
//!   rescans placements and rooms claim again, the Directory asks hubs to announce their users;
//! - more than [`MAX_RESTARTS`] restarts within [`RESTART_WINDOW`] stop the node (a node that
//!   keeps failing is better dead, so that the cluster routes around it).

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, SupervisionEvent};
use ractor_cluster::RactorMessage;

use crate::cluster::Cluster;
use crate::directory::Directory;
use crate::gateway::sessions::Sessions;
use crate::hub::{Hub, HubArgs};
use crate::rooms::host::{HostArgs, RoomHost};
use crate::rooms::keeper::{KeeperArgs, LogKeeper};
use crate::rooms::room::RoomConfig;
use crate::store::{Store, Writer};

/// Restarts of the node's actors allowed within [`RESTART_WINDOW`].
pub const MAX_RESTARTS: usize = 10;
/// The window over which restarts are counted.
pub const RESTART_WINDOW: Duration = Duration::from_secs(60);

/// The root supervisor.
#[derive(Debug)]
pub struct Root;

/// What the root needs to start its children.
#[derive(Debug, Clone)]
pub struct RootArgs {
    /// Messaging and view.
    pub cluster: Cluster,
    /// The store.
    pub store: Store,
    /// The store writer.
    pub writer: Writer,
    /// Room settings.
    pub room: RoomConfig,
    /// How long a request may wait for its reply.
    pub request_timeout: Duration,
}

/// The children of the root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Child {
    Keeper,
    Directory,
    Host,
    Hub,
    Sessions,
}

/// The root's state.
pub struct RootState {
    args: RootArgs,
    children: HashMap<ActorId, Child>,
    restarts: VecDeque<Instant>,
}

/// Messages of the root.
#[derive(Debug, RactorMessage)]
pub enum RootMessage {
    /// Makes a child fail (tests of the restart policy): the hub.
    CrashHub,
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
        let mut state = RootState {
            args,
            children: HashMap::new(),
            restarts: VecDeque::new(),
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
        Ok(state)
    }

    async fn handle(
        &self,
        _myself: ActorRef<RootMessage>,
        message: RootMessage,
        state: &mut RootState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            RootMessage::CrashHub => {
                if let Some(hub) = state.args.cluster.hub() {
                    hub.kill();
                }
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
        let now = Instant::now();
        state.restarts.push_back(now);
        while state
            .restarts
            .front()
            .is_some_and(|t| now.duration_since(*t) > RESTART_WINDOW)
        {
            state.restarts.pop_front();
        }
        if state.restarts.len() > MAX_RESTARTS {
            return Err(
                format!("{MAX_RESTARTS} restarts within {RESTART_WINDOW:?}; giving up").into(),
            );
        }
        if child == Child::Hub
            && let Some(sessions) = state.args.cluster.sessions()
        {
            // Their outboxes and rooms died with the hub: close them so clients resume.
            sessions.stop_children(Some("hub restarted".into()));
        }
        state.start(&myself, child).await
    }
}

impl RootState {
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
                    cluster: a.cluster.clone(),
                    store: a.store.clone(),
                    writer: a.writer.clone(),
                };
                Actor::spawn_linked(None, LogKeeper, args, cell)
                    .await?
                    .0
                    .get_id()
            }
            Child::Directory => Actor::spawn_linked(None, Directory, a.cluster.clone(), cell)
                .await?
                .0
                .get_id(),
            Child::Host => {
                let args = HostArgs {
                    cluster: a.cluster.clone(),
                    store: a.store.clone(),
                    config: a.room.clone(),
                };
                Actor::spawn_linked(None, RoomHost, args, cell)
                    .await?
                    .0
                    .get_id()
            }
            Child::Hub => {
                let args = HubArgs {
                    cluster: a.cluster.clone(),
                    request_timeout: a.request_timeout,
                };
                Actor::spawn_linked(None, Hub, args, cell).await?.0.get_id()
            }
            Child::Sessions => {
                let (actor, _) =
                    Actor::spawn_linked(None, Sessions, a.cluster.metrics().clone(), cell).await?;
                a.cluster.set_sessions(actor.get_cell());
                actor.get_id()
            }
        };
        self.children.insert(id, child);
        Ok(())
    }
}
