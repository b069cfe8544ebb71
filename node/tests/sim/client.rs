//! Simulated chat clients: they connect to any node, join their rooms (with `since` after a
//! reconnection, for an exact resume), send messages with ids and retry them after `unavailable`
//! or a lost connection, read history, and move to another node when theirs stops answering.
//! Every frame they get goes through the checker; their streams are checked for order here.

use std::collections::{BTreeMap, VecDeque};

use chat_node::hub::HubRequest;
use chat_protocol::peer::{Entry, Reply, RoomOp, SessionId};
use chat_protocol::{RoomId, UserName};

use crate::checker::Checker;
use crate::rng::Rng;

/// Microseconds of simulated time.
pub type Time = u64;

/// A request is given up after this long without an answer (the connection is considered dead).
const REQUEST_TIMEOUT: Time = 6_000_000;
/// Requests a client keeps in flight at most.
const WINDOW: usize = 4;

/// What the node sends a client.
#[derive(Debug)]
pub enum ToClient {
    /// The answer to request `reference`.
    Reply {
        reference: Option<u64>,
        reply: Reply,
    },
    /// Messages of a room (live, or the catch-up of a join).
    Entries { room: RoomId, entries: Vec<Entry> },
    /// Messages of a joined room this connection had not received were dropped by retention:
    /// the next ones start at `horizon`.
    Horizon { room: RoomId, horizon: u64 },
    /// The connection closed (the node went away, or refused it).
    Closed,
}

/// What a client asks the world to do.
#[derive(Debug)]
pub enum Action {
    /// Open a connection to a node.
    Connect(usize),
    /// Send a request on the open connection.
    Request(u64, HubRequest),
    /// Close the connection (it stopped answering).
    Disconnect,
}

#[derive(Debug, Clone)]
pub struct Outgoing {
    pub room: RoomId,
    pub id: String,
    pub text: String,
}

#[derive(Debug)]
enum Asked {
    Join(RoomId, Option<u64>),
    Send(Outgoing),
    History(RoomId),
    Read(RoomId),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stream {
    /// Not joined on this connection.
    Idle,
    Joining,
    /// Joined; `pos` is the last seq received; seqs up to `stale` may come again (a join was
    /// answered by an owner behind what this client had seen).
    Live {
        pos: u64,
        stale: u64,
    },
}

#[derive(Debug)]
pub struct Conn {
    pub id: u64,
    pub node: usize,
    pub session: SessionId,
}

#[derive(Debug)]
pub struct Client {
    pub index: usize,
    pub user: UserName,
    pub rooms: Vec<RoomId>,
    pub conn: Option<Conn>,
    streams: BTreeMap<RoomId, Stream>,
    /// The highest seq this client received per room, across connections.
    pub seen: BTreeMap<RoomId, u64>,
    pub outbox: VecDeque<Outgoing>,
    inflight: BTreeMap<u64, (Asked, Time)>,
    next_ref: u64,
    next_msg: u64,
    retry_at: Time,
    /// Whether it makes up new messages (scripted clients do not).
    pub chatty: bool,
    /// A paused client sends nothing (scripted scenarios).
    paused: bool,
    /// The node it always connects to, if any (scripted scenarios).
    pub home: Option<usize>,
    /// Full reads asked for (rooms), answered into the checker.
    pub reads: VecDeque<RoomId>,
    pub reads_done: usize,
    pub stats: Stats,
}

#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    pub sent: u64,
    pub acked: u64,
    pub unavailable: u64,
    pub reconnects: u64,
    pub stale_joins: u64,
}

impl Client {
    pub fn new(index: usize, rooms: Vec<RoomId>, chatty: bool) -> Client {
        Client {
            index,
            user: UserName::new(&format!("u{index}")).expect("valid user"),
            rooms,
            conn: None,
            streams: BTreeMap::new(),
            seen: BTreeMap::new(),
            outbox: VecDeque::new(),
            inflight: BTreeMap::new(),
            next_ref: 1,
            next_msg: 1,
            retry_at: 0,
            chatty,
            paused: false,
            home: None,
            reads: VecDeque::new(),
            reads_done: 0,
            stats: Stats::default(),
        }
    }

    /// Queues a message (a scripted send).
    pub fn say(&mut self, room: &RoomId, id: &str, text: &str) {
        self.outbox.push_back(Outgoing {
            room: room.clone(),
            id: id.to_owned(),
            text: text.to_owned(),
        });
    }

    /// Stops (or resumes) sending anything.
    pub fn pause(&mut self, paused: bool) {
        self.paused = paused;
    }

    /// Whether the client is connected, joined everywhere, with nothing left to send.
    pub fn settled(&self) -> bool {
        self.conn.is_some()
            && self.outbox.is_empty()
            && self.inflight.is_empty()
            && self
                .rooms
                .iter()
                .all(|r| matches!(self.streams.get(r), Some(Stream::Live { .. })))
    }

    /// The last seq received in `room` on the current connection.
    pub fn position(&self, room: &RoomId) -> Option<u64> {
        match self.streams.get(room) {
            Some(Stream::Live { pos, .. }) => Some(*pos),
            _ => None,
        }
    }

