//! The Links actor: the node's ractor_cluster sessions to its peers.
//!
//! ractor_cluster connects nodes (cookie challenge, one TCP stream per pair, remote actor
//! stand-ins, process groups) but never reconnects and never notices a frozen peer. So this
//! actor keeps the sessions the membership asks for:
//!
//! - for every member the heartbeats say is alive, it dials until a session is ready (the node
//!   with the smaller name dials; the other one dials too if nothing happened after a while, and
//!   ractor_cluster keeps one of two simultaneous sessions);
//! - when a session is ready it finds the peer's router through its process group and records
//!   the link in [`Net`], which makes the peer usable (and tells whoever watches
//!   [`Net::links_changed`], the membership);
//! - when the membership declares a member down (or restarted) it stops the session, so that
//!   nothing queues towards a dead or frozen peer and pending work fails fast.
//!
//! The node server runs in isolated mode (no transitive dialing): the membership already knows
//! every member and their addresses, including members that were down when a session opened.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chat_protocol::NodeName;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use ractor_cluster::node::NodeServerSessionInformation;
use ractor_cluster::{NodeEventSubscription, NodeServerMessage, NodeSessionMessage, RactorMessage};

use tokio::net::TcpListener;

use crate::actors::Tasks;
use crate::net::Net;
use crate::net::transport::Transport;
use crate::net::wire::{self, Link, RouterMessage};

/// Time between two dials of the same peer.
const REDIAL_AFTER: Duration = Duration::from_millis(500);
/// How long the node with the larger name waits for the other to dial before dialing itself.
const DIAL_GRACE: Duration = Duration::from_secs(2);
/// How often the actor checks for peers to dial.
const TICK: Duration = Duration::from_millis(250);

/// The Links actor.
#[derive(Debug)]
pub struct Links;

/// What the links actor needs.
#[derive(Debug)]
pub struct LinksArgs {
    /// Where links are recorded.
    pub net: Net,
    /// The ractor_cluster node server.
    pub server: ActorRef<NodeServerMessage>,
    /// The gates every stream passes before the node server sees it.
    pub transport: Transport,
    /// The cluster port's TCP side.
    pub listener: Arc<TcpListener>,
}

/// Messages of the links actor.
#[derive(Debug, RactorMessage)]
pub enum LinksMessage {
    /// The members to hold sessions with (alive per heartbeats): name → address.
    Desired(HashMap<NodeName, String>),
    /// A member restarted: its session belongs to its previous life.
    Restarted(NodeName),
    /// A session is ready (with its local session id, which tags the peer's stand-ins).
    Ready(NodeName, ActorRef<NodeSessionMessage>, u64),
    /// A session closed.
    Closed(NodeName, ractor::ActorId),
    /// Time to dial.
    Tick,
}

struct Peer {
    addr: String,
    since: Instant,
    last_dial: Option<Instant>,
}

/// The links' state.
pub struct LinksState {
    args: LinksArgs,
    desired: HashMap<NodeName, Peer>,
    sessions: HashMap<NodeName, ActorRef<NodeSessionMessage>>,
    /// The accept loop of the cluster port (aborted with the state).
    _accepting: Tasks,
}

/// Forwards node server events to the links actor (callbacks must not block).
struct Events(ActorRef<LinksMessage>);

fn peer_name(ses: &NodeServerSessionInformation) -> Option<NodeName> {
    let full = &ses.peer_name.as_ref()?.name;
    let name = full.split('@').next()?;
    NodeName::new(name).ok()
}

impl NodeEventSubscription for Events {
    fn node_session_opened(&self, _ses: NodeServerSessionInformation) {}

    fn node_session_disconnected(&self, ses: NodeServerSessionInformation) {
        if let Some(name) = peer_name(&ses) {
            let _ = self.0.cast(LinksMessage::Closed(name, ses.actor.get_id()));
        }
    }

    fn node_session_authenticated(&self, _ses: NodeServerSessionInformation) {}

    fn node_session_ready(&self, ses: NodeServerSessionInformation) {
        if let Some(name) = peer_name(&ses) {
            let _ = self
                .0
                .cast(LinksMessage::Ready(name, ses.actor, ses.node_id));
        }
    }
}

