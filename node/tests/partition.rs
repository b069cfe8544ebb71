//! Partition tests: three `chat-node` processes, each in its own network namespace (see
//! `common/netns.rs`), cut apart with iptables, frozen with SIGSTOP, and healed; clients in the
//! root namespace keep talking to every node, the cut-off one included.
//!
//! What they prove, with the product's default timing (heartbeat 200 ms, failure timeout 3 s,
//! lease 2.1 s): a cut-off node is detected by the others and rejoins after healing; the
//! minority side refuses writes before the majority moves its rooms (the lease), and the
//! majority serves the moved room within the documented failover time; a frozen owner that
//! thaws cannot sequence for a room that moved (the epoch fence); a partial partition (two nodes
//! cut from each other, the third seeing both) loses nothing; a node that only has members in a
//! room gets the room's messages again after it was cut off or frozen. After every heal, the
//! room's log is the same through every node, holds every acknowledged message exactly once at
//! its acknowledged seq, and every connected client's live stream is exactly that log.
//!
//! They need root and `ip netns`; elsewhere each reports itself skipped (printed, and counted by
//! `tests/run`; on CI, which has root, a skip fails). Figures are printed: run with `--nocapture` to see them.
//! `cargo test -p chat-node --release --test partition -- --nocapture --test-threads=1`

mod common;

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use common::Client;
use common::cluster::{cluster_view, metric_value};
use common::netns::NetCluster;
use serde_json::{Value, json};

/// How often views are polled while a time is measured.
const POLL: Duration = Duration::from_millis(50);
/// The product's default failure timeout.
const FAILURE_TIMEOUT: Duration = Duration::from_millis(3000);
/// How long any room may stay unwritable once the cluster is whole again.
const SETTLE: Duration = Duration::from_secs(20);

/// Claims a node's rooms won, and lost to a concurrent claimer (metrics series).
const CLAIMS_WON: &str = r#"chat_room_claims_total{kind="won"}"#;
/// See [`CLAIMS_WON`].
const CLAIMS_REFUSED: &str = r#"chat_room_claims_total{kind="refused"}"#;

/// Sends `text` (also its client message id) until acked; its seq. Panics after `timeout`.
async fn send_until_acked(client: &mut Client, room: &str, text: &str, timeout: Duration) -> u64 {
    client
        .send_until_acked(room, text, text, Instant::now() + timeout)
        .await
}

/// What a test expects of a room's log: every text that must end up in it, and the seq each
/// acknowledged text was acknowledged with.
#[derive(Default)]
struct Ledger {
    texts: Vec<String>,
    acked: HashMap<String, u64>,
}

impl Ledger {
    fn sent(&mut self, text: &str) {
        if !self.texts.iter().any(|t| t == text) {
            self.texts.push(text.to_owned());
        }
    }

    fn ack(&mut self, text: &str, seq: u64) {
        self.sent(text);
        if let Some(previous) = self.acked.insert(text.to_owned(), seq) {
            assert_eq!(
                previous, seq,
                "{text:?} acknowledged twice with different seqs"
            );
        }
    }

    fn unacked(&self) -> Vec<String> {
        self.texts
            .iter()
            .filter(|t| !self.acked.contains_key(*t))
            .cloned()
            .collect()
    }

    /// Asserts that `stored` is the log: seqs 1..=N in order, every text exactly once, every
    /// acknowledged text at its acknowledged seq.
    fn check(&self, stored: &[Value], through: &str) {
        let seqs: Vec<u64> = stored
            .iter()
            .map(|m| m["seq"].as_u64().unwrap_or_else(|| panic!("no seq: {m}")))
            .collect();
        let expected: Vec<u64> = (1..=stored.len() as u64).collect();
        assert_eq!(seqs, expected, "{through}: seqs are not 1..=N in order");
        let in_order: Vec<&str> = stored
            .iter()
            .map(|m| m["text"].as_str().unwrap_or_else(|| panic!("no text: {m}")))
            .collect();
        let mut sorted = in_order.clone();
        sorted.sort_unstable();
        let mut wanted: Vec<&str> = self.texts.iter().map(String::as_str).collect();
        wanted.sort_unstable();
        let duplicated: BTreeSet<&str> = sorted
            .windows(2)
            .filter(|w| w[0] == w[1])
            .map(|w| w[0])
            .collect();
        let missing: Vec<&str> = wanted
            .iter()
            .filter(|t| !in_order.contains(t))
            .copied()
            .collect();
        assert!(
            duplicated.is_empty() && missing.is_empty() && sorted == wanted,
            "{through}: the log does not hold every message exactly once \
             (duplicated {duplicated:?}, missing {missing:?}, {} stored, {} expected)",
            sorted.len(),
            wanted.len()
        );
        for (text, seq) in &self.acked {
            assert_eq!(
                in_order[(*seq - 1) as usize],
                text.as_str(),
                "{through}: {text:?} was acked with seq {seq}, the log has another message there"
            );
        }
    }
}

