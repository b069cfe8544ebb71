//! The Hub actor: where this node's connections meet the cluster.
//!
//! It keeps the node's sessions (their outboxes), the rooms they joined, and the requests they
//! are waiting on. Requests go to the owner of their room (or the home node of a user, for
//! `direct`) under the current view; replies come back here and are written to the requesting
//! connection with its `ref`. Requests not answered in time, or sent to a node that went down,
//! get `unavailable`.
//!
//! Fan-out: the owner of a room sends each message once to every node with members; the hub
//! renders the frame once and queues the same bytes to each of its sessions in the room. It
//! delivers a room's messages strictly in seq order: a cursor per room drops duplicates, and a
//! gap (a message lost with a broken link, or a room that moved) makes the hub subscribe again
//! with its cursor, upon which the owner re-sends what is missing. When a room's owner changes,
//! the hub subscribes to the new owner the same way, so connected clients keep a gap-free
//! stream across failovers.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chat_protocol::client::{ErrorFrame, MessageView, Ref, ServerFrame};
use chat_protocol::peer::{
    Entry, Origin, PeerMessage, Reply, RoomOp, SessionId, ToDirectory, ToHub, ToRoom, ToRooms,
};
use chat_protocol::{ErrorCode, NodeName, PresenceEvent, RoomId, UserName};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use ractor_cluster::RactorMessage;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::actors::{Tasks, forward};
use crate::cluster::Views;
use crate::cluster::view::View;
use crate::gateway::outbox::{Closing, Outbox};
use crate::net::Net;

/// How often pending requests are checked against their deadline.
const TICK: Duration = Duration::from_millis(250);

/// The Hub actor.
#[derive(Debug)]
pub struct Hub;

/// What the hub needs.
#[derive(Debug)]
pub struct HubArgs {
    /// The node-to-node layer.
    pub net: Net,
    /// The cluster view.
    pub views: Views,
    /// How long a request may wait for its reply.
    pub request_timeout: Duration,
}

/// A request from a connection, already validated by its session.
#[derive(Debug)]
pub enum HubRequest {
    /// A request for a room's owner.
    Room {
        /// The room.
        room: RoomId,
        /// What is asked.
        op: RoomOp,
    },
    /// A direct message.
    Direct {
        /// The sender.
        from: UserName,
        /// The addressee.
        to: UserName,
        /// The text.
        text: String,
    },
}

/// Messages of the hub.
#[derive(Debug, RactorMessage)]
pub enum HubMessage {
    /// A connection opened.
    Register {
        /// Its id.
        session: SessionId,
        /// Its user.
        user: UserName,
        /// Its outbox.
        outbox: Outbox,
    },
    /// A connection closed.
    Unregister {
        /// Its id.
        session: SessionId,
    },
    /// A connection's request.
    Request {
        /// The connection.
        session: SessionId,
        /// The request's `ref`.
        reference: Option<Ref>,
        /// What is asked.
        request: HubRequest,
        /// When the frame was read.
        received: Instant,
    },
    /// Replies and events from the cluster.
    Peer(ToHub),
    /// The view changed.
    ViewChanged(Arc<View>),
    /// Closes every connection (shutdown, or the hub's own restart).
    CloseAll(Closing),
    /// Expires pending requests.
    Tick,
}

struct LocalSession {
    user: UserName,
    outbox: Outbox,
    rooms: HashSet<RoomId>,
}

/// A room as seen by this node's sessions.
#[derive(Default)]
struct LocalRoom {
    /// The node the sessions' joins and subscriptions went to.
    owner: Option<NodeName>,
    /// The last seq delivered (None before the first join reply).
    cursor: Option<u64>,
    /// A subscription with the cursor is on its way: drop everything but `cursor + 1`.
    resyncing: bool,
    /// Joined sessions and the seq after which each receives messages.
    active: HashMap<SessionId, u64>,
    /// Sessions whose join is on its way.
    joining: HashSet<SessionId>,
}

impl LocalRoom {
    fn is_empty(&self) -> bool {
        self.active.is_empty() && self.joining.is_empty()
    }
}

enum Kind {
    Join(RoomId),
    Other,
}

struct Pending {
    session: SessionId,
    reference: Option<Ref>,
    kind: Kind,
    target: NodeName,
    received: Instant,
}

/// The hub's state.
pub struct HubState {
    net: Net,
    _tasks: Tasks,
    request_timeout: Duration,
    view: Arc<View>,
    next_req: u64,
    sessions: HashMap<SessionId, LocalSession>,
    users: HashMap<UserName, HashSet<SessionId>>,
    rooms: HashMap<RoomId, LocalRoom>,
    pending: HashMap<u64, Pending>,
}

