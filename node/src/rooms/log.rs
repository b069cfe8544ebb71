//! Pure rules of the replicated room log, free of I/O and tested as a state machine.
//!
//! Every node may hold a copy of a room's log, described by a [`LogState`]: the highest epoch
//! it promised, its last sequence number, the epochs of its entries as runs, the latest
//! placement it heard of, and its sync label (`synced`).
//!
//! The protocol is primary-backup with epochs, close to Viewstamped Replication with one
//! replica group per room:
//!
//! - A claimer asks every live node to [`promise`] a new epoch. A node promises each epoch at
//!   most once and only if it is higher than any it promised before; from then on it refuses
//!   writes of any other epoch. That is the fence: an owner that lost the room (frozen, cut off)
//!   can no longer get a write stored by a node that promised the new epoch.
//! - With a majority of promises in hand ([`quorum_holds`]), the claimer adopts the [`best`]
//!   copy: the highest sync label, then the longest.
//! - The owner writes with [`append`]: a copy accepts only the epoch it promised and only entries
//!   that follow an entry it holds with the same epoch (log matching); it keeps what it holds
//!   beyond them while that matches the owner's log, and drops the rest. A copy that holds the
//!   owner's log up to the point the owner adopted is labelled with the owner's epoch.
//! - **Commit rule**: the owner counts an entry committed only when every node of its placement
//!   (at least a majority of the known members: `View::room_placement`) has acknowledged it
//!   under the owner's
//!   own epoch and has been brought up to the adopted log. Entries adopted from earlier epochs
//!   are therefore committed only once they are stored under the new epoch, as in Raft.
//!
//! Why nothing acknowledged is lost: a copy labelled `s` holds every entry committed at any
//! epoch up to `s` (it holds the log its owner adopted, which held them, plus what that owner
//! committed, which every node of the placement acknowledged). An entry committed at epoch `c`
//! is on every node of `c`'s placement, a majority, each labelled `c` or higher; any later
//! claim hears from a majority, so from one of them, and adopts a copy labelled at least `c`.
//!
//! Entries keep the epoch they were first written under, and an epoch has one owner that
//! sequences each `seq` once, so two copies that hold an entry with the same seq and epoch agree
//! on everything before it (the log matching property), which is what [`common_prefix`] and the
//! checks of [`append`] rely on.

use chat_protocol::NodeName;
use chat_protocol::peer::{Entry, Epoch, Horizon, LogState, Placement, Run};

/// Why a node refused a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The write's epoch is older than the promised one: the writer lost the room.
    Fenced {
        /// The node's promised epoch.
        promised: Epoch,
    },
    /// The node has not promised the write's epoch (its promise was lost with its disk).
    NotPromised {
        /// The node's promised epoch.
        promised: Epoch,
    },
    /// The entries do not follow the node's copy (a gap, or a different entry at `after_seq`).
    Diverged,
    /// The append contradicts itself (entries not contiguous, or not the owner's): a bug or a
    /// peer speaking nonsense; nothing changes.
    Malformed,
}

/// An append as the owner sends it.
#[derive(Debug, Clone, Copy)]
pub struct Append<'a> {
    /// The writer's epoch.
    pub epoch: Epoch,
    /// Its placement.
    pub placement: &'a Placement,
    /// The entries follow this sequence number.
    pub after_seq: u64,
    /// The epoch of the owner's entry at `after_seq` (0 when `after_seq` is 0).
    pub after_epoch: Epoch,
    /// The entries, from `after_seq + 1`.
    pub entries: &'a [Entry],
    /// The owner's last sequence number.
    pub owner_last_seq: u64,
    /// The epochs of the owner's entries after `after_seq`.
    pub owner_runs: &'a [Run],
    /// The owner's log when it claimed the room.
    pub adopted: u64,
}

/// What an accepted append changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// The copy after the append.
    pub state: LogState,
    /// Stored entries after this seq must be dropped (they are not the owner's).
    pub truncate_after: Option<u64>,
}

/// Seqs and epochs at or beyond this are malformed: a peer cannot make the arithmetic on them
/// (the next seq, the next epoch) wrap.
pub const LIMIT: u64 = u64::MAX / 2;

