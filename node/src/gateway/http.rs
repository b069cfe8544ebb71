//! The HTTP server: the WebSocket endpoint and the plain endpoints on the same port.
//!
//! | path | answer |
//! | --- | --- |
//! | `GET /` (and `/app.js`, `/style.css`) | the web chat client, embedded in the binary |
//! | `GET /ws?user=NAME[&token=JWT]` | the WebSocket upgrade (400 bad name, 401 bad token, 429 over a per-user or per-address cap, 503 full) |
//! | `GET /healthz` | 200 once the node serves clients, 503 before and while shutting down |
//! | `GET /metrics` | Prometheus text format |
//! | `GET /cluster` | this node's view of the members |
//! | `GET /cluster/rooms/{room}` | the room's owner and replicas in this node's view |
//!
//! With `--auth-secret` a token comes in one of three ways (docs/protocol.md §1): offered as a
//! subprotocol `token.JWT` beside `chat`, as the `token` query parameter, or, when the upgrade
//! request has none, as an `auth` frame that must be the connection's first, within
//! [`AUTH_TIMEOUT`]. A bad token in the request gets 401 before the upgrade; a bad or missing
//! `auth` frame closes the connection with 1008, and no session exists until it has come.
//!
//! Connections past the limit are refused cleanly: beyond `max-connections` WebSocket sessions
//! the upgrade gets 503, and beyond that plus a small reserve for health checks and metrics the
//! TCP connection gets a bare 503 and is closed, before anything is allocated for it.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use chat_protocol::{InvalidId, NodeName, RoomId, UserName};
use futures_util::StreamExt;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use ractor::Actor;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

use crate::actors::Slot;
use crate::cluster::Views;
use crate::gateway::admission::{Admission, Refusal, Ticket};
use crate::gateway::auth::{AuthError, Grant, Verifier};
use crate::gateway::outbox::{Closing, outbox};
use crate::gateway::session::{Limits, Session, SessionArgs};
use crate::gateway::sessions::SessionsMessage;
use crate::gateway::socket;
use crate::hub::HubMessage;
use crate::metrics::Metrics;
use crate::store::Store;

/// TCP connections accepted beyond `max-connections` for plain HTTP (health checks, metrics).
const HTTP_RESERVE: usize = 64;
/// How long a client may take to send its request headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connection upgraded without a token may take to send its `auth` frame.
pub const AUTH_TIMEOUT: Duration = Duration::from_secs(5);
/// The subprotocol the node speaks, echoed when the client offers it.
const SUBPROTOCOL: &str = "chat";
/// The prefix of the subprotocol that carries a token: `token.<JWT>`.
const TOKEN_SUBPROTOCOL_PREFIX: &str = "token.";

const INDEX_HTML: &str = include_str!("web/index.html");
const APP_JS: &str = include_str!("web/app.js");
const STYLE_CSS: &str = include_str!("web/style.css");

/// What the gateway needs to serve connections.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// WebSocket sessions at most.
    pub max_connections: usize,
    /// Largest frame / message accepted (else close 1009).
    pub max_frame_bytes: usize,
    /// Frames queued per connection before it is cut off (1013).
    pub client_queue: usize,
    /// Bytes queued per connection before it is cut off (1013).
    pub client_queue_bytes: usize,
    /// A client that sends nothing (not even a pong to the node's pings) this long is closed.
    pub idle_timeout: Duration,
    /// Per-connection limits.
    pub limits: Limits,
    /// Verifies tokens when an auth secret is configured.
    pub verifier: Option<Verifier>,
    /// Connections one user may hold at once.
    pub max_connections_per_user: usize,
    /// WebSocket connections one remote address may hold at once.
    pub max_connections_per_address: usize,
    /// Copies of room logs (for `/cluster/rooms/{room}`).
    pub replication_factor: usize,
}

