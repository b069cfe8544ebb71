//! The Room actor: the owner of one room. It sequences the room's messages, replicates them,
//! fans them out, and keeps the room's members.
//!
//! Lifecycle:
//! 1. **Claim**: on start (and whenever the room's placement changes) it asks every live node to
//!    promise a new epoch and report its copy of the log ([`super::log`] has the rules).
//! 2. **Recover**: it adopts the most up-to-date log, fetching missing entries from its holder.
//! 3. **Active**: `send`s get the next seq, are appended to every node of the placement (owner
//!    first, then replicas) and acknowledged once all of them stored it; only then are they fanned
//!    out, once per subscriber node. A node that promised a newer epoch refuses the appends of
//!    this one, which fences a stale owner: it steps down instead of diverging.
//! 4. **Stop**: when idle with no members, when the room moves to another node, or when fenced.
//!
//! Requests that arrive before the room is active wait in a bounded queue with a deadline, then
//! get `unavailable`. Publishes are batched: each `send` is sequenced at once, and the entries
//! sequenced before a `Flush` message comes round go out to each node in one `Append`.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chat_protocol::peer::SessionId;
use chat_protocol::peer::{
    Entry, Epoch, LogState, Origin, Placement, Reply, RoomOp, ToHub, ToKeeper, ToRoom,
};
use chat_protocol::{ErrorCode, NodeName, PresenceEvent, RoomId, UserName};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use ractor_cluster::RactorMessage;

use crate::clock::now_ms;
use crate::cluster::view::View;
use crate::net::Net;
use crate::rooms::log;
use crate::rooms::members::Members;
use crate::store::Store;

/// Committed entries kept in memory for replays and history, beyond the uncommitted ones.
const TAIL_KEEP: usize = 256;
/// Requests queued while the room is not active, at most.
const QUEUE_MAX: usize = 4096;
/// Entries per `Append` or `Fanout` message, at most.
const CHUNK_ENTRIES: usize = 512;
/// Text bytes per replay, catch-up or append chunk, about.
const CHUNK_BYTES: usize = 1 << 20;
/// Text bytes per join replay, about (the replay travels in one message).
const REPLAY_BYTES: usize = 4 << 20;
/// Entries sent to a node and not yet acknowledged, at most (the replication window).
const WINDOW_ENTRIES: u64 = 8192;
/// A claim or recovery not finished in this time starts over with a higher epoch.
const CLAIM_TIMEOUT: Duration = Duration::from_millis(1500);
/// Appends not acknowledged in this time are sent again.
const RESEND_AFTER: Duration = Duration::from_millis(1000);
/// Recent client message ids remembered per room for deduplicating retried sends.
const DEDUPE_KEEP: usize = 4096;
/// How often the room does its housekeeping.
pub const TICK: Duration = Duration::from_millis(200);

/// Settings a room needs.
#[derive(Debug, Clone)]
pub struct RoomConfig {
    /// Copies of the log, owner included.
    pub replication_factor: usize,
    /// Messages replayed by `join` with `since`, at most.
    pub replay_cap: usize,
    /// Stop after this long idle with no members.
    pub idle: Duration,
    /// How long a request may wait for the room to become active.
    pub queue_timeout: Duration,
}

/// The Room actor.
#[derive(Debug)]
pub struct Room;

/// What a room starts with.
#[derive(Debug)]
pub struct RoomArgs {
    /// The room.
    pub id: RoomId,
    /// For messaging.
    pub net: Net,
    /// The view when the room starts (the host forwards later ones).
    pub view: Arc<View>,
    /// For reading older entries.
    pub store: Store,
    /// Settings.
    pub config: RoomConfig,
}

/// Messages of a room (all arrive through the room host).
#[derive(Debug, RactorMessage)]
pub enum RoomMessage {
    /// A message from a node (this one included), and when it reached this node.
    Peer(ToRoom, Instant),
    /// The view changed.
    ViewChanged(Arc<View>),
    /// Every connection of this node is gone (its hub restarted).
    NodeReset(NodeName),
    /// Sends sequenced entries to the placement.
    Flush,
    /// Housekeeping: deadlines, retries, idleness.
    Tick,
    /// Panics inside the handler: lets tests prove that a failing room is contained.
    Crash,
}

enum Phase {
    /// Waiting for promises.
    Claiming {
        answers: Vec<(NodeName, LogState)>,
        waiting: HashSet<NodeName>,
        started: Instant,
    },
    /// Fetching the entries the best log has and this node lacks.
    Recovering {
        from: NodeName,
        target: u64,
        answers: Vec<(NodeName, LogState)>,
        started: Instant,
    },
    /// Serving.
    Active,
    /// A claim cannot proceed now (no quorum, a placement out of reach, a lost race).
    Blocked { until: Instant },
}

