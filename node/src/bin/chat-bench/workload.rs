//! The chat workload: connecting the clients, running one rate on them (the `chat` mode), with
//! coordinated-omission-free timing, per-shard histograms and a progress line.

use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::report::{Latency, Step, histogram};

/// A client connection.
pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Connections recording into one histogram set. Per-connection histograms would cost ~140 KB
/// each; a few shards keep lock contention negligible at a fixed memory cost.
const SHARDS: usize = 16;

/// How clients authenticate.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct Auth {
    /// A JWT every connection sends (in the Sec-WebSocket-Protocol header); its `sub` is then the
    /// user of all of them, so the node's --max-connections-per-user must allow the count.
    #[arg(long, conflicts_with = "secret")]
    pub token: Option<String>,
    /// The node's --auth-secret: mint an HS256 token per user, valid for a day.
    #[arg(long)]
    pub secret: Option<String>,
}

impl Auth {
    /// The token `user` connects with, if any.
    fn token_for(&self, user: &str) -> Option<String> {
        if let Some(token) = &self.token {
            return Some(token.clone());
        }
        let secret = self.secret.as_deref()?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let claims = json!({"sub": user, "exp": now + 24 * 3600});
        Some(chat_node::gateway::auth::sign(secret, &claims))
    }
}

/// The shape of the load: who connects where, who sends, how much.
#[derive(clap::Args, Debug, Clone)]
pub struct Workload {
    /// HTTP addresses of the nodes (host:port, comma separated).
    #[arg(long, value_delimiter = ',', required = true)]
    pub nodes: Vec<String>,
    /// Number of rooms.
    #[arg(long, default_value_t = 10)]
    pub rooms: usize,
    /// Members per room (spread over the nodes).
    #[arg(long, default_value_t = 10)]
    pub members: usize,
    /// Members of each room that send [default: all of them].
    #[arg(long)]
    pub senders: Option<usize>,
    /// Bytes of text per message.
    #[arg(long, default_value_t = 100)]
    pub size: usize,
    /// Duration of the measurement, seconds (of each step in a sweep).
    #[arg(long, default_value_t = 20.0)]
    pub secs: f64,
    /// Seconds of load before the measurement, not measured.
    #[arg(long, default_value_t = 0.0)]
    pub warmup: f64,
    /// Longest wait after the last send for outstanding acks and deliveries, seconds.
    #[arg(long, default_value_t = 5.0)]
    pub drain: f64,
    #[command(flatten)]
    pub auth: Auth,
}

impl Workload {
    pub fn senders(&self) -> usize {
        self.senders.unwrap_or(self.members).min(self.members)
    }

    pub fn json(&self) -> Value {
        json!({
            "nodes": self.nodes, "rooms": self.rooms, "members": self.members,
            "senders": self.senders(), "size": self.size, "secs": self.secs,
            "warmup": self.warmup, "drain": self.drain,
        })
    }
}

/// Connects as `user` (with a token if `auth` gives one), from the source address `from` when
/// given, and reads the welcome frame.
pub async fn connect(
    node: &str,
    user: &str,
    auth: &Auth,
    from: Option<std::net::IpAddr>,
) -> anyhow::Result<Ws> {
    let mut request = format!("ws://{node}/ws?user={user}").into_client_request()?;
    if let Some(token) = auth.token_for(user) {
        // In the header rather than the URL, which ends up in access logs.
        request.headers_mut().insert(
            "sec-websocket-protocol",
            format!("chat, token.{token}").parse()?,
        );
    }
    let handshake = async {
        let to = tokio::net::lookup_host(node)
            .await?
            .next()
            .ok_or_else(|| anyhow::anyhow!("{node} resolves to no address"))?;
        let stream = match from {
            Some(from) => {
                let socket = match from {
                    std::net::IpAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
                    std::net::IpAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
                };
                socket.bind((from, 0).into())?;
                socket.connect(to).await?
            }
            None => tokio::net::TcpStream::connect(to).await?,
        };
        // Without Nagle's algorithm, as the node's side: a small frame is not held back.
        stream.set_nodelay(true)?;
        let stream = tokio_tungstenite::MaybeTlsStream::Plain(stream);
        let (ws, _) = tokio_tungstenite::client_async_with_config(request, stream, None).await?;
        anyhow::Ok(ws)
    };
    let mut ws = tokio::time::timeout(Duration::from_secs(10), handshake)
        .await
        .map_err(|_| anyhow::anyhow!("connecting to {node} timed out"))??;
    match ws.next().await {
        Some(Ok(Message::Text(text))) if text.contains("\"welcome\"") => Ok(ws),
        other => anyhow::bail!("no welcome from {node}: {other:?}"),
    }
}

