//! The whole client protocol against one real node (PROTOCOL.md §1–3, §5).

mod common;

use common::{Client, NodeProcess};
use serde_json::json;

#[tokio::test]
async fn a_message_reaches_every_member_with_its_ack() {
    let node = NodeProcess::start("n1", &[]);
    let mut alice = Client::connect(node.http, "alice").await;
    let mut bob = Client::connect(node.http, "bob").await;
    assert_eq!(alice.welcome["node"], "n1");
    assert_eq!(alice.welcome["user"], "alice");
    alice.join("lobby", None).await;
    bob.join("lobby", None).await;
    let seq = alice.say("lobby", "hi").await;
    assert_eq!(seq, 1);
    for client in [&mut alice, &mut bob] {
        let m = client.message("lobby", 1).await;
        assert_eq!(
            m,
            json!({"type":"message","room":"lobby","seq":1,"from":"alice","text":"hi","ts":m["ts"]})
        );
    }
}
