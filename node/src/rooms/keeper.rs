//! The log keeper: this node's copies of room logs, whoever owns the rooms.
//!
//! Owners (local or remote room actors) ask it to promise epochs, append entries and hand out
//! entries. [`KeeperCore`] checks each request against the rules in [`super::log`] and decides
//! what to write and answer; the [`LogKeeper`] actor queues the durable write on the store
//! writer and the answer goes to the owner only once the write is on disk. The keeper is the
//! only writer of room logs on this node, so the core's in-memory [`LogState`]s (which include
//! writes still queued) are the node's truth about what it holds.
//!
//! Answers go out from the store writer thread, in commit order, so an owner sees its appends
//! acknowledged in the order it sent them.

use std::collections::HashMap;

use chat_protocol::peer::{AppendOutcome, Horizon, LogState, ToKeeper, ToRoom};
use chat_protocol::{NodeName, RoomId};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use ractor_cluster::RactorMessage;

use crate::net::Net;
use crate::rooms::log::{self, Refusal};
use crate::store::{Store, StoreError, Write, Writer};

/// Entries handed out per `Fetched` answer, at most.
pub const FETCH_MAX_ENTRIES: u64 = 1000;
/// Text bytes handed out per `Fetched` answer, about.
pub const FETCH_MAX_BYTES: usize = 1 << 20;

/// What the keeper decided; its actor (or the simulation) carries it out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeeperEffect {
    /// Makes `write` durable, then sends `answer` to the room's actor on `to`; when the write
    /// fails, an append is answered [`AppendOutcome::Unwritable`] and a promise not at all (the
    /// owner asks again).
    Write {
        /// The room.
        room: RoomId,
        /// The change.
        write: Write,
        /// The owner.
        to: NodeName,
        /// The answer once durable.
        answer: ToRoom,
    },
    /// Sends `answer` to the room's actor on `to` at once (a refusal).
    Answer {
        /// The room.
        room: RoomId,
        /// The owner.
        to: NodeName,
        /// The answer.
        answer: ToRoom,
    },
    /// Reads `from_seq..=to_seq` (bounded by [`FETCH_MAX_ENTRIES`] and [`FETCH_MAX_BYTES`])
    /// from the store and sends them to the room's actor on `to` as `Fetched`.
    Fetch {
        /// The room.
        room: RoomId,
        /// The asking owner.
        to: NodeName,
        /// The first entry.
        from_seq: u64,
        /// The last entry.
        to_seq: u64,
    },
}

/// The rules of this node's copies of room logs, without I/O.
#[derive(Debug)]
pub struct KeeperCore {
    me: NodeName,
    /// Each room's copy: its log state and what retention dropped from it.
    logs: HashMap<RoomId, (LogState, Horizon)>,
    /// The store's failed commits when the cached states were last known to match the disk
    /// plus the writes queued since.
    failures: u64,
}

impl KeeperCore {
    /// The keeper of node `me`, with nothing loaded.
    pub fn new(me: NodeName) -> KeeperCore {
        KeeperCore {
            me,
            logs: HashMap::new(),
            failures: 0,
        }
    }

    /// Tells the keeper how many commits of the store failed so far; returns the number its
    /// writes are decided against (for [`Writer::submit_after`]). When it changed, some writes
    /// the cached states include never reached the disk: every state is read again on next use.
    pub fn on_store_failures(&mut self, failures: u64) -> u64 {
        if failures != self.failures {
            self.logs.clear();
            self.failures = failures;
        }
        self.failures
    }

    /// The answer to `message` when this node cannot write: an append is answered
    /// [`AppendOutcome::Unwritable`] so that its owner fails the sends waiting on it at once;
    /// other requests are not answered (their owner asks again).
    pub fn unwritable(&self, message: &ToKeeper) -> Option<KeeperEffect> {
        let ToKeeper::Append {
            room,
            epoch,
            placement,
            ..
        } = message
        else {
            return None;
        };
        Some(KeeperEffect::Answer {
            room: room.clone(),
            to: placement.nodes.first()?.clone(),
            answer: ToRoom::Appended {
                epoch: *epoch,
                node: self.me.clone(),
                outcome: AppendOutcome::Unwritable,
            },
        })
    }

