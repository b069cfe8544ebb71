//! The node's durable store: room logs and node facts in one redb database under `--data-dir`.
//!
//! Tables:
//! - `entries`: `(room, seq)` → an encoded [`Entry`].
//! - `logs`: `room` → the node's [`LogState`] for that room (promised epoch, last seq, runs,
//!   placement).
//! - `node`: small facts about this node (incarnation, known members).
//!
//! The store is dumb on purpose: it writes what it is told. Deciding *whether* a write is
//! allowed (epochs, contiguity) is the log keeper's job (`rooms::keeper`), which holds the
//! pure rules in `rooms::log`.
//!
//! Writes go through one [`Writer`] thread that drains every queued write into a single
//! transaction and commits it durably (fsync) before calling each write's completion: group
//! commit, so a busy node pays one fsync per batch, not per message. Reads open their own read
//! transactions and never wait for the writer (MVCC).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::mpsc;
use std::time::Instant;

use chat_protocol::RoomId;
use chat_protocol::codec;
use chat_protocol::peer::{Entry, LogState};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::metrics::Metrics;

const ENTRIES: TableDefinition<'_, (&str, u64), &[u8]> = TableDefinition::new("entries");
const LOGS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("logs");
const NODE: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("node");

/// The first byte of every stored value. Format 1 wrote room log states without `synced`; they
/// are read and converted (values are rewritten in format 2 as rooms write again).
const STORE_VERSION: u8 = 2;

/// Writes handed to the writer thread at most per transaction; bounds a commit's latency.
const MAX_BATCH: usize = 4096;

/// A store failure. Disk errors are not recoverable by retrying the same write.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// redb reported an error.
    #[error("store: {0}")]
    Db(String),
    /// A stored value could not be decoded.
    #[error("store: corrupt value: {0}")]
    Corrupt(String),
    /// The writer thread is gone (the node is stopping).
    #[error("store: writer stopped")]
    Stopped,
}

fn db_err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Db(e.to_string())
}

/// One change to the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    /// Changes a room's log: drop entries after `truncate_after` (if set), insert `entries`,
    /// and record `state` as the room's new log state.
    Log {
        /// The room.
        room: RoomId,
        /// The log state after this write.
        state: LogState,
        /// Remove entries with a greater seq first.
        truncate_after: Option<u64>,
        /// Entries to insert.
        entries: Vec<Entry>,
    },
    /// Records a fact about this node (e.g. `members`), as encoded bytes.
    Node {
        /// The fact's name.
        key: &'static str,
        /// Its encoded value.
        value: Vec<u8>,
    },
}

impl Write {
    /// Records `value` as the fact `key` about this node.
    pub fn node<T: serde::Serialize>(key: &'static str, value: &T) -> Result<Write, StoreError> {
        Ok(Write::Node {
            key,
            value: encode(value)?,
        })
    }
}

/// The completion of a write: called on the writer thread once the write is durable (or failed).
pub type Done = Box<dyn FnOnce(Result<(), StoreError>) + Send>;

/// What a node's store remembers of the node's past (a fact kept in the store).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Memory {
    /// The store has been with the node all along.
    Intact = 0,
    /// The store was created empty on this node: the node is new, or lost its disk; its peers
    /// tell which (they knew an earlier life of it, or not).
    Unknown = 1,
    /// The node lost its disk: its copies of room logs may lack what it once acknowledged, so
    /// a copy it was not brought up to date for since does not count in claims.
    Lost = 2,
}

impl Memory {
    /// Whether copies this node was not synced for since may have forgotten acknowledged
    /// entries.
    pub fn doubtful(self) -> bool {
        self != Memory::Intact
    }
}

/// The store key of the [`Memory`] fact.
const MEMORY_KEY: &str = "memory";

/// The durable store. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    db: Arc<Database>,
    memory: Arc<AtomicU8>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Store")
    }
}

