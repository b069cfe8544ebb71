//! `chat-bench`: load generator and measuring tool for a chat node or cluster.
//!
//! ```text
//! chat-bench chat --nodes 127.0.0.2:8080,127.0.0.3:8080 --rooms 10 --members 10 --rate 2000 --secs 20
//! chat-bench idle --nodes 127.0.0.1:8080 --connections 10000 --secs 30
//! ```
//!
//! `chat` connects `rooms × members` clients spread round-robin over the nodes (so every room has
//! members on every node); every member sends at `rate / (rooms × members)` messages per second. It reports the
//! acknowledged throughput, the send→ack latency, and the send→delivery latency measured on every
//! receiving client (the text carries the send time; sender and receivers share this process's
//! clock). `idle` opens many connections that only join a room, to measure a node's memory per
//! connection (read the node's RSS before and after, e.g. with `ps -o rss`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use std::sync::Mutex;
use tokio_tungstenite::tungstenite::Message;

/// Command line of chat-bench.
#[derive(Parser, Debug)]
#[command(
    name = "chat-bench",
    version,
    about = "Load generator for the chat cluster"
)]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand, Debug)]
enum Mode {
    /// Rooms with members on every node, everybody sending.
    Chat {
        /// HTTP addresses of the nodes (host:port, comma separated).
        #[arg(long, value_delimiter = ',', required = true)]
        nodes: Vec<String>,
        /// Number of rooms.
        #[arg(long, default_value_t = 10)]
        rooms: usize,
        /// Members per room (spread over the nodes).
        #[arg(long, default_value_t = 10)]
        members: usize,
        /// Messages per second in total.
        #[arg(long, default_value_t = 1000)]
        rate: u64,
        /// Duration of the measurement, seconds.
        #[arg(long, default_value_t = 20)]
        secs: u64,
        /// Bytes of text per message.
        #[arg(long, default_value_t = 100)]
        size: usize,
    },
    /// Many idle connections, each joined to a room.
    Idle {
        /// HTTP addresses of the nodes.
        #[arg(long, value_delimiter = ',', required = true)]
        nodes: Vec<String>,
        /// Connections to open.
        #[arg(long, default_value_t = 1000)]
        connections: usize,
        /// How long to hold them, seconds.
        #[arg(long, default_value_t = 30)]
        secs: u64,
    },
}

/// Latency samples in microseconds.
#[derive(Default)]
struct Samples(Vec<u64>);

impl Samples {
    fn summary(&mut self) -> String {
        if self.0.is_empty() {
            return "no samples".into();
        }
        self.0.sort_unstable();
        let q = |p: f64| {
            let i = ((self.0.len() as f64 - 1.0) * p).round() as usize;
            self.0[i] as f64 / 1000.0
        };
        format!(
            "p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} samples)",
            q(0.50),
            q(0.90),
            q(0.99),
            q(1.0),
            self.0.len()
        )
    }
}

struct Totals {
    sent: AtomicU64,
    acked: AtomicU64,
    errors: AtomicU64,
    delivered: AtomicU64,
    ack_latency: Mutex<Samples>,
    delivery_latency: Mutex<Samples>,
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(node: &str, user: &str) -> anyhow::Result<Ws> {
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("ws://{node}/ws?user={user}")).await?;
    // The welcome frame.
    let _ = ws.next().await;
    Ok(ws)
}

async fn join(ws: &mut Ws, room: &str) -> anyhow::Result<()> {
    ws.send(Message::Text(
        json!({"type":"join","ref":"j","room":room})
            .to_string()
            .into(),
    ))
    .await?;
    while let Some(frame) = ws.next().await {
        if let Message::Text(text) = frame? {
            let v: Value = serde_json::from_str(&text)?;
            if v["ref"] == "j" {
                anyhow::ensure!(v["type"] == "joined", "join failed: {v}");
                return Ok(());
            }
        }
    }
    anyhow::bail!("closed while joining")
}

/// Locks a mutex, ignoring poisoning (a panicked task only leaves samples behind).
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        match cli.mode {
            Mode::Chat {
                nodes,
                rooms,
                members,
                rate,
                secs,
                size,
            } => chat(nodes, rooms, members, rate, secs, size).await,
            Mode::Idle {
                nodes,
                connections,
                secs,
            } => idle(nodes, connections, secs).await,
        }
    })
}