impl Actor for Links {
    type Msg = LinksMessage;
    type State = LinksState;
    type Arguments = LinksArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<LinksMessage>,
        args: LinksArgs,
    ) -> Result<LinksState, ActorProcessingErr> {
        args.server.cast(NodeServerMessage::SubscribeToEvents {
            id: "links".into(),
            subscription: Box::new(Events(myself.clone())),
        })?;
        args.transport.subscribe(&args.server)?;
        let accept = args
            .transport
            .clone()
            .accept(args.listener.clone(), args.server.clone());
        let mut accepting = Tasks::default();
        accepting.add(tokio::spawn(accept).abort_handle());
        myself.send_interval(TICK, || LinksMessage::Tick);
        Ok(LinksState {
            args,
            desired: HashMap::new(),
            sessions: HashMap::new(),
            _accepting: accepting,
        })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<LinksMessage>,
        state: &mut LinksState,
    ) -> Result<(), ActorProcessingErr> {
        // A restarted links actor starts with no session: nothing may be sent on the old ones.
        for (name, session) in state.sessions.drain() {
            session.stop(Some("links stopped".into()));
            state.args.net.remove_link(&name);
        }
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<LinksMessage>,
        message: LinksMessage,
        state: &mut LinksState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            LinksMessage::Desired(desired) => {
                let gone: Vec<NodeName> = state
                    .desired
                    .keys()
                    .filter(|n| !desired.contains_key(*n))
                    .cloned()
                    .collect();
                for name in gone {
                    state.desired.remove(&name);
                    state.drop_session(&name, "declared down");
                }
                let now = Instant::now();
                for (name, addr) in desired {
                    let peer = state.desired.entry(name).or_insert(Peer {
                        addr: addr.clone(),
                        since: now,
                        last_dial: None,
                    });
                    peer.addr = addr;
                }
                state.dial(&myself);
            }
            LinksMessage::Restarted(name) => {
                state.drop_session(&name, "peer restarted");
                if let Some(peer) = state.desired.get_mut(&name) {
                    peer.last_dial = None;
                    peer.since = Instant::now();
                }
            }
            LinksMessage::Ready(name, session, node_id) => {
                let Some(router) = find_router(&name, node_id).await else {
                    tracing::warn!(peer = %name, "session ready but no router found; dropping it");
                    session.stop(Some("no router".into()));
                    return Ok(());
                };
                tracing::info!(peer = %name, "node session ready");
                state.sessions.insert(name.clone(), session);
                state
                    .args
                    .net
                    .add_link(name, Link::new(router, tokio::runtime::Handle::current()));
            }
            LinksMessage::Closed(name, id) => {
                if state.sessions.get(&name).is_some_and(|s| s.get_id() == id) {
                    tracing::info!(peer = %name, "node session closed");
                    state.sessions.remove(&name);
                    state.args.net.remove_link(&name);
                }
            }
            LinksMessage::Tick => state.dial(&myself),
        }
        Ok(())
    }
}

impl LinksState {
    fn drop_session(&mut self, name: &NodeName, why: &str) {
        if let Some(session) = self.sessions.remove(name) {
            tracing::info!(peer = %name, why, "stopping node session");
            session.stop(Some(why.to_owned()));
            self.args.net.remove_link(name);
        }
    }

    fn dial(&mut self, myself: &ActorRef<LinksMessage>) {
        let now = Instant::now();
        let me = self.args.net.me().clone();
        for (name, peer) in &mut self.desired {
            if self.sessions.contains_key(name) {
                continue;
            }
            if me > *name && now.duration_since(peer.since) < DIAL_GRACE {
                continue;
            }
            if peer
                .last_dial
                .is_some_and(|t| now.duration_since(t) < REDIAL_AFTER)
            {
                continue;
            }
            peer.last_dial = Some(now);
            let server = self.args.server.clone();
            let transport = self.args.transport.clone();
            let addr = peer.addr.clone();
            let name = name.clone();
            let _ = myself;
            tokio::spawn(async move {
                match transport.dial(&addr, &server).await {
                    Ok(()) => tracing::debug!(peer = %name, %addr, "dialed"),
                    Err(e) => tracing::debug!(peer = %name, %addr, error = %e, "dial failed"),
                }
            });
        }
    }
}

/// The peer's router stand-in on session `node_id`, from its process group (a stand-in of a
/// previous session may linger there for a moment).
async fn find_router(name: &NodeName, node_id: u64) -> Option<ActorRef<RouterMessage>> {
    for _ in 0..20 {
        let members = ractor::pg::get_scoped_members(&wire::SCOPE.to_owned(), &wire::group(name));
        if let Some(cell) = members
            .into_iter()
            .find(|c| !c.get_id().is_local() && c.get_id().node() == node_id)
        {
            return Some(cell.into());
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    None
}