impl Actor for Hub {
    type Msg = HubMessage;
    type State = HubState;
    type Arguments = HubArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<HubMessage>,
        args: HubArgs,
    ) -> Result<HubState, ActorProcessingErr> {
        let hub = myself.clone();
        args.net
            .serve_hub(Box::new(move |m| hub.cast(HubMessage::Peer(m)).is_ok()));
        let mut tasks = Tasks::default();
        tasks.add(forward(
            args.views.clone(),
            myself.clone(),
            HubMessage::ViewChanged,
        ));
        myself.send_interval(TICK, || HubMessage::Tick);
        // Starting empty: whatever rooms and directories hold about this node's connections
        // (from before a restart of the hub or of the node) is stale.
        let view = args.views.borrow().clone();
        let me = args.net.me().clone();
        for node in view.up() {
            let _ = args
                .net
                .to_rooms(node, ToRooms::SessionsReset { node: me.clone() });
            let _ = args
                .net
                .to_directory(node, ToDirectory::SessionsReset { node: me.clone() });
        }
        Ok(HubState {
            view,
            net: args.net,
            _tasks: tasks,
            request_timeout: args.request_timeout,
            next_req: 1,
            sessions: HashMap::new(),
            users: HashMap::new(),
            rooms: HashMap::new(),
            pending: HashMap::new(),
        })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<HubMessage>,
        state: &mut HubState,
    ) -> Result<(), ActorProcessingErr> {
        state.close_all(Closing::Internal);
        Ok(())
    }

    async fn handle(
        &self,
        _myself: ActorRef<HubMessage>,
        message: HubMessage,
        state: &mut HubState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            HubMessage::Register {
                session,
                user,
                outbox,
            } => state.register(session, user, outbox),
            HubMessage::Unregister { session } => state.unregister(session),
            HubMessage::Request {
                session,
                reference,
                request,
                received,
            } => state.request(session, reference, request, received),
            HubMessage::Peer(message) => state.peer(message),
            HubMessage::ViewChanged(view) => state.view_changed(view),
            HubMessage::CloseAll(why) => state.close_all(why),
            HubMessage::Tick => state.expire(),
        }
        Ok(())
    }
}

impl HubState {
    fn me(&self) -> &NodeName {
        self.net.me()
    }

    fn register(&mut self, session: SessionId, user: UserName, outbox: Outbox) {
        let sessions = self.users.entry(user.clone()).or_default();
        let first = sessions.is_empty();
        sessions.insert(session);
        self.sessions.insert(
            session,
            LocalSession {
                user: user.clone(),
                outbox,
                rooms: HashSet::new(),
            },
        );
        if first {
            self.announce(vec![user], Vec::new());
        }
    }

    fn unregister(&mut self, session: SessionId) {
        let Some(local) = self.sessions.remove(&session) else {
            return;
        };
        for room in &local.rooms {
            let Some(lr) = self.rooms.get_mut(room) else {
                continue;
            };
            lr.active.remove(&session);
            lr.joining.remove(&session);
            let owner = lr.owner.clone();
            if lr.is_empty() {
                self.rooms.remove(room);
            }
            // Nobody waits for this reply (req 0).
            let leave = ToRoom::Request {
                origin: Origin {
                    node: self.me().clone(),
                    req: 0,
                },
                op: RoomOp::Leave {
                    session,
                    user: local.user.clone(),
                },
                hops: 0,
            };
            if let Some(owner) = owner.or_else(|| self.view.owner(room).cloned()) {
                let _ = self.net.to_room(&owner, room.clone(), leave);
            }
        }
        self.pending.retain(|_, p| p.session != session);
        if let Some(sessions) = self.users.get_mut(&local.user) {
            sessions.remove(&session);
            if sessions.is_empty() {
                self.users.remove(&local.user);
                self.announce(Vec::new(), vec![local.user]);
            }
        }
    }

