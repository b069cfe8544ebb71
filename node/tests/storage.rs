//! Storage faults on the real binary: a node whose data directory is a small tmpfs that fills
//! up answers sends `unavailable` at once (not at the request timeout), reports 503 on
//! `/healthz`, and acknowledges sends again by itself once space is freed, without a restart
//! and without losing an acknowledged message (README "Storage faults", docs/protocol.md §5).
//!
//! Mounting a tmpfs needs root: without it the test is skipped visibly (CI runs as root).

#![allow(clippy::expect_used)]

mod common;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::cluster::{Cluster, placement, up_members};
use common::{Client, NodeProcess, http_request, metric, metrics_text, skip};
use serde_json::{Value, json};

/// Well under the 5 s request timeout: a refusal that waited for it would fail this.
const PROMPT: Duration = Duration::from_secs(2);

/// A tmpfs mounted for the test, unmounted when dropped.
struct Tmpfs {
    dir: PathBuf,
    /// The temp dir holding `dir`, when the tmpfs made it.
    _parent: Option<tempfile::TempDir>,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (e.g. `4m`); `Err` says why it cannot be done here.
    fn mount(size: &str) -> Result<Tmpfs, String> {
        let parent = tempfile::tempdir().map_err(|e| e.to_string())?;
        let mut tmpfs = Tmpfs::mount_at(parent.path().join("mnt"), size)?;
        tmpfs._parent = Some(parent);
        Ok(tmpfs)
    }

    /// Mounts a tmpfs of `size` at `dir` (made if missing).
    fn mount_at(dir: PathBuf, size: &str) -> Result<Tmpfs, String> {
        if !is_root() {
            return Err("needs root to mount a tmpfs".into());
        }
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let output = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .output()
            .map_err(|e| format!("mount: {e}"))?;
        if !output.status.success() {
            return Err(format!(
                "mount -t tmpfs failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            ));
        }
        Ok(Tmpfs { dir, _parent: None })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazily: the node (killed by its own guard, declared later, so dropped first) may
        // still be exiting.
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().nth(1).map(|id| id == "0"))
        })
        .unwrap_or(false)
}

/// Writes `path` until the file system is full; returns the bytes written.
fn fill(path: &Path) -> u64 {
    let mut file = std::fs::File::create(path).expect("create the filler");
    let chunk = vec![0x5a_u8; 64 << 10];
    let mut written = 0;
    loop {
        match file.write(&chunk) {
            Ok(0) => break,
            Ok(n) => written += n as u64,
            Err(e) if e.raw_os_error() == Some(28) => break, // ENOSPC
            Err(e) => panic!("filling the tmpfs: {e}"),
        }
    }
    // Whatever is left in smaller pieces too.
    let mut small = vec![0x5a_u8; 512];
    while let Ok(n) = file.write(&small) {
        if n == 0 {
            break;
        }
        written += n as u64;
        small.truncate(512);
    }
    let _ = file.sync_all();
    written
}

async fn health(node: &NodeProcess) -> (u16, Value) {
    let response = http_request(node.http, "/healthz").await;
    (response.status, response.json())
}

/// Every stored message of `room` (at most 500), oldest first, as (seq, text).
async fn history(client: &mut Client, room: &str) -> Vec<(u64, String)> {
    let reply = client
        .request(json!({"type": "history", "room": room, "limit": 500}))
        .await;
    assert_eq!(reply["type"], "history", "{reply}");
    reply["messages"]
        .as_array()
        .unwrap_or_else(|| panic!("no messages: {reply}"))
        .iter()
        .map(|m| {
            (
                m["seq"].as_u64().expect("seq"),
                m["text"].as_str().expect("text").to_owned(),
            )
        })
        .collect()
}

/// A healthy node whose data directory is on a fresh 4 MiB tmpfs; `None` (skipped visibly) where
/// no tmpfs can be mounted.
fn node_on_tmpfs() -> Option<(Tmpfs, NodeProcess)> {
    let tmpfs = match Tmpfs::mount("4m") {
        Ok(tmpfs) => tmpfs,
        Err(why) => {
            skip(&why);
            return None;
        }
    };
    let node = NodeProcess::spawn_in("n1", "127.0.0.1", &tmpfs.dir.join("n1"), &[]);
    node.wait_healthy();
    Some((tmpfs, node))
}

