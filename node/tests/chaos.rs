//! Chaos: three `chat-node` processes in network namespaces (see `common/netns.rs`), many
//! clients chatting in several rooms, and a fault injector; then a checker that every
//! acknowledged message is in the log exactly once at its acknowledged seq, and that every
//! client's stream was gap-free and duplicate-free.
//!
//! **Faults.** One at a time, on a random node, each followed by a recovery window: SIGKILL and
//! restart (same data), SIGSTOP and SIGCONT, and a partition of the node from the two others
//! (clients still reach it). At most one node is faulty at any moment, and the cluster is whole
//! again (every node up with a quorum) before the next fault: the product's guarantee is for a
//! single failure ("an acked message survives the loss of any single node", replication factor
//! 2), so two overlapping faults are outside what it promises.
//!
//! **Clients.** Three per node, each in all rooms; each sends one message at a time with a
//! unique `id`, retries it with the same `id` on `unavailable`, and records every ack. A client
//! whose node closes, stops answering (8 s) or keeps refusing (8 s) connects to the next node,
//! joins every room again with `since` = the last seq it saw, and sends its unacknowledged
//! message again with the same `id`. Per connection and room it checks that messages arrive
//! exactly once and in order, starting right after `since` (or the seq of its first join).
//!
//! **Duration.** `CHAOS_SECS` (default 40) of faults; `CHAOS_SEED` replays a run's fault
//! sequence (the seed is printed). A long run:
//! `CHAOS_SECS=600 cargo test --release -p chat-node --test chaos -- --nocapture`

mod common;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use common::netns::NetCluster;
use futures_util::{SinkExt, StreamExt};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Clients per node.
const CLIENTS_PER_NODE: usize = 3;
/// Rooms every client is in.
const ROOMS: usize = 5;
/// Pause between a client's ack and its next send.
const SEND_EVERY: Duration = Duration::from_millis(150);
/// A client waits this long for a reply (the node's own request timeout is 5 s) before it
/// gives up on its node; and as long for a node that keeps answering `unavailable`.
const GIVE_UP: Duration = Duration::from_secs(8);
/// How long the cluster may take to be whole again after a fault is undone.
const RECOVERY: Duration = Duration::from_secs(30);
/// The node's default replay cap (a join with `since` replays at most this many messages).
const REPLAY_CAP: u64 = 1000;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// One acknowledged message.
#[derive(Debug, Clone)]
struct Ack {
    client: usize,
    room: String,
    seq: u64,
    id: String,
    text: String,
    first_try: Instant,
    acked_at: Instant,
}

/// What one client saw.
#[derive(Debug, Default)]
struct Report {
    acks: Vec<Ack>,
    /// `(room, seq, id)` of every message received, in order.
    received: Vec<(String, u64, Option<String>)>,
    gaps: Vec<String>,
    duplicates: Vec<String>,
    /// Protocol errors: replies or frames that should never happen.
    errors: Vec<String>,
    connections: u32,
    unavailable: u32,
    gave_up: u32,
    unacked: Option<(String, String)>,
}

/// What a client has seen so far, shared with the test for the final catch-up check.
#[derive(Debug, Default, Clone)]
struct Progress {
    /// The last seq seen per room.
    seen: HashMap<String, u64>,
    /// The node (0-based) the client is connected to, or trying.
    node: usize,
}

/// What the test tells the clients.
#[derive(Default)]
struct Control {
    /// Finish the message in hand, then only read.
    stop_sending: AtomicBool,
    /// Close and report.
    close: AtomicBool,
    /// Clients that have nothing left to send.
    idle: AtomicUsize,
}

enum Read {
    Frame(Value),
    Quiet,
    Closed,
}

struct Conn {
    ws: Ws,
    next_ref: u64,
}

impl Conn {
    async fn open(addr: SocketAddr, user: &str) -> Option<Conn> {
        let url = format!("ws://{addr}/ws?user={user}");
        let (ws, _) = tokio::time::timeout(
            Duration::from_secs(3),
            tokio_tungstenite::connect_async(url),
        )
        .await
        .ok()?
        .ok()?;
        let mut conn = Conn { ws, next_ref: 1 };
        match conn.read(Instant::now() + Duration::from_secs(3)).await {
            Read::Frame(welcome) if welcome["type"] == "welcome" => Some(conn),
            _ => None,
        }
    }

