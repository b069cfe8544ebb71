//! Multi-process cluster tests: three real `chat-node` processes on loopback, each on its own
//! `127.0.0.N` address (a distinct block of addresses per test, so tests run in parallel),
//! joined through `--seeds` with a shared `--cookie`, killed with SIGKILL / SIGSTOP / SIGTERM.
//!
//! Timing figures (detection, failover, rejoin) are printed; run with `--nocapture` to see them.
//! The failure timeout and heartbeat interval are the product's defaults (3000 ms, 200 ms), so
//! the figures are printed; their targets are in the failover benchmark.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use common::cluster::{Cluster, cluster_view, health_status, metric_value, placement, up_members};
use common::{Client, assert_error, assert_ts_within, now_ms};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The product's default failure timeout.
const FAILURE_TIMEOUT: Duration = Duration::from_millis(3000);
/// How often membership is polled when a time is measured.
const POLL: Duration = Duration::from_millis(50);

const FANOUT_SENT: &str = r#"chat_peer_messages_total{direction="sent",kind="fanout"}"#;
const FANOUT_RECEIVED: &str = r#"chat_peer_messages_total{direction="received",kind="fanout"}"#;
const BAD_DATAGRAM: &str = r#"chat_peer_dropped_total{kind="bad_datagram"}"#;

