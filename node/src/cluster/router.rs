//! The Router actor: the only actor of a node that other nodes can message.
//!
//! ractor_cluster gives every remotable actor a stand-in on every peer, so the node exposes one:
//! peers find it through the process group `router.<node name>` and cast it encoded
//! [`Envelope`]s. It decodes each one with the codec (a payload that fails to decode is logged
//! and counted, never silently dropped), credits the sender for flow control, and hands the
//! message to the local actor that handles it.

use std::collections::HashMap;

use chat_protocol::NodeName;
use chat_protocol::codec;
use chat_protocol::peer::{Envelope, PeerMessage};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use ractor_cluster::RactorClusterMessage;

use crate::cluster::Cluster;

/// The process-group scope of routers.
pub const SCOPE: &str = "chat";
/// Bytes received from a peer between two credits sent back to it.
const CREDIT_EVERY: u64 = 256 << 10;

/// The process group of `node`'s router.
pub fn group(node: &NodeName) -> String {
    format!("router.{node}")
}

/// The Router actor.
#[derive(Debug)]
pub struct Router;

/// Messages of the router (remotable: they cross nodes).
#[derive(Debug, RactorClusterMessage)]
pub enum RouterMessage {
    /// An encoded [`Envelope`] from a peer.
    Deliver(Vec<u8>),
}

/// The router's state.
pub struct RouterState {
    cluster: Cluster,
    received: HashMap<NodeName, u64>,
    last_failure_log: Option<std::time::Instant>,
}

impl Actor for Router {
    type Msg = RouterMessage;
    type State = RouterState;
    type Arguments = Cluster;

    async fn pre_start(
        &self,
        myself: ActorRef<RouterMessage>,
        cluster: Cluster,
    ) -> Result<RouterState, ActorProcessingErr> {
        ractor::pg::join_scoped(
            SCOPE.to_owned(),
            group(cluster.me()),
            vec![myself.get_cell()],
        );
        Ok(RouterState {
            cluster,
            received: HashMap::new(),
            last_failure_log: None,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<RouterMessage>,
        message: RouterMessage,
        state: &mut RouterState,
    ) -> Result<(), ActorProcessingErr> {
        let RouterMessage::Deliver(bytes) = message;
        let envelope: Envelope = match codec::decode(&bytes) {
            Ok(envelope) => envelope,
            Err(e) => {
                state.cluster.count_decode_failure();
                // A peer speaking garbage must not flood the log: one line per second at most.
                let now = std::time::Instant::now();
                if state
                    .last_failure_log
                    .is_none_or(|t| now.duration_since(t).as_secs() >= 1)
                {
                    state.last_failure_log = Some(now);
                    tracing::warn!(error = %e, bytes = bytes.len(), "undecodable message from a peer dropped");
                }
                return Ok(());
            }
        };
        let from = envelope.from;
        state
            .cluster
            .count_received(envelope.message.kind(), bytes.len());
        if let PeerMessage::Credit { bytes } = envelope.message {
            state.cluster.credit(&from, bytes);
            return Ok(());
        }
        let received = state.received.entry(from.clone()).or_insert(0);
        *received += bytes.len() as u64;
        if *received >= CREDIT_EVERY {
            let credit = std::mem::take(received);
            let _ = state
                .cluster
                .send(&from, PeerMessage::Credit { bytes: credit });
        }
        if state.cluster.dispatch(envelope.message).is_err() {
            tracing::debug!(peer = %from, "no local actor for a peer message");
        }
        Ok(())
    }
}