/// Checks the room's log through every node (identical everywhere, as the ledger says), then
/// each client's live stream: exactly the log, in order, nothing more.
async fn check_everything(
    net: &NetCluster,
    room: &str,
    ledger: &Ledger,
    clients: &mut [(usize, &mut Client)],
) -> Vec<Value> {
    let reference = net.history(1, room, SETTLE).await;
    ledger.check(&reference, "n1");
    for i in 2..=net.size() {
        let stored = net.history(i, room, SETTLE).await;
        assert_eq!(stored, reference, "history through n{i} differs from n1's");
    }
    let last = reference.len() as u64;
    for (node, client) in clients.iter_mut() {
        let live = client.messages_until(room, last).await;
        let seqs: Vec<u64> = live.iter().filter_map(|m| m["seq"].as_u64()).collect();
        assert_eq!(
            live, reference,
            "the live stream of a client on n{node} differs from the log (its seqs: {seqs:?})"
        );
        // Whatever else arrives within 300 ms of quiet goes to the backlog.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !client.quiet_for(Duration::from_millis(300)).await && Instant::now() < deadline {}
        let extra: Vec<&Value> = client
            .backlog
            .iter()
            .filter(|f| f["type"] == "message" && f["room"] == room)
            .collect();
        assert!(
            extra.is_empty(),
            "a client on n{node} got messages beyond the log: {extra:?}"
        );
    }
    reference
}

