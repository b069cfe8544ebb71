//! The restart policy, tested in process (it needs the node's internals to inject failures):
//! `rooms::host` for rooms, `gateway::sessions` for sessions, `supervisor` for the hub and the
//! cluster-mode actors.
//!
//! ractor's registries are process-wide, so only one in-process node runs at a time: every test
//! holds [`SERIAL`] while its node runs, and shuts the node down before releasing it.

mod common;

use std::time::{Duration, Instant};

use chat_node::gateway::session::SessionMessage;
use chat_node::settings::Settings;
use chat_node::{NodeHandle, start_node};
use chat_protocol::RoomId;
use common::{Client, TIMEOUT, assert_error, metric, metrics_text, wait_metric};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

/// One in-process node at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Rooms that became active (first start or restart).
const ROOMS_WON: &str = r#"chat_room_claims_total{kind="won"}"#;

/// How long a test waits to prove that nothing happens.
const QUIET: Duration = Duration::from_millis(500);

/// Starts a single node in this process, with a fresh data directory.
async fn start() -> (NodeHandle, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("temp dir: {e}"));
    let mut settings = Settings::single_node();
    settings.data_dir = dir.path().join("n1");
    // Requests lost with a crashed actor get `unavailable` after this long.
    settings.request_timeout_ms = 1_000;
    let node = start_node(settings)
        .await
        .unwrap_or_else(|e| panic!("the node does not start: {e:#}"));
    (node, dir)
}

fn room(name: &str) -> RoomId {
    RoomId::new(name).unwrap_or_else(|e| panic!("{name}: {e}"))
}

async fn metric_now(node: &NodeHandle, series: &str) -> f64 {
    let text = metrics_text(node.http_addr()).await;
    metric(&text, series).unwrap_or_else(|| panic!("no {series} in:\n{text}"))
}

