//! The node's limits against one real node: frame size, slow clients, connection count and
//! rate (PROTOCOL.md §1, §3, §4 and the `--max-connections` / `--client-queue` settings).

mod common;

use std::time::{Duration, Instant};

use common::{Client, NodeProcess, TIMEOUT, assert_error, metric, metrics_text, upgrade_status};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

/// How long a test waits to prove that no frame arrives.
const QUIET: Duration = Duration::from_millis(300);

/// The series counting connections the node cut off because they read too slowly.
const SLOW_CLOSES: &str = r#"chat_connections_closed_total{kind="slow"}"#;

#[tokio::test]
async fn a_frame_over_max_frame_bytes_closes_the_connection_with_1009() {
    let node = NodeProcess::start(
        "n1",
        &["--max-frame-bytes", "2048", "--max-text-bytes", "1024"],
    );
    let mut alice = Client::connect(node.http, "alice").await;
    let mut bob = Client::connect(node.http, "bob").await;
    alice.join("frames", None).await;
    // Just under the limit is fine.
    let fits = json!({"type": "send", "room": "frames", "text": "a".repeat(1024)});
    assert!(fits.to_string().len() < 2048);
    assert_eq!(alice.say("frames", &"a".repeat(1024)).await, 1);

    alice.send_text(&"x".repeat(4096)).await;
    let close = alice.closed().await.expect("a close frame");
    assert_eq!(close.code, CloseCode::Size, "{close:?}");
    assert_eq!(u16::from(close.code), 1009);
    bob.assert_alive().await;
}

