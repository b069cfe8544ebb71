//! The TCP side of the cluster port: every node-to-node stream, in and out, before ractor_cluster
//! sees it.
//!
//! ractor_cluster authenticates a session with a challenge over the cookie, but it accepts any
//! number of connections, waits forever for the challenge, and buffers frames of up to 16 MiB
//! before it. So the node owns the cluster port's listener and hands ractor_cluster its streams
//! ([`NodeServerMessage::ConnectionOpenedExternal`]) once they are past these gates:
//!
//! ```text
//!  accept ─ strangers at once ≤ MAX_STRANGERS, per address ≤ MAX_STRANGERS_PER_ADDRESS (else closed)
//!    └─ TLS 1.3, client certificate checked against the CA   (when cluster TLS is configured)
//!        └─ ractor_cluster: name exchange, cookie challenge  (reads ≤ PRE_AUTH_BYTES)
//!            └─ authenticated: the stream is a peer's; the gates lift
//!  all of it within HANDSHAKE_TIMEOUT of the accept, else closed
//! ```
//!
//! Dialed streams pass the same TLS and deadline (a peer is a stranger until it proves itself).
//!
//! ractor_cluster's own listener cannot be turned off: it listens on an ephemeral loopback port,
//! with the same TLS when configured, and nothing dials it.

use std::collections::HashMap;
use std::future::Future as _;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use anyhow::Context as _;
use ractor::ActorRef;
use ractor_cluster::node::NodeServerSessionInformation;
use ractor_cluster::{
    BoxRead, BoxWrite, ClusterBidiStream, IncomingEncryptionMode, NodeEventSubscription,
    NodeServerMessage,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, Sleep};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore, ServerConfig};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::metrics::Metrics;

/// How long a node-to-node stream may take from connect to authenticated (TLS handshake and
/// cookie challenge together).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Inbound streams not yet authenticated, at once; more are closed on accept.
pub const MAX_STRANGERS: usize = 128;
/// Inbound streams not yet authenticated from one IP address, at once.
pub const MAX_STRANGERS_PER_ADDRESS: usize = 8;
/// Bytes a stream may send before it is authenticated (the handshake takes a few hundred).
pub const PRE_AUTH_BYTES: usize = 64 * 1024;

/// Node-to-node TLS: this node's certificate and the cluster CA, both ways.
#[derive(Clone)]
pub struct Tls {
    acceptor: TlsAcceptor,
    connector: TlsConnector,
    ca: Vec<u8>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").finish_non_exhaustive()
    }
}

impl Tls {
    /// Loads the certificate chain, its key and the CA certificate (PEM files).
    pub fn load(cert: &Path, key: &Path, ca: &Path) -> anyhow::Result<Tls> {
        let read = |what: &str, path: &Path| {
            std::fs::read(path).with_context(|| format!("reading {what} {}", path.display()))
        };
        let chain = CertificateDer::pem_slice_iter(&read("cluster-tls-cert", cert)?)
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("parsing cluster-tls-cert {}", cert.display()))?;
        anyhow::ensure!(
            !chain.is_empty(),
            "cluster-tls-cert {} holds no certificate",
            cert.display()
        );
        let key = PrivateKeyDer::from_pem_slice(&read("cluster-tls-key", key)?)
            .with_context(|| format!("parsing cluster-tls-key {}", key.display()))?;
        let cas = CertificateDer::pem_slice_iter(&read("cluster-tls-ca", ca)?)
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("parsing cluster-tls-ca {}", ca.display()))?;
        let mut roots = RootCertStore::empty();
        for certificate in &cas {
            roots
                .add(certificate.clone())
                .with_context(|| format!("cluster-tls-ca {}", ca.display()))?;
        }
        anyhow::ensure!(
            !roots.is_empty(),
            "cluster-tls-ca {} holds no certificate",
            ca.display()
        );
        let roots = Arc::new(roots);
        let versions = &[&rustls::version::TLS13];
        let verifier = WebPkiClientVerifier::builder(roots.clone()).build()?;
        let server = ServerConfig::builder_with_protocol_versions(versions)
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .context("cluster-tls-key does not match cluster-tls-cert")?;
        let client = ClientConfig::builder_with_protocol_versions(versions)
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .context("cluster-tls-key does not match cluster-tls-cert")?;
        Ok(Tls {
            acceptor: TlsAcceptor::from(Arc::new(server)),
            connector: TlsConnector::from(Arc::new(client)),
            ca: cas.iter().flat_map(|ca| ca.iter().copied()).collect(),
        })
    }

    /// The CA certificates (DER), to bind the heartbeat key to.
    pub fn ca(&self) -> &[u8] {
        &self.ca
    }
}

/// The gates of the cluster port's TCP side; shared by the listener, the dialer and the node
/// server's event subscription.
#[derive(Clone)]
pub struct Transport {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport")
            .field("tls", &self.inner.tls.is_some())
            .finish_non_exhaustive()
    }
}