/// Polls `who` until the room's members are `users`.
async fn wait_members(client: &mut Client, room: &str, users: &[&str]) {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let reply = client.request(json!({"type": "who", "room": room})).await;
        if reply["users"] == json!(users) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "members of {room} never became {users:?}: {reply}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends with a client message id until it is acked, retrying on `unavailable`; the seq.
async fn send_until_acked(client: &mut Client, room: &str, text: &str, id: &str) -> u64 {
    client
        .send_until_acked(room, text, id, Instant::now() + TIMEOUT)
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_room_restarts_with_its_log_and_members_while_other_rooms_go_on() {
    let _serial = SERIAL.lock().await;
    let (node, _dir) = start().await;
    let addr = node.http_addr();
    let mut alice = Client::connect(addr, "alice").await;
    let mut bob = Client::connect(addr, "bob").await;
    let mut carol = Client::connect(addr, "carol").await;
    alice.join("crashy", None).await;
    bob.join("crashy", None).await;
    carol.join("calm", None).await;
    assert_eq!(alice.say("crashy", "m1").await, 1);
    assert_eq!(alice.say("crashy", "m2").await, 2);
    let before = bob.messages_until("crashy", 2).await;
    assert_eq!(alice.messages_until("crashy", 2).await, before);
    assert_eq!(carol.say("calm", "c1").await, 1);
    let won = wait_metric(addr, ROOMS_WON, |v| v >= 2.0).await;

    node.crash_room(&room("crashy"));
    // The other room is served throughout.
    assert_eq!(carol.say("calm", "c2").await, 2);
    // A send racing the crash gets its ack or `unavailable`, never silence; its retry with the
    // same id is stored once.
    let seq = send_until_acked(&mut alice, "crashy", "m3", "m3").await;
    assert_eq!(seq, 3, "the sequence continues after the restart");
    assert_eq!(
        metric_now(&node, ROOMS_WON).await,
        won + 1.0,
        "restarted once"
    );
    assert_eq!(carol.say("calm", "c3").await, 3);

    // The members are still members: they receive new messages and `who` lists them.
    wait_members(&mut carol, "crashy", &["alice", "bob"]).await;
    assert_eq!(alice.say("crashy", "m4").await, 4);
    for client in [&mut alice, &mut bob] {
        let received = client.messages_until("crashy", 4).await;
        let seqs: Vec<&Value> = received.iter().map(|m| &m["seq"]).collect();
        assert_eq!(seqs, [&json!(3), &json!(4)], "in order, once each");
    }
    let history = carol
        .request(json!({"type": "history", "room": "crashy"}))
        .await;
    let messages = history["messages"].as_array().expect("messages");
    assert_eq!(messages[..2], before[..], "the log is intact");
    let texts: Vec<&Value> = messages.iter().map(|m| &m["text"]).collect();
    assert_eq!(
        texts,
        [&json!("m1"), &json!("m2"), &json!("m3"), &json!("m4")]
    );
    carol.messages_until("calm", 3).await;
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_that_fails_more_than_three_times_in_30s_is_restarted_by_the_next_request() {
    let _serial = SERIAL.lock().await;
    let (node, _dir) = start().await;
    let addr = node.http_addr();
    let mut alice = Client::connect(addr, "alice").await;
    alice.join("fragile", None).await;
    assert_eq!(alice.say("fragile", "m1").await, 1);
    let mut won = wait_metric(addr, ROOMS_WON, |v| v >= 1.0).await;
    for _ in 0..3 {
        node.crash_room(&room("fragile"));
        // Restarted at once, with no request asking for it.
        won = wait_metric(addr, ROOMS_WON, |v| v > won).await;
    }
    node.crash_room(&room("fragile"));
    tokio::time::sleep(QUIET).await;
    assert_eq!(
        metric_now(&node, ROOMS_WON).await,
        won,
        "the fourth failure within the window is not restarted at once"
    );
    let seq = send_until_acked(&mut alice, "fragile", "m2", "m2").await;
    assert_eq!(seq, 2);
    assert_eq!(alice.message("fragile", 2).await["text"], "m2");
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_room_is_counted_once_in_rooms_hosted() {
    let _serial = SERIAL.lock().await;
    let (node, _dir) = start().await;
    let addr = node.http_addr();
    let mut alice = Client::connect(addr, "alice").await;
    alice.join("crashy", None).await;
    alice.join("calm", None).await;
    wait_metric(addr, "chat_rooms_hosted", |v| v == 2.0).await;
    let won = wait_metric(addr, ROOMS_WON, |v| v >= 2.0).await;
    node.crash_room(&room("crashy"));
    wait_metric(addr, ROOMS_WON, |v| v > won).await;
    assert_eq!(send_until_acked(&mut alice, "crashy", "hi", "hi").await, 1);
    assert_eq!(
        metric_now(&node, "chat_rooms_hosted").await,
        2.0,
        "two rooms run: the crashed one was replaced, not added"
    );
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_session_closes_only_its_connection_with_1011() {
    let _serial = SERIAL.lock().await;
    let (node, _dir) = start().await;
    let addr = node.http_addr();
    let sessions = node.sessions().expect("sessions supervisor");
    let mut alice = Client::connect(addr, "alice").await;
    let alice_session = {
        let children = sessions.get_children();
        assert_eq!(children.len(), 1, "alice's session only");
        children[0].clone()
    };
    let mut bob = Client::connect(addr, "bob").await;
    alice.join("lobby", None).await;
    bob.join("lobby", None).await;
    assert_eq!(alice.say("lobby", "m1").await, 1);
    bob.message("lobby", 1).await;

    // There is no NodeHandle hook for sessions: the supervisor's child is told directly.
    alice_session
        .send_message(SessionMessage::Crash)
        .expect("session running");
    let close = alice.closed().await.expect("a close frame");
    assert_eq!(close.code, CloseCode::Error, "{close:?}");
    assert_eq!(u16::from(close.code), 1011);

    // Nobody else is touched; alice is gone everywhere.
    bob.assert_alive().await;
    let leave = bob
        .recv_until(|f| f["type"] == "presence" && f["user"] == "alice" && f["event"] == "leave")
        .await;
    assert_eq!(
        leave,
        json!({"type": "presence", "room": "lobby", "user": "alice", "event": "leave"})
    );
    wait_members(&mut bob, "lobby", &["bob"]).await;
    let reply = bob
        .request_with_ref(
            json!({"type": "direct", "to": "alice", "text": "there?"}),
            json!("d"),
        )
        .await;
    assert_error(&reply, Some(json!("d")), "offline");
    assert_eq!(bob.say("lobby", "m2").await, 2);
    wait_metric(addr, "chat_connections", |v| v == 1.0).await;
    assert_eq!(
        sessions.get_children().len(),
        1,
        "the session is not restarted"
    );

    // Alice reconnects and resumes with `since`, losing nothing.
    let mut alice = Client::connect(addr, "alice").await;
    alice.join("lobby", Some(1)).await;
    assert_eq!(alice.message("lobby", 2).await["text"], "m2");
    node.shutdown().await;
}

/// Crashes the hub and waits until every connection in `clients` is closed (1011, or ended).
async fn crash_hub(node: &NodeHandle, clients: Vec<Client>) {
    node.crash_hub();
    for mut client in clients {
        if let Some(close) = client.closed().await {
            assert_eq!(close.code, CloseCode::Error, "{close:?}");
        }
    }
}

/// Connects `user` once the restarted hub serves: retries while connections get closed.
async fn connect_after_hub_restart(node: &NodeHandle, user: &str) -> Client {
    let url = format!("ws://{}/ws?user={user}", node.http_addr());
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Ok(mut client) = Client::connect_url(&url).await {
            client.send(json!({"type": "ping", "ref": "up?"})).await;
            if client.next_or_closed().await == Some(json!({"type": "pong", "ref": "up?"})) {
                return client;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no connection served after the hub restart"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_hub_closes_every_connection_and_new_ones_are_served() {
    let _serial = SERIAL.lock().await;
    let (node, _dir) = start().await;
    let addr = node.http_addr();
    let mut alice = Client::connect(addr, "alice").await;
    let mut bob = Client::connect(addr, "bob").await;
    alice.join("lobby", None).await;
    bob.join("lobby", None).await;
    assert_eq!(alice.say("lobby", "m1").await, 1);

    crash_hub(&node, vec![alice, bob]).await;
    wait_metric(addr, "chat_connections", |v| v == 0.0).await;

    let mut carol = connect_after_hub_restart(&node, "carol").await;
    let mut dave = connect_after_hub_restart(&node, "dave").await;
    let joined = carol.join("lobby", Some(0)).await;
    assert_eq!(joined["seq"], 1);
    assert_eq!(carol.message("lobby", 1).await["text"], "m1");
    dave.join("lobby", None).await;
    assert_eq!(carol.say("lobby", "m2").await, 2);
    for client in [&mut carol, &mut dave] {
        assert_eq!(client.message("lobby", 2).await["text"], "m2");
    }
    let ack = dave
        .request_with_ref(
            json!({"type": "direct", "to": "carol", "text": "psst"}),
            json!(1),
        )
        .await;
    assert_eq!(ack, json!({"type": "ack", "ref": 1}));
    assert_eq!(
        carol.recv_until(|f| f["type"] == "direct").await["text"],
        "psst"
    );
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_hub_crash_the_users_of_the_closed_connections_are_gone() {
    let _serial = SERIAL.lock().await;
    let (node, _dir) = start().await;
    let addr = node.http_addr();
    let mut alice = Client::connect(addr, "alice").await;
    let mut bob = Client::connect(addr, "bob").await;
    alice.join("lobby", None).await;
    bob.join("lobby", None).await;

    crash_hub(&node, vec![alice, bob]).await;
    let mut carol = connect_after_hub_restart(&node, "carol").await;
    carol.join("lobby", None).await;
    // Nobody but carol is connected: `who` and `direct` must say so.
    let who = carol.request(json!({"type": "who", "room": "lobby"})).await;
    let direct = carol
        .request_with_ref(
            json!({"type": "direct", "to": "alice", "text": "there?"}),
            json!("d"),
        )
        .await;
    node.shutdown().await;
    assert_eq!(
        (&who["users"], &direct["code"]),
        (&json!(["carol"]), &json!("offline")),
        "who: {who}; direct to alice: {direct}"
    );
    assert_error(&direct, Some(json!("d")), "offline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_cluster_supervisor_is_restarted_with_its_actors_and_the_node_serves_again() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("temp dir: {e}"));
    let mut settings = Settings::single_node();
    settings.data_dir = dir.path().join("c1");
    settings.cluster_listen = Some("127.0.0.1:0".into());
    settings.cookie = Some("restart-policy-cookie".into());
    let node = start_node(settings)
        .await
        .unwrap_or_else(|e| panic!("the node does not start: {e:#}"));
    let addr = node.http_addr();
    // A one-node cluster with no seeds forms alone.
    wait_metric(addr, "chat_quorum", |v| v == 1.0).await;
    let mut alice = Client::connect(addr, "alice").await;
    alice.join("lobby", None).await;
    assert_eq!(send_until_acked(&mut alice, "lobby", "m1", "m1").await, 1);

    node.crash_cluster();
    wait_metric(addr, r#"chat_actor_restarts_total{kind="cluster"}"#, |v| {
        v == 1.0
    })
    .await;
    // The restarted membership publishes a view with quorum again, and rooms keep serving.
    wait_metric(addr, "chat_quorum", |v| v == 1.0).await;
    assert_eq!(send_until_acked(&mut alice, "lobby", "m2", "m2").await, 2);
    let text = metrics_text(addr).await;
    for other in ["hub", "host", "keeper", "directory", "sessions"] {
        let series = format!(r#"chat_actor_restarts_total{{kind="{other}"}}"#);
        assert_eq!(
            metric(&text, &series).unwrap_or(0.0),
            0.0,
            "only the cluster subtree restarted:\n{text}"
        );
    }
    node.shutdown().await;
}
