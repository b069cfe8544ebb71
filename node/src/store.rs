//! The node's durable store: room logs and node facts in one redb database under `--data-dir`.
//!
//! Tables:
//! - `entries`: `(room, seq)` → an encoded [`Entry`].
//! - `logs`: `room` → the node's [`LogState`] for that room (promised epoch, last seq, runs,
//!   placement).
//! - `horizons`: `room` → the node's [`Horizon`] for that room (what retention dropped), for
//!   rooms that were ever trimmed.
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
//!
//! A failed commit (a full disk, an I/O error) fails its whole batch at once and marks the store
//! unwritable ([`Store::writable`], the `chat_store_writable` gauge): rooms then refuse sends
//! with `unavailable` and `/healthz` answers 503. redb refuses every later operation after an
//! I/O error, so the writer closes and reopens the database (its repair runs on open), then
//! probes with a small write every [`PROBE_INTERVAL`] until one commits: the store is writable
//! again without a restart. Writes queued against the state from before a failure are failed too
//! (see [`Writer::submit_after`]), so that nothing built on a lost write is ever committed.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, RwLock, mpsc};
use std::time::{Duration, Instant};

use chat_protocol::RoomId;
use chat_protocol::codec;
use chat_protocol::peer::{Entry, Horizon, LogState};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::metrics::Metrics;

const ENTRIES: TableDefinition<'_, (&str, u64), &[u8]> = TableDefinition::new("entries");
const LOGS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("logs");
const NODE: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("node");
const HORIZONS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("horizons");

/// The first byte of every stored value. Format 1 wrote room log states without `synced`; they
/// are read and converted (values are rewritten in format 2 as rooms write again).
const STORE_VERSION: u8 = 2;

/// Writes handed to the writer thread at most per transaction; bounds a commit's latency.
const MAX_BATCH: usize = 4096;

/// Entries below a horizon deleted per transaction, at most: bounds what compaction adds to a
/// commit's latency.
pub const COMPACT_PER_BATCH: usize = 2048;

/// While the store is unwritable, the writer tries a small write this often.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(500);

/// The size of the probe write: about what a batch of sends adds, so that a probe does not pass
/// on a disk where real writes still fail.
const PROBE_BYTES: usize = 16 << 10;

/// The store key the probe writes.
const PROBE_KEY: &str = "probe";

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
    /// The database is closed while the writer reopens it after a failure.
    #[error("store: closed after a failed write; reopening")]
    Closed,
    /// The write was made against a state that a failed write has since invalidated.
    #[error("store: an earlier write failed")]
    Stale,
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
    /// Records a room's horizon (retention) and log state: drop entries after `truncate_after`
    /// (if set) at once, and entries below `horizon.compacted` over the next transactions.
    Trim {
        /// The room.
        room: RoomId,
        /// The log state after this write.
        state: LogState,
        /// What retention dropped.
        horizon: Horizon,
        /// Remove entries with a greater seq first.
        truncate_after: Option<u64>,
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
    shared: Arc<Shared>,
}

