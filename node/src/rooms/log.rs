//! Pure rules of the replicated room log, free of I/O and tested as a state machine.
//!
//! Every node may hold a copy of a room's log, described by a [`LogState`]: the highest epoch
//! it promised, its last sequence number, and the epochs of its entries as runs.
//!
//! - A claimer asks every live node to [`promise`] a new epoch. A node promises each epoch at
//!   most once and only if it is higher than any it promised before; from then on it refuses
//!   writes of older epochs. That is the fence: an owner that lost the room (frozen, cut off)
//!   can no longer get a write stored by a node that promised the new epoch.
//! - With every promise in hand, the claimer adopts the [`best`] log (highest last epoch, then
//!   highest seq), which holds every acknowledged entry: an entry is acknowledged only once every
//!   node of its epoch's placement stored it, and the claim asks every live node, so at least one
//!   of them answers while at most one node is lost.
//! - The owner then writes with [`append`]: entries follow `after_seq`, and whatever the node
//!   held after `after_seq` (an unacknowledged suffix of an older epoch) is dropped first.
//!
//! Entries keep the epoch they were first written under, so two logs that hold an entry with the
//! same seq and epoch agree on everything before it (the log matching property), which is what
//! [`common_prefix`] relies on.

use chat_protocol::NodeName;
use chat_protocol::peer::{Entry, Epoch, LogState, Placement, Run};

/// Why a node refused a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The write's epoch is older than the promised one: the writer lost the room.
    Fenced {
        /// The node's promised epoch.
        promised: Epoch,
    },
    /// The entries do not follow the node's log: resend from `last_seq`.
    Gap {
        /// The node's last sequence number.
        last_seq: u64,
    },
}

/// Grants a promise of `epoch` if it is higher than every epoch promised before.
pub fn promise(state: &LogState, epoch: Epoch, placement: &Placement) -> Option<LogState> {
    if epoch <= state.promised {
        return None;
    }
    let mut next = state.clone();
    next.promised = epoch;
    next.placement = Some(placement.clone());
    Some(next)
}

