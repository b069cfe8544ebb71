//! The pure core of a room's owner: claiming, recovery, sequencing, dedupe, replication,
//! commit and fan-out, as a state machine with no I/O, no clock and no actor.
//!
//! Events come in as method calls carrying the time ([`RoomCore::on_peer`], `on_view`,
//! `on_flush`, `on_tick`, …); decisions come out as [`Effect`]s (messages for log keepers and
//! hubs, a flush to schedule, a stop), drained with [`RoomCore::take_effects`]. The only thing
//! the core reads besides its events is this node's store of the room's log, through
//! [`LogReader`], for entries older than the ones it keeps in memory. The Room actor
//! (`rooms::room`) and the cluster simulation (`node/tests/sim`) drive the same core.
//!
//! Lifecycle (the rules are in [`super::log`]):
//! 1. **Claiming**: a new epoch is promised by every member up in the view (a majority).
//! 2. **Syncing**: the best copy is adopted (entries this node lacks are fetched from its
//!    holder), and every node of the placement is brought up to it under the new epoch. Nothing
//!    is served yet: an adopted entry may never have been acknowledged, and it is committed only
//!    once the whole placement holds it under this epoch.
//! 3. **Active**: a `send` gets the next seq and goes to every node of the placement (owner
//!    included); it is acknowledged, and fanned out once per node with members, when every one
//!    of them stored it. A retried `send` (same user and client id) is answered with the seq of
//!    its first copy, once that copy is committed.
//! 4. **Stopped**: idle with no members, moved to another node, or fenced by a newer epoch.
//!
//! Requests that arrive before the room is active wait in a bounded queue with a deadline, then
//! get `unavailable`.
//!
//! Retention ([`super::retention`]): the owner decides a horizon over committed entries and sends
//! it to every node of the placement ([`ToKeeper::Trim`]); it serves the horizon (hides what is
//! below, says so in `history` and `join` replies and to subscriptions from below it) only once
//! every one of them recorded it, so a later owner, which adopts the highest horizon its claim
//! hears of, never serves what a client was told is gone. Stores delete entries only below a
//! horizon already served, so every entry at or above the served horizon stays readable. A claim
//! makes the adopted horizon part of the sync: the room becomes active only once the placement
//! recorded it.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chat_protocol::peer::{
    AppendOutcome, CATCH_UP_BYTES, Entry, Epoch, Horizon, LogState, Origin, Placement, Reply,
    RoomOp, SessionId, ToHub, ToKeeper, ToRoom,
};
use chat_protocol::{ErrorCode, NodeName, PresenceEvent, RoomId, UserName};

use crate::cluster::view::View;
use crate::metrics::Metrics;
use crate::rooms::log;
use crate::rooms::members::Members;
use crate::rooms::retention::{self, RetentionPolicy};
use crate::store::{Store, StoreError};

/// Committed entries kept in memory for replays and history, beyond the uncommitted ones.
const TAIL_KEEP: usize = 256;
/// Requests queued while the room is not active, at most.
const QUEUE_MAX: usize = 4096;
/// Entries per `Append` or `Fanout` message, at most.
const CHUNK_ENTRIES: usize = 512;
/// Text bytes per replay, catch-up or append chunk, about.
const CHUNK_BYTES: usize = 1 << 20;
/// Rendered bytes of a `join` replay or a `history` reply, about: what one reply may add to a
/// client's queue, well below `client-queue-bytes`.
const PAGE_BYTES: usize = 1 << 20;
/// Entries sent to a node and not yet acknowledged, at most (the replication window).
const WINDOW_ENTRIES: u64 = 8192;
/// A claim not answered in this time starts over with a higher epoch.
const CLAIM_TIMEOUT: Duration = Duration::from_millis(1500);
/// Appends (and fetches) not answered in this time are sent again.
const RESEND_AFTER: Duration = Duration::from_millis(1000);
/// A sync that makes no progress for this long starts over with a new claim.
const SYNC_TIMEOUT: Duration = Duration::from_millis(4000);
/// Recent client message ids remembered per room for deduplicating retried sends.
const DEDUPE_KEEP: usize = 4096;
/// Text bytes of the oldest entries read to apply the age bound of retention, about, per
/// decision (the horizon moves as far as they reach; the next decision goes on).
const AGE_SCAN_BYTES: usize = 256 << 10;

/// Settings a room needs.
#[derive(Debug, Clone)]
pub struct RoomConfig {
    /// Copies of the log, owner included (at least a majority of the known members is used).
    pub replication_factor: usize,
    /// Messages replayed by `join` with `since`, at most.
    pub replay_cap: usize,
    /// Stop after this long idle with no members.
    pub idle: Duration,
    /// How long a request may wait for the room to become active.
    pub queue_timeout: Duration,
    /// How much of each room's log to keep.
    pub retention: RetentionPolicy,
    /// A deliberately broken rule, for proving that the simulation's checker catches it. Never
    /// set outside tests.
    pub flaw: Option<Flaw>,
}

/// Rules the room core can be told to break (see [`RoomConfig::flaw`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flaw {
    /// Counts every adopted entry as committed at once, without storing it on the placement
    /// under the new epoch first.
    CommitAdopted,
    /// The rules before the double-fault fork was fixed: adopts the copy whose last entry has
    /// the newest epoch (then the longest), and commits what it adopts at once.
    OldRules,
}

/// Reads entries of a room's log from this node's store.
pub trait LogReader: Send + Sync {
    /// Entries `from_seq..=to_seq`, ascending, stopping early after about `max_bytes` of text.
    fn entries(
        &self,
        room: &RoomId,
        from_seq: u64,
        to_seq: u64,
        max_bytes: usize,
    ) -> Result<Vec<Entry>, StoreError>;

    /// Whether this node's store can write now (false after a failed commit, until a write
    /// succeeds again).
    fn writable(&self) -> bool {
        true
    }
}

impl LogReader for Store {
    fn entries(
        &self,
        room: &RoomId,
        from_seq: u64,
        to_seq: u64,
        max_bytes: usize,
    ) -> Result<Vec<Entry>, StoreError> {
        Store::entries(self, room, from_seq, to_seq, max_bytes)
    }

    fn writable(&self) -> bool {
        Store::writable(self)
    }
}

/// What a client is told when a send cannot be stored because a disk cannot write.
const UNWRITABLE: &str = "this node cannot write to its disk; retry";
/// The same, when the disk is another node's of the room's placement.
const REPLICA_UNWRITABLE: &str = "a node holding the room's log cannot write to its disk; retry";

/// Why a room stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// No members and no traffic for the idle time.
    Idle,
    /// Another node owns the room in the current view.
    Moved,
    /// A newer owner took the room.
    Fenced,
}

impl Stop {
    /// The reason, for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Stop::Idle => "idle",
            Stop::Moved => "the room moved to another node",
            Stop::Fenced => "a newer owner took the room",
        }
    }
}

/// What the core decided; the actor shell carries it out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// A message for the log keeper of a node (this node's included).
    Keeper(NodeName, ToKeeper),
    /// A message for the hub of a node (this node's included).
    Hub(NodeName, ToHub),
    /// Call [`RoomCore::on_flush`] once the messages already queued for the room are handled,
    /// so that the sends among them go out in one append.
    Flush,
    /// The room is done on this node.
    Stop(Stop),
}

enum Phase {
    /// Waiting for promises.
    Claiming {
        answers: Vec<(NodeName, LogState)>,
        /// What retention dropped from each answerer's copy.
        horizons: Vec<Horizon>,
        /// Answerers that lost their disk and were not synced for the room since.
        recovering: Vec<NodeName>,
        waiting: HashSet<NodeName>,
        since: Instant,
    },
    /// The best copy is adopted; the placement is being brought up to it.
    Syncing {
        /// The node entries this one lacks are fetched from, while they are.
        fetching: Option<NodeName>,
    },
    /// Serving.
    Active,
    /// A claim cannot proceed now (no quorum, a placement out of reach, a lost race).
    Blocked { until: Instant },
    /// Done.
    Stopped,
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

/// What the owner knows of one node of its placement.
#[derive(Debug, Clone, Copy, Default)]
struct Replica {
    /// What the node held of the adopted log when it promised (it needs nothing below).
    base: u64,
    /// The highest seq sent to it under this epoch.
    sent: u64,
    /// The highest seq it stored under this epoch (its copy is the owner's log up to there).
    matched: u64,
    /// Whether it acknowledged any append of this epoch.
    acked: bool,
    /// Whether it must be sent an append even with nothing new (to sync, or after a loss).
    poke: bool,
    /// The highest horizon it recorded (as far as this owner knows).
    recorded: u64,
    /// The highest deletion point it was sent.
    compacted: u64,
    /// Whether a trim sent to it is unanswered.
    trimming: bool,
}

/// The owner side of one room.
pub struct RoomCore {
    id: RoomId,
    me: NodeName,
    config: RoomConfig,
    reader: Arc<dyn LogReader>,
    metrics: Metrics,
    view: Arc<View>,
    phase: Phase,
    /// The epoch claimed (or being claimed).
    epoch: Epoch,
    /// The highest epoch any node reported: the next claim goes above it.
    highest_epoch: Epoch,
    placement: Placement,
    /// The owner's log: the adopted copy, then what this owner sequenced.
    log: LogState,
    /// The log's end when this owner adopted it.
    adopted: u64,
    /// The highest seq whose entry this owner holds (the log's end once recovered).
    have: u64,
    /// This node's store holds the owner's log up to here.
    store_good: u64,
    commit: u64,
    /// The served horizon: every node of the placement recorded it; nothing below is served,
    /// and stores may delete what is below. Entries from here on are readable.
    horizon: u64,
    /// The horizon decided, being recorded by the placement (at least `horizon`).
    target: u64,
    replicas: HashMap<NodeName, Replica>,
    /// When a node last acknowledged something new (or a fetch brought entries).
    progress_at: Instant,
    /// When unacknowledged appends were last sent again.
    resent_at: Instant,
    /// Recent entries: every entry above `store_good` and the last `TAIL_KEEP` committed ones.
    tail: VecDeque<Entry>,
    flush_scheduled: bool,
    inflight: VecDeque<Inflight>,
    queue: VecDeque<Waiting>,
    subscriptions: VecDeque<Subscription>,
    members: Members,
    dedupe: HashMap<(UserName, String), u64>,
    dedupe_order: VecDeque<(UserName, String)>,
    last_ts: u64,
    /// The wall clock at the latest event that carried it.
    wall_ms: u64,
    last_activity: Instant,
    rng: u64,
    effects: Vec<Effect>,
}

impl RoomCore {
    /// The core of room `id` on node `me`, which starts claiming at once. `promised` is the
    /// epoch this node's copy promised last (a hint: the claim starts above it); `seed` feeds
    /// the jitter of retries.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: RoomId,
        me: NodeName,
        view: Arc<View>,
        config: RoomConfig,
        reader: Arc<dyn LogReader>,
        metrics: Metrics,
        promised: Epoch,
        seed: u64,
        now: Instant,
    ) -> RoomCore {
        let mut core = RoomCore {
            placement: Placement {
                epoch: 0,
                nodes: vec![me.clone()],
            },
            id,
            me,
            config,
            reader,
            metrics,
            view,
            phase: Phase::Blocked { until: now },
            epoch: 0,
            highest_epoch: promised,
            log: LogState::default(),
            adopted: 0,
            have: 0,
            store_good: 0,
            commit: 0,
            horizon: 0,
            target: 0,
            replicas: HashMap::new(),
            progress_at: now,
            resent_at: now,
            tail: VecDeque::new(),
            flush_scheduled: false,
            inflight: VecDeque::new(),
            queue: VecDeque::new(),
            subscriptions: VecDeque::new(),
            members: Members::default(),
            dedupe: HashMap::new(),
            dedupe_order: VecDeque::new(),
            last_ts: 0,
            wall_ms: 0,
            last_activity: now,
            rng: seed | 1,
            effects: Vec::new(),
        };
        core.start_claim(now);
        core
    }