struct Shared {
    path: PathBuf,
    /// `None` while the writer reopens the database after a failure.
    db: RwLock<Option<Arc<Database>>>,
    memory: AtomicU8,
    /// Whether the last commit (or probe) succeeded.
    writable: AtomicBool,
    /// Failed commits since the store was opened: the failure generation.
    failures: AtomicU64,
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
        let opened = Store::open_file(path.clone(), fresh);
        if opened.is_err() && fresh {
            // A creation cut short (a full disk) leaves a file redb cannot read: the next
            // attempt must start from nothing.
            let _ = std::fs::remove_file(&path);
        }
        opened
    }

    fn open_file(path: PathBuf, fresh: bool) -> Result<Store, StoreError> {
        let db = Database::create(&path)
            .map_err(|e| StoreError::Db(format!("open {}: {e}", path.display())))?;
        let txn = db.begin_write().map_err(db_err)?;
        let memory = {
            txn.open_table(ENTRIES).map_err(db_err)?;
            txn.open_table(LOGS).map_err(db_err)?;
            txn.open_table(HORIZONS).map_err(db_err)?;
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
            shared: Arc::new(Shared {
                path,
                db: RwLock::new(Some(Arc::new(db))),
                memory: AtomicU8::new(memory as u8),
                writable: AtomicBool::new(true),
                failures: AtomicU64::new(0),
            }),
        })
    }

    /// Whether the store can write: false from a failed commit until a write succeeds again.
    pub fn writable(&self) -> bool {
        self.shared.writable.load(Ordering::Acquire)
    }

    /// How many commits failed since the store was opened. A state read or cached before this
    /// number changed may include writes that never reached the disk.
    pub fn failures(&self) -> u64 {
        self.shared.failures.load(Ordering::Acquire)
    }

    /// The open database (a clone of the handle: reads never hold the lock while they read).
    fn db(&self) -> Result<Arc<Database>, StoreError> {
        let db = self.shared.db.read().unwrap_or_else(|e| e.into_inner());
        db.clone().ok_or(StoreError::Closed)
    }

    /// Closes the database and opens it again (redb refuses everything after an I/O error until
    /// then; opening repairs it). Waits for the reads under way to finish, up to `wait`; returns
    /// whether the database is open again.
    fn reopen(&self, wait: Duration) -> bool {
        let old = self
            .shared
            .db
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(mut old) = old {
            // The file lock is released only when the last handle is dropped; reads hold a
            // handle for one bounded read.
            let deadline = Instant::now() + wait;
            loop {
                match Arc::try_unwrap(old) {
                    Ok(db) => {
                        drop(db);
                        break;
                    }
                    Err(still_shared) if Instant::now() < deadline => {
                        old = still_shared;
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    Err(still_shared) => {
                        *self.shared.db.write().unwrap_or_else(|e| e.into_inner()) =
                            Some(still_shared);
                        return false;
                    }
                }
            }
        }
        match Database::create(&self.shared.path) {
            Ok(db) => {
                *self.shared.db.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(db));
                true
            }
            Err(e) => {
                tracing::warn!(path = %self.shared.path.display(), error = %e, "store cannot be reopened yet");
                false
            }
        }
    }

    /// Whether the database is open.
    fn is_open(&self) -> bool {
        self.shared
            .db
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// What this node's store remembers of its past.
    pub fn memory(&self) -> Memory {
        match self.shared.memory.load(Ordering::Relaxed) {
            0 => Memory::Intact,
            1 => Memory::Unknown,
            _ => Memory::Lost,
        }
    }

    /// Records what the membership found out about this store's past (also durably).
    pub fn set_memory(&self, memory: Memory) -> Result<(), StoreError> {
        self.apply(&[Write::node(MEMORY_KEY, &memory)?])?;
        self.shared.memory.store(memory as u8, Ordering::Relaxed);
        Ok(())
    }

    /// This node's log state for `room` (the default state when it holds nothing).
    pub fn log_state(&self, room: &RoomId) -> Result<LogState, StoreError> {
        // The handle outlives the transaction, so that a reopen waits for it.
        let db = self.db()?;
        let txn = db.begin_read().map_err(db_err)?;
        let table = txn.open_table(LOGS).map_err(db_err)?;
        match table.get(room.as_str()).map_err(db_err)? {
            Some(value) => decode_log_state(value.value()),
            None => Ok(LogState::default()),
        }
    }

    /// What retention dropped from this node's copy of `room` (nothing when never trimmed).
    pub fn horizon(&self, room: &RoomId) -> Result<Horizon, StoreError> {
        // The handle outlives the transaction, so that a reopen waits for it.
        let db = self.db()?;
        let txn = db.begin_read().map_err(db_err)?;
        let table = txn.open_table(HORIZONS).map_err(db_err)?;
        match table.get(room.as_str()).map_err(db_err)? {
            Some(value) => decode(value.value()),
            None => Ok(Horizon::default()),
        }
    }

    /// Every room ever trimmed, with the seq below which its entries are to be deleted.
    fn compactions(&self) -> Result<Vec<(String, u64)>, StoreError> {
        let db = self.db()?;
        let txn = db.begin_read().map_err(db_err)?;
        let table = txn.open_table(HORIZONS).map_err(db_err)?;
        let mut out = Vec::new();
        for item in table.iter().map_err(db_err)? {
            let (key, value) = item.map_err(db_err)?;
            let horizon: Horizon = decode(value.value())?;
            out.push((key.value().to_owned(), horizon.compacted));
        }
        Ok(out)
    }

    /// How many entries of `room` the store holds (a full scan: for tests and tools).
    pub fn count_entries(&self, room: &RoomId) -> Result<u64, StoreError> {
        let db = self.db()?;
        let txn = db.begin_read().map_err(db_err)?;
        let table = txn.open_table(ENTRIES).map_err(db_err)?;
        let mut count = 0;
        for item in table
            .range((room.as_str(), 0)..=(room.as_str(), u64::MAX))
            .map_err(db_err)?
        {
            item.map_err(db_err)?;
            count += 1;
        }
        Ok(count)
    }

    /// Every room this node holds a log for, with its state.
    pub fn rooms(&self) -> Result<Vec<(RoomId, LogState)>, StoreError> {
        // The handle outlives the transaction, so that a reopen waits for it.
        let db = self.db()?;
        let txn = db.begin_read().map_err(db_err)?;
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
        // The handle outlives the transaction, so that a reopen waits for it.
        let db = self.db()?;
        let txn = db.begin_read().map_err(db_err)?;
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
        // The handle outlives the transaction, so that a reopen waits for it.
        let db = self.db()?;
        let txn = db.begin_read().map_err(db_err)?;
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
        // The handle outlives the transaction, so that a reopen waits for it.
        let db = self.db()?;
        let txn = db.begin_read().map_err(db_err)?;
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
        // The handle outlives the transaction, so that a reopen waits for it.
        let db = self.db()?;
        let txn = db.begin_write().map_err(db_err)?;
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
        self.apply_compacting(writes, &mut Compaction::default())
    }

    /// Applies `writes` in one durable transaction, with a bounded step of `compaction`; the
    /// step is kept only if the transaction commits.
    fn apply_compacting(
        &self,
        writes: &[Write],
        compaction: &mut Compaction,
    ) -> Result<(), StoreError> {
        // The handle outlives the transaction, so that a reopen waits for it.
        let db = self.db()?;
        let txn = db.begin_write().map_err(db_err)?;
        let mut next = compaction.clone();
        {
            let mut entries = txn.open_table(ENTRIES).map_err(db_err)?;
            let mut logs = txn.open_table(LOGS).map_err(db_err)?;
            let mut horizons = txn.open_table(HORIZONS).map_err(db_err)?;
            let mut node = txn.open_table(NODE).map_err(db_err)?;
            let truncate = |entries: &mut redb::Table<'_, (&str, u64), &[u8]>,
                            room: &str,
                            after: Option<u64>| {
                match after {
                    Some(after) => entries
                        .retain_in(
                            (room, after.saturating_add(1))..=(room, u64::MAX),
                            |_, _| false,
                        )
                        .map_err(db_err),
                    None => Ok(()),
                }
            };
            for write in writes {
                match write {
                    Write::Log {
                        room,
                        state,
                        truncate_after,
                        entries: new,
                    } => {
                        let room = room.as_str();
                        truncate(&mut entries, room, *truncate_after)?;
                        // Entries below the deletion point are not stored again.
                        let below = next.pending.get(room).copied().unwrap_or(0);
                        for entry in new.iter().filter(|e| e.seq >= below) {
                            let bytes = encode(entry)?;
                            entries
                                .insert((room, entry.seq), bytes.as_slice())
                                .map_err(db_err)?;
                        }
                        logs.insert(room, encode(state)?.as_slice())
                            .map_err(db_err)?;
                    }
                    Write::Trim {
                        room,
                        state,
                        horizon,
                        truncate_after,
                    } => {
                        let room = room.as_str();
                        truncate(&mut entries, room, *truncate_after)?;
                        logs.insert(room, encode(state)?.as_slice())
                            .map_err(db_err)?;
                        horizons
                            .insert(room, encode(horizon)?.as_slice())
                            .map_err(db_err)?;
                        next.add(room, horizon.compacted);
                    }
                    Write::Node { key, value } => {
                        node.insert(*key, value.as_slice()).map_err(db_err)?;
                    }
                }
            }
            next.step(&mut entries, COMPACT_PER_BATCH)?;
        }
        txn.commit().map_err(db_err)?;
        *compaction = next;
        Ok(())
    }
}