fn names(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

/// Sends `text` (also its client message id) until acked; its seq. Panics after `timeout` from
/// `since`.
async fn send_until_acked(
    client: &mut Client,
    room: &str,
    text: &str,
    since: Instant,
    timeout: Duration,
) -> u64 {
    client
        .send_until_acked(room, text, text, since + timeout)
        .await
}

/// The room's history (newest 500), retrying on `unavailable` only, for up to `timeout`.
async fn history(client: &mut Client, room: &str, timeout: Duration) -> Vec<Value> {
    let start = Instant::now();
    loop {
        let reply = client
            .request(json!({"type": "history", "room": room, "limit": 500}))
            .await;
        match reply["type"].as_str() {
            Some("history") => {
                assert_eq!(reply["room"], room, "{reply}");
                return reply["messages"]
                    .as_array()
                    .unwrap_or_else(|| panic!("history without messages: {reply}"))
                    .clone();
            }
            Some("error") if reply["code"] == "unavailable" => {}
            _ => panic!("history of {room}: unexpected reply {reply}"),
        }
        assert!(
            start.elapsed() < timeout,
            "history of {room} unavailable for {timeout:?}; last reply {reply}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// The texts of `messages`, asserting that their seqs are exactly 1..=len in order.
fn texts_in_order(messages: &[Value]) -> Vec<String> {
    let seqs: Vec<u64> = messages
        .iter()
        .map(|m| m["seq"].as_u64().unwrap_or_else(|| panic!("no seq: {m}")))
        .collect();
    let expected: Vec<u64> = (1..=messages.len() as u64).collect();
    assert_eq!(seqs, expected, "seqs are not 1..=N in order");
    messages
        .iter()
        .map(|m| {
            m["text"]
                .as_str()
                .unwrap_or_else(|| panic!("no text: {m}"))
                .to_owned()
        })
        .collect()
}

/// Reads everything that arrives until the connection has been quiet for `quiet` (or closed),
/// into the backlog.
async fn drain(client: &mut Client, quiet: Duration) {
    let deadline = Instant::now() + common::TIMEOUT;
    while !client.quiet_for(quiet).await {
        assert!(
            Instant::now() < deadline,
            "frames kept coming for {:?}",
            common::TIMEOUT
        );
    }
}

/// Takes the frames of `type` out of the backlog, in order.
fn take_frames(client: &mut Client, kind: &str) -> Vec<Value> {
    let (taken, kept): (Vec<Value>, Vec<Value>) =
        client.backlog.drain(..).partition(|f| f["type"] == kind);
    client.backlog = kept.into();
    taken
}

#[tokio::test]
async fn three_nodes_form_a_full_mesh_and_agree_on_placement() {
    let cluster = Cluster::start(10, 3).await;
    let all = cluster.all_names();
    for i in 1..=3 {
        let view = cluster_view(cluster.http(i)).await.expect("/cluster");
        assert_eq!(view["node"], cluster.names[i - 1], "{view}");
        let members = view["members"].as_array().expect("members");
        let listed: Vec<(&str, &str)> = members
            .iter()
            .map(|m| (m["name"].as_str().unwrap(), m["status"].as_str().unwrap()))
            .collect();
        assert_eq!(
            listed,
            [("n1", "up"), ("n2", "up"), ("n3", "up")],
            "/cluster of n{i}: {view}"
        );
        for (m, addr) in members.iter().zip(&cluster.cluster_addrs) {
            assert_eq!(m["addr"], addr.to_string(), "advertised address: {view}");
        }
        let health = common::cluster::get(cluster.http(i), "/healthz")
            .await
            .expect("/healthz");
        assert_eq!(health.0, 200, "{}", health.1);
        let health: Value = serde_json::from_str(&health.1).expect("healthz JSON");
        assert_eq!(
            health,
            json!({"status": "ok", "node": cluster.names[i - 1], "members": 3})
        );
        assert_eq!(
            metric_value(cluster.http(i), "chat_members").await,
            Some(3.0)
        );
        assert_eq!(
            metric_value(cluster.http(i), "chat_quorum").await,
            Some(1.0)
        );
    }
    let mut owners: HashMap<String, usize> = HashMap::new();
    for k in 0..50 {
        let room = format!("room-{k}");
        let (owner, replicas) = placement(cluster.http(1), &room).await;
        assert!(
            all.contains(&owner),
            "{room}: owner {owner} is not a member"
        );
        assert_eq!(
            replicas.len(),
            1,
            "{room}: RF 2 means one replica: {replicas:?}"
        );
        assert!(all.contains(&replicas[0]), "{room}: replica {replicas:?}");
        assert!(
            !replicas.contains(&owner),
            "{room}: owner {owner} is also a replica"
        );
        for i in 2..=3 {
            let other = placement(cluster.http(i), &room).await;
            assert_eq!(
                other,
                (owner.clone(), replicas.clone()),
                "{room}: n{i} disagrees with n1"
            );
        }
        *owners.entry(owner).or_default() += 1;
    }
    println!("owners of 50 rooms: {owners:?}");
    assert_eq!(owners.len(), 3, "50 rooms all land on a subset: {owners:?}");
}

#[tokio::test]
async fn messages_have_one_total_order_across_nodes() {
    const CLIENTS_PER_NODE: usize = 3;
    const PER_CLIENT: usize = 10;
    const ROOM: &str = "order";
    let cluster = Cluster::start(20, 3).await;
    let total = (3 * CLIENTS_PER_NODE * PER_CLIENT) as u64;
    let mut clients = Vec::new();
    for node in 1..=3 {
        for k in 0..CLIENTS_PER_NODE {
            let user = format!("u{node}-{k}");
            let mut client = Client::connect(cluster.http(node), &user).await;
            client.join(ROOM, None).await;
            clients.push((user, client));
        }
    }
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|(user, mut client)| {
            tokio::spawn(async move {
                let texts: Vec<String> = (0..PER_CLIENT)
                    .map(|i| format!("{user} says {i}"))
                    .collect();
                let seqs = client.say_many(ROOM, &texts).await;
                let received = client.messages_until(ROOM, total).await;
                (user, client, texts, seqs, received)
            })
        })
        .collect();
    let mut results = Vec::new();
    for task in tasks {
        results.push(task.await.expect("client task"));
    }
    let (first, reference) = (results[0].0.clone(), results[0].4.clone());
    let texts = texts_in_order(&reference);
    assert_eq!(texts.len() as u64, total);
    let unique: BTreeSet<&String> = texts.iter().collect();
    assert_eq!(unique.len(), texts.len(), "a text appears twice: {texts:?}");
    for (user, client, sent, seqs, received) in &mut results {
        assert_eq!(
            *received, reference,
            "{user} saw other messages, or another order, than {first}"
        );
        for (text, seq) in sent.iter().zip(seqs.iter()) {
            let m = &reference[(*seq - 1) as usize];
            assert_eq!(m["text"], text.as_str(), "ack seq {seq} of {text:?}: {m}");
            assert_eq!(m["from"], user.as_str(), "{m}");
        }
        // Exactly once: nothing more arrives.
        drain(client, Duration::from_millis(300)).await;
        let extra = take_frames(client, "message");
        assert!(extra.is_empty(), "{user} got extra messages: {extra:?}");
    }
    // The same order from history, asked on every node.
    for node in 1..=3 {
        let client = &mut results[(node - 1) * CLIENTS_PER_NODE].1;
        let stored = history(client, ROOM, Duration::from_secs(5)).await;
        assert_eq!(stored, reference, "history through n{node}");
    }
}

#[tokio::test]
async fn who_direct_and_presence_work_across_nodes() {
    const ROOM: &str = "lounge";
    let cluster = Cluster::start(30, 3).await;
    let mut alice = Client::connect(cluster.http(1), "alice").await;
    alice.join(ROOM, None).await;
    let mut bob = Client::connect(cluster.http(2), "bob").await;
    bob.join(ROOM, None).await;
    let mut carol = Client::connect(cluster.http(3), "carol").await;
    carol.join(ROOM, None).await;
    // dave has a connection on n2 and one on n3.
    let mut dave2 = Client::connect(cluster.http(2), "dave").await;
    dave2.join(ROOM, None).await;
    let mut dave3 = Client::connect(cluster.http(3), "dave").await;
    dave3.join(ROOM, None).await;

    for (node, client) in [(1, &mut alice), (2, &mut bob), (3, &mut carol)] {
        let reply = client.request(json!({"type": "who", "room": ROOM})).await;
        assert_eq!(
            reply,
            json!({"type": "members", "ref": reply["ref"], "room": ROOM,
                   "users": ["alice", "bob", "carol", "dave"]}),
            "who through n{node}"
        );
    }
    // Presence events reached alice on n1 for the users that joined on n2 and n3, dave once
    // (his second connection is not news). Whether alice hears of her own join is the
    // single-node tests' business.
    let presence = take_frames(&mut alice, "presence");
    let joined: Vec<(&str, &str)> = presence
        .iter()
        .map(|p| (p["user"].as_str().unwrap(), p["event"].as_str().unwrap()))
        .filter(|(user, _)| *user != "alice")
        .collect();
    assert_eq!(
        joined,
        [("bob", "join"), ("carol", "join"), ("dave", "join")],
        "presence seen by alice: {presence:?}"
    );

    // direct from n1 reaches both of dave's connections, on n2 and n3.
    let from_ms = now_ms();
    let reply = alice
        .request(json!({"type": "direct", "to": "dave", "text": "psst"}))
        .await;
    assert_eq!(reply, json!({"type": "ack", "ref": reply["ref"]}));
    for (node, dave) in [(2, &mut dave2), (3, &mut dave3)] {
        let direct = dave.recv_until(|f| f["type"] == "direct").await;
        assert_eq!(
            direct,
            json!({"type": "direct", "from": "alice", "text": "psst", "ts": direct["ts"]}),
            "dave's connection on n{node}"
        );
        assert_ts_within(&direct["ts"], from_ms, now_ms());
    }
    // Nobody else gets it.
    for (who, client) in [
        ("bob", &mut bob),
        ("carol", &mut carol),
        ("alice", &mut alice),
    ] {
        drain(client, Duration::from_millis(200)).await;
        let directs = take_frames(client, "direct");
        assert!(directs.is_empty(), "{who} got {directs:?}");
    }
    // A user connected nowhere is offline.
    let reply = alice
        .request(json!({"type": "direct", "to": "nobody", "text": "hello?"}))
        .await;
    assert_error(&reply, Some(reply["ref"].clone()), "offline");

    // A user on n3 joining and leaving is seen by alice on n1: by `leave`, then by closing.
    let mut erin = Client::connect(cluster.http(3), "erin").await;
    erin.join(ROOM, None).await;
    let event = alice.recv_until(|f| f["type"] == "presence").await;
    assert_eq!(
        event,
        json!({"type": "presence", "room": ROOM, "user": "erin", "event": "join"})
    );
    let left = erin.request(json!({"type": "leave", "room": ROOM})).await;
    assert_eq!(left["type"], "left", "{left}");
    let event = alice.recv_until(|f| f["type"] == "presence").await;
    assert_eq!(
        event,
        json!({"type": "presence", "room": ROOM, "user": "erin", "event": "leave"})
    );
    erin.join(ROOM, None).await;
    let event = alice.recv_until(|f| f["type"] == "presence").await;
    assert_eq!(
        event,
        json!({"type": "presence", "room": ROOM, "user": "erin", "event": "join"})
    );
    erin.close().await;
    let event = alice.recv_until(|f| f["type"] == "presence").await;
    assert_eq!(
        event,
        json!({"type": "presence", "room": ROOM, "user": "erin", "event": "leave"}),
        "closing the socket is leaving"
    );
    let reply = bob.request(json!({"type": "who", "room": ROOM})).await;
    assert_eq!(reply["users"], json!(["alice", "bob", "carol", "dave"]));
    // erin is offline everywhere now.
    let reply = alice
        .request(json!({"type": "direct", "to": "erin", "text": "still there?"}))
        .await;
    assert_error(&reply, Some(reply["ref"].clone()), "offline");
}

#[tokio::test]
async fn fan_out_costs_one_peer_message_per_node() {
    const PER_NODE: usize = 20;
    const K: u64 = 10;
    const ROOM: &str = "crowd";
    let cluster = Cluster::start(40, 3).await;
    let (owner, _) = placement(cluster.http(1), ROOM).await;
    let owner_i = cluster.index_of(&owner);
    let others: Vec<usize> = (1..=3).filter(|&i| i != owner_i).collect();
    let mut members = Vec::new();
    for node in 1..=3 {
        for k in 0..PER_NODE {
            let mut client = Client::connect(cluster.http(node), &format!("m{node}-{k}")).await;
            client.join(ROOM, None).await;
            members.push(client);
        }
    }
    let owner_addr = cluster.http(owner_i);
    let sent_before = metric_value(owner_addr, FANOUT_SENT).await.unwrap_or(0.0);
    let mut received_before = Vec::new();
    for &i in &others {
        received_before.push(
            metric_value(cluster.http(i), FANOUT_RECEIVED)
                .await
                .unwrap_or(0.0),
        );
    }
    // The sender is on a node that does not own the room.
    let sender = (others[0] - 1) * PER_NODE;
    for i in 1..=K {
        let seq = members[sender].say(ROOM, &format!("hello {i}")).await;
        assert_eq!(seq, i);
    }
    for client in &mut members {
        for seq in 1..=K {
            let m = client.message(ROOM, seq).await;
            assert_eq!(m["text"], format!("hello {seq}"));
        }
    }
    let sent = metric_value(owner_addr, FANOUT_SENT).await.unwrap_or(0.0) - sent_before;
    let mut received = 0.0;
    for (&i, before) in others.iter().zip(&received_before) {
        let got = metric_value(cluster.http(i), FANOUT_RECEIVED)
            .await
            .unwrap_or(0.0)
            - before;
        assert!(got >= 1.0, "n{i} received no fan-out message");
        received += got;
    }
    let bound = K as f64 * others.len() as f64;
    println!(
        "fan-out: {K} messages to {} members on 3 nodes (owner {owner}): {sent} fanout \
         messages sent by the owner, {received} received by the other nodes (bound {bound}, \
         per member would be {})",
        3 * PER_NODE,
        K as usize * (3 * PER_NODE - PER_NODE)
    );
    assert!(
        sent <= bound,
        "the owner sent {sent} fanout messages for {K} messages: more than one per message \
         and node ({bound})"
    );
    assert_eq!(sent, received, "fanout messages sent and received differ");
}

#[tokio::test]
async fn sigkill_is_detected_within_2s() {
    let mut cluster = Cluster::start(50, 3).await;
    let room = cluster.room_owned_by(1, "n3", "failover").await;
    let mut alice = Client::connect(cluster.http(1), "alice").await;
    alice.join(&room, None).await;
    assert_eq!(alice.say(&room, "before 1").await, 1);
    assert_eq!(alice.say(&room, "before 2").await, 2);
    let mut bob = Client::connect(cluster.http(2), "bob").await;
    bob.join(&room, None).await;

    let killed = Instant::now();
    cluster.node_mut(3).kill();
    let detection = cluster
        .wait_views(
            &[1, 2],
            |up| !up.contains("n3"),
            killed,
            POLL,
            Duration::from_secs(10),
        )
        .await;
    println!("sigkill detection: {detection:?}");
    // How fast is a benchmark's target (`cargo bench -p chat-node --bench failover`); here it
    // only has to happen.
    detection.unwrap_or_else(|| panic!("n3 still up after 10 s"));
    for i in [1, 2] {
        assert_eq!(
            up_members(cluster.http(i)).await,
            Some(names(&["n1", "n2"]))
        );
    }

    // The room owned by the dead node becomes writable again on the survivors.
    let seq = send_until_acked(
        &mut alice,
        &room,
        "after kill",
        killed,
        Duration::from_secs(10),
    )
    .await;
    let failover = killed.elapsed();
    println!("sigkill failover (kill to first ack in a room the dead node owned): {failover:?}");
    assert_eq!(
        seq, 3,
        "the acked messages before the kill are kept, no gap"
    );
    let m = bob.message(&room, 3).await;
    assert_eq!(m["text"], "after kill");
    assert_eq!(m["from"], "alice");
    let stored = history(&mut bob, &room, Duration::from_secs(5)).await;
    assert_eq!(
        texts_in_order(&stored),
        ["before 1", "before 2", "after kill"]
    );
    for i in [1, 2] {
        assert_eq!(health_status(cluster.http(i)).await, Some(200));
    }
}

#[tokio::test]
async fn sigstop_is_detected_within_5s() {
    const ROOM: &str = "thaw";
    let cluster = Cluster::start(60, 3).await;
    let mut alice = Client::connect(cluster.http(1), "alice").await;
    alice.join(ROOM, None).await;

    let stopped = Instant::now();
    cluster.node(2).signal("STOP");
    let detection = cluster
        .wait_views(
            &[1, 3],
            |up| !up.contains("n2"),
            stopped,
            POLL,
            Duration::from_secs(10),
        )
        .await;
    println!("sigstop detection: {detection:?}");
    detection.unwrap_or_else(|| panic!("n2 still up 10 s after SIGSTOP"));

    let continued = Instant::now();
    cluster.node(2).signal("CONT");
    let rejoin = cluster
        .wait_views(
            &[1, 2, 3],
            |up| *up == names(&["n1", "n2", "n3"]),
            continued,
            POLL,
            Duration::from_secs(10),
        )
        .await;
    println!("sigcont rejoin (up on all nodes): {rejoin:?}");
    if rejoin.is_none() {
        panic!(
            "n2 not up again on every node 10 s after SIGCONT:\n{}",
            cluster.describe(&[1, 2, 3]).await
        );
    }
    cluster
        .wait_healthy_views(&[2], &cluster.all_names(), Duration::from_secs(10))
        .await;

    // Chat goes through the thawed node again.
    let mut carol = Client::connect(cluster.http(2), "carol").await;
    let joined = carol.join(ROOM, None).await;
    let seq = carol.say(ROOM, "back").await;
    assert_eq!(seq, joined["seq"].as_u64().unwrap() + 1);
    let m = alice.message(ROOM, seq).await;
    assert_eq!(m["text"], "back");
    assert_eq!(m["from"], "carol");
    println!(
        "sigcont: chat through the thawed node after {:?}",
        continued.elapsed()
    );
}

/// Whether a TCP connection is closed by the peer within `timeout` (EOF or reset).
async fn closed_by_peer(stream: &mut tokio::net::TcpStream, timeout: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test]
async fn a_wrong_cookie_never_becomes_a_member() {
    let cluster = Cluster::start(70, 3).await;
    let good = names(&["n1", "n2", "n3"]);
    let mut bad_before = Vec::new();
    for i in 1..=3 {
        bad_before.push(
            metric_value(cluster.http(i), BAD_DATAGRAM)
                .await
                .unwrap_or(0.0),
        );
    }
    let intruder = cluster.spawn_outsider("n4", 4, "a-wrong-cookie-for-n4");
    let start = Instant::now();
    while health_status(intruder.http).await.is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the intruder never served HTTP"
        );
        tokio::time::sleep(POLL).await;
    }
    // Three failure timeouts, checked all along.
    let window = FAILURE_TIMEOUT * 3 + Duration::from_millis(500);
    let start = Instant::now();
    while start.elapsed() < window {
        for i in 1..=3 {
            let addr = cluster.http(i);
            let view = cluster_view(addr).await.expect("/cluster");
            let listed: BTreeSet<String> = view["members"]
                .as_array()
                .expect("members")
                .iter()
                .map(|m| m["name"].as_str().unwrap().to_owned())
                .collect();
            assert_eq!(listed, good, "n{i} lists another member: {view}");
            assert_eq!(up_members(addr).await.as_ref(), Some(&good));
            assert_eq!(metric_value(addr, "chat_members").await, Some(3.0));
        }
        let seen = up_members(intruder.http).await.expect("intruder /cluster");
        assert!(
            seen.is_disjoint(&good),
            "the intruder sees good nodes up: {seen:?}"
        );
        assert_eq!(health_status(intruder.http).await, Some(503));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let mut refused = Vec::new();
    for (i, before) in (1..=3).zip(&bad_before) {
        let after = metric_value(cluster.http(i), BAD_DATAGRAM)
            .await
            .unwrap_or(0.0);
        refused.push(after - before);
        assert!(
            after > *before,
            "n{i} counted no refused heartbeat ({before} -> {after})"
        );
    }
    println!("wrong cookie: heartbeats refused per good node in {window:?}: {refused:?}");

    // Garbage on the node-to-node TCP port: the connection is dropped, the cluster unharmed.
    let garbage: [&[u8]; 3] = [
        b"GET / HTTP/1.1\r\nhost: x\r\n\r\n",
        &[0, 0, 0, 0, 0, 0, 0, 4, 0xff, 0xff, 0xff, 0xff],
        &[0xff; 4096],
    ];
    for bytes in garbage {
        let mut stream = tokio::net::TcpStream::connect(cluster.cluster_addrs[0])
            .await
            .expect("connect to the cluster port");
        let _ = stream.write_all(bytes).await;
        assert!(
            closed_by_peer(&mut stream, Duration::from_secs(5)).await,
            "a connection sending {:?}… is still open after 5 s",
            &bytes[..bytes.len().min(12)]
        );
    }
    cluster
        .wait_healthy_views(&[1, 2, 3], &good, Duration::from_secs(1))
        .await;
    let mut alice = Client::connect(cluster.http(1), "alice").await;
    alice.join("after-garbage", None).await;
    let mut bob = Client::connect(cluster.http(3), "bob").await;
    bob.join("after-garbage", None).await;
    let seq = bob.say("after-garbage", "still fine").await;
    assert_eq!(
        alice.message("after-garbage", seq).await["text"],
        "still fine"
    );
    assert_eq!(
        metric_value(cluster.http(1), "chat_members").await,
        Some(3.0)
    );
    drop(intruder);
}

#[tokio::test]
async fn a_restarted_node_rejoins() {
    let mut cluster = Cluster::start(80, 3).await;
    // A room the restarted node owns: it takes it back and must recover what it missed.
    let room = cluster.room_owned_by(1, "n3", "rejoin").await;
    let mut alice = Client::connect(cluster.http(1), "alice").await;
    alice.join(&room, None).await;
    alice.say(&room, "before 1").await;
    alice.say(&room, "before 2").await;

    let killed = Instant::now();
    cluster.node_mut(3).kill();
    cluster
        .wait_views(
            &[1, 2],
            |up| !up.contains("n3"),
            killed,
            POLL,
            Duration::from_secs(10),
        )
        .await
        .expect("n3 down after SIGKILL");
    let mut expected = vec!["before 1".to_owned(), "before 2".to_owned()];
    for i in 1..=5 {
        let text = format!("while down {i}");
        let seq = send_until_acked(&mut alice, &room, &text, killed, Duration::from_secs(15)).await;
        expected.push(text);
        assert_eq!(seq, expected.len() as u64);
    }

    let relaunched = Instant::now();
    cluster.node_mut(3).relaunch();
    let rejoin = cluster
        .wait_healthy_views(&[1, 2, 3], &cluster.all_names(), Duration::from_secs(10))
        .await;
    println!("restart: all nodes see 3 up {rejoin:?} after relaunch");

    let mut carol = Client::connect(cluster.http(3), "carol").await;
    let stored = history(&mut carol, &room, Duration::from_secs(10)).await;
    println!(
        "restart: history through the restarted node after {:?}",
        relaunched.elapsed()
    );
    assert_eq!(texts_in_order(&stored), expected, "history through n3");
    let mut bob = Client::connect(cluster.http(2), "bob").await;
    assert_eq!(
        history(&mut bob, &room, Duration::from_secs(10)).await,
        stored,
        "history through n2"
    );
    assert_eq!(
        history(&mut alice, &room, Duration::from_secs(10)).await,
        stored,
        "history through n1"
    );
    // And the room keeps its order after the move back.
    let (owner, _) = placement(cluster.http(3), &room).await;
    assert_eq!(owner, "n3");
    carol.join(&room, None).await;
    let seq = carol.say(&room, "after restart").await;
    assert_eq!(seq, expected.len() as u64 + 1);
}

#[tokio::test]
async fn a_node_started_before_its_seeds_joins_when_they_come() {
    let mut cluster = Cluster::plan(90, 3);
    cluster.launch(1);
    let n1 = cluster.http(1);
    let start = Instant::now();
    while health_status(n1).await.is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "n1 never served HTTP"
        );
        tokio::time::sleep(POLL).await;
    }
    // Alone, with seeds it cannot reach: no quorum, not serving (checked for 2.5 s, more than
    // two rounds of seed pings).
    let alone = Instant::now();
    while alone.elapsed() < Duration::from_millis(2500) {
        let (status, body) = common::cluster::get(n1, "/healthz")
            .await
            .expect("/healthz");
        assert_eq!(status, 503, "n1 alone: {body}");
        let view = cluster_view(n1).await.expect("/cluster");
        assert_eq!(view["quorum"], false, "n1 alone: {view}");
        assert_eq!(metric_value(n1, "chat_quorum").await, Some(0.0));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut waiting = Client::connect(n1, "early").await;
    let reply = waiting
        .request(json!({"type": "join", "room": "early-room"}))
        .await;
    assert_error(&reply, Some(reply["ref"].clone()), "unavailable");

    let launched = Instant::now();
    cluster.launch(2);
    cluster.launch(3);
    let formed = cluster
        .wait_healthy_views(&[1, 2, 3], &cluster.all_names(), Duration::from_secs(10))
        .await;
    println!("late seeds: all 3 up and healthy {formed:?} after starting n2 and n3");
    let _ = launched;
    waiting.join("early-room", None).await;
    assert_eq!(waiting.say("early-room", "at last").await, 1);
}

#[tokio::test]
async fn graceful_stop_leaves_at_once() {
    let mut cluster = Cluster::start(100, 3).await;
    let room = cluster.room_owned_by(1, "n3", "leave").await;
    let mut alice = Client::connect(cluster.http(1), "alice").await;
    alice.join(&room, None).await;
    assert_eq!(alice.say(&room, "before").await, 1);
    let mut bob = Client::connect(cluster.http(2), "bob").await;
    bob.join(&room, None).await;

    let terminated = Instant::now();
    cluster.node(3).signal("TERM");
    let dropped = cluster
        .wait_views(
            &[1, 2],
            |up| !up.contains("n3"),
            terminated,
            Duration::from_millis(20),
            Duration::from_secs(10),
        )
        .await;
    println!("sigterm: survivors dropped the leaving node after {dropped:?}");
    dropped.unwrap_or_else(|| panic!("n3 still up 10 s after SIGTERM"));
    assert_eq!(
        cluster.node_mut(3).wait_exit(),
        Some(0),
        "exit code after SIGTERM"
    );

    // The two remaining nodes keep their quorum (past a failure timeout) and chat.
    let seq = send_until_acked(
        &mut alice,
        &room,
        "after leave",
        terminated,
        Duration::from_secs(10),
    )
    .await;
    println!(
        "sigterm failover (TERM to first ack in a room the leaving node owned): {:?}",
        terminated.elapsed()
    );
    assert_eq!(seq, 2);
    assert_eq!(bob.message(&room, 2).await["text"], "after leave");
    let until = terminated + FAILURE_TIMEOUT + Duration::from_millis(500);
    while Instant::now() < until {
        for i in [1, 2] {
            let view = cluster_view(cluster.http(i)).await.expect("/cluster");
            assert_eq!(view["quorum"], true, "n{i} lost its quorum: {view}");
            assert_eq!(health_status(cluster.http(i)).await, Some(200));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let seq = bob.say(&room, "still here").await;
    assert_eq!(alice.message(&room, seq).await["text"], "still here");
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

/// Asserts that `stored` holds `texts` each exactly once, seqs 1..=N, every acked text at its
/// acked seq.
fn assert_log(stored: &[Value], texts: &[String], acked: &HashMap<String, u64>) {
    let in_order = texts_in_order(stored);
    let mut sorted = in_order.clone();
    sorted.sort();
    let mut expected = texts.to_vec();
    expected.sort();
    assert_eq!(
        sorted, expected,
        "the log does not hold every message exactly once"
    );
    for (text, seq) in acked {
        assert_eq!(
            in_order[(*seq - 1) as usize],
            *text,
            "acked {text:?} at seq {seq}, the log has another message there"
        );
    }
}

#[tokio::test]
async fn acked_messages_survive_an_owner_sigkill_mid_stream() {
    const N: u64 = 100;
    let mut cluster = Cluster::start(110, 3).await;
    let room = cluster.room_owned_by(1, "n3", "stream").await;
    let mut alice = Client::connect(cluster.http(1), "alice").await;
    alice.join(&room, None).await;
    let mut bob = Client::connect(cluster.http(2), "bob").await;
    bob.join(&room, None).await;
    let texts: Vec<String> = (1..=N).map(|i| format!("m{i}")).collect();
    // Sends go out every 5 ms without waiting for their acks; the owner is killed after a
    // quarter of them: some are acked, some in flight, some sent to a dead node.
    let mut refs = Vec::new();
    let mut killed = Instant::now();
    for (k, text) in texts.iter().enumerate() {
        if k as u64 == N / 4 {
            killed = Instant::now();
            cluster.node_mut(3).kill();
        }
        let reference = 1000 + k as u64;
        alice
            .send(json!({"type": "send", "ref": reference, "room": room, "text": text, "id": text}))
            .await;
        refs.push(reference);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut acked: HashMap<String, u64> = HashMap::new();
    for (k, reference) in refs.iter().enumerate() {
        if let Some(seq) = ack_or_unavailable(&mut alice, *reference).await {
            acked.insert(texts[k].clone(), seq);
        }
    }
    println!(
        "sigkill mid-stream: {} of {N} acked at the first try (the others got unavailable)",
        acked.len()
    );
    // Retry the others with the same ids: stored once whatever happened to the first try.
    for text in &texts {
        if !acked.contains_key(text) {
            let seq =
                send_until_acked(&mut alice, &room, text, killed, Duration::from_secs(15)).await;
            acked.insert(text.clone(), seq);
        }
    }
    println!(
        "sigkill mid-stream: all acked {:?} after the kill",
        killed.elapsed()
    );
    let stored = history(&mut bob, &room, Duration::from_secs(10)).await;
    assert_log(&stored, &texts, &acked);
    // bob's live stream across the failover: the same messages, in order, exactly once.
    let live = bob.messages_until(&room, N).await;
    assert_eq!(live, stored, "bob's live stream differs from the log");
    drain(&mut bob, Duration::from_millis(300)).await;
    let extra = take_frames(&mut bob, "message");
    assert!(extra.is_empty(), "bob got extra messages: {extra:?}");
}

#[tokio::test]
async fn a_thawed_owner_does_not_fork_its_room() {
    let cluster = Cluster::start(120, 3).await;
    let room = cluster.room_owned_by(1, "n2", "thaw").await;
    let mut alice = Client::connect(cluster.http(1), "alice").await;
    alice.join(&room, None).await;
    let mut bob = Client::connect(cluster.http(2), "bob").await;
    bob.join(&room, None).await;
    let mut carol = Client::connect(cluster.http(3), "carol").await;
    carol.join(&room, None).await;
    let mut texts = Vec::new();
    let mut acked: HashMap<String, u64> = HashMap::new();
    for i in 1..=2 {
        let text = format!("before {i}");
        acked.insert(text.clone(), alice.say(&room, &text).await);
        texts.push(text);
    }
    let stopped = Instant::now();
    cluster.node(2).signal("STOP");
    // bob's send waits in the frozen node's socket (or, as SIGSTOP takes a moment to stop
    // every thread, is sequenced just before: both are fine, forking the log is not).
    bob.send(json!({"type": "send", "ref": 77, "room": room, "text": "frozen", "id": "frozen"}))
        .await;
    texts.push("frozen".to_owned());
    for i in 1..=3 {
        let text = format!("during {i}");
        let seq =
            send_until_acked(&mut alice, &room, &text, stopped, Duration::from_secs(15)).await;
        acked.insert(text.clone(), seq);
        texts.push(text);
    }
    println!(
        "thaw: room writable {:?} after SIGSTOP of its owner",
        stopped.elapsed()
    );
    let continued = Instant::now();
    cluster.node(2).signal("CONT");
    // Writes right after the thaw, through the survivors and through the thawed node.
    for i in 1..=3 {
        let text = format!("after {i}");
        let seq =
            send_until_acked(&mut carol, &room, &text, continued, Duration::from_secs(15)).await;
        acked.insert(text.clone(), seq);
        texts.push(text);
    }
    let frozen = bob.recv_until(|f| f["ref"] == json!(77)).await;
    println!("thaw: the frozen send got {frozen}");
    match frozen["type"].as_str() {
        Some("ack") => {
            acked.insert("frozen".to_owned(), frozen["seq"].as_u64().unwrap());
        }
        Some("error") if frozen["code"] == "unavailable" => {
            let seq = send_until_acked(
                &mut bob,
                &room,
                "frozen",
                continued,
                Duration::from_secs(15),
            )
            .await;
            acked.insert("frozen".to_owned(), seq);
        }
        _ => panic!("unexpected reply to the frozen send: {frozen}"),
    }
    cluster
        .wait_healthy_views(&[1, 2, 3], &cluster.all_names(), Duration::from_secs(10))
        .await;
    let text = "back home".to_owned();
    acked.insert(text.clone(), bob.say(&room, &text).await);
    texts.push(text);
    let n = texts.len() as u64;
    let mut by_seq: Vec<(u64, &String)> = acked.iter().map(|(t, s)| (*s, t)).collect();
    by_seq.sort();
    println!("thaw: acked {by_seq:?}");

    let mut logs = Vec::new();
    for (node, client) in [(1, &mut alice), (2, &mut bob), (3, &mut carol)] {
        let stored = history(client, &room, Duration::from_secs(10)).await;
        assert_log(&stored, &texts, &acked);
        let live = client.messages_until(&room, n).await;
        assert_eq!(live, stored, "n{node}'s live stream differs from the log");
        logs.push(stored);
    }
    assert_eq!(logs[0], logs[1]);
    assert_eq!(logs[0], logs[2]);
}

/// Sends a `direct` from `from` to each of `users` and returns those that were not acked
/// (with the reply), asserting that the acked ones reach the addressee's connection.
async fn directs(
    from: &mut Client,
    users: &mut [(String, Client)],
    text: &str,
) -> Vec<(String, Value)> {
    let mut failed = Vec::new();
    for (user, client) in users.iter_mut() {
        let reply = from
            .request(json!({"type": "direct", "to": user, "text": text}))
            .await;
        if reply["type"] != "ack" {
            failed.push((user.clone(), reply));
            continue;
        }
        let got = client
            .recv_until(|f| f["type"] == "direct" && f["text"] == text)
            .await;
        assert_eq!(got["from"], from.welcome["user"], "{got}");
    }
    failed
}

#[tokio::test]
async fn direct_reaches_users_whose_home_node_died_or_restarted() {
    let mut cluster = Cluster::start(130, 3).await;
    let mut sender = Client::connect(cluster.http(2), "sender").await;
    // Users on n1 and n2 only; some of them have their home (directory entry) on n3 (with 24
    // names, all homed elsewhere would happen with probability (2/3)^24 < 1e-4, and the ring
    // is deterministic: it either happens on every run or never).
    let mut users = Vec::new();
    for k in 0..24 {
        let node = 1 + k % 2;
        let user = format!("user{k}");
        users.push((
            user.clone(),
            Client::connect(cluster.http(node), &user).await,
        ));
    }
    assert_eq!(directs(&mut sender, &mut users, "all up").await, []);

    let killed = Instant::now();
    cluster.node_mut(3).kill();
    cluster
        .wait_views(
            &[1, 2],
            |up| !up.contains("n3"),
            killed,
            POLL,
            Duration::from_secs(10),
        )
        .await
        .expect("n3 down after SIGKILL");
    let failed = directs(&mut sender, &mut users, "n3 dead").await;
    assert_eq!(failed, [], "directs to online users failed after n3 died");

    let relaunched = Instant::now();
    cluster.node_mut(3).relaunch();
    cluster
        .wait_healthy_views(&[1, 2, 3], &cluster.all_names(), Duration::from_secs(10))
        .await;
    println!("direct: n3 back {:?} after relaunch", relaunched.elapsed());
    let failed = directs(&mut sender, &mut users, "n3 back").await;
    assert_eq!(
        failed,
        [],
        "directs to online users failed after n3 restarted"
    );
}