/// Joins `room` and waits for `joined`.
pub async fn join(ws: &mut Ws, room: &str) -> anyhow::Result<()> {
    let frame = json!({"type":"join","ref":"j","room":room});
    ws.send(Message::Text(frame.to_string().into())).await?;
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

/// One client of the workload.
struct Slot {
    index: usize,
    node: String,
    user: String,
    room: String,
    sender: bool,
    ws: Option<Ws>,
}

/// All clients, kept connected from one step to the next.
pub struct Fleet {
    pub workload: Workload,
    slots: Vec<Slot>,
    /// The clock every text's intended time is relative to.
    epoch: Instant,
}

impl Fleet {
    fn new(workload: Workload) -> anyhow::Result<Fleet> {
        let w = &workload;
        anyhow::ensure!(
            w.rooms > 0 && w.members > 0 && w.senders() > 0 && !w.nodes.is_empty(),
            "need nodes, rooms, members and senders"
        );
        anyhow::ensure!(w.secs > 0.0, "need --secs > 0");
        let slots = (0..w.rooms * w.members)
            .map(|i| Slot {
                index: i,
                node: w.nodes[i % w.nodes.len()].clone(),
                user: format!("u{i}"),
                room: format!("bench-{}", i % w.rooms),
                // Client i is member i / rooms of its room.
                sender: i / w.rooms < w.senders(),
                ws: None,
            })
            .collect();
        Ok(Fleet {
            workload,
            slots,
            epoch: Instant::now(),
        })
    }

    /// Connects and joins every client that has no connection; returns how many it opened.
    pub async fn connect_missing(&mut self) -> anyhow::Result<usize> {
        let auth = &self.workload.auth;
        let missing: Vec<&mut Slot> = self.slots.iter_mut().filter(|s| s.ws.is_none()).collect();
        let count = missing.len();
        // A few handshakes at once: the node accepts in parallel, and 1,000 one by one is slow.
        let mut opened = futures_util::stream::iter(missing.into_iter().map(|slot| async move {
            let mut ws = connect(&slot.node, &slot.user, auth, None).await?;
            join(&mut ws, &slot.room).await?;
            slot.ws = Some(ws);
            anyhow::Ok(())
        }))
        .buffer_unordered(32);
        while let Some(result) = opened.next().await {
            result?;
        }
        Ok(count)
    }

    /// Offers `rate` messages per second for warmup + secs and measures the second part.
    pub async fn run(&mut self, rate: f64) -> anyhow::Result<Step> {
        let w = self.workload.clone();
        anyhow::ensure!(rate > 0.0, "need a rate > 0");
        let senders = w.rooms * w.senders();
        let interval_secs = senders as f64 / rate;
        let start = Instant::now() + Duration::from_millis(100);
        let measure_from = start + Duration::from_secs_f64(w.warmup);
        let measure_to = measure_from + Duration::from_secs_f64(w.secs);
        let shared = Arc::new(Shared {
            window_us: (
                micros(measure_from - self.epoch),
                micros(measure_to - self.epoch),
            ),
            epoch: self.epoch,
            counters: Counters::default(),
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
        });
        let (stop_tx, stop_rx) = watch::channel(false);
        let padding = Arc::<str>::from("x".repeat(w.size));
        let mut readers = Vec::new();
        let mut writers = Vec::new();
        for slot in &mut self.slots {
            let Some(ws) = slot.ws.take() else { continue };
            let (sink, stream) = ws.split();
            let shard = slot.index % SHARDS;
            readers.push((
                slot.index,
                tokio::spawn(read(stream, shared.clone(), shard, stop_rx.clone())),
            ));
            let schedule = Schedule {
                // Spread the senders' phases so the load is smooth.
                first: start
                    + Duration::from_secs_f64(
                        interval_secs * (slot.index as f64 * 0.618_033_988_7).fract(),
                    ),
                interval_secs,
                end: measure_to,
            };
            let (sender, room, shared, padding) = (
                slot.sender,
                slot.room.clone(),
                shared.clone(),
                padding.clone(),
            );
            writers.push(tokio::spawn(async move {
                if sender {
                    write(sink, schedule, room, padding, shared).await
                } else {
                    Some(sink)
                }
            }));
        }
        let progress = tokio::spawn(progress(shared.clone(), rate, start, measure_from));
        let members = w.members as u64;
        let drain_until = measure_to + Duration::from_secs_f64(w.drain);
        // The writers end after their last send; one stuck on a node that stopped reading is
        // given up at the end of the drain.
        let mut sinks = Vec::with_capacity(writers.len());
        for writer in writers {
            let abort = writer.abort_handle();
            match tokio::time::timeout_at(drain_until.into(), writer).await {
                Ok(sink) => sinks.push(sink?),
                Err(_) => {
                    abort.abort();
                    sinks.push(None);
                }
            }
        }
        while Instant::now() < drain_until {
            let c = &shared.counters;
            let sent = c.measured_sent.load(Ordering::Relaxed);
            if c.measured_acked.load(Ordering::Relaxed) >= sent
                && c.measured_delivered.load(Ordering::Relaxed) >= sent * members
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = stop_tx.send(true);
        progress.abort();
        let mut lost = 0;
        for ((index, reader), sink) in readers.into_iter().zip(sinks) {
            match (reader.await?, sink) {
                (Some(stream), Some(sink)) => self.slots[index].ws = stream.reunite(sink).ok(),
                _ => lost += 1,
            }
        }
        let (mut ack, mut delivery) = (histogram(), histogram());
        for shard in &shared.shards {
            let shard = lock(shard);
            ack.add(&shard.ack)?;
            delivery.add(&shard.delivery)?;
        }
        let c = &shared.counters;
        let offered = c.measured_offered.load(Ordering::Relaxed);
        Ok(Step {
            rate,
            secs: w.secs,
            offered,
            sent: c.measured_sent.load(Ordering::Relaxed),
            acked: c.measured_acked.load(Ordering::Relaxed),
            deliveries: c.measured_delivered.load(Ordering::Relaxed),
            expected_deliveries: offered * members,
            errors: c.errors.load(Ordering::Relaxed),
            lost_connections: lost,
            ack: Latency::of(&ack),
            delivery: Latency::of(&delivery),
        })
    }
}

fn micros(d: Duration) -> u64 {
    d.as_micros().try_into().unwrap_or(u64::MAX)
}

/// Locks a mutex, ignoring poisoning (a panicked task only leaves samples behind).
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Default)]
struct Counters {
    sent: AtomicU64,
    acked: AtomicU64,
    delivered: AtomicU64,
    errors: AtomicU64,
    measured_offered: AtomicU64,
    measured_sent: AtomicU64,
    measured_acked: AtomicU64,
    measured_delivered: AtomicU64,
}