    /// Tells the users' home nodes that they are (no longer) connected here.
    fn announce(&self, online: Vec<UserName>, offline: Vec<UserName>) {
        let mut by_home: HashMap<NodeName, (Vec<UserName>, Vec<UserName>)> = HashMap::new();
        for user in online {
            if let Some(home) = self.view.home(&user) {
                by_home.entry(home.clone()).or_default().0.push(user);
            }
        }
        for user in offline {
            if let Some(home) = self.view.home(&user) {
                by_home.entry(home.clone()).or_default().1.push(user);
            }
        }
        for (home, (online, offline)) in by_home {
            for chunk in online.chunks(10_000) {
                let _ = self.net.to_directory(
                    &home,
                    ToDirectory::Presences {
                        node: self.me().clone(),
                        online: chunk.to_vec(),
                        offline: Vec::new(),
                    },
                );
            }
            if !offline.is_empty() {
                let _ = self.net.to_directory(
                    &home,
                    ToDirectory::Presences {
                        node: self.me().clone(),
                        online: Vec::new(),
                        offline,
                    },
                );
            }
        }
    }

    fn request(
        &mut self,
        session: SessionId,
        reference: Option<Ref>,
        request: HubRequest,
        received: Instant,
    ) {
        let Some(local) = self.sessions.get(&session) else {
            return;
        };
        if let HubRequest::Room {
            room,
            op: RoomOp::Publish { .. },
        } = &request
            && !local.rooms.contains(room)
        {
            self.error(
                session,
                reference.as_deref(),
                ErrorCode::NotJoined,
                "join the room before sending to it",
            );
            return;
        }
        let req = self.next_req;
        self.next_req += 1;
        let origin = Origin {
            node: self.me().clone(),
            req,
        };
        let (target, message, kind) = match request {
            HubRequest::Room { room, op } => {
                let Some(owner) = self.view.owner(&room).cloned() else {
                    self.error(
                        session,
                        reference.as_deref(),
                        ErrorCode::Unavailable,
                        "no node can serve the room right now",
                    );
                    return;
                };
                let kind = match &op {
                    RoomOp::Join { .. } => {
                        let lr = self.rooms.entry(room.clone()).or_default();
                        lr.joining.insert(session);
                        lr.owner.get_or_insert_with(|| owner.clone());
                        if let Some(local) = self.sessions.get_mut(&session) {
                            local.rooms.insert(room.clone());
                        }
                        Kind::Join(room.clone())
                    }
                    RoomOp::Leave { .. } => {
                        if let Some(lr) = self.rooms.get_mut(&room) {
                            lr.active.remove(&session);
                            lr.joining.remove(&session);
                            if lr.is_empty() {
                                self.rooms.remove(&room);
                            }
                        }
                        if let Some(local) = self.sessions.get_mut(&session) {
                            local.rooms.remove(&room);
                        }
                        Kind::Other
                    }
                    _ => Kind::Other,
                };
                let message = PeerMessage::Rooms(ToRooms::Room {
                    room,
                    message: ToRoom::Request {
                        origin,
                        op,
                        hops: 0,
                    },
                });
                (owner, message, kind)
            }
            HubRequest::Direct { from, to, text } => {
                let Some(home) = self.view.home(&to).cloned() else {
                    self.error(
                        session,
                        reference.as_deref(),
                        ErrorCode::Unavailable,
                        "no node can route the message right now",
                    );
                    return;
                };
                let message = PeerMessage::Directory(ToDirectory::Direct {
                    origin,
                    from,
                    to,
                    text,
                });
                (home, message, Kind::Other)
            }
        };
        self.pending.insert(
            req,
            Pending {
                session,
                reference,
                kind,
                target: target.clone(),
                received,
            },
        );
        if self.net.send(&target, message).is_err() {
            self.fail(
                req,
                ErrorCode::Unavailable,
                "the node serving this request is unreachable; retry",
            );
        }
    }

    fn peer(&mut self, message: ToHub) {
        match message {
            ToHub::Reply { req, reply } => self.reply(req, reply),
            ToHub::Fanout { room, entries } => self.fanout(&room, &entries),
            ToHub::Presence { room, user, event } => self.presence(&room, &user, event),
            ToHub::DeliverDirect { to, from, text, ts } => {
                let frame = Utf8Bytes::from(
                    ServerFrame::Direct {
                        from: from.as_str(),
                        text: &text,
                        ts,
                    }
                    .to_json(),
                );
                for session in self.users.get(&to).into_iter().flatten() {
                    if let Some(local) = self.sessions.get(session) {
                        local.outbox.push(frame.clone());
                    }
                }
            }
            ToHub::Reannounce { node } => {
                let users: Vec<UserName> = self
                    .users
                    .keys()
                    .filter(|u| self.view.home(u) == Some(&node))
                    .cloned()
                    .collect();
                self.announce(users, Vec::new());
            }
            ToHub::RoomActive { room, owner } => {
                if let Some(lr) = self.rooms.get_mut(&room) {
                    lr.owner = Some(owner.clone());
                }
                self.subscribe(&room);
            }
        }
    }