#[tokio::test]
async fn a_full_disk_refuses_sends_at_once_and_recovers_without_a_restart() {
    let Some((tmpfs, mut node)) = node_on_tmpfs() else {
        return;
    };
    let pid = node.pid();
    let mut alice = Client::connect(node.http, "alice").await;
    alice.join("disk", None).await;
    let mut acked: Vec<(u64, String)> = Vec::new();
    for i in 1..=5 {
        let text = format!("before {i}");
        acked.push((alice.say("disk", &text).await, text));
    }

    let filled_at = Instant::now();
    let filler = tmpfs.dir.join("filler");
    let filled = fill(&filler);
    assert!(filled > 0, "the tmpfs was full before the test filled it");
    let filled_in = filled_at.elapsed();

    // Sends until the node refuses one: a write may still fit in space the store already had.
    let text = "x".repeat(3000);
    let mut first_refusal = None;
    for i in 1..=200 {
        let sent = Instant::now();
        let reply = alice
            .request(json!({"type": "send", "room": "disk", "text": format!("full {i} {text}")}))
            .await;
        let took = sent.elapsed();
        match reply["type"].as_str() {
            Some("ack") => acked.push((
                reply["seq"].as_u64().expect("seq"),
                format!("full {i} {text}"),
            )),
            Some("error") => {
                assert_eq!(reply["code"], "unavailable", "{reply}");
                assert!(took < PROMPT, "refused after {took:?}: {reply}");
                first_refusal = Some((filled_at.elapsed(), took));
                break;
            }
            _ => panic!("unexpected reply {reply}"),
        }
    }
    let (to_refusal, refusal_took) =
        first_refusal.expect("the node kept acknowledging sends on a full disk");
    // While the disk stays full, later sends are refused at once too, and the node says why.
    let sent = Instant::now();
    let reply = alice
        .request(json!({"type": "send", "room": "disk", "text": "still full"}))
        .await;
    assert_eq!(reply["code"], "unavailable", "{reply}");
    assert!(
        sent.elapsed() < PROMPT,
        "refused after {:?}",
        sent.elapsed()
    );
    let (status, body) = health(&node).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["status"], "unavailable", "{body}");
    assert_eq!(body["reason"], "store", "{body}");
    let metrics = metrics_text(node.http).await;
    assert_eq!(metric(&metrics, "chat_store_writable"), Some(0.0));
    assert!(metric(&metrics, "chat_store_commit_failures_total").is_some_and(|n| n >= 1.0));

    // Space comes back: the node acknowledges again by itself.
    std::fs::remove_file(&filler).expect("remove the filler");
    let freed_at = Instant::now();
    let deadline = freed_at + Duration::from_secs(10);
    let seq = alice
        .send_until_acked("disk", "after", "after-1", deadline)
        .await;
    let to_ack = freed_at.elapsed();
    acked.push((seq, "after".into()));
    for i in 2..=5 {
        let text = format!("after {i}");
        let seq = alice.say("disk", &text).await;
        assert_eq!(seq, acked.last().expect("acked").0 + 1, "seqs continue");
        acked.push((seq, text));
    }
    let (status, body) = health(&node).await;
    assert_eq!(status, 200, "{body}");
    assert!(node.is_running(), "the node exited");
    assert_eq!(node.pid(), pid);
    assert_eq!(
        node.log_text().matches("node serving").count(),
        1,
        "the node started again"
    );
    let metrics = metrics_text(node.http).await;
    assert_eq!(metric(&metrics, "chat_store_writable"), Some(1.0));

    // Nothing acknowledged is lost, and the log has no gap.
    let stored = history(&mut alice, "disk").await;
    for message in &acked {
        assert!(stored.contains(message), "acked {message:?} missing");
    }
    let seqs: Vec<u64> = stored.iter().map(|(seq, _)| *seq).collect();
    let expected: Vec<u64> = (1..=seqs.len() as u64).collect();
    assert_eq!(seqs, expected, "the log has a gap");

    println!(
        "disk filled in {filled_in:?}; first refusal {to_refusal:?} after the fill began \
         (its reply took {refusal_took:?}); first ack {to_ack:?} after space was freed"
    );
    drop(node);
}