/// The parts of the node the gateway works with.
#[derive(Debug, Clone)]
pub struct GatewayLinks {
    /// This node's name.
    pub me: NodeName,
    /// Metrics.
    pub metrics: Metrics,
    /// The cluster view.
    pub views: Views,
    /// The current hub.
    pub hub: Slot<HubMessage>,
    /// The current supervisor of sessions.
    pub sessions: Slot<SessionsMessage>,
    /// The store (for `/healthz`: whether it can write).
    pub store: Store,
}

/// Everything a connection task shares.
pub struct Gateway {
    config: GatewayConfig,
    node: GatewayLinks,
    serving: watch::Receiver<bool>,
    open: AtomicUsize,
    admission: Arc<Admission>,
    /// Upgraded connections still waiting for their `auth` frame: they count against
    /// `max-connections` like sessions.
    unauthenticated: AtomicUsize,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Gateway")
    }
}

impl Gateway {
    /// A gateway serving while `serving` is true.
    pub fn new(
        config: GatewayConfig,
        node: GatewayLinks,
        serving: watch::Receiver<bool>,
    ) -> Arc<Gateway> {
        let admission = Admission::new(
            config.max_connections_per_user,
            config.max_connections_per_address,
        );
        Arc::new(Gateway {
            admission,
            config,
            node,
            serving,
            open: AtomicUsize::new(0),
            unauthenticated: AtomicUsize::new(0),
        })
    }

    fn metrics(&self) -> &Metrics {
        &self.node.metrics
    }
}

