//! The RoomHost actor: supervisor of this node's Room actors and router of room traffic.
//!
//! A request for a room goes to the room's owner under the sender's view. Here, the host
//! checks its own view: if this node owns the room it hands the request to the Room actor
//! (creating it on first use); if another node does, it forwards the request once (the sender's
//! view was stale); a request that was already forwarded gets `unavailable` rather than
//! bouncing between nodes whose views disagree.
//!
//! On every view change the host also scans the logs this node holds: rooms whose placement no
//! longer matches the ring are taken over (when this node is the new owner) or pointed out to
//! their new owner with `Activate`, so that logs are re-replicated after a node is lost and
//! handed over when a node joins, even for rooms nobody is using.
//!
//! Restart policy (the one place it is decided for rooms): a Room actor that fails is restarted
//! at once if this node still owns the room, at most [`MAX_RESTARTS`] times per
//! [`RESTART_WINDOW`]; after that it is started again only by the next request. A restarted room
//! claims again, recovers its log from the store, and announces itself so that nodes with
//! members subscribe again: no message is lost, only the requests in flight get `unavailable`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chat_protocol::peer::{LogState, Origin, Reply, ToHub, ToRoom, ToRooms};
use chat_protocol::{ErrorCode, NodeName, RoomId};
use ractor::{Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, SupervisionEvent};
use ractor_cluster::RactorMessage;

use crate::actors::{Tasks, forward};
use crate::cluster::Views;
use crate::cluster::view::View;
use crate::net::Net;
use crate::rooms::core::RoomConfig;
use crate::rooms::room::{Room, RoomArgs, RoomMessage};
use crate::store::Store;

/// Restarts of one room allowed within [`RESTART_WINDOW`].
pub const MAX_RESTARTS: u32 = 3;
/// The window over which room restarts are counted.
pub const RESTART_WINDOW: Duration = Duration::from_secs(30);

/// The room host actor.
#[derive(Debug)]
pub struct RoomHost;

/// What the host needs.
#[derive(Debug)]
pub struct HostArgs {
    /// The node-to-node layer.
    pub net: Net,
    /// The cluster view.
    pub views: Views,
    /// The store, for rooms and the placement scan.
    pub store: Store,
    /// Room settings.
    pub config: RoomConfig,
}

/// The host's state.
pub struct HostState {
    args: HostArgs,
    _tasks: Tasks,
    view: Arc<View>,
    rooms: HashMap<RoomId, ActorRef<RoomMessage>>,
    ids: HashMap<ActorId, RoomId>,
    restarts: HashMap<RoomId, (u32, Instant)>,
    /// Requests this node forwarded (sender's view was stale), by origin: the node they went
    /// to, oldest first. The owner answers the origin directly; if the target goes down in this
    /// node's view first, the origin gets `unavailable` from here instead of waiting for its
    /// timeout.
    forwarded: VecDeque<(Origin, NodeName, Instant)>,
}

/// Messages of the room host.
#[derive(Debug, RactorMessage)]
pub enum HostMessage {
    /// Room traffic from a node (this one included).
    Peer(ToRooms),
    /// The view changed.
    ViewChanged(Arc<View>),
    /// The placement scan found rooms to take over here and rooms to point out elsewhere.
    Scanned {
        /// The view the scan was made for.
        version: u64,
        /// Rooms this node should take over.
        here: Vec<RoomId>,
        /// Rooms other nodes should take over.
        elsewhere: BTreeMap<NodeName, Vec<RoomId>>,
    },
    /// Makes the room's actor panic (tests of the restart policy).
    Crash(RoomId),
}

