//! The simulated world: nodes running the node's real cores over a simulated network, clock and
//! disk, driven by one seed.
//!
//! Each node is what its actors are in production, with the same cores and the same decisions:
//! the membership ([`Detector`] and [`view_of`]) and its sessions to peers, the room host
//! ([`route`], [`moves`]) with a [`RoomCore`] per room it owns, the log keeper ([`KeeperCore`])
//! over a disk with group commit, and the hub ([`HubCore`]) with its clients' connections.
//! Parts of a node talk through mailboxes (FIFO per receiver, as actor mailboxes); nodes talk
//! over sessions (FIFO per direction, lost when the session closes, held while the network path
//! is cut, as TCP) and heartbeats over datagrams (lost when cut). Time is simulated: every part
//! sees the same clock, which advances from event to event.
//!
//! Faults: a node crashes (its disk kept or lost) and restarts, freezes and thaws, is cut off
//! from all others, from one, or in one direction; a session breaks and is dialled again; a
//! disk becomes slow or fails its commits; two faults land close together; nodes join and leave.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, VecDeque};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chat_node::cluster::detector::{Detector, DetectorConfig};
use chat_node::cluster::membership::view_of;
use chat_node::cluster::view::{Member, View};
use chat_node::hub::core::{HubCore, HubEffect};
use chat_node::metrics::Metrics;
use chat_node::rooms::core::{Effect, Flaw, LogReader, RoomConfig, RoomCore};
use chat_node::rooms::host::{Route, moves, route};
use chat_node::rooms::keeper::{FETCH_MAX_BYTES, KeeperCore, KeeperEffect};
use chat_node::rooms::retention::{Retention, RetentionPolicy};
use chat_node::store::{Memory, StoreError, Write};
use chat_protocol::peer::{
    AppendOutcome, Entry, Heartbeat, Horizon, LogState, MemberInfo, PeerMessage, Reply, SessionId,
    ToHub, ToKeeper, ToRoom, ToRooms,
};
use chat_protocol::{ErrorCode, NodeName, RoomId, UserName};
use serde_json::value::RawValue;

use crate::checker::Checker;
use crate::client::{Action, Client, Time, ToClient};
use crate::rng::Rng;

const MS: Time = 1_000;
const SEC: Time = 1_000_000;
/// Heartbeat interval and failure timeout: the node's defaults.
const HEARTBEAT: Time = 200 * MS;
const FAILURE_TIMEOUT: Time = 3 * SEC;
const HUB_TICK: Time = 250 * MS;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
const WALL_START_MS: u64 = 1_750_000_000_000;

/// What one seed runs.
#[derive(Debug, Clone)]
pub struct Settings {
    pub seed: u64,
    /// Nodes at the start.
    pub nodes: usize,
    /// Nodes that may join later.
    pub spares: usize,
    pub replication_factor: usize,
    pub rooms: usize,
    pub clients: usize,
    /// How long clients chat and faults land, before everything heals.
    pub duration: Time,
    pub faults: bool,
    pub flaw: Option<Flaw>,
    pub trace: bool,
    /// Messages kept in room `r0` (retention), if bounded; the other rooms keep everything.
    pub retention: Option<u64>,
}

impl Settings {
    /// A random cluster and workload for `seed`.
    pub fn for_seed(seed: u64) -> Settings {
        let mut rng = Rng::new(seed);
        let nodes = [3, 3, 3, 4, 5][rng.pick(5)];
        Settings {
            seed,
            nodes,
            spares: usize::from(nodes < 5 && rng.chance(0.3)),
            replication_factor: 2 + usize::from(rng.chance(0.25)),
            rooms: 1 + rng.pick(3),
            clients: 2 + rng.pick(4),
            duration: (15 + rng.range(0, 20)) * SEC,
            faults: true,
            flaw: None,
            trace: false,
            // Drawn last, so that the rest of each seed's workload is what it was without it.
            retention: rng.chance(0.5).then(|| 3 + rng.range(0, 30)),
        }
    }

    /// The retention of the simulated rooms.
    fn retention_policy(&self) -> RetentionPolicy {
        let rooms = self
            .retention
            .map(|messages| {
                let room = RoomId::new("r0").expect("valid room");
                (
                    room,
                    Retention {
                        messages,
                        age_ms: 0,
                    },
                )
            })
            .into_iter()
            .collect();
        RetentionPolicy {
            default: Retention::default(),
            rooms: Arc::new(rooms),
        }
    }
}

/// A node's durable store.
#[derive(Debug)]
pub struct Disk {
    pub logs: BTreeMap<RoomId, LogState>,
    pub horizons: BTreeMap<RoomId, Horizon>,
    pub entries: BTreeMap<RoomId, BTreeMap<u64, Entry>>,
    known: Option<(Vec<NodeName>, bool)>,
    incarnation: u64,
    /// What the store remembers of the node's past (a new store: unknown).
    memory: Memory,
    /// A commit failed and no write succeeded since (what `Store::writable` reports, negated).
    unwritable: bool,
}

impl Disk {
    /// A store created empty.
    fn fresh() -> Disk {
        Disk {
            logs: BTreeMap::new(),
            horizons: BTreeMap::new(),
            entries: BTreeMap::new(),
            known: None,
            incarnation: 0,
            memory: Memory::Unknown,
            unwritable: false,
        }
    }

    fn apply(&mut self, write: &DiskWrite) {
        match write {
            DiskWrite::Log(Write::Log {
                room,
                state,
                truncate_after,
                entries,
            }) => {
                let stored = self.entries.entry(room.clone()).or_default();
                if let Some(after) = truncate_after {
                    stored.split_off(&(after + 1));
                }
                for entry in entries {
                    stored.insert(entry.seq, entry.clone());
                }
                self.logs.insert(room.clone(), state.clone());
            }
            DiskWrite::Log(Write::Trim {
                room,
                state,
                horizon,
                truncate_after,
            }) => {
                // Compaction at once: what it may delete is gone for every read from now on.
                let stored = self.entries.entry(room.clone()).or_default();
                if let Some(after) = truncate_after {
                    stored.split_off(&(after + 1));
                }
                *stored = stored.split_off(&horizon.compacted);
                self.logs.insert(room.clone(), state.clone());
                self.horizons.insert(room.clone(), *horizon);
            }
            DiskWrite::Log(Write::Node { .. }) => {}
            DiskWrite::Known(names, bootstrapped) => {
                self.known = Some((names.clone(), *bootstrapped));
            }
        }
    }

    fn range(&self, room: &RoomId, from: u64, to: u64, max_bytes: usize) -> Vec<Entry> {
        let mut out = Vec::new();
        let mut bytes = 0;
        if from > to {
            return out;
        }
        if let Some(stored) = self.entries.get(room) {
            for entry in stored.range(from..=to).map(|(_, e)| e) {
                bytes += entry.text.len() + 64;
                out.push(entry.clone());
                if bytes >= max_bytes {
                    break;
                }
            }
        }
        out
    }
}

/// A node's store as its rooms read it.
struct DiskReader(Arc<Mutex<Disk>>);

impl LogReader for DiskReader {
    fn entries(
        &self,
        room: &RoomId,
        from_seq: u64,
        to_seq: u64,
        max_bytes: usize,
    ) -> Result<Vec<Entry>, StoreError> {
        let disk = self.0.lock().map_err(|_| StoreError::Stopped)?;
        Ok(disk.range(room, from_seq, to_seq, max_bytes))
    }

    fn writable(&self) -> bool {
        self.0.lock().is_ok_and(|disk| !disk.unwritable)
    }
}

#[derive(Debug)]
enum DiskWrite {
    Log(Write),
    Known(Vec<NodeName>, bool),
}