    /// The effects decided since the last call, in order.
    pub fn take_effects(&mut self) -> Vec<Effect> {
        std::mem::take(&mut self.effects)
    }

    /// The room.
    pub fn id(&self) -> &RoomId {
        &self.id
    }

    /// The epoch this owner claimed (or is claiming).
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// The highest committed seq.
    pub fn commit(&self) -> u64 {
        self.commit
    }

    /// The served horizon: the smallest seq still served (0 and 1: nothing dropped).
    pub fn horizon(&self) -> u64 {
        self.horizon
    }

    /// Whether the room serves requests.
    pub fn is_active(&self) -> bool {
        matches!(self.phase, Phase::Active)
    }

    /// When [`RoomCore::on_tick`] has something to do next, if ever.
    pub fn next_wake(&self) -> Option<Instant> {
        let mut wake: Option<Instant> = None;
        let mut at = |t: Instant| wake = Some(wake.map_or(t, |w| w.min(t)));
        if let Some(first) = self.queue.front() {
            at(first.received + self.config.queue_timeout);
        }
        match &self.phase {
            Phase::Claiming { since, .. } => at(*since + CLAIM_TIMEOUT),
            Phase::Syncing { .. } => {
                at(self.progress_at.max(self.resent_at) + RESEND_AFTER);
                at(self.progress_at + SYNC_TIMEOUT);
            }
            Phase::Blocked { until } => at(*until),
            Phase::Active => {
                if !self.inflight.is_empty() || self.lagging() {
                    at(self.progress_at.max(self.resent_at) + RESEND_AFTER);
                }
                if self.members.is_empty() && self.inflight.is_empty() && self.queue.is_empty() {
                    at(self.last_activity + self.config.idle);
                }
            }
            Phase::Stopped => return None,
        }
        wake
    }

    // ---- events ----

    /// A message from a node (this one included), received at `received`; `wall_ms` is the
    /// wall clock, for the timestamps of new messages.
    pub fn on_peer(&mut self, message: ToRoom, received: Instant, now: Instant, wall_ms: u64) {
        self.wall_ms = self.wall_ms.max(wall_ms);
        if matches!(self.phase, Phase::Stopped) {
            if let ToRoom::Request { origin, .. } = message {
                self.fail(&origin, "the room moved or restarted; retry");
            }
            return;
        }
        match message {
            ToRoom::Request { origin, op, .. } => {
                self.last_activity = now;
                if self.is_active() {
                    self.serve(origin, op, received, now);
                } else if !self.reader.writable() {
                    // No claim can succeed without writing its promise.
                    self.fail(&origin, UNWRITABLE);
                } else if !self.view.quorum {
                    // Waiting would not help: no claim can succeed without a majority.
                    self.fail(
                        &origin,
                        "this node is cut off from the majority of the cluster; retry",
                    );
                } else if self.queue.len() >= QUEUE_MAX {
                    self.fail(&origin, "room is busy moving; retry");
                } else {
                    self.queue.push_back(Waiting {
                        origin,
                        op,
                        received,
                    });
                }
            }
            ToRoom::Subscribe {
                node,
                cursor,
                sessions,
            } => {
                self.last_activity = now;
                if self.is_active() {
                    self.subscribe(node, cursor, sessions);
                } else {
                    self.subscriptions.push_back((node, cursor, sessions));
                }
            }
            ToRoom::Promised {
                epoch,
                granted,
                node,
                state,
                recovering,
            } => self.on_promised(
                epoch,
                granted,
                node,
                state,
                recovering,
                Horizon::default(),
                now,
            ),
            ToRoom::PromisedTrimmed {
                epoch,
                granted,
                node,
                state,
                recovering,
                horizon,
            } => self.on_promised(epoch, granted, node, state, recovering, horizon, now),
            ToRoom::Appended {
                epoch,
                node,
                outcome,
            } => self.on_appended(epoch, node, outcome, now),
            ToRoom::Fetched { node, entries } => self.on_fetched(node, entries, now),
        }
    }