/// A node's subscription that arrived before the room was active: node, cursor, sessions.
type Subscription = (NodeName, u64, Vec<(SessionId, UserName)>);

struct Waiting {
    origin: Origin,
    op: RoomOp,
    received: Instant,
}

struct Inflight {
    seq: u64,
    /// The epoch the entry was written under: with `seq`, it identifies the entry.
    epoch: Epoch,
    origin: Origin,
    received: Instant,
}

/// A room's state.
pub struct RoomState {
    id: RoomId,
    net: Net,
    store: Store,
    config: RoomConfig,
    view: Arc<View>,
    phase: Phase,
    /// The epoch claimed (or being claimed).
    epoch: Epoch,
    /// The highest epoch any node reported: the next claim goes above it.
    highest_epoch: Epoch,
    placement: Placement,
    /// This node's copy of the log as the room wrote it (includes writes not yet durable).
    log: LogState,
    commit: u64,
    /// Per placement node: the highest seq it stored, and the highest sent to it.
    acked: HashMap<NodeName, u64>,
    sent: HashMap<NodeName, u64>,
    last_progress: Instant,
    /// Recent entries: every uncommitted one and the last `TAIL_KEEP` committed ones.
    tail: VecDeque<Entry>,
    flush_scheduled: bool,
    inflight: VecDeque<Inflight>,
    queue: VecDeque<Waiting>,
    subscriptions: VecDeque<Subscription>,
    members: Members,
    dedupe: HashMap<(UserName, String), u64>,
    dedupe_order: VecDeque<(UserName, String)>,
    last_ts: u64,
    last_activity: Instant,
    span: tracing::Span,
}

impl Actor for Room {
    type Msg = RoomMessage;
    type State = RoomState;
    type Arguments = RoomArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<RoomMessage>,
        args: RoomArgs,
    ) -> Result<RoomState, ActorProcessingErr> {
        let view = args.view;
        let me = args.net.me().clone();
        args.net.metrics().rooms_hosted.inc();
        // Start the claim above what this node already promised (a hint: the keeper is the
        // authority and refuses a stale epoch anyway).
        let promised = args.store.log_state(&args.id).map_or(0, |s| s.promised);
        let span = tracing::info_span!("room", room = %args.id);
        myself.send_interval(TICK, || RoomMessage::Tick);
        let mut state = RoomState {
            placement: Placement {
                epoch: 0,
                nodes: vec![me],
            },
            id: args.id,
            net: args.net,
            store: args.store,
            config: args.config,
            view,
            phase: Phase::Blocked {
                until: Instant::now(),
            },
            epoch: 0,
            highest_epoch: promised,
            log: LogState::default(),
            commit: 0,
            acked: HashMap::new(),
            sent: HashMap::new(),
            last_progress: Instant::now(),
            tail: VecDeque::new(),
            flush_scheduled: false,
            inflight: VecDeque::new(),
            queue: VecDeque::new(),
            subscriptions: VecDeque::new(),
            members: Members::default(),
            dedupe: HashMap::new(),
            dedupe_order: VecDeque::new(),
            last_ts: 0,
            last_activity: Instant::now(),
            span,
        };
        state.start_claim(&myself);
        Ok(state)
    }

    async fn handle(
        &self,
        myself: ActorRef<RoomMessage>,
        message: RoomMessage,
        state: &mut RoomState,
    ) -> Result<(), ActorProcessingErr> {
        // Every log line of the room carries its id (the handler never awaits).
        let span = state.span.clone();
        let _entered = span.enter();
        match message {
            RoomMessage::Peer(
                ToRoom::Request {
                    origin,
                    op,
                    hops: _,
                },
                received,
            ) => {
                state.last_activity = Instant::now();
                if matches!(state.phase, Phase::Active) {
                    state.serve(&myself, origin, op, received);
                } else if !state.view.quorum {
                    // Waiting would not help: no claim can succeed without a majority.
                    state.fail(
                        &origin,
                        ErrorCode::Unavailable,
                        "this node is cut off from the majority of the cluster; retry",
                    );
                } else if state.queue.len() >= QUEUE_MAX {
                    state.fail(
                        &origin,
                        ErrorCode::Unavailable,
                        "room is busy moving; retry",
                    );
                } else {
                    state.queue.push_back(Waiting {
                        origin,
                        op,
                        received,
                    });
                }
            }
            RoomMessage::Peer(
                ToRoom::Subscribe {
                    node,
                    cursor,
                    sessions,
                },
                _,
            ) => {
                state.last_activity = Instant::now();
                if matches!(state.phase, Phase::Active) {
                    state.subscribe(node, cursor, sessions);
                } else {
                    state.subscriptions.push_back((node, cursor, sessions));
                }
            }
            RoomMessage::Peer(
                ToRoom::Promised {
                    epoch,
                    granted,
                    node,
                    state: log_state,
                },
                _,
            ) => state.on_promised(&myself, epoch, granted, node, log_state),
            RoomMessage::Peer(
                ToRoom::Appended {
                    epoch,
                    node,
                    ok,
                    promised,
                    last_seq,
                },
                _,
            ) => state.on_appended(&myself, epoch, node, ok, promised, last_seq),
            RoomMessage::Peer(ToRoom::Fetched { node, entries }, _) => {
                state.on_fetched(&myself, node, entries)
            }
            RoomMessage::ViewChanged(view) => state.on_view(&myself, view),
            RoomMessage::NodeReset(node) => {
                for user in state.members.drop_node(&node) {
                    state.presence(&user, PresenceEvent::Leave);
                }
            }
            RoomMessage::Flush => {
                state.flush_scheduled = false;
                state.pump();
            }
            RoomMessage::Tick => state.on_tick(&myself),
            RoomMessage::Crash => panic!("injected failure in room {}", state.id),
        }
        Ok(())
    }
}