    async fn send(&mut self, mut frame: Value) -> Option<u64> {
        let reference = self.next_ref;
        self.next_ref += 1;
        frame["ref"] = json!(reference);
        self.ws
            .send(Message::Text(frame.to_string().into()))
            .await
            .ok()?;
        Some(reference)
    }

    async fn read(&mut self, deadline: Instant) -> Read {
        loop {
            match tokio::time::timeout_at(deadline.into(), self.ws.next()).await {
                Err(_) => return Read::Quiet,
                Ok(None | Some(Err(_)) | Some(Ok(Message::Close(_)))) => return Read::Closed,
                Ok(Some(Ok(Message::Text(text)))) => match serde_json::from_str(&text) {
                    Ok(frame) => return Read::Frame(frame),
                    Err(_) => return Read::Closed,
                },
                Ok(Some(Ok(_))) => {}
            }
        }
    }
}

/// How a wait for a reply ended.
enum Outcome {
    Reply(Value),
    /// No reply in time, or the connection ended: go to another node.
    Lost,
}

struct ChaosClient {
    index: usize,
    user: String,
    rooms: Vec<String>,
    addrs: Vec<SocketAddr>,
    node: usize,
    /// What it has seen (shared with the test).
    progress: Arc<Mutex<Progress>>,
    /// The next seq expected per room on the current connection.
    expected: HashMap<String, u64>,
    pending: Option<(String, String, String, Instant)>,
    sent: u64,
    report: Report,
    control: Arc<Control>,
    epoch: u32,
}

impl ChaosClient {
    fn progress(&self) -> std::sync::MutexGuard<'_, Progress> {
        self.progress.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn on_frame(&mut self, frame: &Value) {
        if frame["type"] != "message" {
            return;
        }
        let room = frame["room"].as_str().unwrap_or_default().to_owned();
        let Some(seq) = frame["seq"].as_u64() else {
            self.report
                .errors
                .push(format!("message without seq: {frame}"));
            return;
        };
        let id = frame["id"].as_str().map(str::to_owned);
        let Some(expected) = self.expected.get_mut(&room) else {
            self.report.errors.push(format!(
                "{}: message before the join reply on connection {}: {frame}",
                self.user, self.epoch
            ));
            return;
        };
        if seq == *expected {
            *expected += 1;
        } else if seq < *expected {
            self.report.duplicates.push(format!(
                "{} connection {} ({}): {room} seq {seq} again (expected {expected})",
                self.user, self.epoch, self.node
            ));
            return;
        } else {
            self.report.gaps.push(format!(
                "{} connection {} (n{}): {room} jumped to seq {seq}, expected {expected}",
                self.user, self.epoch, self.node
            ));
            *expected = seq + 1;
        }
        self.report.received.push((room.clone(), seq, id));
        self.progress().seen.insert(room, seq);
    }

    /// Reads frames until `deadline` (handling messages); false if the connection ended.
    async fn idle_until(&mut self, conn: &mut Conn, deadline: Instant) -> bool {
        loop {
            match conn.read(deadline).await {
                Read::Frame(frame) => self.on_frame(&frame),
                Read::Quiet => return true,
                Read::Closed => return false,
            }
        }
    }

    /// Sends `frame` and waits for its reply (handling messages meanwhile).
    async fn request(&mut self, conn: &mut Conn, frame: Value) -> Outcome {
        let Some(reference) = conn.send(frame).await else {
            return Outcome::Lost;
        };
        let deadline = Instant::now() + GIVE_UP;
        loop {
            match conn.read(deadline).await {
                Read::Frame(frame) if frame["ref"] == json!(reference) => {
                    return Outcome::Reply(frame);
                }
                Read::Frame(frame) => self.on_frame(&frame),
                Read::Quiet | Read::Closed => return Outcome::Lost,
            }
        }
    }