#[derive(Debug)]
enum Done {
    Answer {
        room: RoomId,
        to: NodeName,
        answer: ToRoom,
    },
    Nothing,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Part {
    Host,
    Keeper,
    Hub,
}

#[derive(Debug)]
enum PartMsg {
    Peer(PeerMessage),
    View(Arc<View>),
    Flush(RoomId),
    Register {
        session: SessionId,
        user: UserName,
        client: usize,
        conn: u64,
    },
    Unregister(SessionId),
    Request {
        session: SessionId,
        reference: u64,
        request: chat_node::hub::HubRequest,
    },
}

#[derive(Debug, Clone)]
enum Timer {
    Membership,
    Hub,
    Room(RoomId),
}

#[derive(Debug)]
enum Event {
    Part {
        node: usize,
        life: u64,
        part: Part,
        msg: PartMsg,
    },
    Pump {
        from: usize,
        to: usize,
    },
    Datagram {
        from: usize,
        to: usize,
        heartbeat: Heartbeat,
    },
    Close {
        node: usize,
        peer: usize,
        generation: u64,
    },
    Dialed {
        node: usize,
        peer: usize,
    },
    Timer {
        node: usize,
        life: u64,
        timer: Timer,
    },
    Commit {
        node: usize,
        disk: u64,
    },
    Client {
        client: usize,
        conn: u64,
        event: ToClient,
    },
    ClientTick(usize),
    Fault(Fault),
}

/// A step of a fault episode.
#[derive(Debug, Clone)]
pub enum Fault {
    Crash {
        node: usize,
        lose_disk: bool,
    },
    Restart(usize),
    Freeze(usize),
    Thaw(usize),
    Cut(usize, usize),
    Uncut(usize, usize),
    Isolate(usize),
    Rejoin(usize),
    BreakLink(usize, usize),
    SlowDisk(usize, bool),
    FailDisk(usize, bool),
    Join(usize),
    Leave(usize),
    /// Start the next episode.
    Next,
}

struct Scheduled {
    at: Time,
    seq: u64,
    event: Event,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Scheduled {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

struct RoomSim {
    core: RoomCore,
    wake_at: Option<Time>,
    /// Whether the core was active after its last event.
    active: bool,
}

/// What a running node holds in memory (lost when it crashes).
struct Life {
    id: u64,
    me: MemberInfo,
    detector: Detector,
    persisted: (BTreeSet<NodeName>, bool),
    last_view: Option<(Vec<Member>, bool)>,
    version: u64,
    view: Arc<View>,
    /// Sessions to peers that are up on this side: peer → generation.
    links: BTreeMap<usize, u64>,
    /// Peers the membership wants sessions with: since, last dial.
    desired: BTreeMap<usize, (Time, Option<Time>)>,
    keeper: KeeperCore,
    rooms: BTreeMap<RoomId, RoomSim>,
    hub: HubCore,
    sessions: BTreeMap<SessionId, (usize, u64)>,
    metrics: Metrics,
    seed_sent: Option<Time>,
}

pub struct Node {
    pub name: NodeName,
    addr: String,
    pub started: bool,
    pub left: bool,
    life: Option<Life>,
    pub frozen: bool,
    backlog: Vec<Scheduled>,
    pub disk: Arc<Mutex<Disk>>,
    disk_gen: u64,
    pending: VecDeque<(DiskWrite, Done)>,
    committing: bool,
    disk_slow: bool,
    disk_failing: bool,
}

impl Node {
    pub fn running(&self) -> bool {
        self.life.is_some()
    }
}

/// A message on its way over a session: when it is ready, the session's generation, itself.
type Queued = (Time, u64, PeerMessage);

/// Decides which messages between two nodes the network loses (scripted scenarios).
pub type Filter = Box<dyn Fn(usize, usize, &PeerMessage) -> bool>;

/// The world of one seed.
pub struct World {
    pub settings: Settings,
    pub now: Time,
    base: Instant,
    rng: Rng,
    fault_rng: Rng,
    queue: BinaryHeap<Reverse<Scheduled>>,
    next_seq: u64,
    pub nodes: Vec<Node>,
    generations: u64,
    /// Per direction: when each message is ready, its session, the message.
    queues: BTreeMap<(usize, usize), VecDeque<Queued>>,
    cut: BTreeSet<(usize, usize)>,
    mailbox: HashMap<(usize, Part), Time>,
    client_fifo: HashMap<usize, Time>,
    pub clients: Vec<Client>,
    pub checker: Checker,
    next_conn: u64,
    next_session: u64,
    next_life: u64,
    pub rooms: Vec<RoomId>,
    /// Messages for which this returns true are lost in the network (scripted scenarios).
    pub filter: Option<Filter>,
    /// Fault episodes are injected while true.
    pub injecting: bool,
    /// An episode waits for the cluster to be whole and re-replicated before the next one.
    converge_before_next: bool,
    /// The node that lost its disk, if one did: only it loses its disk again. (A room whose
    /// copy on it was not synced since counts it out of claims; with a second node's disk lost
    /// too, such a room of three nodes waits for an operator: docs/failover.md.)
    disk_lost: Option<usize>,
    pub events: u64,
    pub faults: BTreeMap<&'static str, u64>,
}

impl World {
    pub fn new(settings: Settings) -> World {
        let mut rng = Rng::new(settings.seed);
        let fault_rng = rng.fork();
        let total = settings.nodes + settings.spares;
        let nodes = (0..total)
            .map(|i| Node {
                name: NodeName::new(&format!("n{}", i + 1)).expect("valid node name"),
                addr: format!("n{}:7000", i + 1),
                started: false,
                left: false,
                life: None,
                frozen: false,
                backlog: Vec::new(),
                disk: Arc::new(Mutex::new(Disk::fresh())),
                disk_gen: 0,
                pending: VecDeque::new(),
                committing: false,
                disk_slow: false,
                disk_failing: false,
            })
            .collect();
        let rooms = (0..settings.rooms)
            .map(|i| RoomId::new(&format!("r{i}")).expect("valid room"))
            .collect::<Vec<_>>();
        let mut world = World {
            now: 0,
            base: Instant::now(),
            fault_rng,
            queue: BinaryHeap::new(),
            next_seq: 0,
            nodes,
            generations: 0,
            queues: BTreeMap::new(),
            cut: BTreeSet::new(),
            mailbox: HashMap::new(),
            client_fifo: HashMap::new(),
            clients: Vec::new(),
            checker: Checker::default(),
            next_conn: 1,
            next_session: 1,
            next_life: 1,
            rooms,
            filter: None,
            injecting: false,
            converge_before_next: false,
            disk_lost: None,
            events: 0,
            faults: BTreeMap::new(),
            rng,
            settings,
        };
        for i in 0..world.settings.nodes {
            world.start_node(i);
        }
        world
    }

    /// Adds a client in `rooms`; chatty clients make up messages by themselves.
    pub fn add_client(&mut self, rooms: Vec<RoomId>, chatty: bool) -> usize {
        let index = self.clients.len();
        self.clients.push(Client::new(index, rooms, chatty));
        let at = self.now + self.rng.range(MS, 50 * MS);
        self.schedule(at, Event::ClientTick(index));
        index
    }

    // ---- time and events ----

    fn instant(&self, t: Time) -> Instant {
        self.base + Duration::from_micros(t)
    }

    fn time_of(&self, i: Instant) -> Time {
        i.saturating_duration_since(self.base).as_micros() as Time
    }

    fn wall_ms(&self) -> u64 {
        WALL_START_MS + self.now / MS
    }

    fn schedule(&mut self, at: Time, event: Event) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.queue.push(Reverse(Scheduled { at, seq, event }));
    }

    fn log(&mut self, line: impl FnOnce() -> String) {
        if self.settings.trace {
            let text = line();
            eprintln!("{:>10.3} {text}", self.now as f64 / 1e6);
        }
    }

    /// Runs events until `until`, or until `done` holds (checked after every event).
    pub fn run_until(&mut self, until: Time, mut done: impl FnMut(&World) -> bool) -> bool {
        while let Some(Reverse(next)) = self.queue.peek() {
            if next.at > until {
                break;
            }
            let Some(Reverse(next)) = self.queue.pop() else {
                break;
            };
            self.now = self.now.max(next.at);
            self.events += 1;
            self.dispatch(next);
            if done(self) || !self.checker.violations.is_empty() {
                return done(self);
            }
        }
        self.now = self.now.max(until);
        done(self)
    }

    fn dispatch(&mut self, scheduled: Scheduled) {
        // A frozen node handles nothing: what reaches it waits until it thaws.
        let target = match &scheduled.event {
            Event::Part { node, .. }
            | Event::Timer { node, .. }
            | Event::Commit { node, .. }
            | Event::Close { node, .. } => Some(*node),
            Event::Datagram { to, .. } | Event::Pump { to, .. } => Some(*to),
            Event::Dialed { node, peer } => {
                if self.nodes[*peer].frozen {
                    // The peer cannot finish the handshake: the dial fails.
                    return;
                }
                Some(*node)
            }
            _ => None,
        };
        if let Some(node) = target
            && self.nodes[node].frozen
        {
            self.nodes[node].backlog.push(scheduled);
            return;
        }
        match scheduled.event {
            Event::Part {
                node,
                life,
                part,
                msg,
            } => {
                if self.life_id(node) == Some(life) {
                    self.on_part(node, part, msg);
                }
            }
            Event::Pump { from, to } => self.pump(from, to),
            Event::Datagram {
                from,
                to,
                heartbeat,
            } => self.on_datagram(from, to, heartbeat),
            Event::Close {
                node,
                peer,
                generation,
            } => self.on_close(node, peer, generation),
            Event::Dialed { node, peer } => self.on_dialed(node, peer),
            Event::Timer { node, life, timer } => {
                if self.life_id(node) == Some(life) {
                    self.on_timer(node, timer);
                }
            }
            Event::Commit { node, disk } => {
                if self.nodes[node].disk_gen == disk {
                    self.commit(node);
                }
            }
            Event::Client {
                client,
                conn,
                event,
            } => {
                if self.clients[client].conn.as_ref().map(|c| c.id) == Some(conn) {
                    let now = self.now;
                    self.clients[client].on_event(event, now, &mut self.checker);
                }
            }
            Event::ClientTick(client) => self.client_tick(client),
            Event::Fault(fault) => self.apply_fault(fault),
        }
    }

    fn life_id(&self, node: usize) -> Option<u64> {
        self.nodes[node].life.as_ref().map(|l| l.id)
    }

    /// Queues `msg` for a part of `node`, behind what its mailbox holds.
    fn post(&mut self, node: usize, part: Part, msg: PartMsg) {
        let Some(life) = self.life_id(node) else {
            return;
        };
        let delay = self.rng.range(10, 200);
        let last = self.mailbox.get(&(node, part)).copied().unwrap_or(0);
        let at = (self.now + delay).max(last);
        self.mailbox.insert((node, part), at);
        self.schedule(
            at,
            Event::Part {
                node,
                life,
                part,
                msg,
            },
        );
    }

    fn tell_client(&mut self, client: usize, conn: u64, event: ToClient) {
        let delay = self.rng.range(100, 600);
        let last = self.client_fifo.get(&client).copied().unwrap_or(0);
        let at = (self.now + delay).max(last);
        self.client_fifo.insert(client, at);
        self.schedule(
            at,
            Event::Client {
                client,
                conn,
                event,
            },
        );
    }

    fn node_of(&self, name: &NodeName) -> Option<usize> {
        self.nodes.iter().position(|n| &n.name == name)
    }

    fn node_of_addr(&self, addr: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.addr == addr)
    }

