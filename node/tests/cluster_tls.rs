//! Node-to-node mutual TLS on real processes: certificates made by `deploy/make-certs`, three
//! nodes that chat across each other, nodes holding certificates of another CA that never get
//! in, and a packet capture (tcpdump, as root) showing that chat text crosses the node links
//! encrypted, and in clear without TLS.

// The helpers below run inside tests: a failed expectation is a failed test.
#![allow(clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::Client;
use common::capture::Capture;
use common::cluster::{COOKIE, Cluster, cluster_view, metric_value, up_members};

/// Makes a CA in `dir` (unless there is one) and a certificate per `(node, host)`.
fn make_certs(dir: &Path, nodes: &[(&str, &str)]) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/make-certs");
    let status = Command::new(script)
        .arg(dir)
        .args(nodes.iter().map(|(node, host)| format!("{node}={host}")))
        .stderr(Stdio::null())
        .status()
        .expect("run deploy/make-certs");
    assert!(status.success(), "make-certs failed");
}

/// The TLS flags of `node` with certificates from `certs`, trusting the CA in `ca_dir`.
fn tls_args(certs: &Path, node: &str, ca_dir: &Path) -> Vec<String> {
    let file = |dir: &Path, name: &str| dir.join(name).to_string_lossy().into_owned();
    vec![
        "--cluster-tls-cert".into(),
        file(certs, &format!("{node}.pem")),
        "--cluster-tls-key".into(),
        file(certs, &format!("{node}.key")),
        "--cluster-tls-ca".into(),
        file(ca_dir, "ca.pem"),
    ]
}

/// Plans a cluster of three whose nodes use certificates of one CA, made in `certs`.
fn tls_cluster(base: u8, certs: &Path) -> Cluster {
    let mut cluster = Cluster::plan(base, 3);
    let hosts: Vec<(String, String)> = (1..=3)
        .map(|i| (cluster.names[i - 1].clone(), cluster.ip(i)))
        .collect();
    let hosts: Vec<(&str, &str)> = hosts
        .iter()
        .map(|(n, h)| (n.as_str(), h.as_str()))
        .collect();
    make_certs(certs, &hosts);
    for i in 1..=3 {
        let name = cluster.names[i - 1].clone();
        cluster.set_args(i, tls_args(certs, &name, certs));
    }
    cluster
}

async fn launch_all(cluster: &mut Cluster) {
    for i in 1..=3 {
        cluster.launch(i);
    }
    cluster.wait_formed().await;
}

/// One client on every node in `room`; the one on n1 says `text`, the others receive it.
async fn chat_across_nodes(cluster: &Cluster, room: &str, text: &str) {
    let mut clients = Vec::new();
    for i in 1..=3 {
        let mut client = Client::connect(cluster.http(i), &format!("u{i}")).await;
        client.join(room, None).await;
        clients.push(client);
    }
    clients[0].say(room, text).await;
    for client in &mut clients[1..] {
        let message = client
            .recv_until(|f| f["type"] == "message" && f["text"] == text)
            .await;
        assert_eq!(message["from"], "u1");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn three_nodes_with_mutual_tls_chat_and_nodes_of_another_ca_stay_out() {
    let certs = tempfile::tempdir().expect("temp dir");
    let other = tempfile::tempdir().expect("temp dir");
    let mut cluster = tls_cluster(240, certs.path());
    launch_all(&mut cluster).await;
    chat_across_nodes(&cluster, "tls-room", "hello over tls").await;

    // n4: everything from another CA (its heartbeats are keyed by that CA: never heard).
    // n5: a certificate of another CA, trusting this cluster's CA (heard, never admitted).
    make_certs(
        other.path(),
        &[("n4", &cluster.ip(4)), ("n5", &cluster.ip(5))],
    );
    let n4_args = tls_args(other.path(), "n4", other.path());
    let _n4 = cluster.spawn_outsider_with("n4", 4, COOKIE, &n4_args);
    let n5_args = tls_args(other.path(), "n5", certs.path());
    let _n5 = cluster.spawn_outsider_with("n5", 5, COOKIE, &n5_args);

    let three: BTreeSet<String> = cluster.all_names();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(8) {
        for i in 1..=3 {
            let up = up_members(cluster.http(i)).await.expect("view");
            assert_eq!(up, three, "n{i} sees {up:?} after {:?}", started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    for i in 1..=3 {
        let view = cluster_view(cluster.http(i)).await.expect("view");
        assert_eq!(view["quorum"], true, "n{i}: {view}");
        let listed: Vec<&str> = view["members"]
            .as_array()
            .expect("members")
            .iter()
            .filter_map(|m| m["name"].as_str())
            .collect();
        assert!(!listed.contains(&"n4"), "n{i} heard n4: {view}");
    }
    let mut refused = 0.0;
    for i in 1..=3 {
        let series = r#"chat_cluster_streams_refused_total{kind="tls"}"#;
        refused += metric_value(cluster.http(i), series).await.unwrap_or(0.0);
    }
    assert!(
        refused > 0.0,
        "no TLS handshake with n5 failed: did it ever dial?"
    );
    chat_across_nodes(&cluster, "tls-room-2", "still chatting").await;
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle.as_bytes())
}

/// Captures the node links of `cluster` while a text crosses them; the capture.
async fn capture_chat(cluster: &Cluster, text: &str) -> Option<Vec<u8>> {
    let ports: Vec<String> = cluster
        .cluster_addrs
        .iter()
        .map(|a| format!("port {}", a.port()))
        .collect();
    let capture = Capture::start(&format!("tcp and ({})", ports.join(" or ")))?;
    chat_across_nodes(cluster, "captured", text).await;
    Some(capture.stop())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_capture_of_the_node_links_shows_chat_text_only_without_tls() {
    const TEXT: &str = "a-very-recognisable-chat-text-7f3a";
    let certs = tempfile::tempdir().expect("temp dir");
    let mut tls = tls_cluster(245, certs.path());
    launch_all(&mut tls).await;
    let Some(encrypted) = capture_chat(&tls, TEXT).await else {
        return;
    };
    drop(tls);
    // The control: the same exchange without TLS shows the text, so the capture does see the
    // links.
    let plain = Cluster::start(250, 3).await;
    let clear = capture_chat(&plain, TEXT).await.expect("capture");
    println!(
        "captured {} bytes with TLS, {} without",
        encrypted.len(),
        clear.len()
    );
    assert!(encrypted.len() > 1000, "the TLS capture is empty");
    assert!(
        contains(&clear, TEXT),
        "the control capture misses the text"
    );
    assert!(
        !contains(&encrypted, TEXT),
        "chat text crossed a TLS link in clear"
    );
    assert!(!contains(&encrypted, COOKIE), "the cookie crossed in clear");
}