/// Cleanup when the room stops, however it stops (ractor skips `post_stop` after a panic): the
/// requests it holds get `unavailable` at once instead of waiting for their timeout.
impl Drop for RoomState {
    fn drop(&mut self) {
        self.net.metrics().rooms_hosted.dec();
        self.fail_all("the room moved or restarted; retry");
    }
}

impl RoomState {
    fn me(&self) -> &NodeName {
        self.net.me()
    }

    // ---- claiming ----

    fn start_claim(&mut self, myself: &ActorRef<RoomMessage>) {
        if self.view.owner(&self.id) != Some(self.me()) {
            self.step_down(myself, "not the owner in this view");
            return;
        }
        if !self.view.quorum {
            self.phase = Phase::Blocked {
                until: Instant::now() + Duration::from_millis(500),
            };
            return;
        }
        // Entries sequenced but not yet sent to our own copy go there first, so that our own
        // answer to the promise below includes them (the keeper's mailbox keeps the order).
        let me = self.me().clone();
        let own_sent = self.sent.get(&me).copied().unwrap_or(0);
        if self.epoch > 0 && own_sent < self.log.last_seq {
            let entries = self.range(own_sent + 1, self.log.last_seq, usize::MAX);
            let _ = self.net.to_keeper(
                &me,
                ToKeeper::Append {
                    room: self.id.clone(),
                    epoch: self.epoch,
                    placement: self.placement.clone(),
                    after_seq: own_sent,
                    entries,
                },
            );
            self.sent.insert(me, self.log.last_seq);
        }
        self.epoch = self.highest_epoch.max(self.log.promised).max(self.epoch) + 1;
        self.highest_epoch = self.epoch;
        self.placement = Placement {
            epoch: self.epoch,
            nodes: self
                .view
                .placement(&self.id, self.config.replication_factor),
        };
        let waiting: HashSet<NodeName> = self.view.up().cloned().collect();
        for node in &waiting {
            let _ = self.net.to_keeper(
                node,
                ToKeeper::Promise {
                    room: self.id.clone(),
                    epoch: self.epoch,
                    placement: self.placement.clone(),
                },
            );
        }
        tracing::debug!(room = %self.id, epoch = self.epoch, placement = ?self.placement.nodes, "claiming");
        self.phase = Phase::Claiming {
            answers: Vec::new(),
            waiting,
            started: Instant::now(),
        };
    }

    fn on_promised(
        &mut self,
        myself: &ActorRef<RoomMessage>,
        epoch: Epoch,
        granted: bool,
        node: NodeName,
        log_state: LogState,
    ) {
        self.highest_epoch = self.highest_epoch.max(log_state.promised);
        let Phase::Claiming {
            answers, waiting, ..
        } = &mut self.phase
        else {
            return;
        };
        if epoch != self.epoch {
            return;
        }
        if !granted {
            // Another claimer got there first: back off a little, then claim above it.
            crate::metrics::Metrics::count(&self.net.metrics().room_claims, "refused");
            let jitter = Duration::from_millis(20 + rand::random::<u64>() % 80);
            self.phase = Phase::Blocked {
                until: Instant::now() + jitter,
            };
            return;
        }
        waiting.remove(&node);
        if &node == self.net.me() {
            // Our own answer goes first: `log::best` favours the first of equals (no copy).
            answers.insert(0, (node, log_state));
        } else {
            answers.push((node, log_state));
        }
        if waiting.is_empty() {
            let answers = std::mem::take(answers);
            self.finish_claim(myself, answers);
        }
    }