    /// Handles a request from an owner; `load` reads a room's state and horizon from the store
    /// the first time the room is seen (an error there means the disk is failing). `lost_disk`
    /// says that this node's store may have forgotten what it once held
    /// ([`crate::store::Memory`]). Returns what to do, in order.
    pub fn on(
        &mut self,
        message: ToKeeper,
        lost_disk: bool,
        load: impl FnOnce(&RoomId) -> Result<(LogState, Horizon), StoreError>,
    ) -> Result<Vec<KeeperEffect>, StoreError> {
        let room = message.room().clone();
        let (current, held) = match self.logs.get(&room) {
            Some(copy) => copy.clone(),
            None => {
                let copy = load(&room)?;
                self.logs.insert(room.clone(), copy.clone());
                copy
            }
        };
        let me = self.me.clone();
        let mut effects = Vec::new();
        let effect = match message {
            ToKeeper::Promise {
                room,
                epoch,
                placement,
            } => {
                let Some(claimer) = placement.nodes.first().cloned() else {
                    return Ok(effects);
                };
                match log::promise(&current, epoch, &placement) {
                    Some(next) => {
                        self.logs.insert(room.clone(), (next.clone(), held));
                        // The owner of the epoch promised before is fenced from now on: tell it,
                        // so that it stops serving (it may have nothing to write, and would
                        // learn it only from a refused append).
                        if let Some(previous) = current.placement.as_ref()
                            && let Some(owner) = previous.nodes.first()
                            && *owner != claimer
                        {
                            effects.push(KeeperEffect::Answer {
                                room: room.clone(),
                                to: owner.clone(),
                                answer: ToRoom::Appended {
                                    epoch: previous.epoch,
                                    node: me.clone(),
                                    outcome: AppendOutcome::Fenced { promised: epoch },
                                },
                            });
                        }
                        KeeperEffect::Write {
                            write: Write::Log {
                                room: room.clone(),
                                state: next.clone(),
                                truncate_after: None,
                                entries: Vec::new(),
                            },
                            room,
                            to: claimer,
                            answer: promised(
                                epoch,
                                true,
                                me,
                                // What it held, and the placement it knew, before this claim.
                                LogState {
                                    placement: current.placement.clone(),
                                    ..next.clone()
                                },
                                lost_disk && next.synced == 0,
                                held,
                            ),
                        }
                    }
                    None => KeeperEffect::Answer {
                        room,
                        to: claimer,
                        answer: promised(
                            epoch,
                            false,
                            me,
                            current.clone(),
                            lost_disk && current.synced == 0,
                            held,
                        ),
                    },
                }
            }
            ToKeeper::Append {
                room,
                epoch,
                placement,
                after_seq,
                after_epoch,
                entries,
                owner_last_seq,
                owner_runs,
                adopted,
            } => {
                let Some(owner) = placement.nodes.first().cloned() else {
                    return Ok(effects);
                };
                let append = log::Append {
                    epoch,
                    placement: &placement,
                    after_seq,
                    after_epoch,
                    entries: &entries,
                    owner_last_seq,
                    owner_runs: &owner_runs,
                    adopted,
                };
                let refused = |outcome| KeeperEffect::Answer {
                    room: room.clone(),
                    to: owner.clone(),
                    answer: ToRoom::Appended {
                        epoch,
                        node: me.clone(),
                        outcome,
                    },
                };
                match log::append(&current, &append) {
                    Ok(applied) => {
                        self.logs
                            .insert(room.clone(), (applied.state.clone(), held));
                        let mut entries = entries;
                        // Entries retention already deleted here are not stored again.
                        entries.retain(|e| e.seq >= held.compacted);
                        KeeperEffect::Write {
                            write: Write::Log {
                                room: room.clone(),
                                state: applied.state.clone(),
                                truncate_after: applied.truncate_after,
                                entries,
                            },
                            room,
                            to: owner,
                            answer: ToRoom::Appended {
                                epoch,
                                node: me,
                                outcome: AppendOutcome::Stored {
                                    last_seq: applied.state.last_seq,
                                },
                            },
                        }
                    }
                    Err(Refusal::Fenced { promised }) => {
                        refused(AppendOutcome::Fenced { promised })
                    }
                    Err(Refusal::NotPromised { promised }) => {
                        refused(AppendOutcome::NotPromised { promised })
                    }
                    Err(refusal @ (Refusal::Diverged | Refusal::Malformed)) => {
                        if refusal == Refusal::Malformed {
                            tracing::warn!(room = %room, epoch, by = %owner, "malformed append refused");
                        }
                        refused(AppendOutcome::Diverged { state: current })
                    }
                }
            }
            ToKeeper::Fetch {
                room,
                from,
                from_seq,
                to_seq,
            } => KeeperEffect::Fetch {
                room,
                to: from,
                from_seq,
                to_seq: to_seq.min(from_seq.saturating_add(FETCH_MAX_ENTRIES - 1)),
            },
            ToKeeper::Trim {
                room,
                epoch,
                owner,
                horizon,
                runs,
            } => {
                let answer = |outcome| ToRoom::Appended {
                    epoch,
                    node: me.clone(),
                    outcome,
                };
                match log::trim(&current, held, epoch, horizon, &runs) {
                    Ok(trimmed) => {
                        self.logs
                            .insert(room.clone(), (trimmed.state.clone(), trimmed.horizon));
                        KeeperEffect::Write {
                            write: Write::Trim {
                                room: room.clone(),
                                state: trimmed.state,
                                horizon: trimmed.horizon,
                                truncate_after: trimmed.truncate_after,
                            },
                            room,
                            to: owner,
                            answer: answer(AppendOutcome::Trimmed {
                                horizon: trimmed.horizon.horizon,
                            }),
                        }
                    }
                    Err(Refusal::Fenced { promised }) => KeeperEffect::Answer {
                        room,
                        to: owner,
                        answer: answer(AppendOutcome::Fenced { promised }),
                    },
                    Err(Refusal::NotPromised { promised }) => KeeperEffect::Answer {
                        room,
                        to: owner,
                        answer: answer(AppendOutcome::NotPromised { promised }),
                    },
                    Err(Refusal::Diverged | Refusal::Malformed) => {
                        tracing::warn!(room = %room, epoch, "malformed trim refused");
                        return Ok(effects);
                    }
                }
            }
        };
        effects.push(effect);
        Ok(effects)
    }

