//! The whole client protocol against one real node (PROTOCOL.md §1–3, §5).
//!
//! Each test starts its own node (a child process with a fresh data directory), so tests are
//! independent and run in parallel. Frames are compared whole; only `ts`, `session` and the
//! human-readable `message` of errors are taken from the frame, after checking their type.

mod common;

use std::time::Duration;

use common::{
    Client, NodeProcess, assert_error, assert_ts_within, http_request, metric, metrics_text,
    now_ms, upgrade_status, wait_metric,
};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

/// How long a test waits to prove that no frame arrives (a frame on its way takes a few ms).
const QUIET: Duration = Duration::from_millis(300);

/// The MESSAGE frame PROTOCOL.md §2 defines, with `ts` taken from `actual`.
fn message(room: &str, seq: u64, from: &str, text: &str, actual: &Value) -> Value {
    json!({"type": "message", "room": room, "seq": seq, "from": from, "text": text, "ts": actual["ts"]})
}

fn presence(room: &str, user: &str, event: &str) -> Value {
    json!({"type": "presence", "room": room, "user": user, "event": event})
}

/// Waits for the next `presence` frame.
async fn next_presence(client: &mut Client) -> Value {
    client.recv_until(|f| f["type"] == "presence").await
}

// ---- §1: the WebSocket endpoint ----

#[tokio::test]
async fn welcome_names_the_node_the_user_and_an_opaque_session() {
    let node = NodeProcess::start("n1", &[]);
    let first = Client::connect(node.http, "alice").await;
    let second = Client::connect(node.http, "alice").await;
    for client in [&first, &second] {
        let session = &client.welcome["session"];
        assert!(
            session.as_str().is_some_and(|s| !s.is_empty()),
            "session must be a non-empty string: {}",
            client.welcome
        );
        assert_eq!(
            client.welcome,
            json!({"type": "welcome", "node": "n1", "user": "alice", "session": session})
        );
    }
    assert_ne!(
        first.welcome["session"], second.welcome["session"],
        "each connection is its own session"
    );
    // Names at the edges of the rules: every allowed character class, 1 and 32 characters.
    let longest = "x".repeat(32);
    for user in ["A_b.c-9", "z", longest.as_str()] {
        let client = Client::connect(node.http, user).await;
        assert_eq!(client.welcome["user"], user);
    }
}

#[tokio::test]
async fn bad_or_missing_user_names_get_400_without_upgrade() {
    let node = NodeProcess::start("n1", &[]);
    let too_long = format!("/ws?user={}", "x".repeat(33));
    let refused = [
        "/ws?user=",
        too_long.as_str(),
        "/ws?user=al%20ice",
        "/ws?user=alice!",
        "/ws?user=al%2Fice",
        "/ws?user=%C3%A9mile",
        "/ws",
        "/ws?name=alice",
    ];
    for path in refused {
        assert_eq!(upgrade_status(node.http, path).await, 400, "{path}");
    }
    // None of them became a connection.
    let text = metrics_text(node.http).await;
    assert_eq!(metric(&text, "chat_connections"), Some(0.0), "{text}");
    let mut alice = Client::connect(node.http, "alice").await;
    alice.assert_alive().await;
}

// ---- §2: requests and their replies ----

#[tokio::test]
async fn join_replies_with_the_rooms_latest_seq_echoing_the_ref() {
    let node = NodeProcess::start("n1", &[]);
    let mut alice = Client::connect(node.http, "alice").await;
    let reply = alice
        .request_with_ref(json!({"type": "join", "room": "lobby"}), json!(41))
        .await;
    assert_eq!(
        reply,
        json!({"type": "joined", "ref": 41, "room": "lobby", "seq": 0}),
        "a new room's latest seq is 0"
    );
    for text in ["a", "b", "c"] {
        alice.say("lobby", text).await;
    }
    let mut bob = Client::connect(node.http, "bob").await;
    let reply = bob
        .request_with_ref(json!({"type": "join", "room": "lobby"}), json!("j-1"))
        .await;
    assert_eq!(
        reply,
        json!({"type": "joined", "ref": "j-1", "room": "lobby", "seq": 3})
    );
}

