//! The pure core of the hub: this node's connections, the rooms they joined, the requests they
//! wait on, and the follow / gap / resubscribe logic that gives every connection a gap-free
//! stream of each room's messages, in seq order, across moves of the room.
//!
//! No I/O, no clock, no actor: events come in as method calls with the time; what to send to
//! other nodes and what to tell connections comes out as [`HubEffect`]s, and the hot path, a
//! room's fan-out, returns a [`Delivery`] naming the fresh entries and who gets which. The Hub
//! actor (`hub.rs`) renders frames (long replies, a page of history or a join's replay, are
//! rendered by the asking connection's own task) and owns the connections' outboxes; the
//! cluster simulation drives the same core.
//!
//! Following a room: per room, the hub keeps a **cursor**, the last seq delivered here. Fan-out
//! entries at or below it are duplicates and dropped; an entry past `cursor + 1` is a gap (a
//! message lost with a broken link, or a room that moved): the hub subscribes again at the
//! owner with its cursor, and the owner re-sends what is missing. When the view names a new
//! owner, the hub subscribes there the same way. A connection whose join was answered with a
//! seq below what the room already delivered here (its owner moved while it joined) is brought
//! up to the cursor by a second, internal join with `since` before it receives live messages.
//! A node far behind (past what one re-send holds) gets the oldest part first, then
//! `ToHub::Behind`, and subscribes again from where that part left it, until it has caught up.
//! When retention dropped messages after the cursor (the room moved on while this node was
//! behind), the owner answers the subscription with the room's horizon: the cursor moves up to
//! it, and the sessions are told that the messages before it are gone.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chat_protocol::client::Ref;
use chat_protocol::peer::{
    Entry, Origin, PeerMessage, Reply, RoomOp, SessionId, ToDirectory, ToHub, ToRoom, ToRooms,
};
use chat_protocol::{ErrorCode, NodeName, PresenceEvent, RoomId, UserName};

use crate::cluster::view::View;

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

/// What the hub core decided; the actor shell carries it out.
#[derive(Debug)]
pub enum HubEffect {
    /// A message for another node (or this one).
    Peer(NodeName, PeerMessage),
    /// A connection's request for another node (or this one); when it cannot be handed over,
    /// tell the core with [`HubCore::request_failed`].
    Request {
        /// The request's id.
        req: u64,
        /// The node that serves it.
        target: NodeName,
        /// The request.
        message: PeerMessage,
    },
    /// The answer to a connection's request (`Failed` for errors).
    Reply {
        /// The connection.
        session: SessionId,
        /// The request's `ref`.
        reference: Option<Ref>,
        /// The answer.
        reply: Reply,
    },
    /// Messages a connection missed while it joined, to deliver before live ones.
    CatchUp {
        /// The connection.
        session: SessionId,
        /// The room.
        room: RoomId,
        /// The messages, in seq order.
        entries: Vec<Entry>,
    },
    /// Messages of a room that connections had not received were dropped by retention: what
    /// they receive next starts at `horizon`.
    Horizon {
        /// The room.
        room: RoomId,
        /// The smallest seq the room still keeps.
        horizon: u64,
        /// The connections to tell.
        sessions: Vec<SessionId>,
    },
    /// A presence change for connections in a room.
    Presence {
        /// The room.
        room: RoomId,
        /// The user.
        user: UserName,
        /// Join or leave.
        event: PresenceEvent,
        /// The connections to tell.
        sessions: Vec<SessionId>,
    },
    /// A direct message for connections of its addressee.
    Direct {
        /// The sender.
        from: UserName,
        /// The text.
        text: String,
        /// Milliseconds since the Unix epoch.
        ts: u64,
        /// The connections to deliver to.
        sessions: Vec<SessionId>,
    },
    /// The owner has more of a room after the part it re-sent (this node is far behind): call
    /// [`HubCore::continue_catch_up`] once the room's connections have room in their queues for
    /// another part, so that a catch-up goes at the pace its readers take it.
    Behind {
        /// The room.
        room: RoomId,
    },
}

/// A room's fresh messages and who receives which: every session gets the entries with a seq
/// above its own starting point.
#[derive(Debug)]
pub struct Delivery<'a> {
    /// The room.
    pub room: &'a RoomId,
    /// The fresh entries, contiguous and ascending.
    pub entries: Vec<Entry>,
    sessions: &'a HashMap<SessionId, u64>,
}

impl Delivery<'_> {
    /// Each receiving session, with the seq after which it receives messages.
    pub fn recipients(&self) -> impl Iterator<Item = (SessionId, u64)> + '_ {
        self.sessions.iter().map(|(s, after)| (*s, *after))
    }
}

struct LocalSession {
    user: UserName,
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
    /// Sessions whose join (or catch-up) is on its way.
    joining: HashSet<SessionId>,
}

impl LocalRoom {
    fn is_empty(&self) -> bool {
        self.active.is_empty() && self.joining.is_empty()
    }

    fn done_joining(&mut self, session: SessionId) {
        self.joining.remove(&session);
        if self.joining.is_empty() {
            // Most rooms see few joins: the set's buffer is given back (every room holds one).
            self.joining = HashSet::new();
        }
    }
}

