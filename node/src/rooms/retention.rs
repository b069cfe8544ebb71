//! Retention: how much of a room's log the owner keeps, as a pure rule.
//!
//! The owner of a room decides the room's horizon (the smallest seq still served) from its log
//! alone: the count of committed entries and their timestamps, against the wall clock it was
//! given. The horizon then travels through the replicated log ([`super::log::trim`]); this file
//! only says where it should be.

use std::collections::BTreeMap;
use std::sync::Arc;

use chat_protocol::RoomId;
use chat_protocol::peer::Entry;

/// How much of one room's log to keep. Zero means unbounded, for each bound.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Retention {
    /// Keep at most the newest this many messages.
    pub messages: u64,
    /// Drop messages older than this many milliseconds.
    pub age_ms: u64,
}

impl Retention {
    /// Whether nothing is ever dropped.
    pub fn is_unbounded(&self) -> bool {
        self.messages == 0 && self.age_ms == 0
    }
}

/// The retention of every room: a node-wide default and per-room overrides.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetentionPolicy {
    /// For rooms without an override.
    pub default: Retention,
    /// Overrides by room name.
    pub rooms: Arc<BTreeMap<RoomId, Retention>>,
}

impl RetentionPolicy {
    /// The retention of `room`.
    pub fn of(&self, room: &RoomId) -> Retention {
        self.rooms.get(room).copied().unwrap_or(self.default)
    }
}

/// The horizon `retention` asks for, never below `current` and never above `commit + 1`
/// (only committed entries are dropped). `oldest` holds the committed entries from `current`
/// on, ascending (a prefix of them is enough: the age bound then moves only as far as they
/// reach); it is read only for the age bound. Entries' timestamps never decrease along the log.
pub fn horizon(
    retention: &Retention,
    current: u64,
    commit: u64,
    oldest: &[Entry],
    wall_ms: u64,
) -> u64 {
    let by_count = match retention.messages {
        0 => 0,
        keep => commit.saturating_sub(keep) + 1,
    };
    let by_age = match retention.age_ms {
        0 => 0,
        age_ms => {
            let cutoff = wall_ms.saturating_sub(age_ms);
            match oldest.iter().find(|e| e.ts >= cutoff) {
                Some(kept) => kept.seq,
                None => oldest.last().map_or(0, |e| e.seq + 1),
            }
        }
    };
    current.max(by_count).max(by_age).min(commit + 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chat_protocol::UserName;

    fn entries(from: u64, to: u64, ts_of: impl Fn(u64) -> u64) -> Vec<Entry> {
        (from..=to)
            .map(|seq| Entry {
                seq,
                epoch: 1,
                from: UserName::new("u").unwrap(),
                text: String::new(),
                ts: ts_of(seq),
                client_id: None,
            })
            .collect()
    }

    #[test]
    fn the_count_bound_keeps_the_newest_committed_messages() {
        let keep = |messages| Retention {
            messages,
            age_ms: 0,
        };
        // 1 drops nothing, as 0 does.
        assert_eq!(horizon(&keep(1000), 0, 999, &[], 0), 1);
        assert_eq!(horizon(&keep(1000), 0, 1000, &[], 0), 1);
        assert_eq!(horizon(&keep(1000), 0, 20_000, &[], 0), 19_001);
        // It never moves back, and unbounded keeps everything.
        assert_eq!(horizon(&keep(1000), 19_500, 20_000, &[], 0), 19_500);
        assert_eq!(horizon(&Retention::default(), 0, 20_000, &[], 0), 0);
    }

    #[test]
    fn the_age_bound_drops_committed_messages_older_than_the_age() {
        let day = Retention {
            messages: 0,
            age_ms: 1000,
        };
        // Message `seq` was sequenced at `seq * 100` ms.
        let log = entries(1, 50, |seq| seq * 100);
        assert_eq!(horizon(&day, 0, 50, &log, 3000), 20);
        // Everything is old: the horizon is past the last committed message.
        assert_eq!(horizon(&day, 0, 50, &log, 60_000), 51);
        // A prefix of the log moves it only as far as the prefix reaches.
        assert_eq!(horizon(&day, 0, 50, &log[..10], 60_000), 11);
        // Never above the commit point.
        assert_eq!(horizon(&day, 0, 30, &log[..30], 60_000), 31);
        // Both bounds: the higher horizon wins.
        let both = Retention {
            messages: 10,
            age_ms: 1000,
        };
        assert_eq!(horizon(&both, 0, 50, &log, 3000), 41);
    }
}
