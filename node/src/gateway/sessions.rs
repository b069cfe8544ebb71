//! The Sessions actor: supervisor of every Session actor of the node.
//!
//! Policy: a session that fails is not restarted (its socket state is gone with it). Its guard
//! closes the connection with 1011 and removes it from the hub; the client reconnects and
//! resumes with `join` + `since`, losing nothing. Every other connection is untouched.

use ractor::{Actor, ActorProcessingErr, ActorRef, SupervisionEvent};
use ractor_cluster::RactorMessage;

use crate::metrics::Metrics;

/// The supervisor of sessions.
#[derive(Debug)]
pub struct Sessions;

/// Messages of the sessions supervisor (it only handles supervision events).
#[derive(Debug, RactorMessage)]
pub enum SessionsMessage {}

impl Actor for Sessions {
    type Msg = SessionsMessage;
    type State = Metrics;
    type Arguments = Metrics;

    async fn pre_start(
        &self,
        _myself: ActorRef<SessionsMessage>,
        metrics: Metrics,
    ) -> Result<Metrics, ActorProcessingErr> {
        Ok(metrics)
    }

    async fn handle_supervisor_evt(
        &self,
        _myself: ActorRef<SessionsMessage>,
        event: SupervisionEvent,
        metrics: &mut Metrics,
    ) -> Result<(), ActorProcessingErr> {
        // The default would stop this supervisor whenever a session ends.
        if let SupervisionEvent::ActorFailed(cell, error) = event {
            tracing::error!(actor = %cell.get_id(), error = %error, "session failed; connection closed");
            Metrics::count(&metrics.connections_closed, "internal");
        }
        Ok(())
    }
}