async fn chat(
    nodes: Vec<String>,
    rooms: usize,
    members: usize,
    rate: u64,
    secs: u64,
    size: usize,
) -> anyhow::Result<()> {
    let clients = rooms * members;
    anyhow::ensure!(clients > 0 && rate > 0, "need rooms, members and a rate");
    let interval = Duration::from_secs_f64(clients as f64 / rate as f64);
    let totals = Arc::new(Totals {
        sent: AtomicU64::new(0),
        acked: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        delivered: AtomicU64::new(0),
        ack_latency: Mutex::new(Samples::default()),
        delivery_latency: Mutex::new(Samples::default()),
    });
    let epoch = Instant::now();
    println!(
        "chat: {rooms} rooms × {members} members over {} node(s), {rate} msg/s in total ({:.1} per client), {size}-byte texts, {secs} s",
        nodes.len(),
        rate as f64 / clients as f64
    );
    let mut sockets = Vec::with_capacity(clients);
    for i in 0..clients {
        let node = &nodes[i % nodes.len()];
        let room = format!("bench-{}", i % rooms);
        let mut ws = connect(node, &format!("u{i}")).await?;
        join(&mut ws, &room).await?;
        sockets.push((ws, room));
    }
    println!("connected and joined: {} clients", sockets.len());
    let start = Instant::now();
    let deadline = start + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for (i, (ws, room)) in sockets.into_iter().enumerate() {
        let totals = totals.clone();
        let (mut sink, mut stream) = ws.split();
        let pending: Arc<Mutex<std::collections::HashMap<u64, Instant>>> = Arc::default();
        let reader_pending = pending.clone();
        let reader_totals = totals.clone();
        tasks.push(tokio::spawn(async move {
            while let Some(Ok(frame)) = stream.next().await {
                let Message::Text(text) = frame else { continue };
                let Ok(v) = serde_json::from_str::<Value>(&text) else {
                    continue;
                };
                match v["type"].as_str() {
                    Some("ack") => {
                        let sent = v["ref"]
                            .as_u64()
                            .and_then(|r| lock(&reader_pending).remove(&r));
                        if let Some(sent) = sent {
                            reader_totals.acked.fetch_add(1, Ordering::Relaxed);
                            lock(&reader_totals.ack_latency)
                                .0
                                .push(sent.elapsed().as_micros() as u64);
                        }
                    }
                    Some("message") => {
                        let sent_us = v["text"]
                            .as_str()
                            .and_then(|t| t.split(' ').next())
                            .and_then(|t| t.parse::<u64>().ok());
                        if let Some(sent_us) = sent_us {
                            let now_us = epoch.elapsed().as_micros() as u64;
                            reader_totals.delivered.fetch_add(1, Ordering::Relaxed);
                            lock(&reader_totals.delivery_latency)
                                .0
                                .push(now_us.saturating_sub(sent_us));
                        }
                    }
                    Some("error") => {
                        reader_totals.errors.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {}
                }
            }
        }));
        let padding = "x".repeat(size.saturating_sub(16));
        tasks.push(tokio::spawn(async move {
            // Spread the clients' phases so the load is smooth.
            tokio::time::sleep(interval.mul_f64((i % 97) as f64 / 97.0)).await;
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut n = 0u64;
            while Instant::now() < deadline {
                tick.tick().await;
                n += 1;
                let now = Instant::now();
                let text = format!("{} {padding}", epoch.elapsed().as_micros());
                lock(&pending).insert(n, now);
                let frame = json!({"type":"send","ref":n,"room":room,"text":text});
                if sink
                    .send(Message::Text(frame.to_string().into()))
                    .await
                    .is_err()
                {
                    break;
                }
                totals.sent.fetch_add(1, Ordering::Relaxed);
            }
            // Let the last acks arrive, then close.
            tokio::time::sleep(Duration::from_secs(2)).await;
            let _ = sink.close().await;
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
    let elapsed = secs as f64;
    let sent = totals.sent.load(Ordering::Relaxed);
    let acked = totals.acked.load(Ordering::Relaxed);
    println!(
        "sent {sent}, acked {acked} ({:.0} msg/s), errors {}, deliveries {} ({:.0}/s)",
        acked as f64 / elapsed,
        totals.errors.load(Ordering::Relaxed),
        totals.delivered.load(Ordering::Relaxed),
        totals.delivered.load(Ordering::Relaxed) as f64 / elapsed
    );
    println!("send → ack:      {}", lock(&totals.ack_latency).summary());
    println!(
        "send → delivery: {}",
        lock(&totals.delivery_latency).summary()
    );
    Ok(())
}

async fn idle(nodes: Vec<String>, connections: usize, secs: u64) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut held = Vec::with_capacity(connections);
    for i in 0..connections {
        let node = &nodes[i % nodes.len()];
        let mut ws = connect(node, &format!("idle{i}")).await?;
        join(&mut ws, &format!("idle-{}", i % 100)).await?;
        held.push(ws);
        if (i + 1) % 1000 == 0 {
            println!("{} connections", i + 1);
        }
    }
    println!(
        "{connections} connections open and joined in {:.1} s; holding for {secs} s",
        started.elapsed().as_secs_f64()
    );
    // Keep reading so that presence events do not fill the node's queues.
    let mut readers = Vec::new();
    for ws in held {
        readers.push(tokio::spawn(async move {
            let (_sink, mut stream) = ws.split();
            while let Some(Ok(_)) = stream.next().await {}
        }));
    }
    tokio::time::sleep(Duration::from_secs(secs)).await;
    for reader in readers {
        reader.abort();
    }
    Ok(())
}
