//! Retention on the real binary: a node started with `--retention-messages` keeps a room's log at
//! its bound on disk (compaction), and `history` and `join` below the horizon say where the log
//! now starts (docs/protocol.md, "Retention"); a room named in the config file's
//! `[retention-rooms]` keeps its own bound.

#![allow(clippy::expect_used)]

mod common;

use chat_node::store::Store;
use chat_protocol::RoomId;
use common::{Client, NodeProcess};
use serde_json::{Value, json};

/// Messages written to the room.
const MESSAGES: u64 = 20_000;
/// The retention bound.
const KEEP: u64 = 1_000;
/// Sends in flight at once (then the test waits for the last one's ack).
const BATCH: u64 = 500;

/// Sends `BATCH` messages from `first` and waits for their acks; returns the last acked seq.
async fn send_batch(client: &mut Client, first: u64) -> u64 {
    for n in first..first + BATCH {
        client
            .send(json!({"type": "send", "ref": n, "room": "lobby", "text": format!("message {n:06} {}", "x".repeat(100))}))
            .await;
    }
    let last = first + BATCH - 1;
    loop {
        let frame = client.recv().await;
        if frame["type"] == "ack" && frame["ref"] == last {
            return frame["seq"].as_u64().expect("seq");
        }
        assert_ne!(frame["type"], "error", "{frame}");
    }
}

/// Waits for the reply to request `reference`, skipping the room's message events.
async fn reply(client: &mut Client, reference: u64) -> Value {
    loop {
        let frame = client.recv().await;
        if frame["ref"] == reference {
            return frame;
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_room_at_its_retention_bound_stops_growing_on_disk() {
    let keep = KEEP.to_string();
    let mut node = NodeProcess::start("n1", &["--retention-messages", &keep, "--rate-limit", "0"]);
    let mut client = Client::connect(node.http, "alice").await;
    client
        .send(json!({"type": "join", "ref": 0, "room": "lobby"}))
        .await;
    assert_eq!(reply(&mut client, 0).await["type"], "joined");
    let file = node.data_dir.join("chat.redb");
    let mut sizes = Vec::new();
    let mut last = 0;
    for first in (1..=MESSAGES).step_by(BATCH as usize) {
        last = send_batch(&mut client, first).await;
        if last % 5_000 == 0 {
            let bytes = std::fs::metadata(&file).expect("data file").len();
            sizes.push((last, bytes));
        }
    }
    assert_eq!(last, MESSAGES);
    println!("data file size by messages written: {sizes:?}");

    // The horizon follows the last commit: retention keeps exactly the newest KEEP messages.
    // History reaching below it says where the log starts.
    let deadline = std::time::Instant::now() + common::TIMEOUT;
    let mut request = 100;
    let horizon = loop {
        request += 1;
        client
            .send(json!({"type": "history", "ref": request, "room": "lobby", "before": 100, "limit": 50}))
            .await;
        let history = reply(&mut client, request).await;
        assert!(history["messages"].as_array().expect("messages").is_empty());
        let horizon = history["horizon"].as_u64().expect("a horizon");
        assert!(horizon <= MESSAGES - KEEP + 1, "horizon {horizon}");
        if horizon == MESSAGES - KEEP + 1 || std::time::Instant::now() > deadline {
            break horizon;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(horizon, MESSAGES - KEEP + 1);
    // The newest messages are a plain reply.
    client
        .send(json!({"type": "history", "ref": 2, "room": "lobby", "limit": 50}))
        .await;
    let newest = reply(&mut client, 2).await;
    assert!(newest.get("horizon").is_none(), "{newest}");
    assert_eq!(newest["messages"][49]["seq"], MESSAGES);
    // A join resuming from below the horizon is told that messages were dropped.
    client
        .send(json!({"type": "leave", "ref": 3, "room": "lobby"}))
        .await;
    reply(&mut client, 3).await;
    client
        .send(json!({"type": "join", "ref": 4, "room": "lobby", "since": 5}))
        .await;
    let joined = reply(&mut client, 4).await;
    assert_eq!(joined["type"], "joined");
    assert!(joined["horizon"].as_u64().expect("a horizon") >= horizon);

    // The writer deletes every entry below the horizon, a bounded step at a time.
    common::wait_metric(node.http, "chat_store_compacted_total", |n| {
        n >= (MESSAGES - KEEP) as f64
    })
    .await;
    // The file stopped growing once the room reached its bound: redb reuses the freed pages.
    let (_, at_10k) = sizes[1];
    let compacted = std::fs::metadata(&file).expect("data file").len();
    assert!(
        compacted <= at_10k + at_10k / 4,
        "the data file kept growing: {sizes:?}, then {compacted} bytes"
    );
    drop(client);
    node.terminate();
    let store = Store::open(&node.data_dir).expect("store");
    let stored = store
        .count_entries(&RoomId::new("lobby").expect("room"))
        .expect("count");
    println!("entries stored after {MESSAGES} messages with retention {KEEP}: {stored}");
    assert_eq!(stored, KEEP);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_room_named_in_the_config_file_keeps_its_own_retention() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("chat.toml");
    std::fs::write(&file, "[retention-rooms]\nsmall = { messages = 3 }\n").expect("config");
    let file = file.to_str().expect("utf-8 path");
    let node = NodeProcess::start("n1", &["--config", file, "--retention-messages", "100"]);
    let mut client = Client::connect(node.http, "alice").await;
    for (n, room) in ["small", "large"].into_iter().enumerate() {
        let n = n as u64 * 100;
        client
            .send(json!({"type": "join", "ref": n, "room": room}))
            .await;
        reply(&mut client, n).await;
        for i in 1..=10 {
            client
                .send(json!({"type": "send", "ref": n + i, "room": room, "text": "hi"}))
                .await;
            assert_eq!(reply(&mut client, n + i).await["seq"], i);
        }
    }
    let history = |reference: u64, room: &str| json!({"type": "history", "ref": reference, "room": room, "limit": 50});
    // The last trim is recorded just after the last ack: poll for it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    for reference in 1000.. {
        client.send(history(reference, "small")).await;
        let small = reply(&mut client, reference).await;
        if small["horizon"] == 8 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the override keeps 3: {small}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    client.send(history(1, "large")).await;
    let large = reply(&mut client, 1).await;
    assert!(large.get("horizon").is_none(), "{large}");
    assert_eq!(large["messages"].as_array().expect("messages").len(), 10);
}