    fn finish_claim(&mut self, myself: &ActorRef<RoomMessage>, answers: Vec<(NodeName, LogState)>) {
        if !log::covers_latest_placement(&answers) {
            tracing::warn!(room = %self.id, "no node of the room's latest placement answered; waiting");
            crate::metrics::Metrics::count(&self.net.metrics().room_claims, "blocked");
            self.phase = Phase::Blocked {
                until: Instant::now() + Duration::from_secs(1),
            };
            return;
        }
        let me = self.me().clone();
        let Some(mine) = answers
            .iter()
            .find(|(n, _)| n == &me)
            .map(|(_, s)| s.clone())
        else {
            // Our own keeper did not answer: it is not running; try again later.
            self.phase = Phase::Blocked {
                until: Instant::now() + Duration::from_millis(500),
            };
            return;
        };
        self.log = mine;
        let Some((best_node, best)) = log::best(&answers).cloned() else {
            return;
        };
        let shared = log::common_prefix(&self.log, &best);
        // The tail may hold entries our own copy refused or that the best log replaces.
        let keep = if best_node == me {
            self.log.last_seq
        } else {
            shared
        };
        while self.tail.back().is_some_and(|e| e.seq > keep) {
            self.tail.pop_back();
        }
        if best_node == me || (shared == best.last_seq && shared == self.log.last_seq) {
            self.become_active(myself, answers);
        } else {
            tracing::info!(room = %self.id, from = %best_node, from_seq = shared + 1, to_seq = best.last_seq, "recovering log");
            let _ = self.net.to_keeper(
                &best_node,
                ToKeeper::Fetch {
                    room: self.id.clone(),
                    from: me,
                    from_seq: shared + 1,
                    to_seq: best.last_seq,
                },
            );
            self.phase = Phase::Recovering {
                from: best_node,
                target: best.last_seq,
                answers,
                started: Instant::now(),
            };
        }
    }

    fn on_fetched(&mut self, myself: &ActorRef<RoomMessage>, node: NodeName, entries: Vec<Entry>) {
        let target = match &self.phase {
            Phase::Recovering { from, target, .. } if from == &node => *target,
            _ => return,
        };
        let Some(first) = entries.first() else {
            tracing::warn!(room = %self.id, from = %node, "recovery source returned nothing; claiming again");
            self.phase = Phase::Blocked {
                until: Instant::now() + Duration::from_millis(200),
            };
            return;
        };
        let after_seq = first.seq - 1;
        let placement = self.placement.clone();
        match log::append(&self.log, self.epoch, &placement, after_seq, &entries) {
            Ok((next, _)) => self.log = next,
            Err(refusal) => {
                tracing::warn!(room = %self.id, ?refusal, "fetched entries do not fit; claiming again");
                self.phase = Phase::Blocked {
                    until: Instant::now() + Duration::from_millis(200),
                };
                return;
            }
        }
        while self.tail.back().is_some_and(|e| e.seq > after_seq) {
            self.tail.pop_back();
        }
        // Write them to this node's own copy like any append (the keeper truncates after
        // `after_seq`); the acknowledgement arrives as `Appended` from ourselves.
        let me = self.me().clone();
        let _ = self.net.to_keeper(
            &me,
            ToKeeper::Append {
                room: self.id.clone(),
                epoch: self.epoch,
                placement,
                after_seq,
                entries: entries.clone(),
            },
        );
        self.sent.insert(me, self.log.last_seq);
        self.tail.extend(entries);
        if self.log.last_seq >= target {
            let answers = match &mut self.phase {
                Phase::Recovering { answers, .. } => std::mem::take(answers),
                _ => Vec::new(),
            };
            self.become_active(myself, answers);
        } else {
            let _ = self.net.to_keeper(
                &node,
                ToKeeper::Fetch {
                    room: self.id.clone(),
                    from: self.me().clone(),
                    from_seq: self.log.last_seq + 1,
                    to_seq: target,
                },
            );
        }
    }