/// Connects `user` to node `i` and joins `room` (retrying while the room is unavailable).
async fn joined_client(net: &NetCluster, i: usize, user: &str, room: &str) -> Client {
    let mut client = Client::connect(net.http(i), user).await;
    let start = Instant::now();
    loop {
        let reply = client.request(json!({"type": "join", "room": room})).await;
        if reply["type"] == "joined" {
            return client;
        }
        assert!(
            reply["code"] == "unavailable" && start.elapsed() < SETTLE,
            "join {room} through n{i}: {reply}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Claims won and refused by each node's rooms so far.
async fn claims(net: &NetCluster) -> String {
    let mut out = Vec::new();
    for i in 1..=net.size() {
        let won = metric_value(net.http(i), CLAIMS_WON).await.unwrap_or(0.0);
        let refused = metric_value(net.http(i), CLAIMS_REFUSED)
            .await
            .unwrap_or(0.0);
        out.push(format!("n{i} won {won} refused {refused}"));
    }
    out.join(", ")
}

#[tokio::test]
async fn a_partitioned_node_is_detected_within_5s_and_rejoins_after_healing() {
    let Some(mut net) = NetCluster::start(31, 3).await else {
        return;
    };
    let room = net.room_placed("n3", None, "rejoin").await;

    let cut = Instant::now();
    net.isolate(3);
    println!(
        "isolate: rules in place {:?} after the cut began",
        cut.elapsed()
    );
    // One polling loop for every observation, so that their order is meaningful.
    let mut dropped: [Option<Duration>; 2] = [None, None];
    let mut n3_alone = None;
    let mut n3_no_quorum = None;
    let mut n3_health_503 = None;
    while cut.elapsed() < Duration::from_secs(10)
        && (dropped.iter().any(Option::is_none) || n3_alone.is_none() || n3_no_quorum.is_none())
    {
        for i in [1, 2] {
            let view = cluster_view(net.http(i))
                .await
                .unwrap_or_else(|| panic!("n{i} does not answer /cluster"));
            assert_eq!(view["quorum"], true, "n{i} lost its quorum: {view}");
            let n3_up = view["members"]
                .as_array()
                .expect("members")
                .iter()
                .any(|m| m["name"] == "n3" && m["status"] == "up");
            if !n3_up && dropped[i - 1].is_none() {
                dropped[i - 1] = Some(cut.elapsed());
            }
        }
        // The cut-off node still answers clients (the root namespace is not cut).
        let view = cluster_view(net.http(3))
            .await
            .expect("n3 answers /cluster while cut off");
        if view["quorum"] == false && n3_no_quorum.is_none() {
            n3_no_quorum = Some(cut.elapsed());
        }
        let up: Vec<&Value> = view["members"]
            .as_array()
            .expect("members")
            .iter()
            .filter(|m| m["status"] == "up")
            .collect();
        if up.len() == 1 && n3_alone.is_none() {
            n3_alone = Some(cut.elapsed());
        }
        if n3_health_503.is_none() && common::cluster::health_status(net.http(3)).await == Some(503)
        {
            n3_health_503 = Some(cut.elapsed());
        }
        tokio::time::sleep(POLL).await;
    }
    println!(
        "isolate: n1 dropped n3 after {:?}, n2 after {:?}; n3 lost its quorum after {:?}, \
         /healthz 503 after {:?}, saw itself alone after {:?}",
        dropped[0], dropped[1], n3_no_quorum, n3_health_503, n3_alone
    );
    for (i, d) in dropped.iter().enumerate() {
        let d = d.unwrap_or_else(|| panic!("n{} still lists n3 up 10 s after the cut", i + 1));
        assert!(
            d >= FAILURE_TIMEOUT - Duration::from_millis(300),
            "n{} dropped n3 after {d:?}, before the failure timeout",
            i + 1
        );
    }
    let no_quorum = n3_no_quorum.expect("n3 kept its quorum while cut off");
    let first_drop = dropped.iter().flatten().min().copied().expect("dropped");
    assert!(
        no_quorum < first_drop,
        "n3 lost its quorum ({no_quorum:?}) only after the majority dropped it ({first_drop:?})"
    );
    assert!(n3_alone.is_some(), "n3 never saw the others down");
    // Cut off, n3 serves no room: not even a join.
    let mut carol = Client::connect(net.http(3), "carol").await;
    let reply = carol.request(json!({"type": "join", "room": room})).await;
    assert_eq!(
        reply["code"], "unavailable",
        "join through the cut-off n3: {reply}"
    );

    let healed = Instant::now();
    net.heal(3);
    let rejoined = net
        .wait_healthy_views(&[1, 2, 3], &net.all_names(), Duration::from_secs(10))
        .await;
    println!("heal: all three up, healthy and with a quorum on every node {rejoined:?} after");
    // A real rejoin: the room n3 owns is served by n3 again, across nodes.
    let mut alice = joined_client(&net, 1, "alice", &room).await;
    let mut carol = joined_client(&net, 3, "carol", &room).await;
    let seq = send_until_acked(&mut carol, &room, "back", SETTLE).await;
    assert_eq!(alice.message(&room, seq).await["text"], "back");
    println!(
        "heal: first message through n3 acked and delivered on n1 {:?} after the heal",
        healed.elapsed()
    );
    assert_eq!(seq, 1, "the room had no message before");
}

/// One `send` attempt and its outcome.
#[derive(Debug, Clone)]
struct Attempt {
    text: String,
    /// When it was sent, from the cut.
    at: Duration,
    latency: Duration,
    /// The acknowledged seq, or `None` for `unavailable`.
    seq: Option<u64>,
}

/// Sends a new message every `every` until `until` (from `start`), retrying each on
/// `unavailable` with its id; returns every attempt. The last message may stay unacknowledged.
async fn write_until(
    client: &mut Client,
    room: &str,
    prefix: &str,
    start: Instant,
    until: Duration,
    every: Duration,
) -> Vec<Attempt> {
    let mut attempts = Vec::new();
    let mut k = 0;
    while start.elapsed() < until {
        k += 1;
        let text = format!("{prefix} {k}");
        loop {
            let at = start.elapsed();
            let sent = Instant::now();
            let reply = client
                .request(json!({"type": "send", "room": room, "text": text, "id": text}))
                .await;
            let seq = match reply["type"].as_str() {
                Some("ack") => Some(
                    reply["seq"]
                        .as_u64()
                        .unwrap_or_else(|| panic!("ack without seq: {reply}")),
                ),
                Some("error") if reply["code"] == "unavailable" => None,
                _ => panic!("send {text:?}: unexpected reply {reply}"),
            };
            attempts.push(Attempt {
                text: text.clone(),
                at,
                latency: sent.elapsed(),
                seq,
            });
            if seq.is_some() || start.elapsed() >= until {
                break;
            }
            // Retried quickly, like an eager client: a retry lands while the nodes' views
            // still disagree about the cut-off node (up to a heartbeat interval).
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        tokio::time::sleep(every).await;
    }
    attempts
}

/// Sends a new message every 250 ms until `until` (from `start`) without waiting for the
/// replies, then collects every reply; each message is one attempt (never retried here).
async fn probe_until(
    client: &mut Client,
    room: &str,
    prefix: &str,
    start: Instant,
    until: Duration,
) -> Vec<Attempt> {
    const EVERY: Duration = Duration::from_millis(250);
    let mut outstanding: HashMap<u64, (String, Duration, Instant)> = HashMap::new();
    let mut attempts = Vec::new();
    let mut next = Instant::now();
    let mut k = 0;
    let mut take =
        |client: &mut Client, outstanding: &mut HashMap<u64, (String, Duration, Instant)>| {
            let mut kept = std::collections::VecDeque::new();
            for frame in client.backlog.drain(..) {
                let Some((text, at, sent)) =
                    frame["ref"].as_u64().and_then(|r| outstanding.remove(&r))
                else {
                    kept.push_back(frame);
                    continue;
                };
                let seq = match frame["type"].as_str() {
                    Some("ack") => Some(
                        frame["seq"]
                            .as_u64()
                            .unwrap_or_else(|| panic!("ack without seq: {frame}")),
                    ),
                    Some("error") if frame["code"] == "unavailable" => None,
                    _ => panic!("send {text:?}: unexpected reply {frame}"),
                };
                attempts.push(Attempt {
                    text,
                    at,
                    latency: sent.elapsed(),
                    seq,
                });
            }
            client.backlog = kept;
        };
    while start.elapsed() < until || !outstanding.is_empty() {
        assert!(
            start.elapsed() < until + Duration::from_secs(10),
            "sends through {prefix}'s node never answered: {outstanding:?}"
        );
        if start.elapsed() < until && Instant::now() >= next {
            k += 1;
            let reference = 1000 + k;
            let text = format!("{prefix} {k}");
            client
                .send(json!({"type": "send", "ref": reference, "room": room, "text": text, "id": text}))
                .await;
            outstanding.insert(reference, (text, start.elapsed(), Instant::now()));
            next += EVERY;
        }
        client.quiet_for(Duration::from_millis(10)).await;
        take(client, &mut outstanding);
    }
    attempts.sort_by_key(|a| a.at);
    attempts
}

/// The longest stretch without an ack among `attempts` while attempts were made, and when the
/// first ack came.
fn ack_gaps(attempts: &[Attempt]) -> (Duration, Option<Duration>) {
    let mut acks: Vec<Duration> = attempts
        .iter()
        .filter(|a| a.seq.is_some())
        .map(|a| a.at + a.latency)
        .collect();
    acks.sort();
    let first = acks.first().copied();
    let mut longest = first.unwrap_or_default();
    for w in acks.windows(2) {
        longest = longest.max(w[1] - w[0]);
    }
    (longest, first)
}

#[tokio::test]
async fn the_minority_refuses_writes_and_the_majority_keeps_serving() {
    let Some(mut net) = NetCluster::start(32, 3).await else {
        return;
    };
    let room = net.room_placed("n3", None, "minority").await;
    let mut alice = joined_client(&net, 1, "alice", &room).await;
    let mut bob = joined_client(&net, 2, "bob", &room).await;
    let mut carol = joined_client(&net, 3, "carol", &room).await;
    let mut ledger = Ledger::default();
    for (client, text) in [
        (&mut alice, "alice before"),
        (&mut bob, "bob before"),
        (&mut carol, "carol before"),
    ] {
        ledger.ack(text, send_until_acked(client, &room, text, SETTLE).await);
    }

    const PHASE: Duration = Duration::from_secs(9);
    let cut = Instant::now();
    net.isolate(3);
    let urls = [net.http(1), net.http(2), net.http(3)];
    // Observer: when n3 loses its quorum, when n1 and n2 drop n3 (one loop, one clock).
    let observer = tokio::spawn(async move {
        let mut no_quorum = None;
        let mut dropped = [None, None];
        let mut majority_lost_quorum = Vec::new();
        while cut.elapsed() < PHASE {
            if no_quorum.is_none()
                && let Some(view) = cluster_view(urls[2]).await
                && view["quorum"] == false
            {
                no_quorum = Some(cut.elapsed());
            }
            for i in 0..2 {
                if let Some(view) = cluster_view(urls[i]).await {
                    if view["quorum"] != true {
                        majority_lost_quorum.push((i + 1, cut.elapsed(), view.clone()));
                    }
                    let n3_up = view["members"].as_array().is_some_and(|m| {
                        m.iter().any(|m| m["name"] == "n3" && m["status"] == "up")
                    });
                    if !n3_up && dropped[i].is_none() {
                        dropped[i] = Some(cut.elapsed());
                    }
                }
            }
            tokio::time::sleep(POLL).await;
        }
        (no_quorum, dropped, majority_lost_quorum)
    });
    let every = Duration::from_millis(150);
    let (room_a, room_b, room_c) = (room.clone(), room.clone(), room.clone());
    let a = tokio::spawn(async move {
        let attempts = write_until(&mut alice, &room_a, "alice", cut, PHASE, every).await;
        (alice, attempts)
    });
    let b = tokio::spawn(async move {
        let attempts = write_until(&mut bob, &room_b, "bob", cut, PHASE, every).await;
        (bob, attempts)
    });
    // Through the cut-off node: a fresh message every 250 ms, without waiting for the replies,
    // so that the answer to a send made at any moment of the cut is seen.
    let c = tokio::spawn(async move {
        let attempts = probe_until(&mut carol, &room_c, "carol", cut, PHASE).await;
        (carol, attempts)
    });
    let (no_quorum, dropped, majority_lost_quorum) = observer.await.expect("observer");
    let (mut alice, alice_attempts) = a.await.expect("alice");
    let (mut bob, bob_attempts) = b.await.expect("bob");
    let (mut carol, carol_attempts) = c.await.expect("carol");

    // The minority: never an ack, and a refusal within a few seconds.
    let minority_acks: Vec<&Attempt> = carol_attempts.iter().filter(|a| a.seq.is_some()).collect();
    // The first `unavailable` to arrive (answers to the sends made before n3 noticed wait for
    // the request timeout), and the first send refused at once.
    let first_refusal = carol_attempts
        .iter()
        .filter(|a| a.seq.is_none())
        .map(|a| a.at + a.latency)
        .min();
    let first_fast_refusal = carol_attempts
        .iter()
        .find(|a| a.seq.is_none() && a.latency < Duration::from_millis(500))
        .map(|a| a.at + a.latency);
    let last_minority_ack = minority_acks.iter().map(|a| a.at + a.latency).max();
    println!(
        "minority: {} sends through the cut-off owner n3, {} acked (last ack after the cut: \
         {last_minority_ack:?}); first unavailable at {first_refusal:?} after the cut, first \
         immediate refusal at {first_fast_refusal:?}; n3's quorum flag false at {no_quorum:?}",
        carol_attempts.len(),
        minority_acks.len(),
    );
    for window in [(0, 2), (2, 3), (3, 9)] {
        let latencies: Vec<u128> = carol_attempts
            .iter()
            .filter(|a| (window.0..window.1).contains(&a.at.as_secs()))
            .map(|a| a.latency.as_millis())
            .collect();
        println!(
            "minority: sends made {}-{} s after the cut were refused after (ms) {latencies:?}",
            window.0, window.1
        );
    }
    println!(
        "majority: n1 dropped n3 at {:?}, n2 at {:?}",
        dropped[0], dropped[1]
    );
    assert!(
        minority_acks.is_empty(),
        "the cut-off n3 acknowledged writes: {minority_acks:?}"
    );
    let first_refusal = first_refusal.expect("n3 never answered unavailable");
    assert!(
        first_refusal < Duration::from_secs(5),
        "n3 answered unavailable only {first_refusal:?} after the cut"
    );
    assert!(
        majority_lost_quorum.is_empty(),
        "the majority lost its quorum: {majority_lost_quorum:?}"
    );
    let no_quorum = no_quorum.expect("n3 never lost its quorum");
    let first_drop = dropped
        .iter()
        .map(|d| d.expect("the majority never dropped n3"))
        .min()
        .expect("two");
    println!(
        "lease: n3 stopped accepting writes {no_quorum:?} after the cut, {:?} before the \
         majority declared it down ({first_drop:?})",
        first_drop.saturating_sub(no_quorum)
    );
    assert!(
        no_quorum < first_drop,
        "n3 still had its quorum ({no_quorum:?}) when the majority declared it down \
         ({first_drop:?}): both sides could write"
    );
    // And as its clients see it: refused at once before the majority took the room.
    assert!(
        first_refusal < first_drop,
        "n3's clients got their first refusal at {first_refusal:?}, after the majority \
         declared n3 down ({first_drop:?})"
    );

    // The majority: the room failed over and kept being written, within the documented
    // failover time after a partition (docs/failover.md: the failure timeout plus a claim round
    // trip; 2 s of slack here). Checked last, after the logs, so that a slow failover does not
    // hide a divergence.
    let failover_bound = FAILURE_TIMEOUT + Duration::from_secs(2);
    let mut slow = Vec::new();
    for (name, attempts) in [
        ("alice on n1", &alice_attempts),
        ("bob on n2", &bob_attempts),
    ] {
        let acked = attempts.iter().filter(|a| a.seq.is_some()).count();
        let (longest, first) = ack_gaps(attempts);
        println!(
            "majority: {name}: {acked} acked of {} attempts; first ack {first:?} after the \
             cut, longest stretch without an ack {longest:?}",
            attempts.len()
        );
        if acked < 5 || first.is_none_or(|f| f > failover_bound) {
            let late: Vec<String> = attempts
                .iter()
                .filter(|a| a.seq.is_none() || a.latency > Duration::from_secs(1))
                .map(|a| format!("{:?}+{:?}:{:?}", a.at, a.latency, a.seq))
                .collect();
            slow.push(format!(
                "{name}: first ack {first:?} after the cut (bound {failover_bound:?}), {acked} \
                 acks; slow or refused attempts (sent at + latency: seq) {late:?}"
            ));
        }
    }
    for attempts in [&alice_attempts, &bob_attempts, &carol_attempts] {
        for attempt in attempts {
            ledger.sent(&attempt.text);
            if let Some(seq) = attempt.seq {
                ledger.ack(&attempt.text, seq);
            }
        }
    }
    println!("claims during the cut: {}", claims(&net).await);

    let healed = Instant::now();
    net.heal(3);
    let formed = net
        .wait_healthy_views(&[1, 2, 3], &net.all_names(), Duration::from_secs(10))
        .await;
    println!("heal: whole again {formed:?} after");
    // The minority's unacknowledged messages are retried with their ids, through n3.
    for text in ledger.unacked() {
        let client = if text.starts_with("carol") {
            &mut carol
        } else if text.starts_with("bob") {
            &mut bob
        } else {
            &mut alice
        };
        let seq = send_until_acked(client, &room, &text, SETTLE).await;
        ledger.ack(&text, seq);
    }
    println!(
        "heal: every message acked {:?} after the heal",
        healed.elapsed()
    );
    let log = check_everything(
        &net,
        &room,
        &ledger,
        &mut [(1, &mut alice), (2, &mut bob), (3, &mut carol)],
    )
    .await;
    println!("final: {} messages, identical on every node", log.len());
    assert!(
        slow.is_empty(),
        "the majority did not serve the moved room in time:\n{}",
        slow.join("\n")
    );
}

/// Waits for the reply carrying `reference`: the ack's seq, or `None` for `unavailable`.
async fn ack_or_unavailable(client: &mut Client, reference: u64) -> Option<u64> {
    let reply = client.recv_until(|f| f["ref"] == json!(reference)).await;
    match reply["type"].as_str() {
        Some("ack") => Some(reply["seq"].as_u64().unwrap_or_else(|| panic!("{reply}"))),
        Some("error") if reply["code"] == "unavailable" => None,
        _ => panic!("unexpected reply {reply}"),
    }
}

#[tokio::test]
async fn a_frozen_owner_that_thaws_cannot_sequence_for_a_moved_room() {
    let Some(net) = NetCluster::start(33, 3).await else {
        return;
    };
    let room = net.room_placed("n2", None, "frozen").await;
    let mut alice = joined_client(&net, 1, "alice", &room).await;
    let mut bob = joined_client(&net, 2, "bob", &room).await;
    let mut carol = joined_client(&net, 3, "carol", &room).await;
    let mut ledger = Ledger::default();
    for i in 1..=2 {
        let text = format!("before {i}");
        ledger.ack(
            &text,
            send_until_acked(&mut alice, &room, &text, SETTLE).await,
        );
    }

    // Frames from bob, on the owner: three just before the freeze, three into the frozen
    // process's socket (the kernel still takes them).
    let mut frozen_refs = Vec::new();
    let send_frozen = |k: u64| {
        let text = format!("frozen {k}");
        (
            100 + k,
            text.clone(),
            json!({"type": "send", "ref": 100 + k, "room": room, "text": text, "id": text}),
        )
    };
    for k in 1..=3 {
        let (reference, text, frame) = send_frozen(k);
        bob.send(frame).await;
        ledger.sent(&text);
        frozen_refs.push((reference, text));
    }
    let stopped = Instant::now();
    net.stop(2);
    for k in 4..=6 {
        let (reference, text, frame) = send_frozen(k);
        bob.send(frame).await;
        ledger.sent(&text);
        frozen_refs.push((reference, text));
    }

    // The majority takes the room over.
    for i in 1..=3 {
        let text = format!("during {i}");
        let seq = send_until_acked(&mut alice, &room, &text, SETTLE).await;
        ledger.ack(&text, seq);
        if i == 1 {
            println!(
                "freeze: room writable on the majority {:?} after SIGSTOP of its owner",
                stopped.elapsed()
            );
        }
    }
    let text = "during carol";
    ledger.ack(
        text,
        send_until_acked(&mut carol, &room, text, SETTLE).await,
    );
    let moved_to = common::cluster::placement(net.http(1), &room).await.0;
    println!("freeze: the room is now owned by {moved_to} (n1's view)");
    assert_ne!(moved_to, "n2", "the room did not move off the frozen owner");

    let continued = Instant::now();
    net.cont(2);
    // Writes right after the thaw, through a survivor, while the thawed node works through
    // what it queued.
    for i in 1..=3 {
        let text = format!("after {i}");
        ledger.ack(
            &text,
            send_until_acked(&mut carol, &room, &text, SETTLE).await,
        );
    }
    let mut outcomes = Vec::new();
    for (reference, text) in &frozen_refs {
        let outcome = ack_or_unavailable(&mut bob, *reference).await;
        if let Some(seq) = outcome {
            ledger.ack(text, seq);
        }
        outcomes.push((text.clone(), outcome));
    }
    println!(
        "thaw: the frames bob sent around the freeze got {outcomes:?} (seq or unavailable), \
         all answered {:?} after SIGCONT",
        continued.elapsed()
    );
    let formed = net
        .wait_healthy_views(&[1, 2, 3], &net.all_names(), Duration::from_secs(10))
        .await;
    println!("thaw: whole again {formed:?} after the wait began");
    // Which way the thawed node went depends on whether its room or its membership ran first:
    // the room sequenced what it had queued and was fenced, or the hub saw the move first.
    let log = net.log(2);
    println!(
        "thaw: n2's log: {} 'fenced by a newer epoch', {} 'stepping down'",
        log.matches("fenced by a newer epoch").count(),
        log.matches("stepping down").count()
    );
    // The acks the thawed node gave must already agree with the log as the majority wrote it:
    // check them before anything else is written.
    let interim = net.history(1, &room, SETTLE).await;
    for (text, outcome) in &outcomes {
        if let Some(seq) = outcome {
            let at = interim.get((*seq - 1) as usize).map(|m| m["text"].clone());
            assert_eq!(
                at,
                Some(json!(text)),
                "{text:?} was acked by the thawed node with seq {seq}, which holds {at:?}"
            );
        }
    }
    for text in ledger.unacked() {
        let seq = send_until_acked(&mut bob, &room, &text, SETTLE).await;
        ledger.ack(&text, seq);
    }
    let text = "back home";
    ledger.ack(text, send_until_acked(&mut bob, &room, text, SETTLE).await);
    let log = check_everything(
        &net,
        &room,
        &ledger,
        &mut [(1, &mut alice), (2, &mut bob), (3, &mut carol)],
    )
    .await;
    println!(
        "final: {} messages, identical on every node; claims {}",
        log.len(),
        claims(&net).await
    );
}

#[tokio::test]
async fn an_owner_cut_off_from_its_replica_only_stays_consistent() {
    let Some(mut net) = NetCluster::start(34, 3).await else {
        return;
    };
    let room = net.room_placed("n1", Some("n2"), "partial").await;
    let mut alice = joined_client(&net, 1, "alice", &room).await;
    let mut bob = joined_client(&net, 2, "bob", &room).await;
    let mut carol = joined_client(&net, 3, "carol", &room).await;
    let mut ledger = Ledger::default();
    for (client, text) in [
        (&mut alice, "alice before"),
        (&mut bob, "bob before"),
        (&mut carol, "carol before"),
    ] {
        ledger.ack(text, send_until_acked(client, &room, text, SETTLE).await);
    }
    // A second room, owned by n2 and replicated on n3: from n1 (which no longer sees n2) it is
    // reached only through n3, which still sees its owner.
    let far = net.room_placed("n2", Some("n3"), "partial-far").await;
    let mut dave = joined_client(&net, 1, "dave", &far).await;
    let mut erin = joined_client(&net, 2, "erin", &far).await;
    let mut far_ledger = Ledger::default();
    let text = "erin before";
    far_ledger.ack(text, send_until_acked(&mut erin, &far, text, SETTLE).await);
    assert!(
        message_within(&mut dave, &far, 1, Duration::from_secs(5))
            .await
            .is_some(),
        "dave on n1 did not get {far} seq 1 before the cut"
    );

    const PHASE: Duration = Duration::from_secs(10);
    let cut = Instant::now();
    net.partition(&[1], &[2]);
    let every = Duration::from_millis(150);
    let (room_a, room_b, room_c) = (room.clone(), room.clone(), room.clone());
    let a = tokio::spawn(async move {
        let attempts = write_until(&mut alice, &room_a, "alice", cut, PHASE, every).await;
        (alice, attempts)
    });
    let b = tokio::spawn(async move {
        let attempts = write_until(&mut bob, &room_b, "bob", cut, PHASE, every).await;
        (bob, attempts)
    });
    let c = tokio::spawn(async move {
        let attempts = write_until(&mut carol, &room_c, "carol", cut, PHASE, every).await;
        (carol, attempts)
    });
    let (far_d, far_e) = (far.clone(), far.clone());
    let d = tokio::spawn(async move {
        let attempts = write_until(&mut dave, &far_d, "dave", cut, PHASE, every).await;
        (dave, attempts)
    });
    let e = tokio::spawn(async move {
        let attempts = write_until(&mut erin, &far_e, "erin", cut, PHASE, every).await;
        (erin, attempts)
    });
    // Halfway through: how each node sees the others.
    tokio::time::sleep(FAILURE_TIMEOUT + Duration::from_secs(2)).await;
    let views = net.describe(&[1, 2, 3]).await;
    let mut owners = Vec::new();
    for i in 1..=3 {
        owners.push(common::cluster::placement(net.http(i), &room).await);
    }
    println!("partial partition (n1 and n2 cut from each other, n3 sees both):\n{views}");
    println!("partial partition: placement of {room} per node {owners:?}");
    let (mut alice, alice_attempts) = a.await.expect("alice");
    let (mut bob, bob_attempts) = b.await.expect("bob");
    let (mut carol, carol_attempts) = c.await.expect("carol");
    let (mut dave, dave_attempts) = d.await.expect("dave");
    let (mut erin, erin_attempts) = e.await.expect("erin");
    let dave_deliveries = dave
        .backlog
        .iter()
        .filter(|f| f["type"] == "message" && f["room"] == far.as_str())
        .count()
        - 1;
    for (name, attempts) in [
        ("dave on n1", &dave_attempts),
        ("erin on n2", &erin_attempts),
    ] {
        let acked = attempts.iter().filter(|a| a.seq.is_some()).count();
        let slowest = attempts.iter().map(|a| a.latency).max().unwrap_or_default();
        println!(
            "partial partition: {far}: {name}: {acked} acked of {} attempts (slowest answer \
             {slowest:?})",
            attempts.len()
        );
        for attempt in attempts {
            far_ledger.sent(&attempt.text);
            if let Some(seq) = attempt.seq {
                far_ledger.ack(&attempt.text, seq);
            }
        }
    }
    println!(
        "partial partition: {far}: dave on n1 received {dave_deliveries} of its messages while \
         n1 and the owner n2 were cut apart"
    );
    for (name, attempts) in [
        ("alice on n1", &alice_attempts),
        ("bob on n2", &bob_attempts),
        ("carol on n3", &carol_attempts),
    ] {
        let acked = attempts.iter().filter(|a| a.seq.is_some()).count();
        let (longest, first) = ack_gaps(attempts);
        println!(
            "partial partition: {name}: {acked} acked of {} attempts; first ack {first:?}, \
             longest stretch without an ack {longest:?}",
            attempts.len()
        );
        for attempt in attempts {
            ledger.sent(&attempt.text);
            if let Some(seq) = attempt.seq {
                ledger.ack(&attempt.text, seq);
            }
        }
    }
    println!("partial partition: claims {}", claims(&net).await);
    let fenced: Vec<usize> = (1..=3)
        .map(|i| net.log(i).matches("fenced by a newer epoch").count())
        .collect();
    println!("partial partition: owners fenced by a newer epoch, per node: {fenced:?}");

    let healed = Instant::now();
    net.heal_all();
    let formed = net
        .wait_healthy_views(&[1, 2, 3], &net.all_names(), Duration::from_secs(10))
        .await;
    println!("heal: whole again {formed:?} after");
    for text in ledger.unacked() {
        let client = if text.starts_with("carol") {
            &mut carol
        } else if text.starts_with("bob") {
            &mut bob
        } else {
            &mut alice
        };
        let seq = send_until_acked(client, &room, &text, SETTLE).await;
        ledger.ack(&text, seq);
    }
    // Which of the far room's unacknowledged messages were stored all the same.
    let unacked = far_ledger.unacked();
    let interim = net.history(1, &far, SETTLE).await;
    let stored_anyway = unacked
        .iter()
        .filter(|t| interim.iter().any(|m| m["text"] == t.as_str()))
        .count();
    for text in far_ledger.unacked() {
        let client = if text.starts_with("dave") {
            &mut dave
        } else {
            &mut erin
        };
        let seq = send_until_acked(client, &far, &text, SETTLE).await;
        far_ledger.ack(&text, seq);
    }
    println!(
        "heal: every message acked {:?} after the heal",
        healed.elapsed()
    );
    let log = check_everything(
        &net,
        &room,
        &ledger,
        &mut [(1, &mut alice), (2, &mut bob), (3, &mut carol)],
    )
    .await;
    println!(
        "final: {room}: {} messages, identical on every node",
        log.len()
    );
    let far_log = check_everything(
        &net,
        &far,
        &far_ledger,
        &mut [(1, &mut dave), (2, &mut erin)],
    )
    .await;
    println!(
        "final: {far}: {} messages, identical on every node; {stored_anyway} of the {} \
         messages the partition left unacknowledged had been stored all the same",
        far_log.len(),
        unacked.len(),
    );
}

/// Waits up to `wait` for the `message` event with `seq` in `room` (left in the backlog, which
/// keeps the stream in arrival order); `None` if it does not come.
async fn message_within(
    client: &mut Client,
    room: &str,
    seq: u64,
    wait: Duration,
) -> Option<Value> {
    let deadline = Instant::now() + wait;
    loop {
        if let Some(i) = client
            .backlog
            .iter()
            .position(|f| f["type"] == "message" && f["room"] == room && f["seq"] == json!(seq))
        {
            return client.backlog.get(i).cloned();
        }
        if Instant::now() >= deadline {
            return None;
        }
        client.quiet_for(Duration::from_millis(100)).await;
    }
}

/// The last 12 lines of `log` that mention any of `what`.
fn log_lines(log: &str, what: &[&str]) -> String {
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| what.iter().any(|w| l.contains(w)))
        .map(|l| l.char_indices().nth(260).map_or(l, |(i, _)| &l[..i]))
        .collect();
    lines[lines.len().saturating_sub(12)..].join("\n    ")
}

#[tokio::test]
async fn a_member_node_that_was_cut_off_receives_its_rooms_messages_after_rejoining() {
    let Some(mut net) = NetCluster::start(35, 3).await else {
        return;
    };
    // n1 only has members in these rooms: it is neither their owner nor their replica, so
    // nothing but its own subscription brings their messages back to it after it was declared
    // down. Two rooms with different owners: two independent chances per round.
    let rooms = [
        net.room_placed("n2", Some("n3"), "member-a").await,
        net.room_placed("n3", Some("n2"), "member-b").await,
    ];
    let mut alice = Client::connect(net.http(1), "alice").await;
    let mut bob = Client::connect(net.http(2), "bob").await;
    for room in &rooms {
        alice.join(room, None).await;
        bob.join(room, None).await;
    }
    let mut ledgers = [Ledger::default(), Ledger::default()];
    // The owner's view and the rejoining node's view change within a heartbeat of each other,
    // in either order: several rounds, alternating partitions (4 s) and freezes (3.5 s), both
    // longer than the failure timeout so that the owners drop the node's members.
    for round in 1..=8 {
        for (room, ledger) in rooms.iter().zip(&mut ledgers) {
            let text = format!("before fault {round}");
            let seq = send_until_acked(&mut bob, room, &text, SETTLE).await;
            ledger.ack(&text, seq);
            assert!(
                message_within(&mut alice, room, seq, Duration::from_secs(5))
                    .await
                    .is_some(),
                "round {round}: alice on n1 did not get seq {seq} of {room} before the fault"
            );
        }
        let fault = if round % 2 == 1 {
            net.isolate(1);
            tokio::time::sleep(FAILURE_TIMEOUT + Duration::from_secs(1)).await;
            net.heal(1);
            "a 4 s partition"
        } else {
            net.stop(1);
            tokio::time::sleep(FAILURE_TIMEOUT + Duration::from_millis(500)).await;
            net.cont(1);
            "a 3.5 s SIGSTOP"
        };
        net.wait_formed().await;
        for (room, ledger) in rooms.iter().zip(&mut ledgers) {
            let text = format!("after fault {round}");
            let seq = send_until_acked(&mut bob, room, &text, SETTLE).await;
            ledger.ack(&text, seq);
            let got = message_within(&mut alice, room, seq, Duration::from_secs(8)).await;
            println!(
                "round {round} ({fault} of n1): {room} seq {seq} delivered to alice on n1: {}",
                got.is_some()
            );
            let owner = common::cluster::placement(net.http(1), room).await.0;
            let o = net.index_of(&owner);
            assert!(
                got.is_some(),
                "round {round}: after {fault} of n1, alice on n1 never received seq {seq} of \
                 {room}, acked to bob by its owner {owner}: n1's stream of the room stopped.\n  \
                 n1:\n    {}\n  {owner}:\n    {}",
                log_lines(&net.log(1), &["cluster view changed", room]),
                log_lines(&net.log(o), &["cluster view changed", room])
            );
            assert_eq!(got.expect("checked")["text"], json!(text));
        }
    }
    for (room, ledger) in rooms.iter().zip(&ledgers) {
        // Only this room's messages: the other room's stay in the backlog for its turn.
        check_everything(&net, room, ledger, &mut [(1, &mut alice), (2, &mut bob)]).await;
    }
}