/// Histograms of the connections of one shard: the measured window, and the last second (for
/// the progress line, emptied by it).
struct Shard {
    ack: Histogram<u64>,
    delivery: Histogram<u64>,
    recent_ack: Histogram<u64>,
    recent_delivery: Histogram<u64>,
}

impl Default for Shard {
    fn default() -> Shard {
        Shard {
            ack: histogram(),
            delivery: histogram(),
            recent_ack: histogram(),
            recent_delivery: histogram(),
        }
    }
}

/// What the tasks of one run share.
struct Shared {
    epoch: Instant,
    /// Intended send times measured: from ≤ t < to, microseconds since `epoch`.
    window_us: (u64, u64),
    counters: Counters,
    shards: Vec<Mutex<Shard>>,
}

impl Shared {
    fn measured(&self, intended_us: u64) -> bool {
        (self.window_us.0..self.window_us.1).contains(&intended_us)
    }
}

/// A sender's intended send times: first, first + interval, … before end.
struct Schedule {
    first: Instant,
    interval_secs: f64,
    end: Instant,
}

/// Sends on schedule; returns the sink, or None if the connection failed.
async fn write(
    mut sink: SplitSink<Ws, Message>,
    schedule: Schedule,
    room: String,
    padding: Arc<str>,
    shared: Arc<Shared>,
) -> Option<SplitSink<Ws, Message>> {
    let c = &shared.counters;
    let mut alive = true;
    for k in 0u64.. {
        let intended = schedule.first + Duration::from_secs_f64(k as f64 * schedule.interval_secs);
        if intended >= schedule.end {
            break;
        }
        let intended_us = micros(intended - shared.epoch);
        let measured = shared.measured(intended_us);
        if measured {
            c.measured_offered.fetch_add(1, Ordering::Relaxed);
        }
        if !alive {
            // Still counted as offered: a lost connection is a failure of the run.
            continue;
        }
        tokio::time::sleep_until(intended.into()).await;
        // The ref and the text carry the intended time: a late send counts its own delay.
        let mut text = format!("{intended_us} ");
        // ASCII padding: any length is a char boundary. The text is --size bytes, or just the
        // time when --size is shorter than that.
        text.push_str(&padding[..padding.len().saturating_sub(text.len())]);
        let frame = json!({"type":"send","ref":intended_us,"room":room,"text":text});
        if sink
            .send(Message::Text(frame.to_string().into()))
            .await
            .is_err()
        {
            alive = false;
            continue;
        }
        c.sent.fetch_add(1, Ordering::Relaxed);
        if measured {
            c.measured_sent.fetch_add(1, Ordering::Relaxed);
        }
    }
    alive.then_some(sink)
}