/// Applies an append of `entries` after `after_seq` by the owner of `epoch`: the new state, and
/// whether stored entries after `after_seq` must be dropped first.
pub fn append(
    state: &LogState,
    epoch: Epoch,
    placement: &Placement,
    after_seq: u64,
    entries: &[Entry],
) -> Result<(LogState, bool), Refusal> {
    if epoch < state.promised {
        return Err(Refusal::Fenced {
            promised: state.promised,
        });
    }
    if after_seq > state.last_seq {
        return Err(Refusal::Gap {
            last_seq: state.last_seq,
        });
    }
    let contiguous = entries
        .iter()
        .enumerate()
        .all(|(i, e)| e.seq == after_seq + 1 + i as u64 && e.epoch <= epoch);
    if !contiguous {
        // A malformed append from a peer: refuse without changing anything.
        return Err(Refusal::Gap {
            last_seq: state.last_seq,
        });
    }
    let truncates = after_seq < state.last_seq;
    let mut runs: Vec<Run> = state
        .runs
        .iter()
        .copied()
        .filter(|run| run.first_seq <= after_seq)
        .collect();
    for entry in entries {
        if runs.last().map(|run| run.epoch) != Some(entry.epoch) {
            runs.push(Run {
                epoch: entry.epoch,
                first_seq: entry.seq,
            });
        }
    }
    let next = LogState {
        promised: epoch,
        last_seq: after_seq + entries.len() as u64,
        runs,
        placement: Some(placement.clone()),
    };
    Ok((next, truncates))
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

/// The epoch of the last entry (0 for an empty log).
pub fn last_epoch(state: &LogState) -> Epoch {
    epoch_at(state, state.last_seq).unwrap_or(0)
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

/// The most up-to-date log among the answers: highest last epoch, then highest seq; ties go to
/// the first answer in `answers`' order (callers put their own answer first to avoid a copy).
pub fn best(answers: &[(NodeName, LogState)]) -> Option<&(NodeName, LogState)> {
    answers.iter().reduce(|best, candidate| {
        let key = |s: &LogState| (last_epoch(s), s.last_seq);
        if key(&candidate.1) > key(&best.1) {
            candidate
        } else {
            best
        }
    })
}

/// Whether a claim may proceed with these answers: at least one node of the latest placement
/// any answerer knows must be among the answerers (it holds that epoch's acknowledged entries).
pub fn covers_latest_placement(answers: &[(NodeName, LogState)]) -> bool {
    let latest = answers
        .iter()
        .filter_map(|(_, state)| state.placement.as_ref())
        .max_by_key(|placement| placement.epoch);
    match latest {
        None => true,
        Some(placement) => placement
            .nodes
            .iter()
            .any(|node| answers.iter().any(|(answerer, _)| answerer == node)),
    }
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

    /// Builds a log by appending `(epoch, count)` stretches.
    fn log(stretches: &[(Epoch, u64)]) -> LogState {
        let mut state = LogState::default();
        for &(epoch, count) in stretches {
            let p = placement(epoch, &["a"]);
            let from = state.last_seq + 1;
            let new = entries(from, from + count - 1, epoch);
            state = append(&state, epoch, &p, state.last_seq, &new).unwrap().0;
        }
        state
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
    fn fenced_owner_cannot_append() {
        let s = promise(&log(&[(1, 3)]), 2, &placement(2, &["b"])).unwrap();
        let before = s.clone();
        let refused = append(&s, 1, &placement(1, &["a"]), 3, &entries(4, 4, 1));
        assert_eq!(refused, Err(Refusal::Fenced { promised: 2 }));
        assert_eq!(s, before, "a refused write leaves the state unchanged");
    }

    #[test]
    fn appends_must_follow_the_log() {
        let s = log(&[(1, 3)]);
        assert_eq!(
            append(&s, 1, &placement(1, &["a"]), 5, &entries(6, 6, 1)),
            Err(Refusal::Gap { last_seq: 3 })
        );
        // Entries that do not start right after `after_seq` are refused too.
        assert_eq!(
            append(&s, 1, &placement(1, &["a"]), 3, &entries(5, 5, 1)),
            Err(Refusal::Gap { last_seq: 3 })
        );
        // An entry claiming a newer epoch than its writer is malformed.
        assert!(append(&s, 1, &placement(1, &["a"]), 3, &entries(4, 4, 2)).is_err());
    }

    #[test]
    fn append_truncates_a_divergent_suffix_and_tracks_runs() {
        let s = log(&[(1, 5)]);
        let (next, truncates) = append(&s, 2, &placement(2, &["b"]), 3, &entries(4, 6, 2)).unwrap();
        assert!(truncates);
        assert_eq!(next.last_seq, 6);
        assert_eq!(next.promised, 2);
        assert_eq!(
            next.runs,
            vec![
                Run {
                    epoch: 1,
                    first_seq: 1
                },
                Run {
                    epoch: 2,
                    first_seq: 4
                }
            ]
        );
        assert_eq!(epoch_at(&next, 3), Some(1));
        assert_eq!(epoch_at(&next, 4), Some(2));
        assert_eq!(epoch_at(&next, 7), None);
        // A retransmission of what is already stored is harmless.
        let (again, _) = append(&next, 2, &placement(2, &["b"]), 3, &entries(4, 6, 2)).unwrap();
        assert_eq!(again, next);
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
    fn best_prefers_the_newer_epoch_over_the_longer_log() {
        let answers = vec![
            (node("a"), log(&[(1, 9)])),
            (node("b"), log(&[(1, 5), (2, 1)])),
            (node("c"), log(&[(1, 5)])),
        ];
        assert_eq!(best(&answers).unwrap().0, node("b"));
        let tie = vec![(node("x"), log(&[(1, 2)])), (node("y"), log(&[(1, 2)]))];
        assert_eq!(best(&tie).unwrap().0, node("x"));
        assert!(best(&[]).is_none());
    }

    #[test]
    fn a_claim_must_reach_the_latest_placement() {
        let mut a = log(&[(1, 2)]);
        a.placement = Some(placement(4, &["x", "y"]));
        let mut b = log(&[(1, 2)]);
        b.placement = Some(placement(3, &["b", "c"]));
        assert!(!covers_latest_placement(&[
            (node("b"), b.clone()),
            (node("a"), a.clone())
        ]));
        assert!(covers_latest_placement(&[(node("b"), b), (node("y"), a)]));
        assert!(covers_latest_placement(&[(node("n"), LogState::default())]));
    }

    #[test]
    fn commit_is_the_minimum_acknowledged() {
        assert_eq!(commit_point(&[5, 3, 9]), 3);
        assert_eq!(commit_point(&[]), 0);
    }
}