/// Grants a promise of `epoch` if it is higher than every epoch promised before (and below
/// [`LIMIT`]).
pub fn promise(state: &LogState, epoch: Epoch, placement: &Placement) -> Option<LogState> {
    if epoch <= state.promised || epoch >= LIMIT {
        return None;
    }
    let mut next = state.clone();
    next.promised = epoch;
    next.placement = Some(placement.clone());
    Some(next)
}

/// Applies an append to a copy.
pub fn append(state: &LogState, append: &Append<'_>) -> Result<Applied, Refusal> {
    if append.epoch < state.promised {
        return Err(Refusal::Fenced {
            promised: state.promised,
        });
    }
    if append.epoch > state.promised {
        return Err(Refusal::NotPromised {
            promised: state.promised,
        });
    }
    if append.owner_last_seq >= LIMIT || append.after_seq > append.owner_last_seq {
        return Err(Refusal::Malformed);
    }
    let end = append.after_seq + append.entries.len() as u64;
    let owner = LogState {
        last_seq: append.owner_last_seq,
        runs: append.owner_runs.to_vec(),
        ..LogState::default()
    };
    let well_formed = end <= append.owner_last_seq
        && append.entries.iter().enumerate().all(|(i, e)| {
            e.seq == append.after_seq + 1 + i as u64
                && e.epoch <= append.epoch
                && epoch_at(&owner, e.seq) == Some(e.epoch)
        })
        && (append.after_seq + 1..=append.owner_last_seq)
            .next()
            .is_none_or(|first| epoch_at(&owner, first).is_some());
    if !well_formed {
        return Err(Refusal::Malformed);
    }
    if append.after_seq > state.last_seq
        || (append.after_seq > 0 && epoch_at(state, append.after_seq) != Some(append.after_epoch))
    {
        return Err(Refusal::Diverged);
    }
    // What the copy holds beyond the entries stays while it is the owner's.
    let keep = if state.last_seq > end {
        matching_until(state, &owner, end, state.last_seq.min(owner.last_seq))
    } else {
        end
    };
    let mut runs: Vec<Run> = state
        .runs
        .iter()
        .copied()
        .filter(|run| run.first_seq <= append.after_seq)
        .collect();
    let push = |runs: &mut Vec<Run>, epoch: Epoch, first_seq: u64| {
        if runs.last().map(|run| run.epoch) != Some(epoch) {
            runs.push(Run { epoch, first_seq });
        }
    };
    for entry in append.entries {
        push(&mut runs, entry.epoch, entry.seq);
    }
    for run in &state.runs {
        let next = state
            .runs
            .iter()
            .find(|r| r.first_seq > run.first_seq)
            .map_or(u64::MAX, |r| r.first_seq);
        // The part of this run inside (end, keep].
        let from = run.first_seq.max(end + 1);
        if from <= keep && from < next {
            push(&mut runs, run.epoch, from);
        }
    }
    let synced = if keep >= append.adopted {
        append.epoch
    } else {
        state.synced
    };
    let next = LogState {
        promised: state.promised,
        last_seq: keep,
        runs,
        placement: Some(append.placement.clone()),
        synced,
    };
    Ok(Applied {
        state: next,
        truncate_after: (state.last_seq > keep).then_some(keep),
    })
}

/// The last seq `s` in `(from, top]` such that `a` and `b` hold entries of the same epochs all
/// the way from `from + 1` to `s` (`from` when they differ at once).
fn matching_until(a: &LogState, b: &LogState, from: u64, top: u64) -> u64 {
    if top <= from {
        return from;
    }
    // Epochs change only where a run starts: the points to compare.
    let mut points: Vec<u64> = a
        .runs
        .iter()
        .chain(&b.runs)
        .map(|run| run.first_seq)
        .filter(|&s| s > from && s <= top)
        .collect();
    points.push(from + 1);
    points.sort_unstable();
    points.dedup();
    for point in points {
        if epoch_at(a, point) != epoch_at(b, point) {
            return point - 1;
        }
    }
    top
}

