//! Client authentication with `--auth-secret`: HS256 tokens whose `sub` is the user
//! (PROTOCOL.md §1).

mod common;

use common::{Client, NodeProcess, jwt, now_secs, upgrade_status};
use serde_json::{Value, json};

const SECRET: &str = "s3cret";

fn header() -> Value {
    json!({"alg": "HS256", "typ": "JWT"})
}

fn claims(sub: &str, exp: u64) -> Value {
    json!({"sub": sub, "exp": exp})
}

#[tokio::test]
async fn a_valid_token_makes_its_subject_the_user() {
    let node = NodeProcess::start("n1", &["--auth-secret", SECRET]);
    let token = jwt(SECRET, &header(), &claims("alice", now_secs() + 3600));
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
}

#[tokio::test]
async fn missing_forged_expired_or_unsigned_tokens_get_401() {
    let node = NodeProcess::start("n1", &["--auth-secret", SECRET]);
    let later = now_secs() + 3600;
    let forged = jwt("not-the-secret", &header(), &claims("alice", later));
    let expired = jwt(SECRET, &header(), &claims("alice", now_secs() - 3600));
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
        let genuine = jwt(SECRET, &header(), &claims("alice", later));
        let mallory = jwt(SECRET, &header(), &claims("mallory", later));
        let parts: Vec<&str> = genuine.split('.').collect();
        let payload = mallory.split('.').nth(1).expect("payload");
        format!("{}.{payload}.{}", parts[0], parts[2])
    };
    let cases = [
        ("missing", "/ws?user=alice".to_owned()),
        ("forged", format!("/ws?user=alice&token={forged}")),
        ("expired", format!("/ws?user=alice&token={expired}")),
        ("alg none", format!("/ws?user=alice&token={unsigned}")),
        (
            "alg none, signed",
            format!("/ws?user=alice&token={none_signed}"),
        ),
        ("tampered", format!("/ws?user=alice&token={tampered}")),
        ("garbage", "/ws?user=alice&token=not.a.jwt".to_owned()),
    ];
    for (what, path) in cases {
        assert_eq!(upgrade_status(node.http, &path).await, 401, "{what}");
    }
    let good = jwt(SECRET, &header(), &claims("alice", later));
    let path = format!("/ws?token={good}");
    assert_eq!(upgrade_status(node.http, &path).await, 101, "the control");
}