    // ---- the network ----

    /// Sends a peer message from `from` to `to` over their session (or to itself).
    fn send(&mut self, from: usize, to: usize, message: PeerMessage) -> Result<(), ()> {
        if self.settings.trace {
            let line = describe_message(&message);
            self.log(|| format!("n{} -> n{}: {line}", from + 1, to + 1));
        }
        if from == to {
            self.deliver(to, message);
            return Ok(());
        }
        let Some(&generation) = self.nodes[from]
            .life
            .as_ref()
            .and_then(|l| l.links.get(&to))
        else {
            return Err(());
        };
        if self.filter.as_ref().is_some_and(|f| f(from, to, &message)) {
            self.log(|| {
                format!(
                    "n{} -> n{} lost by the script: {}",
                    from + 1,
                    to + 1,
                    message.kind()
                )
            });
            return Ok(());
        }
        let mut delay = self.rng.range(200, 2_500);
        if self.rng.chance(0.01) {
            delay += self.rng.range(10 * MS, 60 * MS);
        }
        let breaks = matches!(message, PeerMessage::Keeper(ToKeeper::Append { .. }))
            && self.injecting
            && self.fault_rng.chance(0.002);
        let queue = self.queues.entry((from, to)).or_default();
        let ready = queue
            .back()
            .map_or(self.now + delay, |(r, _, _)| (*r).max(self.now + delay));
        let was_empty = queue.is_empty();
        queue.push_back((ready, generation, message));
        if was_empty {
            self.schedule(ready, Event::Pump { from, to });
        }
        if breaks {
            // The session breaks with the append in flight (a reset, a flapping link).
            *self.faults.entry("append_lost").or_default() += 1;
            let at = self.now + self.rng.range(10, 500);
            self.schedule(at, Event::Fault(Fault::BreakLink(from, to)));
        }
        Ok(())
    }

    fn pump(&mut self, from: usize, to: usize) {
        let Some(queue) = self.queues.get_mut(&(from, to)) else {
            return;
        };
        let Some((ready, _, _)) = queue.front() else {
            return;
        };
        if *ready > self.now {
            let at = *ready;
            self.schedule(at, Event::Pump { from, to });
            return;
        }
        if self.cut.contains(&(from, to)) {
            // TCP retransmits until the path heals or the session is dropped.
            let at = self.now + 20 * MS;
            self.schedule(at, Event::Pump { from, to });
            return;
        }
        let Some((_, generation, message)) = queue.pop_front() else {
            return;
        };
        let next = queue.front().map(|(r, _, _)| *r);
        let alive = |n: &Node, peer: usize| {
            n.life
                .as_ref()
                .is_some_and(|l| l.links.get(&peer) == Some(&generation))
        };
        if alive(&self.nodes[from], to) && alive(&self.nodes[to], from) {
            self.deliver(to, message);
        }
        if let Some(at) = next {
            let at = at.max(self.now);
            self.schedule(at, Event::Pump { from, to });
        }
    }

    /// Hands a message that reached `node` to the part it is for.
    fn deliver(&mut self, node: usize, message: PeerMessage) {
        let part = match &message {
            PeerMessage::Rooms(_) => Part::Host,
            PeerMessage::Keeper(_) => Part::Keeper,
            PeerMessage::Hub(_) => Part::Hub,
            PeerMessage::Directory(_) | PeerMessage::Credit { .. } => return,
        };
        self.post(node, part, PartMsg::Peer(message));
    }

    fn datagram(&mut self, from: usize, to: usize, heartbeat: Heartbeat) {
        let at = self.now + self.rng.range(100, 2_000);
        self.schedule(
            at,
            Event::Datagram {
                from,
                to,
                heartbeat,
            },
        );
    }

    fn on_datagram(&mut self, from: usize, to: usize, heartbeat: Heartbeat) {
        if self.cut.contains(&(from, to)) || self.rng.chance(0.005) {
            return;
        }
        let now = self.instant(self.now);
        let Some(life) = self.nodes[to].life.as_mut() else {
            return;
        };
        let observed = life.detector.observe(heartbeat, now);
        if observed.own {
            return;
        }
        if let Some(reply) = observed.reply {
            self.datagram(to, from, reply);
        }
        if let Some(name) = observed.restarted
            && let Some(peer) = self.node_of(&name)
        {
            self.drop_link(to, peer);
        }
        if observed.changed {
            self.publish(to);
        }
    }

    /// `node` closes its session to `peer`; the peer learns it when the close gets through.
    fn drop_link(&mut self, node: usize, peer: usize) {
        let Some(generation) = self.nodes[node]
            .life
            .as_mut()
            .and_then(|l| l.links.remove(&peer))
        else {
            return;
        };
        self.log(|| format!("n{} drops its session to n{}", node + 1, peer + 1));
        let at = self.now + self.rng.range(200, 2_000);
        self.schedule(
            at,
            Event::Close {
                node: peer,
                peer: node,
                generation,
            },
        );
        self.publish(node);
    }

    fn on_close(&mut self, node: usize, peer: usize, generation: u64) {
        if self.cut.contains(&(peer, node)) {
            let at = self.now + 100 * MS;
            self.schedule(
                at,
                Event::Close {
                    node,
                    peer,
                    generation,
                },
            );
            return;
        }
        let Some(life) = self.nodes[node].life.as_mut() else {
            return;
        };
        if life.links.get(&peer) == Some(&generation) {
            life.links.remove(&peer);
            self.log(|| format!("n{} sees its session to n{} closed", node + 1, peer + 1));
            self.publish(node);
        }
    }

    fn on_dialed(&mut self, node: usize, peer: usize) {
        let reachable = !self.cut.contains(&(node, peer)) && !self.cut.contains(&(peer, node));
        if !reachable || !self.nodes[node].running() || !self.nodes[peer].running() {
            return;
        }
        self.generations += 1;
        let generation = self.generations;
        for (a, b) in [(node, peer), (peer, node)] {
            if let Some(life) = self.nodes[a].life.as_mut() {
                life.links.insert(b, generation);
            }
        }
        self.log(|| {
            format!(
                "session n{} <-> n{} ready (generation {generation})",
                node + 1,
                peer + 1
            )
        });
        self.publish(node);
        self.publish(peer);
    }

    // ---- membership ----