enum Kind {
    /// A client's join.
    Join(RoomId),
    /// The internal join that brings a session up to the room's cursor.
    CatchUp(RoomId),
    Other,
}

struct Pending {
    session: SessionId,
    reference: Option<Ref>,
    kind: Kind,
    target: NodeName,
    received: Instant,
}

/// The hub's state, without I/O.
pub struct HubCore {
    me: NodeName,
    request_timeout: Duration,
    view: Arc<View>,
    next_req: u64,
    sessions: HashMap<SessionId, LocalSession>,
    users: HashMap<UserName, HashSet<SessionId>>,
    rooms: HashMap<RoomId, LocalRoom>,
    pending: HashMap<u64, Pending>,
    effects: Vec<HubEffect>,
    max_rooms: usize,
}

impl HubCore {
    /// A hub for node `me`, starting empty: it tells rooms and directories that whatever they
    /// hold about this node's connections (from before a restart) is stale. Request ids start at
    /// `first_req` (random in the node): a reply that reaches a restarted hub late, for a request
    /// of its previous life, must not match one of this life.
    pub fn new(
        me: NodeName,
        view: Arc<View>,
        request_timeout: Duration,
        first_req: u64,
    ) -> HubCore {
        let mut core = HubCore {
            me,
            request_timeout,
            view,
            // Never 0 (the id of requests nobody waits for), and far from wrapping.
            next_req: (first_req >> 2).max(1),
            sessions: HashMap::new(),
            users: HashMap::new(),
            rooms: HashMap::new(),
            pending: HashMap::new(),
            effects: Vec::new(),
            max_rooms: usize::MAX,
        };
        for node in core.view.up().cloned().collect::<Vec<_>>() {
            let me = core.me.clone();
            core.effects.push(HubEffect::Peer(
                node.clone(),
                PeerMessage::Rooms(ToRooms::SessionsReset { node: me.clone() }),
            ));
            core.effects.push(HubEffect::Peer(
                node,
                PeerMessage::Directory(ToDirectory::SessionsReset { node: me }),
            ));
        }
        core
    }

    /// Caps the rooms one connection may have joined at once (`max-rooms-per-connection`); a
    /// `join` past it gets `too_many_rooms`. Unlimited by default.
    pub fn with_max_rooms(mut self, max_rooms: usize) -> HubCore {
        self.max_rooms = max_rooms;
        self
    }

    /// The effects decided since the last call, in order.
    pub fn take_effects(&mut self) -> Vec<HubEffect> {
        std::mem::take(&mut self.effects)
    }

