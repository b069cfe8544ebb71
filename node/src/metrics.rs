//! Prometheus metrics of a node, served at `GET /metrics`.
//!
//! One [`Metrics`] value per node, cloned into every part that counts something (clones share
//! the counters). Names follow Prometheus conventions: `_total` counters, base units (seconds).

use std::sync::Arc;

use chat_protocol::ErrorCode;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Label of a per-error-code counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    /// The protocol error code.
    pub code: &'static str,
}

/// Label of a per-kind counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    /// What was counted (a message kind, a reason).
    pub kind: &'static str,
}

/// Direction of node-to-node traffic.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Direction {
    /// Sent to a peer.
    Sent,
    /// Received from a peer.
    Received,
}

impl EncodeLabelValue for Direction {
    fn encode(
        &self,
        encoder: &mut prometheus_client::encoding::LabelValueEncoder<'_>,
    ) -> Result<(), std::fmt::Error> {
        use std::fmt::Write;
        encoder.write_str(match self {
            Direction::Sent => "sent",
            Direction::Received => "received",
        })
    }
}

/// Label of node-to-node traffic counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabel {
    /// Sent or received.
    pub direction: Direction,
    /// The peer message kind.
    pub kind: &'static str,
}

/// The node's metrics; cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

/// The individual metrics, public for the parts that update them.
pub struct Inner {
    registry: Registry,
    /// Open client connections.
    pub connections: Gauge,
    /// Client connections accepted since start.
    pub connections_opened: Counter,
    /// Connections refused, by reason (`limit`, `auth`, `bad_request`).
    pub connections_refused: Family<KindLabel, Counter>,
    /// Connections closed by the node, by reason (`slow`, `too_large`, `shutdown`, `internal`).
    pub connections_closed: Family<KindLabel, Counter>,
    /// Room actors running on this node (rooms it owns and serves).
    pub rooms_hosted: Gauge,
    /// Client frames received.
    pub messages_in: Counter,
    /// Frames sent to clients.
    pub messages_out: Counter,
    /// Chat messages sequenced and stored by rooms this node owns.
    pub messages_stored: Counter,
    /// Error frames sent to clients, by code.
    pub errors: Family<CodeLabel, Counter>,
    /// Time from receiving a `send` to sending its `ack`, seconds.
    pub send_ack_seconds: Histogram,
    /// Node-to-node messages, by direction and kind.
    pub peer_messages: Family<PeerLabel, Counter>,
    /// Node-to-node payload bytes, by direction.
    pub peer_bytes: Family<PeerLabel, Counter>,
    /// Node-to-node payloads that failed to decode (logged and dropped).
    pub peer_decode_failures: Counter,
    /// Node-to-node messages not sent, by reason (`unreachable`, `too_large`, `congested`).
    pub peer_dropped: Family<KindLabel, Counter>,
    /// Node-to-node TCP streams closed before they authenticated, by reason
    /// (`too_many_strangers`, `handshake_timeout`, `tls`).
    pub cluster_streams_refused: Family<KindLabel, Counter>,
    /// Cluster members this node sees up, itself included.
    pub members: Gauge,
    /// Whether this node is in the majority of the known membership (1) or not (0).
    pub quorum: Gauge,
    /// Room ownership claims, by result (`won`, `refused`, `failed`).
    pub room_claims: Family<KindLabel, Counter>,
    /// Restarts of the node's long-lived actors by the root supervisor, by actor.
    pub actor_restarts: Family<KindLabel, Counter>,
    /// Store transactions committed.
    pub store_commits: Counter,
    /// Writes per store transaction (group commit).
    pub store_batch: Histogram,
    /// Time to commit one store transaction, seconds.
    pub store_commit_seconds: Histogram,
    /// Whether the store can write (1) or its last commit failed (0).
    pub store_writable: Gauge,
    /// Store transactions that failed (a full disk, an I/O error), each failing its batch.
    pub store_commit_failures: Counter,
    /// Rooms whose entries below their retention horizon are still to be deleted.
    pub store_compaction_rooms: Gauge,
    /// Entries deleted below retention horizons.
    pub store_compacted: Counter,
}