    /// Joins every room with `since` = the last seq seen; false to try another node.
    async fn join_all(&mut self, conn: &mut Conn) -> bool {
        self.expected.clear();
        for room in self.rooms.clone() {
            let since = self.progress().seen.get(&room).copied();
            let started = Instant::now();
            loop {
                let mut frame = json!({"type": "join", "room": room});
                if let Some(since) = since {
                    frame["since"] = json!(since);
                }
                let reply = match self.request(conn, frame).await {
                    Outcome::Reply(reply) => reply,
                    Outcome::Lost => return false,
                };
                if reply["type"] == "joined" {
                    let seq = reply["seq"].as_u64().unwrap_or(0);
                    let start = match since {
                        Some(since) => {
                            if seq < since {
                                self.report.gaps.push(format!(
                                    "{}: joined {room} at seq {seq} below since {since}",
                                    self.user
                                ));
                            }
                            // A replay holds the newest `REPLAY_CAP` messages at most.
                            (since + 1).max(seq.saturating_sub(REPLAY_CAP) + 1)
                        }
                        None => {
                            self.progress().seen.insert(room.clone(), seq);
                            seq + 1
                        }
                    };
                    self.expected.insert(room.clone(), start);
                    break;
                }
                if reply["code"] != "unavailable" {
                    self.report
                        .errors
                        .push(format!("{}: join {room}: {reply}", self.user));
                }
                if started.elapsed() > GIVE_UP {
                    return false;
                }
                if !self
                    .idle_until(conn, Instant::now() + Duration::from_millis(250))
                    .await
                {
                    return false;
                }
            }
        }
        true
    }

    /// Sends the message in hand until it is acknowledged; false to try another node.
    async fn send_pending(&mut self, conn: &mut Conn) -> bool {
        let mut refused_since: Option<Instant> = None;
        while let Some((room, id, text, first_try)) = self.pending.clone() {
            let frame = json!({"type": "send", "room": room, "text": text, "id": id});
            let reply = match self.request(conn, frame).await {
                Outcome::Reply(reply) => reply,
                Outcome::Lost => return false,
            };
            match reply["type"].as_str() {
                Some("ack") if reply["room"] == json!(room) && reply["seq"].is_u64() => {
                    self.report.acks.push(Ack {
                        client: self.index,
                        room,
                        seq: reply["seq"].as_u64().unwrap_or(0),
                        id,
                        text,
                        first_try,
                        acked_at: Instant::now(),
                    });
                    self.pending = None;
                }
                Some("error") if reply["code"] == "unavailable" => {
                    self.report.unavailable += 1;
                    let since = *refused_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > GIVE_UP {
                        return false;
                    }
                    if !self
                        .idle_until(conn, Instant::now() + Duration::from_millis(250))
                        .await
                    {
                        return false;
                    }
                }
                _ => {
                    self.report
                        .errors
                        .push(format!("{}: send {id}: {reply}", self.user));
                    return false;
                }
            }
        }
        true
    }