    fn start_node(&mut self, node: usize) {
        let seeds: Vec<String> = self.nodes[..self.settings.nodes]
            .iter()
            .map(|n| n.addr.clone())
            .collect();
        let wall = self.wall_ms();
        let (known, bootstrapped, incarnation, memory) = {
            let mut disk = self.nodes[node].disk.lock().expect("disk");
            disk.incarnation = (disk.incarnation + 1).max(wall);
            let (known, bootstrapped) = disk.known.clone().unwrap_or_default();
            (known, bootstrapped, disk.incarnation, disk.memory)
        };
        let n = &mut self.nodes[node];
        n.started = true;
        n.left = false;
        let me = MemberInfo {
            name: n.name.clone(),
            incarnation,
            addr: n.addr.clone(),
            public_url: None,
        };
        let config = DetectorConfig {
            interval: Duration::from_micros(HEARTBEAT),
            failure_timeout: Duration::from_micros(FAILURE_TIMEOUT),
            bootstrap_expect: 1,
        };
        let mut detector = Detector::new(me.clone(), config, known, bootstrapped);
        if seeds.iter().any(|s| *s != me.addr) {
            detector.expect_peers();
        }
        let detector = detector.with_memory(memory);
        let view = Arc::new(View::new(
            n.name.clone(),
            vec![Member {
                name: n.name.clone(),
                addr: n.addr.clone(),
                status: chat_node::cluster::view::Status::Up,
                public_url: None,
                session: 0,
            }],
            false,
            0,
        ));
        let first_req = self.rng.next();
        let n = &mut self.nodes[node];
        let hub = HubCore::new(n.name.clone(), view.clone(), REQUEST_TIMEOUT, first_req);
        let persisted = (detector.known().clone(), detector.bootstrapped());
        let id = self.next_life;
        self.next_life += 1;
        n.life = Some(Life {
            id,
            keeper: KeeperCore::new(n.name.clone()),
            me,
            detector,
            persisted,
            last_view: None,
            version: 0,
            view,
            links: BTreeMap::new(),
            desired: BTreeMap::new(),
            rooms: BTreeMap::new(),
            hub,
            sessions: BTreeMap::new(),
            metrics: Metrics::new(),
            seed_sent: None,
        });
        self.log(|| format!("n{} starts (incarnation {incarnation})", node + 1));
        let at = self.now + self.rng.range(MS, HEARTBEAT);
        self.schedule(
            at,
            Event::Timer {
                node,
                life: id,
                timer: Timer::Membership,
            },
        );
        let at = self.now + HUB_TICK;
        self.schedule(
            at,
            Event::Timer {
                node,
                life: id,
                timer: Timer::Hub,
            },
        );
        self.hub_effects(node);
    }

    fn membership_tick(&mut self, node: usize) {
        let now = self.instant(self.now);
        let seeds: Vec<String> = self.nodes[..self.settings.nodes]
            .iter()
            .map(|n| n.addr.clone())
            .collect();
        let Some(life) = self.nodes[node].life.as_mut() else {
            return;
        };
        let mut sends = life.detector.pings(now);
        if life
            .seed_sent
            .is_none_or(|t| self.now.saturating_sub(t) >= SEC)
        {
            life.seed_sent = Some(self.now);
            for seed in seeds {
                sends.push((seed, life.detector.seed_ping()));
            }
        }
        let changed = life.detector.tick(now);
        let memory = life.detector.memory();
        self.sync_memory(node, memory);
        for (addr, heartbeat) in sends {
            if let Some(to) = self.node_of_addr(&addr) {
                self.datagram(node, to, heartbeat);
            }
        }
        self.dial(node);
        if changed {
            self.publish(node);
        } else {
            self.publish_view(node);
        }
    }

    /// Dials the peers the membership wants and has no session with (the node with the smaller
    /// name first; the other after a grace period), at most every 500 ms.
    fn dial(&mut self, node: usize) {
        let now = self.now;
        let Some(life) = self.nodes[node].life.as_mut() else {
            return;
        };
        let mut dials = Vec::new();
        for (peer, (since, last)) in &mut life.desired {
            if life.links.contains_key(peer) {
                continue;
            }
            if node > *peer && now.saturating_sub(*since) < 2 * SEC {
                continue;
            }
            if last.is_some_and(|t| now.saturating_sub(t) < 500 * MS) {
                continue;
            }
            *last = Some(now);
            dials.push(*peer);
        }
        for peer in dials {
            let at = self.now + self.rng.range(MS, 4 * MS);
            self.schedule(at, Event::Dialed { node, peer });
        }
    }

    /// What the membership does after a change: sessions to keep, known members to persist,
    /// the view to publish.
    fn publish(&mut self, node: usize) {
        let names: Vec<NodeName> = self.nodes.iter().map(|n| n.name.clone()).collect();
        let Some(life) = self.nodes[node].life.as_mut() else {
            return;
        };
        let alive: BTreeSet<usize> = life
            .detector
            .alive()
            .filter_map(|m| names.iter().position(|n| *n == m.name))
            .collect();
        let gone: Vec<usize> = life
            .desired
            .keys()
            .filter(|p| !alive.contains(p))
            .copied()
            .collect();
        for peer in &alive {
            life.desired.entry(*peer).or_insert((self.now, None));
        }
        for peer in &gone {
            life.desired.remove(peer);
        }
        let memory = life.detector.memory();
        let known = (life.detector.known().clone(), life.detector.bootstrapped());
        let persist = (known != life.persisted).then(|| {
            life.persisted = known.clone();
            DiskWrite::Known(known.0.into_iter().collect(), known.1)
        });
        for peer in gone {
            self.drop_link(node, peer);
        }
        self.sync_memory(node, memory);
        if let Some(write) = persist {
            self.disk_submit(node, write, Done::Nothing);
        }
        self.dial(node);
        self.publish_view(node);
    }

    /// Records what the members told about this node's store, as the real membership does
    /// (synchronously: a fact written once).
    fn sync_memory(&mut self, node: usize, memory: Memory) {
        let mut disk = self.nodes[node].disk.lock().expect("disk");
        if disk.memory != memory {
            disk.memory = memory;
            drop(disk);
            self.log(|| format!("n{} learns its store's memory: {memory:?}", node + 1));
        }
    }

    fn publish_view(&mut self, node: usize) {
        let now = self.instant(self.now);
        let names: Vec<NodeName> = self.nodes.iter().map(|n| n.name.clone()).collect();
        let Some(life) = self.nodes[node].life.as_mut() else {
            return;
        };
        let links = &life.links;
        let session = |name: &NodeName| {
            names
                .iter()
                .position(|n| n == name)
                .and_then(|i| links.get(&i).copied())
        };
        let built = view_of(&life.detector, &life.me, session, now);
        if life.last_view.as_ref() == Some(&built) {
            return;
        }
        life.version += 1;
        let view = Arc::new(View::new(
            life.me.name.clone(),
            built.0.clone(),
            built.1,
            life.version,
        ));
        life.last_view = Some(built);
        life.view = view.clone();
        let up: Vec<String> = view.up().map(|n| n.to_string()).collect();
        let quorum = view.quorum;
        self.log(|| format!("n{} view: up {up:?} quorum {quorum}", node + 1));
        self.post(node, Part::Host, PartMsg::View(view.clone()));
        self.post(node, Part::Hub, PartMsg::View(view));
    }

    // ---- the parts of a node ----

    fn on_part(&mut self, node: usize, part: Part, msg: PartMsg) {
        match (part, msg) {
            (Part::Keeper, PartMsg::Peer(PeerMessage::Keeper(message))) => {
                self.keeper(node, message);
            }
            (Part::Host, PartMsg::Peer(PeerMessage::Rooms(message))) => self.host(node, message),
            (Part::Host, PartMsg::View(view)) => self.host_view(node, view),
            (Part::Host, PartMsg::Flush(room)) => {
                self.with_room(node, &room, |core, _| core.on_flush());
            }
            (Part::Hub, msg) => self.hub(node, msg),
            (part, msg) => {
                self.checker
                    .violate(format!("n{}: {part:?} got {msg:?}", node + 1));
            }
        }
    }

    fn keeper(&mut self, node: usize, message: ToKeeper) {
        let disk = self.nodes[node].disk.clone();
        let lost_disk = disk.lock().expect("disk").memory.doubtful();
        let Some(life) = self.nodes[node].life.as_mut() else {
            return;
        };
        let load = |room: &RoomId| -> Result<(LogState, Horizon), StoreError> {
            let disk = disk.lock().map_err(|_| StoreError::Stopped)?;
            Ok((
                disk.logs.get(room).cloned().unwrap_or_default(),
                disk.horizons.get(room).copied().unwrap_or_default(),
            ))
        };
        let effects = match life.keeper.on(message, lost_disk, load) {
            Ok(effects) => effects,
            Err(e) => {
                self.checker
                    .violate(format!("n{}: keeper failed: {e}", node + 1));
                return;
            }
        };
        for effect in effects {
            match effect {
                KeeperEffect::Answer { room, to, answer } => {
                    self.answer_room(node, &to, room, answer);
                }
                KeeperEffect::Write {
                    room,
                    write,
                    to,
                    answer,
                } => self.disk_submit(
                    node,
                    DiskWrite::Log(write),
                    Done::Answer { room, to, answer },
                ),
                KeeperEffect::Fetch {
                    room,
                    to,
                    from_seq,
                    to_seq,
                } => {
                    let entries = disk
                        .lock()
                        .map(|d| d.range(&room, from_seq, to_seq, FETCH_MAX_BYTES))
                        .unwrap_or_default();
                    let me = self.nodes[node].name.clone();
                    self.answer_room(node, &to, room, ToRoom::Fetched { node: me, entries });
                }
            }
        }
    }