#[tokio::test]
async fn joining_twice_gives_the_same_reply_and_no_duplicate_presence_or_message() {
    let node = NodeProcess::start("n1", &[]);
    let mut alice = Client::connect(node.http, "alice").await;
    let mut bob = Client::connect(node.http, "bob").await;
    alice.join("twice", None).await;
    assert_eq!(
        next_presence(&mut alice).await,
        presence("twice", "alice", "join")
    );
    let join = json!({"type": "join", "room": "twice"});
    let first = bob.request_with_ref(join.clone(), json!("j")).await;
    assert_eq!(
        first,
        json!({"type": "joined", "ref": "j", "room": "twice", "seq": 0})
    );
    assert_eq!(
        next_presence(&mut bob).await,
        presence("twice", "bob", "join")
    );
    assert_eq!(
        next_presence(&mut alice).await,
        presence("twice", "bob", "join")
    );
    let second = bob.request_with_ref(join, json!("j")).await;
    assert_eq!(second, first, "joining again is not an error: same reply");

    let seq = alice.say("twice", "once").await;
    assert_eq!(seq, 1);
    let received = bob.messages_until("twice", 1).await;
    assert_eq!(
        received,
        vec![message("twice", 1, "alice", "once", &received[0])]
    );
    alice.message("twice", 1).await;
    bob.assert_quiet(QUIET).await;
    alice.assert_quiet(QUIET).await;
}

#[tokio::test]
async fn join_with_since_replays_exactly_the_missed_messages_then_live_ones() {
    let node = NodeProcess::start("n1", &[]);
    let mut alice = Client::connect(node.http, "alice").await;
    alice.join("since", None).await;
    let before = now_ms();
    for i in 1..=5 {
        assert_eq!(alice.say("since", &format!("m{i}")).await, i);
    }
    let after = now_ms();
    let sent = alice.messages_until("since", 5).await;
    for (i, m) in sent.iter().enumerate() {
        let seq = i as u64 + 1;
        assert_eq!(*m, message("since", seq, "alice", &format!("m{seq}"), m));
        assert_ts_within(&m["ts"], before, after);
    }

    let mut bob = Client::connect(node.http, "bob").await;
    let reply = bob
        .request_with_ref(
            json!({"type": "join", "room": "since", "since": 2}),
            json!(7),
        )
        .await;
    assert_eq!(
        reply,
        json!({"type": "joined", "ref": 7, "room": "since", "seq": 5})
    );
    assert_eq!(
        bob.messages_until("since", 5).await,
        sent[2..].to_vec(),
        "the replay is exactly seq 3, 4, 5, oldest first"
    );
    assert_eq!(alice.say("since", "m6").await, 6);
    let live = bob.messages_until("since", 6).await;
    assert_eq!(
        live,
        vec![message("since", 6, "alice", "m6", &live[0])],
        "then live messages, with no gap and no duplicate"
    );
    assert_eq!(
        next_presence(&mut bob).await,
        presence("since", "bob", "join")
    );
    bob.assert_quiet(QUIET).await;

    // `since` at or past the latest seq replays nothing; `since` 0 replays everything.
    for (user, since, replayed) in [("carol", 6, 0), ("dave", 600, 0), ("erin", 0, 6)] {
        let mut client = Client::connect(node.http, user).await;
        let reply = client.join("since", Some(since)).await;
        assert_eq!(reply["seq"], 6, "{user}");
        if replayed > 0 {
            let replay = client.messages_until("since", 6).await;
            assert_eq!(replay.len(), replayed, "{user}: {replay:?}");
            assert_eq!(replay[..5], sent[..], "{user}");
            assert_eq!(replay[5], live[0], "{user}");
        }
        assert_eq!(
            next_presence(&mut client).await,
            presence("since", user, "join")
        );
        client.assert_quiet(QUIET).await;
    }
}

#[tokio::test]
async fn join_with_since_replays_at_most_the_replay_cap_newest_messages() {
    let node = NodeProcess::start("n1", &["--replay-cap", "3"]);
    let mut alice = Client::connect(node.http, "alice").await;
    alice.join("capped", None).await;
    for i in 1..=5 {
        alice.say("capped", &format!("m{i}")).await;
    }
    let sent = alice.messages_until("capped", 5).await;
    for since in [0, 1] {
        let mut bob = Client::connect(node.http, "bob").await;
        let reply = bob.join("capped", Some(since)).await;
        assert_eq!(reply["seq"], 5);
        assert_eq!(
            bob.messages_until("capped", 5).await,
            sent[2..].to_vec(),
            "since {since}: the newest 3 messages"
        );
    }
}