    /// A queued write of `room` failed: its cached state may be ahead of the disk; it is read
    /// again on next use.
    pub fn write_failed(&mut self, room: &RoomId) {
        self.logs.remove(room);
    }
}

/// The answer to a promise request: `Promised`, or `PromisedTrimmed` from a copy that retention
/// trimmed (so that clusters without retention never send the newer message).
fn promised(
    epoch: u64,
    granted: bool,
    node: NodeName,
    state: LogState,
    recovering: bool,
    horizon: Horizon,
) -> ToRoom {
    if horizon == Horizon::default() {
        ToRoom::Promised {
            epoch,
            granted,
            node,
            state,
            recovering,
        }
    } else {
        ToRoom::PromisedTrimmed {
            epoch,
            granted,
            node,
            state,
            recovering,
            horizon,
        }
    }
}

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
    core: KeeperCore,
    /// The store's failed commits the writes being decided are made against.
    failures: u64,
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
            core: KeeperCore::new(args.net.me().clone()),
            failures: args.store.failures(),
            args,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<KeeperMessage>,
        message: KeeperMessage,
        state: &mut KeeperState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            KeeperMessage::Peer(message) => {
                let store = &state.args.store;
                state.failures = state.core.on_store_failures(store.failures());
                let lost_disk = store.memory().doubtful();
                // Cheap: no entries. Kept in case the state cannot be read.
                let unwritable = state.core.unwritable(&message);
                match state.core.on(message, lost_disk, |room| {
                    Ok((store.log_state(room)?, store.horizon(room)?))
                }) {
                    Ok(effects) => {
                        for effect in effects {
                            state.carry_out(&myself, effect);
                        }
                    }
                    // The disk is failing (or the database is being reopened after a failed
                    // write): answer as for a failed write; the node keeps running.
                    Err(e) => {
                        tracing::warn!(error = %e, "log state unreadable");
                        if let Some(effect) = unwritable {
                            state.carry_out(&myself, effect);
                        }
                    }
                }
            }
            KeeperMessage::WriteFailed(room) => state.core.write_failed(&room),
        }
        Ok(())
    }
}