/// Accepts connections until `stop` turns true.
pub async fn serve(listener: TcpListener, gateway: Arc<Gateway>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            changed = stop.changed() => {
                if changed.is_err() || *stop.borrow() {
                    break;
                }
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let open = gateway.open.fetch_add(1, Ordering::Relaxed);
                    if open >= gateway.config.max_connections + HTTP_RESERVE {
                        gateway.open.fetch_sub(1, Ordering::Relaxed);
                        Metrics::count(&gateway.metrics().connections_refused, "limit");
                        tokio::spawn(refuse(stream));
                        continue;
                    }
                    let gateway = gateway.clone();
                    tokio::spawn(async move {
                        serve_connection(stream, peer.ip(), &gateway).await;
                        gateway.open.fetch_sub(1, Ordering::Relaxed);
                    });
                }
                Err(e) => {
                    // Out of file descriptors or similar: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

async fn refuse(mut stream: TcpStream) {
    let _ = stream
        .write_all(
            b"HTTP/1.1 503 Service Unavailable\r\nconnection: close\r\ncontent-length: 0\r\n\r\n",
        )
        .await;
    let _ = stream.shutdown().await;
}

async fn serve_connection(stream: TcpStream, peer: IpAddr, gateway: &Arc<Gateway>) {
    let _ = stream.set_nodelay(true);
    let service = {
        let gateway = gateway.clone();
        service_fn(move |request| {
            let gateway = gateway.clone();
            async move { Ok::<_, std::convert::Infallible>(route(request, peer, &gateway)) }
        })
    };
    let result = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades()
        .await;
    if let Err(e) = result {
        tracing::debug!(error = %e, "http connection ended with an error");
    }
}

/// Where a request goes, decided from its method and path alone (the pure part of routing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Not GET or HEAD: 405.
    MethodNotAllowed,
    /// An embedded file of the web client.
    Asset {
        /// The file.
        body: &'static str,
        /// Its `content-type`.
        content_type: &'static str,
    },
    /// `/ws`: the WebSocket upgrade.
    WebSocket,
    /// `/healthz`.
    Health,
    /// `/metrics`.
    Metrics,
    /// `/cluster`.
    Cluster,
    /// `/cluster/rooms/{room}` with a valid (percent-decoded) room.
    RoomPlacement(RoomId),
    /// `/cluster/rooms/{room}` with an invalid room: 400.
    InvalidRoom,
    /// Anything else: 404.
    NotFound,
}

/// Routes a request by its method and path (without the query).
pub fn route_of(method: &Method, path: &str) -> Route {
    if method != Method::GET && method != Method::HEAD {
        return Route::MethodNotAllowed;
    }
    match path {
        "/" | "/index.html" => Route::Asset {
            body: INDEX_HTML,
            content_type: "text/html; charset=utf-8",
        },
        "/app.js" => Route::Asset {
            body: APP_JS,
            content_type: "text/javascript; charset=utf-8",
        },
        "/style.css" => Route::Asset {
            body: STYLE_CSS,
            content_type: "text/css; charset=utf-8",
        },
        "/ws" => Route::WebSocket,
        "/healthz" => Route::Health,
        "/metrics" => Route::Metrics,
        "/cluster" => Route::Cluster,
        _ => match path.strip_prefix("/cluster/rooms/") {
            Some(room) => match RoomId::new(&percent_decode(room)) {
                Ok(room) => Route::RoomPlacement(room),
                Err(_) => Route::InvalidRoom,
            },
            None => Route::NotFound,
        },
    }
}

fn route(
    request: Request<Incoming>,
    peer: IpAddr,
    gateway: &Arc<Gateway>,
) -> Response<Full<Bytes>> {
    match route_of(request.method(), request.uri().path()) {
        Route::MethodNotAllowed => text(StatusCode::METHOD_NOT_ALLOWED, "only GET is served\n"),
        Route::Asset { body, content_type } => asset(body, content_type),
        Route::WebSocket => upgrade(request, peer, gateway),
        Route::Health => health(gateway),
        Route::Metrics => {
            let mut response = Response::new(Full::new(Bytes::from(gateway.metrics().render())));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            response
        }
        Route::Cluster => {
            let view = gateway.node.views.borrow().clone();
            json(
                StatusCode::OK,
                &serde_json::json!({ "node": view.me, "members": view.members, "quorum": view.quorum }),
            )
        }
        Route::RoomPlacement(room) => room_placement(&room, gateway),
        Route::InvalidRoom => json(
            StatusCode::BAD_REQUEST,
            &serde_json::json!({ "error": "invalid_room" }),
        ),
        Route::NotFound => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// Answers every request on `stream` with 503 and `"reason":"store"`: what a node that cannot
/// create its store yet (a full disk) serves until it can (docs/protocol.md §5).
pub async fn store_unavailable(stream: TcpStream, node: NodeName) {
    let body = serde_json::json!({
        "status": "unavailable", "node": node, "members": 0, "reason": "store"
    });
    let service = service_fn(move |_request: Request<Incoming>| {
        let response = json(StatusCode::SERVICE_UNAVAILABLE, &body);
        async move { Ok::<_, std::convert::Infallible>(response) }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .keep_alive(false)
        .serve_connection(TokioIo::new(stream), service);
    let _ = tokio::time::timeout(HEADER_TIMEOUT * 2, connection).await;
}

fn health(gateway: &Gateway) -> Response<Full<Bytes>> {
    let view = gateway.node.views.borrow().clone();
    // Why the node cannot serve, the first that applies (docs/protocol.md §5).
    let reason = if !*gateway.serving.borrow() {
        Some("stopping")
    } else if !view.quorum {
        Some("quorum")
    } else if !gateway.node.store.writable() {
        Some("store")
    } else {
        None
    };
    let (code, status) = match reason {
        None => (StatusCode::OK, "ok"),
        Some(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
    };
    let mut body =
        serde_json::json!({ "status": status, "node": view.me, "members": view.up_count() });
    if let Some(reason) = reason {
        body["reason"] = reason.into();
    }
    json(code, &body)
}

fn room_placement(room: &RoomId, gateway: &Gateway) -> Response<Full<Bytes>> {
    let view = gateway.node.views.borrow().clone();
    let placement = view.room_placement(room, gateway.config.replication_factor);
    json(
        StatusCode::OK,
        &serde_json::json!({
            "room": room,
            "owner": placement.first(),
            "replicas": placement.get(1..).unwrap_or_default(),
        }),
    )
}

/// Checks the upgrade request, authenticates it, answers 101 and starts the session.
fn upgrade(
    mut request: Request<Incoming>,
    peer: IpAddr,
    gateway: &Arc<Gateway>,
) -> Response<Full<Bytes>> {
    let headers = request.headers();
    let is_upgrade = header_has(headers, header::UPGRADE, "websocket")
        && header_has(headers, header::CONNECTION, "upgrade");
    let key = headers.get(header::SEC_WEBSOCKET_KEY).cloned();
    let version_ok = headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_some_and(|v| v.as_bytes() == b"13");
    let (Some(key), true, true) = (key, is_upgrade, version_ok) else {
        Metrics::count(&gateway.metrics().connections_refused, "bad_request");
        return text(
            StatusCode::BAD_REQUEST,
            "expected a WebSocket upgrade (version 13)\n",
        );
    };
    let query = match ws_query(request.uri().query().unwrap_or("")) {
        Ok(query) => query,
        Err(e) => {
            Metrics::count(&gateway.metrics().connections_refused, "bad_request");
            return text(StatusCode::BAD_REQUEST, &format!("bad user name: {e}\n"));
        }
    };
    let named = query.user;
    let offered = offered_subprotocols(headers);
    // The header is preferred to the URL, which ends up in access logs.
    let token = offered
        .iter()
        .find_map(|p| p.strip_prefix(TOKEN_SUBPROTOCOL_PREFIX))
        .or(query.token.as_deref());
    let speaks_chat = offered.contains(&SUBPROTOCOL);
    let login = match (&gateway.config.verifier, named) {
        (Some(_), _) if token.is_none() => Login::FirstFrame,
        (Some(verifier), _) => {
            let checked = token
                .ok_or(AuthError::Missing)
                .and_then(|token| verifier.verify(token, now_secs()));
            match checked {
                Ok(grant) => Login::Granted(grant.user, Some(grant.exp_secs)),
                Err(e) => {
                    Metrics::count(&gateway.metrics().connections_refused, "auth");
                    let mut response = text(StatusCode::UNAUTHORIZED, &format!("{e}\n"));
                    response
                        .headers_mut()
                        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                    return response;
                }
            }
        }
        (None, Some(user)) => Login::Granted(user, None),
        (None, None) => {
            Metrics::count(&gateway.metrics().connections_refused, "bad_request");
            return text(StatusCode::BAD_REQUEST, "missing `user`\n");
        }
    };
    if !*gateway.serving.borrow() {
        return text(StatusCode::SERVICE_UNAVAILABLE, "node is not serving\n");
    }
    let waiting = gateway.unauthenticated.load(Ordering::Relaxed) as i64;
    if gateway.metrics().connections.get() + waiting >= gateway.config.max_connections as i64 {
        Metrics::count(&gateway.metrics().connections_refused, "limit");
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "node at its connection limit; try another node\n",
        );
    }
    // The caps per user and per address; a connection that authenticates by its first frame is
    // checked once its user is known.
    let ticket = match &login {
        Login::Granted(user, _) => match admit(gateway, user, peer) {
            Ok(ticket) => Some(ticket),
            Err(response) => return *response,
        },
        Login::FirstFrame => None,
    };
    let accept = derive_accept_key(key.as_bytes());
    let on_upgrade = hyper::upgrade::on(&mut request);
    let waiting = (login == Login::FirstFrame).then(|| Waiting::new(gateway));
    let gateway = gateway.clone();
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => start_session(upgraded, login, ticket, waiting, peer, &gateway).await,
            Err(e) => tracing::debug!(error = %e, "upgrade failed"),
        }
    });
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = response.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(value) = HeaderValue::from_str(&accept) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, value);
    }
    // Browsers fail a connection whose offered subprotocols get no answer: answer the one the
    // node speaks (never the token).
    if speaks_chat {
        h.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(SUBPROTOCOL),
        );
    }
    response
}