#[tokio::test]
async fn leave_replies_left_and_no_message_follows() {
    let node = NodeProcess::start("n1", &[]);
    let mut alice = Client::connect(node.http, "alice").await;
    let mut bob = Client::connect(node.http, "bob").await;
    alice.join("exit", None).await;
    bob.join("exit", None).await;
    assert_eq!(
        next_presence(&mut bob).await,
        presence("exit", "bob", "join")
    );
    let reply = bob
        .request_with_ref(json!({"type": "leave", "room": "exit"}), json!("l"))
        .await;
    assert_eq!(reply, json!({"type": "left", "ref": "l", "room": "exit"}));
    alice.say("exit", "after").await;
    alice.message("exit", 1).await;
    bob.assert_quiet(QUIET).await;

    // Again with an integer ref.
    bob.join("exit", None).await;
    let reply = bob
        .request_with_ref(json!({"type": "leave", "room": "exit"}), json!(12))
        .await;
    assert_eq!(reply, json!({"type": "left", "ref": 12, "room": "exit"}));
}

#[tokio::test]
async fn send_is_acked_with_seqs_from_1_and_every_joined_connection_gets_the_message() {
    let node = NodeProcess::start("n1", &[]);
    let mut alice1 = Client::connect(node.http, "alice").await;
    let mut alice2 = Client::connect(node.http, "alice").await;
    let mut bob1 = Client::connect(node.http, "bob").await;
    let mut bob2 = Client::connect(node.http, "bob").await;
    for client in [&mut alice1, &mut alice2, &mut bob1, &mut bob2] {
        client.join("talk", None).await;
    }
    let send = |text: &str| json!({"type": "send", "room": "talk", "text": text});
    let ack = alice1.request_with_ref(send("one"), json!(3)).await;
    assert_eq!(
        ack,
        json!({"type": "ack", "ref": 3, "room": "talk", "seq": 1})
    );
    let ack = alice1.request_with_ref(send("two"), json!("s")).await;
    assert_eq!(
        ack,
        json!({"type": "ack", "ref": "s", "room": "talk", "seq": 2})
    );
    let ack = bob2.request_with_ref(send("three"), json!(4)).await;
    assert_eq!(
        ack,
        json!({"type": "ack", "ref": 4, "room": "talk", "seq": 3})
    );

    let reference = alice1.messages_until("talk", 3).await;
    assert_eq!(
        reference,
        vec![
            message("talk", 1, "alice", "one", &reference[0]),
            message("talk", 2, "alice", "two", &reference[1]),
            message("talk", 3, "bob", "three", &reference[2]),
        ]
    );
    for client in [&mut alice2, &mut bob1, &mut bob2] {
        assert_eq!(client.messages_until("talk", 3).await, reference);
    }
}

#[tokio::test]
async fn a_retried_send_with_the_same_id_is_stored_once_and_acked_with_the_first_seq() {
    let node = NodeProcess::start("n1", &[]);
    let mut alice = Client::connect(node.http, "alice").await;
    let mut bob = Client::connect(node.http, "bob").await;
    alice.join("retry", None).await;
    bob.join("retry", None).await;
    let send =
        |text: &str, id: &str| json!({"type": "send", "room": "retry", "text": text, "id": id});

    let first = alice.request_with_ref(send("hi", "c-1"), json!(1)).await;
    assert_eq!(
        first,
        json!({"type": "ack", "ref": 1, "room": "retry", "seq": 1})
    );
    let retried = alice.request_with_ref(send("hi", "c-1"), json!(2)).await;
    assert_eq!(
        retried,
        json!({"type": "ack", "ref": 2, "room": "retry", "seq": 1})
    );
    // Ids are per user: bob's "c-1" is another message.
    let other = bob.request_with_ref(send("yo", "c-1"), json!(3)).await;
    assert_eq!(
        other,
        json!({"type": "ack", "ref": 3, "room": "retry", "seq": 2})
    );

    let received = bob.messages_until("retry", 2).await;
    let mut expected = vec![
        message("retry", 1, "alice", "hi", &received[0]),
        message("retry", 2, "bob", "yo", &received[1]),
    ];
    expected[0]["id"] = json!("c-1");
    expected[1]["id"] = json!("c-1");
    assert_eq!(received, expected, "stored once, the id echoed");
    let history = bob
        .request(json!({"type": "history", "room": "retry"}))
        .await;
    assert_eq!(history["messages"], json!(expected));

    // The id is 1 to 64 bytes.
    let longest = "i".repeat(64);
    let ok = alice.request(send("long id", &longest)).await;
    assert_eq!(ok["seq"], 3, "{ok}");
    for bad in [String::new(), "i".repeat(65)] {
        let reply = alice
            .request_with_ref(send("x", &bad), json!("bad-id"))
            .await;
        assert_error(&reply, Some(json!("bad-id")), "bad_request");
    }
}