impl std::ops::Deref for Metrics {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.inner
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("chat");
        let connections = Gauge::default();
        registry.register(
            "connections",
            "Open client connections",
            connections.clone(),
        );
        let connections_opened = Counter::default();
        registry.register(
            "connections_opened",
            "Client connections accepted",
            connections_opened.clone(),
        );
        let connections_refused = Family::<KindLabel, Counter>::default();
        registry.register(
            "connections_refused",
            "Connections refused, by reason",
            connections_refused.clone(),
        );
        let connections_closed = Family::<KindLabel, Counter>::default();
        registry.register(
            "connections_closed",
            "Connections closed by the node, by reason",
            connections_closed.clone(),
        );
        let rooms_hosted = Gauge::default();
        registry.register(
            "rooms_hosted",
            "Rooms served by this node",
            rooms_hosted.clone(),
        );
        let messages_in = Counter::default();
        registry.register("messages_in", "Client frames received", messages_in.clone());
        let messages_out = Counter::default();
        registry.register(
            "messages_out",
            "Frames sent to clients",
            messages_out.clone(),
        );
        let messages_stored = Counter::default();
        registry.register(
            "messages_stored",
            "Chat messages sequenced by rooms owned here",
            messages_stored.clone(),
        );
        let errors = Family::<CodeLabel, Counter>::default();
        for code in ErrorCode::ALL {
            // Pre-create every code so dashboards see zeros rather than gaps.
            let _ = errors.get_or_create(&CodeLabel {
                code: code.as_str(),
            });
        }
        registry.register(
            "errors",
            "Error frames sent to clients, by code",
            errors.clone(),
        );
        let send_ack_seconds = Histogram::new(exponential_buckets(0.000_25, 2.0, 16));
        registry.register(
            "send_ack_seconds",
            "Time from receiving a send to its ack",
            send_ack_seconds.clone(),
        );
        let peer_messages = Family::<PeerLabel, Counter>::default();
        registry.register(
            "peer_messages",
            "Node-to-node messages (cross-node traffic)",
            peer_messages.clone(),
        );
        let peer_bytes = Family::<PeerLabel, Counter>::default();
        registry.register(
            "peer_bytes",
            "Node-to-node payload bytes",
            peer_bytes.clone(),
        );
        let peer_decode_failures = Counter::default();
        registry.register(
            "peer_decode_failures",
            "Node-to-node payloads that failed to decode",
            peer_decode_failures.clone(),
        );
        let peer_dropped = Family::<KindLabel, Counter>::default();
        registry.register(
            "peer_dropped",
            "Node-to-node messages not sent, by reason",
            peer_dropped.clone(),
        );
        let cluster_streams_refused = Family::<KindLabel, Counter>::default();
        registry.register(
            "cluster_streams_refused",
            "Node-to-node TCP streams closed before they authenticated, by reason",
            cluster_streams_refused.clone(),
        );
        let members = Gauge::default();
        registry.register(
            "members",
            "Cluster members up, this node included",
            members.clone(),
        );
        let quorum = Gauge::default();
        registry.register(
            "quorum",
            "1 when this node sees a majority of the known members",
            quorum.clone(),
        );
        let room_claims = Family::<KindLabel, Counter>::default();
        registry.register(
            "room_claims",
            "Room ownership claims, by result",
            room_claims.clone(),
        );
        let actor_restarts = Family::<KindLabel, Counter>::default();
        registry.register(
            "actor_restarts",
            "Restarts of the node's long-lived actors, by actor",
            actor_restarts.clone(),
        );
        let store_commits = Counter::default();
        registry.register(
            "store_commits",
            "Store transactions committed",
            store_commits.clone(),
        );
        let store_batch = Histogram::new(exponential_buckets(1.0, 2.0, 12));
        registry.register(
            "store_batch",
            "Writes per store transaction",
            store_batch.clone(),
        );
        let store_commit_seconds = Histogram::new(exponential_buckets(0.000_1, 2.0, 16));
        registry.register(
            "store_commit_seconds",
            "Time to commit one store transaction",
            store_commit_seconds.clone(),
        );
        let store_writable = Gauge::default();
        store_writable.set(1);
        registry.register(
            "store_writable",
            "1 when the store can write, 0 after a failed commit until a write succeeds again",
            store_writable.clone(),
        );
        let store_commit_failures = Counter::default();
        registry.register(
            "store_commit_failures",
            "Store transactions that failed, each failing its batch of writes",
            store_commit_failures.clone(),
        );
        let store_compaction_rooms = Gauge::default();
        registry.register(
            "store_compaction_rooms",
            "Rooms with entries below their retention horizon still to delete",
            store_compaction_rooms.clone(),
        );
        let store_compacted = Counter::default();
        registry.register(
            "store_compacted",
            "Entries deleted below retention horizons",
            store_compacted.clone(),
        );
        Self {
            inner: Arc::new(Inner {
                registry,
                connections,
                connections_opened,
                connections_refused,
                connections_closed,
                rooms_hosted,
                messages_in,
                messages_out,
                messages_stored,
                errors,
                send_ack_seconds,
                peer_messages,
                peer_bytes,
                peer_decode_failures,
                peer_dropped,
                cluster_streams_refused,
                members,
                quorum,
                room_claims,
                actor_restarts,
                store_commits,
                store_batch,
                store_commit_seconds,
                store_writable,
                store_commit_failures,
                store_compaction_rooms,
                store_compacted,
            }),
        }
    }

    /// Counts an error frame sent to a client.
    pub fn error(&self, code: ErrorCode) {
        self.errors
            .get_or_create(&CodeLabel {
                code: code.as_str(),
            })
            .inc();
    }

    /// Counts something by reason or kind in a labelled family.
    pub fn count(family: &Family<KindLabel, Counter>, kind: &'static str) {
        family.get_or_create(&KindLabel { kind }).inc();
    }

    /// Counts one node-to-node message of `bytes` bytes.
    pub fn peer(&self, direction: Direction, kind: &'static str, bytes: usize) {
        let label = PeerLabel { direction, kind };
        self.peer_messages.get_or_create(&label).inc();
        self.peer_bytes.get_or_create(&label).inc_by(bytes as u64);
    }

    /// Renders every metric in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::warn!(error = %e, "metrics encoding failed");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_metrics_the_protocol_names() {
        let m = Metrics::new();
        m.connections.inc();
        m.error(ErrorCode::NotJoined);
        m.peer(Direction::Sent, "fanout", 10);
        let text = m.render();
        for name in [
            "chat_connections 1",
            "chat_rooms_hosted",
            "chat_messages_in_total",
            "chat_messages_out_total",
            "chat_peer_messages_total{direction=\"sent\",kind=\"fanout\"} 1",
            "chat_members",
            "chat_errors_total{code=\"not_joined\"} 1",
            "chat_errors_total{code=\"rate_limited\"} 0",
            "chat_send_ack_seconds_bucket",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
    }
}