    fn answer_room(&mut self, node: usize, to: &NodeName, room: RoomId, answer: ToRoom) {
        if let Some(to) = self.node_of(to) {
            let _ = self.send(
                node,
                to,
                PeerMessage::Rooms(ToRooms::Room {
                    room,
                    message: answer,
                }),
            );
        }
    }

    fn host(&mut self, node: usize, message: ToRooms) {
        match message {
            ToRooms::Room { room, message } => {
                let Some(life) = self.nodes[node].life.as_ref() else {
                    return;
                };
                let me = life.me.name.clone();
                match route(&life.view, &me, &room, message) {
                    Route::Room { message, start } => {
                        if start {
                            self.start_room(node, &room);
                        }
                        let (now, wall) = (self.instant(self.now), self.wall_ms());
                        self.with_room(node, &room, |core, _| {
                            core.on_peer(message, now, now, wall);
                        });
                    }
                    Route::Forward { to, message } => {
                        if let Some(to) = self.node_of(&to) {
                            let origin = match &message {
                                ToRoom::Request { origin, .. } => Some(origin.clone()),
                                _ => None,
                            };
                            let forwarded = PeerMessage::Rooms(ToRooms::Room { room, message });
                            if self.send(node, to, forwarded).is_err()
                                && let Some(origin) = origin
                            {
                                self.fail_origin(node, &origin, "the room's node is unreachable");
                            }
                        }
                    }
                    Route::Fail { origin, why } => self.fail_origin(node, &origin, why),
                    Route::Drop => {}
                }
            }
            ToRooms::Activate { rooms } => {
                for room in rooms {
                    let owns = self.nodes[node]
                        .life
                        .as_ref()
                        .is_some_and(|l| l.view.owner(&room) == Some(&l.me.name));
                    if owns {
                        self.start_room(node, &room);
                    }
                }
            }
            ToRooms::SessionsReset { node: reset } => {
                let rooms: Vec<RoomId> = self.nodes[node]
                    .life
                    .as_ref()
                    .map(|l| l.rooms.keys().cloned().collect())
                    .unwrap_or_default();
                for room in rooms {
                    self.with_room(node, &room, |core, _| core.on_node_reset(&reset));
                }
            }
        }
    }

    fn fail_origin(&mut self, node: usize, origin: &chat_protocol::peer::Origin, why: &str) {
        if origin.req == 0 {
            return;
        }
        if let Some(to) = self.node_of(&origin.node) {
            let reply = PeerMessage::Hub(ToHub::Reply {
                req: origin.req,
                reply: Reply::Failed {
                    code: ErrorCode::Unavailable,
                    message: why.to_owned(),
                },
            });
            let _ = self.send(node, to, reply);
        }
    }

    fn host_view(&mut self, node: usize, view: Arc<View>) {
        let now = self.instant(self.now);
        let rooms: Vec<RoomId> = self.nodes[node]
            .life
            .as_ref()
            .map(|l| l.rooms.keys().cloned().collect())
            .unwrap_or_default();
        for room in rooms {
            let view = view.clone();
            self.with_room(node, &room, |core, _| core.on_view(view, now));
        }
        if !view.quorum {
            return;
        }
        let stored: Vec<(RoomId, LogState)> = self.nodes[node]
            .disk
            .lock()
            .map(|d| d.logs.iter().map(|(r, s)| (r.clone(), s.clone())).collect())
            .unwrap_or_default();
        let me = self.nodes[node].name.clone();
        let (here, elsewhere) = moves(stored, &view, self.settings.replication_factor, &me);
        for room in here {
            self.start_room(node, &room);
        }
        for (owner, rooms) in elsewhere {
            if let Some(to) = self.node_of(&owner) {
                let _ = self.send(node, to, PeerMessage::Rooms(ToRooms::Activate { rooms }));
            }
        }
    }

    fn start_room(&mut self, node: usize, room: &RoomId) {
        let now = self.instant(self.now);
        let seed = self.rng.next();
        let n = &mut self.nodes[node];
        let Some(life) = n.life.as_mut() else {
            return;
        };
        if life.rooms.contains_key(room) {
            return;
        }
        let promised = n
            .disk
            .lock()
            .map(|d| d.logs.get(room).map_or(0, |s| s.promised))
            .unwrap_or(0);
        let config = RoomConfig {
            replication_factor: self.settings.replication_factor,
            replay_cap: 100_000,
            idle: Duration::from_secs(60),
            queue_timeout: Duration::from_secs(4),
            retention: self.settings.retention_policy(),
            flaw: self.settings.flaw,
        };
        let core = RoomCore::new(
            room.clone(),
            life.me.name.clone(),
            life.view.clone(),
            config,
            Arc::new(DiskReader(n.disk.clone())),
            life.metrics.clone(),
            promised,
            seed,
            now,
        );
        life.rooms.insert(
            room.clone(),
            RoomSim {
                core,
                wake_at: None,
                active: false,
            },
        );
        self.room_effects(node, room);
    }

    /// Calls `f` on the core of `room` at `node`, if it runs there, then carries out what it
    /// decided.
    fn with_room(&mut self, node: usize, room: &RoomId, f: impl FnOnce(&mut RoomCore, Time)) {
        let now = self.now;
        let Some(sim) = self.nodes[node]
            .life
            .as_mut()
            .and_then(|l| l.rooms.get_mut(room))
        else {
            return;
        };
        f(&mut sim.core, now);
        self.room_effects(node, room);
    }

    fn room_effects(&mut self, node: usize, room: &RoomId) {
        let Some(life) = self.nodes[node].life.as_mut() else {
            return;
        };
        let Some(sim) = life.rooms.get_mut(room) else {
            return;
        };
        let effects = sim.core.take_effects();
        let wake = sim.core.next_wake();
        let took_over = !sim.active && sim.core.is_active();
        sim.active = sim.core.is_active();
        let life_id = life.id;
        if took_over && self.injecting && self.fault_rng.chance(0.15) {
            // A node that fails right after taking a room over: the moment that tests what a
            // new owner counts as committed.
            *self.faults.entry("crash_after_takeover").or_default() += 1;
            let crash = self.now + self.fault_rng.range(0, 3 * MS);
            let restart = crash + self.fault_rng.range(50 * MS, SEC);
            self.schedule(
                crash,
                Event::Fault(Fault::Crash {
                    node,
                    lose_disk: false,
                }),
            );
            self.schedule(restart, Event::Fault(Fault::Restart(node)));
        }
        let mut stop = false;
        for effect in effects {
            match effect {
                Effect::Keeper(to, message) => {
                    if let Some(to) = self.node_of(&to) {
                        let _ = self.send(node, to, PeerMessage::Keeper(message));
                    }
                }
                Effect::Hub(to, message) => {
                    if let Some(to) = self.node_of(&to) {
                        let _ = self.send(node, to, PeerMessage::Hub(message));
                    }
                }
                Effect::Flush => self.post(node, Part::Host, PartMsg::Flush(room.clone())),
                Effect::Stop(why) => {
                    let (n, r) = (node + 1, room.clone());
                    self.log(|| format!("n{n}: room {r} stops ({})", why.as_str()));
                    stop = true;
                }
            }
        }
        if stop {
            if let Some(mut sim) = self.nodes[node]
                .life
                .as_mut()
                .and_then(|l| l.rooms.remove(room))
            {
                sim.core.abandon();
                for effect in sim.core.take_effects() {
                    if let Effect::Hub(to, message) = effect
                        && let Some(to) = self.node_of(&to)
                    {
                        let _ = self.send(node, to, PeerMessage::Hub(message));
                    }
                }
            }
            return;
        }
        let Some(wake) = wake.map(|i| self.time_of(i)) else {
            return;
        };
        let Some(sim) = self.nodes[node]
            .life
            .as_mut()
            .and_then(|l| l.rooms.get_mut(room))
        else {
            return;
        };
        if sim.wake_at.is_none_or(|at| wake < at) {
            sim.wake_at = Some(wake);
            let at = wake.max(self.now);
            self.schedule(
                at,
                Event::Timer {
                    node,
                    life: life_id,
                    timer: Timer::Room(room.clone()),
                },
            );
        }
    }