    /// The connection opened as session `session` on `node`.
    pub fn connected(&mut self, id: u64, node: usize, session: SessionId) {
        self.conn = Some(Conn { id, node, session });
        self.streams.clear();
    }

    /// Periodic step: connect, join, send, retry, give up on a dead connection.
    pub fn tick(&mut self, now: Time, nodes: usize, rng: &mut Rng) -> Vec<Action> {
        let mut actions = Vec::new();
        if self.paused {
            return actions;
        }
        if self
            .inflight
            .values()
            .any(|(_, at)| now.saturating_sub(*at) > REQUEST_TIMEOUT)
        {
            actions.push(Action::Disconnect);
            self.closed(now);
            return actions;
        }
        let Some(_) = &self.conn else {
            if now >= self.retry_at {
                self.stats.reconnects += 1;
                self.retry_at = now + 200_000;
                actions.push(Action::Connect(rng.pick(nodes)));
            }
            return actions;
        };
        for room in self.rooms.clone() {
            if self.streams.get(&room).is_none_or(|s| *s == Stream::Idle) && now >= self.retry_at {
                let since = self.seen.get(&room).copied();
                self.streams.insert(room.clone(), Stream::Joining);
                actions.push(self.ask(
                    Asked::Join(room.clone(), since),
                    HubRequest::Room {
                        room: room.clone(),
                        op: RoomOp::Join {
                            session: 0,
                            user: self.user.clone(),
                            since,
                        },
                    },
                    now,
                ));
            }
        }
        if self.chatty && rng.chance(0.35) {
            let room = self.rooms[rng.pick(self.rooms.len())].clone();
            let n = self.next_msg;
            self.next_msg += 1;
            let text = format!("{}-m{n}", self.user);
            self.outbox.push_back(Outgoing {
                room,
                id: format!("c{n}"),
                text,
            });
        }
        if self.chatty && rng.chance(0.02) {
            let room = self.rooms[rng.pick(self.rooms.len())].clone();
            actions.push(self.ask(
                Asked::History(room.clone()),
                HubRequest::Room {
                    room,
                    op: RoomOp::GetHistory {
                        before: None,
                        limit: 50,
                    },
                },
                now,
            ));
        }
        if let Some(room) = self.reads.pop_front() {
            actions.push(self.ask(
                Asked::Read(room.clone()),
                HubRequest::Room {
                    room,
                    op: RoomOp::Join {
                        session: 0,
                        user: self.user.clone(),
                        since: Some(0),
                    },
                },
                now,
            ));
        }
        if now >= self.retry_at {
            let sending = self
                .inflight
                .values()
                .filter(|(a, _)| matches!(a, Asked::Send(_)))
                .count();
            for _ in sending..WINDOW {
                let Some(next) = self.outbox.front() else {
                    break;
                };
                if self
                    .streams
                    .get(&next.room)
                    .is_none_or(|s| *s == Stream::Idle)
                {
                    break;
                }
                let Some(out) = self.outbox.pop_front() else {
                    break;
                };
                self.stats.sent += 1;
                let request = HubRequest::Room {
                    room: out.room.clone(),
                    op: RoomOp::Publish {
                        user: self.user.clone(),
                        text: out.text.clone(),
                        client_id: Some(out.id.clone()),
                    },
                };
                actions.push(self.ask(Asked::Send(out), request, now));
            }
        }
        actions
    }

    fn ask(&mut self, asked: Asked, mut request: HubRequest, now: Time) -> Action {
        let reference = self.next_ref;
        self.next_ref += 1;
        if let (
            HubRequest::Room {
                op: RoomOp::Join { session, .. },
                ..
            },
            Some(conn),
        ) = (&mut request, &self.conn)
        {
            *session = conn.session;
        }
        self.inflight.insert(reference, (asked, now));
        Action::Request(reference, request)
    }

    /// The connection is gone: sends not acknowledged go back to the outbox, to be retried
    /// with the same ids on the next connection.
    pub fn closed(&mut self, now: Time) {
        self.conn = None;
        self.streams.clear();
        let inflight = std::mem::take(&mut self.inflight);
        for (_, (asked, _)) in inflight.into_iter().rev() {
            match asked {
                Asked::Send(out) => self.outbox.push_front(out),
                Asked::Read(room) => self.reads.push_front(room),
                _ => {}
            }
        }
        self.retry_at = now + 100_000;
    }