impl Store {
    /// Opens (or creates) the database in `dir`. A database created here starts with its
    /// [`Memory`] unknown: the node may be new, or may have lost its disk.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| StoreError::Db(format!("create {}: {e}", dir.display())))?;
        let path = dir.join("chat.redb");
        let fresh = !path.exists();
        let db = Database::create(&path)
            .map_err(|e| StoreError::Db(format!("open {}: {e}", path.display())))?;
        let txn = db.begin_write().map_err(db_err)?;
        let memory = {
            txn.open_table(ENTRIES).map_err(db_err)?;
            txn.open_table(LOGS).map_err(db_err)?;
            let mut node = txn.open_table(NODE).map_err(db_err)?;
            if fresh {
                node.insert(MEMORY_KEY, encode(&Memory::Unknown)?.as_slice())
                    .map_err(db_err)?;
            }
            // Stores from before this fact existed remember their past.
            match node.get(MEMORY_KEY).map_err(db_err)? {
                Some(value) => decode(value.value())?,
                None => Memory::Intact,
            }
        };
        txn.commit().map_err(db_err)?;
        Ok(Store {
            db: Arc::new(db),
            memory: Arc::new(AtomicU8::new(memory as u8)),
        })
    }

    /// What this node's store remembers of its past.
    pub fn memory(&self) -> Memory {
        match self.memory.load(Ordering::Relaxed) {
            0 => Memory::Intact,
            1 => Memory::Unknown,
            _ => Memory::Lost,
        }
    }

    /// Records what the membership found out about this store's past (also durably).
    pub fn set_memory(&self, memory: Memory) -> Result<(), StoreError> {
        self.apply(&[Write::node(MEMORY_KEY, &memory)?])?;
        self.memory.store(memory as u8, Ordering::Relaxed);
        Ok(())
    }

    /// This node's log state for `room` (the default state when it holds nothing).
    pub fn log_state(&self, room: &RoomId) -> Result<LogState, StoreError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let table = txn.open_table(LOGS).map_err(db_err)?;
        match table.get(room.as_str()).map_err(db_err)? {
            Some(value) => decode_log_state(value.value()),
            None => Ok(LogState::default()),
        }
    }

    /// Every room this node holds a log for, with its state.
    pub fn rooms(&self) -> Result<Vec<(RoomId, LogState)>, StoreError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let table = txn.open_table(LOGS).map_err(db_err)?;
        let mut rooms = Vec::new();
        for item in table.iter().map_err(db_err)? {
            let (key, value) = item.map_err(db_err)?;
            let room = RoomId::new(key.value()).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            rooms.push((room, decode_log_state(value.value())?));
        }
        Ok(rooms)
    }

    /// Entries `from_seq..=to_seq`, ascending, stopping early once `max_bytes` of text is read
    /// (at least one entry is returned when any exists).
    pub fn entries(
        &self,
        room: &RoomId,
        from_seq: u64,
        to_seq: u64,
        max_bytes: usize,
    ) -> Result<Vec<Entry>, StoreError> {
        let mut out = Vec::new();
        if from_seq > to_seq {
            return Ok(out);
        }
        let txn = self.db.begin_read().map_err(db_err)?;
        let table = txn.open_table(ENTRIES).map_err(db_err)?;
        let mut bytes = 0;
        for item in table
            .range((room.as_str(), from_seq)..=(room.as_str(), to_seq))
            .map_err(db_err)?
        {
            let (_, value) = item.map_err(db_err)?;
            let entry: Entry = decode(value.value())?;
            bytes += entry.text.len() + 64;
            out.push(entry);
            if bytes >= max_bytes {
                break;
            }
        }
        Ok(out)
    }

    /// The newest `limit` entries with `seq < before`, returned oldest first, within `max_bytes`.
    pub fn entries_before(
        &self,
        room: &RoomId,
        before: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<Entry>, StoreError> {
        let mut out = Vec::new();
        if before <= 1 || limit == 0 {
            return Ok(out);
        }
        let txn = self.db.begin_read().map_err(db_err)?;
        let table = txn.open_table(ENTRIES).map_err(db_err)?;
        let mut bytes = 0;
        for item in table
            .range((room.as_str(), 1)..(room.as_str(), before))
            .map_err(db_err)?
            .rev()
        {
            let (_, value) = item.map_err(db_err)?;
            let entry: Entry = decode(value.value())?;
            bytes += entry.text.len() + 64;
            out.push(entry);
            if out.len() >= limit || bytes >= max_bytes {
                break;
            }
        }
        out.reverse();
        Ok(out)
    }

    /// A fact about this node recorded by `Write::Node`, decoded.
    pub fn node_value<T: serde::de::DeserializeOwned>(
        &self,
        key: &str,
    ) -> Result<Option<T>, StoreError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let table = txn.open_table(NODE).map_err(db_err)?;
        match table.get(key).map_err(db_err)? {
            Some(value) => decode(value.value()).map(Some),
            None => Ok(None),
        }
    }

    /// Takes the next incarnation number of this node (durably) and returns it: above the last
    /// one stored and not below `floor` (the caller passes the wall clock, so that a node whose
    /// data was wiped still comes back with an incarnation its peers have not seen).
    pub fn next_incarnation(&self, floor: u64) -> Result<u64, StoreError> {
        let txn = self.db.begin_write().map_err(db_err)?;
        let next = {
            let mut table = txn.open_table(NODE).map_err(db_err)?;
            let current: u64 = match table.get("incarnation").map_err(db_err)? {
                Some(value) => decode(value.value())?,
                None => 0,
            };
            let next = (current + 1).max(floor);
            let bytes = encode(&next)?;
            table
                .insert("incarnation", bytes.as_slice())
                .map_err(db_err)?;
            next
        };
        txn.commit().map_err(db_err)?;
        Ok(next)
    }

    /// Applies `writes` in one durable transaction.
    pub fn apply(&self, writes: &[Write]) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(db_err)?;
        {
            let mut entries = txn.open_table(ENTRIES).map_err(db_err)?;
            let mut logs = txn.open_table(LOGS).map_err(db_err)?;
            let mut node = txn.open_table(NODE).map_err(db_err)?;
            for write in writes {
                match write {
                    Write::Log {
                        room,
                        state,
                        truncate_after,
                        entries: new,
                    } => {
                        let room = room.as_str();
                        if let Some(after) = truncate_after {
                            entries
                                .retain_in(
                                    (room, after.saturating_add(1))..=(room, u64::MAX),
                                    |_, _| false,
                                )
                                .map_err(db_err)?;
                        }
                        for entry in new {
                            let bytes = encode(entry)?;
                            entries
                                .insert((room, entry.seq), bytes.as_slice())
                                .map_err(db_err)?;
                        }
                        logs.insert(room, encode(state)?.as_slice())
                            .map_err(db_err)?;
                    }
                    Write::Node { key, value } => {
                        node.insert(*key, value.as_slice()).map_err(db_err)?;
                    }
                }
            }
        }
        txn.commit().map_err(db_err)
    }
}