    /// The view changed.
    pub fn on_view(&mut self, view: Arc<View>, now: Instant) {
        if matches!(self.phase, Phase::Stopped) {
            return;
        }
        let previous = std::mem::replace(&mut self.view, view);
        if self.is_active() {
            // A node that was down in our previous view (a crash, or just a flapping link) had
            // its members dropped here, while its own view may never have changed; one reached
            // over a new session may have missed fan-outs: invite it to subscribe again, with
            // its cursor.
            let returned: Vec<NodeName> = self
                .view
                .up()
                .filter(|n| **n != self.me && self.view.returned(&previous, n))
                .cloned()
                .collect();
            for node in returned {
                self.room_active(node);
            }
        }
        if self.view.owner(&self.id) != Some(&self.me) {
            self.stop(Stop::Moved);
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
        let wanted = self.wanted_placement();
        // A node waited on that is gone, or reached over a new session (what was in flight on
        // the old one may be lost), is asked again.
        let lost = |n: &NodeName| !self.view.is_up(n) || self.view.returned(&previous, n);
        let waiting_for_lost = match &self.phase {
            Phase::Claiming { waiting, .. } => waiting.iter().any(lost),
            Phase::Syncing { fetching } => fetching.as_ref().is_some_and(lost),
            _ => false,
        };
        if wanted != self.placement.nodes || waiting_for_lost {
            self.start_claim(now);
            return;
        }
        let mut resend = false;
        for (node, replica) in &mut self.replicas {
            if *node != self.me && self.view.returned(&previous, node) {
                replica.sent = replica.matched.max(replica.base);
                replica.poke = true;
                resend = true;
            }
        }
        if resend {
            self.pump();
        }
    }

    /// Every connection of `node` is gone (its hub restarted).
    pub fn on_node_reset(&mut self, node: &NodeName) {
        for user in self.members.drop_node(node) {
            self.presence(&user, PresenceEvent::Leave);
        }
    }

    /// The flush scheduled by [`Effect::Flush`]: sends what was sequenced since.
    pub fn on_flush(&mut self) {
        self.flush_scheduled = false;
        self.pump();
    }

    /// Deadlines: expired requests, claims and syncs that take too long, lost appends, idleness.
    pub fn on_tick(&mut self, now: Instant) {
        if !self.is_active() && !self.reader.writable() {
            // The claim's promise could not be written (it times out, and this is its tick):
            // the requests waiting for it are told now, not at their queue timeout.
            while let Some(waiting) = self.queue.pop_front() {
                self.fail(&waiting.origin, UNWRITABLE);
            }
        }
        while self
            .queue
            .front()
            .is_some_and(|w| now.duration_since(w.received) >= self.config.queue_timeout)
        {
            if let Some(waiting) = self.queue.pop_front() {
                self.fail(&waiting.origin, "the room is not available yet; retry");
            }
        }
        match &self.phase {
            Phase::Claiming { since, .. } if now.duration_since(*since) >= CLAIM_TIMEOUT => {
                tracing::debug!(room = %self.id, "claim timed out; claiming again");
                self.start_claim(now);
            }
            Phase::Blocked { until } if now >= *until => self.start_claim(now),
            Phase::Syncing { .. } if now.duration_since(self.progress_at) >= SYNC_TIMEOUT => {
                tracing::debug!(room = %self.id, "sync made no progress; claiming again");
                self.start_claim(now);
            }
            Phase::Syncing { fetching } if self.resend_due(now) => {
                if let Some(from) = fetching.clone() {
                    self.fetch_next(&from);
                }
                self.resend(now);
            }
            Phase::Active => {
                if (!self.inflight.is_empty() || self.lagging()) && self.resend_due(now) {
                    self.resend(now);
                }
                self.decide_horizon();
                if self.members.is_empty()
                    && self.inflight.is_empty()
                    && self.queue.is_empty()
                    && now.duration_since(self.last_activity) >= self.config.idle
                {
                    tracing::debug!(room = %self.id, "idle; stopping");
                    self.stop(Stop::Idle);
                }
            }
            _ => {}
        }
    }

    /// The room is going away (its actor stops): every request it holds gets `unavailable` at
    /// once instead of waiting for its timeout.
    pub fn abandon(&mut self) {
        self.fail_all("the room moved or restarted; retry");
        self.phase = Phase::Stopped;
    }

    // ---- claiming ----

    fn wanted_placement(&self) -> Vec<NodeName> {
        self.view
            .room_placement(&self.id, self.config.replication_factor)
    }

    fn start_claim(&mut self, now: Instant) {
        if self.view.owner(&self.id) != Some(&self.me) {
            self.stop(Stop::Moved);
            return;
        }
        if !self.view.quorum {
            self.phase = Phase::Blocked {
                until: now + Duration::from_millis(500),
            };
            return;
        }
        // Entries sequenced but not yet sent to our own copy go there first, so that our own
        // answer to the promise below includes them (the keeper handles messages in order).
        if self.is_active() {
            let me = self.me.clone();
            self.pump_node(&me, u64::MAX);
        }
        // Saturating: past `log::LIMIT` every keeper refuses the promise (the room stops rather
        // than reuse an epoch).
        self.epoch = self.highest_epoch.max(self.epoch).saturating_add(1);
        self.highest_epoch = self.epoch;
        self.placement = Placement {
            epoch: self.epoch,
            nodes: self.wanted_placement(),
        };
        let up: Vec<NodeName> = self.view.up().cloned().collect();
        for node in &up {
            self.effects.push(Effect::Keeper(
                node.clone(),
                ToKeeper::Promise {
                    room: self.id.clone(),
                    epoch: self.epoch,
                    placement: self.placement.clone(),
                },
            ));
        }
        tracing::debug!(room = %self.id, epoch = self.epoch, placement = ?self.placement.nodes, "claiming");
        self.phase = Phase::Claiming {
            answers: Vec::new(),
            horizons: Vec::new(),
            recovering: Vec::new(),
            waiting: up.into_iter().collect(),
            since: now,
        };
    }

    #[allow(clippy::too_many_arguments)]
    fn on_promised(
        &mut self,
        epoch: Epoch,
        granted: bool,
        node: NodeName,
        state: LogState,
        lost_disk: bool,
        horizon: Horizon,
        now: Instant,
    ) {
        self.highest_epoch = self.highest_epoch.max(state.promised);
        let Phase::Claiming {
            answers,
            horizons,
            recovering,
            waiting,
            ..
        } = &mut self.phase
        else {
            return;
        };
        if epoch != self.epoch || !waiting.contains(&node) {
            return;
        }
        if !granted {
            // Another claimer got there first: back off a little, then claim above it.
            Metrics::count(&self.metrics.room_claims, "refused");
            let jitter = Duration::from_millis(20 + self.random() % 80);
            self.phase = Phase::Blocked {
                until: now + jitter,
            };
            return;
        }
        waiting.remove(&node);
        if lost_disk {
            recovering.push(node.clone());
        }
        if node == self.me {
            // Our own answer goes first: `log::best` favours the first of equals (no copy).
            answers.insert(0, (node, state));
            horizons.insert(0, horizon);
        } else {
            answers.push((node, state));
            horizons.push(horizon);
        }
        if waiting.is_empty() {
            let answers = std::mem::take(answers);
            let horizons = std::mem::take(horizons);
            let recovering = std::mem::take(recovering);
            self.finish_claim(answers, &horizons, &recovering, now);
        }
    }

    fn finish_claim(
        &mut self,
        answers: Vec<(NodeName, LogState)>,
        horizons: &[Horizon],
        recovering: &[NodeName],
        now: Instant,
    ) {
        if !log::quorum_holds(&answers, recovering, self.view.members.len()) {
            tracing::warn!(room = %self.id, ?recovering, "too few nodes with intact disks answered (or none of the room's latest placement); waiting");
            Metrics::count(&self.metrics.room_claims, "blocked");
            self.phase = Phase::Blocked {
                until: now + Duration::from_secs(1),
            };
            return;
        }
        let Some(own) = answers
            .iter()
            .find(|(n, _)| *n == self.me)
            .map(|(_, s)| s.clone())
        else {
            // Our own keeper did not answer: it is not running; try again later.
            self.phase = Phase::Blocked {
                until: now + Duration::from_millis(500),
            };
            return;
        };
        let best = match self.config.flaw {
            Some(Flaw::OldRules) => answers.iter().reduce(|best, candidate| {
                let key = |s: &LogState| (log::epoch_at(s, s.last_seq).unwrap_or(0), s.last_seq);
                if key(&candidate.1) > key(&best.1) {
                    candidate
                } else {
                    best
                }
            }),
            _ => log::best(&answers),
        };
        let Some((best_node, best)) = best.cloned() else {
            return;
        };
        // The highest horizon heard of: it may have been served (a horizon is served only once
        // a whole placement recorded it, and this claim hears from one node of each). Entries are
        // deleted only below served horizons, so the adopted copy holds everything from the
        // highest deletion point on.
        self.target = horizons
            .iter()
            .map(|h| h.horizon)
            .max()
            .unwrap_or(0)
            .min(best.last_seq + 1);
        self.horizon = horizons
            .iter()
            .map(|h| h.compacted)
            .max()
            .unwrap_or(0)
            .min(self.target);
        // Nothing below the deletion point is needed, or can be had.
        let floor = self.horizon.saturating_sub(1);
        // What this node holds of the adopted log: its store up to `shared`, and the entries
        // of its tail (from before this claim) that the adopted log has too.
        let shared = log::common_prefix(&own, &best).max(floor.min(best.last_seq));
        let tail_end = self.tail.back().map_or(0, |e| e.seq);
        let tail_good = log::common_prefix(&log::truncate(&self.log, tail_end), &best);
        while self.tail.back().is_some_and(|e| e.seq > tail_good) {
            self.tail.pop_back();
        }
        // The tail must continue the store and reach beyond it, or it adds nothing.
        if self.tail.front().is_some_and(|e| e.seq > shared + 1)
            || self.tail.back().is_none_or(|e| e.seq <= shared)
        {
            self.tail.clear();
        }
        while self.tail.front().is_some_and(|e| e.seq < self.horizon) {
            self.tail.pop_front();
        }
        self.log = best.clone();
        self.log.promised = self.epoch;
        self.adopted = best.last_seq;
        self.store_good = shared;
        self.have = shared.max(self.tail.back().map_or(0, |e| e.seq));
        self.replicas.clear();
        for node in &self.placement.nodes {
            let answer = answers.iter().position(|(n, _)| n == node);
            let base = answer.map_or(0, |i| log::common_prefix(&answers[i].1, &self.log));
            let held = answer.map_or(Horizon::default(), |i| horizons[i]);
            self.replicas.insert(
                node.clone(),
                Replica {
                    base,
                    sent: base,
                    matched: 0,
                    acked: false,
                    poke: true,
                    recorded: held.horizon,
                    compacted: held.compacted,
                    trimming: false,
                },
            );
        }
        // Requests in flight survive the claim only if the adopted log holds their entry.
        let log_state = &self.log;
        let (kept, lost): (VecDeque<Inflight>, VecDeque<Inflight>) =
            std::mem::take(&mut self.inflight)
                .into_iter()
                .partition(|i| log::epoch_at(log_state, i.seq) == Some(i.epoch));
        self.inflight = kept;
        for inflight in lost {
            self.fail(
                &inflight.origin,
                "the room moved before the message was stored; retry",
            );
        }
        self.progress_at = now;
        self.resent_at = now;
        tracing::debug!(room = %self.id, epoch = self.epoch, from = %best_node, adopted = self.adopted, have = self.have, "adopting the best copy");
        if self.commits_adopted() {
            // The old rule: what is adopted counts as committed at once.
            self.commit = self.commit.max(self.have.min(self.adopted));
        }
        let fetching = (self.have < self.adopted).then_some(best_node);
        if let Some(from) = &fetching {
            tracing::info!(room = %self.id, from = %from, from_seq = self.have + 1, to_seq = self.adopted, "recovering log");
            let from = from.clone();
            self.fetch_next(&from);
        }
        self.phase = Phase::Syncing { fetching };
        self.send_trims();
        if self.commits_adopted() && self.have >= self.adopted {
            self.become_active(now);
            return;
        }
        self.pump();
    }

    fn commits_adopted(&self) -> bool {
        matches!(self.config.flaw, Some(Flaw::CommitAdopted | Flaw::OldRules))
    }

    fn fetch_next(&mut self, from: &NodeName) {
        self.effects.push(Effect::Keeper(
            from.clone(),
            ToKeeper::Fetch {
                room: self.id.clone(),
                from: self.me.clone(),
                from_seq: self.have + 1,
                to_seq: self.adopted,
            },
        ));
    }

    fn on_fetched(&mut self, node: NodeName, entries: Vec<Entry>, now: Instant) {
        let Phase::Syncing {
            fetching: Some(from),
        } = &self.phase
        else {
            return;
        };
        if *from != node {
            return;
        }
        let fits = entries.first().is_some_and(|e| e.seq == self.have + 1)
            && entries.iter().enumerate().all(|(i, e)| {
                e.seq == self.have + 1 + i as u64
                    && e.seq <= self.adopted
                    && log::epoch_at(&self.log, e.seq) == Some(e.epoch)
            });
        if !fits {
            // A stale answer, or a copy that lost what it promised: start over.
            if entries.first().is_some_and(|e| e.seq <= self.have) {
                return;
            }
            tracing::warn!(room = %self.id, from = %node, "fetched entries do not fit; claiming again");
            self.phase = Phase::Blocked {
                until: now + Duration::from_millis(200),
            };
            return;
        }
        self.progress_at = now;
        self.have = entries.last().map_or(self.have, |e| e.seq);
        self.tail.extend(entries);
        if self.have < self.adopted {
            self.fetch_next(&node);
        } else {
            self.phase = Phase::Syncing { fetching: None };
            if self.commits_adopted() {
                self.commit = self.commit.max(self.adopted);
                self.become_active(now);
                return;
            }
        }
        self.pump();
        self.check_synced(now);
    }

    fn check_synced(&mut self, now: Instant) {
        if !matches!(self.phase, Phase::Syncing { fetching: None }) {
            return;
        }
        let synced = self.placement.nodes.iter().all(|n| {
            self.replicas
                .get(n)
                .is_some_and(|r| r.acked && r.matched >= self.adopted && r.recorded >= self.target)
        });
        if synced {
            self.become_active(now);
        }
    }

    fn become_active(&mut self, now: Instant) {
        Metrics::count(&self.metrics.room_claims, "won");
        self.phase = Phase::Active;
        // The placement recorded the adopted horizon (part of the sync).
        self.horizon = self.horizon.max(self.target);
        self.progress_at = now;
        self.resent_at = now;
        tracing::info!(room = %self.id, epoch = self.epoch, last_seq = self.log.last_seq, placement = ?self.placement.nodes, "room active");
        self.load_tail();
        self.rebuild_dedupe();
        self.advance_commit(now);
        self.decide_horizon();
        for node in self.view.up().cloned().collect::<Vec<_>>() {
            self.room_active(node);
        }
        while let Some((node, cursor, sessions)) = self.subscriptions.pop_front() {
            self.subscribe(node, cursor, sessions);
        }
        while let Some(waiting) = self.queue.pop_front() {
            if !self.is_active() {
                self.queue.push_front(waiting);
                break;
            }
            self.serve(waiting.origin, waiting.op, waiting.received, now);
        }
        // Requests and subscriptions wait here only while the room claims: once it serves, their
        // buffers are given back (every room holds them, and most never queue again).
        if self.queue.is_empty() {
            self.queue = VecDeque::new();
        }
        if self.subscriptions.is_empty() {
            self.subscriptions = VecDeque::new();
        }
        self.pump();
    }

    // ---- replication ----

    fn on_appended(&mut self, epoch: Epoch, node: NodeName, outcome: AppendOutcome, now: Instant) {
        match outcome {
            AppendOutcome::Fenced { promised } => {
                self.highest_epoch = self.highest_epoch.max(promised);
                if promised > self.epoch {
                    tracing::warn!(room = %self.id, epoch = self.epoch, promised, by = %node, "fenced by a newer epoch");
                    self.stop(Stop::Fenced);
                }
            }
            _ if epoch != self.epoch
                || !matches!(self.phase, Phase::Syncing { .. } | Phase::Active) =>
            {
                // An answer to an append of an earlier epoch (or claim).
            }
            AppendOutcome::NotPromised { promised } => {
                self.highest_epoch = self.highest_epoch.max(promised);
                tracing::warn!(room = %self.id, epoch = self.epoch, by = %node, "a copy forgot its promise; claiming again");
                self.start_claim(now);
            }
            AppendOutcome::Unwritable => {
                // Not stored: the sends waiting to be committed cannot be acknowledged soon. They
                // stay in the log and are sent again (a retry with the same client id is
                // answered with their seq once committed), but their senders are told now
                // instead of at their request timeout.
                tracing::debug!(room = %self.id, by = %node, "a copy cannot write to its disk");
                let why = if node == self.me {
                    UNWRITABLE
                } else {
                    REPLICA_UNWRITABLE
                };
                // Those the node already stored may still be committed soon (in seq order).
                let stored = self.replicas.get(&node).map_or(0, |r| r.matched);
                let keep = self.inflight.partition_point(|i| i.seq <= stored);
                for inflight in self.inflight.split_off(keep) {
                    self.fail(&inflight.origin, why);
                }
            }
            AppendOutcome::Diverged { state } => {
                let point = log::common_prefix(&state, &self.log);
                if let Some(replica) = self.replicas.get_mut(&node) {
                    // It lacks what was sent (a lost message): resend from where it agrees.
                    replica.sent = replica.sent.min(point);
                    replica.base = replica.base.min(point);
                    replica.poke = true;
                }
                self.pump();
            }
            AppendOutcome::Trimmed { horizon } => {
                let Some(replica) = self.replicas.get_mut(&node) else {
                    return;
                };
                replica.trimming = false;
                if horizon > replica.recorded {
                    replica.recorded = horizon;
                    self.progress_at = now;
                }
                if self.is_active() {
                    self.serve_horizon();
                    self.decide_horizon();
                    self.send_trims();
                } else {
                    self.check_synced(now);
                }
            }
            AppendOutcome::Stored { last_seq } => {
                let Some(replica) = self.replicas.get_mut(&node) else {
                    return;
                };
                let last_seq = last_seq.min(self.log.last_seq);
                if last_seq > replica.matched || !replica.acked {
                    self.progress_at = now;
                }
                replica.acked = true;
                if last_seq > replica.matched {
                    replica.matched = last_seq;
                    replica.sent = replica.sent.max(last_seq);
                }
                if node == self.me {
                    self.store_good = self.store_good.max(last_seq);
                }
                if self.is_active() {
                    self.advance_commit(now);
                    self.trim_tail();
                    self.decide_horizon();
                } else {
                    self.check_synced(now);
                }
                self.pump();
            }
        }
    }

    /// Whether a node of the placement lacks entries it was sent, or the horizon.
    fn lagging(&self) -> bool {
        self.replicas.values().any(|r| {
            r.matched < self.log.last_seq
                || !r.acked
                || r.recorded < self.target
                || r.compacted < self.horizon
        })
    }

    fn resend_due(&self, now: Instant) -> bool {
        now.duration_since(self.progress_at.max(self.resent_at)) >= RESEND_AFTER
    }

    /// Appends or their answers were lost: sends again what is unacknowledged.
    fn resend(&mut self, now: Instant) {
        let last = self.log.last_seq;
        for replica in self.replicas.values_mut() {
            if replica.matched < last || !replica.acked {
                replica.sent = replica.matched.max(replica.base);
                replica.poke = true;
            }
            replica.trimming = false;
        }
        self.resent_at = now;
        self.pump();
        self.send_trims();
    }

    /// Sends every node of the placement what it lacks, within the replication window.
    fn pump(&mut self) {
        if !matches!(self.phase, Phase::Syncing { .. } | Phase::Active) {
            return;
        }
        for node in self.placement.nodes.clone() {
            self.pump_node(&node, WINDOW_ENTRIES);
        }
    }

    fn pump_node(&mut self, node: &NodeName, window: u64) {
        loop {
            let Some(mut replica) = self.replicas.get(node).copied() else {
                return;
            };
            if replica.sent + 1 < self.horizon {
                // It lacks entries below the deletion point, which no store may hold any more:
                // it takes the log up to there without them, then the entries from there on.
                self.trim_node(node);
                let Some(jumped) = self.replicas.get_mut(node) else {
                    return;
                };
                jumped.sent = self.horizon - 1;
                jumped.base = jumped.base.max(self.horizon - 1);
                replica = *jumped;
            }
            let floor = replica.matched.max(replica.base);
            let wants = replica.sent < self.log.last_seq || replica.poke;
            if !wants || replica.sent.saturating_sub(floor) >= window {
                return;
            }
            let from = replica.sent + 1;
            let to = self.have.min(replica.sent + CHUNK_ENTRIES as u64);
            let entries = if from <= to {
                self.range(from, to, CHUNK_BYTES)
            } else {
                Vec::new()
            };
            if entries.is_empty() && !replica.poke {
                // What it lacks is not here yet (being fetched).
                return;
            }
            let last = entries.last().map_or(replica.sent, |e| e.seq);
            self.effects.push(Effect::Keeper(
                node.clone(),
                ToKeeper::Append {
                    room: self.id.clone(),
                    epoch: self.epoch,
                    placement: self.placement.clone(),
                    after_seq: replica.sent,
                    after_epoch: log::epoch_at(&self.log, replica.sent).unwrap_or(0),
                    entries,
                    owner_last_seq: self.log.last_seq,
                    owner_runs: log::runs_after(&self.log, replica.sent),
                    adopted: self.adopted,
                },
            ));
            if let Some(replica) = self.replicas.get_mut(node) {
                replica.sent = last;
                replica.poke = false;
            }
        }
    }

    /// Commits what every node of the placement stored under this epoch: fans it out and
    /// acknowledges its senders.
    fn advance_commit(&mut self, now: Instant) {
        let point = log::commit_point(
            self.placement
                .nodes
                .iter()
                .filter_map(|n| self.replicas.get(n))
                .map(|r| &r.matched),
        )
        .min(self.have);
        if point <= self.commit || point < self.adopted {
            return;
        }
        let from = self.commit + 1;
        self.commit = point;
        if self.members.nodes().next().is_some() {
            let entries = self.range(from, point, usize::MAX);
            for chunk in chunks(entries) {
                for node in self.members.nodes() {
                    self.effects.push(Effect::Hub(
                        node.clone(),
                        ToHub::Fanout {
                            room: self.id.clone(),
                            entries: chunk.clone(),
                        },
                    ));
                }
            }
        }
        while self.inflight.front().is_some_and(|i| i.seq <= point) {
            let Some(done) = self.inflight.pop_front() else {
                break;
            };
            self.metrics
                .send_ack_seconds
                .observe(now.duration_since(done.received).as_secs_f64());
            self.reply(
                &done.origin,
                Reply::Acked {
                    room: self.id.clone(),
                    seq: done.seq,
                },
            );
        }
    }

    // ---- retention ----

    /// Decides a new horizon when the previous one is recorded everywhere, and sends it.
    fn decide_horizon(&mut self) {
        let retention = self.config.retention.of(&self.id);
        if retention.is_unbounded() || !self.is_active() || self.target > self.horizon {
            return;
        }
        let oldest = if retention.age_ms > 0 && self.target <= self.commit {
            self.range(self.target.max(1), self.commit, AGE_SCAN_BYTES)
        } else {
            Vec::new()
        };
        let next = retention::horizon(&retention, self.target, self.commit, &oldest, self.wall_ms);
        if next > self.target {
            tracing::debug!(room = %self.id, horizon = next, "retention moves the horizon");
            self.target = next;
            self.send_trims();
        }
    }

    /// Serves the decided horizon once every node of the placement recorded it.
    fn serve_horizon(&mut self) {
        let recorded = self.placement.nodes.iter().all(|n| {
            self.replicas
                .get(n)
                .is_some_and(|r| r.recorded >= self.target)
        });
        if recorded && self.target > self.horizon {
            self.horizon = self.target;
            // What is below is no longer served, nor kept in memory.
            while self.tail.front().is_some_and(|e| e.seq < self.horizon) {
                self.tail.pop_front();
            }
        }
    }

    /// Sends the horizon to every node of the placement that lacks it (or the deletion point).
    fn send_trims(&mut self) {
        if !matches!(self.phase, Phase::Syncing { .. } | Phase::Active) {
            return;
        }
        for node in self.placement.nodes.clone() {
            let Some(replica) = self.replicas.get(&node) else {
                continue;
            };
            let behind = replica.recorded < self.target || replica.compacted < self.horizon;
            if behind && !replica.trimming {
                self.trim_node(&node);
            }
        }
    }

    fn trim_node(&mut self, node: &NodeName) {
        let horizon = Horizon {
            horizon: self.target,
            compacted: self.horizon,
        };
        self.effects.push(Effect::Keeper(
            node.clone(),
            ToKeeper::Trim {
                room: self.id.clone(),
                epoch: self.epoch,
                owner: self.me.clone(),
                horizon,
                runs: log::truncate(&self.log, self.horizon.saturating_sub(1)).runs,
            },
        ));
        if let Some(replica) = self.replicas.get_mut(node) {
            replica.trimming = true;
            replica.compacted = replica.compacted.max(self.horizon);
        }
    }

    // ---- serving ----

    fn serve(&mut self, origin: Origin, op: RoomOp, received: Instant, now: Instant) {
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
                        self.newest(from.max(self.horizon), seq, PAGE_BYTES)
                    }
                    _ => Vec::new(),
                };
                let room = self.id.clone();
                let reply = match since {
                    // Messages after `since` were dropped by retention.
                    Some(since) if since + 1 < self.horizon => Reply::JoinedBelowHorizon {
                        room,
                        seq,
                        replay,
                        horizon: self.horizon,
                    },
                    _ => Reply::Joined { room, seq, replay },
                };
                self.reply(&origin, reply);
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
            } => self.publish(origin, user, text, client_id, received, now),
            RoomOp::GetHistory { before, limit } => {
                let before = before.unwrap_or(u64::MAX).min(self.commit + 1);
                let wanted_from = before.saturating_sub(u64::from(limit)).max(1);
                let from = wanted_from.max(self.horizon);
                let messages = if before <= from {
                    Vec::new()
                } else {
                    self.newest(from, before - 1, PAGE_BYTES)
                };
                let room = self.id.clone();
                let reply = if wanted_from < self.horizon {
                    Reply::HistoryBelowHorizon {
                        room,
                        messages,
                        horizon: self.horizon,
                    }
                } else {
                    Reply::History { room, messages }
                };
                self.reply(&origin, reply);
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
        origin: Origin,
        user: UserName,
        text: String,
        client_id: Option<String>,
        received: Instant,
        now: Instant,
    ) {
        if !self.view.quorum {
            self.fail(
                &origin,
                "this node is cut off from the majority of the cluster; retry",
            );
            return;
        }
        if let Some(id) = &client_id
            && let Some(&seq) = self.dedupe.get(&(user.clone(), id.clone()))
        {
            // A retry: acknowledged with the first copy's seq, once that copy is committed.
            if seq <= self.commit {
                self.reply(
                    &origin,
                    Reply::Acked {
                        room: self.id.clone(),
                        seq,
                    },
                );
            } else if !self.reader.writable() {
                self.fail(&origin, UNWRITABLE);
            } else {
                let epoch = log::epoch_at(&self.log, seq).unwrap_or(self.epoch);
                let at = self.inflight.partition_point(|i| i.seq <= seq);
                self.inflight.insert(
                    at,
                    Inflight {
                        seq,
                        epoch,
                        origin,
                        received,
                    },
                );
            }
            return;
        }
        if !self.reader.writable() {
            // Refused at once rather than sequenced to wait for a disk that may stay full: the
            // room's log is left as it was.
            self.fail(&origin, UNWRITABLE);
            return;
        }
        let seq = self.log.last_seq + 1;
        let ts = self.wall_ms.max(self.last_ts);
        self.last_ts = ts;
        let entry = Entry {
            seq,
            epoch: self.epoch,
            from: user.clone(),
            text,
            ts,
            client_id: client_id.clone(),
        };
        log::extend(&mut self.log, std::slice::from_ref(&entry));
        self.have = seq;
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
        if self.inflight.len() == 1 {
            // The resend timer starts with the first message waiting for acknowledgements.
            self.resent_at = now;
        }
        self.metrics.messages_stored.inc();
        if !self.flush_scheduled {
            self.flush_scheduled = true;
            self.effects.push(Effect::Flush);
        }
    }

    fn subscribe(&mut self, node: NodeName, cursor: u64, sessions: Vec<(SessionId, UserName)>) {
        if !self.view.is_up(&node) {
            return;
        }
        // Rebuilt membership after a move: not news to anyone, so no presence events.
        let _ = self.members.replace_node(&node, &sessions);
        if sessions.is_empty() {
            return;
        }
        if cursor.saturating_add(1) < self.horizon {
            // What follows the cursor was dropped: the node moves past it instead of asking for
            // it again and again.
            self.effects.push(Effect::Hub(
                node.clone(),
                ToHub::Horizon {
                    room: self.id.clone(),
                    horizon: self.horizon,
                },
            ));
        }
        if cursor >= self.commit {
            return;
        }
        // Oldest first, from just after the cursor: the node's stream must stay contiguous.
        // What one re-send cannot hold follows when the node asks again (`Behind`).
        let from = (cursor + 1).max(self.horizon);
        let entries = self.range(from, self.commit, CATCH_UP_BYTES);
        let behind = entries.last().is_some_and(|e| e.seq < self.commit);
        for chunk in chunks(entries) {
            self.effects.push(Effect::Hub(
                node.clone(),
                ToHub::Fanout {
                    room: self.id.clone(),
                    entries: chunk,
                },
            ));
        }
        if behind {
            self.effects.push(Effect::Hub(
                node,
                ToHub::Behind {
                    room: self.id.clone(),
                },
            ));
        }
    }

    fn room_active(&mut self, node: NodeName) {
        self.effects.push(Effect::Hub(
            node,
            ToHub::RoomActive {
                room: self.id.clone(),
                owner: self.me.clone(),
            },
        ));
    }

    fn presence(&mut self, user: &UserName, event: PresenceEvent) {
        for node in self.members.nodes() {
            self.effects.push(Effect::Hub(
                node.clone(),
                ToHub::Presence {
                    room: self.id.clone(),
                    user: user.clone(),
                    event,
                },
            ));
        }
    }

    fn stop(&mut self, why: Stop) {
        if matches!(self.phase, Phase::Stopped) {
            return;
        }
        tracing::info!(room = %self.id, epoch = self.epoch, why = why.as_str(), "stepping down");
        self.fail_all("the room moved; retry");
        self.phase = Phase::Stopped;
        self.effects.push(Effect::Stop(why));
    }

    fn fail_all(&mut self, message: &str) {
        while let Some(waiting) = self.queue.pop_front() {
            self.fail(&waiting.origin, message);
        }
        while let Some(inflight) = self.inflight.pop_front() {
            self.fail(&inflight.origin, message);
        }
    }

    fn reply(&mut self, origin: &Origin, reply: Reply) {
        if origin.req == 0 {
            return;
        }
        self.effects.push(Effect::Hub(
            origin.node.clone(),
            ToHub::Reply {
                req: origin.req,
                reply,
            },
        ));
    }

    fn fail(&mut self, origin: &Origin, message: &str) {
        self.reply(
            origin,
            Reply::Failed {
                code: ErrorCode::Unavailable,
                message: message.to_owned(),
            },
        );
    }

    fn random(&mut self) -> u64 {
        // xorshift: jitter only, not a secret.
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        x
    }

    // ---- entries ----

    /// Entries `from..=to` (at most up to what this owner holds), from the tail and, below it,
    /// from the store; at least one when any exists, then up to about `max_bytes`.
    fn range(&self, from: u64, to: u64, max_bytes: usize) -> Vec<Entry> {
        let to = to.min(self.have);
        if from > to {
            return Vec::new();
        }
        let tail_start = self.tail.front().map_or(u64::MAX, |e| e.seq);
        let mut out = Vec::new();
        let mut bytes = 0;
        if from < tail_start {
            let upto = to.min(tail_start.saturating_sub(1)).min(self.store_good);
            if upto < from {
                return out;
            }
            match self.reader.entries(&self.id, from, upto, max_bytes) {
                Ok(stored) => {
                    bytes = stored.iter().map(|e| e.text.len() + 64).sum();
                    let complete = stored.last().map(|e| e.seq) == Some(upto);
                    out = stored;
                    if !complete || bytes >= max_bytes || upto < tail_start.saturating_sub(1) {
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

    /// The newest entries of `from..=to` whose rendered frames fit in about `max_bytes` (always
    /// at least one).
    fn newest(&self, from: u64, to: u64, max_bytes: usize) -> Vec<Entry> {
        let mut entries = self.range(from, to, usize::MAX);
        // Measured from the newest, and only as far as the page goes: a rendered length scans
        // the whole text.
        let mut bytes = 0;
        let mut keep = 0;
        for entry in entries.iter().rev() {
            let len = rendered_len(entry);
            if keep > 0 && bytes + len > max_bytes {
                break;
            }
            bytes += len;
            keep += 1;
        }
        entries.drain(..entries.len() - keep);
        entries
    }

    fn load_tail(&mut self) {
        // The committed stretch below the tail comes from the store, for replays.
        let first_in_tail = self.tail.front().map_or(self.have + 1, |e| e.seq);
        let upto = first_in_tail.saturating_sub(1).min(self.store_good);
        if upto == 0 || first_in_tail > self.store_good + 1 {
            return;
        }
        let from = upto
            .saturating_sub(TAIL_KEEP as u64 - 1)
            .max(1)
            .max(self.horizon);
        if from > upto {
            return;
        }
        match self.reader.entries(&self.id, from, upto, usize::MAX) {
            Ok(entries) => {
                for entry in entries.into_iter().rev() {
                    self.tail.push_front(entry);
                }
            }
            Err(e) => tracing::error!(room = %self.id, error = %e, "store read failed"),
        }
    }

    fn trim_tail(&mut self) {
        let keep_from = self.commit.min(self.store_good);
        while self.tail.len() > TAIL_KEEP && self.tail.front().is_some_and(|e| e.seq <= keep_from) {
            self.tail.pop_front();
        }
    }

    fn rebuild_dedupe(&mut self) {
        self.dedupe.clear();
        self.dedupe_order.clear();
        let from = (self.have.saturating_sub(DEDUPE_KEEP as u64) + 1).max(self.horizon);
        for entry in self.range(from, self.have, usize::MAX) {
            if let Some(id) = entry.client_id {
                self.remember(entry.from, id, entry.seq);
            }
        }
        self.last_ts = self.last_ts.max(self.tail.back().map_or(0, |e| e.ts));
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

/// About the bytes of an entry's `message` frame: the text as rendered in JSON, plus the fields
/// around it.
fn rendered_len(entry: &Entry) -> usize {
    chat_protocol::client::json_string_len(&entry.text)
        + entry.from.as_str().len()
        + entry.client_id.as_deref().map_or(0, str::len)
        + 96
}

#[cfg(test)]
mod tests {
    //! The room core driven by hand against real keeper cores and in-memory disks: every
    //! message is delivered (or dropped) by the test, time is given explicitly.

    use std::collections::{BTreeMap, VecDeque};
    use std::sync::Mutex;

    use super::*;
    use crate::cluster::view::{Member, Status};
    use crate::rooms::keeper::{KeeperCore, KeeperEffect};
    use crate::store::Write;

    fn node(name: &str) -> NodeName {
        NodeName::new(name).unwrap()
    }

    fn user() -> UserName {
        UserName::new("alice").unwrap()
    }

    fn view(me: &str, up: &[&str]) -> Arc<View> {
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
                session: 1,
            })
            .collect();
        Arc::new(View::new(node(me), members, true, 1))
    }

    #[derive(Default)]
    struct Disk {
        logs: BTreeMap<RoomId, LogState>,
        horizons: BTreeMap<RoomId, Horizon>,
        entries: BTreeMap<u64, Entry>,
        /// What `Store::writable` reports, negated.
        unwritable: bool,
    }

    struct Shared(Arc<Mutex<Disk>>);

    impl LogReader for Shared {
        fn entries(
            &self,
            _room: &RoomId,
            from: u64,
            to: u64,
            _max: usize,
        ) -> Result<Vec<Entry>, StoreError> {
            let disk = self.0.lock().unwrap();
            Ok(disk
                .entries
                .range(from..=to)
                .map(|(_, e)| e.clone())
                .collect())
        }

        fn writable(&self) -> bool {
            !self.0.lock().unwrap().unwritable
        }
    }

    /// Three nodes' keepers and disks, and what travels between them.
    struct Cluster {
        keepers: BTreeMap<NodeName, KeeperCore>,
        disks: BTreeMap<NodeName, Arc<Mutex<Disk>>>,
        /// Messages for room cores, by destination node.
        to_rooms: VecDeque<(NodeName, ToRoom)>,
        /// Messages for hubs.
        to_hubs: Vec<(NodeName, ToHub)>,
        /// Appends to these nodes are lost.
        lose_appends_to: Vec<NodeName>,
        /// Trims to these nodes are lost.
        lose_trims_to: Vec<NodeName>,
        /// The retention of the cores made from now on.
        retention: RetentionPolicy,
        now: Instant,
    }

    impl Cluster {
        fn new() -> Cluster {
            let names = ["a", "b", "c"].map(node);
            Cluster {
                keepers: names
                    .iter()
                    .map(|n| (n.clone(), KeeperCore::new(n.clone())))
                    .collect(),
                disks: names.iter().map(|n| (n.clone(), Arc::default())).collect(),
                to_rooms: VecDeque::new(),
                to_hubs: Vec::new(),
                lose_appends_to: Vec::new(),
                lose_trims_to: Vec::new(),
                retention: RetentionPolicy::default(),
                now: Instant::now(),
            }
        }

        fn core(&self, me: &str, up: &[&str], flaw: Option<Flaw>) -> RoomCore {
            let config = RoomConfig {
                replication_factor: 2,
                replay_cap: 1000,
                idle: Duration::from_secs(60),
                queue_timeout: Duration::from_secs(4),
                retention: self.retention.clone(),
                flaw,
            };
            let disk = self.disks[&node(me)].clone();
            // As the actor does: start above what this node's copy promised.
            let promised = disk
                .lock()
                .unwrap()
                .logs
                .get(&room())
                .map_or(0, |s| s.promised);
            RoomCore::new(
                room(),
                node(me),
                view(me, up),
                config,
                Arc::new(Shared(disk)),
                Metrics::new(),
                promised,
                1,
                self.now,
            )
        }

        /// Carries out the core's effects; keeper writes are durable at once.
        fn effects(&mut self, core: &mut RoomCore) {
            loop {
                let effects = core.take_effects();
                if effects.is_empty() {
                    return;
                }
                self.carry_out(core, effects);
            }
        }

        fn carry_out(&mut self, core: &mut RoomCore, effects: Vec<Effect>) {
            for effect in effects {
                match effect {
                    Effect::Keeper(to, message) => {
                        if matches!(message, ToKeeper::Append { .. })
                            && self.lose_appends_to.contains(&to)
                        {
                            continue;
                        }
                        if matches!(message, ToKeeper::Trim { .. })
                            && self.lose_trims_to.contains(&to)
                        {
                            continue;
                        }
                        self.keeper(&to, message);
                    }
                    Effect::Hub(to, message) => self.to_hubs.push((to, message)),
                    Effect::Flush => core.on_flush(),
                    Effect::Stop(_) => {}
                }
            }
        }

        fn keeper(&mut self, at: &NodeName, message: ToKeeper) {
            let disk = self.disks[at].clone();
            let keeper = self.keepers.get_mut(at).unwrap();
            let effects = keeper
                .on(message, false, |room| {
                    let d = disk.lock().unwrap();
                    Ok((
                        d.logs.get(room).cloned().unwrap_or_default(),
                        d.horizons.get(room).copied().unwrap_or_default(),
                    ))
                })
                .unwrap();
            for effect in effects {
                match effect {
                    KeeperEffect::Write {
                        write:
                            Write::Log {
                                room,
                                state,
                                truncate_after,
                                entries,
                            },
                        to,
                        answer,
                        ..
                    } => {
                        let mut d = disk.lock().unwrap();
                        if let Some(after) = truncate_after {
                            d.entries.split_off(&(after + 1));
                        }
                        for e in entries {
                            d.entries.insert(e.seq, e);
                        }
                        d.logs.insert(room, state);
                        self.to_rooms.push_back((to, answer));
                    }
                    KeeperEffect::Write {
                        write:
                            Write::Trim {
                                room,
                                state,
                                horizon,
                                truncate_after,
                            },
                        to,
                        answer,
                        ..
                    } => {
                        // Compaction is at once here.
                        let mut d = disk.lock().unwrap();
                        if let Some(after) = truncate_after {
                            d.entries.split_off(&(after + 1));
                        }
                        d.entries = d.entries.split_off(&horizon.compacted);
                        d.logs.insert(room.clone(), state);
                        d.horizons.insert(room, horizon);
                        self.to_rooms.push_back((to, answer));
                    }
                    KeeperEffect::Answer { to, answer, .. } => {
                        self.to_rooms.push_back((to, answer))
                    }
                    KeeperEffect::Fetch {
                        to,
                        from_seq,
                        to_seq,
                        ..
                    } => {
                        let entries = disk
                            .lock()
                            .unwrap()
                            .entries
                            .range(from_seq..=to_seq)
                            .map(|(_, e)| e.clone())
                            .collect();
                        let node = at.clone();
                        self.to_rooms
                            .push_back((to, ToRoom::Fetched { node, entries }));
                    }
                    KeeperEffect::Write { .. } => {}
                }
            }
        }

        /// Delivers every message for `core`'s node to it until none is left.
        fn settle(&mut self, core: &mut RoomCore) {
            self.effects(core);
            while let Some(i) = self.to_rooms.iter().position(|(n, _)| n == &core.me) {
                let (_, message) = self.to_rooms.remove(i).unwrap();
                core.on_peer(message, self.now, self.now, 1_000);
                self.effects(core);
            }
            self.to_rooms.clear();
        }

        fn send(&mut self, core: &mut RoomCore, req: u64, text: &str, id: &str) {
            let op = RoomOp::Publish {
                user: user(),
                text: text.into(),
                client_id: Some(id.into()),
            };
            self.request(core, req, op);
        }

        /// Hands `op` to `core` as request `req` from node c, and lets everything settle.
        fn request(&mut self, core: &mut RoomCore, req: u64, op: RoomOp) {
            let origin = Origin {
                node: node("c"),
                req,
            };
            let request = ToRoom::Request {
                origin,
                op,
                hops: 0,
            };
            core.on_peer(request, self.now, self.now, 1_000);
            self.settle(core);
        }

        /// The seq acknowledged to request `req`, if any; errors are `Err`.
        fn acked(&self, req: u64) -> Option<Result<u64, String>> {
            self.to_hubs.iter().find_map(|(_, m)| match m {
                ToHub::Reply {
                    req: r,
                    reply: Reply::Acked { seq, .. },
                } if *r == req => Some(Ok(*seq)),
                ToHub::Reply {
                    req: r,
                    reply: Reply::Failed { message, .. },
                } if *r == req => Some(Err(message.clone())),
                _ => None,
            })
        }

        fn stored(&self, at: &str) -> Vec<(u64, String)> {
            let disk = self.disks[&node(at)].lock().unwrap();
            disk.entries
                .values()
                .map(|e| (e.seq, e.text.clone()))
                .collect()
        }
    }

    /// A room placed on a (owner) then c with everyone up, and owned by c when a is down.
    fn room() -> RoomId {
        let all = view("a", &["a", "b", "c"]);
        let without_a = view("c", &["b", "c"]);
        (0..1000)
            .map(|i| RoomId::new(&format!("r{i}")).unwrap())
            .find(|r| {
                all.room_placement(r, 2) == vec![node("a"), node("c")]
                    && without_a.owner(r) == Some(&node("c"))
            })
            .unwrap()
    }

    #[test]
    fn a_room_claims_syncs_and_acknowledges_once_the_placement_stored_a_message() {
        let mut cluster = Cluster::new();
        let mut core = cluster.core("a", &["a", "b", "c"], None);
        cluster.settle(&mut core);
        assert!(core.is_active());
        assert_eq!(core.epoch(), 1);
        // Replica c loses the append: nothing is acknowledged yet.
        cluster.lose_appends_to = vec![node("c")];
        cluster.send(&mut core, 1, "hello", "m1");
        assert_eq!(cluster.acked(1), None, "c does not hold it");
        assert_eq!(core.commit(), 0);
        assert_eq!(cluster.stored("a"), vec![(1, "hello".into())]);
        // The resend after a second of silence reaches it: acknowledged, seq 1.
        cluster.lose_appends_to.clear();
        cluster.now += RESEND_AFTER;
        core.on_tick(cluster.now);
        cluster.settle(&mut core);
        assert_eq!(cluster.acked(1), Some(Ok(1)));
        assert_eq!(core.commit(), 1);
        assert_eq!(cluster.stored("c"), vec![(1, "hello".into())]);
        // A retry of the same id is acknowledged with the same seq and stored once.
        cluster.send(&mut core, 2, "hello", "m1");
        assert_eq!(cluster.acked(2), Some(Ok(1)));
        assert_eq!(cluster.stored("a").len(), 1);
    }

    #[test]
    fn a_copy_that_cannot_write_fails_the_waiting_sends_at_once_and_acks_nothing_unstored() {
        let mut cluster = Cluster::new();
        let mut core = cluster.core("a", &["a", "b", "c"], None);
        cluster.settle(&mut core);
        cluster.send(&mut core, 1, "one", "m1");
        assert_eq!(cluster.acked(1), Some(Ok(1)));
        // c's disk is full: its keeper answers the append `Unwritable` instead of storing it.
        cluster.lose_appends_to = vec![node("c")];
        cluster.send(&mut core, 2, "two", "m2");
        assert_eq!(cluster.acked(2), None);
        let epoch = core.epoch();
        core.on_peer(
            ToRoom::Appended {
                epoch,
                node: node("c"),
                outcome: AppendOutcome::Unwritable,
            },
            cluster.now,
            cluster.now,
            1_000,
        );
        cluster.effects(&mut core);
        assert_eq!(cluster.acked(2), Some(Err(REPLICA_UNWRITABLE.into())));
        assert_eq!(core.commit(), 1, "nothing unstored is committed");
        // Once c writes again, the entry is sent again and committed; a retry of the same id is
        // acknowledged with its seq, stored once.
        cluster.lose_appends_to.clear();
        cluster.now += RESEND_AFTER;
        core.on_tick(cluster.now);
        cluster.settle(&mut core);
        assert_eq!(core.commit(), 2);
        cluster.send(&mut core, 3, "two", "m2");
        assert_eq!(cluster.acked(3), Some(Ok(2)));
        assert_eq!(cluster.stored("c").len(), 2);
    }

    #[test]
    fn sends_are_refused_at_once_while_this_nodes_store_cannot_write() {
        let mut cluster = Cluster::new();
        let mut core = cluster.core("a", &["a", "b", "c"], None);
        cluster.settle(&mut core);
        cluster.send(&mut core, 1, "one", "m1");
        assert_eq!(cluster.acked(1), Some(Ok(1)));
        cluster.disks[&node("a")].lock().unwrap().unwritable = true;
        cluster.send(&mut core, 2, "two", "m2");
        assert_eq!(cluster.acked(2), Some(Err(UNWRITABLE.into())));
        // Nothing was sequenced: the log is as it was, and a committed retry is still acked.
        assert_eq!(cluster.stored("a").len(), 1);
        cluster.send(&mut core, 3, "one", "m1");
        assert_eq!(cluster.acked(3), Some(Ok(1)));
        cluster.disks[&node("a")].lock().unwrap().unwritable = false;
        cluster.send(&mut core, 4, "two", "m2");
        assert_eq!(cluster.acked(4), Some(Ok(2)));
    }

    /// The first step of the double-fault fork: the owner stored seq 2, its replica did not.
    fn owner_alone_holds_seq_2(cluster: &mut Cluster) {
        let mut first = cluster.core("a", &["a", "b", "c"], None);
        cluster.settle(&mut first);
        cluster.send(&mut first, 1, "m1", "a");
        assert_eq!(cluster.acked(1), Some(Ok(1)));
        cluster.lose_appends_to = vec![node("c")];
        cluster.send(&mut first, 2, "m2", "x");
        assert_eq!(cluster.acked(2), None);
        assert_eq!(cluster.stored("a").len(), 2);
        assert_eq!(cluster.stored("c").len(), 1);
        cluster.lose_appends_to.clear();
        cluster.to_hubs.clear();
        // a's room restarts (its actor failed, say) and claims again over its own copy.
    }

    #[test]
    fn adopted_entries_are_committed_only_once_the_placement_holds_them_under_the_new_epoch() {
        owner_alone_holds_seq_2(&mut Cluster::new());
        let mut cluster = Cluster::new();
        owner_alone_holds_seq_2(&mut cluster);
        cluster.lose_appends_to = vec![node("c")];
        let mut again = cluster.core("a", &["a", "b", "c"], None);
        cluster.settle(&mut again);
        assert!(!again.is_active(), "c lacks seq 2 under the new epoch");
        // The retry of x waits instead of being acknowledged from the dedupe table.
        cluster.send(&mut again, 3, "m2", "x");
        assert_eq!(cluster.acked(3), None);
        assert_eq!(again.commit(), 0);
        // Once c stored it under epoch 2, seq 2 is committed and the retry acknowledged.
        cluster.lose_appends_to.clear();
        cluster.now += RESEND_AFTER;
        again.on_tick(cluster.now);
        cluster.settle(&mut again);
        assert!(again.is_active());
        assert_eq!(again.commit(), 2);
        assert_eq!(cluster.acked(3), Some(Ok(2)));
        assert_eq!(cluster.stored("c").len(), 2);
        let disk = cluster.disks[&node("c")].lock().unwrap();
        assert_eq!(disk.logs[&room()].synced, 2);
    }

    #[test]
    fn with_the_broken_rule_adopted_entries_are_acknowledged_before_the_placement_holds_them() {
        // What the simulation catches: proof that this test harness sees the difference.
        let mut cluster = Cluster::new();
        owner_alone_holds_seq_2(&mut cluster);
        cluster.lose_appends_to = vec![node("c")];
        let mut flawed = cluster.core("a", &["a", "b", "c"], Some(Flaw::CommitAdopted));
        cluster.settle(&mut flawed);
        cluster.send(&mut flawed, 3, "m2", "x");
        assert_eq!(
            cluster.acked(3),
            Some(Ok(2)),
            "acknowledged while only a holds it"
        );
        assert_eq!(cluster.stored("c").len(), 1);
    }

    #[test]
    fn a_new_owner_adopts_the_copy_with_the_highest_sync_label() {
        let mut cluster = Cluster::new();
        owner_alone_holds_seq_2(&mut cluster);
        // a is gone; c takes the room (b, c up) and syncs its copy [1] under epoch 2.
        let mut at_c = cluster.core("c", &["b", "c"], None);
        cluster.settle(&mut at_c);
        assert!(at_c.is_active());
        assert_eq!(at_c.commit(), 1);
        // a comes back and claims: its longer copy (synced 1) loses to c's (synced 2).
        let mut back = cluster.core("a", &["a", "b", "c"], None);
        cluster.settle(&mut back);
        if !back.is_active() {
            // Its first epoch was below c's: refused, it backs off and claims above.
            cluster.now += Duration::from_millis(200);
            back.on_tick(cluster.now);
            cluster.settle(&mut back);
        }
        assert!(back.is_active());
        assert_eq!(back.commit(), 1);
        assert_eq!(
            cluster.stored("a"),
            vec![(1, "m1".into())],
            "seq 2 was never acked"
        );
        // The retry of x is a new message at seq 2.
        cluster.send(&mut back, 4, "m2", "x");
        assert_eq!(cluster.acked(4), Some(Ok(2)));
    }

    #[test]
    fn a_fenced_owner_steps_down_and_fails_what_it_holds() {
        let mut cluster = Cluster::new();
        let mut core = cluster.core("a", &["a", "b", "c"], None);
        cluster.settle(&mut core);
        // Another claimer gets epoch 5 promised by c.
        cluster.keeper(
            &node("c"),
            ToKeeper::Promise {
                room: room(),
                epoch: 5,
                placement: Placement {
                    epoch: 5,
                    nodes: vec![node("c"), node("b")],
                },
            },
        );
        // c tells the old owner at once.
        let notice = cluster
            .to_rooms
            .iter()
            .position(|(n, m)| {
                *n == node("a")
                    && matches!(
                        m,
                        ToRoom::Appended {
                            outcome: AppendOutcome::Fenced { promised: 5 },
                            ..
                        }
                    )
            })
            .expect("a fence notice for a");
        let (_, notice) = cluster.to_rooms.remove(notice).unwrap();
        cluster.to_rooms.clear();
        core.on_peer(notice, cluster.now, cluster.now, 1_000);
        assert!(core.take_effects().contains(&Effect::Stop(Stop::Fenced)));
        assert!(!core.is_active());
        // A request after that is refused at once.
        let origin = Origin {
            node: node("c"),
            req: 9,
        };
        core.on_peer(
            ToRoom::Request {
                origin,
                op: RoomOp::GetMembers,
                hops: 0,
            },
            cluster.now,
            cluster.now,
            1_000,
        );
        cluster.effects(&mut core);
        assert!(matches!(cluster.acked(9), Some(Err(_))));
    }

    #[test]
    fn requests_wait_for_the_claim_and_expire_after_the_queue_timeout() {
        let mut cluster = Cluster::new();
        let mut core = cluster.core("a", &["a", "b", "c"], None);
        // No answer to the promises yet: the send waits.
        core.take_effects();
        cluster.send_no_settle(&mut core, 1);
        assert_eq!(cluster.acked(1), None);
        assert!(
            core.next_wake()
                .is_some_and(|w| w <= cluster.now + Duration::from_secs(4))
        );
        cluster.now += Duration::from_secs(4);
        core.on_tick(cluster.now);
        cluster.effects(&mut core);
        assert!(
            matches!(cluster.acked(1), Some(Err(_))),
            "{:?}",
            cluster.to_hubs
        );
    }

    impl Cluster {
        fn send_no_settle(&mut self, core: &mut RoomCore, req: u64) {
            let origin = Origin {
                node: node("c"),
                req,
            };
            let op = RoomOp::Publish {
                user: user(),
                text: "t".into(),
                client_id: None,
            };
            core.on_peer(
                ToRoom::Request {
                    origin,
                    op,
                    hops: 0,
                },
                self.now,
                self.now,
                1_000,
            );
        }
    }

    #[test]
    fn a_copy_that_lost_its_promise_makes_the_owner_claim_again() {
        let mut cluster = Cluster::new();
        let mut core = cluster.core("a", &["a", "b", "c"], None);
        cluster.settle(&mut core);
        cluster.send(&mut core, 1, "m1", "a");
        assert_eq!(core.epoch(), 1);
        // c's disk is wiped (and its keeper restarted): it has promised nothing.
        *cluster.disks[&node("c")].lock().unwrap() = Disk::default();
        cluster
            .keepers
            .insert(node("c"), KeeperCore::new(node("c")));
        cluster.send(&mut core, 2, "m2", "b");
        assert!(core.epoch() > 1, "claimed again");
        assert_eq!(cluster.acked(2), Some(Ok(2)));
        assert_eq!(
            cluster.stored("c"),
            vec![(1, "m1".into()), (2, "m2".into())],
            "the new placement is brought up to the log"
        );
    }

    impl Cluster {
        /// Sends `op` as request `req` and returns the reply.
        fn ask(&mut self, core: &mut RoomCore, req: u64, op: RoomOp) -> Reply {
            self.request(core, req, op);
            self.to_hubs
                .iter()
                .find_map(|(_, m)| match m {
                    ToHub::Reply { req: r, reply } if *r == req => Some(reply.clone()),
                    _ => None,
                })
                .expect("a reply")
        }
    }

    impl Cluster {
        /// An active core on a, with retention keeping `messages` messages.
        fn keeping(&mut self, messages: u64) -> RoomCore {
            self.retention = RetentionPolicy {
                default: retention::Retention {
                    messages,
                    age_ms: 0,
                },
                rooms: Default::default(),
            };
            let mut core = self.core("a", &["a", "b", "c"], None);
            self.settle(&mut core);
            core
        }

        /// Node c subscribes at `core` with `cursor` (one session): what `core` sends c's hub.
        fn subscribe_c(&mut self, core: &mut RoomCore, cursor: u64) -> Vec<ToHub> {
            self.to_hubs.clear();
            let message = ToRoom::Subscribe {
                node: node("c"),
                cursor,
                sessions: vec![(1, user())],
            };
            core.on_peer(message, self.now, self.now, 1_000);
            self.settle(core);
            std::mem::take(&mut self.to_hubs)
                .into_iter()
                .filter(|(to, _)| *to == node("c"))
                .map(|(_, message)| message)
                .collect()
        }

        /// Sends `m1` ..= `m{count}` (ids `id1` …) as requests 1 ..= `count`.
        fn send_numbered(&mut self, core: &mut RoomCore, count: u64) {
            for i in 1..=count {
                self.send(core, i, &format!("m{i}"), &format!("id{i}"));
            }
        }
    }

    fn seqs(entries: &[Entry]) -> Vec<u64> {
        entries.iter().map(|e| e.seq).collect()
    }

    #[test]
    fn retention_drops_old_messages_on_every_copy_and_a_new_owner_keeps_the_horizon() {
        let mut cluster = Cluster::new();
        let mut core = cluster.keeping(3);
        cluster.send_numbered(&mut core, 10);
        assert_eq!(core.commit(), 10);
        assert_eq!(core.horizon(), 8, "the newest 3 are kept");
        let kept: Vec<(u64, String)> = (8..=10).map(|s| (s, format!("m{s}"))).collect();
        assert_eq!(cluster.stored("a"), kept);
        assert_eq!(cluster.stored("c"), kept);
        // `history` reaching below the horizon says where the log starts.
        let history = RoomOp::GetHistory {
            before: None,
            limit: 50,
        };
        match cluster.ask(&mut core, 100, history.clone()) {
            Reply::HistoryBelowHorizon {
                messages, horizon, ..
            } => {
                assert_eq!(seqs(&messages), [8, 9, 10]);
                assert_eq!(horizon, 8);
            }
            other => panic!("{other:?}"),
        }
        // Within the kept messages it is a plain reply.
        let newest = RoomOp::GetHistory {
            before: None,
            limit: 2,
        };
        assert!(matches!(
            cluster.ask(&mut core, 101, newest),
            Reply::History { .. }
        ));
        // A join resuming below the horizon is told that messages were dropped.
        let join = |since| RoomOp::Join {
            session: 1,
            user: user(),
            since: Some(since),
        };
        match cluster.ask(&mut core, 102, join(2)) {
            Reply::JoinedBelowHorizon {
                replay, horizon, ..
            } => {
                assert_eq!(seqs(&replay), [8, 9, 10]);
                assert_eq!(horizon, 8);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            cluster.ask(&mut core, 103, join(7)),
            Reply::Joined { .. }
        ));
        // a is gone: c takes the room with b, which held nothing. c adopts the horizon, and b
        // gets the log from the horizon on, without what is below.
        cluster.to_hubs.clear();
        let mut at_c = cluster.core("c", &["b", "c"], None);
        cluster.settle(&mut at_c);
        assert!(at_c.is_active());
        assert_eq!(at_c.commit(), 10);
        assert_eq!(at_c.horizon(), 8);
        assert_eq!(cluster.stored("b"), kept);
        match cluster.ask(&mut at_c, 104, history) {
            Reply::HistoryBelowHorizon {
                messages, horizon, ..
            } => {
                assert_eq!(seqs(&messages), [8, 9, 10]);
                assert_eq!(horizon, 8);
            }
            other => panic!("{other:?}"),
        }
        // It goes on: the new owner moves the horizon as it commits.
        cluster.send(&mut at_c, 105, "m11", "id11");
        assert_eq!(cluster.acked(105), Some(Ok(11)));
        assert_eq!(at_c.horizon(), 9);
        assert_eq!(
            cluster.stored("b"),
            (9..=11).map(|s| (s, format!("m{s}"))).collect::<Vec<_>>()
        );
    }

    #[test]
    fn a_subscription_from_below_the_horizon_is_told_where_the_log_starts_before_the_resend() {
        let mut cluster = Cluster::new();
        let mut core = cluster.keeping(3);
        cluster.send_numbered(&mut core, 10);
        assert_eq!(core.horizon(), 8);
        let mut subscribe = |cluster: &mut Cluster, cursor: u64| {
            cluster
                .subscribe_c(&mut core, cursor)
                .into_iter()
                .map(|message| match message {
                    ToHub::Horizon { horizon, .. } => format!("horizon {horizon}"),
                    ToHub::Fanout { entries, .. } => format!("fanout {:?}", seqs(&entries)),
                    other => format!("{other:?}"),
                })
                .collect::<Vec<_>>()
        };
        // 3..=7 were dropped: the node is told so first, then gets the rest.
        assert_eq!(
            subscribe(&mut cluster, 2),
            ["horizon 8", "fanout [8, 9, 10]"]
        );
        // From just below the horizon nothing it asked for is gone.
        assert_eq!(subscribe(&mut cluster, 7), ["fanout [8, 9, 10]"]);
        assert!(subscribe(&mut cluster, 10).is_empty());
    }

    #[test]
    fn a_node_far_behind_gets_the_oldest_part_first_and_is_asked_to_come_back_for_the_rest() {
        let mut cluster = Cluster::new();
        let mut core = cluster.core("a", &["a", "b", "c"], None);
        cluster.settle(&mut core);
        // Six messages of 256 KiB: more than one re-send holds (CATCH_UP_BYTES).
        let big = "x".repeat(CATCH_UP_BYTES / 4);
        for i in 1..=6 {
            cluster.send(&mut core, i, &big, &format!("id{i}"));
        }
        assert_eq!(core.commit(), 6);
        let mut subscribe = |cluster: &mut Cluster, cursor: u64| {
            let mut seqs_sent = Vec::new();
            let mut behind = false;
            for message in cluster.subscribe_c(&mut core, cursor) {
                match message {
                    ToHub::Fanout { entries, .. } => {
                        assert!(!behind, "a fan-out after Behind");
                        seqs_sent.extend(seqs(&entries));
                    }
                    ToHub::Behind { .. } => behind = true,
                    _ => {}
                }
            }
            (seqs_sent, behind)
        };
        // From the start: the oldest part, contiguous after the cursor, then Behind.
        let (first, behind) = subscribe(&mut cluster, 0);
        assert!(behind, "the rest was not announced");
        assert_eq!(first, (1..=first.len() as u64).collect::<Vec<_>>());
        assert!(first.len() < 6, "{first:?}");
        // Asked again from where that left the node: the rest, and no Behind.
        let cursor = *first.last().expect("something was sent");
        let (rest, behind) = subscribe(&mut cluster, cursor);
        assert_eq!(rest, (cursor + 1..=6).collect::<Vec<_>>());
        assert!(!behind);
    }

    #[test]
    fn a_horizon_not_recorded_by_the_whole_placement_is_not_served() {
        let mut cluster = Cluster::new();
        let mut core = cluster.keeping(2);
        cluster.send(&mut core, 1, "m1", "id1");
        cluster.send(&mut core, 2, "m2", "id2");
        // 1 drops nothing.
        assert_eq!(core.horizon(), 1);
        // c never answers trims: the horizon the owner decided is not served yet, and nothing
        // at or above the served one is deleted anywhere.
        cluster.lose_trims_to = vec![node("c")];
        cluster.send(&mut core, 3, "m3", "id3");
        cluster.send(&mut core, 4, "m4", "id4");
        assert_eq!(core.commit(), 4);
        assert_eq!(core.horizon(), 1);
        assert_eq!(cluster.stored("a").len(), 4);
        assert_eq!(cluster.stored("c").len(), 4);
        // Once c records it, it is served.
        cluster.lose_trims_to.clear();
        cluster.now += RESEND_AFTER;
        core.on_tick(cluster.now);
        cluster.settle(&mut core);
        assert_eq!(core.horizon(), 3);
        assert_eq!(cluster.stored("c").len(), 2);
    }
}
