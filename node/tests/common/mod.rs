//! Test harness: the real `chat-node` binary in child processes, and a WebSocket client.
//!
//! A [`NodeProcess`] is killed (SIGKILL, its own pid only) when dropped. Waiting is always by
//! polling with a deadline, never by fixed sleeps.

#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long any single expected event may take.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// A port nobody listens on right now (on `ip`).
pub fn free_port(ip: &str) -> u16 {
    TcpListener::bind((ip, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free port")
}

/// A `chat-node` child process.
pub struct NodeProcess {
    child: Option<Child>,
    /// The node's name.
    pub name: String,
    /// Its HTTP / WebSocket address.
    pub http: SocketAddr,
    /// Its data directory (removed when the harness's temp dir is dropped).
    pub data_dir: PathBuf,
    args: Vec<String>,
    log: PathBuf,
    _temp: Option<tempfile::TempDir>,
}

impl NodeProcess {
    /// Starts a single node named `name` with a fresh data directory and `extra` flags, and
    /// waits until `/healthz` answers 200.
    pub fn start(name: &str, extra: &[&str]) -> NodeProcess {
        let temp = tempfile::tempdir().expect("temp dir");
        let data_dir = temp.path().join(name);
        let mut node = NodeProcess::spawn_in(name, "127.0.0.1", &data_dir, extra);
        node._temp = Some(temp);
        node.wait_healthy();
        node
    }

    /// Spawns a node on `ip` with `data_dir`, without waiting for it.
    pub fn spawn_in(name: &str, ip: &str, data_dir: &Path, extra: &[&str]) -> NodeProcess {
        let http: SocketAddr = format!("{ip}:{}", free_port(ip)).parse().expect("addr");
        let mut args = vec![
            "--name".to_owned(),
            name.to_owned(),
            "--listen".to_owned(),
            http.to_string(),
            "--data-dir".to_owned(),
            data_dir.display().to_string(),
            "--log-format".to_owned(),
            "json".to_owned(),
        ];
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        let log = data_dir.with_extension("log");
        let mut node = NodeProcess {
            child: None,
            name: name.to_owned(),
            http,
            data_dir: data_dir.to_owned(),
            args,
            log,
            _temp: None,
        };
        node.launch();
        node
    }

    fn launch(&mut self) {
        std::fs::create_dir_all(self.data_dir.parent().expect("parent")).expect("mkdir");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_chat-node"))
            .args(&self.args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn chat-node");
        self.child = Some(child);
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).expect("not running")
    }

    /// Waits until `/healthz` answers 200.
    pub fn wait_healthy(&self) {
        let deadline = Instant::now() + TIMEOUT * 3;
        loop {
            if let Ok((200, _)) = http_get_blocking(self.http, "/healthz") {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "{} not healthy in time; log:\n{}",
                    self.name,
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The node's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends `signal` (e.g. "KILL", "TERM", "STOP", "CONT") to the process.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{signal} failed");
    }

    /// SIGKILLs the process and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERMs the process and waits for it to exit; returns its exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        self.signal("TERM");
        let mut child = self.child.take()?;
        let deadline = Instant::now() + TIMEOUT * 2;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{} did not exit after SIGTERM", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the process again with the same flags and data directory; waits until healthy.
    pub fn restart(&mut self) {
        self.kill();
        self.launch();
        self.wait_healthy();
    }

    /// Starts the process again without waiting.
    pub fn relaunch(&mut self) {
        self.kill();
        self.launch();
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_ref() {
            // A stopped process ignores SIGKILL until continued on some kernels: continue first.
            let _ = Command::new("kill")
                .arg("-CONT")
                .arg(child.id().to_string())
                .status();
        }
        self.kill();
        if std::thread::panicking() {
            eprintln!("---- log of {} ----\n{}", self.name, self.log_text());
        }
    }
}

/// `GET path` on `addr`: status code and body (blocking, for setup code).
pub fn http_get_blocking(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    parse_response(&response)
}

/// `GET path` on `addr`: status code and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect(addr).await?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    parse_response(&response)
}

fn parse_response(response: &str) -> std::io::Result<(u16, String)> {
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad response: {response:?}")))?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A WebSocket client speaking the protocol.
pub struct Client {
    ws: Ws,
    /// Frames received while waiting for something else, in arrival order.
    pub backlog: std::collections::VecDeque<Value>,
    next_ref: u64,
    /// The welcome frame.
    pub welcome: Value,
}

impl Client {
    /// Connects as `user` (no token) and reads the welcome frame.
    pub async fn connect(addr: SocketAddr, user: &str) -> Client {
        Client::connect_url(&format!("ws://{addr}/ws?user={user}"))
            .await
            .expect("connect")
    }

    /// Connects to `url` and reads the welcome frame; the HTTP error if the upgrade fails.
    pub async fn connect_url(url: &str) -> Result<Client, tokio_tungstenite::tungstenite::Error> {
        let (ws, _) = tokio_tungstenite::connect_async(url).await?;
        let mut client = Client {
            ws,
            backlog: Default::default(),
            next_ref: 1,
            welcome: Value::Null,
        };
        client.welcome = client.recv().await;
        assert_eq!(client.welcome["type"], "welcome", "first frame");
        Ok(client)
    }

    /// Sends a JSON frame.
    pub async fn send(&mut self, frame: Value) {
        self.ws
            .send(Message::Text(frame.to_string().into()))
            .await
            .expect("send");
    }

    /// Sends a raw text frame.
    pub async fn send_text(&mut self, text: &str) {
        self.ws
            .send(Message::Text(text.to_owned().into()))
            .await
            .expect("send");
    }

    /// Sends a raw message (binary, oversized…).
    pub async fn send_message(
        &mut self,
        message: Message,
    ) -> Result<(), tokio_tungstenite::tungstenite::Error> {
        self.ws.send(message).await
    }

    /// The next frame (from the backlog first); panics after [`TIMEOUT`] or on close.
    pub async fn recv(&mut self) -> Value {
        if let Some(frame) = self.backlog.pop_front() {
            return frame;
        }
        self.recv_wire().await
    }

    async fn recv_wire(&mut self) -> Value {
        loop {
            let message = tokio::time::timeout(TIMEOUT, self.ws.next())
                .await
                .expect("timed out waiting for a frame")
                .expect("connection closed")
                .expect("read error");
            match message {
                Message::Text(text) => return serde_json::from_str(&text).expect("JSON frame"),
                Message::Close(frame) => panic!("connection closed: {frame:?}"),
                _ => {}
            }
        }
    }

    /// Waits for the first frame matching `pred`, keeping the others in the backlog.
    pub async fn recv_until(&mut self, mut pred: impl FnMut(&Value) -> bool) -> Value {
        if let Some(i) = self.backlog.iter().position(&mut pred) {
            return self.backlog.remove(i).expect("index");
        }
        loop {
            let frame = self.recv_wire().await;
            if pred(&frame) {
                return frame;
            }
            self.backlog.push_back(frame);
        }
    }

    /// Sends `frame` with a fresh integer `ref` and returns the reply carrying it.
    pub async fn request(&mut self, mut frame: Value) -> Value {
        let reference = self.next_ref;
        self.next_ref += 1;
        frame["ref"] = json!(reference);
        self.send(frame).await;
        self.recv_until(|f| f["ref"] == json!(reference)).await
    }

    /// Joins `room` (optionally with `since`) and returns the `joined` reply.
    pub async fn join(&mut self, room: &str, since: Option<u64>) -> Value {
        let mut frame = json!({"type": "join", "room": room});
        if let Some(since) = since {
            frame["since"] = json!(since);
        }
        let reply = self.request(frame).await;
        assert_eq!(reply["type"], "joined", "join {room}: {reply}");
        reply
    }

    /// Sends `text` to `room` and returns the `ack`'s seq.
    pub async fn say(&mut self, room: &str, text: &str) -> u64 {
        let reply = self
            .request(json!({"type": "send", "room": room, "text": text}))
            .await;
        assert_eq!(reply["type"], "ack", "send to {room}: {reply}");
        reply["seq"].as_u64().expect("seq")
    }

    /// Waits for the `message` event with this seq in `room`.
    pub async fn message(&mut self, room: &str, seq: u64) -> Value {
        self.recv_until(|f| f["type"] == "message" && f["room"] == room && f["seq"] == json!(seq))
            .await
    }

    /// Waits for the connection to be closed by the node; returns the close frame.
    pub async fn closed(&mut self) -> Option<CloseFrame> {
        loop {
            match tokio::time::timeout(TIMEOUT, self.ws.next()).await {
                Err(_) => panic!("connection not closed in time"),
                Ok(None) => return None,
                Ok(Some(Err(_))) => return None,
                Ok(Some(Ok(Message::Close(frame)))) => return frame,
                Ok(Some(Ok(Message::Text(text)))) => {
                    if let Ok(frame) = serde_json::from_str(&text) {
                        self.backlog.push_back(frame);
                    }
                }
                Ok(Some(Ok(_))) => {}
            }
        }
    }

    /// Whether a frame arrives within `wait` (consumes it into the backlog).
    pub async fn quiet_for(&mut self, wait: Duration) -> bool {
        match tokio::time::timeout(wait, self.ws.next()).await {
            Err(_) => true,
            Ok(Some(Ok(Message::Text(text)))) => {
                if let Ok(frame) = serde_json::from_str(&text) {
                    self.backlog.push_back(frame);
                }
                false
            }
            Ok(_) => false,
        }
    }

    /// The raw stream, for tests that need to stop reading.
    pub fn into_inner(self) -> Ws {
        self.ws
    }
}
