//! Hostile clients against one real node, as an attacker would try them: replies that pile up
//! unread, floods of joins, many sockets per user or per host, `direct` bursts at one victim.
//! Each test asserts that the node stays healthy, bounded in memory and fair to other clients
//! (SECURITY.md lists what is defended and how).

// The helpers below run inside tests: a failed expectation is a failed test.
#![allow(clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{Client, NodeProcess, TIMEOUT, assert_error, metric, metrics_text, upgrade_status};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

/// The node's resident memory, in bytes.
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("VmRSS");
    kib * 1024
}

/// 4 KiB of control characters: each takes six bytes once rendered in JSON.
fn control_text() -> String {
    "\u{1}".repeat(4096)
}

#[tokio::test]
async fn a_client_that_asks_for_histories_and_never_reads_is_cut_off_within_a_few_mib() {
    history_flood(&[]).await;
}

/// 500 messages of 4 KiB control characters; then one client asks for 300 histories of all of
/// them and never reads, while another chats.
async fn history_flood(flags: &[&str]) {
    let node = NodeProcess::start("n1", flags);
    let mut writer = Client::connect(node.http, "writer").await;
    writer.join("big", None).await;
    let texts = vec![control_text(); 500];
    for chunk in texts.chunks(100) {
        writer.say_many("big", chunk).await;
        // Within the default rate limit (bursts of 200, 100 per second).
        tokio::time::sleep(Duration::from_millis(1000)).await;
    }
    let mut bystander = Client::connect(node.http, "bystander").await;
    bystander.join("lobby", None).await;
    // A client that reads gets the history in pages of about 1 MiB, and all of it by paging.
    let mut before_seq: Option<u64> = None;
    let mut pages = 0;
    let mut got = 0;
    loop {
        let mut frame = json!({"type": "history", "room": "big", "limit": 500});
        if let Some(seq) = before_seq {
            frame["before"] = json!(seq);
        }
        let reply = bystander.request(frame).await;
        let messages = reply["messages"].as_array().expect("messages").clone();
        if messages.is_empty() {
            break;
        }
        pages += 1;
        got += messages.len();
        before_seq = messages[0]["seq"].as_u64();
        assert!(
            reply.to_string().len() < 1_100_000,
            "a page of {} bytes",
            reply.to_string().len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(got, 500, "every message, in {pages} pages");
    assert!(pages > 1, "500 messages of 24 KiB do not fit in one page");
    let before = rss_bytes(node.pid());

    // The attacker asks for 300 full pages of history and never reads a byte.
    let url = format!("ws://{}/ws?user=mallory", node.http);
    let (mut attacker, _) = tokio_tungstenite::connect_async(&url)
        .await
        .expect("connect");
    for i in 0..300 {
        let frame = json!({"type": "history", "ref": i, "room": "big", "limit": 500});
        attacker
            .send(Message::Text(frame.to_string().into()))
            .await
            .expect("send");
    }

    // Meanwhile the node's memory stays bounded and other clients are served at once.
    let mut peak = before;
    let mut slowest = Duration::ZERO;
    for i in 0..20 {
        let started = Instant::now();
        bystander.say("lobby", &format!("still here {i}")).await;
        slowest = slowest.max(started.elapsed());
        peak = peak.max(rss_bytes(node.pid()));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let grown = peak.saturating_sub(before);
    println!(
        "history flood: node memory grew by {:.1} MiB at most; slowest bystander ack {} ms",
        grown as f64 / f64::from(1 << 20),
        slowest.as_millis()
    );
    assert!(
        grown < 64 << 20,
        "one unread client cost the node {grown} bytes"
    );
    assert!(
        slowest < Duration::from_secs(2),
        "a bystander's send waited {slowest:?} behind the attacker"
    );
    let metrics = metrics_text(node.http).await;
    assert!(
        metric(&metrics, r#"chat_errors_total{code="rate_limited"}"#).unwrap_or(0.0) > 0.0
            || metric(&metrics, r#"chat_connections_closed_total{kind="slow"}"#) == Some(1.0),
        "the flood was neither rate-limited nor cut off:\n{metrics}"
    );
    drop(attacker);
}

#[tokio::test]
async fn a_client_that_stops_reading_is_cut_off_by_bytes_long_before_the_frame_bound() {
    let node = NodeProcess::start("n1", &["--rate-limit", "0"]);
    let mut writer = Client::connect(node.http, "writer").await;
    writer.join("room", None).await;
    let mut stalled = Client::connect(node.http, "stalled").await;
    stalled.join("room", None).await;
    // 600 frames, well under the 1024 of `client-queue`, but 15 MB once rendered: more than the
    // socket buffers and the 4 MiB of `client-queue-bytes` together.
    // The writer is a member too: it sends in pages small enough for its own queue.
    let texts = vec![control_text(); 100];
    for _ in 0..6 {
        writer.say_many("room", &texts).await;
        writer.backlog.clear();
    }
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let metrics = metrics_text(node.http).await;
        if metric(&metrics, r#"chat_connections_closed_total{kind="slow"}"#) == Some(1.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a client holding 15 MB unread was not cut off:\n{metrics}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(stalled);
    writer.say("room", "the writer is not slowed").await;
}

#[tokio::test]
async fn twenty_thousand_joins_from_one_connection_are_refused_well_before_the_end() {
    let node = NodeProcess::start("n1", &[]);
    let url = format!("ws://{}/ws?user=mallory", node.http);
    let (mut ws, _) = tokio_tungstenite::connect_async(&url)
        .await
        .expect("connect");
    const JOINS: usize = 20_000;
    // Pipelined, with at most 500 unanswered: as fast as the node answers, without letting the
    // replies pile up into a slow-reader close (another limit, tested on its own).
    const WINDOW: usize = 500;
    let (mut joined, mut refused) = (0usize, 0usize);
    let mut sent = 0;
    while joined + refused < JOINS {
        if sent < JOINS && sent < joined + refused + WINDOW {
            let frame = json!({"type": "join", "ref": sent, "room": format!("r{sent}")});
            ws.send(Message::Text(frame.to_string().into()))
                .await
                .expect("send");
            sent += 1;
            continue;
        }
        let replies = joined + refused;
        let Ok(Some(Ok(message))) = tokio::time::timeout(TIMEOUT, ws.next()).await else {
            panic!("the connection ended after {replies} replies");
        };
        let Message::Text(text) = message else {
            continue;
        };
        let frame: Value = serde_json::from_str(&text).expect("JSON");
        match frame["type"].as_str() {
            Some("joined") => joined += 1,
            Some("error") => {
                let code = frame["code"].as_str().unwrap_or_default();
                assert!(
                    code == "rate_limited" || code == "too_many_rooms",
                    "{frame}"
                );
                refused += 1;
            }
            _ => {}
        }
    }
    println!("20,000 joins: {joined} joined, {refused} refused");
    assert!(joined <= 256, "{joined} rooms joined past the cap");
    assert_eq!(joined + refused, JOINS);
    let (status, _) = common::http_get(node.http, "/healthz")
        .await
        .expect("healthz");
    assert_eq!(status, 200);
    // Others still join and chat.
    let mut alice = Client::connect(node.http, "alice").await;
    alice.join("lobby", None).await;
    alice.say("lobby", "fine").await;
}

#[tokio::test]
async fn a_join_past_max_rooms_per_connection_gets_too_many_rooms() {
    let node = NodeProcess::start(
        "n1",
        &["--max-rooms-per-connection", "3", "--request-rate", "0"],
    );
    let mut alice = Client::connect(node.http, "alice").await;
    for room in ["a", "b", "c"] {
        alice.join(room, None).await;
    }
    let reply = alice.request(json!({"type": "join", "room": "d"})).await;
    assert_error(&reply, reply.get("ref").cloned(), "too_many_rooms");
    let left = alice.request(json!({"type": "leave", "room": "a"})).await;
    assert_eq!(left["type"], "left");
    alice.join("d", None).await;
    // The cap is per connection.
    let mut other = Client::connect(node.http, "alice").await;
    other.join("e", None).await;
}

#[tokio::test]
async fn join_history_and_who_past_the_request_rate_get_rate_limited() {
    let node = NodeProcess::start("n1", &["--request-rate", "5"]);
    let mut alice = Client::connect(node.http, "alice").await;
    let mut codes = Vec::new();
    for i in 0..20 {
        let frame = match i % 3 {
            0 => json!({"type": "join", "room": format!("r{i}")}),
            1 => json!({"type": "history", "room": "lobby"}),
            _ => json!({"type": "who", "room": "lobby"}),
        };
        let reply = alice.request(frame).await;
        codes.push(reply["code"].as_str().unwrap_or("ok").to_owned());
    }
    let limited = codes.iter().filter(|c| *c == "rate_limited").count();
    // A burst of twice the rate passes, the rest is refused (the test takes well under 1 s).
    assert!(
        (8..=12).contains(&limited),
        "{limited} of 20 refused: {codes:?}"
    );
    // Sends are limited separately: a send right away is acknowledged.
    tokio::time::sleep(Duration::from_millis(500)).await;
    alice.join("x", None).await;
    alice.say("x", "sends have their own limit").await;
}

#[tokio::test]
async fn connections_past_the_caps_per_user_and_per_address_get_429() {
    let node = NodeProcess::start(
        "n1",
        &[
            "--max-connections-per-user",
            "2",
            "--max-connections-per-address",
            "4",
        ],
    );
    let first = Client::connect(node.http, "alice").await;
    let _second = Client::connect(node.http, "alice").await;
    assert_eq!(upgrade_status(node.http, "/ws?user=alice").await, 429);
    let _bob = Client::connect(node.http, "bob").await;
    let _carol = Client::connect(node.http, "carol").await;
    assert_eq!(
        upgrade_status(node.http, "/ws?user=dave").await,
        429,
        "four connections from this address already"
    );
    first.close().await;
    // The place comes back once the connection is gone.
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let url = format!("ws://{}/ws?user=alice", node.http);
        if Client::connect_url(&url).await.is_ok() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the closed connection kept its place"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let metrics = metrics_text(node.http).await;
    assert_eq!(
        metric(
            &metrics,
            r#"chat_connections_refused_total{kind="per_user"}"#
        ),
        Some(1.0),
        "{metrics}"
    );
    assert!(
        metric(
            &metrics,
            r#"chat_connections_refused_total{kind="per_address"}"#
        ) >= Some(1.0),
        "{metrics}"
    );
}

#[tokio::test]
async fn direct_bursts_from_many_senders_are_refused_to_them_and_the_victim_stays() {
    let node = NodeProcess::start("n1", &[]);
    let mut bob = Client::connect(node.http, "bob").await;
    // Five senders, each within its own rate limit, all at bob at once (1 KiB of control
    // characters each, 6 KiB rendered); bob reads nothing until they are done.
    let mut senders = Vec::new();
    for s in 0..5 {
        let addr = node.http;
        senders.push(tokio::spawn(async move {
            let mut client = Client::connect(addr, &format!("mallory{s}")).await;
            let (mut sent, mut limited) = (0u32, 0u32);
            for _ in 0..150 {
                let reply = client
                    .request(json!({"type": "direct", "to": "bob", "text": "\u{1}".repeat(1024)}))
                    .await;
                match reply["type"].as_str() {
                    Some("ack") => sent += 1,
                    _ => {
                        assert_eq!(reply["code"], "rate_limited", "{reply}");
                        limited += 1;
                    }
                }
            }
            (sent, limited)
        }));
    }
    let mut delivered_to_bob = 0;
    let mut refused = 0;
    for sender in senders {
        let (sent, limited) = sender.await.expect("sender");
        delivered_to_bob += sent;
        refused += limited;
    }
    println!("direct burst: {delivered_to_bob} delivered to bob, {refused} refused to senders");
    assert!(refused > 0, "750 directs in a burst went through unchecked");
    // Bob was never cut off: he reads everything that was acknowledged to the senders.
    for _ in 0..delivered_to_bob {
        let frame = bob.recv_until(|f| f["type"] == "direct").await;
        assert_eq!(frame["text"].as_str().map(str::len), Some(1024));
    }
    bob.assert_alive().await;
    let metrics = metrics_text(node.http).await;
    assert_eq!(
        metric(&metrics, r#"chat_connections_closed_total{kind="slow"}"#).unwrap_or(0.0),
        0.0,
        "bob was cut off as too slow:\n{metrics}"
    );
}

#[tokio::test]
async fn a_udp_flood_on_the_cluster_port_never_costs_a_node_its_health_or_a_member() {
    let cluster = common::cluster::Cluster::start(200, 3).await;
    let target = cluster.cluster_addrs[0];
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp socket");
    // 15 s of datagrams without the cookie, as fast as one thread sends them, in three shapes:
    // garbage, a seal-sized junk, and the largest datagram.
    let flooding = Arc::new(AtomicBool::new(true));
    let flooder = {
        let flooding = flooding.clone();
        std::thread::spawn(move || {
            let shapes = [vec![0xAB; 16], vec![0x5A; 96], vec![0x00; 1400]];
            let mut sent = 0u64;
            while flooding.load(Ordering::Relaxed) {
                for shape in &shapes {
                    if socket.send_to(shape, target).is_ok() {
                        sent += 1;
                    }
                }
            }
            sent
        })
    };
    let before = rss_bytes(cluster.node(1).pid());
    let mut peak = before;
    let started = Instant::now();
    let mut worst = 200;
    while started.elapsed() < Duration::from_secs(15) {
        for i in 1..=3 {
            let status = common::cluster::health_status(cluster.http(i))
                .await
                .unwrap_or(0);
            if status != 200 {
                worst = status;
                println!("n{i} /healthz {status} at {:?}", started.elapsed());
            }
        }
        peak = peak.max(rss_bytes(cluster.node(1).pid()));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    flooding.store(false, Ordering::Relaxed);
    let sent = flooder.join().expect("flooder");
    let grown = peak.saturating_sub(before);
    println!(
        "udp flood: {sent} datagrams in 15 s; worst /healthz {worst}; memory of the target grew by {:.1} MiB",
        grown as f64 / f64::from(1 << 20)
    );
    assert_eq!(worst, 200, "a node left 200 during the flood");
    assert!(grown < 64 << 20, "the flood cost the target {grown} bytes");
    for i in 1..=3 {
        let up = common::cluster::up_members(cluster.http(i))
            .await
            .expect("view");
        assert_eq!(up.len(), 3, "n{i} sees {up:?}");
    }
    let refused = common::cluster::metric_value(
        cluster.http(1),
        r#"chat_peer_dropped_total{kind="bad_datagram"}"#,
    )
    .await
    .unwrap_or(0.0);
    assert!(refused > 0.0, "the flood was not even seen");
}

/// How a stranger on the cluster port behaves.
#[derive(Debug, Clone, Copy)]
enum Stranger {
    /// Connects and says nothing.
    Silent,
    /// Sends random-looking bytes.
    Garbage,
    /// Announces a 16 MiB frame and sends its body, slowly.
    HugeFrame,
}

/// One stranger from `source`: behaves as `kind`, then waits for the node to close the
/// connection; how long the node took to close it, if it did within 30 s.
async fn stranger(
    target: std::net::SocketAddr,
    source: String,
    kind: Stranger,
) -> Option<Duration> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind(format!("{source}:0").parse().expect("source"))
        .expect("bind the source address");
    let started = Instant::now();
    let mut stream = socket.connect(target).await.ok()?;
    let (mut read, mut write) = stream.split();
    let closed = async {
        let mut buf = [0u8; 1024];
        loop {
            match read.read(&mut buf).await {
                Ok(0) | Err(_) => return started.elapsed(),
                Ok(_) => {}
            }
        }
    };
    let talk = async {
        match kind {
            Stranger::Silent => std::future::pending::<()>().await,
            Stranger::Garbage => {
                let junk: Vec<u8> = (0..4096u32)
                    .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
                    .collect();
                loop {
                    if write.write_all(&junk).await.is_err() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            Stranger::HugeFrame => {
                let _ = write.write_all(&(16u64 << 20).to_be_bytes()).await;
                let chunk = vec![0x42u8; 16 * 1024];
                loop {
                    if write.write_all(&chunk).await.is_err() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        std::future::pending::<()>().await;
    };
    tokio::select! {
        elapsed = closed => Some(elapsed),
        () = talk => None,
        () = tokio::time::sleep(Duration::from_secs(30)) => None,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn strangers_on_the_cluster_port_are_closed_within_seconds_and_cost_no_member() {
    const STRANGERS: usize = 300;
    let cluster = common::cluster::Cluster::start(210, 3).await;
    let target = cluster.cluster_addrs[0];
    let before = rss_bytes(cluster.node(1).pid());
    // From 60 source addresses (5 each, under the per-address cap): silent ones, garbage, and
    // frames announced huge; more than the node admits as strangers at once.
    let kinds = [Stranger::Silent, Stranger::Garbage, Stranger::HugeFrame];
    let tasks: Vec<_> = (0..STRANGERS)
        .map(|i| {
            let source = format!("127.0.1.{}", 1 + i % 60);
            tokio::spawn(stranger(target, source, kinds[i % 3]))
        })
        .collect();
    let started = Instant::now();
    let mut peak = before;
    let mut worst = 200;
    let three = cluster.all_names();
    while started.elapsed() < Duration::from_secs(8) {
        for i in 1..=3 {
            let status = common::cluster::health_status(cluster.http(i))
                .await
                .unwrap_or(0);
            worst = if status == 200 { worst } else { status };
            let up = common::cluster::up_members(cluster.http(i)).await;
            assert_eq!(up.as_ref(), Some(&three), "n{i} during the strangers");
        }
        peak = peak.max(rss_bytes(cluster.node(1).pid()));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut closed = Vec::new();
    for (i, task) in tasks.into_iter().enumerate() {
        let elapsed = task.await.expect("stranger task");
        let elapsed =
            elapsed.unwrap_or_else(|| panic!("stranger {i} ({:?}) never closed", kinds[i % 3]));
        closed.push(elapsed);
    }
    closed.sort();
    let grown = peak.saturating_sub(before);
    println!(
        "{STRANGERS} strangers: closed after {:?} (median) / {:?} (last); worst /healthz {worst}; memory grew {:.1} MiB",
        closed[STRANGERS / 2],
        closed[STRANGERS - 1],
        grown as f64 / f64::from(1 << 20)
    );
    assert!(
        closed[STRANGERS - 1] < Duration::from_secs(20),
        "a stranger stayed {:?}",
        closed[STRANGERS - 1]
    );
    assert_eq!(worst, 200, "a node left 200 during the strangers");
    assert!(
        grown < 32 << 20,
        "the strangers cost the target {grown} bytes"
    );
    let text = metrics_text(cluster.http(1)).await;
    let refused = metric(
        &text,
        r#"chat_cluster_streams_refused_total{kind="too_many_strangers"}"#,
    );
    assert!(
        refused.unwrap_or(0.0) > 0.0,
        "the cap on strangers never applied"
    );
    // The cluster still works: a message crosses from n2 to n3.
    let mut a = Client::connect(cluster.http(2), "after-a").await;
    let mut b = Client::connect(cluster.http(3), "after-b").await;
    a.join("after-strangers", None).await;
    b.join("after-strangers", None).await;
    a.say("after-strangers", "still here").await;
    b.recv_until(|f| f["type"] == "message" && f["text"] == "still here")
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn replayed_heartbeats_of_a_departed_node_never_bring_it_back() {
    let mut cluster = common::cluster::Cluster::start(205, 3).await;
    // Capture two seconds of what n3 sends on the UDP side of its cluster port.
    let n3 = cluster.cluster_addrs[2];
    let Some(capture) = common::capture::Capture::start(&format!(
        "udp and src host {} and src port {}",
        n3.ip(),
        n3.port()
    )) else {
        return;
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let datagrams = common::capture::udp_payloads(&capture.stop());
    assert!(
        datagrams.len() > 10,
        "captured {} datagrams",
        datagrams.len()
    );

    // n3 leaves for good: the others forget it at once.
    assert_eq!(cluster.node_mut(3).terminate(), Some(0));
    let listed = |view: &Value| -> Vec<String> {
        view["members"]
            .as_array()
            .expect("members")
            .iter()
            .filter_map(|m| m["name"].as_str().map(str::to_owned))
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let view = common::cluster::cluster_view(cluster.http(1))
            .await
            .expect("view");
        if !listed(&view).contains(&"n3".to_owned()) {
            break;
        }
        assert!(Instant::now() < deadline, "n1 still lists n3: {view}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let refused_before = common::cluster::metric_value(
        cluster.http(1),
        r#"chat_peer_dropped_total{kind="bad_datagram"}"#,
    )
    .await
    .unwrap_or(0.0);

    // Every captured datagram, played back to n1 and n2 from n3's own address, three times.
    let socket = std::net::UdpSocket::bind(n3).expect("n3's address is free again");
    for _ in 0..3 {
        for datagram in &datagrams {
            for target in &cluster.cluster_addrs[..2] {
                socket.send_to(datagram, target).expect("send");
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    for i in 1..=2 {
        let view = common::cluster::cluster_view(cluster.http(i))
            .await
            .expect("view");
        assert!(
            !listed(&view).contains(&"n3".to_owned()),
            "a replay brought n3 back for n{i}: {view}"
        );
        assert_eq!(view["quorum"], true, "n{i}: {view}");
    }
    let refused = common::cluster::metric_value(
        cluster.http(1),
        r#"chat_peer_dropped_total{kind="bad_datagram"}"#,
    )
    .await
    .unwrap_or(0.0)
        - refused_before;
    println!(
        "replay: {} captured datagrams of n3 played back 3 times; n1 refused {refused}",
        datagrams.len()
    );
    assert!(
        refused >= 3.0 * datagrams.len() as f64,
        "n1 refused only {refused} of {} replayed datagrams",
        3 * datagrams.len()
    );
}