/// A place under the caps per user and per address, or the 429 answer.
fn admit(
    gateway: &Gateway,
    user: &UserName,
    peer: IpAddr,
) -> Result<Ticket, Box<Response<Full<Bytes>>>> {
    gateway.admission.admit(user, peer).map_err(|refusal| {
        let (kind, why) = match refusal {
            Refusal::User => ("per_user", "this user holds the most connections allowed"),
            Refusal::Address => (
                "per_address",
                "this address holds the most connections allowed",
            ),
        };
        Metrics::count(&gateway.metrics().connections_refused, kind);
        Box::new(text(
            StatusCode::TOO_MANY_REQUESTS,
            &format!("{why}; close one first\n"),
        ))
    })
}

/// How an upgrade request was let in.
#[derive(Debug, PartialEq, Eq)]
enum Login {
    /// As this user, whose token (if any) expires at these seconds since the Unix epoch.
    Granted(UserName, Option<u64>),
    /// Without a token although one is required: the first frame must be `auth`.
    FirstFrame,
}

/// Counts a connection waiting for its `auth` frame for as long as it lives.
struct Waiting(Arc<Gateway>);

impl Waiting {
    fn new(gateway: &Arc<Gateway>) -> Waiting {
        gateway.unauthenticated.fetch_add(1, Ordering::Relaxed);
        Waiting(gateway.clone())
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.unauthenticated.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The subprotocols a client offers, in order.
fn offered_subprotocols(headers: &hyper::HeaderMap) -> Vec<&str> {
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect()
}

/// The token of a connection's first frame, which must be `auth`; the reason to close otherwise.
fn first_frame_token(frame: &str) -> Result<String, String> {
    match chat_protocol::client::parse_request(frame) {
        Ok(request) => match request.body {
            chat_protocol::client::Request::Auth { token } => Ok(token),
            other => Err(format!(
                "the first frame must be `auth`, not `{}`",
                other.kind()
            )),
        },
        Err(e) => Err(format!("the first frame must be `auth`: {}", e.message)),
    }
}

/// Reads the `auth` frame of a connection upgraded without a token and verifies it: the grant,
/// or why the connection must be closed (`None` when the client went away).
async fn authenticate(
    socket: &mut socket::Socket,
    verifier: &Verifier,
) -> Result<Grant, Option<String>> {
    let deadline = tokio::time::Instant::now() + AUTH_TIMEOUT;
    loop {
        let text = match tokio::time::timeout_at(deadline, socket.next()).await {
            Err(_) => return Err(Some("no `auth` frame in time".to_owned())),
            Ok(Some(Ok(Message::Text(text)))) => text,
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)))) => continue,
            Ok(Some(Ok(Message::Binary(_)))) => {
                return Err(Some(
                    "the first frame must be an `auth` text frame".to_owned(),
                ));
            }
            Ok(None | Some(Ok(Message::Close(_)) | Err(_))) => return Err(None),
        };
        return first_frame_token(&text)
            .and_then(|token| {
                verifier
                    .verify(&token, now_secs())
                    .map_err(|e| e.to_string())
            })
            .map_err(Some);
    }
}

