//! The Directory actor: for the users whose home is this node, where they are connected.
//!
//! Users are placed on the same ring as rooms (key `user:<name>`): each node's hub tells a
//! user's home node when the user's first connection on it opens and its last one closes, and
//! announces all its users again when homes move. A `direct` goes to the addressee's home,
//! which forwards it once to every node where the addressee is connected, or answers `offline`.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use chat_protocol::peer::{PeerMessage, Reply};
use chat_protocol::{ErrorCode, NodeName, UserName};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use ractor_cluster::RactorMessage;

use crate::cluster::Cluster;
use crate::cluster::view::View;
use crate::rooms::room::now_ms;

/// The Directory actor.
#[derive(Debug)]
pub struct Directory;

/// Messages of the directory.
#[derive(Debug, RactorMessage)]
pub enum DirectoryMessage {
    /// `Presences` and `Direct` from a hub.
    Peer(PeerMessage),
    /// The view changed.
    ViewChanged(Arc<View>),
}

/// The directory's state.
pub struct DirectoryState {
    cluster: Cluster,
    view: Arc<View>,
    nodes: HashMap<UserName, BTreeSet<NodeName>>,
}

impl Actor for Directory {
    type Msg = DirectoryMessage;
    type State = DirectoryState;
    type Arguments = Cluster;

    async fn pre_start(
        &self,
        myself: ActorRef<DirectoryMessage>,
        cluster: Cluster,
    ) -> Result<DirectoryState, ActorProcessingErr> {
        cluster.set_directory(myself);
        // Starting (or restarting) empty: every hub announces the users homed here again.
        let view = cluster.view();
        for node in view.up() {
            let _ = cluster.send(
                node,
                PeerMessage::Reannounce {
                    node: cluster.me().clone(),
                },
            );
        }
        Ok(DirectoryState {
            view: cluster.view(),
            cluster,
            nodes: HashMap::new(),
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<DirectoryMessage>,
        message: DirectoryMessage,
        state: &mut DirectoryState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            DirectoryMessage::Peer(PeerMessage::Presences {
                node,
                online,
                offline,
            }) => {
                for user in online {
                    state.nodes.entry(user).or_default().insert(node.clone());
                }
                for user in offline {
                    if let Some(nodes) = state.nodes.get_mut(&user) {
                        nodes.remove(&node);
                        if nodes.is_empty() {
                            state.nodes.remove(&user);
                        }
                    }
                }
            }
            DirectoryMessage::Peer(PeerMessage::Direct {
                origin,
                from,
                to,
                text,
            }) => {
                let targets: Vec<NodeName> = state
                    .nodes
                    .get(&to)
                    .into_iter()
                    .flatten()
                    .filter(|n| state.view.is_up(n))
                    .cloned()
                    .collect();
                let reply = if targets.is_empty() {
                    Reply::Failed {
                        code: ErrorCode::Offline,
                        message: format!("{to} has no connection"),
                    }
                } else {
                    let ts = now_ms();
                    for node in &targets {
                        let _ = state.cluster.send(
                            node,
                            PeerMessage::DeliverDirect {
                                to: to.clone(),
                                from: from.clone(),
                                text: text.clone(),
                                ts,
                            },
                        );
                    }
                    Reply::DirectSent
                };
                let _ = state.cluster.send(
                    &origin.node,
                    PeerMessage::Reply {
                        req: origin.req,
                        reply,
                    },
                );
            }
            DirectoryMessage::Peer(PeerMessage::SessionsReset { node }) => {
                state.nodes.retain(|_, nodes| {
                    nodes.remove(&node);
                    !nodes.is_empty()
                });
            }
            DirectoryMessage::Peer(other) => {
                tracing::warn!(kind = other.kind(), "directory got an unexpected message");
            }
            DirectoryMessage::ViewChanged(view) => {
                // Forget nodes that went down, and users who no longer live here (their new
                // home hears from the hubs).
                let me = state.cluster.me().clone();
                state.nodes.retain(|user, nodes| {
                    nodes.retain(|n| view.is_up(n));
                    !nodes.is_empty() && view.home(user) == Some(&me)
                });
                state.view = view;
            }
        }
        Ok(())
    }
}
