//! The log keeper: this node's copies of room logs, whoever owns the rooms.
//!
//! Owners (local or remote room actors) ask it to promise epochs, append entries and hand out
//! entries; it checks each request against the rules in [`super::log`], queues the durable
//! write on the store writer, and answers the owner once the write is on disk. It is the only
//! writer of room logs on this node, so its in-memory [`LogState`]s (which include writes still
//! queued) are the node's truth about what it holds.
//!
//! Answers go out from the store writer thread, in commit order, so an owner sees its appends
//! acknowledged in the order it sent them.

use std::collections::HashMap;

use chat_protocol::peer::{LogState, ToKeeper, ToRoom};
use chat_protocol::{NodeName, RoomId};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use ractor_cluster::RactorMessage;

use crate::net::Net;
use crate::rooms::log::{self, Refusal};
use crate::store::{Store, Write, Writer};

/// Entries handed out per `Fetched` answer, at most.
const FETCH_MAX_ENTRIES: u64 = 1000;
/// Text bytes handed out per `Fetched` answer, about.
const FETCH_MAX_BYTES: usize = 1 << 20;

/// The log keeper actor.
#[derive(Debug)]
pub struct LogKeeper;

/// What the log keeper needs.
#[derive(Debug)]
pub struct KeeperArgs {
    /// For answering owners.
    pub net: Net,
    /// For reads.
    pub store: Store,
    /// For durable writes.
    pub writer: Writer,
}

/// The log keeper's state.
pub struct KeeperState {
    args: KeeperArgs,
    logs: HashMap<RoomId, LogState>,
}

/// Messages of the log keeper.
#[derive(Debug, RactorMessage)]
pub enum KeeperMessage {
    /// `Promise`, `Append` or `Fetch` from a room owner.
    Peer(ToKeeper),
    /// A queued write of `room` failed: forget the cached state and reload it from disk.
    WriteFailed(RoomId),
}

impl Actor for LogKeeper {
    type Msg = KeeperMessage;
    type State = KeeperState;
    type Arguments = KeeperArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<KeeperMessage>,
        args: KeeperArgs,
    ) -> Result<KeeperState, ActorProcessingErr> {
        let keeper = myself.clone();
        args.net.serve_keeper(Box::new(move |m| {
            keeper.cast(KeeperMessage::Peer(m)).is_ok()
        }));
        Ok(KeeperState {
            args,
            logs: HashMap::new(),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<KeeperMessage>,
        message: KeeperMessage,
        state: &mut KeeperState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            KeeperMessage::Peer(ToKeeper::Promise {
                room,
                epoch,
                placement,
            }) => {
                let current = state.log(&room)?;
                let claimer = placement.nodes.first().cloned();
                let Some(claimer) = claimer else {
                    return Ok(());
                };
                match log::promise(&current, epoch, &placement) {
                    Some(next) => {
                        state.logs.insert(room.clone(), next.clone());
                        let answer = ToRoom::Promised {
                            epoch,
                            granted: true,
                            node: state.args.net.me().clone(),
                            state: next.clone(),
                        };
                        state.write(
                            &myself,
                            claimer,
                            Write::Log {
                                room,
                                state: next,
                                truncate_after: None,
                                entries: Vec::new(),
                            },
                            answer,
                        );
                    }
                    None => {
                        let answer = ToRoom::Promised {
                            epoch,
                            granted: false,
                            node: state.args.net.me().clone(),
                            state: current,
                        };
                        let _ = state.args.net.to_room(&claimer, room, answer);
                    }
                }
            }
            KeeperMessage::Peer(ToKeeper::Append {
                room,
                epoch,
                placement,
                after_seq,
                entries,
            }) => {
                let Some(owner) = placement.nodes.first().cloned() else {
                    return Ok(());
                };
                let current = state.log(&room)?;
                let me = state.args.net.me().clone();
                match log::append(&current, epoch, &placement, after_seq, &entries) {
                    Ok((next, truncates)) => {
                        state.logs.insert(room.clone(), next.clone());
                        let answer = ToRoom::Appended {
                            epoch,
                            node: me,
                            ok: true,
                            promised: next.promised,
                            last_seq: next.last_seq,
                        };
                        state.write(
                            &myself,
                            owner,
                            Write::Log {
                                room,
                                state: next,
                                truncate_after: truncates.then_some(after_seq),
                                entries,
                            },
                            answer,
                        );
                    }
                    Err(refusal) => {
                        let (promised, last_seq) = match refusal {
                            Refusal::Fenced { promised } => (promised, current.last_seq),
                            Refusal::Gap { last_seq } => (current.promised, last_seq),
                        };
                        tracing::debug!(room = %room, epoch, ?refusal, "append refused");
                        let answer = ToRoom::Appended {
                            epoch,
                            node: me,
                            ok: false,
                            promised,
                            last_seq,
                        };
                        let _ = state.args.net.to_room(&owner, room, answer);
                    }
                }
            }
            KeeperMessage::Peer(ToKeeper::Fetch {
                room,
                from,
                from_seq,
                to_seq,
            }) => {
                let to_seq = to_seq.min(from_seq.saturating_add(FETCH_MAX_ENTRIES - 1));
                let store = state.args.store.clone();
                let net = state.args.net.clone();
                // Reads never wait for the writer; keep them off the actor's thread anyway.
                tokio::task::spawn_blocking(move || {
                    let entries = store
                        .entries(&room, from_seq, to_seq, FETCH_MAX_BYTES)
                        .unwrap_or_else(|e| {
                            tracing::error!(room = %room, error = %e, "fetch read failed");
                            Vec::new()
                        });
                    let node = net.me().clone();
                    let _ = net.to_room(&from, room, ToRoom::Fetched { node, entries });
                });
            }
            KeeperMessage::WriteFailed(room) => {
                state.logs.remove(&room);
            }
        }
        Ok(())
    }
}

impl KeeperState {
    fn log(&mut self, room: &RoomId) -> Result<LogState, ActorProcessingErr> {
        if let Some(state) = self.logs.get(room) {
            return Ok(state.clone());
        }
        // A read error means the disk is failing: stop and let the supervisor decide.
        let state = self.args.store.log_state(room)?;
        self.logs.insert(room.clone(), state.clone());
        Ok(state)
    }

    /// Queues `write`; once durable, sends `answer` to `to`. On failure the cached state is
    /// dropped and the owner gets no answer (its request times out and is retried).
    fn write(&self, myself: &ActorRef<KeeperMessage>, to: NodeName, write: Write, answer: ToRoom) {
        let net = self.args.net.clone();
        let keeper = myself.clone();
        let room = match &write {
            Write::Log { room, .. } => room.clone(),
            Write::Node { .. } => return,
        };
        self.args.writer.submit(
            write,
            Box::new(move |result| match result {
                Ok(()) => {
                    let _ = net.to_room(&to, room, answer);
                }
                Err(e) => {
                    tracing::error!(room = %room, error = %e, "log write failed");
                    let _ = keeper.cast(KeeperMessage::WriteFailed(room));
                }
            }),
        );
    }
}
