//! Failover: what clients see when nodes die (SIGKILL), leave (SIGTERM), come back or join, on
//! multi-process clusters of the real binary (`common::cluster`, bases 140..=230).
//!
//! The guarantees under test are the protocol's (docs/protocol.md §2–4): an acknowledged message
//! survives the loss of any one node, at the seq it was acknowledged with; a room's seqs stay
//! 1, 2, 3… with no gap and no repeat; a `send` always gets an answer (`ack` or `unavailable`,
//! never silence); a `send` retried with the same `id` is stored once; a client that resumes
//! with `since` gets exactly what it missed; connected members get a gap-free stream.
//!
//! Every message a test sends carries a unique client id, which is also its text, so that the
//! log can be audited id by id. Timing figures are printed (run with `--nocapture`); the product's
//! default timings are used (failure timeout 3000 ms, heartbeat 200 ms, request timeout 5000 ms);
//! how fast a failover must be is a target of the failover benchmark
//! (`cargo bench -p chat-node --bench failover`), not an assertion here.

// Helpers of a test panic on a broken expectation, like the tests themselves.
#![allow(clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chat_node::cluster::ring::Ring;
use chat_protocol::NodeName;
use common::cluster::{Cluster, FORM_TIMEOUT, cluster_view, get, health_status, placement};
use common::{Client, Polled};
use serde_json::{Value, json};

/// How often a failing send is retried.
const RETRY: Duration = Duration::from_millis(50);
/// Every request gets its answer within this (the product's request timeout is 5 s): past it,
/// the request was silently dropped.
const REPLY_DEADLINE: Duration = Duration::from_secs(8);
/// How long a room may stay unwritable after a single failure before a test gives up.
const WRITABLE_WITHIN: Duration = Duration::from_secs(20);
/// Pause between two messages of a steady sender: about 65 per second, under the default rate
/// limit of 100 per second per connection.
const PACE: Duration = Duration::from_millis(15);

fn names(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

// ---------------------------------------------------------------------------------------------
// Requests that survive failures
// ---------------------------------------------------------------------------------------------

/// The answer to one `send`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Acknowledged with this seq.
    Acked(u64),
    /// `unavailable`: retry.
    Unavailable,
    /// The connection ended before the answer (the client's node died).
    Closed,
}

/// Classifies the reply to a `send` to `room`; panics on anything but `ack` or `unavailable`.
fn outcome(reply: &Value, room: &str, id: &str) -> Outcome {
    match reply["type"].as_str() {
        Some("ack") => {
            assert_eq!(reply["room"], room, "ack of {id}: {reply}");
            Outcome::Acked(
                reply["seq"]
                    .as_u64()
                    .unwrap_or_else(|| panic!("ack of {id} without seq: {reply}")),
            )
        }
        Some("error") if reply["code"] == "unavailable" => Outcome::Unavailable,
        _ => panic!("send {id} to {room}: unexpected reply {reply}"),
    }
}

/// Sends `frame` with the string `ref` `reference` and waits for the frame carrying it (other
/// frames are dropped). `None` if the connection ends first; panics if no answer comes within
/// [`REPLY_DEADLINE`]: a request is never silently dropped.
async fn exchange(client: &mut Client, mut frame: Value, reference: &str) -> Option<Value> {
    frame["ref"] = json!(reference);
    if !client.try_send(frame.clone()).await {
        return None;
    }
    let sent = Instant::now();
    loop {
        let left = REPLY_DEADLINE.saturating_sub(sent.elapsed());
        match client.poll_frame(left).await {
            Polled::Frame(f) if f["ref"] == json!(reference) => return Some(f),
            Polled::Frame(_) => {}
            Polled::Closed => return None,
            Polled::Quiet => panic!(
                "no answer to {frame} within {REPLY_DEADLINE:?}: the request was silently dropped"
            ),
        }
    }
}

/// One `send` of `id` (also its text) to `room`, with a `ref` derived from the id.
async fn send_once(client: &mut Client, room: &str, id: &str, attempt: u32) -> Outcome {
    let frame = json!({"type": "send", "room": room, "text": id, "id": id});
    match exchange(client, frame, &format!("{id}#{attempt}")).await {
        Some(reply) => outcome(&reply, room, id),
        None => Outcome::Closed,
    }
}

/// A request retried while the answer is `unavailable`; the first other answer.
async fn request_retrying(client: &mut Client, frame: Value, timeout: Duration) -> Value {
    let start = Instant::now();
    loop {
        let reply = client.request(frame.clone()).await;
        if reply["type"] != "error" || reply["code"] != "unavailable" {
            return reply;
        }
        assert!(
            start.elapsed() < timeout,
            "{frame} still unavailable after {timeout:?}: {reply}"
        );
        tokio::time::sleep(RETRY).await;
    }
}

/// Joins `room` (with `since`), retrying on `unavailable`; the `joined` reply.
async fn join_retrying(client: &mut Client, room: &str, since: Option<u64>) -> Value {
    let mut frame = json!({"type": "join", "room": room});
    if let Some(since) = since {
        frame["since"] = json!(since);
    }
    let reply = request_retrying(client, frame, WRITABLE_WITHIN).await;
    assert_eq!(reply["type"], "joined", "join {room}: {reply}");
    assert_eq!(reply["room"], room, "{reply}");
    reply
}

/// The room's whole history (paged by 500), oldest first, retrying on `unavailable`.
async fn full_history(client: &mut Client, room: &str) -> Vec<Value> {
    let mut all: Vec<Value> = Vec::new();
    let mut before: Option<u64> = None;
    loop {
        let mut frame = json!({"type": "history", "room": room, "limit": 500});
        if let Some(before) = before {
            frame["before"] = json!(before);
        }
        let reply = request_retrying(client, frame, WRITABLE_WITHIN).await;
        assert_eq!(reply["type"], "history", "history of {room}: {reply}");
        let page = reply["messages"]
            .as_array()
            .unwrap_or_else(|| panic!("history without messages: {reply}"))
            .clone();
        let Some(first) = page.first().and_then(|m| m["seq"].as_u64()) else {
            return all;
        };
        all.splice(0..0, page);
        if first <= 1 || before == Some(first) {
            return all;
        }
        before = Some(first);
    }
}

/// A user who keeps sending: retries `unavailable` with the same id, and when its node dies
/// reconnects to the next node of its list, joins its rooms again and retries with the same id.
struct Sender {
    user: String,
    nodes: Vec<SocketAddr>,
    at: usize,
    rooms: Vec<String>,
    client: Client,
    /// Every acknowledged message: id → (room, seq).
    acked: BTreeMap<String, (String, u64)>,
    /// `unavailable` answers received.
    unavailable: u64,
    /// Reconnections after the connection ended.
    reconnects: u64,
    /// The longest time from a message's first send to its ack.
    slowest: Duration,
    /// Sends made, for unique `ref`s.
    attempts: u32,
}

