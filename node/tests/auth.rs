//! Client authentication with `--auth-secret`: HS256 tokens whose `sub` is the user, given in
//! the URL, in the `Sec-WebSocket-Protocol` header or as the first frame; connections closed
//! when their token expires unless refreshed (PROTOCOL.md §1, §2).

#![allow(clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::{Client, NodeProcess, Polled, jwt, now_ms, now_secs, upgrade_status};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

const SECRET: &str = "s3cret";
/// The node's tolerance for clock skew on `exp` (`auth::LEEWAY_SECS`).
const LEEWAY_SECS: u64 = 5;

fn header() -> Value {
    json!({"alg": "HS256", "typ": "JWT"})
}

fn claims(sub: &str, exp: u64) -> Value {
    json!({"sub": sub, "exp": exp})
}

fn token(sub: &str, exp: u64) -> String {
    jwt(SECRET, &header(), &claims(sub, exp))
}

/// A genuine HS384 token (signed with SHA-384), which the node must refuse all the same.
fn hs384(claims: &Value) -> String {
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use hmac::{Hmac, KeyInit, Mac};
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(json!({"alg": "HS384", "typ": "JWT"}).to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let mut mac = Hmac::<sha2::Sha384>::new_from_slice(SECRET.as_bytes()).expect("hmac key");
    mac.update(input.as_bytes());
    let signature = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    format!("{input}.{signature}")
}

/// The HTTP status of an upgrade offering `chat` and `token.<token>` as subprotocols.
async fn header_status(node: &NodeProcess, token: &str) -> u16 {
    use tokio_tungstenite::tungstenite::Error;
    let url = format!("ws://{}/ws", node.http);
    match Client::open_with_subprotocols(&url, &format!("chat, token.{token}")).await {
        Ok(_) => 101,
        Err(Error::Http(response)) => response.status().as_u16(),
        Err(e) => panic!("upgrade failed without an HTTP answer: {e}"),
    }
}

/// Connects with the token in the `Sec-WebSocket-Protocol` header and reads the welcome.
async fn connect_with_header(node: &NodeProcess, token: &str) -> Client {
    let url = format!("ws://{}/ws", node.http);
    let ws = Client::open_with_subprotocols(&url, &format!("chat, token.{token}"))
        .await
        .expect("upgrade");
    let mut client = Client::unwelcomed(ws);
    client.welcome = client.recv().await;
    assert_eq!(client.welcome["type"], "welcome");
    client
}

/// Opens a connection without any token (the first frame must then authenticate it).
async fn open_without_token(node: &NodeProcess) -> Client {
    let url = format!("ws://{}/ws?user=alice", node.http);
    let (ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("a request without a token is upgraded");
    Client::unwelcomed(ws)
}

/// Asserts the node closed the connection with 1008 and `reason`; when, in Unix milliseconds.
async fn assert_closed_1008(client: &mut Client, reason: &str, wait: Duration) -> u64 {
    let frame = client
        .closed_within(wait)
        .await
        .unwrap_or_else(|| panic!("not closed within {wait:?}"))
        .expect("a close frame");
    let at = now_ms();
    assert_eq!(frame.code, CloseCode::Policy, "{frame:?}");
    assert!(frame.reason.contains(reason), "{frame:?}");
    at
}

#[tokio::test]
async fn a_valid_token_makes_its_subject_the_user() {
    let node = NodeProcess::start("n1", &["--auth-secret", SECRET]);
    let token = token("alice", now_secs() + 3600);
    for query in [
        format!("user=mallory&token={token}"),
        format!("token={token}&user=alice"),
        format!("token={token}"),
    ] {
        let url = format!("ws://{}/ws?{query}", node.http);
        let mut client = Client::connect_url(&url).await.expect("upgrade");
        assert_eq!(
            client.welcome,
            json!({"type": "welcome", "node": "n1", "user": "alice", "session": client.welcome["session"]}),
            "{query}"
        );
        client.join("lobby", None).await;
        client.say("lobby", "signed").await;
        let m = client.recv_until(|f| f["type"] == "message").await;
        assert_eq!(
            m["from"], "alice",
            "{query}: messages are from the token's user"
        );
    }
    let mut client = connect_with_header(&node, &token).await;
    assert_eq!(client.welcome["user"], "alice", "token in the header");
    client.assert_alive().await;
}

#[tokio::test]
async fn bad_tokens_get_401_before_the_upgrade_in_the_url_and_in_the_header() {
    let node = NodeProcess::start("n1", &["--auth-secret", SECRET]);
    let later = now_secs() + 3600;
    let forged = jwt("not-the-secret", &header(), &claims("alice", later));
    let expired = token("alice", now_secs() - 3600);
    let unsigned = {
        let signed = jwt(
            SECRET,
            &json!({"alg": "none", "typ": "JWT"}),
            &claims("alice", later),
        );
        let (unsigned, _signature) = signed.rsplit_once('.').expect("three parts");
        format!("{unsigned}.")
    };
    let none_signed = jwt(
        SECRET,
        &json!({"alg": "none", "typ": "JWT"}),
        &claims("alice", later),
    );
    // Alice's genuine token with the payload swapped for mallory's.
    let tampered = {
        let genuine = token("alice", later);
        let mallory = token("mallory", later);
        let parts: Vec<&str> = genuine.split('.').collect();
        let payload = mallory.split('.').nth(1).expect("payload");
        format!("{}.{payload}.{}", parts[0], parts[2])
    };
    let not_yet_valid = jwt(
        SECRET,
        &header(),
        &json!({"sub": "alice", "exp": later, "nbf": now_secs() + 600}),
    );
    let no_exp = jwt(SECRET, &header(), &json!({"sub": "alice"}));
    let junk = "A".repeat(8 << 10);
    let dotted_junk = format!("{0}.{0}.{0}", "x".repeat((8 << 10) / 3));
    let cases = [
        ("forged (wrong secret)", forged),
        ("expired", expired),
        ("alg none", unsigned),
        ("alg none, signed", none_signed),
        ("HS384", hs384(&claims("alice", later))),
        ("tampered", tampered),
        ("nbf in the future", not_yet_valid),
        ("bad sub", token("bad name", later)),
        ("empty sub", token("", later)),
        ("no exp", no_exp),
        ("garbage", "not.a.jwt".to_owned()),
        ("8 KB of junk", junk),
        ("8 KB of dotted junk", dotted_junk),
    ];
    for (what, token) in &cases {
        let path = format!("/ws?user=alice&token={token}");
        let status = upgrade_status(node.http, &path).await;
        assert!(
            status == 401 || status == 400,
            "{what} in the URL: {status}"
        );
        let status = header_status(&node, token).await;
        assert!(
            status == 401 || status == 400,
            "{what} in the header: {status}"
        );
    }
    let good = token("alice", later);
    let path = format!("/ws?token={good}");
    assert_eq!(upgrade_status(node.http, &path).await, 101, "the control");
    assert_eq!(header_status(&node, &good).await, 101, "the control");
}

#[tokio::test]
async fn a_connection_is_closed_when_its_token_expires_and_bad_refreshes_change_nothing() {
    let node = NodeProcess::start("n1", &["--auth-secret", SECRET]);
    let exp = now_secs() + 2;
    let mut client = connect_with_header(&node, &token("alice", exp)).await;
    client.join("lobby", None).await;
    // A refresh for another user, a forged one and an expired one are refused; the connection
    // stays, with its old expiry.
    let later = now_secs() + 3600;
    for (what, bad) in [
        ("another sub", token("mallory", later)),
        ("forged", jwt("other", &header(), &claims("alice", later))),
        ("expired", token("alice", now_secs() - 3600)),
    ] {
        let reply = client
            .request(json!({"type": "refresh", "token": bad}))
            .await;
        assert_eq!(reply["type"], "error", "{what}: {reply}");
        assert_eq!(reply["code"], "unauthorized", "{what}: {reply}");
    }
    client.assert_alive().await;
    let closed_at = assert_closed_1008(&mut client, "token expired", Duration::from_secs(15)).await;
    let after_exp_ms = closed_at as i64 - (exp * 1000) as i64;
    eprintln!("connection closed {after_exp_ms} ms after exp (leeway {LEEWAY_SECS} s)");
    assert!(
        after_exp_ms >= (LEEWAY_SECS * 1000) as i64 - 100,
        "closed {after_exp_ms} ms after exp: before the leeway"
    );
    assert!(
        after_exp_ms <= (LEEWAY_SECS * 1000 + 2000) as i64,
        "closed {after_exp_ms} ms after exp"
    );
}

#[tokio::test]
async fn a_refreshed_connection_stays_open_past_its_first_expiry() {
    let node = NodeProcess::start("n1", &["--auth-secret", SECRET]);
    let exp = now_secs() + 2;
    let url = format!("ws://{}/ws?token={}", node.http, token("alice", exp));
    let mut client = Client::connect_url(&url).await.expect("upgrade");
    let fresh = now_secs() + 3600;
    let reply = client
        .request_with_ref(
            json!({"type": "refresh", "token": token("alice", fresh)}),
            json!(1),
        )
        .await;
    assert_eq!(reply, json!({"type": "refreshed", "ref": 1, "exp": fresh}));
    let deadline = Instant::now() + Duration::from_secs(LEEWAY_SECS + 4);
    while Instant::now() < deadline {
        match client.poll_frame(Duration::from_millis(500)).await {
            Polled::Closed => panic!("closed although refreshed"),
            Polled::Frame(f) => panic!("unexpected frame {f}"),
            Polled::Quiet => {}
        }
    }
    client.assert_alive().await;
}

#[tokio::test]
async fn a_connection_without_a_token_must_authenticate_with_its_first_frame() {
    let node = NodeProcess::start("n1", &["--auth-secret", SECRET]);
    let later = now_secs() + 3600;

    // The `auth` frame: the welcome follows, for the token's user.
    let mut client = open_without_token(&node).await;
    client
        .send(json!({"type": "auth", "token": token("bob", later)}))
        .await;
    let welcome = client.recv().await;
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    assert_eq!(welcome["user"], "bob", "{welcome}");
    client.assert_alive().await;
    // Once authenticated, `auth` is not a way to change the token.
    let reply = client
        .request(json!({"type": "auth", "token": token("bob", later)}))
        .await;
    assert_eq!(reply["code"], "bad_request", "{reply}");

    // Any other request first: closed, nothing served.
    let mut client = open_without_token(&node).await;
    client.send(json!({"type": "ping", "ref": 1})).await;
    assert_closed_1008(
        &mut client,
        "first frame must be `auth`",
        Duration::from_secs(3),
    )
    .await;
    assert!(client.backlog.is_empty(), "served: {:?}", client.backlog);

    // A bad token in the frame: closed with the reason.
    let mut client = open_without_token(&node).await;
    client
        .send(json!({"type": "auth", "token": token("bob", now_secs() - 3600)}))
        .await;
    assert_closed_1008(&mut client, "token expired", Duration::from_secs(3)).await;

    // Nothing at all: closed after the deadline (5 s).
    let mut client = open_without_token(&node).await;
    let opened = Instant::now();
    assert_closed_1008(&mut client, "no `auth` frame", Duration::from_secs(10)).await;
    let waited = opened.elapsed();
    assert!(
        waited >= Duration::from_secs(4) && waited < Duration::from_secs(8),
        "closed after {waited:?}"
    );
}

#[tokio::test]
async fn without_a_secret_refresh_is_answered_without_expiry() {
    let node = NodeProcess::start("n1", &[]);
    let mut client = Client::connect(node.http, "alice").await;
    let reply = client
        .request_with_ref(json!({"type": "refresh", "token": "anything"}), json!("r"))
        .await;
    assert_eq!(reply, json!({"type": "refreshed", "ref": "r"}));
}