#[tokio::test]
async fn history_returns_the_newest_messages_before_a_seq_oldest_first() {
    let node = NodeProcess::start("n1", &["--rate-limit", "0"]);
    let mut writer = Client::connect(node.http, "writer").await;
    writer.join("archive", None).await;
    // The reference: every message as the joined writer received it live.
    let mut all = Vec::new();
    for batch in 0..6 {
        let texts: Vec<String> = (1..=100).map(|i| format!("m{}", batch * 100 + i)).collect();
        writer.say_many("archive", &texts[..]).await;
        all.extend(writer.messages_until("archive", (batch + 1) * 100).await);
    }
    assert_eq!(all.len(), 600);
    for (i, m) in all.iter().enumerate() {
        let seq = i as u64 + 1;
        assert_eq!(*m, message("archive", seq, "writer", &format!("m{seq}"), m));
    }
    let seqs = |from: usize, to: usize| json!(all[from - 1..to]);

    // History works without joining.
    let mut reader = Client::connect(node.http, "reader").await;
    let mut history =
        async |request: Value, reference: Value| reader.request_with_ref(request, reference).await;
    let reply = history(json!({"type": "history", "room": "archive"}), json!("h")).await;
    assert_eq!(
        reply,
        json!({"type": "history", "ref": "h", "room": "archive", "messages": seqs(551, 600)}),
        "default: the newest 50 before latest + 1"
    );
    let reply = history(
        json!({"type": "history", "room": "archive", "limit": 1000}),
        json!(4),
    )
    .await;
    assert_eq!(
        reply,
        json!({"type": "history", "ref": 4, "room": "archive", "messages": seqs(101, 600)}),
        "limit is capped at 500"
    );
    let cases = [
        (json!({"before": 10, "limit": 3}), seqs(7, 9)),
        (json!({"before": 2}), seqs(1, 1)),
        (json!({"before": 1}), json!([])),
        (json!({"before": 0}), json!([])),
        (json!({"before": 100_000, "limit": 2}), seqs(599, 600)),
        (json!({"before": 600, "limit": 1}), seqs(599, 599)),
        (json!({"limit": 500, "before": 501}), seqs(1, 500)),
        (json!({"before": 60}), seqs(10, 59)),
    ];
    for (i, (params, expected)) in cases.into_iter().enumerate() {
        let mut request = json!({"type": "history", "room": "archive"});
        for (key, value) in params.as_object().expect("object") {
            request[key] = value.clone();
        }
        let reply = history(request, json!(100 + i)).await;
        assert_eq!(
            reply,
            json!({"type": "history", "ref": 100 + i, "room": "archive", "messages": expected}),
            "{params}"
        );
    }
    let reply = history(json!({"type": "history", "room": "empty"}), json!(9)).await;
    assert_eq!(
        reply,
        json!({"type": "history", "ref": 9, "room": "empty", "messages": []})
    );
}

