//! The Hub actor: where this node's connections meet the cluster. A thin shell around
//! [`HubCore`], which keeps the books (sessions, the rooms they joined, pending requests, each
//! room's cursor) and decides what goes where.
//!
//! The shell owns each connection's [`Outbox`] and renders frames: a room's message is rendered
//! once and the same bytes are queued to every session that receives it; replies carry the
//! request's `ref`. Requests go out through [`Net`] to the room's owner (or a user's home, for
//! `direct`); a request that cannot be handed over fails at once, one not answered in time gets
//! `unavailable` (the core's deadlines, checked every [`TICK`]).
//!
//! Fan-out: the owner of a room sends each message once to every node with members; the hub
//! delivers a room's messages strictly in seq order with no gaps, also across moves of the room
//! ([`core`] explains how).

pub mod core;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chat_protocol::client::{ErrorFrame, MessageView, Ref, ServerFrame};
use chat_protocol::peer::{CATCH_UP_BYTES, Entry, Reply, SessionId, ToHub};
use chat_protocol::{RoomId, UserName};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use ractor_cluster::RactorMessage;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::actors::{Tasks, forward};
use crate::cluster::Views;
use crate::cluster::view::View;
use crate::gateway::outbox::{Closing, Deferred, Outbox};
use crate::net::Net;
pub use core::HubRequest;
use core::{Delivery, HubCore, HubEffect};

/// How often pending requests are checked against their deadline.
const TICK: Duration = Duration::from_millis(250);
/// How often a room this node is far behind checks whether its connections took in the last
/// part of the catch-up.
const CATCH_UP_POLL: Duration = Duration::from_millis(10);
/// The longest a catch-up waits for a connection that does not read: past it the next part
/// goes anyway, and a connection whose queue it overflows is cut off as too slow.
const CATCH_UP_PATIENCE: Duration = Duration::from_secs(5);

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
    /// Rooms one connection may have joined at once.
    pub max_rooms_per_connection: usize,
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
    /// Checks the rooms whose catch-up waits for its connections' queues.
    CatchUpDue,
}

/// The hub's state.
pub struct HubState {
    core: HubCore,
    net: Net,
    outboxes: HashMap<SessionId, Outbox>,
    /// Rooms this node is far behind, waiting since when for their connections' queues to
    /// have room for the next part of the catch-up.
    behind: HashMap<RoomId, Instant>,
    /// A [`HubMessage::CatchUpDue`] is on its way.
    catch_up_polling: bool,
    myself: ActorRef<HubMessage>,
    _tasks: Tasks,
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
        let view = args.views.borrow().clone();
        let core = HubCore::new(
            args.net.me().clone(),
            view,
            args.request_timeout,
            rand::random(),
        )
        .with_max_rooms(args.max_rooms_per_connection);
        let mut state = HubState {
            core,
            net: args.net,
            outboxes: HashMap::new(),
            behind: HashMap::new(),
            catch_up_polling: false,
            myself: myself.clone(),
            _tasks: tasks,
        };
        state.carry_out();
        Ok(state)
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
        let now = Instant::now();
        match message {
            HubMessage::Register {
                session,
                user,
                outbox,
            } => {
                state.outboxes.insert(session, outbox);
                state.core.register(session, user);
            }
            HubMessage::Unregister { session } => {
                state.outboxes.remove(&session);
                state.core.unregister(session);
            }
            HubMessage::Request {
                session,
                reference,
                request,
                received,
            } => state.core.request(session, reference, request, received),
            HubMessage::Peer(message) => {
                if let Some(delivery) = state.core.on_peer(message, now) {
                    deliver(&state.outboxes, &delivery);
                }
            }
            HubMessage::ViewChanged(view) => state.core.on_view(view),
            HubMessage::CloseAll(why) => state.close_all(why),
            HubMessage::Tick => state.core.on_tick(now),
            HubMessage::CatchUpDue => {
                state.catch_up_polling = false;
                state.catch_up(now);
            }
        }
        state.carry_out();
        Ok(())
    }
}

/// Queues a room's fresh messages to the sessions that receive them, each rendered once.
fn deliver(outboxes: &HashMap<SessionId, Outbox>, delivery: &Delivery<'_>) {
    let room = delivery.room;
    match delivery.entries.as_slice() {
        [] => {}
        [entry] => {
            // The common case: one message, one shared frame, no allocation per session.
            let frame = Utf8Bytes::from(message_view(room, entry).to_json());
            for (session, after) in delivery.recipients() {
                if entry.seq > after
                    && let Some(outbox) = outboxes.get(&session)
                {
                    outbox.push(frame.clone());
                }
            }
        }
        entries => {
            let frames: Vec<(u64, Utf8Bytes)> = entries
                .iter()
                .map(|e| (e.seq, Utf8Bytes::from(message_view(room, e).to_json())))
                .collect();
            for (session, after) in delivery.recipients() {
                let Some(outbox) = outboxes.get(&session) else {
                    continue;
                };
                let batch: Vec<Utf8Bytes> = frames
                    .iter()
                    .filter(|(seq, _)| *seq > after)
                    .map(|(_, frame)| frame.clone())
                    .collect();
                // A catch-up burst takes one slot of the client's queue.
                outbox.push_batch(batch);
            }
        }
    }
}

impl HubState {
    fn carry_out(&mut self) {
        // Carrying out an effect can make the core decide more (a request that could not be
        // sent fails): drain until nothing is left.
        loop {
            let effects = self.core.take_effects();
            if effects.is_empty() {
                return;
            }
            for effect in effects {
                self.carry_out_one(effect);
            }
        }
    }