fn encode<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    codec::encode_versioned(STORE_VERSION, value).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, StoreError> {
    let corrupt = |e: codec::CodecError| StoreError::Corrupt(e.to_string());
    match bytes.split_first() {
        // Every value but a log state is written the same way in both formats.
        Some((&version, body)) if version == 1 || version == STORE_VERSION => {
            codec::decode_body(body).map_err(corrupt)
        }
        Some((version, _)) => Err(StoreError::Corrupt(format!(
            "store format {version}, expected {STORE_VERSION} (or 1)"
        ))),
        None => Err(StoreError::Corrupt("empty value".into())),
    }
}

/// A room's log state as format 1 stored it (before `synced`).
#[derive(serde::Deserialize)]
struct LogStateV1 {
    promised: chat_protocol::peer::Epoch,
    last_seq: u64,
    runs: Vec<chat_protocol::peer::Run>,
    placement: Option<chat_protocol::peer::Placement>,
}

fn decode_log_state(bytes: &[u8]) -> Result<LogState, StoreError> {
    if bytes.first() != Some(&1) {
        return decode(bytes);
    }
    let old: LogStateV1 = decode(bytes)?;
    // Format 1 compared copies by the epoch of their last entry: that is the sync label.
    let synced = match old.last_seq {
        0 => 0,
        _ => old.runs.last().map_or(0, |run| run.epoch),
    };
    Ok(LogState {
        promised: old.promised,
        last_seq: old.last_seq,
        runs: old.runs,
        placement: old.placement,
        synced,
    })
}

/// The handle to the writer thread: queue a write with [`Writer::submit`].
#[derive(Clone)]
pub struct Writer {
    tx: mpsc::Sender<(Write, Done)>,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Writer")
    }
}