/// The deletions of entries below horizons still to do: room → delete entries with a smaller
/// seq. Lives on the writer thread; rebuilt from the `horizons` table when the writer starts.
#[derive(Debug, Clone, Default)]
struct Compaction {
    pending: std::collections::BTreeMap<String, u64>,
    /// Entries deleted and not yet counted in the metrics.
    deleted: u64,
}

impl Compaction {
    fn add(&mut self, room: &str, below: u64) {
        let at = self.pending.entry(room.to_owned()).or_insert(0);
        *at = (*at).max(below);
    }

    fn is_done(&self) -> bool {
        self.pending.is_empty()
    }

    /// Publishes the rooms still to compact and the entries deleted since the last report.
    fn report(&mut self, metrics: &Metrics) {
        metrics
            .store_compaction_rooms
            .set(self.pending.len() as i64);
        metrics
            .store_compacted
            .inc_by(std::mem::take(&mut self.deleted));
    }

    /// Deletes at most `budget` entries below the pending points; forgets the rooms done.
    fn step(
        &mut self,
        entries: &mut redb::Table<'_, (&str, u64), &[u8]>,
        mut budget: usize,
    ) -> Result<(), StoreError> {
        let mut done = Vec::new();
        for (room, &below) in &self.pending {
            if budget == 0 {
                break;
            }
            let seqs: Vec<u64> = entries
                .range((room.as_str(), 0)..(room.as_str(), below))
                .map_err(db_err)?
                .take(budget)
                .map(|item| item.map(|(key, _)| key.value().1).map_err(db_err))
                .collect::<Result<_, _>>()?;
            for &seq in &seqs {
                entries.remove((room.as_str(), seq)).map_err(db_err)?;
            }
            budget -= seqs.len();
            self.deleted += seqs.len() as u64;
            if budget > 0 {
                done.push(room.clone());
            }
        }
        for room in done {
            self.pending.remove(&room);
        }
        Ok(())
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
    tx: mpsc::Sender<Queued>,
}

/// A write waiting for the writer thread.
struct Queued {
    write: Write,
    done: Done,
    /// The failure generation ([`Store::failures`]) the write was made against, if it depends on
    /// earlier writes having reached the disk.
    after: Option<u64>,
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
        let (tx, rx) = mpsc::channel::<Queued>();
        let handle = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || run_writer(&store, &metrics, &rx))?;
        Ok((Writer { tx }, handle))
    }

    /// Queues `write`; `done` runs on the writer thread once it is durable or failed.
    /// `done` must not block: it should only send a message.
    pub fn submit(&self, write: Write, done: Done) {
        self.queue(Queued {
            write,
            done,
            after: None,
        });
    }

    /// Queues `write`, decided on a state that includes every write queued before it while
    /// [`Store::failures`] was `failures`: if a commit failed since, some of those never reached
    /// the disk, and `write` fails with [`StoreError::Stale`] instead of being committed.
    pub fn submit_after(&self, failures: u64, write: Write, done: Done) {
        self.queue(Queued {
            write,
            done,
            after: Some(failures),
        });
    }

    fn queue(&self, queued: Queued) {
        if let Err(mpsc::SendError(queued)) = self.tx.send(queued) {
            (queued.done)(Err(StoreError::Stopped));
        }
    }
}