    fn become_active(
        &mut self,
        myself: &ActorRef<RoomMessage>,
        answers: Vec<(NodeName, LogState)>,
    ) {
        crate::metrics::Metrics::count(&self.net.metrics().room_claims, "won");
        let me = self.me().clone();
        self.acked.clear();
        let own_sent = self.sent.get(&me).copied().unwrap_or(0);
        self.sent.clear();
        for node in &self.placement.nodes {
            let held = answers
                .iter()
                .find(|(n, _)| n == node)
                .map(|(_, s)| log::common_prefix(s, &self.log))
                .unwrap_or(0);
            self.acked.insert(node.clone(), held);
            self.sent.insert(node.clone(), held);
        }
        if own_sent > self.acked.get(&me).copied().unwrap_or(0) {
            // Recovered entries are on their way to our own copy (sent while recovering).
            self.sent
                .insert(me.clone(), own_sent.min(self.log.last_seq));
        }
        // Publishes still waiting survive the claim only if the adopted log holds their entry.
        let log_state = &self.log;
        let (kept, lost): (VecDeque<Inflight>, VecDeque<Inflight>) =
            std::mem::take(&mut self.inflight)
                .into_iter()
                .partition(|i| log::epoch_at(log_state, i.seq) == Some(i.epoch));
        self.inflight = kept;
        for inflight in lost {
            self.fail(
                &inflight.origin,
                ErrorCode::Unavailable,
                "the room moved before the message was stored; retry",
            );
        }
        self.last_progress = Instant::now();
        self.phase = Phase::Active;
        tracing::info!(room = %self.id, epoch = self.epoch, last_seq = self.log.last_seq, placement = ?self.placement.nodes, "room active");
        // Every entry of the adopted log was acknowledged, or is adopted now: all committed.
        self.load_tail();
        self.rebuild_dedupe();
        let last = self.log.last_seq;
        self.advance_commit(last);
        self.pump();
        for node in self.view.up() {
            let _ = self.net.to_hub(
                node,
                ToHub::RoomActive {
                    room: self.id.clone(),
                    owner: me.clone(),
                },
            );
        }
        while let Some((node, cursor, sessions)) = self.subscriptions.pop_front() {
            self.subscribe(node, cursor, sessions);
        }
        while let Some(waiting) = self.queue.pop_front() {
            if !matches!(self.phase, Phase::Active) {
                self.queue.push_front(waiting);
                break;
            }
            self.serve(myself, waiting.origin, waiting.op, waiting.received);
        }
    }

    // ---- serving ----

    fn serve(
        &mut self,
        myself: &ActorRef<RoomMessage>,
        origin: Origin,
        op: RoomOp,
        received: Instant,
    ) {
        match op {
            RoomOp::Join {
                session,
                user,
                since,
            } => {
                let presence = self.members.join(&origin.node, session, &user);
                let seq = self.commit;
                let replay = match since {
                    Some(since) if since < seq => {
                        let from = since.max(seq.saturating_sub(self.config.replay_cap as u64)) + 1;
                        self.newest(from, seq, REPLAY_BYTES)
                    }
                    _ => Vec::new(),
                };
                self.reply(
                    &origin,
                    Reply::Joined {
                        room: self.id.clone(),
                        seq,
                        replay,
                    },
                );
                if let Some(event) = presence {
                    self.presence(&user, event);
                }
            }
            RoomOp::Leave { session, .. } => {
                let gone = self.members.leave(&origin.node, session);
                self.reply(
                    &origin,
                    Reply::Left {
                        room: self.id.clone(),
                    },
                );
                if let Some(user) = gone {
                    self.presence(&user, PresenceEvent::Leave);
                }
            }
            RoomOp::Publish {
                user,
                text,
                client_id,
            } => self.publish(myself, origin, user, text, client_id, received),
            RoomOp::GetHistory { before, limit } => {
                let before = before.unwrap_or(u64::MAX).min(self.commit + 1);
                let messages = if before <= 1 {
                    Vec::new()
                } else {
                    let from = before.saturating_sub(u64::from(limit)).max(1);
                    self.newest(from, before - 1, REPLAY_BYTES)
                };
                self.reply(
                    &origin,
                    Reply::History {
                        room: self.id.clone(),
                        messages,
                    },
                );
            }
            RoomOp::GetMembers => {
                let users = self.members.users();
                self.reply(
                    &origin,
                    Reply::Members {
                        room: self.id.clone(),
                        users,
                    },
                );
            }
        }
    }

    fn publish(
        &mut self,
        myself: &ActorRef<RoomMessage>,
        origin: Origin,
        user: UserName,
        text: String,
        client_id: Option<String>,
        received: Instant,
    ) {
        if !self.view.quorum {
            self.fail(
                &origin,
                ErrorCode::Unavailable,
                "this node is cut off from the majority of the cluster; retry",
            );
            return;
        }
        if let Some(id) = &client_id
            && let Some(&seq) = self.dedupe.get(&(user.clone(), id.clone()))
        {
            if seq <= self.commit {
                self.reply(
                    &origin,
                    Reply::Acked {
                        room: self.id.clone(),
                        seq,
                    },
                );
            } else {
                let epoch = log::epoch_at(&self.log, seq).unwrap_or(self.epoch);
                self.inflight.push_back(Inflight {
                    seq,
                    epoch,
                    origin,
                    received,
                });
            }
            return;
        }
        let seq = self.log.last_seq + 1;
        let now = now_ms().max(self.last_ts);
        self.last_ts = now;
        let entry = Entry {
            seq,
            epoch: self.epoch,
            from: user.clone(),
            text,
            ts: now,
            client_id: client_id.clone(),
        };
        let placement = self.placement.clone();
        match log::append(
            &self.log,
            self.epoch,
            &placement,
            self.log.last_seq,
            std::slice::from_ref(&entry),
        ) {
            Ok((next, _)) => self.log = next,
            Err(refusal) => {
                // Cannot happen: the room appends to its own log at its own epoch.
                tracing::error!(room = %self.id, ?refusal, "own append refused");
                self.fail(&origin, ErrorCode::Internal, "sequencing failed");
                return;
            }
        }
        if let Some(id) = client_id {
            self.remember(user, id, seq);
        }
        self.tail.push_back(entry);
        self.inflight.push_back(Inflight {
            seq,
            epoch: self.epoch,
            origin,
            received,
        });
        self.net.metrics().messages_stored.inc();
        if !self.flush_scheduled {
            self.flush_scheduled = true;
            let _ = myself.cast(RoomMessage::Flush);
        }
    }