impl Sender {
    /// Connects `user` to `nodes[0]` and joins `rooms`.
    async fn connect(user: &str, nodes: &[SocketAddr], rooms: &[String]) -> Sender {
        let mut client = Client::connect(nodes[0], user).await;
        for room in rooms {
            join_retrying(&mut client, room, None).await;
        }
        Sender {
            user: user.to_owned(),
            nodes: nodes.to_vec(),
            at: 0,
            rooms: rooms.to_vec(),
            client,
            acked: BTreeMap::new(),
            unavailable: 0,
            reconnects: 0,
            slowest: Duration::ZERO,
            attempts: 0,
        }
    }

    /// Sends `id` to `room` until it is acknowledged; its seq.
    async fn send(&mut self, room: &str, id: &str) -> u64 {
        let start = Instant::now();
        let mut attempt = 0;
        loop {
            attempt += 1;
            self.attempts += 1;
            // `ref`s from 1_000_001 up never collide with those of direct `send_once` callers.
            match send_once(&mut self.client, room, id, 1_000_000 + self.attempts).await {
                Outcome::Acked(seq) => {
                    let previous = self.acked.insert(id.to_owned(), (room.to_owned(), seq));
                    assert!(previous.is_none(), "{id} acked twice by the test itself");
                    self.slowest = self.slowest.max(start.elapsed());
                    return seq;
                }
                Outcome::Unavailable => {
                    self.unavailable += 1;
                    tokio::time::sleep(RETRY).await;
                }
                Outcome::Closed => self.reconnect().await,
            }
            assert!(
                start.elapsed() < WRITABLE_WITHIN,
                "{}: {id} to {room} not acked within {WRITABLE_WITHIN:?} ({attempt} attempts)",
                self.user
            );
        }
    }

    async fn reconnect(&mut self) {
        self.at = (self.at + 1) % self.nodes.len();
        self.reconnects += 1;
        self.client = Client::connect(self.nodes[self.at], &self.user).await;
        for room in self.rooms.clone() {
            join_retrying(&mut self.client, &room, None).await;
        }
    }