fn run_writer(store: &Store, metrics: &Metrics, rx: &mpsc::Receiver<Queued>) {
    metrics.store_writable.set(i64::from(store.writable()));
    let mut batch: Vec<Queued> = Vec::with_capacity(MAX_BATCH);
    let mut writes: Vec<Write> = Vec::with_capacity(MAX_BATCH);
    let mut compaction = Compaction::default();
    match store.compactions() {
        Ok(rooms) => {
            for (room, below) in rooms {
                compaction.add(&room, below);
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "pending compactions unreadable; they resume with the next trims")
        }
    }
    compaction.report(metrics);
    loop {
        let first = if store.writable() && !compaction.is_done() {
            // Compaction left to do: a transaction of it alone when no write is waiting.
            match rx.try_recv() {
                Ok(queued) => Some(queued),
                Err(mpsc::TryRecvError::Empty) => {
                    let result = store.apply_compacting(&[], &mut compaction);
                    compaction.report(metrics);
                    if let Err(e) = result {
                        tracing::warn!(error = %e, "compaction failed; retrying with the next writes");
                        match rx.recv() {
                            Ok(queued) => Some(queued),
                            Err(_) => return,
                        }
                    } else {
                        continue;
                    }
                }
                Err(mpsc::TryRecvError::Disconnected) => return,
            }
        } else if store.writable() {
            match rx.recv() {
                Ok(queued) => Some(queued),
                Err(_) => return,
            }
        } else {
            match rx.recv_timeout(PROBE_INTERVAL) {
                Ok(queued) => Some(queued),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
        };
        if !store.writable() {
            recover(store, metrics);
        }
        let Some(first) = first else { continue };
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(queued) => batch.push(queued),
                Err(_) => break,
            }
        }
        let failures = store.failures();
        let (stale, fresh): (Vec<Queued>, Vec<Queued>) = batch
            .drain(..)
            .partition(|q| q.after.is_some_and(|after| after != failures));
        for queued in stale {
            (queued.done)(Err(StoreError::Stale));
        }
        if fresh.is_empty() {
            continue;
        }
        let mut dones = Vec::with_capacity(fresh.len());
        for queued in fresh {
            writes.push(queued.write);
            dones.push(queued.done);
        }
        let result = if store.writable() {
            let started = Instant::now();
            let result = store.apply_compacting(&writes, &mut compaction);
            compaction.report(metrics);
            metrics
                .store_commit_seconds
                .observe(started.elapsed().as_secs_f64());
            metrics.store_batch.observe(writes.len() as f64);
            metrics.store_commits.inc();
            result
        } else {
            // Still failing: not worth trying until a probe succeeds.
            Err(StoreError::Closed)
        };
        if let Err(e) = &result {
            if store.writable() {
                tracing::error!(error = %e, writes = writes.len(), "store commit failed; refusing writes until the disk takes them again");
            }
            metrics.store_commit_failures.inc();
            metrics.store_writable.set(0);
            store.shared.writable.store(false, Ordering::Release);
            store.shared.failures.fetch_add(1, Ordering::AcqRel);
        }
        writes.clear();
        for done in dones {
            done(result.clone());
        }
    }
}

