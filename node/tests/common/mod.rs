//! Test harness: the real `chat-node` binary in child processes, and a WebSocket client.
//!
//! A [`NodeProcess`] is killed (SIGKILL, its own pid only) when dropped. Waiting is always by
//! polling with a deadline, never by fixed sleeps.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod capture;
pub mod cluster;
pub mod netns;

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

/// Reports that the calling test cannot run on this machine: it is printed (`SKIPPED <test>:
/// <why>`) and appended to the file named by `CHAT_SKIPPED_LOG`, which `tests/run` counts and
/// lists at the end. Where every suite must run (`CI=true`: CI machines have root and Docker),
/// a skip is a failure.
pub fn skip(why: &str) {
    let test = std::thread::current()
        .name()
        .unwrap_or("unnamed test")
        .to_owned();
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{test} cannot run here ({why}); on CI every suite must run"
    );
    println!("SKIPPED {test}: {why}");
    if let Ok(path) = std::env::var("CHAT_SKIPPED_LOG") {
        use std::io::Write as _;
        if let Ok(mut log) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = writeln!(log, "{test}: {why}");
        }
    }
}

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
    env: Vec<(String, String)>,
    log: PathBuf,
    _temp: Option<tempfile::TempDir>,
    /// A command the binary is launched through (e.g. `ip netns exec NS`); empty: run directly.
    prefix: Vec<String>,
}

impl NodeProcess {
    /// Starts a single node named `name` with a fresh data directory and `extra` flags, and
    /// waits until `/healthz` answers 200.
    pub fn start(name: &str, extra: &[&str]) -> NodeProcess {
        NodeProcess::start_with_env(name, extra, &[])
    }

    /// Like [`NodeProcess::start`], with extra environment variables (`CHAT_*` settings).
    pub fn start_with_env(name: &str, extra: &[&str], env: &[(&str, &str)]) -> NodeProcess {
        let temp = tempfile::tempdir().expect("temp dir");
        let data_dir = temp.path().join(name);
        let mut node = NodeProcess::build(name, "127.0.0.1", &data_dir, extra);
        node.env = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        node.launch();
        node._temp = Some(temp);
        node.wait_healthy();
        node
    }

    /// Like [`NodeProcess::start`], launched through `prefix` (a program that execs the node,
    /// such as `prlimit --nofile=N`: the child's pid is still the node's).
    pub fn start_through(name: &str, prefix: &[&str], extra: &[&str]) -> NodeProcess {
        let temp = tempfile::tempdir().expect("temp dir");
        let data_dir = temp.path().join(name);
        let mut node = NodeProcess::build(name, "127.0.0.1", &data_dir, extra);
        node.prefix = prefix.iter().map(|s| (*s).to_owned()).collect();
        node.launch();
        node._temp = Some(temp);
        node.wait_healthy();
        node
    }

    /// Spawns a node on `ip` with `data_dir`, without waiting for it.
    pub fn spawn_in(name: &str, ip: &str, data_dir: &Path, extra: &[&str]) -> NodeProcess {
        let mut node = NodeProcess::build(name, ip, data_dir, extra);
        node.launch();
        node
    }

    /// Spawns a node inside the network namespace `netns` (through `ip netns exec`, which execs
    /// the binary: the child's pid is the node's) with its HTTP listener on `http`, without
    /// waiting for it. The address belongs to the namespace, so no port is probed here.
    pub fn spawn_in_netns(
        name: &str,
        netns: &str,
        http: SocketAddr,
        data_dir: &Path,
        extra: &[&str],
    ) -> NodeProcess {
        let mut node = NodeProcess::build_at(name, http, data_dir, extra);
        node.prefix = ["ip", "netns", "exec", netns]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        node.launch();
        node
    }

    fn build(name: &str, ip: &str, data_dir: &Path, extra: &[&str]) -> NodeProcess {
        let http: SocketAddr = format!("{ip}:{}", free_port(ip)).parse().expect("addr");
        NodeProcess::build_at(name, http, data_dir, extra)
    }

    fn build_at(name: &str, http: SocketAddr, data_dir: &Path, extra: &[&str]) -> NodeProcess {
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
        NodeProcess {
            child: None,
            name: name.to_owned(),
            http,
            data_dir: data_dir.to_owned(),
            args,
            env: Vec::new(),
            log,
            _temp: None,
            prefix: Vec::new(),
        }
    }