/// The fields of a frame from the node that the workload reads.
#[derive(Deserialize)]
struct Frame<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(rename = "ref")]
    reference: Option<Value>,
    #[serde(borrow)]
    text: Option<Cow<'a, str>>,
}

/// Reads acks and deliveries until told to stop; returns the stream, or None if it closed.
async fn read(
    mut stream: SplitStream<Ws>,
    shared: Arc<Shared>,
    shard: usize,
    mut stop: watch::Receiver<bool>,
) -> Option<SplitStream<Ws>> {
    let c = &shared.counters;
    loop {
        let frame = tokio::select! {
            _ = stop.wait_for(|stop| *stop) => return Some(stream),
            frame = stream.next() => frame,
        };
        let text = match frame {
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => return None,
        };
        let Ok(frame) = serde_json::from_str::<Frame<'_>>(&text) else {
            continue;
        };
        let now_us = micros(shared.epoch.elapsed());
        let (intended_us, acked) = match &*frame.kind {
            "ack" => (frame.reference.as_ref().and_then(Value::as_u64), true),
            "message" => (
                frame
                    .text
                    .as_deref()
                    .and_then(|t| t.split(' ').next())
                    .and_then(|t| t.parse::<u64>().ok()),
                false,
            ),
            "error" => {
                c.errors.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            _ => continue,
        };
        let Some(intended_us) = intended_us else {
            continue;
        };
        let latency_us = now_us.saturating_sub(intended_us);
        let measured = shared.measured(intended_us);
        let mut shard = lock(&shared.shards[shard]);
        if acked {
            c.acked.fetch_add(1, Ordering::Relaxed);
            shard.recent_ack.saturating_record(latency_us);
            if measured {
                c.measured_acked.fetch_add(1, Ordering::Relaxed);
                shard.ack.saturating_record(latency_us);
            }
        } else {
            c.delivered.fetch_add(1, Ordering::Relaxed);
            shard.recent_delivery.saturating_record(latency_us);
            if measured {
                c.measured_delivered.fetch_add(1, Ordering::Relaxed);
                shard.delivery.saturating_record(latency_us);
            }
        }
    }
}