/// Closes a connection that did not authenticate with 1008 and `why`, then lets the client
/// answer the close so that it reads the reason rather than a reset.
async fn refuse_unauthenticated(mut socket: socket::Socket, why: String, metrics: &Metrics) {
    tracing::debug!(reason = %why, "closing a connection that did not authenticate");
    Metrics::count(
        &metrics.connections_closed,
        Closing::Unauthenticated.label(),
    );
    let mut frame = Closing::Unauthenticated.frame();
    // A close reason holds at most 123 bytes.
    let mut end = why.len().min(123);
    while !why.is_char_boundary(end) {
        end -= 1;
    }
    frame.reason = why[..end].into();
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        if socket.close(Some(frame)).await.is_ok() {
            while let Some(Ok(_)) = socket.next().await {}
        }
    })
    .await;
}

async fn start_session(
    upgraded: hyper::upgrade::Upgraded,
    login: Login,
    ticket: Option<Ticket>,
    waiting: Option<Waiting>,
    peer: IpAddr,
    gateway: &Gateway,
) {
    let frame = gateway.config.max_frame_bytes;
    // Buffers sized for many idle connections: tungstenite's 128 KiB defaults would cost
    // ~900 MB per 10,000 sockets. The read buffer is allocated whole with the socket and grows
    // only for the frame being read: 1 KiB rather than 4 saves 3 KiB of every idle connection
    // and holds several of the usual frames per read (docs/benchmarks.md). Frames
    // the writer feeds in one batch are coalesced up to 8 KiB per `send` system call (0 here
    // meant one call per frame: a node saturated at ~9,100 msg/s instead of over 15,000,
    // docs/benchmarks.md); an active connection keeps that much buffer, an idle one none.
    // The write buffer needs no bound of its own: the writer feeds one frame at a time, and each
    // feed first flushes what is past 8 KiB, so it holds at most 8 KiB plus one frame (the
    // outbox bounds the rest). A bound below the largest frame, a `history` page of about 1 MiB,
    // would fail that frame's write and drop the connection.
    let config = WebSocketConfig::default()
        .read_buffer_size(1 << 10)
        .write_buffer_size(8 << 10)
        .max_write_buffer_size(usize::MAX)
        .max_frame_size(Some(frame))
        .max_message_size(Some(frame));
    let mut socket: socket::Socket =
        WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(config)).await;
    let (user, exp_secs) = match (login, &gateway.config.verifier) {
        (Login::Granted(user, exp_secs), _) => (user, exp_secs),
        (Login::FirstFrame, Some(verifier)) => match authenticate(&mut socket, verifier).await {
            Ok(grant) => (grant.user, Some(grant.exp_secs)),
            Err(Some(why)) => {
                return refuse_unauthenticated(socket, why, gateway.metrics()).await;
            }
            Err(None) => return,
        },
        // Only a node with a verifier asks for the first frame.
        (Login::FirstFrame, None) => return,
    };
    let ticket = match ticket {
        Some(ticket) => ticket,
        None => match gateway.admission.admit(&user, peer) {
            Ok(ticket) => ticket,
            Err(refusal) => {
                let why = match refusal {
                    Refusal::User => "this user holds the most connections allowed",
                    Refusal::Address => "this address holds the most connections allowed",
                };
                return refuse_unauthenticated(socket, why.to_owned(), gateway.metrics()).await;
            }
        },
    };
    // From here the session counts against the limit.
    drop(waiting);
    let (Some(hub), Some(supervisor)) = (gateway.node.hub.get(), gateway.node.sessions.get())
    else {
        tracing::warn!("no hub or session supervisor running; dropping the connection");
        return;
    };
    let (outbox, frames, close) = outbox(
        gateway.config.client_queue,
        gateway.config.client_queue_bytes,
    );
    let args = SessionArgs {
        id: rand::random::<u64>() | 1,
        user,
        outbox: outbox.clone(),
        hub,
        limits: gateway.config.limits,
        node: gateway.node.me.clone(),
        metrics: gateway.metrics().clone(),
        ticket,
        verifier: gateway.config.verifier.clone(),
        exp_secs,
    };
    let session = match Actor::spawn_linked(None, Session, args, supervisor.get_cell()).await {
        Ok((session, _)) => session,
        Err(e) => {
            tracing::error!(error = %e, "session failed to start");
            return;
        }
    };
    tokio::spawn(socket::serve(
        socket,
        frames,
        close,
        outbox,
        session,
        gateway.metrics().clone(),
        gateway.config.idle_timeout,
    ));
}

