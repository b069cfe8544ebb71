//! `chat-bench baseline`: a minimal broadcast chat server, to tell what the node's design costs
//! against the least a server must do for the same workload.
//!
//! It speaks exactly the frames chat-bench uses: `welcome` on connect, `join` → `joined`,
//! `send` → `message` to every member of the room (the sender included) then `ack` with the
//! room's `seq`; anything else gets `error` `bad_request`. In memory only: no storage, no
//! replication, no actors, no auth (a `Sec-WebSocket-Protocol` offer of `chat` is answered so
//! clients with tokens connect). Each room is a lock over its sequence number and its members'
//! outgoing queues; a member whose queue is full is dropped from the room, and a client whose
//! replies no longer fit is cut off.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};

/// Frames queued for one connection before it counts as too slow and is cut off.
const QUEUE_FRAMES: usize = 4096;

type Outbox = mpsc::Sender<Message>;

/// One room: its last sequence number and its members' queues.
#[derive(Default)]
struct Room {
    seq: u64,
    members: Vec<(u64, Outbox)>,
}

#[derive(Default)]
struct Rooms {
    by_name: Mutex<HashMap<String, Arc<Mutex<Room>>>>,
}

impl Rooms {
    fn get(&self, name: &str) -> Arc<Mutex<Room>> {
        let mut rooms = lock(&self.by_name);
        rooms.entry(name.to_owned()).or_default().clone()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

fn text(v: Value) -> Message {
    Message::Text(v.to_string().into())
}

/// Serves until the process is stopped.
pub async fn serve(listen: &str) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    eprintln!("baseline listening on {}", listener.local_addr()?);
    let rooms = Arc::new(Rooms::default());
    let ids = AtomicU64::new(0);
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let id = ids.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(connection(stream, id, rooms.clone()));
    }
}

#[expect(
    clippy::result_large_err,
    reason = "the handshake callback's error type is tungstenite's HTTP response"
)]
async fn connection(stream: TcpStream, id: u64, rooms: Arc<Rooms>) {
    let mut user = String::from("anonymous");
    let callback = |request: &Request, mut response: Response| {
        if let Some(name) = request
            .uri()
            .query()
            .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("user=")))
        {
            user = name.to_owned();
        }
        let offers_chat = request
            .headers()
            .get("sec-websocket-protocol")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.split(',').any(|p| p.trim() == "chat"));
        if offers_chat {
            response.headers_mut().insert(
                "sec-websocket-protocol",
                tokio_tungstenite::tungstenite::http::HeaderValue::from_static("chat"),
            );
        }
        Ok(response)
    };
    let Ok(ws) = tokio_tungstenite::accept_hdr_async(stream, callback).await else {
        return;
    };
    let (mut sink, mut source) = ws.split();
    let (out_tx, mut out_rx) = mpsc::channel::<Message>(QUEUE_FRAMES);
    let writer = tokio::spawn(async move {
        while let Some(frame) = out_rx.recv().await {
            // Batch what is queued into one flush.
            if sink.feed(frame).await.is_err() {
                return;
            }
            while let Ok(frame) = out_rx.try_recv() {
                if sink.feed(frame).await.is_err() {
                    return;
                }
            }
            if sink.flush().await.is_err() {
                return;
            }
        }
    });
    let welcome =
        json!({"type":"welcome","node":"baseline","user":user,"session":format!("{id:016x}")});
    let mut joined: HashMap<String, Arc<Mutex<Room>>> = HashMap::new();
    if out_tx.send(text(welcome)).await.is_ok() {
        while let Some(Ok(frame)) = source.next().await {
            let Message::Text(frame) = frame else {
                continue;
            };
            let reply = handle(&frame, id, &user, &out_tx, &rooms, &mut joined);
            // A full queue means a client too slow to read: cut it off.
            if out_tx.try_send(text(reply)).is_err() {
                break;
            }
        }
    }
    for room in joined.into_values() {
        lock(&room).members.retain(|(member, _)| *member != id);
    }
    writer.abort();
}

/// Handles one request; returns the reply.
fn handle(
    frame: &str,
    id: u64,
    user: &str,
    out_tx: &Outbox,
    rooms: &Rooms,
    joined: &mut HashMap<String, Arc<Mutex<Room>>>,
) -> Value {
    let Ok(request) = serde_json::from_str::<Value>(frame) else {
        return json!({"type":"error","code":"bad_request","message":"not JSON"});
    };
    let reference = request["ref"].clone();
    let Some(name) = request["room"].as_str() else {
        return json!({"type":"error","ref":reference,"code":"bad_request","message":"no room"});
    };
    match request["type"].as_str() {
        Some("join") => {
            let room = rooms.get(name);
            let seq = {
                let mut state = lock(&room);
                if !state.members.iter().any(|(member, _)| *member == id) {
                    state.members.push((id, out_tx.clone()));
                }
                state.seq
            };
            joined.insert(name.to_owned(), room);
            json!({"type":"joined","ref":reference,"room":name,"seq":seq})
        }
        Some("send") => {
            let Some(room) = joined.get(name) else {
                return json!({"type":"error","ref":reference,"code":"not_joined","message":"join the room first"});
            };
            let mut state = lock(room);
            state.seq += 1;
            let seq = state.seq;
            let ts = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            // Encoded once, shared by every member's queue.
            let event = text(json!({"type":"message","room":name,"seq":seq,"from":user,
                "text":request["text"],"ts":ts}));
            // Members too slow to keep up are dropped from the room (their queue is full).
            state
                .members
                .retain(|(_, member)| member.try_send(event.clone()).is_ok());
            json!({"type":"ack","ref":reference,"room":name,"seq":seq})
        }
        _ => {
            json!({"type":"error","ref":reference,"code":"bad_request","message":"unsupported request"})
        }
    }
}
