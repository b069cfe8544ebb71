//! Starting the binary: how settings are layered and how bad ones are refused (PROTOCOL.md §6).

mod common;

use common::{Client, NodeProcess, assert_error, free_port, run_to_exit};
use serde_json::json;

/// Asserts that the node's `max-text-bytes` is `limit`: a text of `limit` bytes is acked, one
/// byte more is `too_large`.
async fn assert_text_limit(node: &NodeProcess, limit: usize) {
    let mut alice = Client::connect(node.http, "alice").await;
    alice.join("limit", None).await;
    alice.say("limit", &"a".repeat(limit)).await;
    let over = json!({"type": "send", "room": "limit", "text": "a".repeat(limit + 1)});
    let reply = alice.request_with_ref(over, json!("over")).await;
    assert_error(&reply, Some(json!("over")), "too_large");
}

#[tokio::test]
async fn a_flag_beats_a_variable_which_beats_the_config_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("chat.toml");
    std::fs::write(&file, "max-text-bytes = 30\n").expect("write config");
    let file = file.display().to_string();

    let from_file = NodeProcess::start("n1", &["--config", &file]);
    assert_text_limit(&from_file, 30).await;
    let from_env =
        NodeProcess::start_with_env("n1", &["--config", &file], &[("CHAT_MAX_TEXT_BYTES", "10")]);
    assert_text_limit(&from_env, 10).await;
    let from_flag = NodeProcess::start_with_env(
        "n1",
        &["--config", &file, "--max-text-bytes", "20"],
        &[("CHAT_MAX_TEXT_BYTES", "10")],
    );
    assert_text_limit(&from_flag, 20).await;
}

/// Arguments that would start a node on a free port in a fresh directory, plus `extra`.
fn args_with(dir: &tempfile::TempDir, extra: &[&str]) -> Vec<String> {
    let mut args = vec![
        "--name".to_owned(),
        "n1".to_owned(),
        "--listen".to_owned(),
        format!("127.0.0.1:{}", free_port("127.0.0.1")),
        "--data-dir".to_owned(),
        dir.path().join("n1").display().to_string(),
    ];
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    args
}

#[test]
fn cluster_listen_without_cookie_refuses_to_start_naming_cookie() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cluster = format!("127.0.0.1:{}", free_port("127.0.0.1"));
    let args = args_with(&dir, &["--cluster-listen", &cluster]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, stderr) = run_to_exit(&args, &[]);
    assert!(code.is_some_and(|c| c != 0), "exit code {code:?}: {stderr}");
    assert!(stderr.contains("cookie"), "{stderr}");
}

#[test]
fn a_short_cookie_refuses_to_start_and_says_why() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cluster = format!("127.0.0.1:{}", free_port("127.0.0.1"));
    let args = args_with(&dir, &["--cluster-listen", &cluster, "--cookie", "secret"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, stderr) = run_to_exit(&args, &[]);
    assert!(code.is_some_and(|c| c != 0), "exit code {code:?}: {stderr}");
    assert!(
        stderr.contains("`cookie`") && stderr.contains("at least 16 bytes"),
        "{stderr}"
    );
}

#[test]
fn an_invalid_value_refuses_to_start_naming_its_key() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("typo.toml");
    std::fs::write(&file, "max-text-byte = 10\n").expect("write config");
    let file = file.display().to_string();
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);
    let cases: &[Case<'_>] = &[
        (&["--max-text-bytes", "0"], &[], "max-text-bytes"),
        (&["--max-frame-bytes", "100"], &[], "max-frame-bytes"),
        (&["--client-queue", "15"], &[], "client-queue"),
        (&["--max-text-bytes", "70000"], &[], "max-text-bytes"),
        (&[], &[("CHAT_RATE_LIMIT", "lots")], "rate-limit"),
        (&["--config", &file], &[], "max-text-byte"),
    ];
    for (extra, env, key) in cases {
        let args = args_with(&dir, extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, stderr) = run_to_exit(&args, env);
        assert!(
            code.is_some_and(|c| c != 0),
            "{extra:?} {env:?}: exit code {code:?}: {stderr}"
        );
        assert!(
            stderr.contains(&format!("`{key}`")),
            "{extra:?} {env:?}: {stderr}"
        );
    }
}