    /// The acknowledged ids of `room` with their seqs.
    fn acked_in(&self, room: &str) -> BTreeMap<String, u64> {
        self.acked
            .iter()
            .filter(|(_, (r, _))| r == room)
            .map(|(id, (_, seq))| (id.clone(), *seq))
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// Auditing a log
// ---------------------------------------------------------------------------------------------

fn seq_of(m: &Value) -> u64 {
    m["seq"]
        .as_u64()
        .unwrap_or_else(|| panic!("message without seq: {m}"))
}

/// Asserts that `seqs` are exactly `from..=to`, in order; names the first deviation.
#[track_caller]
fn assert_contiguous(what: &str, seqs: &[u64], from: u64, to: u64) {
    let expected: Vec<u64> = (from..=to).collect();
    if seqs != expected.as_slice() {
        let at = seqs
            .iter()
            .zip(&expected)
            .position(|(a, b)| a != b)
            .unwrap_or(seqs.len().min(expected.len()));
        panic!(
            "{what}: seqs are not {from}..={to} in order: first deviation at index {at} (got \
             {:?}, expected {:?}); {} seqs received; all: {seqs:?}",
            seqs.get(at),
            expected.get(at),
            seqs.len()
        );
    }
}

/// Audits a room's log: seqs are 1..=N in order; no id appears twice; every acknowledged id is
/// at its acknowledged seq; every other id is one of `maybe` (sent, answered `unavailable`: it
/// may or may not have been stored).
#[track_caller]
fn audit_log(
    what: &str,
    stored: &[Value],
    acked: &BTreeMap<String, u64>,
    maybe: &BTreeSet<String>,
) {
    let seqs: Vec<u64> = stored.iter().map(seq_of).collect();
    assert_contiguous(what, &seqs, 1, stored.len() as u64);
    let mut count: HashMap<&str, Vec<u64>> = HashMap::new();
    for m in stored {
        let id = m["id"]
            .as_str()
            .unwrap_or_else(|| panic!("{what}: message without its client id: {m}"));
        assert_eq!(m["text"], id, "{what}: text and id differ: {m}");
        count.entry(id).or_default().push(seq_of(m));
    }
    let twice: BTreeMap<&str, &Vec<u64>> = count
        .iter()
        .filter(|(_, s)| s.len() > 1)
        .map(|(i, s)| (*i, s))
        .collect();
    assert!(
        twice.is_empty(),
        "{what}: ids stored more than once (id: seqs): {twice:?}"
    );
    let mut lost = Vec::new();
    let mut moved = Vec::new();
    for (id, seq) in acked {
        match count.get(id.as_str()) {
            None => lost.push((id, seq)),
            Some(at) if at[0] != *seq => moved.push((id, seq, at[0])),
            Some(_) => {}
        }
    }
    assert!(
        lost.is_empty(),
        "{what}: acknowledged messages lost (id, acked seq): {lost:?}"
    );
    assert!(
        moved.is_empty(),
        "{what}: acknowledged messages at another seq (id, acked seq, stored seq): {moved:?}"
    );
    let unknown: Vec<&&str> = count
        .keys()
        .filter(|id| !acked.contains_key(**id) && !maybe.contains(**id))
        .collect();
    assert!(
        unknown.is_empty(),
        "{what}: messages nobody sent: {unknown:?}"
    );
}

fn median(figures: &[Duration]) -> Duration {
    let mut sorted = figures.to_vec();
    sorted.sort();
    let n = sorted.len();
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2
    }
}

/// Kills node `i` (SIGKILL) and returns the moment of the kill.
fn sigkill(cluster: &mut Cluster, i: usize) -> Instant {
    let killed = Instant::now();
    cluster.node_mut(i).kill();
    killed
}

/// Relaunches node `i` (same flags, same data directory) and waits until every node of the
/// cluster sees every node up and healthy; the time that took.
async fn relaunch_and_wait(cluster: &mut Cluster, i: usize) -> Duration {
    let relaunched = Instant::now();
    cluster.node_mut(i).relaunch();
    cluster.wait_formed().await;
    relaunched.elapsed()
}

// ---------------------------------------------------------------------------------------------
// 1. Failover time
// ---------------------------------------------------------------------------------------------

/// What a probe saw: see [`probe_until_acked`].
#[derive(Default)]
struct Probe {
    first_ack: Option<Duration>,
    acked: BTreeMap<String, u64>,
    unavailable: BTreeSet<String>,
}

/// Sends a new message (each with a new id) to `room` every [`RETRY`], reading the answers
/// meanwhile, until one is acknowledged; then waits until every send has its answer. The time
/// from `since` to the first ack, what was acked, what was refused.
async fn probe_until_acked(client: &mut Client, room: &str, prefix: &str, since: Instant) -> Probe {
    let mut probe = Probe::default();
    let mut outstanding: HashMap<String, (String, Instant)> = HashMap::new();
    let mut next = Instant::now();
    let mut k = 0;
    loop {
        let now = Instant::now();
        if probe.first_ack.is_none() {
            assert!(
                since.elapsed() < WRITABLE_WITHIN,
                "{room}: no send acked within {WRITABLE_WITHIN:?} of the kill ({k} sent, {} \
                 refused)",
                probe.unavailable.len()
            );
            if now >= next {
                k += 1;
                let id = format!("{prefix}-{k}");
                let reference = format!("{id}#1");
                let frame = json!({"type": "send", "ref": reference, "room": room, "text": id,
                                   "id": id});
                assert!(
                    client.try_send(frame).await,
                    "the prober's connection (to a surviving node) ended"
                );
                outstanding.insert(reference, (id, now));
                next = (next + RETRY).max(now);
            }
        } else if outstanding.is_empty() {
            return probe;
        }
        if let Some((_, (id, at))) = outstanding
            .iter()
            .find(|(_, (_, at))| at.elapsed() > REPLY_DEADLINE)
        {
            panic!(
                "{room}: send {id} got no answer within {:?}: silently dropped",
                at.elapsed()
            );
        }
        let wait = if probe.first_ack.is_none() {
            next.saturating_duration_since(Instant::now())
        } else {
            Duration::from_millis(100)
        };
        match client.poll_frame(wait).await {
            Polled::Frame(frame) => {
                let Some((id, _)) = frame["ref"].as_str().and_then(|r| outstanding.remove(r))
                else {
                    continue;
                };
                match outcome(&frame, room, &id) {
                    Outcome::Acked(seq) => {
                        probe.first_ack.get_or_insert_with(|| since.elapsed());
                        probe.acked.insert(id, seq);
                    }
                    Outcome::Unavailable => {
                        probe.unavailable.insert(id);
                    }
                    Outcome::Closed => unreachable!(),
                }
            }
            Polled::Quiet => {}
            Polled::Closed => panic!("the prober's connection (to a surviving node) ended"),
        }
    }
}

#[tokio::test]
async fn every_node_killed_in_turn_hands_its_rooms_over_whole_and_gets_them_back() {
    const ROUNDS: usize = 10;
    let mut cluster = Cluster::start(140, 3).await;
    let mut figures = Vec::new();
    let mut rejoins = Vec::new();
    for round in 0..ROUNDS {
        // Every node is killed in turn; the client is on the next one.
        let owner_i = round % 3 + 1;
        let client_i = owner_i % 3 + 1;
        let owner = cluster.names[owner_i - 1].clone();
        let room = cluster
            .room_owned_by(client_i, &owner, &format!("fo{round}"))
            .await;
        let mut sender = Sender::connect(
            &format!("alice{round}"),
            &[cluster.http(client_i)],
            std::slice::from_ref(&room),
        )
        .await;
        for k in 1..=2 {
            let seq = sender.send(&room, &format!("r{round}-before-{k}")).await;
            assert_eq!(seq, k, "{room}: a fresh room starts at seq 1");
        }
        let mut acked = sender.acked_in(&room);
        let alice = &mut sender.client;

        let killed = sigkill(&mut cluster, owner_i);
        let probe = probe_until_acked(alice, &room, &format!("r{round}-probe"), killed).await;
        let failover = probe.first_ack.expect("a probe ends with an ack");
        println!(
            "round {round}: killed {owner} (owner of {room}), client on n{client_i}: first ack \
             {failover:?} after the kill; {} sends acked, {} answered unavailable",
            probe.acked.len(),
            probe.unavailable.len()
        );
        figures.push(failover);
        for (id, seq) in &probe.acked {
            acked.insert(id.clone(), *seq);
        }
        let stored = full_history(alice, &room).await;
        audit_log(
            &format!("round {round}, {room} after the failover"),
            &stored,
            &acked,
            &probe.unavailable,
        );
        assert!(
            stored.len() as u64 > 2,
            "{room}: the acked probe is missing: {stored:?}"
        );

        let rejoin = relaunch_and_wait(&mut cluster, owner_i).await;
        rejoins.push(rejoin);
        // The room moves back to the restarted node, which must recover it whole.
        let mut back = Client::connect(cluster.http(owner_i), &format!("back{round}")).await;
        let again = full_history(&mut back, &room).await;
        assert_eq!(
            again, stored,
            "round {round}: {room} read through the restarted {owner} differs"
        );
        println!(
            "round {round}: {owner} relaunched, all 3 up and healthy after {rejoin:?}; history \
             identical through it ({} messages)",
            stored.len()
        );
    }
    let m = median(&figures);
    let max = figures.iter().max().copied().unwrap_or_default();
    println!("failover times (kill → first ack): {figures:?}");
    println!("failover median over {ROUNDS} owner kills: {m:?} (max {max:?})");
    println!("rejoin times (relaunch → 3 up and healthy everywhere): {rejoins:?}");
}

// ---------------------------------------------------------------------------------------------
// 2. No acked message lost mid-stream
// ---------------------------------------------------------------------------------------------

/// Sends `count` messages `{user}-{i}` to `room`, one every [`PACE`], counting acks in `acks`.
fn spawn_steady_sender(
    mut sender: Sender,
    room: String,
    count: usize,
    acks: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<Sender> {
    tokio::spawn(async move {
        for i in 1..=count {
            let id = format!("{}-{i}", sender.user);
            sender.send(&room, &id).await;
            acks.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(PACE).await;
        }
        sender
    })
}

/// Waits until `counter` reaches `target`; panics after `timeout`.
async fn wait_count(counter: &AtomicU64, target: u64, timeout: Duration, what: &str) {
    let start = Instant::now();
    while counter.load(Ordering::SeqCst) < target {
        assert!(
            start.elapsed() < timeout,
            "{what}: {} of {target} after {timeout:?}",
            counter.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn no_acked_message_is_lost_when_the_owner_dies_mid_stream() {
    const PER_SENDER: usize = 60;
    let mut cluster = Cluster::start(150, 3).await;
    let room = cluster.room_owned_by(1, "n3", "stream").await;
    let (n1, n2, n3) = (cluster.http(1), cluster.http(2), cluster.http(3));
    let rooms = vec![room.clone()];
    // Two senders on each surviving node, one on the owner (it reconnects to n1 when n3 dies).
    let plan: [(&str, Vec<SocketAddr>); 5] = [
        ("s1a", vec![n1]),
        ("s1b", vec![n1]),
        ("s2a", vec![n2]),
        ("s2b", vec![n2]),
        ("s3", vec![n3, n1]),
    ];
    let acks = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for (user, nodes) in plan {
        let sender = Sender::connect(user, &nodes, &rooms).await;
        tasks.push(spawn_steady_sender(
            sender,
            room.clone(),
            PER_SENDER,
            acks.clone(),
        ));
    }
    let total = (5 * PER_SENDER) as u64;
    wait_count(
        &acks,
        total / 3,
        Duration::from_secs(30),
        "acks before the kill",
    )
    .await;
    let acked_before = acks.load(Ordering::SeqCst);
    let killed = sigkill(&mut cluster, 3);
    wait_count(
        &acks,
        acked_before + 1,
        WRITABLE_WITHIN,
        "first ack after the kill",
    )
    .await;
    let resumed = killed.elapsed();
    let mut senders = Vec::new();
    for task in tasks {
        senders.push(task.await.expect("sender task"));
    }
    let finished = killed.elapsed();

    let mut acked = BTreeMap::new();
    for s in &senders {
        println!(
            "mid-stream: {} acked {} (unavailable answers {}, reconnects {}, slowest ack {:?})",
            s.user,
            s.acked.len(),
            s.unavailable,
            s.reconnects,
            s.slowest
        );
        acked.extend(s.acked_in(&room));
    }
    assert_eq!(
        senders[4].reconnects, 1,
        "s3 was connected to the killed owner"
    );
    println!(
        "mid-stream: {acked_before} of {total} acked before the kill; first ack after it \
         {resumed:?}; all acked {finished:?} after it"
    );
    let mut reader = Client::connect(n2, "reader").await;
    let stored = full_history(&mut reader, &room).await;
    // Every message was retried until acked: the log is exactly the acked set.
    assert_eq!(
        stored.len() as u64,
        total,
        "the log holds {} messages",
        stored.len()
    );
    audit_log("mid-stream log", &stored, &acked, &BTreeSet::new());

    // The restarted owner takes the room back and serves the same log.
    let rejoin = relaunch_and_wait(&mut cluster, 3).await;
    let mut back = Client::connect(n3, "back").await;
    assert_eq!(
        full_history(&mut back, &room).await,
        stored,
        "the log read through the restarted owner differs"
    );
    println!("mid-stream: n3 back after {rejoin:?}, same log through it");
}

// ---------------------------------------------------------------------------------------------
// 3. Resuming on another node
// ---------------------------------------------------------------------------------------------

/// Collects `message` events of `room` until one with seq `to` arrived (or `limit` passed),
/// then until the connection has been quiet for 300 ms; the seqs and messages in arrival order.
async fn collect_until(client: &mut Client, room: &str, to: u64, limit: Duration) -> Vec<Value> {
    let start = Instant::now();
    let mut got: Vec<Value> = Vec::new();
    while !got.iter().any(|m| seq_of(m) >= to) {
        if start.elapsed() > limit {
            return got;
        }
        match client.poll_frame(Duration::from_millis(100)).await {
            Polled::Frame(f) if f["type"] == "message" && f["room"] == room => got.push(f),
            Polled::Frame(_) | Polled::Quiet => {}
            Polled::Closed => panic!("connection closed while collecting {room}"),
        }
    }
    loop {
        match client.poll_frame(Duration::from_millis(300)).await {
            Polled::Frame(f) if f["type"] == "message" && f["room"] == room => got.push(f),
            Polled::Frame(_) => {}
            Polled::Quiet => return got,
            Polled::Closed => panic!("connection closed while collecting {room}"),
        }
    }
}

/// A client on node `x` has seen up to seq s of a room owned by n3; `x` is killed while a
/// client on n1 keeps sending; once `missed` more messages are acked (0: at once, while the room
/// may still be failing over) the client resumes on node `resume_at` with `since` = s. It must
/// receive exactly s+1.., in order, then live messages. `x` is relaunched at the end.
async fn resume_after_kill(
    cluster: &mut Cluster,
    case: &str,
    x: usize,
    resume_at: usize,
    missed: u64,
) {
    const LIVE: usize = 10;
    let room = cluster
        .room_owned_by(1, "n3", &format!("resume-{case}"))
        .await;
    let rooms = [room.clone()];
    let sender = Sender::connect(&format!("sender-{case}"), &[cluster.http(1)], &rooms).await;
    let carol_name = format!("carol-{case}");
    let mut carol = Client::connect(cluster.http(x), &carol_name).await;
    join_retrying(&mut carol, &room, None).await;
    let mut sender = sender;
    for i in 1..=20 {
        sender.send(&room, &format!("{case}-first-{i}")).await;
    }
    let seen = carol.messages_until(&room, 20).await;
    let seen_seqs: Vec<u64> = seen.iter().map(seq_of).collect();
    assert_contiguous(&format!("{case}: carol before the kill"), &seen_seqs, 1, 20);
    let s = 20;

    // The sender keeps going; LIVE more messages once carol has resumed.
    let acks = Arc::new(AtomicU64::new(0));
    let resumed = Arc::new(AtomicBool::new(false));
    let task = {
        let (acks, resumed, room, case) =
            (acks.clone(), resumed.clone(), room.clone(), case.to_owned());
        tokio::spawn(async move {
            let mut live_left: Option<usize> = None;
            for i in 1.. {
                if live_left.is_none() && resumed.load(Ordering::SeqCst) {
                    live_left = Some(LIVE);
                }
                if live_left == Some(0) {
                    break;
                }
                sender.send(&room, &format!("{case}-more-{i}")).await;
                acks.fetch_add(1, Ordering::SeqCst);
                if let Some(left) = live_left.as_mut() {
                    *left -= 1;
                }
                tokio::time::sleep(PACE).await;
            }
            sender
        })
    };
    wait_count(&acks, 5, Duration::from_secs(10), "acks before the kill").await;
    let killed = sigkill(cluster, x);
    drop(carol);
    let before_kill = acks.load(Ordering::SeqCst);
    wait_count(
        &acks,
        before_kill + missed,
        WRITABLE_WITHIN,
        "acks while X is dead",
    )
    .await;

    let mut carol = Client::connect(cluster.http(resume_at), &carol_name).await;
    let joined = join_retrying(&mut carol, &room, Some(s)).await;
    let joined_at = killed.elapsed();
    resumed.store(true, Ordering::SeqCst);
    let sender = task.await.expect("sender task");
    let last = sender
        .acked
        .values()
        .map(|(_, seq)| *seq)
        .max()
        .expect("acks");
    let got = collect_until(&mut carol, &room, last, Duration::from_secs(20)).await;
    let seqs: Vec<u64> = got.iter().map(seq_of).collect();
    let joined_seq = joined["seq"].as_u64().expect("joined seq");
    println!(
        "resume ({case}): carol saw up to {s} on n{x}, n{x} killed, resumed on n{resume_at} \
         {joined_at:?} after the kill with joined seq {joined_seq}; received {} messages \
         (replayed {}, live {}), last seq {last}; sender unavailable answers {}, slowest ack {:?}",
        got.len(),
        seqs.iter().filter(|q| **q <= joined_seq).count(),
        seqs.iter().filter(|q| **q > joined_seq).count(),
        sender.unavailable,
        sender.slowest
    );
    assert_contiguous(
        &format!("carol's messages after resuming with since={s} ({case})"),
        &seqs,
        s + 1,
        last,
    );
    assert!(joined_seq < last, "no live message after the resume");
    let stored = full_history(&mut carol, &room).await;
    audit_log(
        &format!("resume log ({case})"),
        &stored,
        &sender.acked_in(&room),
        &BTreeSet::new(),
    );
    assert_eq!(
        got.as_slice(),
        &stored[s as usize..],
        "{case}: carol's messages differ from the log"
    );
    relaunch_and_wait(cluster, x).await;
}

#[tokio::test]
async fn a_client_of_a_dead_node_resumes_exactly_on_another_node() {
    let mut cluster = Cluster::start(160, 3).await;
    // X = n2 is not the owner (n3). Resume on the owner, after missing 10 messages.
    resume_after_kill(&mut cluster, "x2-on-owner", 2, 3, 10).await;
    // Resume at once on n1, where the sender is: its hub already follows the room.
    resume_after_kill(&mut cluster, "x2-on-sender-node", 2, 1, 0).await;
}

#[tokio::test]
async fn a_client_of_a_dead_owner_resumes_exactly_on_another_node() {
    let mut cluster = Cluster::start(170, 3).await;
    // X = n3 is the owner. Resume on n2 after missing 10 messages (the room has failed over).
    resume_after_kill(&mut cluster, "x3-on-n2", 3, 2, 10).await;
    // Resume at once on n1, where the sender is, while the room may still be failing over.
    resume_after_kill(&mut cluster, "x3-on-sender-node", 3, 1, 0).await;
}

// ---------------------------------------------------------------------------------------------
// 4. Connected members across a failover
// ---------------------------------------------------------------------------------------------

/// Reads `room`'s messages until the seq published in `target` arrived, then until 300 ms of
/// quiet; the messages in arrival order.
fn spawn_member(
    mut client: Client,
    room: String,
    target: tokio::sync::watch::Receiver<Option<u64>>,
) -> tokio::task::JoinHandle<(String, Vec<Value>)> {
    tokio::spawn(async move {
        let user = client.welcome["user"].as_str().unwrap_or("?").to_owned();
        let mut got: Vec<Value> = Vec::new();
        let mut deadline: Option<Instant> = None;
        loop {
            let goal = *target.borrow();
            if let Some(goal) = goal {
                if got.iter().any(|m| seq_of(m) >= goal) {
                    break;
                }
                let d = *deadline.get_or_insert_with(|| Instant::now() + Duration::from_secs(15));
                if Instant::now() > d {
                    return (user, got);
                }
            }
            match client.poll_frame(Duration::from_millis(100)).await {
                Polled::Frame(f) if f["type"] == "message" && f["room"] == room => got.push(f),
                Polled::Frame(_) | Polled::Quiet => {}
                Polled::Closed => panic!("{user}'s connection (to a surviving node) closed"),
            }
        }
        loop {
            match client.poll_frame(Duration::from_millis(300)).await {
                Polled::Frame(f) if f["type"] == "message" && f["room"] == room => got.push(f),
                Polled::Frame(_) => {}
                Polled::Quiet | Polled::Closed => return (user, got),
            }
        }
    })
}

#[tokio::test]
async fn connected_members_keep_a_gap_free_stream_across_a_failover() {
    const PER_SENDER: usize = 80;
    let mut cluster = Cluster::start(180, 3).await;
    let room = cluster.room_owned_by(1, "n3", "members").await;
    let rooms = vec![room.clone()];
    let (target_tx, target_rx) = tokio::sync::watch::channel(None);
    let mut members = Vec::new();
    for node in [1, 2] {
        for k in 0..2 {
            let mut client = Client::connect(cluster.http(node), &format!("m{node}{k}")).await;
            let joined = join_retrying(&mut client, &room, None).await;
            assert_eq!(joined["seq"], 0, "{joined}");
            members.push(spawn_member(client, room.clone(), target_rx.clone()));
        }
    }
    let acks = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for (user, node) in [("w1", 1), ("w2", 2)] {
        let sender = Sender::connect(user, &[cluster.http(node)], &rooms).await;
        tasks.push(spawn_steady_sender(
            sender,
            room.clone(),
            PER_SENDER,
            acks.clone(),
        ));
    }
    wait_count(&acks, 50, Duration::from_secs(30), "acks before the kill").await;
    let killed = sigkill(&mut cluster, 3);
    let mut acked = BTreeMap::new();
    for task in tasks {
        let sender = task.await.expect("sender task");
        println!(
            "members: {} acked {} (unavailable answers {}, slowest ack {:?})",
            sender.user,
            sender.acked.len(),
            sender.unavailable,
            sender.slowest
        );
        acked.extend(sender.acked_in(&room));
    }
    println!(
        "members: all sends acked {:?} after the kill",
        killed.elapsed()
    );
    let total = (2 * PER_SENDER) as u64;
    target_tx.send_replace(Some(total));
    let mut reader = Client::connect(cluster.http(1), "reader").await;
    let stored = full_history(&mut reader, &room).await;
    assert_eq!(stored.len() as u64, total, "log length");
    audit_log("members' room log", &stored, &acked, &BTreeSet::new());
    for member in members {
        let (user, got) = member.await.expect("member task");
        let seqs: Vec<u64> = got.iter().map(seq_of).collect();
        println!("members: {user} received {} messages", got.len());
        assert_contiguous(&format!("{user}'s live stream"), &seqs, 1, total);
        assert_eq!(got, stored, "{user}'s stream differs from the log");
    }
}

// ---------------------------------------------------------------------------------------------
// 5. Handoff when a node joins
// ---------------------------------------------------------------------------------------------

/// The placement (owner, replicas) of `room` with RF 2 over `members`, computed with the
/// product's pure placement function (`cluster::ring`, rooms keyed `room:<id>` as its module doc
/// documents); the test checks the prediction against `/cluster/rooms` before relying on it.
fn predicted_placement(members: &[&str], room: &str) -> (String, Vec<String>) {
    let members: Vec<NodeName> = members
        .iter()
        .map(|m| NodeName::new(m).expect("node name"))
        .collect();
    let ring = Ring::new(&members);
    // Replication factor 2, but never fewer than a majority of the members.
    let size = 2.max(members.len() / 2 + 1);
    let mut nodes = ring
        .preference(&format!("room:{room}"), size)
        .into_iter()
        .map(|n| n.as_str().to_owned());
    let owner = nodes.next().expect("an owner");
    (owner, nodes.collect())
}

#[tokio::test]
async fn handoff_on_join_moves_rooms_without_loss() {
    const ROOMS: usize = 30;
    let three = ["n1", "n2", "n3"];
    let four = ["n1", "n2", "n3", "n4"];
    let mut cluster = Cluster::plan(190, 4);
    for i in 1..=3 {
        cluster.launch(i);
    }
    cluster
        .wait_healthy_views(&[1, 2, 3], &names(&three), FORM_TIMEOUT)
        .await;
    let rooms: Vec<String> = (0..ROOMS).map(|k| format!("hand-{k}")).collect();
    let mut acked: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    {
        let mut writers = Vec::new();
        for i in 1..=3 {
            writers.push(Sender::connect(&format!("u{i}"), &[cluster.http(i)], &rooms).await);
        }
        for (k, room) in rooms.iter().enumerate() {
            for m in 0..4 {
                let id = format!("{room}-setup-{m}");
                let seq = writers[(k + m) % 3].send(room, &id).await;
                assert_eq!(seq, m as u64 + 1, "{room}");
            }
        }
        for w in &writers {
            for room in &rooms {
                acked
                    .entry(room.clone())
                    .or_default()
                    .extend(w.acked_in(room));
            }
        }
        // Dropped here: idle members of every room would fill their queues later.
    }
    for room in &rooms {
        for i in 1..=3 {
            assert_eq!(
                placement(cluster.http(i), room).await,
                predicted_placement(&three, room),
                "{room} in n{i}'s view: the prediction does not match the product"
            );
        }
    }
    // The rooms whose placement the join changes (new owner or new replica) get background
    // traffic while n4 joins.
    let changing: Vec<String> = rooms
        .iter()
        .filter(|r| predicted_placement(&three, r) != predicted_placement(&four, r))
        .cloned()
        .collect();
    let moving: Vec<String> = rooms
        .iter()
        .filter(|r| predicted_placement(&four, r).0 == "n4")
        .cloned()
        .collect();
    assert!(!moving.is_empty(), "no room would move to n4");
    println!(
        "handoff: {} of {ROOMS} rooms change placement, {} move to n4: {moving:?}",
        changing.len(),
        moving.len()
    );

    // Each background sender cycles through the changing rooms and stops after the first full
    // cycle begun once every node agrees on the new placement.
    let stop = Arc::new(AtomicBool::new(false));
    let mut background = Vec::new();
    for i in 1..=3 {
        let mut sender = Sender::connect(&format!("bg{i}"), &[cluster.http(i)], &changing).await;
        let (stop, rooms) = (stop.clone(), changing.clone());
        background.push(tokio::spawn(async move {
            let mut cycles = 0;
            loop {
                let stopping = stop.load(Ordering::SeqCst);
                for room in &rooms {
                    let id = format!("{}-c{cycles}-{room}", sender.user);
                    sender.send(room, &id).await;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                cycles += 1;
                if stopping {
                    return (sender, cycles);
                }
            }
        }));
    }
    // The background traffic is under way before the join.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let launched = Instant::now();
    cluster.launch(4);
    let formed = cluster.wait_formed().await;
    let up_everywhere = launched.elapsed();
    let all = [1, 2, 3, 4];
    let agreed = loop {
        let mut agree = true;
        for room in &rooms {
            for &i in &all {
                if placement(cluster.http(i), room).await != predicted_placement(&four, room) {
                    agree = false;
                }
            }
            if !agree {
                break;
            }
        }
        if agree {
            break launched.elapsed();
        }
        assert!(
            launched.elapsed() < FORM_TIMEOUT,
            "nodes never agreed on the predicted placement:\n{}",
            cluster.describe(&all).await
        );
        tokio::time::sleep(RETRY).await;
    };
    stop.store(true, Ordering::SeqCst);
    for task in background {
        let (sender, cycles) = task.await.expect("background sender");
        println!(
            "handoff: {} acked {} over {cycles} cycles (unavailable answers {}, slowest ack {:?})",
            sender.user,
            sender.acked.len(),
            sender.unavailable,
            sender.slowest
        );
        for room in &rooms {
            acked
                .entry(room.clone())
                .or_default()
                .extend(sender.acked_in(room));
        }
    }
    println!(
        "handoff: n4 up and healthy everywhere {up_everywhere:?} after its launch (formed \
         wait {formed:?}); every node reports the new placement of all {ROOMS} rooms after \
         {agreed:?}"
    );

    let mut via4 = Client::connect(cluster.http(4), "auditor4").await;
    let mut via2 = Client::connect(cluster.http(2), "auditor2").await;
    let mut lengths = BTreeMap::new();
    for room in &rooms {
        let stored = full_history(&mut via4, room).await;
        audit_log(
            &format!("{room} through n4"),
            &stored,
            &acked[room],
            &BTreeSet::new(),
        );
        assert_eq!(
            stored.len(),
            acked[room].len(),
            "{room}: the log holds messages nobody got an ack for"
        );
        let other = full_history(&mut via2, room).await;
        assert_eq!(other, stored, "{room}: n2 and n4 serve different logs");
        lengths.insert(room.clone(), stored.len() as u64);
    }
    // The moved rooms continue their seq, written through their new owner and through another.
    let mut u4 = Sender::connect("u4", &[cluster.http(4)], &moving).await;
    let mut u2 = Sender::connect("u2", &[cluster.http(2)], &moving).await;
    for room in &moving {
        let next = lengths[room] + 1;
        let seq = u4.send(room, &format!("{room}-after-4")).await;
        assert_eq!(seq, next, "{room} through n4");
        let seq = u2.send(room, &format!("{room}-after-2")).await;
        assert_eq!(seq, next + 1, "{room} through n2");
        let entry = acked.entry(room.clone()).or_default();
        entry.extend(u4.acked_in(room));
        entry.extend(u2.acked_in(room));
    }
    println!(
        "handoff: the moved rooms continue their seq (unavailable answers meanwhile: {})",
        u4.unavailable + u2.unavailable
    );

    // The handed-over logs are replicated: losing the new owner loses nothing.
    let killed = sigkill(&mut cluster, 4);
    let mut via1 = Client::connect(cluster.http(1), "auditor1").await;
    for room in &rooms {
        let stored = full_history(&mut via1, room).await;
        audit_log(
            &format!("{room} after n4 was killed"),
            &stored,
            &acked[room],
            &BTreeSet::new(),
        );
        assert_eq!(stored.len(), acked[room].len(), "{room}: log length");
    }
    println!(
        "handoff: n4 killed; every room complete again through n1 {:?} after",
        killed.elapsed()
    );
}

// ---------------------------------------------------------------------------------------------
// 6. Whole-cluster restart
// ---------------------------------------------------------------------------------------------

async fn whole_cluster_restart(base: u8, signal: &str) {
    const ROOMS: usize = 6;
    let mut cluster = Cluster::start(base, 3).await;
    let rooms: Vec<String> = (0..ROOMS).map(|k| format!("keep-{k}")).collect();
    let mut writers = Vec::new();
    for i in 1..=3 {
        writers.push(Sender::connect(&format!("u{i}"), &[cluster.http(i)], &rooms).await);
    }
    for (k, room) in rooms.iter().enumerate() {
        for m in 0..5 {
            writers[(k + m) % 3]
                .send(room, &format!("{room}-m{m}"))
                .await;
        }
    }
    let mut before = BTreeMap::new();
    for room in &rooms {
        let mut acked = BTreeMap::new();
        for w in &writers {
            acked.extend(w.acked_in(room));
        }
        let stored = full_history(&mut writers[0].client, room).await;
        audit_log(
            &format!("{room} before the restart"),
            &stored,
            &acked,
            &BTreeSet::new(),
        );
        before.insert(room.clone(), stored);
    }
    drop(writers);

    let stopped = Instant::now();
    match signal {
        "TERM" => {
            for i in 1..=3 {
                cluster.node(i).signal("TERM");
            }
            for i in 1..=3 {
                assert_eq!(
                    cluster.node_mut(i).wait_exit(),
                    Some(0),
                    "n{i} after SIGTERM"
                );
            }
        }
        _ => {
            for i in 1..=3 {
                cluster.node_mut(i).kill();
            }
        }
    }
    let down = stopped.elapsed();
    let relaunched = Instant::now();
    for i in 1..=3 {
        cluster.node_mut(i).relaunch();
    }
    cluster.wait_formed().await;
    let formed = relaunched.elapsed();
    // The same users again, one per node, joined to every room.
    let mut readers = Vec::new();
    for i in 1..=3 {
        readers.push(Sender::connect(&format!("u{i}"), &[cluster.http(i)], &rooms).await);
    }
    for (k, room) in rooms.iter().enumerate() {
        let stored = full_history(&mut readers[k % 3].client, room).await;
        assert_eq!(
            stored, before[room],
            "{room}: history after SIG{signal} of all nodes"
        );
        // A retry of the last message from before the restart is recognised.
        let last = before[room].last().expect("messages");
        let author = last["from"].as_str().expect("from");
        let i: usize = author[1..].parse().expect("u<i>");
        let id = last["id"].as_str().expect("id");
        let seq = readers[i - 1].send(room, id).await;
        assert_eq!(seq, seq_of(last), "{room}: a retried id after the restart");
        let next = before[room].len() as u64 + 1;
        let mut fresh = Sender::connect(
            &format!("after{k}"),
            &[cluster.http(k % 3 + 1)],
            std::slice::from_ref(room),
        )
        .await;
        let seq = fresh.send(room, &format!("{room}-after")).await;
        assert_eq!(seq, next, "{room}: the next send after the restart");
    }
    println!(
        "whole-cluster SIG{signal}: all down after {down:?}; relaunched, 3 up and healthy after \
         {formed:?}; {ROOMS} rooms identical, seq continues, retried ids recognised"
    );
}

#[tokio::test]
async fn whole_cluster_restart_keeps_history_and_seq() {
    whole_cluster_restart(200, "TERM").await;
}

#[tokio::test]
async fn whole_cluster_restart_after_sigkill_keeps_history_and_seq() {
    whole_cluster_restart(210, "KILL").await;
}

// ---------------------------------------------------------------------------------------------
// 7. One replica lost, then the majority
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_room_is_readable_and_writable_with_one_replica_lost() {
    let mut cluster = Cluster::start(220, 3).await;
    let room = cluster.room_owned_by(1, "n1", "rf").await;
    let (owner, replicas) = placement(cluster.http(1), &room).await;
    assert_eq!(replicas.len(), 1, "RF 2: {replicas:?}");
    let o = cluster.index_of(&owner);
    let p = cluster.index_of(&replicas[0]);
    let t = 6 - o - p;
    let third = cluster.names[t - 1].clone();
    let rooms = vec![room.clone()];
    // alice is on the node that survives everything.
    let mut alice = Sender::connect("alice", &[cluster.http(t)], &rooms).await;
    for i in 1..=5 {
        alice.send(&room, &format!("before-{i}")).await;
    }

    let killed = sigkill(&mut cluster, p);
    alice.send(&room, "after-replica-loss-1").await;
    let writable = killed.elapsed();
    let start = Instant::now();
    loop {
        let seen = [
            placement(cluster.http(o), &room).await,
            placement(cluster.http(t), &room).await,
        ];
        if seen
            .iter()
            .all(|x| *x == (owner.clone(), vec![third.clone()]))
        {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{room}: the replica did not move to {third}: {seen:?}"
        );
        tokio::time::sleep(RETRY).await;
    }
    for i in 2..=5 {
        alice.send(&room, &format!("after-replica-loss-{i}")).await;
    }
    let stored = full_history(&mut alice.client, &room).await;
    audit_log(
        "one replica lost",
        &stored,
        &alice.acked_in(&room),
        &BTreeSet::new(),
    );
    println!(
        "rf2: replica {} killed; {room} acked again {writable:?} after; replica now {third}",
        replicas[0]
    );

    // Two of three dead: the last node has no majority and must refuse writes.
    let killed = sigkill(&mut cluster, o);
    let t_addr = cluster.http(t);
    let start = Instant::now();
    loop {
        let view = cluster_view(t_addr)
            .await
            .expect("/cluster of the last node");
        if view["quorum"] == false && health_status(t_addr).await == Some(503) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the last node still claims a quorum: {view}"
        );
        tokio::time::sleep(RETRY).await;
    }
    let lost = killed.elapsed();
    let (status, body) = get(t_addr, "/healthz").await.expect("/healthz");
    assert_eq!(status, 503, "{body}");
    let mut refused = BTreeSet::new();
    let mut refusal_times = Vec::new();
    for k in 1..=2 {
        let id = format!("refused-{k}");
        let asked = Instant::now();
        let answer = send_once(&mut alice.client, &room, &id, 1).await;
        refusal_times.push(asked.elapsed());
        assert_eq!(answer, Outcome::Unavailable, "{id} with 2 of 3 nodes dead");
        refused.insert(id);
    }
    println!(
        "rf2: owner {owner} killed too; the last node lost its quorum {lost:?} after; sends \
         refused with unavailable in {refusal_times:?}"
    );

    // One node back (the stale replica): a majority again, writes work, nothing acked is lost.
    let relaunched = Instant::now();
    cluster.node_mut(p).relaunch();
    cluster
        .wait_healthy_views(&[t, p], &names(&[&third, &replicas[0]]), FORM_TIMEOUT)
        .await;
    for id in refused.clone() {
        alice.send(&room, &id).await;
    }
    println!(
        "rf2: {} relaunched; writes acked again {:?} after",
        replicas[0],
        relaunched.elapsed()
    );
    let stored = full_history(&mut alice.client, &room).await;
    audit_log(
        "after the majority came back",
        &stored,
        &alice.acked_in(&room),
        &BTreeSet::new(),
    );
    assert_eq!(
        stored.len(),
        alice.acked.len(),
        "messages nobody got an ack for"
    );
    let mut via_p = Client::connect(cluster.http(p), "auditor").await;
    assert_eq!(
        full_history(&mut via_p, &room).await,
        stored,
        "the restarted replica serves another log"
    );
}

// ---------------------------------------------------------------------------------------------
// 8. Deduplication across a failover
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn retried_sends_with_the_same_id_are_stored_once_across_a_failover() {
    const BURST: usize = 40;
    let mut cluster = Cluster::start(230, 3).await;

    // A: acked by the owner, which dies; the same user retries through another node.
    let room_a = cluster.room_owned_by(1, "n3", "dedupe-a").await;
    let mut dave = Sender::connect(
        "dave",
        &[cluster.http(3), cluster.http(1)],
        std::slice::from_ref(&room_a),
    )
    .await;
    for i in 1..=3 {
        dave.send(&room_a, &format!("a-{i}")).await;
    }
    let x_seq = dave.send(&room_a, "x").await;
    let killed = sigkill(&mut cluster, 3);
    let mut attempt = 1;
    let retried = loop {
        attempt += 1;
        match send_once(&mut dave.client, &room_a, "x", attempt).await {
            Outcome::Acked(seq) => break seq,
            Outcome::Unavailable => tokio::time::sleep(RETRY).await,
            Outcome::Closed => dave.reconnect().await,
        }
        assert!(killed.elapsed() < WRITABLE_WITHIN, "x never acked again");
    };
    println!(
        "dedupe A: x acked at {x_seq}, owner killed, retry through n1 acked at {retried} after \
         {:?} ({attempt} attempts)",
        killed.elapsed()
    );
    assert_eq!(
        retried, x_seq,
        "a retried id must be acked with its original seq"
    );
    let next = dave.send(&room_a, "a-after").await;
    assert_eq!(next, x_seq + 1, "the retry stored a second copy");
    let stored = full_history(&mut dave.client, &room_a).await;
    audit_log(
        "dedupe A",
        &stored,
        &dave.acked_in(&room_a),
        &BTreeSet::new(),
    );
    let rejoin = relaunch_and_wait(&mut cluster, 3).await;
    println!("dedupe A: n3 back after {rejoin:?}");

    // B: a burst of sends; the owner is killed right after the first half is written, before
    // most of it is acked; all are retried with their ids. Those acked the first time keep
    // their seq; every id is stored once. Three rounds, as the kill lands at a random point of
    // the sends' way (hub, owner, replica, acks).
    for (round, owner_i) in [2, 3, 2].into_iter().enumerate() {
        let owner = cluster.names[owner_i - 1].clone();
        let room = cluster
            .room_owned_by(1, &owner, &format!("dedupe-b{round}"))
            .await;
        let user = format!("erin{round}");
        let mut erin =
            Sender::connect(&user, &[cluster.http(1)], std::slice::from_ref(&room)).await;
        erin.send(&room, &format!("{user}-first")).await;
        let ids: Vec<String> = (1..=BURST).map(|i| format!("{user}-b{i}")).collect();
        let mut killed = Instant::now();
        for (k, id) in ids.iter().enumerate() {
            if k == BURST / 2 {
                killed = sigkill(&mut cluster, owner_i);
            }
            let frame = json!({"type": "send", "ref": format!("{id}#1"), "room": room,
                               "text": id, "id": id});
            assert!(erin.client.try_send(frame).await, "erin's connection ended");
            if k >= BURST / 2 {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        let mut first: BTreeMap<String, u64> = BTreeMap::new();
        let mut pending: BTreeSet<String> = ids.iter().map(|id| format!("{id}#1")).collect();
        let start = Instant::now();
        while !pending.is_empty() {
            assert!(
                start.elapsed() < REPLY_DEADLINE,
                "no answer to {pending:?}: silently dropped"
            );
            match erin.client.poll_frame(Duration::from_millis(100)).await {
                Polled::Frame(f) => {
                    let Some(reference) = f["ref"].as_str().map(str::to_owned) else {
                        continue;
                    };
                    if pending.remove(&reference) {
                        let id = reference.trim_end_matches("#1");
                        if let Outcome::Acked(seq) = outcome(&f, &room, id) {
                            first.insert(id.to_owned(), seq);
                        }
                    }
                }
                Polled::Quiet => {}
                Polled::Closed => panic!("erin's connection (to a surviving node) closed"),
            }
        }
        let mut changed = Vec::new();
        let mut refused_but_stored = 0;
        let first_max = first.values().max().copied().unwrap_or(0);
        for id in &ids {
            let seq = erin.send(&room, id).await;
            match first.get(id) {
                Some(&original) if original != seq => changed.push((id.clone(), original, seq)),
                None if seq <= first_max => refused_but_stored += 1,
                _ => {}
            }
        }
        println!(
            "dedupe B{round}: owner {owner} killed after {} of {BURST} sends were written; {} \
             acked at the first try, {} answered unavailable (of which at least \
             {refused_but_stored} had been stored: their retry got an older seq); all acked \
             {:?} after the kill",
            BURST / 2,
            first.len(),
            BURST - first.len(),
            killed.elapsed()
        );
        assert!(
            changed.is_empty(),
            "retries acked at another seq (id, first, retry): {changed:?}"
        );
        let stored = full_history(&mut erin.client, &room).await;
        audit_log(
            &format!("dedupe B{round}"),
            &stored,
            &erin.acked_in(&room),
            &BTreeSet::new(),
        );
        assert_eq!(stored.len(), BURST + 1, "every id stored exactly once");
        relaunch_and_wait(&mut cluster, owner_i).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_member_far_behind_after_a_freeze_receives_every_message_in_order() {
    const BIG: u64 = 3_000; // 3,000 messages of 4 KiB: 12 parts of a re-send, 3 client queues
    let mut cluster = Cluster::plan(235, 3);
    for i in 1..=3 {
        cluster.set_args(i, vec!["--rate-limit".into(), "0".into()]);
    }
    for i in 1..=3 {
        cluster.launch(i);
    }
    cluster.wait_formed().await;
    let room = cluster.room_owned_by(1, "n1", "behind").await;
    let mut alice = Client::connect(cluster.http(1), "alice").await;
    alice.join(&room, None).await;
    // A small receive buffer: what bob does not read stays at n2, not in the kernel.
    let mut bob = Client::connect_with_receive_buffer(cluster.http(2), "bob", 64 << 10).await;
    bob.join(&room, None).await;
    assert_eq!(alice.say(&room, "before").await, 1);
    bob.messages_until(&room, 1).await;

    // n2 freezes past the failure timeout; the room goes on without it.
    cluster.node(2).signal("STOP");
    let all = cluster.all_names();
    let deadline = Instant::now() + Duration::from_secs(15);
    while common::cluster::up_members(cluster.http(1)).await.as_ref() == Some(&all) {
        assert!(Instant::now() < deadline, "n2 never declared down");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let text = "y".repeat(4000);
    let texts: Vec<String> = (0..BIG).map(|i| format!("{i} {text}")).collect();
    // In chunks that alice reads back as she goes: she is a member too, and 12 MiB of her own
    // messages unread would overflow her queue.
    let mut last = 0;
    for chunk in texts.chunks(100) {
        let seqs = alice.say_many(&room, chunk).await;
        last = *seqs.last().expect("acked");
    }
    assert_eq!(last, BIG + 1);

    // Thawed, n2 catches up: bob receives every message after the one he had, in order, and
    // at his pace: he reads nothing for a while, and the catch-up waits for him instead of
    // overflowing his queue (which would cut him off as too slow).
    cluster.node(2).signal("CONT");
    let thawed = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(15);
    while common::cluster::up_members(cluster.http(2)).await.as_ref() != Some(&all) {
        assert!(Instant::now() < deadline, "n2 never saw the cluster again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let received = tokio::time::timeout(Duration::from_secs(60), bob.messages_until(&room, last))
        .await
        .expect("bob never received the last message");
    let got: Vec<u64> = received
        .iter()
        .filter_map(|m| m["seq"].as_u64())
        .filter(|seq| *seq > 1)
        .collect();
    assert_eq!(got, (2..=last).collect::<Vec<_>>(), "a gap or a repeat");
    println!(
        "a member {BIG} messages (12 MiB) behind caught up {:?} after the thaw",
        thawed.elapsed()
    );
}