fn header_has(headers: &hyper::HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|value| {
        value
            .to_str()
            .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    })
}

/// What the query string of `/ws` carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WsQuery {
    /// `user`, when given (it must then be a valid name).
    pub user: Option<UserName>,
    /// `token`, when given (checked later, against the configured secret).
    pub token: Option<String>,
}

/// Parses the query string of `/ws`; a `user` that is not a valid user name is an error.
pub fn ws_query(query: &str) -> Result<WsQuery, InvalidId> {
    let mut query = parse_query(query);
    let user = query
        .get("user")
        .map(|name| UserName::new(name))
        .transpose()?;
    Ok(WsQuery {
        user,
        token: query.remove("token"),
    })
}

/// Parses `a=1&b=2` with percent-decoding; the first value of a repeated key wins.
pub fn parse_query(query: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        out.entry(percent_decode(key))
            .or_insert_with(|| percent_decode(value));
    }
    out
}

fn percent_decode(input: &str) -> String {
    let bytes = input.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                // Two hex digits exactly: `u8::from_str_radix` would also take a sign ("%+1").
                let digit = |b: u8| char::from(b).to_digit(16);
                match (digit(bytes[i + 1]), digit(bytes[i + 2])) {
                    (Some(high), Some(low)) => {
                        out.push((high * 16 + low) as u8);
                        i += 3;
                    }
                    _ => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn asset(body: &'static str, content_type: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_owned())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn json(status: StatusCode, body: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    // The web client of one node reads /cluster of another to fail over.
    h.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_strings_are_percent_decoded() {
        let q = parse_query("user=al%69ce&token=a.b.c&x&user=bob&bad=%zz%4");
        assert_eq!(q["user"], "alice");
        assert_eq!(q["token"], "a.b.c");
        assert_eq!(q["x"], "");
        assert_eq!(q["bad"], "%zz%4");
    }

    #[test]
    fn a_percent_takes_two_hex_digits_and_no_sign() {
        // Found by fuzz/fuzz_targets/http_router.rs: "%+3" was decoded as the byte 3.
        assert_eq!(percent_decode("%+3A"), "% 3A");
        assert_eq!(percent_decode("%-1%41%4a%C3%A9"), "%-1AJé");
    }

    #[test]
    fn routes_by_method_and_path() {
        assert_eq!(route_of(&Method::POST, "/healthz"), Route::MethodNotAllowed);
        assert_eq!(route_of(&Method::HEAD, "/healthz"), Route::Health);
        assert_eq!(route_of(&Method::GET, "/ws"), Route::WebSocket);
        assert!(matches!(
            route_of(&Method::GET, "/"),
            Route::Asset {
                body: INDEX_HTML,
                ..
            }
        ));
        assert_eq!(
            route_of(&Method::GET, "/cluster/rooms/team%3Aeng"),
            Route::RoomPlacement(RoomId::new("team:eng").unwrap())
        );
        assert_eq!(
            route_of(&Method::GET, "/cluster/rooms/a%20b"),
            Route::InvalidRoom
        );
        assert_eq!(
            route_of(&Method::GET, "/cluster/rooms/"),
            Route::InvalidRoom
        );
        assert_eq!(route_of(&Method::GET, "/nope"), Route::NotFound);
    }

    #[test]
    fn ws_query_takes_user_and_token() {
        let q = ws_query("user=alice&token=a.b.c").unwrap();
        assert_eq!(q.user, Some(UserName::new("alice").unwrap()));
        assert_eq!(q.token.as_deref(), Some("a.b.c"));
        assert_eq!(
            ws_query("").unwrap(),
            WsQuery {
                user: None,
                token: None
            }
        );
        assert!(ws_query("user=a%20b").is_err());
    }
}