    fn on_timer(&mut self, node: usize, timer: Timer) {
        let Some(life) = self.nodes[node].life.as_ref() else {
            return;
        };
        let id = life.id;
        match timer {
            Timer::Membership => {
                self.membership_tick(node);
                let at = self.now + HEARTBEAT;
                self.schedule(
                    at,
                    Event::Timer {
                        node,
                        life: id,
                        timer: Timer::Membership,
                    },
                );
            }
            Timer::Hub => {
                let now = self.instant(self.now);
                if let Some(life) = self.nodes[node].life.as_mut() {
                    life.hub.on_tick(now);
                }
                self.hub_effects(node);
                let at = self.now + HUB_TICK;
                self.schedule(
                    at,
                    Event::Timer {
                        node,
                        life: id,
                        timer: Timer::Hub,
                    },
                );
            }
            Timer::Room(room) => {
                let now = self.now;
                let instant = self.instant(now);
                self.with_room(node, &room, |core, _| core.on_tick(instant));
                if let Some(sim) = self.nodes[node]
                    .life
                    .as_mut()
                    .and_then(|l| l.rooms.get_mut(&room))
                    && sim.wake_at.is_some_and(|at| at <= now)
                {
                    sim.wake_at = None;
                    self.room_effects(node, &room);
                }
            }
        }
    }

    fn hub(&mut self, node: usize, msg: PartMsg) {
        let now = self.instant(self.now);
        let Some(life) = self.nodes[node].life.as_mut() else {
            return;
        };
        let mut deliveries = Vec::new();
        match msg {
            PartMsg::Register {
                session,
                user,
                client,
                conn,
            } => {
                life.sessions.insert(session, (client, conn));
                life.hub.register(session, user);
            }
            PartMsg::Unregister(session) => {
                life.sessions.remove(&session);
                life.hub.unregister(session);
            }
            PartMsg::Request {
                session,
                reference,
                request,
            } => {
                let reference = RawValue::from_string(reference.to_string()).ok();
                life.hub.request(session, reference, request, now);
            }
            PartMsg::Peer(PeerMessage::Hub(message)) => {
                if let Some(delivery) = life.hub.on_peer(message, now) {
                    let mut recipients: Vec<(SessionId, u64)> = delivery.recipients().collect();
                    recipients.sort_unstable();
                    for (session, after) in recipients {
                        let entries: Vec<Entry> = delivery
                            .entries
                            .iter()
                            .filter(|e| e.seq > after)
                            .cloned()
                            .collect();
                        if let Some(&(client, conn)) = life.sessions.get(&session)
                            && !entries.is_empty()
                        {
                            deliveries.push((client, conn, delivery.room.clone(), entries));
                        }
                    }
                }
            }
            PartMsg::View(view) => life.hub.on_view(view),
            other => {
                self.checker
                    .violate(format!("n{}: hub got {other:?}", node + 1));
                return;
            }
        }
        for (client, conn, room, entries) in deliveries {
            self.tell_client(client, conn, ToClient::Entries { room, entries });
        }
        self.hub_effects(node);
    }

    fn hub_effects(&mut self, node: usize) {
        loop {
            let Some(life) = self.nodes[node].life.as_mut() else {
                return;
            };
            let effects = life.hub.take_effects();
            if effects.is_empty() {
                return;
            }
            for effect in effects {
                match effect {
                    HubEffect::Peer(to, message) => {
                        if let Some(to) = self.node_of(&to) {
                            let _ = self.send(node, to, message);
                        }
                    }
                    HubEffect::Request {
                        req,
                        target,
                        message,
                    } => {
                        let sent = self
                            .node_of(&target)
                            .is_some_and(|to| self.send(node, to, message).is_ok());
                        if !sent && let Some(life) = self.nodes[node].life.as_mut() {
                            life.hub.request_failed(req);
                        }
                    }
                    HubEffect::Reply {
                        session,
                        reference,
                        reply,
                    } => {
                        let reference = reference.and_then(|r| r.get().parse::<u64>().ok());
                        if let Some((client, conn)) = self.session(node, session) {
                            self.tell_client(client, conn, ToClient::Reply { reference, reply });
                        }
                    }
                    HubEffect::CatchUp {
                        session,
                        room,
                        entries,
                    } => {
                        if let Some((client, conn)) = self.session(node, session) {
                            self.tell_client(client, conn, ToClient::Entries { room, entries });
                        }
                    }
                    HubEffect::Horizon {
                        room,
                        horizon,
                        sessions,
                    } => {
                        for session in sessions {
                            if let Some((client, conn)) = self.session(node, session) {
                                let event = ToClient::Horizon {
                                    room: room.clone(),
                                    horizon,
                                };
                                self.tell_client(client, conn, event);
                            }
                        }
                    }
                    // Simulated clients take in what they are sent at once.
                    HubEffect::Behind { room } => {
                        if let Some(life) = self.nodes[node].life.as_mut() {
                            life.hub.continue_catch_up(&room);
                        }
                    }
                    HubEffect::Presence { .. } | HubEffect::Direct { .. } => {}
                }
            }
        }
    }

    fn session(&self, node: usize, session: SessionId) -> Option<(usize, u64)> {
        self.nodes[node]
            .life
            .as_ref()
            .and_then(|l| l.sessions.get(&session).copied())
    }

    // ---- disks ----

    fn disk_submit(&mut self, node: usize, write: DiskWrite, done: Done) {
        let n = &mut self.nodes[node];
        n.pending.push_back((write, done));
        if !n.committing {
            n.committing = true;
            let disk = n.disk_gen;
            let latency = self.fsync_latency(node);
            self.schedule(self.now + latency, Event::Commit { node, disk });
        }
    }

    fn fsync_latency(&mut self, node: usize) -> Time {
        if self.nodes[node].disk_slow {
            self.rng.range(30 * MS, 400 * MS)
        } else {
            self.rng.range(200, 3 * MS)
        }
    }

    /// A disk starts or stops failing its commits; once it stops, the node's probe write
    /// succeeds at once and the store is writable again.
    fn set_disk_failing(&mut self, node: usize, on: bool) {
        let n = &mut self.nodes[node];
        n.disk_failing = on;
        if !on {
            n.disk.lock().expect("disk").unwritable = false;
        }
    }

    /// A group commit: everything queued goes in one transaction, made durable (or failed)
    /// at once; answers go out in order.
    fn commit(&mut self, node: usize) {
        let n = &mut self.nodes[node];
        let batch: Vec<(DiskWrite, Done)> = n.pending.drain(..).take(4096).collect();
        let failing = n.disk_failing;
        {
            let mut disk = n.disk.lock().expect("disk");
            disk.unwritable = failing;
            if !failing {
                for (write, _) in &batch {
                    disk.apply(write);
                }
            }
        }
        for (_, done) in batch {
            match done {
                Done::Nothing => {}
                Done::Answer { room, to, answer } => {
                    if failing {
                        if let Some(life) = self.nodes[node].life.as_mut() {
                            life.keeper.write_failed(&room);
                        }
                        // As the keeper does: the owner fails the sends waiting on it at once.
                        if let ToRoom::Appended {
                            epoch, node: from, ..
                        } = answer
                        {
                            let answer = ToRoom::Appended {
                                epoch,
                                node: from,
                                outcome: AppendOutcome::Unwritable,
                            };
                            self.answer_room(node, &to, room, answer);
                        }
                    } else {
                        self.answer_room(node, &to, room, answer);
                    }
                }
            }
        }
        let n = &mut self.nodes[node];
        if n.pending.is_empty() {
            n.committing = false;
        } else {
            let disk = n.disk_gen;
            let latency = self.fsync_latency(node);
            self.schedule(self.now + latency, Event::Commit { node, disk });
        }
    }

    // ---- clients ----

    fn client_tick(&mut self, client: usize) {
        let now = self.now;
        let started = self.nodes.iter().filter(|n| n.started).count();
        let actions = self.clients[client].tick(now, started, &mut self.rng);
        for action in actions {
            match action {
                Action::Connect(pick) => {
                    let home = self.clients[client].home;
                    let Some(node) = home.or_else(|| {
                        self.nodes
                            .iter()
                            .enumerate()
                            .filter(|(_, n)| n.started)
                            .map(|(i, _)| i)
                            .nth(pick)
                    }) else {
                        continue;
                    };
                    let conn = self.next_conn;
                    self.next_conn += 1;
                    let session = self.next_session;
                    self.next_session += 1;
                    self.clients[client].connected(conn, node, session);
                    if self.nodes[node].running() {
                        let user = self.clients[client].user.clone();
                        self.post(
                            node,
                            Part::Hub,
                            PartMsg::Register {
                                session,
                                user,
                                client,
                                conn,
                            },
                        );
                    } else {
                        self.tell_client(client, conn, ToClient::Closed);
                    }
                }
                Action::Request(reference, request) => {
                    if let Some(conn) = &self.clients[client].conn {
                        let (node, session) = (conn.node, conn.session);
                        self.post(
                            node,
                            Part::Hub,
                            PartMsg::Request {
                                session,
                                reference,
                                request,
                            },
                        );
                    }
                }
                Action::Disconnect => {
                    // The client already forgot the connection; tell the node it closed.
                    let sessions: Vec<(usize, SessionId)> = self
                        .nodes
                        .iter()
                        .enumerate()
                        .filter_map(|(i, n)| {
                            n.life.as_ref().and_then(|l| {
                                l.sessions
                                    .iter()
                                    .find(|(_, (c, _))| *c == client)
                                    .map(|(s, _)| (i, *s))
                            })
                        })
                        .collect();
                    for (node, session) in sessions {
                        self.post(node, Part::Hub, PartMsg::Unregister(session));
                    }
                }
            }
        }
        let at = self.now + self.rng.range(30 * MS, 200 * MS);
        self.schedule(at, Event::ClientTick(client));
    }