    fn reply(&mut self, req: u64, reply: Reply) {
        let Some(pending) = self.pending.remove(&req) else {
            tracing::debug!(
                req,
                "reply to a request that timed out or whose connection closed"
            );
            return;
        };
        let Some(local) = self.sessions.get(&pending.session) else {
            return;
        };
        let reference = pending.reference.as_deref();
        let frame = match reply {
            Reply::Joined { room, seq, replay } => {
                let frame = ServerFrame::Joined {
                    reference,
                    room: room.as_str(),
                    seq,
                }
                .to_json();
                // The reply and its replay take one slot of the client's queue.
                let mut frames = Vec::with_capacity(replay.len() + 1);
                frames.push(Utf8Bytes::from(frame));
                frames.extend(
                    replay
                        .iter()
                        .map(|entry| Utf8Bytes::from(message_view(&room, entry).to_json())),
                );
                local.outbox.push_batch(frames);
                self.joined(&room, pending.session, seq);
                return;
            }
            Reply::Left { room } => ServerFrame::Left {
                reference,
                room: room.as_str(),
            }
            .to_json(),
            Reply::Acked { room, seq } => ServerFrame::Ack {
                reference,
                room: Some(room.as_str()),
                seq: Some(seq),
            }
            .to_json(),
            Reply::History { room, messages } => {
                let views: Vec<MessageView<'_>> =
                    messages.iter().map(|e| message_view(&room, e)).collect();
                ServerFrame::History {
                    reference,
                    room: room.as_str(),
                    messages: &views,
                }
                .to_json()
            }
            Reply::Members { room, users } => {
                let users: Vec<&str> = users.iter().map(UserName::as_str).collect();
                ServerFrame::Members {
                    reference,
                    room: room.as_str(),
                    users: &users,
                }
                .to_json()
            }
            Reply::DirectSent => ServerFrame::Ack {
                reference,
                room: None,
                seq: None,
            }
            .to_json(),
            Reply::Failed { code, message } => {
                if let Kind::Join(room) = &pending.kind {
                    self.join_failed(room, pending.session);
                }
                self.net.metrics().error(code);
                ServerFrame::Error(ErrorFrame {
                    reference,
                    code,
                    message: &message,
                })
                .to_json()
            }
        };
        if let Some(local) = self.sessions.get(&pending.session) {
            local.outbox.push_text(frame);
        }
    }

    /// A join reply arrived: the session receives messages after `seq` from now on.
    fn joined(&mut self, room: &RoomId, session: SessionId, seq: u64) {
        let Some(lr) = self.rooms.get_mut(room) else {
            return;
        };
        if !lr.joining.remove(&session) && !lr.active.contains_key(&session) {
            // The session left (or closed) while joining.
            return;
        }
        lr.active.insert(session, seq);
        match lr.cursor {
            None => lr.cursor = Some(seq),
            Some(cursor) if cursor < seq && !lr.resyncing => {
                // Fan-out reached us for messages up to `seq` only partly: fetch the rest.
                self.subscribe(room);
            }
            _ => {}
        }
    }

    fn join_failed(&mut self, room: &RoomId, session: SessionId) {
        if let Some(lr) = self.rooms.get_mut(room) {
            lr.joining.remove(&session);
            if lr.is_empty() {
                self.rooms.remove(room);
            }
        }
        if let Some(local) = self.sessions.get_mut(&session) {
            local.rooms.remove(room);
        }
    }

    fn fanout(&mut self, room: &RoomId, entries: &[Entry]) {
        let Some(lr) = self.rooms.get_mut(room) else {
            return;
        };
        let Some(mut cursor) = lr.cursor else {
            return;
        };
        let mut gap = false;
        let mut fresh: Vec<(u64, Utf8Bytes)> = Vec::new();
        for entry in entries {
            if entry.seq <= cursor {
                continue;
            }
            if entry.seq != cursor + 1 {
                gap = true;
                break;
            }
            // Rendered once, shared by every session of the room on this node.
            fresh.push((
                entry.seq,
                Utf8Bytes::from(message_view(room, entry).to_json()),
            ));
            cursor = entry.seq;
            lr.resyncing = false;
        }
        match fresh.as_slice() {
            [] => {}
            [(seq, frame)] => {
                // The common case: one message, one shared frame, no allocation per session.
                for (session, after) in &lr.active {
                    if seq > after
                        && let Some(local) = self.sessions.get(session)
                    {
                        local.outbox.push(frame.clone());
                    }
                }
            }
            _ => {
                for (session, after) in &lr.active {
                    let Some(local) = self.sessions.get(session) else {
                        continue;
                    };
                    let frames: Vec<Utf8Bytes> = fresh
                        .iter()
                        .filter(|(seq, _)| seq > after)
                        .map(|(_, frame)| frame.clone())
                        .collect();
                    // A catch-up burst takes one slot of the client's queue.
                    local.outbox.push_batch(frames);
                }
            }
        }
        lr.cursor = Some(cursor);
        if gap && !lr.resyncing {
            tracing::debug!(room = %room, cursor, "gap in a room's messages; subscribing again");
            self.subscribe(room);
        }
    }