/// The epoch of the entry at `seq`, if the log holds it.
pub fn epoch_at(state: &LogState, seq: u64) -> Option<Epoch> {
    if seq == 0 || seq > state.last_seq {
        return None;
    }
    state
        .runs
        .iter()
        .rev()
        .find(|run| run.first_seq <= seq)
        .map(|run| run.epoch)
}

/// The runs of `state` that cover the entries after `after_seq`.
pub fn runs_after(state: &LogState, after_seq: u64) -> Vec<Run> {
    let mut out = Vec::new();
    for (i, run) in state.runs.iter().enumerate() {
        let next = state.runs.get(i + 1).map_or(u64::MAX, |r| r.first_seq);
        let first_seq = run.first_seq.max(after_seq + 1);
        if first_seq < next && first_seq <= state.last_seq {
            out.push(Run {
                epoch: run.epoch,
                first_seq,
            });
        }
    }
    out
}

/// Appends entries sequenced by the owner (or copied from the adopted log) to its own view of
/// the log; they must follow it.
pub fn extend(state: &mut LogState, entries: &[Entry]) {
    for entry in entries {
        debug_assert_eq!(entry.seq, state.last_seq + 1);
        if state.runs.last().map(|run| run.epoch) != Some(entry.epoch) {
            state.runs.push(Run {
                epoch: entry.epoch,
                first_seq: entry.seq,
            });
        }
        state.last_seq = entry.seq;
    }
}

/// `state` cut after `seq`.
pub fn truncate(state: &LogState, seq: u64) -> LogState {
    let mut next = state.clone();
    next.last_seq = state.last_seq.min(seq);
    next.runs.retain(|run| run.first_seq <= next.last_seq);
    next
}

/// The longest prefix two logs share, as its last sequence number.
pub fn common_prefix(a: &LogState, b: &LogState) -> u64 {
    let top = a.last_seq.min(b.last_seq);
    // Epochs can only start to differ at a run boundary, so these are the only candidates.
    let mut candidates: Vec<u64> = a
        .runs
        .iter()
        .chain(&b.runs)
        .map(|run| run.first_seq.saturating_sub(1))
        .filter(|&s| s < top)
        .collect();
    candidates.push(top);
    candidates.sort_unstable_by(|x, y| y.cmp(x));
    candidates.dedup();
    candidates
        .into_iter()
        .find(|&s| s == 0 || epoch_at(a, s) == epoch_at(b, s))
        .unwrap_or(0)
}

/// The copy a claim adopts among the answers: the highest sync label, then the longest; ties go
/// to the first answer in `answers`' order (callers put their own answer first to avoid a copy).
pub fn best(answers: &[(NodeName, LogState)]) -> Option<&(NodeName, LogState)> {
    answers.iter().reduce(|best, candidate| {
        let key = |s: &LogState| (s.synced, s.last_seq);
        if key(&candidate.1) > key(&best.1) {
            candidate
        } else {
            best
        }
    })
}

/// Whether a claim may adopt a copy from these answers (each with the placement the answerer
/// recorded before the claim; `recovering` names the answerers that lost their disk and were not
/// synced for the room since), among `members` known members. The promises must come from a
/// majority. The copies must be trustworthy: a recovering node may have forgotten entries it
/// acknowledged and the placements it was in with them, so its copy proves nothing. Every
/// placement is a majority of the members known when it was made, so with the members unchanged
/// any `members - majority + 1` intact nodes meet every placement, the latest one included, and
/// the best of their copies holds everything committed. Let `L` be the latest placement any
/// answerer heard of: one intact answer must come from a node of `L` (this covers a change of
/// the known members: a node joined while others were away). Otherwise the claim waits rather
/// than adopt a copy that may lack acknowledged entries.
pub fn quorum_holds(
    answers: &[(NodeName, LogState)],
    recovering: &[NodeName],
    members: usize,
) -> bool {
    let majority = members / 2 + 1;
    let latest = answers
        .iter()
        .filter_map(|(_, state)| state.placement.as_ref())
        .max_by_key(|placement| placement.epoch);
    let intact: Vec<&NodeName> = answers
        .iter()
        .map(|(node, _)| node)
        .filter(|node| !recovering.contains(node))
        .collect();
    answers.len() >= majority
        && intact.len() > members - majority
        && latest.is_none_or(|latest| intact.iter().any(|n| latest.nodes.contains(n)))
}