    async fn run(mut self) -> Report {
        let mut first = true;
        loop {
            if !first {
                self.report.gave_up += 1;
                self.node = (self.node + 1) % self.addrs.len();
                self.progress().node = self.node;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            first = false;
            if self.control.close.load(Ordering::SeqCst) {
                break;
            }
            let Some(mut conn) = Conn::open(self.addrs[self.node], &self.user).await else {
                continue;
            };
            self.epoch += 1;
            self.report.connections += 1;
            if !self.join_all(&mut conn).await {
                continue;
            }
            let mut lost = false;
            loop {
                if !self.send_pending(&mut conn).await {
                    lost = true;
                    break;
                }
                if self.control.stop_sending.load(Ordering::SeqCst) {
                    break;
                }
                if !self
                    .idle_until(&mut conn, Instant::now() + SEND_EVERY)
                    .await
                {
                    lost = true;
                    break;
                }
                self.sent += 1;
                let room = self.rooms[(self.sent as usize + self.index) % self.rooms.len()].clone();
                let id = format!("c{}-{}", self.index, self.sent);
                let text = format!("{} says {}", self.user, self.sent);
                self.pending = Some((room, id, text, Instant::now()));
            }
            if lost {
                continue;
            }
            // Nothing left to send: read until told to close.
            self.control.idle.fetch_add(1, Ordering::SeqCst);
            while !self.control.close.load(Ordering::SeqCst) {
                if !self
                    .idle_until(&mut conn, Instant::now() + Duration::from_millis(100))
                    .await
                {
                    self.report
                        .errors
                        .push(format!("{}: connection lost after the faults", self.user));
                    break;
                }
            }
            let _ = conn.ws.close(None).await;
            break;
        }
        self.report.unacked = self.pending.take().map(|(room, id, _, _)| (room, id));
        self.report
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    KillRestart,
    StopCont,
    Isolate,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_no_acked_message_is_lost() {
    let secs: u64 = std::env::var("CHAOS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(40);
    let seed: u64 = std::env::var("CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(common::now_ms);
    let Some(mut net) = NetCluster::start(41, 3).await else {
        return;
    };
    println!("chaos: {secs} s of faults, seed {seed} (CHAOS_SEED={seed} replays the faults)");
    let mut rng = StdRng::seed_from_u64(seed);
    let rooms: Vec<String> = (1..=ROOMS).map(|r| format!("chaos-{r}")).collect();
    let addrs = net.https();
    let control = Arc::new(Control::default());
    let mut seen = Vec::new();
    let mut tasks = Vec::new();
    for index in 0..CLIENTS_PER_NODE * addrs.len() {
        let progress = Arc::new(Mutex::new(Progress {
            seen: HashMap::new(),
            node: index % addrs.len(),
        }));
        seen.push(progress.clone());
        let client = ChaosClient {
            index,
            user: format!("u{index}"),
            rooms: rooms.clone(),
            addrs: addrs.clone(),
            node: index % addrs.len(),
            progress,
            expected: HashMap::new(),
            pending: None,
            sent: 0,
            report: Report::default(),
            control: control.clone(),
            epoch: 0,
        };
        tasks.push(tokio::spawn(client.run()));
    }

    // ---- faults ----
    let started = Instant::now();
    let mut faults: BTreeMap<Fault, u32> = BTreeMap::new();
    let mut worst_recovery = Duration::ZERO;
    tokio::time::sleep(Duration::from_secs(2)).await;
    while started.elapsed() < Duration::from_secs(secs) {
        let fault = match rng.random_range(0..3) {
            0 => Fault::KillRestart,
            1 => Fault::StopCont,
            _ => Fault::Isolate,
        };
        let node = rng.random_range(1..=net.size());
        let hold = Duration::from_millis(rng.random_range(500..6000));
        println!(
            "chaos: {:>6.1} s  {fault:?} n{node} for {hold:?}",
            started.elapsed().as_secs_f64()
        );
        match fault {
            Fault::KillRestart => {
                net.kill(node);
                tokio::time::sleep(hold).await;
                net.restart(node);
            }
            Fault::StopCont => {
                net.stop(node);
                tokio::time::sleep(hold).await;
                net.cont(node);
            }
            Fault::Isolate => {
                net.isolate(node);
                tokio::time::sleep(hold).await;
                net.heal(node);
            }
        }
        *faults.entry(fault).or_default() += 1;
        let recovered = net
            .wait_healthy_views(&[1, 2, 3], &net.all_names(), RECOVERY)
            .await;
        worst_recovery = worst_recovery.max(recovered);
        tokio::time::sleep(Duration::from_millis(rng.random_range(1500..4000))).await;
    }
    let faults_total: u32 = faults.values().sum();
    println!(
        "chaos: faults over after {:?}; {faults:?}; slowest recovery {worst_recovery:?}",
        started.elapsed()
    );

    // ---- drain: every client finishes the message in hand ----
    control.stop_sending.store(true, Ordering::SeqCst);
    let drain = Instant::now();
    while control.idle.load(Ordering::SeqCst) < tasks.len() {
        if drain.elapsed() > Duration::from_secs(60) {
            control.close.store(true, Ordering::SeqCst);
            panic!(
                "only {} of {} clients got their last message acked within 60 s of the \
                 faults' end:\n{}",
                control.idle.load(Ordering::SeqCst),
                tasks.len(),
                net.describe(&[1, 2, 3]).await
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "chaos: every client idle {:?} after the faults",
        drain.elapsed()
    );

    // ---- the logs, through every node ----
    let mut logs: Vec<Vec<Vec<Value>>> = Vec::new();
    for i in 1..=net.size() {
        let mut per_room = Vec::new();
        for room in &rooms {
            per_room.push(net.history(i, room, RECOVERY).await);
        }
        logs.push(per_room);
    }
    let mut divergent = 0;
    for (i, per_room) in logs.iter().enumerate().skip(1) {
        for (r, log) in per_room.iter().enumerate() {
            if *log != logs[0][r] {
                divergent += 1;
                println!(
                    "chaos: history of {} through n{} differs from n1's",
                    rooms[r],
                    i + 1
                );
            }
        }
    }
    let reference = &logs[0];
    // Every connected client catches up to the end of every room.
    let finals: HashMap<&str, u64> = rooms
        .iter()
        .zip(reference)
        .map(|(room, log)| (room.as_str(), log.len() as u64))
        .collect();
    let behind_now = || -> Vec<String> {
        seen.iter()
            .enumerate()
            .flat_map(|(c, progress)| {
                let progress = progress
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .clone();
                finals.iter().filter_map(move |(room, last)| {
                    let seen = progress.seen.get(*room).copied().unwrap_or(0);
                    (seen < *last).then(|| {
                        format!(
                            "u{c} on n{} saw {room} up to {seen} of {last}",
                            progress.node + 1
                        )
                    })
                })
            })
            .collect()
    };
    let catch_up = Instant::now();
    let behind = loop {
        let behind = behind_now();
        if behind.is_empty() || catch_up.elapsed() > Duration::from_secs(10) {
            break behind;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for line in &behind {
        println!("chaos: TAIL never delivered: {line}");
    }
    control.close.store(true, Ordering::SeqCst);
    let mut reports = Vec::new();
    for task in tasks {
        reports.push(task.await.expect("client task"));
    }

    // ---- the checks ----
    let mut history_gaps = 0;
    let mut history_duplicates = 0;
    let mut ids_at: HashMap<(&str, &str), Vec<u64>> = HashMap::new();
    for (room, log) in rooms.iter().zip(reference) {
        for (k, message) in log.iter().enumerate() {
            let seq = message["seq"].as_u64().unwrap_or(0);
            if seq != k as u64 + 1 {
                history_gaps += 1;
                println!("chaos: {room}: position {} holds seq {seq}", k + 1);
            }
            match message["id"].as_str() {
                Some(id) => ids_at.entry((room.as_str(), id)).or_default().push(seq),
                None => println!("chaos: {room}: a message without id: {message}"),
            }
        }
    }
    for ((room, id), seqs) in &ids_at {
        if seqs.len() > 1 {
            history_duplicates += seqs.len() - 1;
            println!(
                "chaos: {room}: {id} stored {} times, at {seqs:?}",
                seqs.len()
            );
        }
    }
    let acks: Vec<&Ack> = reports.iter().flat_map(|r| &r.acks).collect();
    let mut lost = 0;
    for ack in &acks {
        let r = rooms.iter().position(|r| *r == ack.room).expect("room");
        let stored = reference[r].get((ack.seq - 1) as usize);
        let ok = stored.is_some_and(|m| m["id"] == json!(ack.id) && m["text"] == json!(ack.text));
        if !ok {
            lost += 1;
            println!(
                "chaos: LOST {} acked to u{} at seq {} of {}; the log has {:?} there and the id at {:?}",
                ack.id,
                ack.client,
                ack.seq,
                ack.room,
                stored,
                ids_at.get(&(ack.room.as_str(), ack.id.as_str()))
            );
        }
    }
    let acked_ids: std::collections::HashSet<(&str, &str)> = acks
        .iter()
        .map(|a| (a.room.as_str(), a.id.as_str()))
        .collect();
    let stored_unacked = ids_at.keys().filter(|k| !acked_ids.contains(*k)).count();
    // Streams: what each client received must be the log's entry at that seq.
    let mut mismatched = 0;
    for (c, report) in reports.iter().enumerate() {
        for (room, seq, id) in &report.received {
            let r = rooms.iter().position(|x| x == room).expect("room");
            let stored = reference[r].get((*seq - 1) as usize);
            if stored.map(|m| m["id"].as_str().map(str::to_owned)) != Some(id.clone()) {
                mismatched += 1;
                println!("chaos: u{c} received {room} seq {seq} id {id:?}, the log has {stored:?}");
            }
        }
    }
    let stream_gaps: usize = reports.iter().map(|r| r.gaps.len()).sum();
    let stream_duplicates: usize = reports.iter().map(|r| r.duplicates.len()).sum();
    let errors: Vec<&String> = reports.iter().flat_map(|r| &r.errors).collect();
    for report in &reports {
        for line in report.gaps.iter().chain(&report.duplicates) {
            println!("chaos: {line}");
        }
    }
    for line in &errors {
        println!("chaos: protocol error: {line}");
    }
    let tail_gaps = behind.len();
    let unacked: Vec<&(String, String)> =
        reports.iter().filter_map(|r| r.unacked.as_ref()).collect();

    // The longest time a room had no successful ack while a sender was trying.
    let mut worst = (Duration::ZERO, String::new(), Duration::ZERO);
    let mut longest_send = Duration::ZERO;
    for room in &rooms {
        let mut in_room: Vec<&&Ack> = acks.iter().filter(|a| a.room == *room).collect();
        in_room.sort_by_key(|a| a.acked_at);
        let mut previous: Option<Instant> = None;
        for ack in in_room {
            let from = previous.map_or(ack.first_try, |p| p.max(ack.first_try));
            let window = ack.acked_at.saturating_duration_since(from);
            if window > worst.0 {
                worst = (
                    window,
                    room.clone(),
                    from.saturating_duration_since(started),
                );
            }
            longest_send = longest_send.max(ack.acked_at - ack.first_try);
            previous = Some(ack.acked_at);
        }
    }
    let stored: usize = reference.iter().map(Vec::len).sum();
    let connections: u32 = reports.iter().map(|r| r.connections).sum();
    let refused: u32 = reports.iter().map(|r| r.unavailable).sum();
    let gave_up: u32 = reports.iter().map(|r| r.gave_up).sum();
    let duplicated = history_duplicates + stream_duplicates;
    let gaps = history_gaps + stream_gaps + tail_gaps;
    println!(
        "chaos: acked {}, stored {stored}, lost {lost}, duplicated {duplicated} (log \
         {history_duplicates}, streams {stream_duplicates}), gaps {gaps} (log {history_gaps}, \
         streams {stream_gaps}, tails {tail_gaps}), mismatched deliveries {mismatched}, \
         divergent histories {divergent}, stored but never acked {stored_unacked}, unacked at \
         the end {}, protocol errors {}",
        acks.len(),
        unacked.len(),
        errors.len()
    );
    println!(
        "chaos: faults injected {faults_total} {faults:?}; connections {connections} (moved to \
         another node {gave_up} times); unavailable replies {refused}; max unavailability \
         window {:?} in {} from {:?}; longest single send {longest_send:?}",
        worst.0, worst.1, worst.2
    );
    assert!(faults_total > 0, "no fault was injected");
    assert!(!acks.is_empty(), "nothing was acknowledged");
    assert_eq!(lost, 0, "acknowledged messages lost");
    assert_eq!(duplicated, 0, "messages duplicated");
    assert_eq!(gaps, 0, "gaps in the log or in a client's stream");
    assert_eq!(
        mismatched, 0,
        "clients received messages the log does not hold"
    );
    assert_eq!(divergent, 0, "nodes serve different histories");
    assert!(
        unacked.is_empty(),
        "messages never acknowledged: {unacked:?}"
    );
    assert!(errors.is_empty(), "protocol errors: {errors:?}");
}