impl Writer {
    /// Starts the writer thread. It stops once every `Writer` handle is dropped, after
    /// committing what was queued; join the returned handle to wait for that (graceful flush).
    pub fn start(
        store: Store,
        metrics: Metrics,
    ) -> std::io::Result<(Writer, std::thread::JoinHandle<()>)> {
        let (tx, rx) = mpsc::channel::<(Write, Done)>();
        let handle = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || run_writer(&store, &metrics, &rx))?;
        Ok((Writer { tx }, handle))
    }

    /// Queues `write`; `done` runs on the writer thread once it is durable or failed.
    /// `done` must not block: it should only send a message.
    pub fn submit(&self, write: Write, done: Done) {
        if let Err(mpsc::SendError((_, done))) = self.tx.send((write, done)) {
            done(Err(StoreError::Stopped));
        }
    }
}

fn run_writer(store: &Store, metrics: &Metrics, rx: &mpsc::Receiver<(Write, Done)>) {
    let mut writes = Vec::with_capacity(MAX_BATCH);
    let mut dones = Vec::with_capacity(MAX_BATCH);
    while let Ok((write, done)) = rx.recv() {
        writes.push(write);
        dones.push(done);
        while writes.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok((write, done)) => {
                    writes.push(write);
                    dones.push(done);
                }
                Err(_) => break,
            }
        }
        let started = Instant::now();
        let result = store.apply(&writes);
        metrics
            .store_commit_seconds
            .observe(started.elapsed().as_secs_f64());
        metrics.store_batch.observe(writes.len() as f64);
        metrics.store_commits.inc();
        if let Err(e) = &result {
            tracing::error!(error = %e, writes = writes.len(), "store commit failed");
        }
        writes.clear();
        for done in dones.drain(..) {
            done(result.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chat_protocol::UserName;
    use chat_protocol::peer::Run;

    fn entry(seq: u64, epoch: u64, text: &str) -> Entry {
        Entry {
            seq,
            epoch,
            from: UserName::new("alice").unwrap(),
            text: text.into(),
            ts: seq * 10,
            client_id: None,
        }
    }

    fn state(last_seq: u64, epoch: u64) -> LogState {
        LogState {
            synced: epoch,
            promised: epoch,
            last_seq,
            runs: vec![Run {
                epoch,
                first_seq: 1,
            }],
            placement: None,
        }
    }

    #[test]
    fn writes_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let room = RoomId::new("lobby").unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            store
                .apply(&[Write::Log {
                    room: room.clone(),
                    state: state(3, 1),
                    truncate_after: None,
                    entries: (1..=3).map(|s| entry(s, 1, "x")).collect(),
                }])
                .unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.log_state(&room).unwrap(), state(3, 1));
        assert_eq!(store.entries(&room, 1, 10, usize::MAX).unwrap().len(), 3);
        assert_eq!(store.rooms().unwrap(), vec![(room, state(3, 1))]);
    }

    #[test]
    fn reads_are_bounded_and_ordered() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let room = RoomId::new("r").unwrap();
        let other = RoomId::new("r2").unwrap();
        store
            .apply(&[
                Write::Log {
                    room: room.clone(),
                    state: state(100, 1),
                    truncate_after: None,
                    entries: (1..=100).map(|s| entry(s, 1, "hello")).collect(),
                },
                Write::Log {
                    room: other.clone(),
                    state: state(5, 1),
                    truncate_after: None,
                    entries: (1..=5).map(|s| entry(s, 1, "other")).collect(),
                },
            ])
            .unwrap();
        let seqs = |v: Vec<Entry>| v.iter().map(|e| e.seq).collect::<Vec<_>>();
        assert_eq!(
            seqs(store.entries(&room, 98, 200, usize::MAX).unwrap()),
            [98, 99, 100]
        );
        assert_eq!(
            seqs(store.entries_before(&room, 58, 3, usize::MAX).unwrap()),
            [55, 56, 57]
        );
        assert_eq!(
            seqs(store.entries_before(&room, 3, 50, usize::MAX).unwrap()),
            [1, 2]
        );
        assert!(
            store
                .entries_before(&room, 1, 50, usize::MAX)
                .unwrap()
                .is_empty()
        );
        // A byte budget stops the read early but always returns something.
        assert_eq!(store.entries(&room, 1, 100, 1).unwrap().len(), 1);
        assert_eq!(
            seqs(store.entries(&other, 1, 100, usize::MAX).unwrap()),
            [1, 2, 3, 4, 5]
        );
    }

    #[test]
    fn truncation_replaces_a_divergent_suffix_only_in_its_room() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let room = RoomId::new("r").unwrap();
        let other = RoomId::new("r-").unwrap();
        store
            .apply(&[
                Write::Log {
                    room: room.clone(),
                    state: state(5, 1),
                    truncate_after: None,
                    entries: (1..=5).map(|s| entry(s, 1, "old")).collect(),
                },
                Write::Log {
                    room: other.clone(),
                    state: state(2, 1),
                    truncate_after: None,
                    entries: (1..=2).map(|s| entry(s, 1, "keep")).collect(),
                },
            ])
            .unwrap();
        store
            .apply(&[Write::Log {
                room: room.clone(),
                state: state(4, 2),
                truncate_after: Some(2),
                entries: (3..=4).map(|s| entry(s, 2, "new")).collect(),
            }])
            .unwrap();
        let texts: Vec<_> = store
            .entries(&room, 1, 10, usize::MAX)
            .unwrap()
            .into_iter()
            .map(|e| (e.seq, e.text))
            .collect();
        assert_eq!(
            texts,
            [
                (1, "old".into()),
                (2, "old".into()),
                (3, "new".into()),
                (4, "new".into())
            ]
        );
        assert_eq!(store.entries(&other, 1, 10, usize::MAX).unwrap().len(), 2);
    }

    #[test]
    fn writer_group_commits_and_reports_each_write() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let metrics = Metrics::new();
        let (writer, handle) = Writer::start(store.clone(), metrics.clone()).unwrap();
        let (tx, rx) = mpsc::channel();
        let room = RoomId::new("r").unwrap();
        for seq in 1..=200 {
            let tx = tx.clone();
            writer.submit(
                Write::Log {
                    room: room.clone(),
                    state: state(seq, 1),
                    truncate_after: None,
                    entries: vec![entry(seq, 1, "x")],
                },
                Box::new(move |r| tx.send(r.is_ok()).unwrap()),
            );
        }
        drop(writer);
        handle.join().unwrap();
        assert_eq!(rx.iter().take(200).filter(|ok| *ok).count(), 200);
        assert_eq!(store.log_state(&room).unwrap().last_seq, 200);
        assert!(metrics.store_commits.get() <= 200);
    }

    #[test]
    fn incarnations_grow_across_opens() {
        let dir = tempfile::tempdir().unwrap();
        let a = Store::open(dir.path())
            .unwrap()
            .next_incarnation(0)
            .unwrap();
        let b = Store::open(dir.path())
            .unwrap()
            .next_incarnation(0)
            .unwrap();
        assert!(b > a);
        // The floor wins over a store that lost its history (a wiped data volume).
        let fresh = tempfile::tempdir().unwrap();
        let c = Store::open(fresh.path())
            .unwrap()
            .next_incarnation(1_000)
            .unwrap();
        assert_eq!(c, 1_000);
    }

    #[test]
    fn log_states_of_the_first_format_are_read_with_their_last_epoch_as_sync_label() {
        #[derive(serde::Serialize)]
        struct V1 {
            promised: u64,
            last_seq: u64,
            runs: Vec<Run>,
            placement: Option<chat_protocol::peer::Placement>,
        }
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let room = RoomId::new("old").unwrap();
        let runs = vec![
            Run {
                epoch: 2,
                first_seq: 1,
            },
            Run {
                epoch: 5,
                first_seq: 4,
            },
        ];
        let v1 = V1 {
            promised: 6,
            last_seq: 9,
            runs: runs.clone(),
            placement: None,
        };
        let bytes = codec::encode_versioned(1, &v1).unwrap();
        {
            let txn = store.db.begin_write().unwrap();
            txn.open_table(LOGS)
                .unwrap()
                .insert("old", bytes.as_slice())
                .unwrap();
            txn.commit().unwrap();
        }
        let read = store.log_state(&room).unwrap();
        assert_eq!(
            read,
            LogState {
                promised: 6,
                last_seq: 9,
                runs,
                placement: None,
                synced: 5,
            }
        );
        assert_eq!(store.rooms().unwrap(), vec![(room.clone(), read.clone())]);
        // Written again, it is in the current format.
        store
            .apply(&[Write::Log {
                room: room.clone(),
                state: read.clone(),
                truncate_after: None,
                entries: Vec::new(),
            }])
            .unwrap();
        assert_eq!(store.log_state(&room).unwrap(), read);
        assert!(matches!(
            decode::<u64>(&[9, 0]),
            Err(StoreError::Corrupt(_))
        ));
    }
}