    /// A frame from the node.
    pub fn on_event(&mut self, event: ToClient, now: Time, checker: &mut Checker) {
        let who = format!(
            "client u{} on conn {:?}",
            self.index,
            self.conn.as_ref().map(|c| (c.node, c.id))
        );
        match event {
            ToClient::Closed => self.closed(now),
            ToClient::Entries { room, entries } => {
                if !self.rooms.contains(&room) {
                    // A reader: it joined only to read the room once.
                    return;
                }
                for entry in &entries {
                    checker.observe(&room, entry, &format!("{who} live"));
                    self.receive(&room, entry.seq, &who, checker);
                }
            }
            ToClient::Horizon { room, horizon } => {
                if !self.rooms.contains(&room) {
                    return;
                }
                checker.horizon(&room, horizon);
                match self.streams.get_mut(&room) {
                    Some(Stream::Live { pos, .. }) => {
                        *pos = (*pos).max(horizon.saturating_sub(1));
                        let seen = self.seen.entry(room).or_insert(0);
                        *seen = (*seen).max(*pos);
                    }
                    other => checker.violate(format!(
                        "{who}: told {room}'s horizon #{horizon} while not joined ({other:?})"
                    )),
                }
            }
            ToClient::Reply { reference, reply } => {
                let Some((asked, _)) = reference.and_then(|r| self.inflight.remove(&r)) else {
                    return;
                };
                self.reply(asked, reply, now, &who, checker);
            }
        }
    }

    fn receive(&mut self, room: &RoomId, seq: u64, who: &str, checker: &mut Checker) {
        match self.streams.get_mut(room) {
            Some(Stream::Live { pos, stale }) => {
                if seq == *pos + 1 {
                    *pos = seq;
                } else if seq <= *stale {
                    // Seen before this connection's stale join: the client dedupes it.
                } else {
                    checker.violate(format!(
                        "{who}: stream of {room} got #{seq} after #{pos} (gap or repeat)"
                    ));
                    *pos = (*pos).max(seq);
                }
                let seen = self.seen.entry(room.clone()).or_insert(0);
                *seen = (*seen).max(*pos);
            }
            other => checker.violate(format!(
                "{who}: got #{seq} of {room} while not joined ({other:?})"
            )),
        }
    }

    fn reply(&mut self, asked: Asked, reply: Reply, now: Time, who: &str, checker: &mut Checker) {
        // Replies below a room's horizon are checked as the plain ones, from the horizon on.
        let (reply, horizon) = reply.split_horizon();
        let horizon = horizon.unwrap_or(0);
        if let Reply::Joined { room, .. } | Reply::History { room, .. } = &reply {
            checker.horizon(room, horizon);
        }
        match (asked, reply) {
            (Asked::Join(room, since), Reply::Joined { seq, replay, .. }) => {
                for entry in &replay {
                    checker.observe(&room, entry, &format!("{who} replay"));
                }
                let expected_first = since.map_or(seq + 1, |s| s + 1).max(horizon);
                let contiguous = replay
                    .iter()
                    .enumerate()
                    .all(|(i, e)| e.seq == expected_first + i as u64);
                let complete = replay
                    .last()
                    .map_or(since.unwrap_or(seq) >= seq, |e| e.seq == seq);
                if !contiguous || !complete {
                    checker.violate(format!(
                        "{who}: join of {room} since {since:?} answered seq {seq} with replay {:?}",
                        replay.iter().map(|e| e.seq).collect::<Vec<_>>()
                    ));
                }
                let since = since.unwrap_or(0);
                if seq < since {
                    // An owner that had not learned yet that it was replaced: the client keeps
                    // the highest seq it saw, and ignores what it gets again up to there.
                    self.stats.stale_joins += 1;
                }
                self.streams.insert(
                    room.clone(),
                    Stream::Live {
                        pos: seq.max(since),
                        stale: since,
                    },
                );
                let seen = self.seen.entry(room).or_insert(0);
                *seen = (*seen).max(seq);
            }
            (Asked::Join(room, _), Reply::Failed { .. }) => {
                self.stats.unavailable += 1;
                self.streams.insert(room, Stream::Idle);
                self.retry_at = now + 50_000;
            }
            (Asked::Send(out), Reply::Acked { room, seq }) => {
                self.stats.acked += 1;
                if room != out.room {
                    checker.violate(format!("{who}: ack for {room}, sent to {}", out.room));
                }
                checker.ack(
                    &out.room,
                    seq,
                    &self.user,
                    &out.id,
                    &out.text,
                    &format!("{who} ack"),
                );
            }
            (Asked::Send(out), Reply::Failed { .. }) => {
                self.stats.unavailable += 1;
                self.outbox.push_front(out);
                self.retry_at = now + 50_000;
            }
            (Asked::History(room), Reply::History { messages, .. }) => {
                for (i, entry) in messages.iter().enumerate() {
                    checker.observe(&room, entry, &format!("{who} history"));
                    if i > 0 && entry.seq != messages[i - 1].seq + 1 {
                        checker.violate(format!("{who}: history of {room} not contiguous"));
                    }
                }
            }
            (Asked::History(_), Reply::Failed { .. }) => {}
            (Asked::Read(room), Reply::Joined { replay, .. }) => {
                checker.full_read(&room, &replay, horizon, &format!("{who} full read"));
                self.reads_done += 1;
            }
            (Asked::Read(room), Reply::Failed { .. }) => {
                self.reads.push_back(room);
                self.retry_at = now + 50_000;
            }
            (asked, reply) => checker.violate(format!("{who}: {asked:?} answered with {reply:?}")),
        }
    }
}