#[tokio::test]
async fn a_client_that_stops_reading_is_cut_off_with_1013_without_slowing_the_room() {
    let node = NodeProcess::start(
        "n1",
        &[
            "--client-queue",
            "16",
            "--rate-limit",
            "0",
            "--max-text-bytes",
            "32768",
        ],
    );
    let mut alice = Client::connect(node.http, "alice").await;
    let mut stalled = Client::connect(node.http, "bob").await;
    stalled.join("flood", None).await;
    alice.join("flood", None).await;
    // From here on `stalled` is not read until the node has cut it off.
    let text = "f".repeat(32 * 1024);
    let mut seq = loop {
        let seq = alice.say("flood", &text).await;
        alice.message("flood", seq).await;
        let metrics = metrics_text(node.http).await;
        if metric(&metrics, SLOW_CLOSES).unwrap_or(0.0) >= 1.0 {
            break seq;
        }
        assert!(
            seq < 2_000,
            "the stalled client was never cut off:\n{metrics}"
        );
    };
    // Read what the stalled client was sent before its cut: a prefix of the room, then 1013.
    let close = stalled.closed().await.expect("a close frame");
    assert_eq!(close.code, CloseCode::Again, "{close:?}");
    assert_eq!(u16::from(close.code), 1013);
    let delivered: Vec<u64> = stalled
        .backlog
        .iter()
        .filter(|f| f["type"] == "message")
        .map(|f| f["seq"].as_u64().expect("seq"))
        .collect();
    assert_eq!(
        delivered,
        (1..=delivered.len() as u64).collect::<Vec<_>>(),
        "what got through is a gap-free prefix"
    );
    assert!((delivered.len() as u64) < seq, "{delivered:?}");

    // The room and the other member go on.
    for _ in 0..5 {
        let next = alice.say("flood", "still here").await;
        assert_eq!(next, seq + 1);
        alice.message("flood", next).await;
        seq = next;
    }
    // The cut-off client leaves the room (its close travels to the room: poll).
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let who = alice.request(json!({"type": "who", "room": "flood"})).await;
        if who["users"] == json!(["alice"]) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the cut-off client is still a member: {who}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_stalled_client_is_disconnected_even_if_it_never_reads_again() {
    let node = NodeProcess::start(
        "n1",
        &[
            "--client-queue",
            "16",
            "--rate-limit",
            "0",
            "--max-text-bytes",
            "32768",
        ],
    );
    let mut alice = Client::connect(node.http, "alice").await;
    let mut stalled = Client::connect(node.http, "bob").await;
    stalled.join("flood", None).await;
    alice.join("flood", None).await;
    // Bursts, as a busy room sends them: many frames queued for the stalled client at once.
    let text = "f".repeat(32 * 1024);
    // Seven sends at a time: the sender's own 14 replies and messages fit its queue of 16.
    let burst: Vec<String> = (0..7).map(|_| text.clone()).collect();
    let mut last = 0;
    for _ in 0..100 {
        let seqs = alice.say_many("flood", &burst).await;
        last = *seqs.last().expect("seqs");
        alice.messages_until("flood", last).await;
    }
    assert_eq!(last, 700, "every send was acked");
    // About 22 MB were queued for the stalled client: far more than its socket buffers hold. It
    // never reads again, and the node must still let it go (and free its connection slot).
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let metrics = metrics_text(node.http).await;
        if metric(&metrics, "chat_connections") == Some(1.0)
            && metric(&metrics, SLOW_CLOSES) == Some(1.0)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the stalled connection is still held open:\n{metrics}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // And the connection is really gone: when the client reads again, it finds what was sent
    // before the cut and then the end (the 1013 close frame, or at least EOF or a reset).
    let ending = stalled.closed_within(Duration::from_secs(5)).await;
    let Some(close) = ending else {
        panic!(
            "the node let go of the stalled connection but left its socket open: after {} \
             frames, neither a close frame nor EOF",
            stalled.backlog.len()
        );
    };
    if let Some(close) = close {
        assert_eq!(close.code, CloseCode::Again, "{close:?}");
    }
}

#[tokio::test]
async fn a_join_replay_longer_than_the_client_queue_reaches_a_client_that_reads() {
    // `--client-queue` bounds what a *slow* client may have pending; a replay of 50 messages to
    // a client that reads as fast as it can is not that.
    let node = NodeProcess::start("n1", &["--client-queue", "16", "--rate-limit", "0"]);
    let mut alice = Client::connect(node.http, "alice").await;
    alice.join("backlog", None).await;
    for batch in 0..10 {
        let texts: Vec<String> = (1..=5).map(|i| format!("m{}", batch * 5 + i)).collect();
        alice.say_many("backlog", &texts).await;
        alice.messages_until("backlog", (batch + 1) * 5).await;
    }
    let mut bob = Client::connect(node.http, "bob").await;
    let reply = bob.join("backlog", Some(0)).await;
    assert_eq!(reply["seq"], 50);
    let replay = bob.messages_until("backlog", 50).await;
    let seqs: Vec<u64> = replay
        .iter()
        .map(|m| m["seq"].as_u64().expect("seq"))
        .collect();
    assert_eq!(seqs, (1..=50).collect::<Vec<_>>());
    bob.assert_alive().await;
}

#[tokio::test]
async fn a_reconnecting_client_gets_every_missed_message_of_each_room_it_rejoins() {
    // Default queue (1024 frames) and replay cap (1000): two rooms that each missed 600
    // messages, re-joined at once with `since` as PROTOCOL.md §4 prescribes.
    let node = NodeProcess::start("n1", &["--rate-limit", "0"]);
    let mut alice = Client::connect(node.http, "alice").await;
    for room in ["east", "west"] {
        alice.join(room, None).await;
        for batch in 0..3 {
            let texts: Vec<String> = (1..=200).map(|i| format!("m{}", batch * 200 + i)).collect();
            alice.say_many(room, &texts).await;
            alice.messages_until(room, (batch + 1) * 200).await;
        }
    }
    let mut bob = Client::connect(node.http, "bob").await;
    for room in ["east", "west"] {
        bob.send(json!({"type": "join", "ref": room, "room": room, "since": 0}))
            .await;
    }
    for room in ["east", "west"] {
        let reply = bob.recv_until(|f| f["ref"] == room).await;
        assert_eq!(
            reply,
            json!({"type": "joined", "ref": room, "room": room, "seq": 600})
        );
        let replay = bob.messages_until(room, 600).await;
        let seqs: Vec<u64> = replay
            .iter()
            .map(|m| m["seq"].as_u64().expect("seq"))
            .collect();
        assert_eq!(seqs, (1..=600).collect::<Vec<_>>(), "{room}");
    }
    bob.assert_alive().await;
}

#[tokio::test]
async fn connections_beyond_max_connections_get_503_until_one_closes() {
    let node = NodeProcess::start("n1", &["--max-connections", "2"]);
    let mut alice = Client::connect(node.http, "alice").await;
    let mut bob = Client::connect(node.http, "bob").await;
    assert_eq!(upgrade_status(node.http, "/ws?user=carol").await, 503);
    alice.assert_alive().await;
    bob.assert_alive().await;
    let health = common::http_request(node.http, "/healthz").await;
    assert_eq!(health.status, 200, "plain HTTP is still served");

    alice.close().await;
    // The slot frees once the node has seen the close: poll.
    let url = format!("ws://{}/ws?user=carol", node.http);
    let deadline = Instant::now() + TIMEOUT;
    let mut carol = loop {
        match Client::connect_url(&url).await {
            Ok(client) => break client,
            Err(e) => {
                assert!(Instant::now() < deadline, "never accepted again: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    carol.join("full", None).await;
    assert_eq!(carol.say("full", "made it").await, 1);
    assert_eq!(upgrade_status(node.http, "/ws?user=dave").await, 503);
}

#[tokio::test]
async fn by_default_the_connection_limit_follows_the_open_files_limit() {
    // Soft limit 300, hard 600: the node raises its soft limit to 600 and keeps 512 files for
    // peers, the store and HTTP, so it serves 88 connections and refuses the next with 503.
    let node = NodeProcess::start_through("n1", &["prlimit", "--nofile=300:600"], &[]);
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", node.pid())).expect("limits");
    let open_files = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("open files line");
    assert_eq!(
        open_files.split_whitespace().nth(3),
        Some("600"),
        "{open_files}"
    );
    let mut clients = Vec::new();
    for n in 0..88 {
        clients.push(Client::connect(node.http, &format!("user{n}")).await);
    }
    assert_eq!(upgrade_status(node.http, "/ws?user=late").await, 503);
    let health = common::http_request(node.http, "/healthz").await;
    assert_eq!(health.status, 200, "plain HTTP is still served");
    for client in &mut clients {
        client.assert_alive().await;
    }
}

#[tokio::test]
async fn sends_over_the_rate_limit_are_refused_and_not_delivered() {
    let node = NodeProcess::start("n1", &["--rate-limit", "5"]);
    let mut alice = Client::connect(node.http, "alice").await;
    let mut bob = Client::connect(node.http, "bob").await;
    bob.join("rated", None).await;
    alice.join("rated", None).await;
    assert_eq!(
        bob.recv_until(|f| f["type"] == "presence" && f["user"] == "bob")
            .await["event"],
        "join"
    );
    assert_eq!(
        bob.recv_until(|f| f["type"] == "presence" && f["user"] == "alice")
            .await["event"],
        "join"
    );

    // A burst of twice the rate passes; the rest of the burst is refused.
    for i in 1..=12 {
        alice
            .send(json!({"type": "send", "ref": 100 + i, "room": "rated", "text": format!("m{i}")}))
            .await;
    }
    for i in 1..=12 {
        let reply = alice.recv_until(|f| f["ref"] == json!(100 + i)).await;
        if i <= 10 {
            assert_eq!(
                reply,
                json!({"type": "ack", "ref": 100 + i, "room": "rated", "seq": i})
            );
        } else {
            assert_error(&reply, Some(json!(100 + i)), "rate_limited");
        }
    }
    // `direct` shares the budget; `ping` is not limited.
    let reply = alice
        .request_with_ref(
            json!({"type": "direct", "to": "bob", "text": "psst"}),
            json!("d"),
        )
        .await;
    assert_error(&reply, Some(json!("d")), "rate_limited");
    alice.assert_alive().await;
    // The limit is per connection.
    let mut alice2 = Client::connect(node.http, "alice").await;
    alice2.join("rated", None).await;
    assert_eq!(alice2.say("rated", "other connection").await, 11);

    let received: Vec<Value> = bob.messages_until("rated", 11).await;
    let seqs: Vec<u64> = received
        .iter()
        .map(|m| m["seq"].as_u64().expect("seq"))
        .collect();
    assert_eq!(seqs, (1..=11).collect::<Vec<_>>());
    assert_eq!(received[9]["text"], "m10");
    assert_eq!(received[10]["text"], "other connection");
    bob.assert_quiet(QUIET).await;

    // Later (a token refills every 200 ms at 5/s), sending is allowed again.
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(alice.say("rated", "later").await, 12);
    assert_eq!(bob.message("rated", 12).await["text"], "later");
}

#[tokio::test]
async fn a_client_that_answers_no_ping_is_closed_and_a_silent_one_that_does_stays() {
    let node = NodeProcess::start("n1", &["--idle-timeout-ms", "3000"]);
    // Never read: its pings are not answered (a half-open connection behaves the same).
    let mut gone = Client::connect(node.http, "ghost").await;
    let mut quiet = Client::connect(node.http, "lurker").await;
    quiet.join("idle", None).await;
    let started = Instant::now();
    // Reading answers the node's pings; `quiet` sends nothing for over twice the timeout.
    assert!(
        quiet.closed_within(Duration::from_secs(7)).await.is_none(),
        "a client that answers pings was closed"
    );
    quiet.assert_alive().await;
    let metrics = metrics_text(node.http).await;
    assert_eq!(
        metric(&metrics, r#"chat_connections_closed_total{kind="idle"}"#),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(metric(&metrics, "chat_connections"), Some(1.0), "{metrics}");
    let ending = gone.closed_within(Duration::from_secs(5)).await;
    if let Some(Some(close)) = ending {
        assert_eq!(u16::from(close.code), 1001, "{close:?}");
    } else {
        assert!(ending.is_some(), "the idle connection is still open");
    }
    println!(
        "idle: the unanswering client was closed, the silent one kept, over {:.1}s",
        started.elapsed().as_secs_f64()
    );
}

#[tokio::test]
async fn slow_header_senders_do_not_keep_a_client_out_and_are_dropped() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const SLOW: usize = 2_000;
    let node = NodeProcess::start("n1", &[]);
    // Each opens a request and then trickles its headers, a byte a second, never finishing.
    let mut slow = Vec::new();
    for _ in 0..SLOW {
        let mut stream = tokio::net::TcpStream::connect(node.http)
            .await
            .expect("connect");
        stream
            .write_all(b"GET /ws?user=slow HTTP/1.1\r\nHost: x\r\n")
            .await
            .expect("write");
        slow.push(tokio::spawn(async move {
            let started = Instant::now();
            let mut buf = [0u8; 256];
            loop {
                tokio::select! {
                    // The node answered (408) or closed: how long the slot was held.
                    _ = stream.read(&mut buf) => return started.elapsed(),
                    () = tokio::time::sleep(Duration::from_secs(1)) => {
                        if stream.write_all(b"X").await.is_err() {
                            return started.elapsed();
                        }
                    }
                }
            }
        }));
    }
    // A new client still gets in and chats while all of them hold their connections.
    let mut alice = Client::connect(node.http, "alice").await;
    alice.join("open", None).await;
    assert_eq!(alice.say("open", "still here").await, 1);
    // And the node lets every slow one go after its header deadline (10 s).
    let mut longest = Duration::ZERO;
    for task in slow {
        let held = tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .expect("a slow header sender was held for 30 s")
            .expect("task");
        longest = longest.max(held);
    }
    alice.assert_alive().await;
    println!("slow headers: {SLOW} held at once, the last dropped after {longest:?}");
}