    fn launch(&mut self) {
        std::fs::create_dir_all(self.data_dir.parent().expect("parent")).expect("mkdir");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let mut command = match self.prefix.split_first() {
            None => Command::new(env!("CARGO_BIN_EXE_chat-node")),
            Some((program, prefix_args)) => {
                let mut command = Command::new(program);
                command
                    .args(prefix_args)
                    .arg(env!("CARGO_BIN_EXE_chat-node"));
                command
            }
        };
        let child = command
            .args(&self.args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .envs(self.env.iter().map(|(k, v)| (k, v)))
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

    /// Whether the process is still running (it did not exit, by itself or killed).
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|child| matches!(child.try_wait(), Ok(None)))
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

    /// Waits (without signalling) for the process to exit; returns its exit code.
    pub fn wait_exit(&mut self) -> Option<i32> {
        let mut child = self.child.take().expect("not running");
        let deadline = Instant::now() + TIMEOUT * 2;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{} did not exit in time", self.name);
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

/// Waits until `child` exits by itself; kills it and panics, naming it `what`, if it is still
/// running after `timeout`.
pub fn wait_for_exit(child: &mut Child, timeout: Duration, what: &str) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not exit by itself within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs the binary with `args` and `env` until it exits by itself; its exit code and stderr.
/// Panics (after killing it) if it is still running after [`TIMEOUT`].
pub fn run_to_exit(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    use std::io::Read;
    let mut command = Command::new(env!("CARGO_BIN_EXE_chat-node"));
    // Only the settings the test gives: none inherited from the environment running the tests.
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("CHAT_") {
            command.env_remove(key);
        }
    }
    let mut child = command
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn chat-node");
    let status = wait_for_exit(&mut child, TIMEOUT, &format!("chat-node {args:?}"));
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        let _ = pipe.read_to_string(&mut stderr);
    }
    (status.code(), stderr)
}

/// An HTTP response.
#[derive(Debug)]
pub struct HttpResponse {
    /// The status code.
    pub status: u16,
    /// Header names (lower case) and values, in order.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: String,
}

impl HttpResponse {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body parsed as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", self.body))
    }
}

/// `GET path` on `addr`: status, headers and body.
pub async fn http_request(addr: SocketAddr, path: &str) -> HttpResponse {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .expect("write request");
    let mut response = String::new();
    tokio::time::timeout(TIMEOUT, stream.read_to_string(&mut response))
        .await
        .expect("response in time")
        .expect("read response");
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("bad response: {response:?}"));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line: {head:?}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    HttpResponse {
        status,
        headers,
        body: body.to_owned(),
    }
}

/// The `/metrics` text of the node at `addr`.
pub async fn metrics_text(addr: SocketAddr) -> String {
    let response = http_request(addr, "/metrics").await;
    assert_eq!(response.status, 200, "/metrics: {}", response.body);
    response.body
}