/// Tries to make the store writable again: a small durable write, after reopening the database
/// when it is closed or refuses the write (redb refuses everything after an I/O error).
fn recover(store: &Store, metrics: &Metrics) {
    let probe = || {
        store.apply(&[Write::Node {
            key: PROBE_KEY,
            value: vec![0; PROBE_BYTES],
        }])
    };
    let result = match store.is_open().then(probe) {
        Some(Ok(())) => Ok(()),
        _ => {
            if !store.reopen(Duration::from_secs(1)) {
                return;
            }
            probe()
        }
    };
    match result {
        Ok(()) => {
            tracing::info!("store writable again");
            store.shared.writable.store(true, Ordering::Release);
            metrics.store_writable.set(1);
        }
        Err(e) => tracing::debug!(error = %e, "store still cannot write"),
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
    fn a_write_made_before_a_failed_commit_is_refused_and_the_writer_recovers() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let metrics = Metrics::new();
        let (writer, handle) = Writer::start(store.clone(), metrics.clone()).unwrap();
        let room = RoomId::new("r").unwrap();
        let write = |seq| Write::Log {
            room: room.clone(),
            state: state(seq, 1),
            truncate_after: None,
            entries: vec![entry(seq, 1, "x")],
        };
        let (tx, rx) = mpsc::channel();
        let done = |tx: &mpsc::Sender<Result<(), StoreError>>| -> Done {
            let tx = tx.clone();
            Box::new(move |r| tx.send(r).unwrap())
        };
        writer.submit_after(0, write(1), done(&tx));
        assert!(rx.recv().unwrap().is_ok());
        // A commit fails (as on a full disk): what was decided before it is not committed.
        store.shared.failures.fetch_add(1, Ordering::AcqRel);
        store.shared.writable.store(false, Ordering::Release);
        writer.submit_after(0, write(2), done(&tx));
        assert!(matches!(rx.recv().unwrap(), Err(StoreError::Stale)));
        assert_eq!(store.log_state(&room).unwrap().last_seq, 1);
        // The writer probes until a write succeeds, then takes writes again.
        let deadline = Instant::now() + PROBE_INTERVAL * 10;
        while !store.writable() {
            assert!(Instant::now() < deadline, "the store did not recover");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(metrics.store_writable.get(), 1);
        writer.submit_after(store.failures(), write(2), done(&tx));
        assert!(rx.recv().unwrap().is_ok());
        drop(writer);
        handle.join().unwrap();
        assert_eq!(store.entries(&room, 1, 10, usize::MAX).unwrap().len(), 2);
    }

    #[test]
    fn a_reopened_store_keeps_its_data_and_waits_for_reads_under_way() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let room = RoomId::new("r").unwrap();
        store
            .apply(&[Write::Log {
                room: room.clone(),
                state: state(3, 1),
                truncate_after: None,
                entries: (1..=3).map(|s| entry(s, 1, "x")).collect(),
            }])
            .unwrap();
        // A read holding the database makes a short wait give up, and leaves it open.
        let held = store.db().unwrap();
        assert!(!store.reopen(Duration::from_millis(20)));
        assert!(store.is_open());
        drop(held);
        assert!(store.reopen(Duration::from_secs(1)));
        assert_eq!(store.log_state(&room).unwrap(), state(3, 1));
        assert_eq!(store.entries(&room, 1, 10, usize::MAX).unwrap().len(), 3);
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
            let txn = store.db().unwrap().begin_write().unwrap();
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
