//! The checker: every guarantee of docs/failover.md, asserted on what clients observe.
//!
//! - **No acknowledged message lost** (guarantee 1): every ack is recorded; at the end a
//!   full read of each room must return every acknowledged message at its seq.
//! - **A seq is never reused, never skipped** (guarantee 2): the first observation of a room's
//!   seq (an ack, a delivery, a replay, a history) fixes what is there; any later observation,
//!   by anyone, anywhere, must agree. Reads must be contiguous.
//! - **One order, gap-free streams** (guarantee 3): per connection and room, messages arrive
//!   as `seq + 1, seq + 2, …` from the join's seq (checked by the clients, reported here).
//! - **Retries are stored once**: an id acknowledged twice gets the same seq.
//! - **No divergence under partition** (guarantee 4) is the same agreement across nodes, and
//!   **availability after healing** (guarantee 5) is checked by the world at the end.
//! - **Retention**: messages below a room's horizon may be gone, but a horizon a client was told
//!   of never moves back (the final read's is at least every one reported), and every
//!   acknowledged message at or above the final horizon is in the final read, in place.

use std::collections::{BTreeMap, HashMap};

use chat_protocol::peer::Entry;
use chat_protocol::{RoomId, UserName};

/// What is at a seq.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fact {
    pub from: UserName,
    pub text: String,
    pub id: Option<String>,
}

impl Fact {
    pub fn of(entry: &Entry) -> Fact {
        Fact {
            from: entry.from.clone(),
            text: entry.text.clone(),
            id: entry.client_id.clone(),
        }
    }
}

#[derive(Debug, Default)]
pub struct Checker {
    truth: HashMap<(RoomId, u64), (Fact, String)>,
    /// Acknowledged messages: room → seq → fact.
    pub acked: BTreeMap<RoomId, BTreeMap<u64, Fact>>,
    ids: HashMap<(RoomId, UserName, String), u64>,
    pub violations: Vec<String>,
    pub observations: u64,
    /// The highest horizon any client was told of, by room.
    horizons: BTreeMap<RoomId, u64>,
}

impl Checker {
    pub fn violate(&mut self, what: String) {
        if self.violations.len() < 20 {
            self.violations.push(what);
        }
    }

    /// Someone saw `entry` in `room` (`how` says who and how, for the report).
    pub fn observe(&mut self, room: &RoomId, entry: &Entry, how: &str) {
        self.observations += 1;
        let fact = Fact::of(entry);
        match self.truth.get(&(room.clone(), entry.seq)) {
            None => {
                self.truth
                    .insert((room.clone(), entry.seq), (fact, how.to_owned()));
            }
            Some((known, first)) if *known != fact => {
                let message = format!(
                    "seq reused: {room} #{} is {:?} ({first}) but {how} saw {:?}",
                    entry.seq, known, fact
                );
                self.violate(message);
            }
            Some(_) => {}
        }
    }

    /// `user`'s message `id` with `text` was acknowledged at `seq`.
    pub fn ack(
        &mut self,
        room: &RoomId,
        seq: u64,
        user: &UserName,
        id: &str,
        text: &str,
        how: &str,
    ) {
        let fact = Fact {
            from: user.clone(),
            text: text.to_owned(),
            id: Some(id.to_owned()),
        };
        let entry = Entry {
            seq,
            epoch: 0,
            from: fact.from.clone(),
            text: fact.text.clone(),
            ts: 0,
            client_id: fact.id.clone(),
        };
        self.observe(room, &entry, how);
        match self
            .ids
            .insert((room.clone(), user.clone(), id.to_owned()), seq)
        {
            Some(before) if before != seq => {
                self.violate(format!(
                    "retry stored twice: {user}'s {id} in {room} acked at #{before} and #{seq} ({how})"
                ));
            }
            _ => {}
        }
        self.acked
            .entry(room.clone())
            .or_default()
            .insert(seq, fact);
    }

    /// A client was told that `room`'s messages below `horizon` were dropped by retention.
    pub fn horizon(&mut self, room: &RoomId, horizon: u64) {
        let highest = self.horizons.entry(room.clone()).or_insert(0);
        *highest = (*highest).max(horizon);
    }

    /// The highest acknowledged seq of a room.
    pub fn last_acked(&self, room: &RoomId) -> u64 {
        self.acked
            .get(room)
            .and_then(|m| m.keys().next_back().copied())
            .unwrap_or(0)
    }

    /// A full read of `room` (from seq 1, or from the room's `horizon`, below which retention
    /// dropped the messages): every acknowledged message from there on must be in it, in place.
    pub fn full_read(&mut self, room: &RoomId, entries: &[Entry], horizon: u64, how: &str) {
        let first = horizon.max(1);
        let told = self.horizons.get(room).copied().unwrap_or(0);
        if told > first {
            self.violate(format!(
                "{how}: {room} starts at #{first}, but a client was told everything below #{told} is gone"
            ));
        }
        for (i, entry) in entries.iter().enumerate() {
            if entry.seq != first + i as u64 {
                self.violate(format!(
                    "{how}: read of {room} not contiguous from #{first}: #{} at position {i}",
                    entry.seq
                ));
                return;
            }
            self.observe(room, entry, how);
        }
        let Some(acked) = self.acked.get(room).cloned() else {
            return;
        };
        for (seq, fact) in acked.range(first..) {
            let (seq, fact) = (*seq, fact.clone());
            match entries.get((seq - first) as usize) {
                Some(entry) if Fact::of(entry) == fact => {}
                Some(entry) => self.violate(format!(
                    "acked message lost: {room} #{seq} was acked as {fact:?}, {how} reads {:?}",
                    Fact::of(entry)
                )),
                None => self.violate(format!(
                    "acked message lost: {room} #{seq} ({fact:?}) missing from {how} ({} entries)",
                    entries.len()
                )),
            }
        }
    }
}