/// The value of one series (`name` or `name{label="v"}`, exactly as rendered) in Prometheus text.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// Polls `/metrics` until `series` satisfies `pred`; returns its value.
pub async fn wait_metric(addr: SocketAddr, series: &str, pred: impl Fn(f64) -> bool) -> f64 {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let text = metrics_text(addr).await;
        let value = metric(&text, series);
        if let Some(v) = value
            && pred(v)
        {
            return v;
        }
        if Instant::now() > deadline {
            panic!("{series} never got the expected value (last {value:?}); metrics:\n{text}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The HTTP status of a WebSocket upgrade of `path` (with its query) on `addr`: 101 when the
/// upgrade succeeds (the connection is then dropped).
pub async fn upgrade_status(addr: SocketAddr, path: &str) -> u16 {
    use tokio_tungstenite::tungstenite::Error;
    match tokio_tungstenite::connect_async(format!("ws://{addr}{path}")).await {
        Ok(_) => 101,
        Err(Error::Http(response)) => response.status().as_u16(),
        Err(e) => panic!("upgrade of {path} failed without an HTTP answer: {e}"),
    }
}

/// A JWT signed HS256 with `secret`: base64url(header).base64url(claims).signature.
pub fn jwt(secret: &str, header: &Value, claims: &Value) -> String {
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use hmac::{Hmac, KeyInit, Mac};
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).expect("hmac key");
    mac.update(signing_input.as_bytes());
    let signature = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    format!("{signing_input}.{signature}")
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64
}

/// Asserts that `ts` is a millisecond timestamp within `[from_ms, to_ms]`.
#[track_caller]
pub fn assert_ts_within(ts: &Value, from_ms: u64, to_ms: u64) {
    let ts = ts
        .as_u64()
        .unwrap_or_else(|| panic!("ts is not an integer: {ts}"));
    assert!(
        (from_ms..=to_ms).contains(&ts),
        "ts {ts} not within [{from_ms}, {to_ms}]"
    );
}

/// Asserts that `frame` is exactly an error with `code`, the given `ref` (or none) and a
/// non-empty human-readable message.
#[track_caller]
pub fn assert_error(frame: &Value, reference: Option<Value>, code: &str) {
    let message = &frame["message"];
    assert!(
        message.as_str().is_some_and(|m| !m.is_empty()),
        "error message should be a non-empty string: {frame}"
    );
    let mut expected = json!({"type": "error", "code": code, "message": message});
    if let Some(reference) = reference {
        expected["ref"] = reference;
    }
    assert_eq!(*frame, expected);
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

/// A client's WebSocket.
pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

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

    /// Connects as `user` over a socket whose kernel receive buffer is `bytes` (no autotuning),
    /// so a client that does not read soon leaves what it was sent queued at the node.
    pub async fn connect_with_receive_buffer(addr: SocketAddr, user: &str, bytes: u32) -> Client {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(bytes).expect("SO_RCVBUF");
        let stream = socket.connect(addr).await.expect("connect");
        let url = format!("ws://{addr}/ws?user={user}");
        let stream = tokio_tungstenite::MaybeTlsStream::Plain(stream);
        let (ws, _) = tokio_tungstenite::client_async(url, stream)
            .await
            .expect("upgrade");
        Client::welcomed(ws).await
    }

    /// Connects to `url` and reads the welcome frame; the HTTP error if the upgrade fails.
    pub async fn connect_url(url: &str) -> Result<Client, tokio_tungstenite::tungstenite::Error> {
        let (ws, _) = tokio_tungstenite::connect_async(url).await?;
        Ok(Client::welcomed(ws).await)
    }

    /// A client on `ws`, once it read the welcome frame.
    async fn welcomed(ws: Ws) -> Client {
        let mut client = Client {
            ws,
            backlog: Default::default(),
            next_ref: 1,
            welcome: Value::Null,
        };
        client.welcome = client.recv().await;
        assert_eq!(client.welcome["type"], "welcome", "first frame");
        client
    }

    /// Opens a WebSocket to `url` offering `subprotocols` (`Sec-WebSocket-Protocol`), without
    /// reading any frame; the HTTP error if the upgrade fails.
    pub async fn open_with_subprotocols(
        url: &str,
        subprotocols: &str,
    ) -> Result<Ws, tokio_tungstenite::tungstenite::Error> {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let mut request = url.into_client_request()?;
        request.headers_mut().insert(
            "sec-websocket-protocol",
            subprotocols.parse().expect("header value"),
        );
        let (ws, response) = tokio_tungstenite::connect_async(request).await?;
        assert_eq!(
            response
                .headers()
                .get("sec-websocket-protocol")
                .and_then(|v| v.to_str().ok()),
            Some("chat"),
            "the node answers the `chat` subprotocol"
        );
        Ok(ws)
    }

    /// Wraps an open socket whose welcome frame has not come yet (`welcome` stays null): for
    /// connections that authenticate with their first frame.
    pub fn unwelcomed(ws: Ws) -> Client {
        Client {
            ws,
            backlog: Default::default(),
            next_ref: 1,
            welcome: Value::Null,
        }
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

    /// Sends `text` with client message id `id` (so a retry is stored once) until it is
    /// acknowledged, retrying on `unavailable` only; its seq. Panics once `deadline` has passed.
    pub async fn send_until_acked(
        &mut self,
        room: &str,
        text: &str,
        id: &str,
        deadline: Instant,
    ) -> u64 {
        loop {
            let reply = self
                .request(json!({"type": "send", "room": room, "text": text, "id": id}))
                .await;
            match reply["type"].as_str() {
                Some("ack") => {
                    assert_eq!(reply["room"], room, "{reply}");
                    return reply["seq"]
                        .as_u64()
                        .unwrap_or_else(|| panic!("ack without seq: {reply}"));
                }
                Some("error") if reply["code"] == "unavailable" => {}
                _ => panic!("send {text:?} to {room}: unexpected reply {reply}"),
            }
            assert!(
                Instant::now() < deadline,
                "send {text:?} to {room} not acked in time; last reply {reply}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends every text to `room` at once (pipelined), then waits for each `ack`; returns their
    /// seqs in the order of `texts`.
    pub async fn say_many(&mut self, room: &str, texts: &[String]) -> Vec<u64> {
        let first = self.next_ref;
        for text in texts {
            let reference = self.next_ref;
            self.next_ref += 1;
            self.send(json!({"type": "send", "ref": reference, "room": room, "text": text}))
                .await;
        }
        let mut seqs = Vec::with_capacity(texts.len());
        for reference in first..self.next_ref {
            let reply = self.recv_until(|f| f["ref"] == json!(reference)).await;
            assert_eq!(reply["type"], "ack", "send to {room}: {reply}");
            seqs.push(reply["seq"].as_u64().expect("seq"));
        }
        seqs
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

    /// Like [`Client::closed`], but `None` instead of a panic when the connection is not closed
    /// within `wait`; `Some(None)` when it ended without a close frame (EOF or reset).
    pub async fn closed_within(&mut self, wait: Duration) -> Option<Option<CloseFrame>> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => return None,
                Ok(None | Some(Err(_))) => return Some(None),
                Ok(Some(Ok(Message::Close(frame)))) => return Some(frame),
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

    /// Sends `frame` with `reference` as its `ref` and returns the reply carrying it.
    pub async fn request_with_ref(&mut self, mut frame: Value, reference: Value) -> Value {
        frame["ref"] = reference.clone();
        self.send(frame).await;
        self.recv_until(|f| f["ref"] == reference).await
    }

    /// Pings with a fresh `ref` and asserts the exact `pong`: the connection is open and served.
    pub async fn assert_alive(&mut self) {
        let reference = self.next_ref;
        let pong = self.request(json!({"type": "ping"})).await;
        assert_eq!(pong, json!({"type": "pong", "ref": reference}));
    }

    /// The `message` events of `room`, in arrival order, up to and including the one with `seq`
    /// (other frames stay in the backlog).
    pub async fn messages_until(&mut self, room: &str, seq: u64) -> Vec<Value> {
        let mut messages = Vec::new();
        loop {
            let m = self
                .recv_until(|f| f["type"] == "message" && f["room"] == room)
                .await;
            let last = m["seq"] == json!(seq);
            messages.push(m);
            if last {
                return messages;
            }
        }
    }

    /// The next frame, or `None` once the connection is closed or broken (for tests that kill
    /// the node); panics after [`TIMEOUT`].
    pub async fn next_or_closed(&mut self) -> Option<Value> {
        if let Some(frame) = self.backlog.pop_front() {
            return Some(frame);
        }
        loop {
            match tokio::time::timeout(TIMEOUT, self.ws.next()).await {
                Err(_) => panic!("timed out waiting for a frame or the close"),
                Ok(None | Some(Err(_)) | Some(Ok(Message::Close(_)))) => return None,
                Ok(Some(Ok(Message::Text(text)))) => {
                    return Some(serde_json::from_str(&text).expect("JSON frame"));
                }
                Ok(Some(Ok(_))) => {}
            }
        }
    }

    /// Closes the connection from the client side and waits until it is gone.
    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
        while let Ok(Some(Ok(_))) = tokio::time::timeout(TIMEOUT, self.ws.next()).await {}
    }

    /// Asserts that nothing is left unread in the backlog and that no frame arrives within
    /// `wait` (the only place a test waits for time to pass: to prove that nothing happens).
    pub async fn assert_quiet(&mut self, wait: Duration) {
        assert!(
            self.backlog.is_empty(),
            "unexpected frames: {:?}",
            self.backlog
        );
        let quiet = self.quiet_for(wait).await;
        assert!(quiet, "unexpected frame: {:?}", self.backlog);
    }

    /// The raw stream, for tests that need to stop reading.
    pub fn into_inner(self) -> Ws {
        self.ws
    }

    /// Sends a JSON frame; `false` (instead of a panic) when the connection is gone, for tests
    /// that kill the client's node.
    pub async fn try_send(&mut self, frame: Value) -> bool {
        self.ws
            .send(Message::Text(frame.to_string().into()))
            .await
            .is_ok()
    }

    /// The next frame (from the backlog first) if one arrives within `wait`, without panicking
    /// on a timeout or on the connection's end: for tests that read while they do other things
    /// and for tests that kill the client's node.
    pub async fn poll_frame(&mut self, wait: Duration) -> Polled {
        if let Some(frame) = self.backlog.pop_front() {
            return Polled::Frame(frame);
        }
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => return Polled::Quiet,
                Ok(None | Some(Err(_)) | Some(Ok(Message::Close(_)))) => return Polled::Closed,
                Ok(Some(Ok(Message::Text(text)))) => {
                    return Polled::Frame(serde_json::from_str(&text).expect("JSON frame"));
                }
                Ok(Some(Ok(_))) => {}
            }
        }
    }
}

/// What [`Client::poll_frame`] saw.
#[derive(Debug)]
pub enum Polled {
    /// A frame.
    Frame(Value),
    /// Nothing within the wait.
    Quiet,
    /// The connection ended (close frame, EOF or error).
    Closed,
}