    /// Sends every node of the placement what it lacks, within the replication window.
    fn pump(&mut self) {
        if !matches!(self.phase, Phase::Active) {
            return;
        }
        let me = self.me().clone();
        for node in self.placement.nodes.clone() {
            loop {
                let sent = self.sent.get(&node).copied().unwrap_or(0);
                let acked = self.acked.get(&node).copied().unwrap_or(0);
                if sent >= self.log.last_seq || sent.saturating_sub(acked) >= WINDOW_ENTRIES {
                    break;
                }
                // Entries older than the tail come from our own store, which only has what our
                // keeper acknowledged: for others, wait until it has.
                let tail_start = self.tail.front().map_or(self.log.last_seq + 1, |e| e.seq);
                let own_acked = self.acked.get(&me).copied().unwrap_or(0);
                if node != me && sent + 1 < tail_start && own_acked < tail_start.saturating_sub(1) {
                    break;
                }
                let to = self.log.last_seq.min(sent + CHUNK_ENTRIES as u64);
                let entries = self.range(sent + 1, to, CHUNK_BYTES);
                let Some(last) = entries.last().map(|e| e.seq) else {
                    break;
                };
                let _ = self.net.to_keeper(
                    &node,
                    ToKeeper::Append {
                        room: self.id.clone(),
                        epoch: self.epoch,
                        placement: self.placement.clone(),
                        after_seq: sent,
                        entries,
                    },
                );
                self.sent.insert(node.clone(), last);
            }
        }
    }

    fn on_appended(
        &mut self,
        myself: &ActorRef<RoomMessage>,
        epoch: Epoch,
        node: NodeName,
        ok: bool,
        promised: Epoch,
        last_seq: u64,
    ) {
        self.highest_epoch = self.highest_epoch.max(promised);
        if promised > self.epoch {
            tracing::warn!(room = %self.id, epoch = self.epoch, promised, by = %node, "fenced by a newer epoch");
            self.step_down(myself, "a newer owner took the room");
            return;
        }
        if epoch != self.epoch || !matches!(self.phase, Phase::Active) {
            return;
        }
        if !ok {
            // The node missed entries (a dropped message): resend from what it has.
            self.sent.insert(node, last_seq);
            self.pump();
            return;
        }
        let acked = self.acked.entry(node.clone()).or_insert(0);
        if last_seq > *acked {
            *acked = last_seq;
            self.last_progress = Instant::now();
        }
        let point = log::commit_point(
            self.placement
                .nodes
                .iter()
                .filter_map(|n| self.acked.get(n)),
        );
        self.advance_commit(point.min(self.log.last_seq));
        self.pump();
    }

    /// Commits entries up to `point`: fans them out and acknowledges their senders.
    fn advance_commit(&mut self, point: u64) {
        if point <= self.commit {
            return;
        }
        let from = self.commit + 1;
        let entries: Vec<Entry> = self
            .tail
            .iter()
            .filter(|e| e.seq >= from && e.seq <= point)
            .cloned()
            .collect();
        self.commit = point;
        for chunk in chunks(entries) {
            for node in self.members.nodes() {
                let _ = self.net.to_hub(
                    node,
                    ToHub::Fanout {
                        room: self.id.clone(),
                        entries: chunk.clone(),
                    },
                );
            }
        }
        while self.inflight.front().is_some_and(|i| i.seq <= point) {
            let Some(done) = self.inflight.pop_front() else {
                break;
            };
            self.net
                .metrics()
                .send_ack_seconds
                .observe(done.received.elapsed().as_secs_f64());
            self.reply(
                &done.origin,
                Reply::Acked {
                    room: self.id.clone(),
                    seq: done.seq,
                },
            );
        }
        self.trim_tail();
    }

