//! `chat-cli`: a terminal chat client that survives node failures.
//!
//! ```text
//! chat-cli --nodes 127.0.0.2:8080,127.0.0.3:8080,127.0.0.4:8080 --user alice --room lobby
//! ```
//!
//! Lines typed on stdin are sent to the room (`/msg USER TEXT` sends a direct message, `/who`
//! lists the room); messages print as `[seq] from: text`. When the connection drops, or the node
//! keeps answering `unavailable`, the client moves to the next node of the list, joins again with
//! `since` = the last seq it printed, and sends again every message not yet acknowledged, with
//! the same `id`: nothing is missed, nothing is printed or stored twice.
//!
//! A token (`--token`, or `--token-command CMD` whose output is a fresh one) goes in the
//! `Sec-WebSocket-Protocol` header, not the URL. With `--token-command` the client also sends
//! `refresh` with a new token halfway to each `exp`, so the node never closes the connection
//! for an expired token; with a fixed `--token` it is closed at `exp` (1008) and says so.

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::AsyncBufReadExt;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// Command line of chat-cli.
#[derive(Parser, Debug)]
#[command(
    name = "chat-cli",
    version,
    about = "Terminal client of the chat cluster"
)]
struct Cli {
    /// HTTP addresses of the nodes (host:port, comma separated), tried in turn.
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1:8080")]
    nodes: Vec<String>,
    /// User name.
    #[arg(long)]
    user: String,
    /// Token (JWT), when the nodes require one.
    #[arg(long, conflicts_with = "token_command")]
    token: Option<String>,
    /// Shell command printing a fresh token: run for every connection and before each token
    /// expires, to `refresh` it.
    #[arg(long, value_name = "CMD")]
    token_command: Option<String>,
    /// Room to join.
    #[arg(long, default_value = "lobby")]
    room: String,
}

/// What the client keeps across connections.
struct State {
    last_seq: u64,
    /// Unacknowledged sends by client id, in order.
    unacked: BTreeMap<String, String>,
    next_id: u64,
    prefix: String,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(cli))
}

/// The token to use now: the output of `--token-command`, or `--token`.
async fn fresh_token(cli: &Cli) -> anyhow::Result<Option<String>> {
    let Some(command) = &cli.token_command else {
        return Ok(cli.token.clone());
    };
    let output = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .stderr(std::process::Stdio::inherit())
        .output()
        .await?;
    anyhow::ensure!(
        output.status.success(),
        "--token-command failed: {}",
        output.status
    );
    let token = String::from_utf8(output.stdout)?.trim().to_owned();
    anyhow::ensure!(!token.is_empty(), "--token-command printed no token");
    Ok(Some(token))
}

/// The `exp` claim of a JWT (not verified: the node does that), in seconds since the Unix epoch.
fn token_exp(token: &str) -> Option<u64> {
    let payload = token.split('.').nth(1)?;
    let claims: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).ok()?).ok()?;
    claims["exp"].as_f64().map(|exp| exp.max(0.0) as u64)
}

