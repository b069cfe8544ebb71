//! The Router actor: the only actor of a node that other nodes can message.
//!
//! ractor_cluster gives every remotable actor a stand-in on every peer, so the node exposes one:
//! peers find it through the process group [`wire::group`] and cast it batches of encoded
//! envelopes. It decodes each one (a payload that fails to decode is logged and counted, never silently
//! dropped), credits the sender for flow control, and hands the message to [`Net::deliver`].

use std::collections::HashMap;

use chat_protocol::NodeName;
use chat_protocol::peer::PeerMessage;
use ractor::{Actor, ActorProcessingErr, ActorRef};

use crate::metrics::Direction;
use crate::net::Net;
use crate::net::wire::{self, CREDIT_EVERY, RouterMessage};

/// The Router actor.
#[derive(Debug)]
pub struct Router;

/// The router's state.
pub struct RouterState {
    net: Net,
    received: HashMap<NodeName, u64>,
    last_failure_log: Option<std::time::Instant>,
}

impl Actor for Router {
    type Msg = RouterMessage;
    type State = RouterState;
    type Arguments = Net;

    async fn pre_start(
        &self,
        myself: ActorRef<RouterMessage>,
        net: Net,
    ) -> Result<RouterState, ActorProcessingErr> {
        ractor::pg::join_scoped(
            wire::SCOPE.to_owned(),
            wire::group(net.me()),
            vec![myself.get_cell()],
        );
        Ok(RouterState {
            net,
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
        match message {
            RouterMessage::Deliver(bytes) => state.receive(&bytes),
            RouterMessage::DeliverBatch(batch) => {
                for frame in wire::frames(&batch) {
                    match frame {
                        Ok(bytes) => state.receive(bytes),
                        Err(e) => state.undecodable(&e, batch.len()),
                    }
                }
            }
        }
        Ok(())
    }
}

impl RouterState {
    /// Decodes one envelope and hands its message over.
    fn receive(&mut self, bytes: &[u8]) {
        let envelope = match wire::decode(bytes) {
            Ok(envelope) => envelope,
            Err(e) => return self.undecodable(&e, bytes.len()),
        };
        let from = envelope.from;
        self.net
            .metrics()
            .peer(Direction::Received, envelope.message.kind(), bytes.len());
        if let PeerMessage::Credit { bytes } = envelope.message {
            self.net.credit(&from, bytes);
            return;
        }
        let received = self.received.entry(from.clone()).or_insert(0);
        *received += bytes.len() as u64;
        if *received >= CREDIT_EVERY {
            let credit = std::mem::take(received);
            let _ = self.net.send(&from, PeerMessage::Credit { bytes: credit });
        }
        if self.net.deliver(envelope.message).is_err() {
            tracing::debug!(peer = %from, "no local receiver for a peer message");
        }
    }

    /// Counts bytes from a peer that do not decode; a peer speaking garbage must not flood the
    /// log: one line per second at most.
    fn undecodable(&mut self, error: &dyn std::fmt::Display, len: usize) {
        self.net.metrics().peer_decode_failures.inc();
        let now = std::time::Instant::now();
        if self
            .last_failure_log
            .is_none_or(|t| now.duration_since(t).as_secs() >= 1)
        {
            self.last_failure_log = Some(now);
            tracing::warn!(error = %error, bytes = len, "undecodable message from a peer dropped");
        }
    }
}