    fn subscribe(&mut self, node: NodeName, cursor: u64, sessions: Vec<(SessionId, UserName)>) {
        if !self.view.is_up(&node) {
            return;
        }
        // Rebuilt membership after a move: not news to anyone, so no presence events.
        let _ = self.members.replace_node(&node, &sessions);
        if sessions.is_empty() || cursor >= self.commit {
            return;
        }
        let from = (cursor + 1).max(self.commit.saturating_sub(self.config.replay_cap as u64) + 1);
        let entries = self.newest(from, self.commit, REPLAY_BYTES);
        for chunk in chunks(entries) {
            let _ = self.net.to_hub(
                &node,
                ToHub::Fanout {
                    room: self.id.clone(),
                    entries: chunk,
                },
            );
        }
    }

    fn presence(&self, user: &UserName, event: PresenceEvent) {
        for node in self.members.nodes() {
            let _ = self.net.to_hub(
                node,
                ToHub::Presence {
                    room: self.id.clone(),
                    user: user.clone(),
                    event,
                },
            );
        }
    }

    // ---- view, time, leaving ----

    fn on_view(&mut self, myself: &ActorRef<RoomMessage>, view: Arc<View>) {
        let previous = std::mem::replace(&mut self.view, view);
        if matches!(self.phase, Phase::Active) {
            // A node that was down in our previous view (a crash, or just a flapping link) had
            // its members dropped here, while its own view may never have changed: invite it to
            // subscribe again, with its cursor.
            let returned: Vec<NodeName> = self
                .view
                .up()
                .filter(|n| !previous.is_up(n) && *n != self.me())
                .cloned()
                .collect();
            for node in returned {
                let _ = self.net.to_hub(
                    &node,
                    ToHub::RoomActive {
                        room: self.id.clone(),
                        owner: self.me().clone(),
                    },
                );
            }
        }
        if self.view.owner(&self.id) != Some(self.me()) {
            self.step_down(myself, "the room moved to another node");
            return;
        }
        let gone: Vec<NodeName> = self
            .members
            .nodes()
            .filter(|n| !self.view.is_up(n))
            .cloned()
            .collect();
        for node in gone {
            for user in self.members.drop_node(&node) {
                self.presence(&user, PresenceEvent::Leave);
            }
        }
        let wanted = self
            .view
            .placement(&self.id, self.config.replication_factor);
        let claiming_for_gone = match &self.phase {
            Phase::Claiming { waiting, .. } => waiting.iter().any(|n| !self.view.is_up(n)),
            Phase::Recovering { from, .. } => !self.view.is_up(from),
            _ => false,
        };
        if wanted != self.placement.nodes || claiming_for_gone {
            self.start_claim(myself);
        }
    }

    fn on_tick(&mut self, myself: &ActorRef<RoomMessage>) {
        let now = Instant::now();
        while self
            .queue
            .front()
            .is_some_and(|w| now.duration_since(w.received) > self.config.queue_timeout)
        {
            if let Some(waiting) = self.queue.pop_front() {
                self.fail(
                    &waiting.origin,
                    ErrorCode::Unavailable,
                    "the room is not available yet; retry",
                );
            }
        }
        match &self.phase {
            Phase::Claiming { started, .. } | Phase::Recovering { started, .. }
                if now.duration_since(*started) > CLAIM_TIMEOUT =>
            {
                tracing::debug!(room = %self.id, "claim timed out; claiming again");
                self.start_claim(myself);
            }
            Phase::Blocked { until } if now >= *until => self.start_claim(myself),
            Phase::Active => {
                if !self.inflight.is_empty()
                    && now.duration_since(self.last_progress) > RESEND_AFTER
                {
                    // Appends or their answers were lost: resend what is unacknowledged.
                    let acked = self.acked.clone();
                    self.sent.extend(acked);
                    self.last_progress = now;
                    self.pump();
                }
                if self.members.is_empty()
                    && self.inflight.is_empty()
                    && self.queue.is_empty()
                    && now.duration_since(self.last_activity) > self.config.idle
                {
                    tracing::debug!(room = %self.id, "idle; stopping");
                    myself.stop(Some("idle".into()));
                }
            }
            _ => {}
        }
    }

    fn step_down(&mut self, myself: &ActorRef<RoomMessage>, why: &str) {
        tracing::info!(room = %self.id, epoch = self.epoch, why, "stepping down");
        self.fail_all("the room moved; retry");
        myself.stop(Some(why.to_owned()));
    }

    fn fail_all(&mut self, message: &str) {
        while let Some(waiting) = self.queue.pop_front() {
            self.fail(&waiting.origin, ErrorCode::Unavailable, message);
        }
        while let Some(inflight) = self.inflight.pop_front() {
            self.fail(&inflight.origin, ErrorCode::Unavailable, message);
        }
    }