    /// Subscribes this node's sessions in `room` at its owner, with the cursor: the owner
    /// re-sends every message after it.
    fn subscribe(&mut self, room: &RoomId) {
        let me = self.me().clone();
        let Some(lr) = self.rooms.get_mut(room) else {
            return;
        };
        let Some(cursor) = lr.cursor else {
            return;
        };
        let Some(owner) = self.view.owner(room).cloned() else {
            return;
        };
        let sessions: Vec<(SessionId, UserName)> = lr
            .active
            .keys()
            .chain(lr.joining.iter())
            .filter_map(|s| self.sessions.get(s).map(|l| (*s, l.user.clone())))
            .collect();
        lr.owner = Some(owner.clone());
        lr.resyncing = true;
        let _ = self.net.to_room(
            &owner,
            room.clone(),
            ToRoom::Subscribe {
                node: me,
                cursor,
                sessions,
            },
        );
    }

    fn presence(&self, room: &RoomId, user: &UserName, event: PresenceEvent) {
        let Some(lr) = self.rooms.get(room) else {
            return;
        };
        let frame = Utf8Bytes::from(
            ServerFrame::Presence {
                room: room.as_str(),
                user: user.as_str(),
                event,
            }
            .to_json(),
        );
        for session in lr.active.keys() {
            if let Some(local) = self.sessions.get(session) {
                local.outbox.push(frame.clone());
            }
        }
    }

    fn view_changed(&mut self, view: Arc<View>) {
        let old = std::mem::replace(&mut self.view, view);
        // Rooms whose owner changed: subscribe at the new owner.
        let moved: Vec<RoomId> = self
            .rooms
            .iter()
            .filter(|(room, lr)| lr.cursor.is_some() && lr.owner.as_ref() != self.view.owner(room))
            .map(|(room, _)| room.clone())
            .collect();
        for room in moved {
            self.subscribe(&room);
        }
        // Users whose home changed: announce them at the new home.
        let rehomed: Vec<UserName> = self
            .users
            .keys()
            .filter(|u| old.home(u) != self.view.home(u))
            .cloned()
            .collect();
        if !rehomed.is_empty() {
            self.announce(rehomed, Vec::new());
        }
        // Requests waiting on a node that is gone will never be answered.
        let lost: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| !self.view.is_up(&p.target))
            .map(|(req, _)| *req)
            .collect();
        for req in lost {
            self.fail(
                req,
                ErrorCode::Unavailable,
                "the node serving this request went down; retry",
            );
        }
    }

    fn expire(&mut self) {
        let timeout = self.request_timeout;
        let expired: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| p.received.elapsed() > timeout)
            .map(|(req, _)| *req)
            .collect();
        for req in expired {
            self.fail(req, ErrorCode::Unavailable, "no answer in time; retry");
        }
    }

    fn fail(&mut self, req: u64, code: ErrorCode, message: &str) {
        self.reply(
            req,
            Reply::Failed {
                code,
                message: message.to_owned(),
            },
        );
    }

    fn error(
        &self,
        session: SessionId,
        reference: Option<&serde_json::value::RawValue>,
        code: ErrorCode,
        message: &str,
    ) {
        if let Some(local) = self.sessions.get(&session) {
            self.net.metrics().error(code);
            local.outbox.push_text(
                ServerFrame::Error(ErrorFrame {
                    reference,
                    code,
                    message,
                })
                .to_json(),
            );
        }
    }

    fn close_all(&mut self, why: Closing) {
        for local in self.sessions.values() {
            local.outbox.close(why);
        }
    }
}

fn message_view<'a>(room: &'a RoomId, entry: &'a Entry) -> MessageView<'a> {
    MessageView {
        room: room.as_str(),
        seq: entry.seq,
        from: entry.from.as_str(),
        text: &entry.text,
        ts: entry.ts,
        id: entry.client_id.as_deref(),
    }
}