struct Inner {
    tls: Option<Tls>,
    metrics: Metrics,
    /// Streams handed to the node server and not yet authenticated, by label.
    gates: Mutex<HashMap<String, Weak<Gate>>>,
    strangers: Mutex<Strangers>,
    next_label: AtomicU64,
}

#[derive(Default)]
struct Strangers {
    total: usize,
    by_address: HashMap<IpAddr, usize>,
}

impl Transport {
    /// The gates, with TLS when configured.
    pub fn new(tls: Option<Tls>, metrics: Metrics) -> Transport {
        Transport {
            inner: Arc::new(Inner {
                tls,
                metrics,
                gates: Mutex::new(HashMap::new()),
                strangers: Mutex::new(Strangers::default()),
                next_label: AtomicU64::new(0),
            }),
        }
    }

    /// How ractor_cluster's own (unused) listener accepts.
    pub fn incoming_mode(&self) -> IncomingEncryptionMode {
        match &self.inner.tls {
            Some(tls) => IncomingEncryptionMode::Tls(tls.acceptor.clone()),
            None => IncomingEncryptionMode::Raw,
        }
    }

    /// Tells the node server to report authenticated sessions here (which lifts their gates).
    pub fn subscribe(&self, server: &ActorRef<NodeServerMessage>) -> anyhow::Result<()> {
        server.cast(NodeServerMessage::SubscribeToEvents {
            id: "transport".into(),
            subscription: Box::new(Authenticated(self.clone())),
        })?;
        Ok(())
    }

    /// Accepts on the cluster port for as long as the task runs.
    pub async fn accept(self, listener: Arc<TcpListener>, server: ActorRef<NodeServerMessage>) {
        loop {
            let (stream, from) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, most likely: let some close.
                    tracing::warn!(error = %e, "cluster port accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Some(stranger) = self.admit(from.ip()) else {
                self.refused("too_many_strangers");
                continue;
            };
            let this = self.clone();
            let server = server.clone();
            tokio::spawn(async move {
                let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
                let _ = stream.set_nodelay(true);
                let side = Side::Accepted(stream);
                if let Err(why) = this
                    .open(side, from, Some(stranger), deadline, &server)
                    .await
                {
                    tracing::debug!(%from, why, "inbound node-to-node stream closed");
                    this.refused(why);
                }
            });
        }
    }

    /// Dials a peer at `addr` (`host:port`) and hands the stream to the node server.
    pub async fn dial(
        &self,
        addr: &str,
        server: &ActorRef<NodeServerMessage>,
    ) -> Result<(), String> {
        let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
        let stream = tokio::time::timeout_at(deadline, TcpStream::connect(addr))
            .await
            .map_err(|_| "connect timed out".to_owned())?
            .map_err(|e| e.to_string())?;
        let to = stream.peer_addr().map_err(|e| e.to_string())?;
        let host = addr.rsplit_once(':').map_or(addr, |(host, _)| host);
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let _ = stream.set_nodelay(true);
        let name = ServerName::try_from(host.to_owned()).map_err(|e| e.to_string())?;
        self.open(Side::Dialed(stream, name), to, None, deadline, server)
            .await
            .map_err(str::to_owned)
    }

    /// Runs the TLS handshake if configured, then hands the stream to the node server behind
    /// its gate.
    async fn open(
        &self,
        side: Side,
        peer: SocketAddr,
        stranger: Option<Stranger>,
        deadline: Instant,
        server: &ActorRef<NodeServerMessage>,
    ) -> Result<(), &'static str> {
        let is_server = matches!(side, Side::Accepted(_));
        let n = self.inner.next_label.fetch_add(1, Ordering::Relaxed);
        let label = format!("{peer}#{n}");
        let gate = Arc::new(Gate {
            open: AtomicBool::new(false),
            stranger: Mutex::new(stranger),
        });
        let stream = match (&self.inner.tls, side) {
            (None, Side::Accepted(stream) | Side::Dialed(stream, _)) => {
                gated(stream, &gate, deadline, &label)
            }
            (Some(tls), Side::Accepted(stream)) => {
                let accept = tls.acceptor.accept(stream);
                let stream = handshake(tokio::time::timeout_at(deadline, accept).await)?;
                gated(stream, &gate, deadline, &label)
            }
            (Some(tls), Side::Dialed(stream, name)) => {
                let connect = tls.connector.connect(name, stream);
                let stream = handshake(tokio::time::timeout_at(deadline, connect).await)?;
                gated(stream, &gate, deadline, &label)
            }
        };
        {
            let mut gates = lock(&self.inner.gates);
            gates.retain(|_, gate| gate.strong_count() > 0);
            gates.insert(label, Arc::downgrade(&gate));
        }
        server
            .cast(NodeServerMessage::ConnectionOpenedExternal { stream, is_server })
            .map_err(|_| "node_server_stopped")
    }

    /// A session authenticated: its stream is a peer's from now on.
    fn authenticated(&self, label: &str) {
        if let Some(gate) = lock(&self.inner.gates)
            .remove(label)
            .and_then(|gate| gate.upgrade())
        {
            gate.lift();
        }
    }

    /// Counts a stranger from `ip`, unless there are too many.
    fn admit(&self, ip: IpAddr) -> Option<Stranger> {
        let mut strangers = lock(&self.inner.strangers);
        let from_ip = strangers.by_address.get(&ip).copied().unwrap_or(0);
        if strangers.total >= MAX_STRANGERS || from_ip >= MAX_STRANGERS_PER_ADDRESS {
            return None;
        }
        strangers.total += 1;
        strangers.by_address.insert(ip, from_ip + 1);
        Some(Stranger {
            transport: Arc::downgrade(&self.inner),
            ip,
        })
    }

    fn refused(&self, why: &'static str) {
        Metrics::count(&self.inner.metrics.cluster_streams_refused, why);
    }
}

