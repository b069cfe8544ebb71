//! Rooms: ownership, sequencing, replication and fan-out.
//!
//! ```text
//!  RoomHost (one per node, supervisor)
//!   ├── Room "lobby"   owner side of a room this node owns: sequences, replicates, fans out
//!   ├── Room "dev"
//!   └── …
//!  LogKeeper (one per node): this node's copies of room logs, for any owner
//! ```
//!
//! - [`host`]: routes requests to the room actors of rooms this node owns, creates them on
//!   first use, forwards requests sent on a stale view, restarts rooms that fail.
//! - [`core`]: the pure core of a room's owner (claim, recovery, sequencing, dedupe,
//!   replication, commit, fan-out).
//! - [`room`]: the Room actor, a thin shell around the core.
//! - [`keeper`]: the LogKeeper: its pure core and its actor.
//! - [`log`]: the pure rules of the replicated log (promises, appends, choosing the best log).
//! - [`members`]: the pure bookkeeping of a room's connections and presence.
//! - [`retention`]: the pure rule of how much of a room's log to keep (its horizon).

pub mod core;
pub mod host;
pub mod keeper;
pub mod log;
pub mod members;
pub mod retention;
pub mod room;