impl KeeperState {
    fn carry_out(&self, myself: &ActorRef<KeeperMessage>, effect: KeeperEffect) {
        match effect {
            KeeperEffect::Answer { room, to, answer } => {
                let _ = self.args.net.to_room(&to, room, answer);
            }
            KeeperEffect::Write {
                room,
                write,
                to,
                answer,
            } => {
                let net = self.args.net.clone();
                let keeper = myself.clone();
                self.args.writer.submit_after(
                    self.failures,
                    write,
                    Box::new(move |result| match result {
                        Ok(()) => {
                            let _ = net.to_room(&to, room, answer);
                        }
                        Err(e) => {
                            tracing::debug!(room = %room, error = %e, "log write failed");
                            // The owner fails the sends waiting on it at once (a failed promise
                            // is not answered: the claim times out and starts over).
                            if let ToRoom::Appended { epoch, node, .. } = answer {
                                let outcome = AppendOutcome::Unwritable;
                                let answer = ToRoom::Appended {
                                    epoch,
                                    node,
                                    outcome,
                                };
                                let _ = net.to_room(&to, room.clone(), answer);
                            }
                            let _ = keeper.cast(KeeperMessage::WriteFailed(room));
                        }
                    }),
                );
            }
            KeeperEffect::Fetch {
                room,
                to,
                from_seq,
                to_seq,
            } => {
                let store = self.args.store.clone();
                let net = self.args.net.clone();
                // Reads never wait for the writer; keep them off the actor's thread anyway.
                tokio::task::spawn_blocking(move || {
                    let entries = store
                        .entries(&room, from_seq, to_seq, FETCH_MAX_BYTES)
                        .unwrap_or_else(|e| {
                            tracing::error!(room = %room, error = %e, "fetch read failed");
                            Vec::new()
                        });
                    let node = net.me().clone();
                    let _ = net.to_room(&to, room, ToRoom::Fetched { node, entries });
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chat_protocol::UserName;
    use chat_protocol::peer::{Entry, Placement};

    fn node(name: &str) -> NodeName {
        NodeName::new(name).unwrap()
    }

    fn room() -> RoomId {
        RoomId::new("r").unwrap()
    }

    fn placement(epoch: u64) -> Placement {
        Placement {
            epoch,
            nodes: vec![node("a"), node("b")],
        }
    }

    fn entry(seq: u64, epoch: u64) -> Entry {
        Entry {
            seq,
            epoch,
            from: UserName::new("u").unwrap(),
            text: format!("m{seq}"),
            ts: seq,
            client_id: None,
        }
    }

    fn empty(_: &RoomId) -> Result<(LogState, Horizon), StoreError> {
        Ok(Default::default())
    }

    fn answer(effects: Vec<KeeperEffect>) -> ToRoom {
        match effects.last() {
            Some(KeeperEffect::Write { answer, .. } | KeeperEffect::Answer { answer, .. }) => {
                answer.clone()
            }
            other => panic!("no answer: {other:?}"),
        }
    }

    #[test]
    fn a_promise_is_written_before_it_is_answered_and_given_once() {
        let mut keeper = KeeperCore::new(node("b"));
        let promise = ToKeeper::Promise {
            room: room(),
            epoch: 3,
            placement: placement(3),
        };
        let first = keeper.on(promise.clone(), false, empty).unwrap();
        assert!(
            matches!(first.as_slice(), [KeeperEffect::Write { to, answer: ToRoom::Promised { granted: true, .. }, .. }] if *to == node("a"))
        );
        let again = keeper.on(promise, false, |_| panic!("cached")).unwrap();
        assert!(matches!(
            again.as_slice(),
            [KeeperEffect::Answer {
                answer: ToRoom::Promised { granted: false, .. },
                ..
            }]
        ));
        // A newer claim by another node: the owner of epoch 3 is told it is fenced.
        let newer = ToKeeper::Promise {
            room: room(),
            epoch: 5,
            placement: Placement {
                epoch: 5,
                nodes: vec![node("c"), node("b")],
            },
        };
        let effects = keeper.on(newer, false, |_| panic!("cached")).unwrap();
        assert!(
            matches!(
                effects.as_slice(),
                [
                    KeeperEffect::Answer {
                        to,
                        answer: ToRoom::Appended {
                            epoch: 3,
                            outcome: AppendOutcome::Fenced { promised: 5 },
                            ..
                        },
                        ..
                    },
                    KeeperEffect::Write { .. }
                ] if *to == node("a")
            ),
            "{effects:?}"
        );
    }

    #[test]
    fn a_node_that_lost_its_disk_says_so_until_it_is_synced() {
        let mut keeper = KeeperCore::new(node("b"));
        let promise = |epoch| ToKeeper::Promise {
            room: room(),
            epoch,
            placement: placement(epoch),
        };
        let recovering = |effects: Vec<KeeperEffect>| match answer(effects) {
            ToRoom::Promised { recovering, .. } => recovering,
            other => panic!("{other:?}"),
        };
        assert!(recovering(keeper.on(promise(3), true, empty).unwrap()));
        // Synced under epoch 3 (its copy now holds the owner's log): it counts again.
        let p = placement(3);
        let append = ToKeeper::Append {
            room: room(),
            epoch: 3,
            placement: p,
            after_seq: 0,
            after_epoch: 0,
            entries: vec![entry(1, 3)],
            owner_last_seq: 1,
            owner_runs: vec![chat_protocol::peer::Run {
                epoch: 3,
                first_seq: 1,
            }],
            adopted: 0,
        };
        assert!(matches!(
            answer(keeper.on(append, true, empty).unwrap()),
            ToRoom::Appended {
                outcome: AppendOutcome::Stored { last_seq: 1 },
                ..
            }
        ));
        assert!(!recovering(keeper.on(promise(4), true, empty).unwrap()));
        // A node whose disk is intact never says so.
        let mut intact = KeeperCore::new(node("c"));
        assert!(!recovering(intact.on(promise(3), false, empty).unwrap()));
    }

    #[test]
    fn appends_are_stored_for_the_promised_epoch_and_refused_otherwise() {
        let mut keeper = KeeperCore::new(node("b"));
        let promise = ToKeeper::Promise {
            room: room(),
            epoch: 2,
            placement: placement(2),
        };
        keeper.on(promise, false, empty).unwrap();
        let append = |epoch: u64| ToKeeper::Append {
            room: room(),
            epoch,
            placement: placement(epoch),
            after_seq: 0,
            after_epoch: 0,
            entries: vec![entry(1, epoch)],
            owner_last_seq: 1,
            owner_runs: vec![chat_protocol::peer::Run {
                epoch,
                first_seq: 1,
            }],
            adopted: 0,
        };
        let stored = keeper.on(append(2), false, empty).unwrap();
        assert!(matches!(
            answer(stored),
            ToRoom::Appended {
                outcome: AppendOutcome::Stored { last_seq: 1 },
                ..
            }
        ));
        assert!(matches!(
            answer(keeper.on(append(1), false, empty).unwrap()),
            ToRoom::Appended {
                outcome: AppendOutcome::Fenced { promised: 2 },
                ..
            }
        ));
        assert!(matches!(
            answer(keeper.on(append(4), false, empty).unwrap()),
            ToRoom::Appended {
                outcome: AppendOutcome::NotPromised { promised: 2 },
                ..
            }
        ));
        // A failed write drops the cache: the next request reads the disk again.
        keeper.write_failed(&room());
        let mut loaded = false;
        keeper
            .on(
                ToKeeper::Fetch {
                    room: room(),
                    from: node("a"),
                    from_seq: 1,
                    to_seq: 5000,
                },
                false,
                |_| {
                    loaded = true;
                    Ok(Default::default())
                },
            )
            .unwrap();
        assert!(loaded);
    }

    #[test]
    fn fetches_are_bounded() {
        let mut keeper = KeeperCore::new(node("b"));
        let effect = keeper
            .on(
                ToKeeper::Fetch {
                    room: room(),
                    from: node("a"),
                    from_seq: 10,
                    to_seq: 1_000_000,
                },
                false,
                empty,
            )
            .unwrap();
        assert_eq!(
            effect,
            vec![KeeperEffect::Fetch {
                room: room(),
                to: node("a"),
                from_seq: 10,
                to_seq: 10 + FETCH_MAX_ENTRIES - 1,
            }]
        );
    }
}