    fn carry_out_one(&mut self, effect: HubEffect) {
        match effect {
            HubEffect::Peer(node, message) => {
                let _ = self.net.send(&node, message);
            }
            HubEffect::Request {
                req,
                target,
                message,
            } => {
                if self.net.send(&target, message).is_err() {
                    self.core.request_failed(req);
                }
            }
            HubEffect::Reply {
                session,
                reference,
                reply,
            } => self.reply(session, reference.as_deref(), reply),
            HubEffect::CatchUp {
                session,
                room,
                entries,
            } => {
                if let Some(outbox) = self.outboxes.get(&session) {
                    let frames = entries
                        .iter()
                        .map(|e| Utf8Bytes::from(message_view(&room, e).to_json()))
                        .collect();
                    outbox.push_batch(frames);
                }
            }
            HubEffect::Horizon {
                room,
                horizon,
                sessions,
            } => {
                let frame = Utf8Bytes::from(
                    ServerFrame::Horizon {
                        room: room.as_str(),
                        horizon,
                    }
                    .to_json(),
                );
                self.push_all(&sessions, &frame);
            }
            HubEffect::Behind { room } => {
                let now = Instant::now();
                self.behind.insert(room, now);
                self.catch_up(now);
            }
            HubEffect::Presence {
                room,
                user,
                event,
                sessions,
            } => {
                let frame = Utf8Bytes::from(
                    ServerFrame::Presence {
                        room: room.as_str(),
                        user: user.as_str(),
                        event,
                    }
                    .to_json(),
                );
                self.push_all(&sessions, &frame);
            }
            HubEffect::Direct {
                from,
                text,
                ts,
                sessions,
            } => {
                let frame = Utf8Bytes::from(
                    ServerFrame::Direct {
                        from: from.as_str(),
                        text: &text,
                        ts,
                    }
                    .to_json(),
                );
                self.push_all(&sessions, &frame);
            }
        }
    }

    /// Asks for the next part of each catch-up whose connections have room for it (or that
    /// waited past [`CATCH_UP_PATIENCE`]); checks again soon while any still waits.
    fn catch_up(&mut self, now: Instant) {
        let ready: Vec<RoomId> = self
            .behind
            .iter()
            .filter(|(room, since)| {
                now.duration_since(**since) >= CATCH_UP_PATIENCE
                    || self.core.room_sessions(room).all(|session| {
                        self.outboxes
                            .get(&session)
                            .is_none_or(|outbox| outbox.has_room_for(CATCH_UP_BYTES))
                    })
            })
            .map(|(room, _)| room.clone())
            .collect();
        for room in ready {
            self.behind.remove(&room);
            self.core.continue_catch_up(&room);
        }
        if !self.behind.is_empty() && !self.catch_up_polling {
            self.catch_up_polling = true;
            self.myself
                .send_after(CATCH_UP_POLL, || HubMessage::CatchUpDue);
        }
    }

    fn push_all(&self, sessions: &[SessionId], frame: &Utf8Bytes) {
        for session in sessions {
            if let Some(outbox) = self.outboxes.get(session) {
                outbox.push(frame.clone());
            }
        }
    }

    fn reply(
        &self,
        session: SessionId,
        reference: Option<&serde_json::value::RawValue>,
        reply: Reply,
    ) {
        let Some(outbox) = self.outboxes.get(&session) else {
            return;
        };
        if outbox.is_closing() {
            // Cut off (too slow, or gone): rendering a long history for it would be waste.
            return;
        }
        let (reply, horizon) = reply.split_horizon();
        let frame = match reply {
            Reply::Joined { room, seq, replay } => {
                // The reply and its replay take one slot of the client's queue, rendered by
                // the connection's task.
                let reference = reference.map(ToOwned::to_owned);
                outbox.push_deferred(Deferred::new(held_bytes(&replay), move || {
                    let frame = ServerFrame::Joined {
                        reference: reference.as_deref(),
                        room: room.as_str(),
                        seq,
                        horizon,
                    }
                    .to_json();
                    let mut frames = Vec::with_capacity(replay.len() + 1);
                    frames.push(Utf8Bytes::from(frame));
                    frames.extend(
                        replay
                            .iter()
                            .map(|entry| Utf8Bytes::from(message_view(&room, entry).to_json())),
                    );
                    frames
                }));
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
                // A page may be a megabyte of JSON: the connection's task renders it.
                let reference = reference.map(ToOwned::to_owned);
                outbox.push_deferred(Deferred::new(held_bytes(&messages), move || {
                    let views: Vec<MessageView<'_>> =
                        messages.iter().map(|e| message_view(&room, e)).collect();
                    let frame = ServerFrame::History {
                        reference: reference.as_deref(),
                        room: room.as_str(),
                        messages: &views,
                        horizon,
                    }
                    .to_json();
                    vec![Utf8Bytes::from(frame)]
                }));
                return;
            }
            // Split into the plain replies and their horizon above.
            Reply::JoinedBelowHorizon { .. } | Reply::HistoryBelowHorizon { .. } => return,
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
                self.net.metrics().error(code);
                ServerFrame::Error(ErrorFrame {
                    reference,
                    code,
                    message: &message,
                })
                .to_json()
            }
        };
        outbox.push_text(frame);
    }

    fn close_all(&mut self, why: Closing) {
        for outbox in self.outboxes.values() {
            outbox.close(why);
        }
    }
}

/// The bytes entries hold, about: what queuing them unrendered costs.
fn held_bytes(entries: &[Entry]) -> usize {
    entries
        .iter()
        .map(|e| e.text.len() + e.from.as_str().len() + 64)
        .sum()
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