    fn reply(&self, origin: &Origin, reply: Reply) {
        if origin.req == 0 {
            return;
        }
        let _ = self.net.to_hub(
            &origin.node,
            ToHub::Reply {
                req: origin.req,
                reply,
            },
        );
    }

    fn fail(&self, origin: &Origin, code: ErrorCode, message: &str) {
        self.reply(
            origin,
            Reply::Failed {
                code,
                message: message.to_owned(),
            },
        );
    }

    // ---- entries ----

    /// Entries `from..=to`, from the tail and, below it, from the store; at least one when any
    /// exists, then up to about `max_bytes`.
    fn range(&self, from: u64, to: u64, max_bytes: usize) -> Vec<Entry> {
        if from > to {
            return Vec::new();
        }
        let tail_start = self.tail.front().map_or(u64::MAX, |e| e.seq);
        let mut out = Vec::new();
        let mut bytes = 0;
        if from < tail_start {
            let upto = to.min(tail_start.saturating_sub(1));
            match self.store.entries(&self.id, from, upto, max_bytes) {
                Ok(stored) => {
                    bytes = stored.iter().map(|e| e.text.len() + 64).sum();
                    let complete = stored.last().map(|e| e.seq) == Some(upto);
                    out = stored;
                    if !complete || bytes >= max_bytes {
                        return out;
                    }
                }
                Err(e) => {
                    tracing::error!(room = %self.id, error = %e, "store read failed");
                    return out;
                }
            }
        }
        for entry in self.tail.iter().filter(|e| e.seq >= from && e.seq <= to) {
            if bytes >= max_bytes && !out.is_empty() {
                break;
            }
            bytes += entry.text.len() + 64;
            out.push(entry.clone());
        }
        out
    }

    /// The newest entries of `from..=to` that fit in about `max_bytes`, oldest first.
    fn newest(&self, from: u64, to: u64, max_bytes: usize) -> Vec<Entry> {
        let mut entries = self.range(from, to, usize::MAX);
        let mut bytes: usize = entries.iter().map(|e| e.text.len() + 64).sum();
        let mut drop = 0;
        while bytes > max_bytes && drop + 1 < entries.len() {
            bytes -= entries[drop].text.len() + 64;
            drop += 1;
        }
        entries.drain(..drop);
        entries
    }

    fn load_tail(&mut self) {
        let own = self.acked.get(self.me()).copied().unwrap_or(0);
        // Entries above what our own store holds are already in the tail (fetched); load the
        // committed stretch below them from the store.
        let first_in_tail = self.tail.front().map_or(self.log.last_seq + 1, |e| e.seq);
        let upto = first_in_tail.saturating_sub(1).min(own);
        if upto == 0 {
            return;
        }
        let from = upto.saturating_sub(TAIL_KEEP as u64 - 1).max(1);
        match self.store.entries(&self.id, from, upto, usize::MAX) {
            Ok(entries) => {
                for entry in entries.into_iter().rev() {
                    self.tail.push_front(entry);
                }
            }
            Err(e) => tracing::error!(room = %self.id, error = %e, "store read failed"),
        }
    }

    fn trim_tail(&mut self) {
        let own = self.acked.get(self.me()).copied().unwrap_or(0);
        let keep_from = self.commit.min(own);
        while self.tail.len() > TAIL_KEEP && self.tail.front().is_some_and(|e| e.seq <= keep_from) {
            self.tail.pop_front();
        }
    }

    fn rebuild_dedupe(&mut self) {
        self.dedupe.clear();
        self.dedupe_order.clear();
        let from = self.log.last_seq.saturating_sub(DEDUPE_KEEP as u64) + 1;
        for entry in self.range(from, self.log.last_seq, usize::MAX) {
            if let Some(id) = entry.client_id {
                self.remember(entry.from, id, entry.seq);
            }
        }
        self.last_ts = self.tail.back().map_or(0, |e| e.ts);
    }

    fn remember(&mut self, user: UserName, id: String, seq: u64) {
        let key = (user, id);
        if self.dedupe.insert(key.clone(), seq).is_none() {
            self.dedupe_order.push_back(key);
        }
        while self.dedupe_order.len() > DEDUPE_KEEP {
            if let Some(old) = self.dedupe_order.pop_front() {
                self.dedupe.remove(&old);
            }
        }
    }
}

/// Splits entries into messages of bounded size.
fn chunks(entries: Vec<Entry>) -> Vec<Vec<Entry>> {
    let mut out = Vec::new();
    let mut current = Vec::new();
    let mut bytes = 0;
    for entry in entries {
        bytes += entry.text.len() + 64;
        current.push(entry);
        if current.len() >= CHUNK_ENTRIES || bytes >= CHUNK_BYTES {
            out.push(std::mem::take(&mut current));
            bytes = 0;
        }
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}