/// Prints one line a second on stderr: the offered rate, what was sent, acked and delivered in
/// the last second, errors so far, and the p99 latencies of the last second.
async fn progress(shared: Arc<Shared>, rate: f64, start: Instant, measure_from: Instant) {
    let c = &shared.counters;
    let mut tick = tokio::time::interval_at(
        (start + Duration::from_secs(1)).into(),
        Duration::from_secs(1),
    );
    let mut last = (0, 0, 0);
    loop {
        let now = tick.tick().await.into_std();
        let (mut ack, mut delivery) = (histogram(), histogram());
        for shard in &shared.shards {
            let mut shard = lock(shard);
            let _ = ack.add(&shard.recent_ack);
            let _ = delivery.add(&shard.recent_delivery);
            shard.recent_ack.reset();
            shard.recent_delivery.reset();
        }
        let counts = (
            c.sent.load(Ordering::Relaxed),
            c.acked.load(Ordering::Relaxed),
            c.delivered.load(Ordering::Relaxed),
        );
        let phase = if now <= measure_from {
            "warmup"
        } else {
            "measure"
        };
        eprintln!(
            "[{:>4.0} s {phase:<7}] offered {rate:.0}/s  sent {:>7}/s  acked {:>7}/s  delivered {:>8}/s  errors {:>5}  p99 ack {:>8.2} ms  delivery {:>8.2} ms",
            (now - start).as_secs_f64(),
            counts.0 - last.0,
            counts.1 - last.1,
            counts.2 - last.2,
            c.errors.load(Ordering::Relaxed),
            Latency::of(&ack).p99,
            Latency::of(&delivery).p99,
        );
        last = counts;
    }
}

/// Writes the final JSON (stdout) and the human summary (stderr with --json, else stdout).
pub fn say(json: bool, text: &str) {
    if json {
        eprintln!("{text}");
    } else {
        println!("{text}");
    }
}

/// Connects the clients, saying so.
pub async fn open(workload: Workload, json: bool) -> anyhow::Result<Fleet> {
    let w = &workload;
    say(
        json,
        &format!(
            "{} rooms × {} members ({} sending) over {} node(s), {}-byte texts, warmup {} s, {} s measured",
            w.rooms,
            w.members,
            w.senders(),
            w.nodes.len(),
            w.size,
            w.warmup,
            w.secs
        ),
    );
    let mut fleet = Fleet::new(workload)?;
    let started = Instant::now();
    let count = fleet.connect_missing().await?;
    say(
        json,
        &format!(
            "connected and joined: {count} clients in {:.1} s",
            started.elapsed().as_secs_f64()
        ),
    );
    Ok(fleet)
}

/// `chat`: one run at one rate.
pub async fn chat(workload: Workload, rate: f64, json: bool) -> anyhow::Result<()> {
    let mut fleet = open(workload, json).await?;
    let step = fleet.run(rate).await?;
    say(json, &step.text());
    if json {
        let mut out = step.json();
        out["mode"] = "chat".into();
        out["workload"] = fleet.workload.json();
        println!("{out}");
    }
    Ok(())
}