    // ---- faults ----

    fn apply_fault(&mut self, fault: Fault) {
        self.log(|| format!("fault: {fault:?}"));
        match fault {
            Fault::Crash { node, lose_disk } => self.crash(node, lose_disk),
            Fault::Restart(node) => {
                if !self.nodes[node].running() && !self.nodes[node].left {
                    self.start_node(node);
                }
            }
            Fault::Freeze(node) => {
                if self.nodes[node].running() {
                    self.nodes[node].frozen = true;
                }
            }
            Fault::Thaw(node) => self.thaw(node),
            Fault::Cut(a, b) => {
                self.cut.insert((a, b));
            }
            Fault::Uncut(a, b) => {
                self.cut.remove(&(a, b));
            }
            Fault::Isolate(node) => {
                for other in 0..self.nodes.len() {
                    if other != node {
                        self.cut.insert((node, other));
                        self.cut.insert((other, node));
                    }
                }
            }
            Fault::Rejoin(node) => self.cut.retain(|(a, b)| *a != node && *b != node),
            Fault::BreakLink(a, b) => {
                if !self.nodes[a].frozen {
                    self.drop_link(a, b);
                }
                if !self.nodes[b].frozen {
                    self.drop_link(b, a);
                }
            }
            Fault::SlowDisk(node, on) => self.nodes[node].disk_slow = on,
            Fault::FailDisk(node, on) => self.set_disk_failing(node, on),
            Fault::Join(node) => {
                if !self.nodes[node].running() {
                    self.start_node(node);
                }
            }
            Fault::Leave(node) => {
                let Some(life) = self.nodes[node].life.as_ref() else {
                    return;
                };
                let leave = life.detector.leave();
                let targets: Vec<String> = life
                    .detector
                    .members()
                    .map(|(m, _)| m.addr.clone())
                    .collect();
                for addr in targets {
                    if let Some(to) = self.node_of_addr(&addr) {
                        self.datagram(node, to, leave.clone());
                    }
                }
                self.crash(node, false);
                self.nodes[node].left = true;
            }
            Fault::Next => self.next_episode(),
        }
    }

    fn crash(&mut self, node: usize, lose_disk: bool) {
        let Some(life) = self.nodes[node].life.take() else {
            return;
        };
        let n = &mut self.nodes[node];
        n.frozen = false;
        n.backlog.clear();
        n.pending.clear();
        n.committing = false;
        n.disk_gen += 1;
        n.disk_failing = false;
        n.disk.lock().expect("disk").unwritable = false;
        n.disk_slow = false;
        if lose_disk {
            n.disk = Arc::new(Mutex::new(Disk::fresh()));
        }
        self.queues.retain(|(from, _), _| *from != node);
        // The kernel closes its sessions: peers learn it as soon as the close gets through.
        for (peer, generation) in life.links {
            let at = self.now + self.rng.range(200, 2_000);
            self.schedule(
                at,
                Event::Close {
                    node: peer,
                    peer: node,
                    generation,
                },
            );
        }
        let conns: Vec<(usize, u64)> = life.sessions.values().copied().collect();
        for (client, conn) in conns {
            self.tell_client(client, conn, ToClient::Closed);
        }
    }

    fn thaw(&mut self, node: usize) {
        if !self.nodes[node].frozen {
            return;
        }
        self.nodes[node].frozen = false;
        let backlog = std::mem::take(&mut self.nodes[node].backlog);
        for scheduled in backlog {
            self.schedule(self.now, scheduled.event);
        }
    }

    /// Schedules the next fault episode (one at a time), unless the cluster must converge first.
    fn next_episode(&mut self) {
        if !self.injecting {
            return;
        }
        if self.converge_before_next && !self.converged() {
            let at = self.now + 500 * MS;
            self.schedule(at, Event::Fault(Fault::Next));
            return;
        }
        let running: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| self.nodes[i].running())
            .collect();
        if running.len() < 2 {
            // What crashed after taking rooms over is still restarting.
            let at = self.now + 500 * MS;
            self.schedule(at, Event::Fault(Fault::Next));
            return;
        }
        self.converge_before_next = false;
        let disk_lost = self.disk_lost;
        let mut lost_now = None;
        let rng = &mut self.fault_rng;
        let spare: Option<usize> = (0..self.nodes.len()).find(|&i| !self.nodes[i].started);
        let left: Option<usize> = (0..self.nodes.len()).find(|&i| self.nodes[i].left);
        let pick = |rng: &mut Rng| running[rng.pick(running.len())];
        let mut steps: Vec<(Time, Fault)> = Vec::new();
        let kind = rng.pick(16);
        let a = pick(rng);
        let b = {
            let others: Vec<usize> = running.iter().copied().filter(|&i| i != a).collect();
            others
                .get(rng.pick(others.len().max(1)))
                .copied()
                .unwrap_or(a)
        };
        let hold = rng.range(300 * MS, 6 * SEC);
        let name = match kind {
            0 | 1 => {
                steps.push((
                    0,
                    Fault::Crash {
                        node: a,
                        lose_disk: false,
                    },
                ));
                steps.push((hold, Fault::Restart(a)));
                "crash"
            }
            2 => {
                let (a, lose_disk) = match disk_lost {
                    Some(lost) if running.contains(&lost) => (lost, true),
                    Some(_) => (a, false),
                    None => (a, true),
                };
                if lose_disk {
                    lost_now = Some(a);
                }
                steps.push((0, Fault::Crash { node: a, lose_disk }));
                steps.push((hold.min(3 * SEC), Fault::Restart(a)));
                self.converge_before_next = true;
                if lose_disk {
                    "crash_disk_lost"
                } else {
                    "crash"
                }
            }
            3 | 4 => {
                steps.push((0, Fault::Freeze(a)));
                steps.push((hold, Fault::Thaw(a)));
                "freeze"
            }
            5 => {
                steps.push((0, Fault::Isolate(a)));
                steps.push((hold, Fault::Rejoin(a)));
                "isolate"
            }
            6 => {
                steps.push((0, Fault::Cut(a, b)));
                steps.push((0, Fault::Cut(b, a)));
                steps.push((hold, Fault::Uncut(a, b)));
                steps.push((hold, Fault::Uncut(b, a)));
                "partial_partition"
            }
            7 => {
                steps.push((0, Fault::Cut(a, b)));
                steps.push((hold, Fault::Uncut(a, b)));
                "one_way_partition"
            }
            8 => {
                steps.push((0, Fault::BreakLink(a, b)));
                "link_break"
            }
            9 => {
                steps.push((0, Fault::SlowDisk(a, true)));
                steps.push((hold, Fault::SlowDisk(a, false)));
                "slow_fsync"
            }
            10 => {
                steps.push((0, Fault::FailDisk(a, true)));
                steps.push((hold.min(2 * SEC), Fault::FailDisk(a, false)));
                "failing_fsync"
            }
            11 => {
                // Two faults close together, on different nodes.
                let gap = rng.range(0, 300 * MS);
                let first = [
                    Fault::Crash {
                        node: a,
                        lose_disk: false,
                    },
                    Fault::Freeze(a),
                    Fault::Isolate(a),
                ][rng.pick(3)]
                .clone();
                let second = [
                    Fault::Crash {
                        node: b,
                        lose_disk: false,
                    },
                    Fault::Freeze(b),
                    Fault::Isolate(b),
                ][rng.pick(3)]
                .clone();
                for (at, fault, node) in [(0, first, a), (gap, second, b)] {
                    let heal = match fault {
                        Fault::Crash { .. } => Fault::Restart(node),
                        Fault::Freeze(_) => Fault::Thaw(node),
                        _ => Fault::Rejoin(node),
                    };
                    steps.push((at, fault));
                    steps.push((at + hold, heal));
                }
                "two_faults"
            }
            14 | 15 => {
                // A crash and a quick restart, often of a room's owner, mid-traffic.
                steps.push((
                    0,
                    Fault::Crash {
                        node: a,
                        lose_disk: false,
                    },
                ));
                steps.push((rng.range(20 * MS, 600 * MS), Fault::Restart(a)));
                "crash_quick_restart"
            }
            12 => match (spare, left) {
                (Some(node), _) => {
                    steps.push((0, Fault::Join(node)));
                    "join"
                }
                (None, Some(node)) => {
                    steps.push((0, Fault::Join(node)));
                    "rejoin"
                }
                _ => "none",
            },
            _ => {
                if running.len() > 3 && left.is_none() {
                    steps.push((0, Fault::Leave(a)));
                    "leave"
                } else {
                    steps.push((0, Fault::BreakLink(a, b)));
                    "link_break"
                }
            }
        };
        if lost_now.is_some() {
            self.disk_lost = lost_now;
        }
        *self.faults.entry(name).or_default() += 1;
        let end = steps.iter().map(|(t, _)| *t).max().unwrap_or(0);
        for (at, fault) in steps {
            self.schedule(self.now + at, Event::Fault(fault));
        }
        let pause = self.fault_rng.range(SEC, 4 * SEC);
        self.schedule(self.now + end + pause, Event::Fault(Fault::Next));
    }