/// What an accepted trim changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trimmed {
    /// The copy after the trim.
    pub state: LogState,
    /// What retention dropped from it.
    pub horizon: Horizon,
    /// Stored entries after this seq must be dropped (the copy took the owner's log without
    /// entries up to there: what it held above is not the owner's, or cannot be sent again).
    pub truncate_after: Option<u64>,
}

/// Applies a trim (retention) of the owner of `epoch` to a copy that holds `held`: the copy
/// records the higher horizon, and its entries below `wanted.compacted` may go. Entries below a
/// horizon are committed (an owner declares a horizon only over committed entries), so every
/// later owner's log holds them too: dropping them loses nothing a client may still be served.
/// A copy that does not hold the owner's log up to `compacted - 1` (described by `runs`) takes
/// it without entries and drops what it holds above: the owner can only send entries from
/// `compacted` on.
pub fn trim(
    state: &LogState,
    held: Horizon,
    epoch: Epoch,
    wanted: Horizon,
    runs: &[Run],
) -> Result<Trimmed, Refusal> {
    if epoch < state.promised {
        return Err(Refusal::Fenced {
            promised: state.promised,
        });
    }
    if epoch > state.promised {
        return Err(Refusal::NotPromised {
            promised: state.promised,
        });
    }
    let point = wanted.compacted.saturating_sub(1);
    let runs_well_formed = point == 0
        || (runs.first().map(|r| r.first_seq) == Some(1)
            && runs.windows(2).all(|w| w[0].first_seq < w[1].first_seq)
            && runs
                .iter()
                .all(|r| r.first_seq <= point && r.epoch <= epoch));
    if wanted.horizon >= LIMIT || wanted.compacted > wanted.horizon.max(1) || !runs_well_formed {
        return Err(Refusal::Malformed);
    }
    let owner = LogState {
        last_seq: point,
        runs: runs.to_vec(),
        ..LogState::default()
    };
    let holds = point == 0 || common_prefix(state, &owner) >= point;
    let (next, truncate_after) = if holds {
        (state.clone(), None)
    } else {
        let next = LogState {
            last_seq: point,
            runs: owner.runs,
            ..state.clone()
        };
        (next, Some(point))
    };
    Ok(Trimmed {
        state: next,
        horizon: Horizon {
            horizon: held.horizon.max(wanted.horizon),
            compacted: held.compacted.max(wanted.compacted),
        },
        truncate_after,
    })
}