#[tokio::test]
async fn who_lists_the_joined_users_each_once_sorted() {
    let node = NodeProcess::start("n1", &[]);
    let mut carol = Client::connect(node.http, "carol").await;
    let mut alice1 = Client::connect(node.http, "alice").await;
    let mut alice2 = Client::connect(node.http, "alice").await;
    let mut bob = Client::connect(node.http, "bob").await;
    for client in [&mut carol, &mut alice1, &mut alice2, &mut bob] {
        client.join("who", None).await;
    }
    let who = json!({"type": "who", "room": "who"});
    let reply = carol.request_with_ref(who.clone(), json!("w")).await;
    assert_eq!(
        reply,
        json!({"type": "members", "ref": "w", "room": "who", "users": ["alice", "bob", "carol"]})
    );
    bob.request(json!({"type": "leave", "room": "who"})).await;
    alice2.close().await;
    // The close reaches the room asynchronously: poll.
    let deadline = std::time::Instant::now() + common::TIMEOUT;
    loop {
        let reply = carol.request_with_ref(who.clone(), json!(5)).await;
        if reply == json!({"type": "members", "ref": 5, "room": "who", "users": ["alice", "carol"]})
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "members never became alice, carol: {reply}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let reply = carol
        .request_with_ref(json!({"type": "who", "room": "nobody-here"}), json!(6))
        .await;
    assert_eq!(
        reply,
        json!({"type": "members", "ref": 6, "room": "nobody-here", "users": []})
    );
}

#[tokio::test]
async fn direct_reaches_every_connection_of_the_addressee_and_is_acked_without_room_or_seq() {
    let node = NodeProcess::start("n1", &[]);
    let mut alice1 = Client::connect(node.http, "alice").await;
    let mut alice2 = Client::connect(node.http, "alice").await;
    let mut bob = Client::connect(node.http, "bob").await;
    let before = now_ms();
    let ack = bob
        .request_with_ref(
            json!({"type": "direct", "to": "alice", "text": "psst"}),
            json!(6),
        )
        .await;
    assert_eq!(ack, json!({"type": "ack", "ref": 6}));
    let ack = bob
        .request_with_ref(
            json!({"type": "direct", "to": "alice", "text": "again"}),
            json!("d"),
        )
        .await;
    assert_eq!(ack, json!({"type": "ack", "ref": "d"}));
    let after = now_ms();
    for client in [&mut alice1, &mut alice2] {
        for text in ["psst", "again"] {
            let direct = client.recv_until(|f| f["type"] == "direct").await;
            assert_eq!(
                direct,
                json!({"type": "direct", "from": "bob", "text": text, "ts": direct["ts"]})
            );
            assert_ts_within(&direct["ts"], before, after);
        }
        client.assert_quiet(QUIET).await;
    }
    bob.assert_quiet(QUIET).await;
}

#[tokio::test]
async fn direct_to_a_user_without_connection_gets_offline() {
    let node = NodeProcess::start("n1", &[]);
    let mut bob = Client::connect(node.http, "bob").await;
    let direct = |to: &str| json!({"type": "direct", "to": to, "text": "hello?"});
    let reply = bob.request_with_ref(direct("nobody"), json!("d")).await;
    assert_error(&reply, Some(json!("d")), "offline");
    bob.assert_alive().await;

    // A user whose last connection closed is offline again (the close travels: poll).
    let carol = Client::connect(node.http, "carol").await;
    let reply = bob.request_with_ref(direct("carol"), json!(1)).await;
    assert_eq!(reply, json!({"type": "ack", "ref": 1}));
    carol.close().await;
    let deadline = std::time::Instant::now() + common::TIMEOUT;
    loop {
        let reply = bob.request_with_ref(direct("carol"), json!(2)).await;
        if reply["type"] == "error" {
            assert_error(&reply, Some(json!(2)), "offline");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "carol never went offline: {reply}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn ping_gets_a_pong_echoing_the_ref() {
    let node = NodeProcess::start("n1", &[]);
    let mut alice = Client::connect(node.http, "alice").await;
    let pong = alice
        .request_with_ref(json!({"type": "ping"}), json!(7))
        .await;
    assert_eq!(pong, json!({"type": "pong", "ref": 7}));
    let pong = alice
        .request_with_ref(json!({"type": "ping", "unknown": [1, 2]}), json!("p"))
        .await;
    assert_eq!(
        pong,
        json!({"type": "pong", "ref": "p"}),
        "unknown fields are ignored"
    );
    alice.send(json!({"type": "ping"})).await;
    assert_eq!(
        alice.recv().await,
        json!({"type": "pong"}),
        "no ref, none echoed"
    );
}

// ---- §3: events and errors ----

#[tokio::test]
async fn presence_announces_a_users_first_join_and_last_leave_only() {
    let node = NodeProcess::start("n1", &[]);
    let mut alice = Client::connect(node.http, "alice").await;
    alice.join("here", None).await;
    assert_eq!(
        next_presence(&mut alice).await,
        presence("here", "alice", "join")
    );

    let mut bob1 = Client::connect(node.http, "bob").await;
    let mut bob2 = Client::connect(node.http, "bob").await;
    bob1.join("here", None).await;
    assert_eq!(
        next_presence(&mut alice).await,
        presence("here", "bob", "join")
    );
    bob2.join("here", None).await;
    alice.assert_quiet(QUIET).await; // bob's second connection: no event
    bob1.request(json!({"type": "leave", "room": "here"})).await;
    alice.assert_quiet(QUIET).await; // bob is still there through bob2
    bob2.close().await;
    assert_eq!(
        next_presence(&mut alice).await,
        presence("here", "bob", "leave"),
        "closing the last connection leaves"
    );

    let mut carol = Client::connect(node.http, "carol").await;
    carol.join("here", None).await;
    assert_eq!(
        next_presence(&mut alice).await,
        presence("here", "carol", "join")
    );
    carol
        .request(json!({"type": "leave", "room": "here"}))
        .await;
    assert_eq!(
        next_presence(&mut alice).await,
        presence("here", "carol", "leave"),
        "leaving with the last connection leaves"
    );
    alice.assert_quiet(QUIET).await;
}

#[tokio::test]
async fn malformed_frames_get_bad_request_echoing_any_ref_and_keep_the_connection() {
    let node = NodeProcess::start("n1", &[]);
    let mut alice = Client::connect(node.http, "alice").await;
    let cases: &[(&str, Option<Value>)] = &[
        ("not json", None),
        ("{\"type\":\"ping\"", None),
        ("[1,2,3]", None),
        ("\"ping\"", None),
        ("42", None),
        (r#"{"type":"dance","ref":1}"#, Some(json!(1))),
        (r#"{"ref":"no-type"}"#, Some(json!("no-type"))),
        (r#"{"type":5,"ref":2}"#, Some(json!(2))),
        (r#"{"type":"join","ref":3}"#, Some(json!(3))),
        (r#"{"type":"send","ref":4,"room":"lobby"}"#, Some(json!(4))),
        (
            r#"{"type":"send","ref":5,"room":"lobby","text":5}"#,
            Some(json!(5)),
        ),
        (
            r#"{"type":"join","ref":6,"room":"lobby","since":"x"}"#,
            Some(json!(6)),
        ),
        (
            r#"{"type":"join","ref":7,"room":"lobby","since":-1}"#,
            Some(json!(7)),
        ),
        (
            r#"{"type":"history","ref":8,"room":"lobby","limit":"ten"}"#,
            Some(json!(8)),
        ),
        (
            r#"{"type":"history","ref":9,"room":"lobby","before":1.5}"#,
            Some(json!(9)),
        ),
        (r#"{"type":"direct","ref":10,"text":"x"}"#, Some(json!(10))),
        (
            r#"{"type":"direct","ref":11,"to":["bob"],"text":"x"}"#,
            Some(json!(11)),
        ),
        (r#"{"type":"direct","ref":12,"to":"bob"}"#, Some(json!(12))),
        (r#"{"type":"who","ref":"w","room":7}"#, Some(json!("w"))),
        (r#"{"type":"leave","ref":13}"#, Some(json!(13))),
        // The ref is echoed even when the ref itself is what is wrong.
        (r#"{"type":"ping","ref":{"a":1}}"#, Some(json!({"a": 1}))),
        (r#"{"type":"ping","ref":1.5}"#, Some(json!(1.5))),
        (r#"{"type":"ping","ref":[1]}"#, Some(json!([1]))),
    ];
    for (frame, reference) in cases {
        alice.send_text(frame).await;
        let reply = alice.recv().await;
        assert_error(&reply, reference.clone(), "bad_request");
        alice.assert_alive().await;
    }
}

#[tokio::test]
async fn bad_room_names_get_invalid_room_in_every_request() {
    let node = NodeProcess::start("n1", &[]);
    let mut alice = Client::connect(node.http, "alice").await;
    let too_long = "r".repeat(65);
    let names = ["", too_long.as_str(), "lob by", "lobby!", "lobby/1", "é"];
    for room in names {
        for (i, kind) in ["join", "leave", "send", "history", "who"]
            .into_iter()
            .enumerate()
        {
            let request = json!({"type": kind, "room": room, "text": "hi"});
            let reply = alice.request_with_ref(request, json!(1000 + i)).await;
            assert_error(&reply, Some(json!(1000 + i)), "invalid_room");
            let reference = format!("{kind}-{room}");
            let request = json!({"type": kind, "room": room, "text": "hi"});
            let reply = alice.request_with_ref(request, json!(reference)).await;
            assert_error(&reply, Some(json!(reference)), "invalid_room");
            alice.assert_alive().await;
        }
    }
    // The edges of the rules: 64 characters, every allowed character class.
    for room in ["r".repeat(64), "A-z_0.9:x".to_owned()] {
        alice.join(&room, None).await;
        assert_eq!(alice.say(&room, "fine").await, 1);
    }
}

#[tokio::test]
async fn send_to_a_room_not_joined_gets_not_joined_and_is_not_delivered() {
    let node = NodeProcess::start("n1", &[]);
    let mut alice = Client::connect(node.http, "alice").await;
    let mut bob = Client::connect(node.http, "bob").await;
    bob.join("closed", None).await;
    assert_eq!(
        next_presence(&mut bob).await,
        presence("closed", "bob", "join")
    );
    let send = json!({"type": "send", "room": "closed", "text": "let me in"});
    let reply = alice.request_with_ref(send.clone(), json!(5)).await;
    assert_error(&reply, Some(json!(5)), "not_joined");
    alice.assert_alive().await;

    // Joined once and left: not joined any more.
    alice.join("closed", None).await;
    alice
        .request(json!({"type": "leave", "room": "closed"}))
        .await;
    let reply = alice.request_with_ref(send, json!("n")).await;
    assert_error(&reply, Some(json!("n")), "not_joined");
    alice.assert_alive().await;
    assert_eq!(
        next_presence(&mut bob).await,
        presence("closed", "alice", "join")
    );
    assert_eq!(
        next_presence(&mut bob).await,
        presence("closed", "alice", "leave")
    );
    bob.assert_quiet(QUIET).await;
}

#[tokio::test]
async fn text_over_max_text_bytes_gets_too_large_in_send_and_direct() {
    let node = NodeProcess::start("n1", &[]);
    let mut alice = Client::connect(node.http, "alice").await;
    let mut bob = Client::connect(node.http, "bob").await;
    alice.join("big", None).await;
    bob.join("big", None).await;
    let fits = "a".repeat(4096);
    let over = "a".repeat(4097);
    // Bytes, not characters: 2048 two-byte characters fit, 2049 do not.
    let fits_utf8 = "é".repeat(2048);
    let over_utf8 = "é".repeat(2049);

    assert_eq!(alice.say("big", &fits).await, 1);
    assert_eq!(alice.say("big", &fits_utf8).await, 2);
    for (i, text) in [&over, &over_utf8].into_iter().enumerate() {
        let send = json!({"type": "send", "room": "big", "text": text});
        let reply = alice.request_with_ref(send, json!(i)).await;
        assert_error(&reply, Some(json!(i)), "too_large");
        let direct = json!({"type": "direct", "to": "bob", "text": text});
        let reply = alice.request_with_ref(direct, json!(format!("d{i}"))).await;
        assert_error(&reply, Some(json!(format!("d{i}"))), "too_large");
        alice.assert_alive().await;
    }
    let ack = alice
        .request_with_ref(
            json!({"type": "direct", "to": "bob", "text": fits}),
            json!(9),
        )
        .await;
    assert_eq!(ack, json!({"type": "ack", "ref": 9}));

    let received = bob.messages_until("big", 2).await;
    assert_eq!(
        received,
        vec![
            message("big", 1, "alice", &fits, &received[0]),
            message("big", 2, "alice", &fits_utf8, &received[1]),
        ]
    );
    let direct = bob.recv_until(|f| f["type"] == "direct").await;
    assert_eq!(direct["text"], json!(fits));
    assert_eq!(
        next_presence(&mut bob).await,
        presence("big", "bob", "join")
    );
    bob.assert_quiet(QUIET).await;
}

#[tokio::test]
async fn binary_frame_gets_bad_request_and_the_connection_stays_open() {
    let node = NodeProcess::start("n1", &[]);
    let mut alice = Client::connect(node.http, "alice").await;
    alice
        .send_message(Message::Binary(vec![0x7b, 0x7d].into()))
        .await
        .expect("send binary");
    let reply = alice.recv().await;
    assert_error(&reply, None, "bad_request");
    alice.assert_alive().await;
    alice.join("still-here", None).await;
}

// ---- §5: HTTP endpoints ----

#[tokio::test]
async fn the_web_client_is_served_at_root() {
    let node = NodeProcess::start("n1", &[]);
    let page = http_request(node.http, "/").await;
    assert_eq!(page.status, 200);
    assert!(
        page.header("content-type")
            .is_some_and(|t| t.starts_with("text/html")),
        "{:?}",
        page.headers
    );
    for needle in ["<html", "app.js", "style.css"] {
        assert!(page.body.contains(needle), "no {needle} in {}", page.body);
    }
    for (path, content_type) in [("/app.js", "text/javascript"), ("/style.css", "text/css")] {
        let asset = http_request(node.http, path).await;
        assert_eq!(asset.status, 200, "{path}");
        assert!(
            asset
                .header("content-type")
                .is_some_and(|t| t.starts_with(content_type)),
            "{path}: {:?}",
            asset.headers
        );
        assert!(!asset.body.is_empty(), "{path}");
    }
    assert!(
        http_request(node.http, "/app.js")
            .await
            .body
            .contains("WebSocket"),
        "the app speaks WebSocket"
    );
}

#[tokio::test]
async fn healthz_answers_ok_with_the_node_and_its_member_count() {
    let node = NodeProcess::start("n1", &[]);
    let health = http_request(node.http, "/healthz").await;
    assert_eq!(health.status, 200);
    assert_eq!(
        health.json(),
        json!({"status": "ok", "node": "n1", "members": 1})
    );
}

#[tokio::test]
async fn cluster_lists_this_node_as_its_only_member_up() {
    let node = NodeProcess::start("n1", &[]);
    let cluster = http_request(node.http, "/cluster").await;
    assert_eq!(cluster.status, 200);
    let body = cluster.json();
    let addr = &body["members"][0]["addr"];
    assert!(
        addr.as_str().is_some_and(|a| !a.is_empty()),
        "addr is a non-empty string: {body}"
    );
    assert_eq!(
        body,
        json!({
            "node": "n1",
            "members": [{"name": "n1", "addr": addr, "status": "up"}],
            "quorum": true,
        })
    );
    let placement = http_request(node.http, "/cluster/rooms/lobby").await;
    assert_eq!(placement.status, 200);
    assert_eq!(
        placement.json(),
        json!({"room": "lobby", "owner": "n1", "replicas": []})
    );
}

#[tokio::test]
async fn unknown_paths_get_404() {
    let node = NodeProcess::start("n1", &[]);
    for path in ["/nope", "/ws/extra", "/healthz/x", "/cluster/rooms"] {
        assert_eq!(http_request(node.http, path).await.status, 404, "{path}");
    }
}

#[tokio::test]
async fn metrics_expose_the_documented_series_and_count_what_happens() {
    let node = NodeProcess::start("n1", &[]);
    let text = metrics_text(node.http).await;
    for (series, value) in [
        ("chat_connections", 0.0),
        ("chat_rooms_hosted", 0.0),
        ("chat_messages_in_total", 0.0),
        ("chat_messages_out_total", 0.0),
        ("chat_send_ack_seconds_count", 0.0),
        (r#"chat_errors_total{code="bad_request"}"#, 0.0),
        (r#"chat_errors_total{code="not_joined"}"#, 0.0),
    ] {
        assert_eq!(metric(&text, series), Some(value), "{series} in:\n{text}");
    }
    assert!(
        text.contains("# TYPE chat_send_ack_seconds histogram"),
        "{text}"
    );

    let mut alice = Client::connect(node.http, "alice").await;
    let mut bob = Client::connect(node.http, "bob").await;
    wait_metric(node.http, "chat_connections", |v| v == 2.0).await;
    alice.join("metered", None).await;
    wait_metric(node.http, "chat_rooms_hosted", |v| v == 1.0).await;
    alice.say("metered", "hi").await;
    alice.send_text("nonsense").await;
    assert_error(
        &alice.recv_until(|f| f["type"] == "error").await,
        None,
        "bad_request",
    );
    let text = metrics_text(node.http).await;
    assert_eq!(metric(&text, "chat_messages_in_total"), Some(3.0), "{text}");
    assert_eq!(
        metric(&text, "chat_send_ack_seconds_count"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, r#"chat_send_ack_seconds_bucket{le="+Inf"}"#),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, r#"chat_errors_total{code="bad_request"}"#),
        Some(1.0),
        "{text}"
    );
    // Out: two welcomes, joined, presence, ack, message, error.
    wait_metric(node.http, "chat_messages_out_total", |v| v >= 7.0).await;
    bob.assert_alive().await;
    drop(bob);
    wait_metric(node.http, "chat_connections", |v| v == 1.0).await;
}