impl Actor for RoomHost {
    type Msg = HostMessage;
    type State = HostState;
    type Arguments = HostArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<HostMessage>,
        args: HostArgs,
    ) -> Result<HostState, ActorProcessingErr> {
        let host = myself.clone();
        args.net
            .serve_rooms(Box::new(move |m| host.cast(HostMessage::Peer(m)).is_ok()));
        let mut tasks = Tasks::default();
        tasks.add(forward(
            args.views.clone(),
            myself.clone(),
            HostMessage::ViewChanged,
        ));
        let view = args.views.borrow().clone();
        // Rooms whose placement changed while this node was down are taken over now.
        let _ = myself.cast(HostMessage::ViewChanged(view.clone()));
        Ok(HostState {
            args,
            _tasks: tasks,
            view,
            rooms: HashMap::new(),
            ids: HashMap::new(),
            restarts: HashMap::new(),
            forwarded: VecDeque::new(),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<HostMessage>,
        message: HostMessage,
        state: &mut HostState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            HostMessage::Peer(message) => state.route(&myself, message).await,
            HostMessage::ViewChanged(view) => {
                state.view = view.clone();
                state.fail_forwarded_to_gone();
                for room in state.rooms.values() {
                    let _ = room.cast(RoomMessage::ViewChanged(view.clone()));
                }
                state.scan(&myself);
            }
            HostMessage::Scanned {
                version,
                here,
                elsewhere,
            } => {
                if version != state.view.version {
                    return Ok(());
                }
                if !here.is_empty() || !elsewhere.is_empty() {
                    tracing::info!(
                        here = here.len(),
                        elsewhere = elsewhere.values().map(Vec::len).sum::<usize>(),
                        "rooms to move after a membership change"
                    );
                }
                for room in here {
                    state.room(&myself, &room).await;
                }
                for (node, rooms) in elsewhere {
                    for chunk in rooms.chunks(1024) {
                        let _ = state.args.net.to_rooms(
                            &node,
                            ToRooms::Activate {
                                rooms: chunk.to_vec(),
                            },
                        );
                    }
                }
            }
            HostMessage::Crash(room) => {
                if let Some(actor) = state.rooms.get(&room) {
                    let _ = actor.cast(RoomMessage::Crash);
                }
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<HostMessage>,
        event: SupervisionEvent,
        state: &mut HostState,
    ) -> Result<(), ActorProcessingErr> {
        match event {
            SupervisionEvent::ActorTerminated(cell, _, _) => {
                state.forget(&cell);
            }
            SupervisionEvent::ActorFailed(cell, error) => {
                let Some(room) = state.forget(&cell) else {
                    return Ok(());
                };
                tracing::error!(room = %room, error = %error, "room failed");
                if state.may_restart(&room) {
                    tracing::info!(room = %room, "restarting room");
                    state.room(&myself, &room).await;
                }
            }
            _ => {}
        }
        Ok(())
    }
}

impl HostState {
    fn me(&self) -> &NodeName {
        self.args.net.me()
    }

    fn owns(&self, room: &RoomId) -> bool {
        self.view.owner(room) == Some(self.me())
    }

    async fn route(&mut self, myself: &ActorRef<HostMessage>, message: ToRooms) {
        match message {
            ToRooms::Room { room, message } => self.route_room(myself, room, message).await,
            ToRooms::Activate { rooms } => {
                for room in rooms {
                    if self.owns(&room) {
                        self.room(myself, &room).await;
                    }
                }
            }
            ToRooms::SessionsReset { node } => {
                for room in self.rooms.values() {
                    let _ = room.cast(RoomMessage::NodeReset(node.clone()));
                }
            }
        }
    }

    async fn route_room(&mut self, myself: &ActorRef<HostMessage>, room: RoomId, message: ToRoom) {
        let received = Instant::now();
        match route(&self.view, self.me(), &room, message) {
            Route::Room { message, start } => {
                let actor = match start {
                    true => self.room(myself, &room).await,
                    false => self.rooms.get(&room).cloned(),
                };
                match (actor, message) {
                    (Some(actor), message) => {
                        let _ = actor.cast(RoomMessage::Peer(message, received));
                    }
                    (None, ToRoom::Request { origin, .. }) => {
                        self.fail(&origin, "the room could not be started");
                    }
                    (None, _) => {}
                }
            }
            Route::Forward { to, message } => {
                let ToRoom::Request { origin, .. } = &message else {
                    return;
                };
                let origin = origin.clone();
                if self.args.net.to_room(&to, room, message).is_err() {
                    self.fail(&origin, "the room's node is unreachable");
                } else if origin.req != 0 {
                    self.remember_forwarded(origin, to);
                }
            }
            Route::Fail { origin, why } => self.fail(&origin, why),
            Route::Drop => {}
        }
    }

    fn remember_forwarded(&mut self, origin: Origin, target: NodeName) {
        let now = Instant::now();
        // Past twice the queue timeout the origin has given up on the request anyway.
        let keep = self.args.config.queue_timeout * 2;
        while self
            .forwarded
            .front()
            .is_some_and(|(_, _, at)| now.duration_since(*at) > keep)
        {
            self.forwarded.pop_front();
        }
        self.forwarded.push_back((origin, target, now));
    }

    fn fail_forwarded_to_gone(&mut self) {
        let view = self.view.clone();
        let (gone, kept): (VecDeque<_>, VecDeque<_>) = std::mem::take(&mut self.forwarded)
            .into_iter()
            .partition(|(_, target, _)| !view.is_up(target));
        self.forwarded = kept;
        for (origin, target, _) in gone {
            tracing::debug!(peer = %target, req = origin.req, "forwarded request lost with its target");
            self.fail(&origin, "the node serving this request went down; retry");
        }
    }

    /// The room's actor, started if needed.
    async fn room(
        &mut self,
        myself: &ActorRef<HostMessage>,
        room: &RoomId,
    ) -> Option<ActorRef<RoomMessage>> {
        if let Some(actor) = self.rooms.get(room) {
            return Some(actor.clone());
        }
        let args = RoomArgs {
            id: room.clone(),
            net: self.args.net.clone(),
            view: self.view.clone(),
            store: self.args.store.clone(),
            config: self.args.config.clone(),
        };
        match Actor::spawn_linked(None, Room, args, myself.get_cell()).await {
            Ok((actor, _)) => {
                self.ids.insert(actor.get_id(), room.clone());
                self.rooms.insert(room.clone(), actor.clone());
                Some(actor)
            }
            Err(e) => {
                tracing::error!(room = %room, error = %e, "room failed to start");
                None
            }
        }
    }

    fn forget(&mut self, cell: &ActorCell) -> Option<RoomId> {
        let room = self.ids.remove(&cell.get_id())?;
        if self
            .rooms
            .get(&room)
            .is_some_and(|a| a.get_id() == cell.get_id())
        {
            self.rooms.remove(&room);
        }
        Some(room)
    }

    fn may_restart(&mut self, room: &RoomId) -> bool {
        if !self.owns(room) {
            return false;
        }
        let now = Instant::now();
        let (count, since) = self.restarts.entry(room.clone()).or_insert((0, now));
        if now.duration_since(*since) > RESTART_WINDOW {
            *count = 0;
            *since = now;
        }
        *count += 1;
        *count <= MAX_RESTARTS
    }

    fn fail(&self, origin: &Origin, message: &str) {
        if origin.req == 0 {
            return;
        }
        let _ = self.args.net.to_hub(
            &origin.node,
            ToHub::Reply {
                req: origin.req,
                reply: Reply::Failed {
                    code: ErrorCode::Unavailable,
                    message: message.to_owned(),
                },
            },
        );
    }

    /// Scans the stored logs (off the actor's thread) for rooms whose placement changed.
    fn scan(&self, myself: &ActorRef<HostMessage>) {
        if !self.view.quorum {
            return;
        }
        let store = self.args.store.clone();
        let view = self.view.clone();
        let me = self.me().clone();
        let rf = self.args.config.replication_factor;
        let host = myself.clone();
        tokio::task::spawn_blocking(move || {
            let rooms = match store.rooms() {
                Ok(rooms) => rooms,
                Err(e) => {
                    tracing::error!(error = %e, "placement scan failed");
                    return;
                }
            };
            let (here, elsewhere) = moves(rooms, &view, rf, &me);
            let _ = host.cast(HostMessage::Scanned {
                version: view.version,
                here,
                elsewhere,
            });
        });
    }
}

/// Where a message for a room goes on this node.
#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    /// To the room's actor here: started first if `start` (and not running), else only if it
    /// runs.
    Room {
        /// The message.
        message: ToRoom,
        /// Whether to start the room for it.
        start: bool,
    },
    /// To the owner in this node's view (the sender's view was stale): forwarded once.
    Forward {
        /// The owner.
        to: NodeName,
        /// The request, marked as forwarded.
        message: ToRoom,
    },
    /// Answered `unavailable` (views disagree: the request was forwarded once already).
    Fail {
        /// The requester.
        origin: Origin,
        /// Why.
        why: &'static str,
    },
    /// Nothing to do (a subscription for a room that lives elsewhere now).
    Drop,
}

/// Decides where a message for `room` goes on node `me` under `view`.
pub fn route(view: &View, me: &NodeName, room: &RoomId, message: ToRoom) -> Route {
    let owns = view.owner(room) == Some(me);
    match message {
        ToRoom::Request { .. } | ToRoom::Subscribe { .. } if owns => Route::Room {
            message,
            start: true,
        },
        ToRoom::Request { origin, op, hops } => match view.owner(room) {
            Some(owner) if hops == 0 => Route::Forward {
                to: owner.clone(),
                message: ToRoom::Request {
                    origin,
                    op,
                    hops: 1,
                },
            },
            _ => Route::Fail {
                origin,
                why: "the room is moving between nodes",
            },
        },
        ToRoom::Subscribe { .. } => Route::Drop,
        // Answers to a room's own requests: only for a room that runs here.
        ToRoom::Promised { .. }
        | ToRoom::PromisedTrimmed { .. }
        | ToRoom::Appended { .. }
        | ToRoom::Fetched { .. } => Route::Room {
            message,
            start: false,
        },
    }
}

/// Among the rooms this node holds a copy of, those whose placement under `view` differs from
/// the one their copy was last written with: to take over here (this node owns them now), or to
/// point out to their new owner, so that logs are re-replicated after a node is lost and handed
/// over when one joins, even for rooms nobody is using.
pub fn moves(
    rooms: Vec<(RoomId, LogState)>,
    view: &View,
    replication_factor: usize,
    me: &NodeName,
) -> (Vec<RoomId>, BTreeMap<NodeName, Vec<RoomId>>) {
    let mut here = Vec::new();
    let mut elsewhere: BTreeMap<NodeName, Vec<RoomId>> = BTreeMap::new();
    for (room, state) in rooms {
        if state.last_seq == 0 {
            continue;
        }
        let wanted = view.room_placement(&room, replication_factor);
        let current = state.placement.as_ref().map(|p| p.nodes.as_slice());
        if current == Some(wanted.as_slice()) {
            continue;
        }
        match wanted.first() {
            Some(owner) if owner == me => here.push(room),
            Some(owner) => elsewhere.entry(owner.clone()).or_default().push(room),
            None => {}
        }
    }
    (here, elsewhere)
}