#[tokio::test]
async fn a_node_killed_and_restarted_on_a_full_disk_starts_and_keeps_what_it_acknowledged() {
    let Some((tmpfs, mut node)) = node_on_tmpfs() else {
        return;
    };
    let mut alice = Client::connect(node.http, "alice").await;
    alice.join("disk", None).await;
    let mut acked = Vec::new();
    for i in 1..=5 {
        let text = format!("before {i}");
        acked.push((alice.say("disk", &text).await, text));
    }
    drop(alice);
    node.kill();
    let filler = tmpfs.dir.join("filler");
    fill(&filler);

    // It starts (its store repairs in the space it already has) and answers /healthz.
    node.relaunch();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok((code, _)) = common::http_get(node.http, "/healthz").await
            && (code == 200 || code == 503)
        {
            break;
        }
        assert!(node.is_running(), "the node exited:\n{}", node.log_text());
        assert!(Instant::now() < deadline, "no /healthz answer in time");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut alice = Client::connect(node.http, "alice").await;
    // Until space is freed the room is served (if the store still has room) or refused.
    let sent = Instant::now();
    let reply = alice.request(json!({"type": "join", "room": "disk"})).await;
    println!(
        "join on a full disk: {} after {:?}",
        reply["type"],
        sent.elapsed()
    );
    let joined = reply["type"] == "joined";
    if joined {
        // A send is acknowledged or refused at once, never left to time out.
        let text = "x".repeat(3000);
        for i in 1..=100 {
            let sent = Instant::now();
            let reply = alice
                .request(
                    json!({"type": "send", "room": "disk", "text": format!("full {i} {text}")}),
                )
                .await;
            assert!(
                sent.elapsed() < PROMPT,
                "answered after {:?}",
                sent.elapsed()
            );
            if reply["type"] == "ack" {
                acked.push((
                    reply["seq"].as_u64().expect("seq"),
                    format!("full {i} {text}"),
                ));
            } else {
                assert_eq!(reply["code"], "unavailable", "{reply}");
                break;
            }
        }
    } else {
        assert_eq!(reply["code"], "unavailable", "{reply}");
    }
    std::fs::remove_file(&filler).expect("remove the filler");
    if !joined {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let reply = alice.request(json!({"type": "join", "room": "disk"})).await;
            if reply["type"] == "joined" {
                break;
            }
            assert_eq!(reply["code"], "unavailable", "{reply}");
            assert!(Instant::now() < deadline, "not joined in time: {reply}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let seq = alice
        .send_until_acked(
            "disk",
            "after",
            "after-1",
            Instant::now() + Duration::from_secs(10),
        )
        .await;
    acked.push((seq, "after".into()));
    let stored = history(&mut alice, "disk").await;
    for message in &acked {
        assert!(stored.contains(message), "acked {message:?} missing");
    }
    assert!(node.is_running());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_whose_disk_fills_hands_its_rooms_over_and_rejoins_once_space_is_freed() {
    let mut cluster = Cluster::plan(225, 3);
    // n1's data directory is a small tmpfs.
    let tmpfs = match Tmpfs::mount_at(cluster.data_dir("n1"), "8m") {
        Ok(tmpfs) => tmpfs,
        Err(why) => return skip(&why),
    };
    for i in 1..=3 {
        cluster.launch(i);
    }
    cluster.wait_formed().await;
    let n1_pid = cluster.node(1).pid();
    let room = cluster.room_owned_by(2, "n1", "disk").await;
    let mut alice = Client::connect(cluster.http(2), "alice").await;
    alice.join(&room, None).await;
    let mut acked: Vec<(u64, String)> = Vec::new();
    for i in 1..=5 {
        let text = format!("before {i}");
        acked.push((alice.say(&room, &text).await, text));
    }

    let filler = tmpfs.dir.join("filler");
    fill(&filler);
    let filled_at = Instant::now();
    // Sends go on (retried on `unavailable`) until one is acknowledged by another owner.
    let pad = "x".repeat(3000);
    let deadline = filled_at + Duration::from_secs(30);
    let mut refused = false;
    let mut moved_after = None;
    for i in 1.. {
        let text = format!("during {i} {pad}");
        let reply = alice
            .request(json!({"type": "send", "room": room, "text": text, "id": format!("d{i}")}))
            .await;
        if reply["type"] == "ack" {
            acked.push((reply["seq"].as_u64().expect("seq"), text));
            let (owner, _) = placement(cluster.http(2), &room).await;
            if refused && owner != "n1" {
                moved_after = Some(filled_at.elapsed());
                break;
            }
            continue;
        }
        assert_eq!(reply["code"], "unavailable", "{reply}");
        refused = true;
        assert!(Instant::now() < deadline, "the room never moved off n1");
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Retry the same message (its id makes a retry count once).
        let seq = alice
            .send_until_acked(&room, &text, &format!("d{i}"), deadline)
            .await;
        acked.push((seq, text));
        let (owner, _) = placement(cluster.http(2), &room).await;
        if owner != "n1" {
            moved_after = Some(filled_at.elapsed());
            break;
        }
    }
    let moved_after = moved_after.expect("moved");
    let up = up_members(cluster.http(2)).await.expect("view");
    assert!(!up.contains("n1"), "n1 still up for n2: {up:?}");
    let (status, body) = health(cluster.node(1)).await;
    assert_eq!(status, 503, "{body}");

    // Space comes back: n1 rejoins by itself, same process.
    std::fs::remove_file(&filler).expect("remove the filler");
    let freed_at = Instant::now();
    let all = cluster.all_names();
    let deadline = freed_at + Duration::from_secs(20);
    while up_members(cluster.http(2)).await.as_ref() != Some(&all)
        || health(cluster.node(1)).await.0 != 200
    {
        assert!(Instant::now() < deadline, "n1 did not rejoin");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let rejoined_after = freed_at.elapsed();
    assert_eq!(cluster.node(1).pid(), n1_pid, "n1 restarted");
    let seq = alice.say(&room, "after").await;
    acked.push((seq, "after".into()));

    let stored = history(&mut alice, &room).await;
    for message in &acked {
        assert!(
            stored.iter().any(|m| m == message),
            "acked {} missing",
            message.0
        );
    }
    println!(
        "n1's disk filled: its room acked by another owner {moved_after:?} after the fill; \
         n1 back up {rejoined_after:?} after space was freed"
    );
}

#[tokio::test]
async fn a_new_node_on_a_full_disk_answers_503_and_starts_serving_once_space_is_freed() {
    let tmpfs = match Tmpfs::mount("4m") {
        Ok(tmpfs) => tmpfs,
        Err(why) => return skip(&why),
    };
    let filler = tmpfs.dir.join("filler");
    fill(&filler);
    let mut node = NodeProcess::spawn_in("n1", "127.0.0.1", &tmpfs.dir.join("n1"), &[]);
    let deadline = Instant::now() + Duration::from_secs(20);
    let body = loop {
        if let Ok((code, body)) = common::http_get(node.http, "/healthz").await {
            assert_eq!(code, 503, "{body}");
            break body;
        }
        assert!(node.is_running(), "the node exited:\n{}", node.log_text());
        assert!(Instant::now() < deadline, "no /healthz answer in time");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let body: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(body["reason"], "store", "{body}");
    // It stays up and keeps saying so while the disk is full.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(node.is_running(), "the node exited:\n{}", node.log_text());
    assert_eq!(health(&node).await.0, 503);

    std::fs::remove_file(&filler).expect("remove the filler");
    let freed_at = Instant::now();
    node.wait_healthy();
    let serving_after = freed_at.elapsed();
    let mut alice = Client::connect(node.http, "alice").await;
    alice.join("fresh", None).await;
    assert_eq!(alice.say("fresh", "hello").await, 1);
    println!("a new node on a full disk served {serving_after:?} after space was freed");
}
