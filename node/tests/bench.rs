//! `chat-bench` end to end: a short `chat --json` run against a node (with tokens minted from
//! its secret) and against `chat-bench baseline`, a small sweep, and the idle mode's refusal of
//! a count past the open-file limit.

#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{NodeProcess, free_port};
use serde_json::Value;

/// Longest a chat-bench run of these tests may take.
const RUN_TIMEOUT: Duration = Duration::from_secs(60);

fn bench() -> Command {
    Command::new(env!("CARGO_BIN_EXE_chat-bench"))
}

/// Runs chat-bench with `args` to its end: exit code, stdout, stderr.
fn run(args: &[&str]) -> (Option<i32>, String, String) {
    let mut child = bench()
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn chat-bench");
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_string(&mut text);
            }
            text
        })
    };
    let stdout = drain(child.stdout.take().map(|p| Box::new(p) as _));
    let stderr = drain(child.stderr.take().map(|p| Box::new(p) as _));
    let status = common::wait_for_exit(&mut child, RUN_TIMEOUT, &format!("chat-bench {args:?}"));
    (
        status.code(),
        stdout.join().unwrap(),
        stderr.join().unwrap(),
    )
}

/// Runs chat-bench with `args` (which include `--json`) and parses the last line of stdout.
fn run_json(args: &[&str]) -> Value {
    let (code, stdout, stderr) = run(args);
    assert_eq!(code, Some(0), "chat-bench {args:?} failed:\n{stderr}");
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {last:?}\nstderr:\n{stderr}"))
}

/// `chat-bench baseline` in a child process, killed on drop.
struct Baseline {
    child: Child,
    addr: SocketAddr,
}

impl Baseline {
    fn start() -> Baseline {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port("127.0.0.1"))
            .parse()
            .unwrap();
        let child = bench()
            .args(["baseline", "--listen", &addr.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn chat-bench baseline");
        let deadline = Instant::now() + common::TIMEOUT;
        while TcpStream::connect(addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "baseline never listened on {addr}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Baseline { child, addr }
    }
}

impl Drop for Baseline {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Asserts a chat run delivered everything it offered, to every member, at nonzero rates.
fn assert_complete(result: &Value, rooms: u64, members: u64, senders: u64) {
    assert_eq!(result["mode"], "chat", "{result}");
    assert_eq!(result["delivered_fraction"], 1.0, "{result}");
    assert_eq!(result["errors"], 0, "{result}");
    assert_eq!(result["lost_connections"], 0, "{result}");
    // Only the measured window counts, not the warmup: rate × secs, give or take one message
    // per sender at either edge of the window.
    let offered = result["offered"].as_u64().unwrap();
    let scheduled = result["offered_rate"].as_f64().unwrap() * result["secs"].as_f64().unwrap();
    let per_edge = (rooms * senders) as f64;
    assert!(
        (offered as f64 - scheduled).abs() <= per_edge,
        "offered {offered}, scheduled {scheduled}: {result}"
    );
    assert_eq!(result["acked"].as_u64(), Some(offered), "{result}");
    assert_eq!(
        result["deliveries"].as_u64(),
        Some(offered * members),
        "{result}"
    );
    for rate in ["ack_rate", "delivery_rate", "sent_rate"] {
        assert!(result[rate].as_f64().unwrap() > 0.0, "{rate}: {result}");
    }
    for latency in ["ack_ms", "delivery_ms"] {
        let l = &result[latency];
        assert!(l["count"].as_u64().unwrap() > 0, "{latency}: {result}");
        assert!(
            l["p50"].as_f64().unwrap() <= l["p99"].as_f64().unwrap()
                && l["p99"].as_f64().unwrap() <= l["max"].as_f64().unwrap(),
            "{latency}: {result}"
        );
    }
    let workload = &result["workload"];
    assert_eq!(workload["rooms"].as_u64(), Some(rooms), "{result}");
    assert_eq!(workload["members"].as_u64(), Some(members), "{result}");
    assert_eq!(workload["senders"].as_u64(), Some(senders), "{result}");
}

const WORKLOAD: &[&str] = &[
    "--rooms",
    "3",
    "--members",
    "4",
    "--senders",
    "2",
    "--rate",
    "120",
    "--secs",
    "2",
    "--warmup",
    "0.5",
    "--json",
];

#[test]
fn chat_json_against_a_node_with_minted_tokens() {
    let node = NodeProcess::start("bench1", &["--rate-limit", "0", "--auth-secret", "s3cret"]);
    let addr = node.http.to_string();
    let mut args = vec!["chat", "--nodes", &addr, "--secret", "s3cret"];
    args.extend_from_slice(WORKLOAD);
    assert_complete(&run_json(&args), 3, 4, 2);
}

#[test]
fn a_wrong_secret_is_refused_by_the_node() {
    let node = NodeProcess::start("bench2", &["--auth-secret", "s3cret"]);
    let addr = node.http.to_string();
    let (code, _, stderr) = run(&[
        "chat", "--nodes", &addr, "--secret", "other", "--secs", "1", "--json",
    ]);
    assert_ne!(code, Some(0));
    assert!(stderr.contains("401"), "{stderr}");
}

#[test]
fn chat_json_against_the_baseline() {
    let baseline = Baseline::start();
    let addr = baseline.addr.to_string();
    let mut args = vec!["chat", "--nodes", &addr, "--token", "anything"];
    args.extend_from_slice(WORKLOAD);
    assert_complete(&run_json(&args), 3, 4, 2);
}

#[test]
fn a_sweep_reports_its_steps_and_draws_them() {
    let baseline = Baseline::start();
    let addr = baseline.addr.to_string();
    let dir = tempfile::tempdir().unwrap();
    let svg = dir.path().join("sweep.svg");
    let result = run_json(&[
        "sweep",
        "--nodes",
        &addr,
        "--rooms",
        "2",
        "--members",
        "3",
        "--secs",
        "1",
        "--from",
        "50",
        "--factor",
        "2",
        "--max-steps",
        "2",
        "--p99-ms",
        "10000",
        "--json",
        "--svg",
        svg.to_str().unwrap(),
    ]);
    let steps = result["steps"].as_array().unwrap();
    let rates: Vec<f64> = steps
        .iter()
        .map(|s| s["offered_rate"].as_f64().unwrap())
        .collect();
    assert_eq!(rates, vec![50.0, 100.0], "{result}");
    assert!(steps.iter().all(|s| s["passed"] == true), "{result}");
    assert_eq!(result["highest_passing_rate"], 100.0, "{result}");
    let chart = std::fs::read_to_string(&svg).unwrap();
    assert!(chart.starts_with("<svg"), "{chart}");
    assert_eq!(chart.matches("<polyline").count(), 2, "{chart}");
}

#[test]
fn idle_refuses_more_connections_than_files_before_connecting() {
    // Nothing listens there: the refusal must come before any connection is tried.
    let nowhere = format!("127.0.0.1:{}", free_port("127.0.0.1"));
    let (code, _, stderr) = run(&[
        "idle",
        "--nodes",
        &nowhere,
        "--connections",
        "100000000",
        "--secs",
        "1",
    ]);
    assert_ne!(code, Some(0));
    assert!(stderr.contains("RLIMIT_NOFILE"), "{stderr}");
}
