//! Quiet-room load: opens `--connections` WebSocket connections to one or more nodes, each joins
//! `--rooms-per-connection` distinct rooms, then holds them open without traffic (answering the
//! node's pings) until killed. Used to measure what a room with members but no messages costs
//! (docs/benchmarks.md, "Quiet rooms"):
//!
//! ```sh
//! cargo run --release -p chat-node --example rooms_load -- --nodes 127.0.0.1:18585 \
//!     --connections 1000 --rooms-per-connection 100
//! ```
//!
//! Connection `c` joins rooms `q-{c}-0` … `q-{c}-{n-1}`, so every room has one member. At most
//! `--in-flight` connections (default 20) are joining at once: a node asked to create tens of
//! thousands of rooms in the same second falls behind on their claims. Once every join is
//! answered it prints `ready rooms=N` and waits.

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

struct Options {
    nodes: Vec<String>,
    connections: usize,
    rooms_per_connection: usize,
    in_flight: usize,
    prefix: String,
}

fn parse_options() -> Result<Options, String> {
    let mut options = Options {
        nodes: vec!["127.0.0.1:8080".to_owned()],
        connections: 100,
        rooms_per_connection: 100,
        in_flight: 20,
        prefix: "q".to_owned(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let number = || value.parse::<usize>().map_err(|e| format!("{flag}: {e}"));
        match flag.as_str() {
            "--nodes" => options.nodes = value.split(',').map(str::to_owned).collect(),
            "--connections" => options.connections = number()?,
            "--rooms-per-connection" => options.rooms_per_connection = number()?,
            "--in-flight" => options.in_flight = number()?.max(1),
            "--prefix" => options.prefix = value,
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    Ok(options)
}

/// The `ref` of an error frame: the number of the room whose join failed.
fn retry_ref(text: &str) -> Option<usize> {
    let rest = &text[text.find(r#""ref":"#)? + 6..];
    rest[..rest.find(|c: char| !c.is_ascii_digit())?]
        .parse()
        .ok()
}

/// Connects as one user, joins its rooms, then answers pings until the node closes.
async fn hold(
    node: String,
    prefix: String,
    connection: usize,
    rooms: usize,
    joined_tx: tokio::sync::mpsc::Sender<usize>,
    permit: tokio::sync::OwnedSemaphorePermit,
) -> Result<(), String> {
    let mut permit = Some(permit);
    let url = format!("ws://{node}/ws?user={prefix}{connection}");
    let (mut ws, _) = tokio_tungstenite::connect_async(&url)
        .await
        .map_err(|e| format!("connect {url}: {e}"))?;
    for room in 0..rooms {
        let frame =
            format!(r#"{{"type":"join","ref":{room},"room":"{prefix}-{connection}-{room}"}}"#);
        ws.send(Message::text(frame))
            .await
            .map_err(|e| e.to_string())?;
    }
    let mut joined = 0;
    while let Some(frame) = ws.next().await {
        match frame.map_err(|e| e.to_string())? {
            Message::Text(text) if text.contains(r#""type":"joined""#) => {
                joined += 1;
                if joined == rooms {
                    permit.take();
                    let _ = joined_tx.send(joined).await;
                }
            }
            // A room still claiming its log answers `unavailable`: join it again shortly.
            Message::Text(text) if text.contains(r#""code":"unavailable""#) => {
                let room = retry_ref(&text).ok_or_else(|| format!("no ref in {text}"))?;
                tokio::time::sleep(Duration::from_millis(100)).await;
                let frame = format!(
                    r#"{{"type":"join","ref":{room},"room":"{prefix}-{connection}-{room}"}}"#
                );
                ws.send(Message::text(frame))
                    .await
                    .map_err(|e| e.to_string())?;
            }
            Message::Text(text) if text.contains(r#""type":"error""#) => {
                return Err(format!("connection {connection}: {text}"));
            }
            Message::Close(close) => {
                return Err(format!("connection {connection} closed: {close:?}"));
            }
            _ => {}
        }
    }
    Err(format!("connection {connection} ended"))
}

#[tokio::main]
async fn main() {
    let options = match parse_options() {
        Ok(options) => options,
        Err(problem) => {
            eprintln!("rooms_load: {problem}");
            std::process::exit(2);
        }
    };
    let start = Instant::now();
    let (joined_tx, mut joined_rx) = tokio::sync::mpsc::channel(options.connections.max(1));
    let in_flight = std::sync::Arc::new(tokio::sync::Semaphore::new(options.in_flight));
    for connection in 0..options.connections {
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            break;
        };
        let node = options.nodes[connection % options.nodes.len()].clone();
        let (prefix, rooms, joined_tx) = (
            options.prefix.clone(),
            options.rooms_per_connection,
            joined_tx.clone(),
        );
        tokio::spawn(async move {
            if let Err(problem) = hold(node, prefix, connection, rooms, joined_tx, permit).await {
                eprintln!("rooms_load: {problem}");
                std::process::exit(1);
            }
        });
    }
    drop(joined_tx);
    let mut rooms = 0;
    for _ in 0..options.connections {
        match joined_rx.recv().await {
            Some(count) => rooms += count,
            None => break,
        }
    }
    println!(
        "ready rooms={rooms} secs={:.1}",
        start.elapsed().as_secs_f64()
    );
    std::future::pending::<()>().await;
}
