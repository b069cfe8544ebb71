//! What survives a node's stop, graceful (SIGTERM) or not (SIGKILL): every acknowledged message,
//! in place, and the room's sequence continues without reusing a number (PROTOCOL.md §2, §3).

mod common;

use std::collections::BTreeMap;

use common::{Client, NodeProcess};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

/// Every stored message of `room` (at most 500), oldest first.
async fn all_history(client: &mut Client, room: &str) -> Vec<Value> {
    let reply = client
        .request(json!({"type": "history", "room": room, "limit": 500}))
        .await;
    assert_eq!(reply["type"], "history", "{reply}");
    reply["messages"]
        .as_array()
        .cloned()
        .unwrap_or_else(|| panic!("no messages: {reply}"))
}

#[tokio::test]
async fn graceful_shutdown_closes_clients_with_1001_and_keeps_every_message() {
    let mut node = NodeProcess::start("n1", &[]);
    let mut alice = Client::connect(node.http, "alice").await;
    let mut bob = Client::connect(node.http, "bob").await;
    alice.join("log", None).await;
    bob.join("log", None).await;
    for i in 1..=4 {
        alice.say("log", &format!("m{i}")).await;
    }
    let last = alice
        .request(json!({"type": "send", "room": "log", "text": "m5", "id": "last"}))
        .await;
    assert_eq!(last["seq"], 5, "{last}");
    let before = all_history(&mut alice, "log").await;
    assert_eq!(before.len(), 5);

    node.signal("TERM");
    for client in [&mut alice, &mut bob] {
        let close = client.closed().await.expect("a close frame");
        assert_eq!(close.code, CloseCode::Away, "{close:?}");
        assert_eq!(u16::from(close.code), 1001);
    }
    assert_eq!(node.wait_exit(), Some(0), "a graceful stop exits 0");

    node.restart();
    let mut alice = Client::connect(node.http, "alice").await;
    let joined = alice.join("log", None).await;
    assert_eq!(joined["seq"], 5);
    assert_eq!(
        all_history(&mut alice, "log").await,
        before,
        "history is identical"
    );
    // A retry of the last send is still recognised after the restart.
    let retried = alice
        .request_with_ref(
            json!({"type": "send", "room": "log", "text": "m5", "id": "last"}),
            json!("again"),
        )
        .await;
    assert_eq!(
        retried,
        json!({"type": "ack", "ref": "again", "room": "log", "seq": 5})
    );
    assert_eq!(alice.say("log", "m6").await, 6, "the sequence continues");
}

#[tokio::test]
async fn every_acked_message_survives_sigkill_and_seqs_are_not_reused() {
    let mut node = NodeProcess::start("n1", &["--rate-limit", "0"]);
    let mut alice = Client::connect(node.http, "alice").await;
    alice.join("log", None).await;
    let mut acked: BTreeMap<u64, String> = BTreeMap::new();
    for i in 1..=20 {
        let text = format!("m{i}");
        acked.insert(alice.say("log", &text).await, text);
    }
    // Many sends in flight, and the node killed while their acks come back.
    for i in 1..=300 {
        alice
            .send(json!({"type": "send", "ref": 1000 + i, "room": "log", "text": format!("p{i}")}))
            .await;
    }
    let mut pipelined_acks = 0;
    let record = |frame: &Value, acked: &mut BTreeMap<u64, String>| {
        if frame["type"] != "ack" {
            return false;
        }
        let reference = frame["ref"].as_u64().expect("ref");
        let seq = frame["seq"].as_u64().expect("seq");
        let previous = acked.insert(seq, format!("p{}", reference - 1000));
        assert_eq!(previous, None, "seq {seq} acked twice");
        true
    };
    while pipelined_acks < 50 {
        let frame = alice.next_or_closed().await.expect("node still up");
        if record(&frame, &mut acked) {
            pipelined_acks += 1;
        }
    }
    node.kill();
    // Acks already on the wire were sent before the kill: they count too.
    while let Some(frame) = alice.next_or_closed().await {
        record(&frame, &mut acked);
    }

    node.restart();
    let mut alice = Client::connect(node.http, "alice").await;
    let history = all_history(&mut alice, "log").await;
    let stored: BTreeMap<u64, String> = history
        .iter()
        .map(|m| {
            let seq = m["seq"].as_u64().expect("seq");
            (seq, m["text"].as_str().expect("text").to_owned())
        })
        .collect();
    let latest = stored.len() as u64;
    assert_eq!(
        stored.keys().copied().collect::<Vec<_>>(),
        (1..=latest).collect::<Vec<_>>(),
        "stored seqs are gap-free"
    );
    for (seq, text) in &acked {
        assert_eq!(
            stored.get(seq),
            Some(text),
            "acked message {seq} lost or changed"
        );
    }
    let joined = alice.join("log", None).await;
    assert_eq!(joined["seq"], latest);
    let next = alice.say("log", "after the crash").await;
    assert_eq!(next, latest + 1, "no seq is reused");
    assert!(next > *acked.keys().last().expect("acks"));
}