    /// Ends every fault: thaws, heals the network and the disks, restarts what crashed.
    pub fn heal(&mut self) {
        self.injecting = false;
        self.cut.clear();
        for node in 0..self.nodes.len() {
            self.thaw(node);
            self.nodes[node].disk_slow = false;
            self.set_disk_failing(node, false);
            if self.nodes[node].started && !self.nodes[node].running() && !self.nodes[node].left {
                self.start_node(node);
            }
        }
    }

    /// Whether every node is up in every view, and every room's acknowledged messages are on a
    /// full placement of durable copies.
    pub fn converged(&self) -> bool {
        self.unconverged().is_none()
    }

    /// What keeps the cluster from having converged, if anything.
    pub fn unconverged(&self) -> Option<String> {
        let running: Vec<&Node> = self.nodes.iter().filter(|n| n.running()).collect();
        if !self.cut.is_empty() {
            return Some("the network is cut".into());
        }
        if let Some(n) = self
            .nodes
            .iter()
            .find(|n| n.started && !n.left && (!n.running() || n.frozen))
        {
            return Some(format!("{} is down or frozen", n.name));
        }
        if let Some(n) = running.iter().find(|n| {
            !n.life
                .as_ref()
                .is_some_and(|l| l.view.quorum && l.view.up_count() == running.len())
        }) {
            return Some(format!("{} does not see everyone up", n.name));
        }
        let view = running
            .first()
            .and_then(|n| n.life.as_ref())
            .map(|l| l.view.clone())?;
        for (room, acked) in &self.checker.acked {
            let size = view
                .room_placement(room, self.settings.replication_factor)
                .len();
            let holders: Vec<String> = self
                .nodes
                .iter()
                .filter(|n| n.running())
                .filter(|n| {
                    let disk = n.disk.lock().expect("disk");
                    let stored = disk.entries.get(room);
                    // Below what retention let the copy delete, nothing need be held.
                    let kept = disk.horizons.get(room).map_or(0, |h| h.compacted);
                    acked.range(kept..).all(|(seq, fact)| {
                        stored
                            .and_then(|s| s.get(seq))
                            .is_some_and(|e| crate::checker::Fact::of(e) == *fact)
                    })
                })
                .map(|n| n.name.to_string())
                .collect();
            if holders.len() < size {
                return Some(format!(
                    "{room}: acked messages on {holders:?} only, placement of {size}"
                ));
            }
        }
        None
    }

    /// Starts injecting fault episodes.
    pub fn start_faults(&mut self, after: Time) {
        self.injecting = true;
        self.schedule(self.now + after, Event::Fault(Fault::Next));
    }

    /// Applies a fault now (scripted scenarios).
    pub fn fault(&mut self, fault: Fault) {
        self.schedule(self.now, Event::Fault(fault));
    }

    /// Whether every running node sees every running node up, with a quorum.
    pub fn formed(&self) -> bool {
        let running = self.nodes.iter().filter(|n| n.running()).count();
        self.nodes.iter().filter(|n| n.running()).all(|n| {
            n.life
                .as_ref()
                .is_some_and(|l| l.view.quorum && l.view.up_count() == running)
        })
    }

    /// The node whose room core for `room` is active with the highest epoch, if any.
    pub fn active_owner(&self, room: &RoomId) -> Option<usize> {
        self.nodes
            .iter()
            .enumerate()
            .filter_map(|(i, n)| {
                let sim = n.life.as_ref()?.rooms.get(room)?;
                sim.core.is_active().then_some((sim.core.epoch(), i))
            })
            .max()
            .map(|(_, i)| i)
    }

    /// The last seq of `room` in `node`'s durable copy.
    pub fn disk_last_seq(&self, node: usize, room: &RoomId) -> u64 {
        self.nodes[node]
            .disk
            .lock()
            .map(|d| d.logs.get(room).map_or(0, |s| s.last_seq))
            .unwrap_or(0)
    }

    /// A one-line description of the state, for reports.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        for (i, n) in self.nodes.iter().enumerate() {
            let state = match (&n.life, n.frozen, n.left) {
                (_, _, true) => "left".to_owned(),
                (None, _, _) if !n.started => "spare".to_owned(),
                (None, _, _) => "down".to_owned(),
                (Some(l), frozen, _) => format!(
                    "{}up {:?} known {:?} q={} rooms {:?}",
                    if frozen { "frozen " } else { "" },
                    l.view.up().map(|n| n.to_string()).collect::<Vec<_>>(),
                    l.detector
                        .known()
                        .iter()
                        .map(|n| n.to_string())
                        .collect::<Vec<_>>(),
                    l.view.quorum,
                    l.rooms
                        .iter()
                        .map(|(r, s)| format!(
                            "{r}@{}{}c{}",
                            s.core.epoch(),
                            if s.core.is_active() { "a" } else { "-" },
                            s.core.commit()
                        ))
                        .collect::<Vec<_>>()
                ),
            };
            let _ = write!(out, "n{}: {state}; ", i + 1);
        }
        let _ = write!(out, "cuts {:?}", self.cut);
        out
    }
}

/// A short description of a peer message, for traces.
fn describe_message(message: &PeerMessage) -> String {
    match message {
        PeerMessage::Rooms(ToRooms::Room { room, message }) => match message {
            ToRoom::Request { origin, op, .. } => {
                format!("{room} request {} req {}", op.kind(), origin.req)
            }
            ToRoom::Subscribe {
                node,
                cursor,
                sessions,
            } => {
                format!(
                    "{room} subscribe from {node} cursor {cursor} sessions {}",
                    sessions.len()
                )
            }
            ToRoom::Promised {
                epoch,
                granted,
                state,
                ..
            } => format!(
                "{room} promised {epoch} {granted} (last {} synced {})",
                state.last_seq, state.synced
            ),
            ToRoom::Appended { epoch, outcome, .. } => {
                format!("{room} appended {epoch} {outcome:?}")
            }
            ToRoom::Fetched { entries, .. } => format!("{room} fetched {}", entries.len()),
            ToRoom::PromisedTrimmed {
                epoch,
                granted,
                state,
                horizon,
                ..
            } => format!(
                "{room} promised {epoch} {granted} (last {} synced {} horizon {horizon:?})",
                state.last_seq, state.synced
            ),
        },
        PeerMessage::Keeper(ToKeeper::Append {
            room,
            epoch,
            after_seq,
            entries,
            ..
        }) => format!("{room} append {epoch} after {after_seq} +{}", entries.len()),
        PeerMessage::Keeper(ToKeeper::Promise {
            room,
            epoch,
            placement,
        }) => {
            format!("{room} promise {epoch} {:?}", placement.nodes)
        }
        PeerMessage::Hub(ToHub::Fanout { room, entries }) => format!(
            "{room} fanout {:?}",
            entries.iter().map(|e| e.seq).collect::<Vec<_>>()
        ),
        PeerMessage::Hub(ToHub::Reply { req, reply }) => format!(
            "reply {req} {}",
            match reply {
                Reply::Acked { seq, .. } => format!("acked {seq}"),
                Reply::Joined { seq, replay, .. } => format!("joined {seq} +{}", replay.len()),
                Reply::Failed { message, .. } => format!("failed {message}"),
                _ => "other".into(),
            }
        ),
        PeerMessage::Hub(ToHub::RoomActive { room, owner }) => format!("{room} active at {owner}"),
        other => other.kind().to_owned(),
    }
}