    /// The sessions connected here.
    pub fn sessions(&self) -> impl Iterator<Item = SessionId> + '_ {
        self.sessions.keys().copied()
    }

    /// The connections following `room` here, joined or joining.
    pub fn room_sessions(&self, room: &RoomId) -> impl Iterator<Item = SessionId> + '_ {
        self.rooms
            .get(room)
            .into_iter()
            .flat_map(|lr| lr.active.keys().chain(lr.joining.iter()).copied())
    }

    /// Asks the owner of a room this node is far behind for the next part of its re-send
    /// ([`HubEffect::Behind`]).
    pub fn continue_catch_up(&mut self, room: &RoomId) {
        self.subscribe(room);
    }

    /// A connection opened.
    pub fn register(&mut self, session: SessionId, user: UserName) {
        let sessions = self.users.entry(user.clone()).or_default();
        let first = sessions.is_empty();
        sessions.insert(session);
        self.sessions.insert(
            session,
            LocalSession {
                user: user.clone(),
                rooms: HashSet::new(),
            },
        );
        if first {
            self.announce(vec![user], Vec::new());
        }
    }

    /// A connection closed.
    pub fn unregister(&mut self, session: SessionId) {
        let Some(local) = self.sessions.remove(&session) else {
            return;
        };
        let mut rooms: Vec<&RoomId> = local.rooms.iter().collect();
        rooms.sort();
        for room in rooms {
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
                    node: self.me.clone(),
                    req: 0,
                },
                op: RoomOp::Leave {
                    session,
                    user: local.user.clone(),
                },
                hops: 0,
            };
            if let Some(owner) = owner.or_else(|| self.view.owner(room).cloned()) {
                self.send_room(owner, room.clone(), leave);
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

    /// A connection's request, received at `received`.
    pub fn request(
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
                reference,
                ErrorCode::NotJoined,
                "join the room before sending to it",
            );
            return;
        }
        if let HubRequest::Room {
            room,
            op: RoomOp::Join { .. },
        } = &request
            && local.rooms.len() >= self.max_rooms
            && !local.rooms.contains(room)
        {
            let message = format!(
                "this connection has joined {} rooms, the most it may; leave one first",
                local.rooms.len()
            );
            self.error(session, reference, ErrorCode::TooManyRooms, &message);
            return;
        }
        let origin = Origin {
            node: self.me.clone(),
            req: self.next_req,
        };
        let (target, message, kind) = match request {
            HubRequest::Room { room, op } => {
                let Some(owner) = self.view.owner(&room).cloned() else {
                    self.error(
                        session,
                        reference,
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
                        reference,
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
        self.send_pending(session, reference, kind, target, message, received);
    }

    fn send_pending(
        &mut self,
        session: SessionId,
        reference: Option<Ref>,
        kind: Kind,
        target: NodeName,
        message: PeerMessage,
        received: Instant,
    ) {
        let req = self.next_req;
        self.next_req += 1;
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
        self.effects.push(HubEffect::Request {
            req,
            target,
            message,
        });
    }

    /// A request could not be handed to its node (unreachable, congested): it fails at once.
    pub fn request_failed(&mut self, req: u64) {
        self.fail(req, "the node serving this request is unreachable; retry");
    }

    /// A message for the hub from a node. A fan-out returns what to deliver to whom.
    pub fn on_peer(&mut self, message: ToHub, now: Instant) -> Option<Delivery<'_>> {
        match message {
            ToHub::Reply { req, reply } => self.reply(req, reply, now),
            ToHub::Fanout { room, entries } => return self.on_fanout(&room, entries),
            ToHub::Presence { room, user, event } => {
                let lr = self.rooms.get(&room)?;
                let mut sessions: Vec<SessionId> = lr.active.keys().copied().collect();
                sessions.sort_unstable();
                self.effects.push(HubEffect::Presence {
                    room,
                    user,
                    event,
                    sessions,
                });
            }
            ToHub::DeliverDirect { to, from, text, ts } => {
                let mut sessions: Vec<SessionId> =
                    self.users.get(&to).into_iter().flatten().copied().collect();
                sessions.sort_unstable();
                if !sessions.is_empty() {
                    self.effects.push(HubEffect::Direct {
                        from,
                        text,
                        ts,
                        sessions,
                    });
                }
            }
            ToHub::Reannounce { node } => {
                let mut users: Vec<UserName> = self
                    .users
                    .keys()
                    .filter(|u| self.view.home(u) == Some(&node))
                    .cloned()
                    .collect();
                users.sort();
                self.announce(users, Vec::new());
            }
            ToHub::RoomActive { room, owner } => {
                if let Some(lr) = self.rooms.get_mut(&room) {
                    lr.owner = Some(owner);
                }
                self.subscribe(&room);
            }
            ToHub::Horizon { room, horizon } => self.on_horizon(&room, horizon),
            // The owner's re-send stopped short: the fan-outs before this moved the cursor
            // (contiguously), so asking again fetches the next part, once the connections have
            // taken in this one. Live fan-outs meanwhile are past a gap: they wait.
            ToHub::Behind { room } => {
                if let Some(lr) = self.rooms.get_mut(&room) {
                    lr.resyncing = true;
                    self.effects.push(HubEffect::Behind { room });
                }
            }
        }
        None
    }

    /// The owner answered a subscription from below the room's horizon: the messages before
    /// `horizon` are gone for good (retention), so the cursor moves up to just below it, where
    /// the re-sent messages start, and the sessions that had not received them are told. A
    /// horizon never moves back, so one that arrives late is still true.
    fn on_horizon(&mut self, room: &RoomId, horizon: u64) {
        let Some(lr) = self.rooms.get_mut(room) else {
            return;
        };
        let Some(cursor) = lr.cursor else {
            return;
        };
        let last_dropped = horizon.saturating_sub(1);
        if cursor >= last_dropped {
            return;
        }
        tracing::debug!(room = %room, cursor, horizon, "messages below the horizon are gone; following from it");
        lr.cursor = Some(last_dropped);
        // Sessions that joined at or past the horizon missed nothing; joining ones learn it from
        // their join's reply.
        let mut sessions: Vec<SessionId> = lr
            .active
            .iter_mut()
            .filter(|(_, after)| **after < last_dropped)
            .map(|(session, after)| {
                *after = last_dropped;
                *session
            })
            .collect();
        sessions.sort_unstable();
        if !sessions.is_empty() {
            self.effects.push(HubEffect::Horizon {
                room: room.clone(),
                horizon,
                sessions,
            });
        }
    }

    fn reply(&mut self, req: u64, reply: Reply, now: Instant) {
        let Some(pending) = self.pending.remove(&req) else {
            tracing::debug!(
                req,
                "reply to a request that timed out or whose connection closed"
            );
            return;
        };
        if !self.sessions.contains_key(&pending.session) {
            return;
        }
        // A join below the room's horizon is handled as a join; its reply keeps the horizon.
        let (reply, horizon) = match reply {
            joined @ Reply::JoinedBelowHorizon { .. } => joined.split_horizon(),
            reply => (reply, None),
        };
        match (&pending.kind, reply) {
            (Kind::Join(room), Reply::Joined { seq, replay, .. }) => {
                let room = room.clone();
                let reply = match horizon {
                    Some(horizon) => Reply::JoinedBelowHorizon {
                        room: room.clone(),
                        seq,
                        replay,
                        horizon,
                    },
                    None => Reply::Joined {
                        room: room.clone(),
                        seq,
                        replay,
                    },
                };
                self.effects.push(HubEffect::Reply {
                    session: pending.session,
                    reference: pending.reference,
                    reply,
                });
                self.joined(&room, pending.session, seq, &pending.target, now);
            }
            (Kind::CatchUp(room), Reply::Joined { seq, replay, .. }) => {
                let room = room.clone();
                if let Some(horizon) = horizon {
                    // Some of what the session missed while it joined was dropped meanwhile.
                    self.effects.push(HubEffect::Horizon {
                        room: room.clone(),
                        horizon,
                        sessions: vec![pending.session],
                    });
                }
                if !replay.is_empty() {
                    self.effects.push(HubEffect::CatchUp {
                        session: pending.session,
                        room: room.clone(),
                        entries: replay,
                    });
                }
                self.joined(&room, pending.session, seq, &pending.target, now);
            }
            (Kind::Join(room) | Kind::CatchUp(room), failed @ Reply::Failed { .. }) => {
                let room = room.clone();
                self.join_failed(&room, pending.session);
                self.effects.push(HubEffect::Reply {
                    session: pending.session,
                    reference: pending.reference,
                    reply: failed,
                });
            }
            (_, reply) => self.effects.push(HubEffect::Reply {
                session: pending.session,
                reference: pending.reference,
                reply,
            }),
        }
    }

    /// A join reply arrived from `answered_by`: the session receives messages after `seq` from
    /// now on, once it has everything up to the room's cursor.
    fn joined(
        &mut self,
        room: &RoomId,
        session: SessionId,
        seq: u64,
        answered_by: &NodeName,
        now: Instant,
    ) {
        let Some(lr) = self.rooms.get_mut(room) else {
            return;
        };
        if !lr.joining.contains(&session) && !lr.active.contains_key(&session) {
            // The session left (or closed) while joining.
            return;
        }
        match lr.cursor {
            None => {
                lr.cursor = Some(seq);
                lr.done_joining(session);
                lr.active.insert(session, seq);
                // The room moved while the join travelled (its new owner may even have invited
                // this node before the answer came, on another link): follow it from here.
                let owner = lr.owner.clone();
                let moved = owner.as_ref() != Some(answered_by)
                    || self.view.owner(room) != Some(answered_by);
                if moved {
                    self.subscribe(room);
                }
                return;
            }
            Some(cursor) if cursor > seq => {
                // The room delivered past this join's seq here already (its owner changed while
                // the join travelled): fetch what the session missed before it goes live.
                let user = self.sessions.get(&session).map(|s| s.user.clone());
                let owner = self.view.owner(room).cloned();
                if let (Some(user), Some(owner)) = (user, owner) {
                    lr.joining.insert(session);
                    lr.active.remove(&session);
                    let message = PeerMessage::Rooms(ToRooms::Room {
                        room: room.clone(),
                        message: ToRoom::Request {
                            origin: Origin {
                                node: self.me.clone(),
                                req: self.next_req,
                            },
                            op: RoomOp::Join {
                                session,
                                user,
                                since: Some(seq),
                            },
                            hops: 0,
                        },
                    });
                    let kind = Kind::CatchUp(room.clone());
                    self.send_pending(session, None, kind, owner, message, now);
                    return;
                }
            }
            Some(cursor) if cursor < seq && !lr.resyncing => {
                // Fan-out reached us for messages up to `seq` only partly: fetch the rest.
                lr.done_joining(session);
                lr.active.insert(session, seq);
                self.subscribe(room);
                return;
            }
            _ => {}
        }
        lr.done_joining(session);
        lr.active.insert(session, seq);
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

    /// A room's fan-out: the fresh entries (past the cursor, contiguous) and who gets which. A
    /// gap makes the hub subscribe again at the owner with its cursor.
    fn on_fanout(&mut self, room: &RoomId, entries: Vec<Entry>) -> Option<Delivery<'_>> {
        let lr = self.rooms.get_mut(room)?;
        let mut cursor = lr.cursor?;
        let mut gap = false;
        let mut fresh = Vec::new();
        for entry in entries {
            if entry.seq <= cursor {
                continue;
            }
            if entry.seq != cursor + 1 {
                gap = true;
                break;
            }
            cursor = entry.seq;
            lr.resyncing = false;
            fresh.push(entry);
        }
        lr.cursor = Some(cursor);
        if gap && !lr.resyncing {
            tracing::debug!(room = %room, cursor, "gap in a room's messages; subscribing again");
            self.subscribe(room);
        }
        if fresh.is_empty() {
            return None;
        }
        let lr = self.rooms.get(room)?;
        Some(Delivery {
            room: self.rooms.get_key_value(room).map(|(k, _)| k)?,
            entries: fresh,
            sessions: &lr.active,
        })
    }

    /// Subscribes this node's sessions in `room` at its owner, with the cursor: the owner
    /// re-sends every message after it.
    fn subscribe(&mut self, room: &RoomId) {
        let Some(lr) = self.rooms.get_mut(room) else {
            return;
        };
        let Some(cursor) = lr.cursor else {
            return;
        };
        let Some(owner) = self.view.owner(room).cloned() else {
            return;
        };
        let mut sessions: Vec<(SessionId, UserName)> = lr
            .active
            .keys()
            .chain(lr.joining.iter())
            .filter_map(|s| self.sessions.get(s).map(|l| (*s, l.user.clone())))
            .collect();
        sessions.sort_unstable();
        lr.owner = Some(owner.clone());
        lr.resyncing = true;
        let message = ToRoom::Subscribe {
            node: self.me.clone(),
            cursor,
            sessions,
        };
        self.send_room(owner, room.clone(), message);
    }

    /// The view changed.
    pub fn on_view(&mut self, view: Arc<View>) {
        let old = std::mem::replace(&mut self.view, view);
        // Rooms whose owner changed, or is reached over a new session (fan-outs may have been
        // lost with the old one): subscribe at the owner.
        let mut moved: Vec<RoomId> = self
            .rooms
            .iter()
            .filter(|(room, lr)| {
                let owner = self.view.owner(room);
                lr.cursor.is_some()
                    && (lr.owner.as_ref() != owner
                        || owner.is_some_and(|o| self.view.returned(&old, o)))
            })
            .map(|(room, _)| room.clone())
            .collect();
        moved.sort();
        for room in moved {
            self.subscribe(&room);
        }
        // Users whose home changed: announce them at the new home.
        let mut rehomed: Vec<UserName> = self
            .users
            .keys()
            .filter(|u| old.home(u) != self.view.home(u))
            .cloned()
            .collect();
        rehomed.sort();
        if !rehomed.is_empty() {
            self.announce(rehomed, Vec::new());
        }
        // Requests waiting on a node that is gone, or was reached over a session that is gone,
        // will never be answered.
        let mut lost: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| {
                !self.view.is_up(&p.target)
                    || self.view.session(&p.target) != old.session(&p.target)
            })
            .map(|(req, _)| *req)
            .collect();
        lost.sort_unstable();
        for req in lost {
            self.fail(req, "the node serving this request went down; retry");
        }
    }

    /// Expires requests that waited longer than the request timeout.
    pub fn on_tick(&mut self, now: Instant) {
        let timeout = self.request_timeout;
        let mut expired: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| now.duration_since(p.received) > timeout)
            .map(|(req, _)| *req)
            .collect();
        expired.sort_unstable();
        for req in expired {
            self.fail(req, "no answer in time; retry");
        }
    }

    fn fail(&mut self, req: u64, message: &str) {
        let Some(pending) = self.pending.get(&req) else {
            return;
        };
        let received = pending.received;
        self.reply(
            req,
            Reply::Failed {
                code: ErrorCode::Unavailable,
                message: message.to_owned(),
            },
            received,
        );
    }

    fn error(
        &mut self,
        session: SessionId,
        reference: Option<Ref>,
        code: ErrorCode,
        message: &str,
    ) {
        self.effects.push(HubEffect::Reply {
            session,
            reference,
            reply: Reply::Failed {
                code,
                message: message.to_owned(),
            },
        });
    }

    fn send_room(&mut self, node: NodeName, room: RoomId, message: ToRoom) {
        self.effects.push(HubEffect::Peer(
            node,
            PeerMessage::Rooms(ToRooms::Room { room, message }),
        ));
    }

    /// Tells the users' home nodes that they are (no longer) connected here.
    fn announce(&mut self, online: Vec<UserName>, offline: Vec<UserName>) {
        let mut by_home: BTreeMap<NodeName, (Vec<UserName>, Vec<UserName>)> = BTreeMap::new();
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
                let message = ToDirectory::Presences {
                    node: self.me.clone(),
                    online: chunk.to_vec(),
                    offline: Vec::new(),
                };
                self.effects.push(HubEffect::Peer(
                    home.clone(),
                    PeerMessage::Directory(message),
                ));
            }
            if !offline.is_empty() {
                let message = ToDirectory::Presences {
                    node: self.me.clone(),
                    online: Vec::new(),
                    offline,
                };
                self.effects
                    .push(HubEffect::Peer(home, PeerMessage::Directory(message)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::view::{Member, Status};

    fn node(name: &str) -> NodeName {
        NodeName::new(name).unwrap()
    }

    /// A room owned by a node other than this one (a), so that messages to it cross a session.
    fn room() -> RoomId {
        let all = view(&["a", "b", "c"], 1, 1);
        (0..100)
            .map(|i| RoomId::new(&format!("lobby{i}")).unwrap())
            .find(|r| all.owner(r) != Some(&node("a")))
            .unwrap()
    }

    fn user(name: &str) -> UserName {
        UserName::new(name).unwrap()
    }

    /// A view of a, b, c in which `up` are up over sessions numbered `session`.
    fn view(up: &[&str], session: u64, version: u64) -> Arc<View> {
        let members = ["a", "b", "c"]
            .iter()
            .map(|n| Member {
                name: node(n),
                addr: format!("{n}:7000"),
                status: if up.contains(n) {
                    Status::Up
                } else {
                    Status::Down
                },
                public_url: None,
                session: if *n == "a" { 0 } else { session },
            })
            .collect();
        Arc::new(View::new(node("a"), members, true, version))
    }

    fn entry(seq: u64) -> Entry {
        Entry {
            seq,
            epoch: 1,
            from: user("bob"),
            text: format!("m{seq}"),
            ts: seq,
            client_id: None,
        }
    }

    /// The requests the hub sent: (req, target, room op kind).
    fn requests(hub: &mut HubCore) -> Vec<(u64, NodeName, PeerMessage)> {
        hub.take_effects()
            .into_iter()
            .filter_map(|e| match e {
                HubEffect::Request {
                    req,
                    target,
                    message,
                } => Some((req, target, message)),
                _ => None,
            })
            .collect()
    }

    fn subscriptions(effects: &[HubEffect]) -> Vec<(NodeName, u64)> {
        effects
            .iter()
            .filter_map(|e| match e {
                HubEffect::Peer(
                    to,
                    PeerMessage::Rooms(ToRooms::Room {
                        message: ToRoom::Subscribe { cursor, .. },
                        ..
                    }),
                ) => Some((to.clone(), *cursor)),
                _ => None,
            })
            .collect()
    }

    /// A hub on a with session 1 (alice) joined to the room at seq `at`.
    fn joined_hub(at: u64) -> (HubCore, Instant) {
        let now = Instant::now();
        let mut hub = HubCore::new(
            node("a"),
            view(&["a", "b", "c"], 1, 1),
            Duration::from_secs(5),
            1,
        );
        hub.register(1, user("alice"));
        let op = RoomOp::Join {
            session: 1,
            user: user("alice"),
            since: None,
        };
        hub.request(1, None, HubRequest::Room { room: room(), op }, now);
        let (req, _, _) = requests(&mut hub).remove(0);
        let joined = Reply::Joined {
            room: room(),
            seq: at,
            replay: Vec::new(),
        };
        assert!(
            hub.on_peer(ToHub::Reply { req, reply: joined }, now)
                .is_none()
        );
        hub.take_effects();
        (hub, now)
    }

    /// bob (session 2) joins the room; the owner answers at `seq`. The effects that follow.
    fn bob_joins_answered_at(hub: &mut HubCore, seq: u64, now: Instant) -> Vec<HubEffect> {
        hub.register(2, user("bob"));
        let op = RoomOp::Join {
            session: 2,
            user: user("bob"),
            since: None,
        };
        hub.request(2, None, HubRequest::Room { room: room(), op }, now);
        let (req, _, _) = requests(hub).remove(0);
        let joined = Reply::Joined {
            room: room(),
            seq,
            replay: Vec::new(),
        };
        hub.on_peer(ToHub::Reply { req, reply: joined }, now);
        hub.take_effects()
    }

    #[test]
    fn a_join_past_the_room_cap_gets_too_many_rooms_and_a_leave_makes_room() {
        let now = Instant::now();
        let mut hub = HubCore::new(
            node("a"),
            view(&["a", "b", "c"], 1, 1),
            Duration::from_secs(5),
            1,
        )
        .with_max_rooms(2);
        hub.register(1, user("alice"));
        let ask = |hub: &mut HubCore, name: &str, leave: bool| {
            let room = RoomId::new(name).unwrap();
            let op = if leave {
                RoomOp::Leave {
                    session: 1,
                    user: user("alice"),
                }
            } else {
                RoomOp::Join {
                    session: 1,
                    user: user("alice"),
                    since: None,
                }
            };
            hub.request(1, None, HubRequest::Room { room, op }, now);
            hub.take_effects().into_iter().find_map(|e| match e {
                HubEffect::Reply {
                    reply: Reply::Failed { code, .. },
                    ..
                } => Some(code),
                _ => None,
            })
        };
        assert_eq!(ask(&mut hub, "r1", false), None);
        assert_eq!(ask(&mut hub, "r2", false), None);
        assert_eq!(
            ask(&mut hub, "r2", false),
            None,
            "joining a joined room again is fine"
        );
        assert_eq!(ask(&mut hub, "r3", false), Some(ErrorCode::TooManyRooms));
        assert_eq!(ask(&mut hub, "r1", true), None);
        assert_eq!(ask(&mut hub, "r3", false), None, "a leave frees a place");
    }

    fn fanout(hub: &mut HubCore, seqs: &[u64], now: Instant) -> Vec<u64> {
        let entries = seqs.iter().map(|s| entry(*s)).collect();
        match hub.on_peer(
            ToHub::Fanout {
                room: room(),
                entries,
            },
            now,
        ) {
            Some(delivery) => {
                let after: Vec<u64> = delivery.recipients().map(|(_, a)| a).collect();
                delivery
                    .entries
                    .iter()
                    .map(|e| e.seq)
                    .filter(|s| after.iter().all(|a| s > a))
                    .collect()
            }
            None => Vec::new(),
        }
    }

    #[test]
    fn fan_out_is_delivered_once_in_order_and_a_gap_resubscribes_with_the_cursor() {
        let (mut hub, now) = joined_hub(5);
        assert_eq!(
            fanout(&mut hub, &[4, 5, 6], now),
            vec![6],
            "4 and 5 were replayed"
        );
        assert_eq!(
            fanout(&mut hub, &[6], now),
            Vec::<u64>::new(),
            "a duplicate"
        );
        assert!(hub.take_effects().is_empty());
        // 7 is lost: 8 is a gap, nothing is delivered past it, the owner is asked again.
        assert_eq!(fanout(&mut hub, &[8], now), Vec::<u64>::new());
        let owner = view(&["a", "b", "c"], 1, 1).owner(&room()).unwrap().clone();
        assert_eq!(subscriptions(&hub.take_effects()), vec![(owner, 6)]);
        // The owner's re-send fills it.
        assert_eq!(fanout(&mut hub, &[7, 8], now), vec![7, 8]);
    }

    #[test]
    fn a_join_answered_below_what_the_node_delivered_catches_up_before_going_live() {
        let (mut hub, now) = joined_hub(10);
        assert_eq!(fanout(&mut hub, &[11, 12], now), vec![11, 12]);
        // bob joins; the answer comes from an owner that was at 9 (it moved meanwhile).
        let effects = bob_joins_answered_at(&mut hub, 9, now);
        assert!(matches!(effects[0], HubEffect::Reply { session: 2, .. }));
        let catch_up = effects
            .iter()
            .find_map(|e| match e {
                HubEffect::Request {
                    req,
                    message:
                        PeerMessage::Rooms(ToRooms::Room {
                            message:
                                ToRoom::Request {
                                    op: RoomOp::Join { since, .. },
                                    ..
                                },
                            ..
                        }),
                    ..
                } => Some((*req, *since)),
                _ => None,
            })
            .expect("an internal join");
        assert_eq!(catch_up.1, Some(9));
        // Meanwhile live messages go to alice only.
        let delivery = hub
            .on_peer(
                ToHub::Fanout {
                    room: room(),
                    entries: vec![entry(13)],
                },
                now,
            )
            .unwrap();
        assert_eq!(
            delivery.recipients().map(|(s, _)| s).collect::<Vec<_>>(),
            vec![1]
        );
        // The catch-up brings bob 10..13, then he is live after 13.
        let joined = Reply::Joined {
            room: room(),
            seq: 13,
            replay: (10..=13).map(entry).collect(),
        };
        hub.on_peer(
            ToHub::Reply {
                req: catch_up.0,
                reply: joined,
            },
            now,
        );
        let effects = hub.take_effects();
        assert!(matches!(
            &effects[..],
            [HubEffect::CatchUp { session: 2, entries, .. }] if entries.len() == 4
        ));
        let delivery = hub
            .on_peer(
                ToHub::Fanout {
                    room: room(),
                    entries: vec![entry(14)],
                },
                now,
            )
            .unwrap();
        let mut recipients: Vec<(SessionId, u64)> = delivery.recipients().collect();
        recipients.sort_unstable();
        assert_eq!(recipients, vec![(1, 10), (2, 13)]);
    }

    #[test]
    fn a_subscription_answered_from_the_horizon_moves_the_cursor_past_what_retention_dropped() {
        let (mut hub, now) = joined_hub(8);
        // bob joined later, at 20, while the room delivered nothing here (the cursor stays 8).
        let effects = bob_joins_answered_at(&mut hub, 20, now);
        let owner = view(&["a", "b", "c"], 1, 1).owner(&room()).unwrap().clone();
        assert_eq!(subscriptions(&effects), vec![(owner, 8)]);
        // Retention dropped 9..=29 meanwhile: what the owner re-sends starts at 30, a gap.
        assert_eq!(fanout(&mut hub, &[30, 31], now), Vec::<u64>::new());
        // The owner said so first, in the answer to the subscription: both sessions had not
        // received everything before 30, so both are told, and they go on from 30.
        hub.on_peer(
            ToHub::Horizon {
                room: room(),
                horizon: 30,
            },
            now,
        );
        assert!(matches!(
            &hub.take_effects()[..],
            [HubEffect::Horizon { horizon: 30, sessions, .. }] if sessions == &[1, 2]
        ));
        assert_eq!(fanout(&mut hub, &[30, 31], now), vec![30, 31]);
        assert!(
            subscriptions(&hub.take_effects()).is_empty(),
            "no more gap, no more subscription"
        );
        // A late or repeated horizon at or below the cursor changes nothing.
        for horizon in [30, 12] {
            hub.on_peer(
                ToHub::Horizon {
                    room: room(),
                    horizon,
                },
                now,
            );
            assert!(hub.take_effects().is_empty());
        }
        assert_eq!(fanout(&mut hub, &[32], now), vec![32]);
    }

    #[test]
    fn a_node_far_behind_subscribes_again_from_where_each_part_of_the_resend_left_it() {
        let (mut hub, now) = joined_hub(8);
        let owner = view(&["a", "b", "c"], 1, 1).owner(&room()).unwrap().clone();
        // A gap: the hub subscribes with its cursor.
        assert_eq!(fanout(&mut hub, &[500], now), Vec::<u64>::new());
        assert_eq!(subscriptions(&hub.take_effects()), vec![(owner.clone(), 8)]);
        // The owner's answer holds only the oldest part, then says there is more.
        assert_eq!(fanout(&mut hub, &[9, 10, 11], now), vec![9, 10, 11]);
        hub.on_peer(ToHub::Behind { room: room() }, now);
        let effects = hub.take_effects();
        assert!(
            matches!(effects.as_slice(), [HubEffect::Behind { room: r }] if *r == room()),
            "{effects:?}"
        );
        // Live messages past the gap wait while the connections take in the part.
        assert_eq!(fanout(&mut hub, &[500], now), Vec::<u64>::new());
        assert!(subscriptions(&hub.take_effects()).is_empty());
        hub.continue_catch_up(&room());
        assert_eq!(subscriptions(&hub.take_effects()), vec![(owner, 11)]);
        // Live messages past the gap wait; the next part goes on contiguously.
        assert_eq!(fanout(&mut hub, &[501], now), Vec::<u64>::new());
        assert_eq!(fanout(&mut hub, &[12, 13], now), vec![12, 13]);
    }

    #[test]
    fn a_catch_up_answered_below_the_horizon_tells_the_session_before_its_messages() {
        let (mut hub, now) = joined_hub(10);
        assert_eq!(fanout(&mut hub, &[11, 12], now), vec![11, 12]);
        // bob's join is answered at 5 by an owner that was behind: he catches up since 5, and
        // the room dropped everything below 9 meanwhile.
        let catch_up = bob_joins_answered_at(&mut hub, 5, now)
            .iter()
            .find_map(|e| match e {
                HubEffect::Request { req, .. } => Some(*req),
                _ => None,
            })
            .expect("an internal join");
        let joined = Reply::JoinedBelowHorizon {
            room: room(),
            seq: 12,
            replay: (9..=12).map(entry).collect(),
            horizon: 9,
        };
        hub.on_peer(
            ToHub::Reply {
                req: catch_up,
                reply: joined,
            },
            now,
        );
        assert!(matches!(
            &hub.take_effects()[..],
            [
                HubEffect::Horizon { horizon: 9, sessions, .. },
                HubEffect::CatchUp { session: 2, entries, .. },
            ] if sessions == &[2] && entries.len() == 4
        ));
    }

    #[test]
    fn a_new_owner_or_a_new_session_to_it_gets_a_subscription_with_the_cursor() {
        let (mut hub, now) = joined_hub(3);
        let owner = view(&["a", "b", "c"], 1, 1).owner(&room()).unwrap().clone();
        assert_eq!(fanout(&mut hub, &[4], now), vec![4]);
        // Same owner, same session: nothing.
        hub.on_view(view(&["a", "b", "c"], 1, 2));
        assert!(subscriptions(&hub.take_effects()).is_empty());
        // The session to the owner was replaced: what it sent meanwhile may be lost.
        hub.on_view(view(&["a", "b", "c"], 2, 3));
        assert_eq!(subscriptions(&hub.take_effects()), vec![(owner.clone(), 4)]);
        // The owner goes down: its successor gets the subscription.
        let others: Vec<&str> = ["a", "b", "c"]
            .into_iter()
            .filter(|n| *n != owner.as_str())
            .collect();
        let without = view(&others, 2, 4);
        let successor = without.owner(&room()).unwrap().clone();
        hub.on_view(without);
        assert_eq!(subscriptions(&hub.take_effects()), vec![(successor, 4)]);
    }

    #[test]
    fn requests_to_a_node_that_went_down_or_could_not_be_reached_fail_at_once() {
        let (mut hub, now) = joined_hub(0);
        let op = RoomOp::GetMembers;
        hub.request(1, None, HubRequest::Room { room: room(), op }, now);
        let (req, target, _) = requests(&mut hub).remove(0);
        let others: Vec<&str> = ["a", "b", "c"]
            .into_iter()
            .filter(|n| *n != target.as_str())
            .collect();
        hub.on_view(view(&others, 1, 2));
        let failed = hub.take_effects().into_iter().any(|e| {
            matches!(
                e,
                HubEffect::Reply {
                    session: 1,
                    reply: Reply::Failed {
                        code: ErrorCode::Unavailable,
                        ..
                    },
                    ..
                }
            )
        });
        assert!(failed);
        // A reply that comes later anyway is dropped.
        hub.on_peer(
            ToHub::Reply {
                req,
                reply: Reply::Members {
                    room: room(),
                    users: Vec::new(),
                },
            },
            now,
        );
        assert!(hub.take_effects().is_empty());
        // A request the shell could not hand over fails too.
        hub.request(
            1,
            None,
            HubRequest::Room {
                room: room(),
                op: RoomOp::GetMembers,
            },
            now,
        );
        let (req, _, _) = requests(&mut hub).remove(0);
        hub.request_failed(req);
        assert!(matches!(
            hub.take_effects()[..],
            [HubEffect::Reply {
                session: 1,
                reply: Reply::Failed { .. },
                ..
            }]
        ));
    }

    #[test]
    fn a_send_to_a_room_not_joined_is_refused_here() {
        let now = Instant::now();
        let mut hub = HubCore::new(
            node("a"),
            view(&["a", "b", "c"], 1, 1),
            Duration::from_secs(5),
            1,
        );
        hub.register(1, user("alice"));
        hub.take_effects();
        let op = RoomOp::Publish {
            user: user("alice"),
            text: "hi".into(),
            client_id: None,
        };
        hub.request(1, None, HubRequest::Room { room: room(), op }, now);
        assert!(matches!(
            hub.take_effects()[..],
            [HubEffect::Reply {
                reply: Reply::Failed {
                    code: ErrorCode::NotJoined,
                    ..
                },
                ..
            }]
        ));
    }
}