/// An inbound stream counted among the strangers until it authenticates or closes.
struct Stranger {
    transport: Weak<Inner>,
    ip: IpAddr,
}

impl Drop for Stranger {
    fn drop(&mut self) {
        let Some(inner) = self.transport.upgrade() else {
            return;
        };
        let mut strangers = lock(&inner.strangers);
        strangers.total = strangers.total.saturating_sub(1);
        if let Some(n) = strangers.by_address.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                strangers.by_address.remove(&self.ip);
            }
        }
    }
}

/// What holds a stream back until its session authenticates.
struct Gate {
    open: AtomicBool,
    stranger: Mutex<Option<Stranger>>,
}

impl Gate {
    fn is_open(&self) -> bool {
        self.open.load(Ordering::Acquire)
    }

    fn lift(&self) {
        self.open.store(true, Ordering::Release);
        lock(&self.stranger).take();
    }
}

/// A stream behind its gate: until the session authenticates, reading fails past the deadline
/// or past [`PRE_AUTH_BYTES`], which makes ractor_cluster close the session.
struct Gated<S> {
    stream: S,
    gate: Arc<Gate>,
    deadline: Instant,
    label: String,
}

impl<S: AsyncRead + AsyncWrite + Send + Unpin + 'static> ClusterBidiStream for Gated<S> {
    fn split(self: Box<Self>) -> (BoxRead, BoxWrite) {
        let (read, write) = tokio::io::split(self.stream);
        let read = GatedRead {
            read,
            gate: self.gate,
            deadline: Box::pin(tokio::time::sleep_until(self.deadline)),
            received: 0,
        };
        (Box::new(read), Box::new(write))
    }

    fn peer_label(&self) -> Option<String> {
        Some(self.label.clone())
    }
}

struct GatedRead<R> {
    read: R,
    gate: Arc<Gate>,
    deadline: Pin<Box<Sleep>>,
    received: usize,
}

impl<R: AsyncRead + Unpin> AsyncRead for GatedRead<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if this.gate.is_open() {
            return Pin::new(&mut this.read).poll_read(cx, buf);
        }
        if this.deadline.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "not authenticated in time",
            )));
        }
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.read).poll_read(cx, buf))?;
        this.received += buf.filled().len() - before;
        if this.received > PRE_AUTH_BYTES && !this.gate.is_open() {
            return Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "too much data before authentication",
            )));
        }
        Poll::Ready(Ok(()))
    }
}

/// A freshly connected stream, and which side of it this node is.
enum Side {
    /// Accepted on the cluster port.
    Accepted(TcpStream),
    /// Dialed, to a peer whose certificate must name this host.
    Dialed(TcpStream, ServerName<'static>),
}

/// The stream out of a TLS handshake that had to finish in time.
fn handshake<S>(
    result: Result<std::io::Result<S>, tokio::time::error::Elapsed>,
) -> Result<S, &'static str> {
    match result {
        Err(_) => Err("handshake_timeout"),
        Ok(Err(_)) => Err("tls"),
        Ok(Ok(stream)) => Ok(stream),
    }
}

fn gated<S: AsyncRead + AsyncWrite + Send + Unpin + 'static>(
    stream: S,
    gate: &Arc<Gate>,
    deadline: Instant,
    label: &str,
) -> Box<dyn ClusterBidiStream> {
    Box::new(Gated {
        stream,
        gate: gate.clone(),
        deadline,
        label: label.to_owned(),
    })
}

/// Forwards the node server's "authenticated" events (callbacks must not block).
struct Authenticated(Transport);

impl NodeEventSubscription for Authenticated {
    fn node_session_opened(&self, _ses: NodeServerSessionInformation) {}
    fn node_session_disconnected(&self, _ses: NodeServerSessionInformation) {}
    fn node_session_authenticated(&self, ses: NodeServerSessionInformation) {
        self.0.authenticated(&ses.peer_addr);
    }
    fn node_session_ready(&self, _ses: NodeServerSessionInformation) {}
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