/// When to refresh a token expiring at `exp_secs`: halfway there, at least a second from now.
fn refresh_after(exp_secs: u64, now_secs: u64) -> Duration {
    Duration::from_secs((exp_secs.saturating_sub(now_secs) / 2).max(1))
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let (lines_tx, mut lines) = mpsc::unbounded_channel::<String>();
    tokio::spawn(async move {
        let mut stdin = tokio::io::BufReader::new(tokio::io::stdin()).lines();
        while let Ok(Some(line)) = stdin.next_line().await {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut state = State {
        last_seq: 0,
        unacked: BTreeMap::new(),
        next_id: 1,
        prefix: format!("{:08x}", rand::random::<u32>()),
    };
    let mut attempt = 0usize;
    loop {
        let node = &cli.nodes[attempt % cli.nodes.len()];
        attempt += 1;
        match session(&cli, node, &mut state, &mut lines).await {
            Ok(()) => return Ok(()),
            Err(e) => {
                eprintln!("* {node}: {e}; trying the next node");
                let backoff = Duration::from_millis(250 * (attempt.min(8) as u64));
                tokio::time::sleep(backoff).await;
            }
        }
    }
}

/// One connection: returns Ok when stdin ends, Err when the node must be left.
async fn session(
    cli: &Cli,
    node: &str,
    state: &mut State,
    lines: &mut mpsc::UnboundedReceiver<String>,
) -> anyhow::Result<()> {
    let mut request = format!("ws://{node}/ws?user={}", cli.user).into_client_request()?;
    let token = fresh_token(cli).await?;
    if let Some(token) = &token {
        // In the header rather than the URL, which ends up in access logs.
        request.headers_mut().insert(
            "sec-websocket-protocol",
            format!("chat, token.{token}").parse()?,
        );
    }
    let (ws, _) = tokio::time::timeout(
        Duration::from_secs(5),
        tokio_tungstenite::connect_async(request),
    )
    .await??;
    // Only a token that can be replaced is refreshed.
    let refreshable = cli.token_command.is_some();
    let mut exp = token.as_deref().and_then(token_exp);
    let never = Duration::from_secs(365 * 24 * 3600);
    let refresh = tokio::time::sleep(match (refreshable, exp) {
        (true, Some(exp)) => refresh_after(exp, now_secs()),
        _ => never,
    });
    tokio::pin!(refresh);
    let (mut sink, mut stream) = ws.split();
    let send = |frame: Value| Message::Text(frame.to_string().into());
    sink.send(send(
        json!({"type":"join","ref":"join","room":cli.room,"since":state.last_seq}),
    ))
    .await?;
    let mut refused = 0;
    let mut ping = tokio::time::interval(Duration::from_secs(5));
    let mut last_heard = tokio::time::Instant::now();
    loop {
        tokio::select! {
            frame = stream.next() => {
                let Some(frame) = frame else { anyhow::bail!("connection closed") };
                let text = match frame? {
                    Message::Text(text) => text,
                    Message::Close(Some(close)) => {
                        anyhow::bail!("closed by the node: {} {}", close.code, close.reason)
                    }
                    _ => continue,
                };
                last_heard = tokio::time::Instant::now();
                let v: Value = serde_json::from_str(&text)?;
                match v["type"].as_str() {
                    Some("welcome") => eprintln!("* connected to {} as {}", v["node"], v["user"]),
                    Some("joined") => {
                        eprintln!("* in {} (latest seq {})", cli.room, v["seq"]);
                        if let Some(horizon) = v["horizon"].as_u64() {
                            eprintln!("* messages before #{horizon} were dropped by retention");
                        }
                        // Everything not acknowledged goes again, with the same ids.
                        for (id, text) in &state.unacked {
                            sink.send(send(json!({"type":"send","ref":id,"id":id,"room":cli.room,"text":text}))).await?;
                        }
                    }
                    Some("message") => {
                        let seq = v["seq"].as_u64().unwrap_or(0);
                        if seq > state.last_seq {
                            state.last_seq = seq;
                            println!("[{seq}] {}: {}", v["from"].as_str().unwrap_or("?"), v["text"].as_str().unwrap_or(""));
                        }
                    }
                    Some("ack") => {
                        if let Some(id) = v["ref"].as_str() {
                            state.unacked.remove(id);
                        }
                        refused = 0;
                    }
                    Some("horizon") => {
                        eprintln!("* messages before #{} were dropped by retention", v["horizon"]);
                    }
                    Some("direct") => println!("(direct) {}: {}", v["from"].as_str().unwrap_or("?"), v["text"].as_str().unwrap_or("")),
                    Some("presence") => eprintln!("* {} {}", v["user"].as_str().unwrap_or("?"), if v["event"] == "join" { "joined" } else { "left" }),
                    Some("members") => eprintln!("* here: {}", v["users"]),
                    Some("refreshed") => {
                        exp = v["exp"].as_u64().or(exp);
                        if let Some(exp) = exp {
                            refresh.as_mut().reset(tokio::time::Instant::now() + refresh_after(exp, now_secs()));
                        }
                    }
                    Some("error") if v["ref"] == "refresh" => {
                        eprintln!("* token refresh refused: {}", v["message"].as_str().unwrap_or(""));
                        refresh.as_mut().reset(tokio::time::Instant::now() + Duration::from_secs(5));
                    }
                    Some("error") => {
                        eprintln!("* error: {} ({})", v["code"].as_str().unwrap_or("?"), v["message"].as_str().unwrap_or(""));
                        if v["code"] == "unavailable" {
                            refused += 1;
                            // Refused again and again: this node may be cut off from the majority.
                            anyhow::ensure!(refused < 3, "the node keeps refusing");
                            tokio::time::sleep(Duration::from_millis(300)).await;
                            if let Some(id) = v["ref"].as_str()
                                && let Some(text) = state.unacked.get(id)
                            {
                                sink.send(send(json!({"type":"send","ref":id,"id":id,"room":cli.room,"text":text}))).await?;
                            } else if v["ref"] == "join" {
                                sink.send(send(json!({"type":"join","ref":"join","room":cli.room,"since":state.last_seq}))).await?;
                            }
                        }
                    }
                    _ => {}
                }
            }
            line = lines.recv() => {
                let Some(line) = line else { return Ok(()) };
                let line = line.trim().to_owned();
                if line.is_empty() {
                    continue;
                }
                if line == "/who" {
                    sink.send(send(json!({"type":"who","room":cli.room}))).await?;
                } else if let Some(rest) = line.strip_prefix("/msg ") {
                    let (to, text) = rest.split_once(' ').unwrap_or((rest, ""));
                    sink.send(send(json!({"type":"direct","to":to,"text":text}))).await?;
                } else {
                    let id = format!("{}-{}", state.prefix, state.next_id);
                    state.next_id += 1;
                    state.unacked.insert(id.clone(), line.clone());
                    sink.send(send(json!({"type":"send","ref":id,"id":id,"room":cli.room,"text":line}))).await?;
                }
            }
            () = &mut refresh => {
                refresh.as_mut().reset(tokio::time::Instant::now() + never);
                match fresh_token(cli).await {
                    Ok(Some(token)) => {
                        sink.send(send(json!({"type":"refresh","ref":"refresh","token":token}))).await?;
                    }
                    Ok(None) => {}
                    Err(e) => {
                        eprintln!("* {e}; trying again in 5 s");
                        refresh.as_mut().reset(tokio::time::Instant::now() + Duration::from_secs(5));
                    }
                }
            }
            _ = ping.tick() => {
                // A frozen node keeps the socket open: no answer to two pings means leave it.
                anyhow::ensure!(last_heard.elapsed() < Duration::from_secs(10), "no answer from the node");
                sink.send(send(json!({"type":"ping"}))).await?;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_refreshed_halfway_to_its_expiry() {
        let payload = URL_SAFE_NO_PAD.encode(br#"{"sub":"alice","exp":1800000600}"#);
        let token = format!("e30.{payload}.sig");
        assert_eq!(token_exp(&token), Some(1_800_000_600));
        assert_eq!(token_exp("garbage"), None);
        assert_eq!(
            refresh_after(1_800_000_600, 1_800_000_000),
            Duration::from_secs(300)
        );
        assert_eq!(
            refresh_after(1_800_000_000, 1_800_000_600),
            Duration::from_secs(1)
        );
    }
}