/// The commit point of an owner: the highest seq stored by every node of its placement.
pub fn commit_point<'a>(acked: impl IntoIterator<Item = &'a u64>) -> u64 {
    acked.into_iter().copied().min().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chat_protocol::UserName;

    fn node(name: &str) -> NodeName {
        NodeName::new(name).unwrap()
    }

    fn placement(epoch: Epoch, nodes: &[&str]) -> Placement {
        Placement {
            epoch,
            nodes: nodes.iter().map(|n| node(n)).collect(),
        }
    }

    fn entries(from: u64, to: u64, epoch: Epoch) -> Vec<Entry> {
        (from..=to)
            .map(|seq| Entry {
                seq,
                epoch,
                from: UserName::new("u").unwrap(),
                text: format!("m{seq}"),
                ts: seq,
                client_id: None,
            })
            .collect()
    }

    /// A log built from `(epoch, count)` stretches, promised and synced at the last epoch.
    fn log(stretches: &[(Epoch, u64)]) -> LogState {
        let mut state = LogState::default();
        for &(epoch, count) in stretches {
            let from = state.last_seq + 1;
            extend(&mut state, &entries(from, from + count - 1, epoch));
            state.promised = epoch;
            state.synced = epoch;
        }
        state
    }

    /// The append an owner with log `owner` sends after `after_seq`, with entries up to `to`.
    fn append_of<'a>(
        owner: &LogState,
        epoch: Epoch,
        p: &'a Placement,
        after_seq: u64,
        batch: &'a [Entry],
        runs: &'a [Run],
        adopted: u64,
    ) -> Append<'a> {
        Append {
            epoch,
            placement: p,
            after_seq,
            after_epoch: epoch_at(owner, after_seq).unwrap_or(0),
            entries: batch,
            owner_last_seq: owner.last_seq,
            owner_runs: runs,
            adopted,
        }
    }

    /// The entries of a log built by `log`, from `from` to `to`.
    fn slice(state: &LogState, from: u64, to: u64) -> Vec<Entry> {
        (from..=to)
            .map(|seq| entries(seq, seq, epoch_at(state, seq).unwrap()).remove(0))
            .collect()
    }

    #[test]
    fn promises_only_rise() {
        let p = placement(5, &["a", "b"]);
        let s = promise(&LogState::default(), 5, &p).unwrap();
        assert_eq!(s.promised, 5);
        assert_eq!(s.placement, Some(p.clone()));
        assert_eq!(promise(&s, 5, &p), None, "the same epoch is promised once");
        assert_eq!(promise(&s, 4, &p), None);
        assert!(promise(&s, 6, &p).is_some());
    }

    #[test]
    fn only_the_promised_epoch_may_write() {
        let p2 = placement(2, &["b"]);
        let s = promise(&log(&[(1, 3)]), 2, &p2).unwrap();
        let owner = log(&[(1, 4)]);
        let batch = entries(4, 4, 1);
        let runs = runs_after(&owner, 3);
        let p1 = placement(1, &["a"]);
        let refused = append(&s, &append_of(&owner, 1, &p1, 3, &batch, &runs, 0));
        assert_eq!(refused, Err(Refusal::Fenced { promised: 2 }));
        let p3 = placement(3, &["c"]);
        let refused = append(&s, &append_of(&owner, 3, &p3, 3, &batch, &runs, 0));
        assert_eq!(
            refused,
            Err(Refusal::NotPromised { promised: 2 }),
            "a copy that never promised epoch 3 (or forgot it with its disk) makes the owner claim again"
        );
    }

    #[test]
    fn appends_must_follow_an_entry_of_the_same_epoch() {
        let s = promise(&log(&[(1, 5)]), 3, &placement(3, &["a"])).unwrap();
        let p = placement(3, &["a"]);
        // The owner's log: 1..3 @1, 4..6 @2 (adopted from another copy), then its own 7 @3.
        let owner = log(&[(1, 3), (2, 3), (3, 1)]);
        // A gap: the copy has nothing at 6.
        let batch = slice(&owner, 7, 7);
        let runs = runs_after(&owner, 6);
        assert_eq!(
            append(&s, &append_of(&owner, 3, &p, 6, &batch, &runs, 6)),
            Err(Refusal::Diverged)
        );
        // A different entry at 5 (epoch 1 here, 2 at the owner).
        let batch = slice(&owner, 6, 7);
        let runs = runs_after(&owner, 5);
        assert_eq!(
            append(&s, &append_of(&owner, 3, &p, 5, &batch, &runs, 6)),
            Err(Refusal::Diverged)
        );
        // From the common prefix (3) it is accepted and the copy's 4..5 @1 are replaced.
        let batch = slice(&owner, 4, 7);
        let runs = runs_after(&owner, 3);
        let applied = append(&s, &append_of(&owner, 3, &p, 3, &batch, &runs, 6)).unwrap();
        assert_eq!(
            applied.truncate_after, None,
            "4..5 are overwritten in place"
        );
        assert_eq!(applied.state.last_seq, 7);
        assert_eq!(common_prefix(&applied.state, &owner), 7);
        assert_eq!(applied.state.synced, 3);
    }

    #[test]
    fn malformed_appends_change_nothing() {
        let s = promise(&log(&[(1, 3)]), 2, &placement(2, &["a"])).unwrap();
        let p = placement(2, &["a"]);
        let owner = log(&[(1, 3), (2, 2)]);
        let runs = runs_after(&owner, 3);
        let skipping = entries(5, 5, 2);
        assert_eq!(
            append(&s, &append_of(&owner, 2, &p, 3, &skipping, &runs, 5)),
            Err(Refusal::Malformed)
        );
        let newer = entries(4, 4, 3);
        assert_eq!(
            append(&s, &append_of(&owner, 2, &p, 3, &newer, &runs, 5)),
            Err(Refusal::Malformed),
            "an entry of a newer epoch than its writer"
        );
        let wrong_epoch = entries(4, 4, 1);
        assert_eq!(
            append(&s, &append_of(&owner, 2, &p, 3, &wrong_epoch, &runs, 5)),
            Err(Refusal::Malformed),
            "an entry that is not the owner's"
        );
    }

    #[test]
    fn a_copy_keeps_what_matches_the_owner_beyond_an_append_and_drops_the_rest() {
        let p = placement(2, &["a", "b"]);
        // The copy holds the owner's 1..10 already (a resend after a lost answer).
        let owner = log(&[(1, 4), (2, 8)]); // 1..4 @1, 5..12 @2
        let mut copy = truncate(&owner, 10);
        copy.synced = 2;
        let batch = slice(&owner, 6, 7);
        let runs = runs_after(&owner, 5);
        let applied = append(&copy, &append_of(&owner, 2, &p, 5, &batch, &runs, 4)).unwrap();
        assert_eq!(
            applied.state.last_seq, 10,
            "entries acknowledged before are never dropped by a shorter resend"
        );
        assert_eq!(applied.truncate_after, None);
        assert_eq!(applied.state.runs, copy.runs);

        // A copy with a suffix of an older epoch beyond the owner's log loses it, even when the
        // append carries no entries (the sync of a new owner that adopted 1..4).
        let mut stale = log(&[(1, 4), (3, 5)]); // 1..4 @1, 5..9 @3: never acknowledged
        stale.promised = 5;
        let owner = log(&[(1, 4)]);
        let p5 = placement(5, &["a", "b"]);
        let applied = append(&stale, &append_of(&owner, 5, &p5, 4, &[], &[], 4)).unwrap();
        assert_eq!(applied.state.last_seq, 4);
        assert_eq!(applied.truncate_after, Some(4));
        assert_eq!(applied.state.runs, owner.runs);
        assert_eq!(applied.state.synced, 5, "it now holds the adopted log");
    }

    #[test]
    fn a_copy_is_labelled_with_the_owners_epoch_only_once_it_holds_the_adopted_log() {
        let p = placement(4, &["a", "b"]);
        let owner = log(&[(1, 20)]);
        let mut copy = LogState {
            promised: 4,
            ..LogState::default()
        };
        copy.synced = 0;
        let batch = slice(&owner, 1, 10);
        let runs = runs_after(&owner, 0);
        let half = append(&copy, &append_of(&owner, 4, &p, 0, &batch, &runs, 20)).unwrap();
        assert_eq!(half.state.last_seq, 10);
        assert_eq!(
            half.state.synced, 0,
            "not yet: it lacks 11..20 of the adopted log"
        );
        let batch = slice(&owner, 11, 20);
        let runs = runs_after(&owner, 10);
        let full = append(
            &half.state,
            &append_of(&owner, 4, &p, 10, &batch, &runs, 20),
        )
        .unwrap();
        assert_eq!(full.state.synced, 4);
        assert_eq!(full.state.placement, Some(p));
    }

    #[test]
    fn runs_after_cover_exactly_the_suffix() {
        let s = log(&[(1, 3), (2, 3), (4, 2)]); // 1..3 @1, 4..6 @2, 7..8 @4
        assert_eq!(
            runs_after(&s, 4),
            vec![
                Run {
                    epoch: 2,
                    first_seq: 5
                },
                Run {
                    epoch: 4,
                    first_seq: 7
                }
            ]
        );
        assert_eq!(runs_after(&s, 8), Vec::<Run>::new());
        assert_eq!(runs_after(&s, 0), s.runs);
    }

    #[test]
    fn common_prefix_finds_the_divergence_point() {
        let a = log(&[(1, 5), (3, 2)]); // 1..5 @1, 6..7 @3
        let b = log(&[(1, 5), (2, 4)]); // 1..5 @1, 6..9 @2
        assert_eq!(common_prefix(&a, &b), 5);
        assert_eq!(common_prefix(&b, &a), 5);
        let c = log(&[(1, 3)]);
        assert_eq!(common_prefix(&a, &c), 3);
        let d = log(&[(2, 3)]);
        assert_eq!(common_prefix(&c, &d), 0);
        assert_eq!(common_prefix(&a, &a), 7);
        assert_eq!(common_prefix(&LogState::default(), &a), 0);
    }

    #[test]
    fn best_prefers_the_higher_sync_label_over_the_longer_or_newer_log() {
        // b's last entry is of a newer epoch, but only a's copy was brought up to date by the
        // owner of epoch 3: its label wins (b's entry at 6 was never acknowledged).
        let mut a = log(&[(1, 5)]);
        a.synced = 3;
        let mut b = log(&[(1, 5), (2, 1)]);
        b.synced = 1;
        let c = log(&[(1, 9)]);
        let answers = vec![(node("c"), c), (node("b"), b), (node("a"), a)];
        assert_eq!(best(&answers).unwrap().0, node("a"));
        let tie = vec![(node("x"), log(&[(1, 2)])), (node("y"), log(&[(1, 2)]))];
        assert_eq!(best(&tie).unwrap().0, node("x"));
        let longer = vec![(node("x"), log(&[(1, 2)])), (node("y"), log(&[(1, 3)]))];
        assert_eq!(best(&longer).unwrap().0, node("y"));
        assert!(best(&[]).is_none());
    }

    #[test]
    fn a_claim_must_reach_an_intact_node_of_the_latest_placement() {
        let mut a = log(&[(1, 2)]);
        a.placement = Some(placement(4, &["x", "y"]));
        let mut b = log(&[(1, 2)]);
        b.placement = Some(placement(3, &["b", "c"]));
        let none: &[NodeName] = &[];
        assert!(!quorum_holds(
            &[(node("b"), b.clone()), (node("a"), a.clone())],
            none,
            3
        ));
        assert!(quorum_holds(
            &[(node("b"), b.clone()), (node("y"), a.clone())],
            none,
            3
        ));
        assert!(quorum_holds(&[(node("n"), LogState::default())], none, 1));
        assert!(!quorum_holds(&[(node("n"), LogState::default())], none, 3));
        // y lost its disk: it does not count, nor stand for the latest placement.
        let y_lost = [node("y")];
        assert!(!quorum_holds(
            &[(node("b"), b.clone()), (node("y"), a.clone())],
            &y_lost,
            3
        ));
        // Nor one outside the latest placement the others know: it may have been in a later one.
        let b_lost = [node("b")];
        assert!(!quorum_holds(
            &[(node("b"), b.clone()), (node("y"), a.clone())],
            &b_lost,
            3
        ));
        assert!(quorum_holds(
            &[
                (node("b"), b.clone()),
                (node("y"), a.clone()),
                (node("x"), a.clone())
            ],
            &b_lost,
            3
        ));
        // Of four members, two intact answers meet every placement (three of four): two nodes
        // that lost their disks may promise with them.
        let two_lost = [node("b"), node("c")];
        let four = |lost: &[NodeName]| {
            quorum_holds(
                &[
                    (node("b"), b.clone()),
                    (node("c"), b.clone()),
                    (node("x"), a.clone()),
                    (node("y"), a.clone()),
                ],
                lost,
                4,
            )
        };
        assert!(four(&two_lost));
        assert!(!four(&[node("b"), node("c"), node("x")]));
        // Of five, three.
        let answers: Vec<(NodeName, LogState)> = ["b", "c", "x", "y"]
            .iter()
            .map(|n| (node(n), a.clone()))
            .collect();
        assert!(quorum_holds(&answers, &[node("b")], 5));
        assert!(!quorum_holds(&answers, &two_lost, 5));
    }

    #[test]
    fn seqs_and_epochs_near_the_top_are_refused_not_wrapped() {
        let p = placement(LIMIT, &["a"]);
        assert!(promise(&LogState::default(), LIMIT, &p).is_none());
        assert!(promise(&LogState::default(), u64::MAX, &p).is_none());
        let state = promise(&LogState::default(), 2, &placement(2, &["a"])).unwrap();
        for (after_seq, owner_last_seq) in [(u64::MAX, u64::MAX), (LIMIT, LIMIT), (5, 4)] {
            let p = placement(2, &["a"]);
            let append = Append {
                epoch: 2,
                placement: &p,
                after_seq,
                after_epoch: 2,
                entries: &[],
                owner_last_seq,
                owner_runs: &[],
                adopted: 0,
            };
            assert!(
                matches!(super::append(&state, &append), Err(Refusal::Malformed)),
                "{after_seq} {owner_last_seq}"
            );
        }
    }

    #[test]
    fn commit_is_the_minimum_acknowledged() {
        assert_eq!(commit_point(&[5, 3, 9]), 3);
        assert_eq!(commit_point(&[]), 0);
    }

    fn horizon(horizon: u64, compacted: u64) -> Horizon {
        Horizon { horizon, compacted }
    }

    #[test]
    fn a_trim_records_the_higher_horizon_and_keeps_a_copy_that_holds_the_owners_log() {
        let copy = log(&[(1, 10), (2, 10)]);
        let before = |s: u64| truncate(&copy, s - 1).runs;
        let applied = trim(&copy, horizon(4, 4), 2, horizon(12, 8), &before(8)).unwrap();
        assert_eq!(applied.state, copy);
        assert_eq!(applied.horizon, horizon(12, 8));
        assert_eq!(applied.truncate_after, None);
        // An older, lower horizon never lowers what the copy recorded.
        let again = trim(&copy, applied.horizon, 2, horizon(9, 5), &before(5)).unwrap();
        assert_eq!(again.horizon, horizon(12, 8));
    }

    #[test]
    fn a_copy_behind_or_diverged_below_the_deletion_point_takes_the_owners_log_without_entries() {
        let owner = log(&[(1, 10), (3, 20)]);
        let before = |s: u64| truncate(&owner, s - 1).runs;
        // Behind: it holds 5 entries; the owner can send only from 20 on.
        let mut behind = log(&[(1, 5)]);
        behind.promised = 3;
        let applied = trim(&behind, Horizon::default(), 3, horizon(20, 20), &before(20)).unwrap();
        assert_eq!(applied.state.last_seq, 19);
        assert_eq!(epoch_at(&applied.state, 19), Some(3));
        assert_eq!(applied.truncate_after, Some(19));
        // An append after 19 now follows it.
        let batch = slice(&owner, 20, 30);
        let runs = runs_after(&owner, 19);
        let p = placement(3, &["a", "b"]);
        let next = append(
            &applied.state,
            &append_of(&owner, 3, &p, 19, &batch, &runs, 30),
        )
        .unwrap();
        assert_eq!(next.state.last_seq, 30);
        // Diverged: an epoch-2 stretch the owner does not have is dropped.
        let mut diverged = log(&[(1, 10), (2, 15)]);
        diverged.promised = 3;
        let applied = trim(
            &diverged,
            Horizon::default(),
            3,
            horizon(20, 15),
            &before(15),
        )
        .unwrap();
        assert_eq!(applied.state.last_seq, 14);
        assert_eq!(epoch_at(&applied.state, 14), Some(3));
        assert_eq!(applied.truncate_after, Some(14));
    }

    #[test]
    fn a_trim_is_fenced_like_an_append_and_malformed_ones_change_nothing() {
        let copy = log(&[(1, 10), (2, 10)]);
        let runs = copy.runs.clone();
        let none = Horizon::default();
        assert_eq!(
            trim(&copy, none, 1, horizon(5, 5), &runs),
            Err(Refusal::Fenced { promised: 2 })
        );
        assert_eq!(
            trim(&copy, none, 3, horizon(5, 5), &runs),
            Err(Refusal::NotPromised { promised: 2 })
        );
        // Deleting above the horizon, or runs that do not start at 1.
        assert_eq!(
            trim(&copy, none, 2, horizon(5, 6), &runs),
            Err(Refusal::Malformed)
        );
        let bad = [Run {
            epoch: 1,
            first_seq: 3,
        }];
        assert_eq!(
            trim(&copy, none, 2, horizon(5, 5), &bad),
            Err(Refusal::Malformed)
        );
    }
}
