//! The Directory actor: for the users whose home is this node, where they are connected.
//!
//! Users are placed on the same ring as rooms (key `user:<name>`): each node's hub tells a
//! user's home node when the user's first connection on it opens and its last one closes, and
//! announces all its users again when homes move. A `direct` goes to the addressee's home,
//! which forwards it once to every node where the addressee is connected, or answers `offline`.
//! The home also caps what one user receives (`direct-rate`, from all senders together): past it
//! the senders get `rate_limited`, and the addressee's queue never fills with others' bursts.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Instant;

use chat_protocol::peer::{Reply, ToDirectory, ToHub};
use chat_protocol::{ErrorCode, NodeName, UserName};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use ractor_cluster::RactorMessage;

use crate::actors::{Tasks, forward};
use crate::clock::now_ms;
use crate::cluster::Views;
use crate::cluster::view::View;
use crate::gateway::rate::RateLimit;
use crate::net::Net;

/// The Directory actor.
#[derive(Debug)]
pub struct Directory;

/// Messages of the directory.
#[derive(Debug, RactorMessage)]
pub enum DirectoryMessage {
    /// Messages from hubs.
    Peer(ToDirectory),
    /// The view changed.
    ViewChanged(Arc<View>),
}

/// The directory's state.
pub struct DirectoryState {
    net: Net,
    _tasks: Tasks,
    view: Arc<View>,
    nodes: HashMap<UserName, BTreeSet<NodeName>>,
    /// `direct-rate`: what each user homed here may still receive.
    direct_rate: u32,
    inbound: HashMap<UserName, RateLimit>,
}

impl Actor for Directory {
    type Msg = DirectoryMessage;
    type State = DirectoryState;
    type Arguments = (Net, Views, u32);

    async fn pre_start(
        &self,
        myself: ActorRef<DirectoryMessage>,
        (net, views, direct_rate): (Net, Views, u32),
    ) -> Result<DirectoryState, ActorProcessingErr> {
        let directory = myself.clone();
        net.serve_directory(Box::new(move |m| {
            directory.cast(DirectoryMessage::Peer(m)).is_ok()
        }));
        let mut tasks = Tasks::default();
        tasks.add(forward(
            views.clone(),
            myself,
            DirectoryMessage::ViewChanged,
        ));
        // Starting (or restarting) empty: every hub announces the users homed here again.
        let view = views.borrow().clone();
        for node in view.up() {
            let _ = net.to_hub(
                node,
                ToHub::Reannounce {
                    node: net.me().clone(),
                },
            );
        }
        Ok(DirectoryState {
            view,
            net,
            _tasks: tasks,
            nodes: HashMap::new(),
            direct_rate,
            inbound: HashMap::new(),
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<DirectoryMessage>,
        message: DirectoryMessage,
        state: &mut DirectoryState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            DirectoryMessage::Peer(ToDirectory::Presences {
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
                            state.inbound.remove(&user);
                        }
                    }
                }
            }
            DirectoryMessage::Peer(ToDirectory::Direct {
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
                let direct_rate = state.direct_rate;
                let mut allowed = || {
                    state
                        .inbound
                        .entry(to.clone())
                        .or_insert_with(|| RateLimit::new(direct_rate, Instant::now()))
                        .allow(Instant::now())
                };
                let reply = if targets.is_empty() {
                    Reply::Failed {
                        code: ErrorCode::Offline,
                        message: format!("{to} has no connection"),
                    }
                } else if !allowed() {
                    // Many senders together must not flood one recipient's queue (and get them
                    // cut off as too slow): the senders are told to slow down instead.
                    Reply::Failed {
                        code: ErrorCode::RateLimited,
                        message: format!("{to} is receiving too many direct messages; slow down"),
                    }
                } else {
                    let ts = now_ms();
                    for node in &targets {
                        let _ = state.net.to_hub(
                            node,
                            ToHub::DeliverDirect {
                                to: to.clone(),
                                from: from.clone(),
                                text: text.clone(),
                                ts,
                            },
                        );
                    }
                    Reply::DirectSent
                };
                let _ = state.net.to_hub(
                    &origin.node,
                    ToHub::Reply {
                        req: origin.req,
                        reply,
                    },
                );
            }
            DirectoryMessage::Peer(ToDirectory::SessionsReset { node }) => {
                state.nodes.retain(|_, nodes| {
                    nodes.remove(&node);
                    !nodes.is_empty()
                });
                state
                    .inbound
                    .retain(|user, _| state.nodes.contains_key(user));
            }
            DirectoryMessage::ViewChanged(view) => {
                // Forget nodes that went down, and users who no longer live here (their new
                // home hears from the hubs).
                let me = state.net.me().clone();
                state.nodes.retain(|user, nodes| {
                    nodes.retain(|n| view.is_up(n));
                    !nodes.is_empty() && view.home(user) == Some(&me)
                });
                state
                    .inbound
                    .retain(|user, _| state.nodes.contains_key(user));
                state.view = view;
            }
        }
        Ok(())
    }
}
