//! An exhaustive model check of the room protocol's claim, sync and commit rules on small
//! configurations: every interleaving, every replication message lost or delivered in any order,
//! every owner crash, every disk loss, up to a bound, explored depth first. Where the simulation
//! samples runs of the whole node, this enumerates all runs of the rules themselves: the copies
//! are handled by the real [`log::promise`] and [`log::append`], claims are judged by the real
//! [`log::quorum_holds`] and adopt with the real [`log::best`], and owners follow `RoomCore`'s
//! rules (sync the placement under the new epoch, commit only what every node of the placement
//! stored under it). A keeper that lost its disk says so in its promise (`recovering`), as the
//! node's `Memory::Lost` does.
//!
//! Three nodes, placements of two (a majority). Up to `MODEL_CLAIMS` claims (default 2) by any
//! node, of the next epoch it knows of or of the next epoch anyone knows of, with the promises of
//! any majority it chooses (views may disagree); up to `MODEL_SENDS` sends (default 1); up to
//! `MODEL_WIPES` disk losses (default 1). Appends and their answers may be lost; an owner that
//! stops acting has crashed. Invariants, after every step:
//! - an epoch is claimed by one node only (fencing rests on it);
//! - two owners never commit different entries at the same seq (an acknowledged message is
//!   never replaced, a seq never reused);
//! - an owner that starts serving or commits holds every entry committed under an earlier epoch
//!   (no acknowledged message is lost). (An owner superseded while its answers were in flight
//!   may still start serving an older log; it can commit nothing: its appends are fenced.)
//!
//! The rules this replaced, and two plausible shortcuts, are checked too: each must be refuted
//! with the path to its violation printed.
//!
//! ```sh
//! cargo test --release -p chat-node --test model -- --nocapture
//! MODEL_CLAIMS=3 MODEL_STATES=200000000 cargo test --release -p chat-node --test model -- --nocapture
//! ```

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, HashSet};
use std::hash::{Hash, Hasher};
use std::time::Instant;

use chat_node::rooms::log;
use chat_protocol::peer::{Entry, Epoch, LogState, Placement, Run};
use chat_protocol::{NodeName, UserName};

const NODES: usize = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rules {
    /// Today's.
    Current,
    /// Adopted entries count as committed at once.
    CommitAdopted,
    /// The rules before the fix: adopt the copy whose last entry is newest, commit it at once.
    Old,
    /// A node that lost its disk answers claims like any other.
    TrustLostDisk,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Outcome {
    Stored(u64),
    Fenced(Epoch),
    NotPromised,
    Diverged(LogState),
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Msg {
    Promise {
        to: usize,
        from: usize,
        epoch: Epoch,
        partner: usize,
    },
    Promised {
        to: usize,
        from: usize,
        epoch: Epoch,
        granted: bool,
        state: LogState,
        recovering: bool,
    },
    Append {
        to: usize,
        from: usize,
        epoch: Epoch,
        partner: usize,
        after_seq: u64,
        after_epoch: Epoch,
        entries: Vec<(u64, Epoch)>,
        owner_last: u64,
        owner_runs: Vec<Run>,
        adopted: u64,
    },
    Appended {
        to: usize,
        from: usize,
        epoch: Epoch,
        outcome: Outcome,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Phase {
    Claiming {
        quorum: Vec<usize>,
        answers: Vec<(usize, LogState)>,
        recovering: Vec<usize>,
    },
    Syncing,
    Active,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Owner {
    epoch: Epoch,
    partner: usize,
    phase: Phase,
    log: LogState,
    adopted: u64,
    /// Highest seq each placement node stored under this epoch (owner, partner).
    acked: [Option<u64>; 2],
    commit: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct State {
    copies: [LogState; NODES],
    /// Whether each node lost its disk (its store is new).
    lost: [bool; NODES],
    owners: [Option<Owner>; NODES],
    highest: [Epoch; NODES],
    msgs: Vec<Msg>,
    /// Every entry ever committed: seq → (the entry's epoch, the epoch of the owner that first
    /// committed it). An entry is identified by its seq and epoch.
    committed: BTreeMap<u64, (Epoch, Epoch)>,
    /// The node whose claim of each epoch succeeded: promises make epochs unique.
    claimed: BTreeMap<Epoch, usize>,
    sends: u8,
    claims: u8,
    wipes: u8,
    violation: Option<String>,
}

#[derive(Debug, Clone)]
enum Action {
    Claim {
        node: usize,
        epoch: Epoch,
        quorum: Vec<usize>,
        partner: usize,
    },
    Deliver(usize),
    Drop(usize),
    Send(usize),
    /// The node crashes and comes back with an empty disk.
    Wipe(usize),
}

struct Model {
    rules: Rules,
    /// Claims, by all nodes together.
    claims: u8,
    sends: u8,
    /// Disk losses, of any node.
    wipes: u8,
    /// Only the smallest choices at a claim (two promisers, the newest epoch, promises answered
    /// at once): a smaller space, in which a flaw shows sooner. Its runs are runs of the whole
    /// model, so what it finds, the whole model has too.
    narrow: bool,
}

fn name(i: usize) -> NodeName {
    NodeName::new(&format!("n{i}")).unwrap()
}

fn placement(epoch: Epoch, owner: usize, partner: usize) -> Placement {
    Placement {
        epoch,
        nodes: vec![name(owner), name(partner)],
    }
}

fn entry(seq: u64, epoch: Epoch) -> Entry {
    Entry {
        seq,
        epoch,
        from: UserName::new("u").unwrap(),
        text: String::new(),
        ts: 0,
        client_id: None,
    }
}

/// The entries of `log` from `from` to its end, as (seq, epoch).
fn entries_of(log: &LogState, from: u64) -> Vec<(u64, Epoch)> {
    (from..=log.last_seq)
        .map(|seq| (seq, log::epoch_at(log, seq).unwrap()))
        .collect()
}

fn hash_of<T: Hash>(value: &T) -> u64 {
    let mut hasher = DefaultHasher::new();
    value.hash(&mut hasher);
    hasher.finish()
}

impl State {
    fn send(&mut self, msg: Msg) {
        self.msgs.push(msg);
    }

    /// Messages are a multiset: a canonical order keeps equal states equal.
    fn canonical(mut self) -> State {
        self.msgs.sort_by_cached_key(hash_of);
        self
    }

    fn append_to(&mut self, owner_node: usize, to: usize, after_seq: u64) {
        let owner = self.owners[owner_node].as_ref().unwrap();
        let msg = Msg::Append {
            to,
            from: owner_node,
            epoch: owner.epoch,
            partner: owner.partner,
            after_seq,
            after_epoch: log::epoch_at(&owner.log, after_seq).unwrap_or(0),
            entries: entries_of(&owner.log, after_seq + 1),
            owner_last: owner.log.last_seq,
            owner_runs: log::runs_after(&owner.log, after_seq),
            adopted: owner.adopted,
        };
        self.send(msg);
    }

    /// `node`'s owner starts serving: its log is, from now on, what the room holds. It must hold
    /// every entry committed under an earlier epoch (no acknowledged message lost). (Entries
    /// committed under later epochs it may lack: it was superseded while its answers were on
    /// their way, and its appends are fenced.)
    fn activate(&mut self, node: usize) {
        let Some(owner) = self.owners[node].as_mut() else {
            return;
        };
        owner.phase = Phase::Active;
        let (log, epoch) = (owner.log.clone(), owner.epoch);
        self.check_holds(node, &log, epoch, "starts serving");
    }

    fn check_holds(&mut self, node: usize, log: &LogState, epoch: Epoch, doing: &str) {
        for (&seq, &(at, by)) in &self.committed {
            if by < epoch && log::epoch_at(log, seq) != Some(at) {
                self.violation = Some(format!(
                    "n{node} {doing} at epoch {epoch} without entry {seq} of epoch {at}, \
                     committed at epoch {by}"
                ));
                return;
            }
        }
    }

    /// Records what `owner_node` commits up to `point`, checking it against every commit so far.
    fn commit(&mut self, owner_node: usize, point: u64) {
        let owner = self.owners[owner_node].as_mut().unwrap();
        if point <= owner.commit {
            return;
        }
        owner.commit = point;
        let (log, epoch) = (owner.log.clone(), owner.epoch);
        self.check_holds(owner_node, &log, epoch, "commits");
        for seq in 1..=point {
            let at = log::epoch_at(&log, seq).unwrap();
            match self.committed.get(&seq) {
                Some(&(before, _)) if before != at => {
                    self.violation = Some(format!(
                        "n{owner_node} at epoch {epoch} committed seq {seq} of epoch {at}, \
                         but an entry of epoch {before} was committed there before"
                    ));
                }
                Some(_) => {}
                None => {
                    self.committed.insert(seq, (at, epoch));
                }
            }
        }
    }
}

impl Model {
    fn actions(&self, state: &State) -> Vec<Action> {
        let mut actions = Vec::new();
        if state.violation.is_some() {
            return actions;
        }
        // A disk is lost while no claim is under way (the limit docs/failover.md states: a node
        // that lost its disk forgot the promises it made, and a claim it answered before may
        // still complete).
        let settled = !state
            .msgs
            .iter()
            .any(|m| matches!(m, Msg::Promise { .. } | Msg::Promised { .. }))
            && state
                .owners
                .iter()
                .flatten()
                .all(|o| !matches!(o.phase, Phase::Claiming { .. }));
        for node in 0..NODES {
            if state.claims < self.claims {
                // The next epoch it knows of, or (as if it had heard of every claim) the next of
                // all: an epoch only has to be new to the promisers. Any majority this node sees
                // up, any partner among them.
                let known = state.highest[node] + 1;
                let newest = state.highest.iter().max().unwrap() + 1;
                let epochs = if known == newest || self.narrow {
                    vec![newest]
                } else {
                    vec![known, newest]
                };
                for epoch in epochs {
                    for mask in 1u8..(1 << NODES) {
                        let promisers = mask.count_ones();
                        if mask & (1 << node) == 0
                            || promisers < 2
                            || (self.narrow && promisers > 2)
                        {
                            continue;
                        }
                        let quorum: Vec<usize> =
                            (0..NODES).filter(|i| mask & (1 << i) != 0).collect();
                        for &partner in quorum.iter().filter(|&&p| p != node) {
                            actions.push(Action::Claim {
                                node,
                                epoch,
                                quorum: quorum.clone(),
                                partner,
                            });
                        }
                    }
                }
            }
            if state.wipes < self.wipes && !state.lost[node] && settled {
                actions.push(Action::Wipe(node));
            }
            if state.sends < self.sends
                && state.owners[node]
                    .as_ref()
                    .is_some_and(|o| o.phase == Phase::Active)
            {
                actions.push(Action::Send(node));
            }
        }
        for (i, msg) in state.msgs.iter().enumerate() {
            actions.push(Action::Deliver(i));
            // Replication traffic can be lost (a session breaks); a lost promise or answer only
            // stalls a claim, which another claim covers.
            if matches!(msg, Msg::Append { .. } | Msg::Appended { .. }) {
                actions.push(Action::Drop(i));
            }
        }
        actions
    }

    fn next(&self, state: &State, action: Action) -> State {
        let mut s = state.clone();
        match action {
            Action::Claim {
                node,
                epoch,
                quorum,
                partner,
            } => {
                s.highest[node] = epoch;
                s.claims += 1;
                for &to in &quorum {
                    s.send(Msg::Promise {
                        to,
                        from: node,
                        epoch,
                        partner,
                    });
                }
                s.owners[node] = Some(Owner {
                    epoch,
                    partner,
                    phase: Phase::Claiming {
                        quorum,
                        answers: Vec::new(),
                        recovering: Vec::new(),
                    },
                    log: LogState::default(),
                    adopted: 0,
                    acked: [None, None],
                    commit: 0,
                });
                if self.narrow {
                    // The promises and their answers at once, before anything else happens.
                    while let Some(i) = s.msgs.iter().position(|m| match *m {
                        Msg::Promise { from, epoch: e, .. } => from == node && e == epoch,
                        Msg::Promised { to, epoch: e, .. } => to == node && e == epoch,
                        _ => false,
                    }) {
                        let msg = s.msgs.remove(i);
                        self.deliver(&mut s, msg);
                    }
                }
            }
            Action::Drop(i) => {
                s.msgs.remove(i);
            }
            Action::Wipe(node) => {
                // Messages already on their way may still arrive at the new life.
                s.wipes += 1;
                s.lost[node] = true;
                s.copies[node] = LogState::default();
                s.owners[node] = None;
                s.highest[node] = 0;
            }
            Action::Send(node) => {
                s.sends += 1;
                let owner = s.owners[node].as_mut().unwrap();
                let seq = owner.log.last_seq + 1;
                log::extend(&mut owner.log, &[entry(seq, owner.epoch)]);
                let partner = owner.partner;
                s.append_to(node, node, seq - 1);
                s.append_to(node, partner, seq - 1);
            }
            Action::Deliver(i) => {
                let msg = s.msgs.remove(i);
                self.deliver(&mut s, msg);
            }
        }
        s.canonical()
    }

    fn deliver(&self, s: &mut State, msg: Msg) {
        match msg {
            Msg::Promise {
                to,
                from,
                epoch,
                partner,
            } => {
                // As the keeper answers: what it held, and the placement it knew, before.
                let copy = s.copies[to].clone();
                let (granted, state) =
                    match log::promise(&copy, epoch, &placement(epoch, from, partner)) {
                        Some(next) => {
                            s.copies[to] = next.clone();
                            let answer = LogState {
                                placement: copy.placement.clone(),
                                ..next
                            };
                            (true, answer)
                        }
                        None => (false, copy),
                    };
                let recovering = s.lost[to] && state.synced == 0;
                s.send(Msg::Promised {
                    to: from,
                    from: to,
                    epoch,
                    granted,
                    state,
                    recovering,
                });
            }
            Msg::Append {
                to,
                from,
                epoch,
                partner,
                after_seq,
                after_epoch,
                entries,
                owner_last,
                owner_runs,
                adopted,
            } => {
                let p = placement(epoch, from, partner);
                let batch: Vec<Entry> = entries.iter().map(|&(seq, e)| entry(seq, e)).collect();
                let append = log::Append {
                    epoch,
                    placement: &p,
                    after_seq,
                    after_epoch,
                    entries: &batch,
                    owner_last_seq: owner_last,
                    owner_runs: &owner_runs,
                    adopted,
                };
                let outcome = match log::append(&s.copies[to], &append) {
                    Ok(applied) => {
                        s.copies[to] = applied.state;
                        Outcome::Stored(s.copies[to].last_seq)
                    }
                    Err(log::Refusal::Fenced { promised }) => Outcome::Fenced(promised),
                    Err(log::Refusal::NotPromised { .. }) => Outcome::NotPromised,
                    Err(log::Refusal::Diverged | log::Refusal::Malformed) => {
                        Outcome::Diverged(s.copies[to].clone())
                    }
                };
                s.send(Msg::Appended {
                    to: from,
                    from: to,
                    epoch,
                    outcome,
                });
            }
            Msg::Promised {
                to,
                from,
                epoch,
                granted,
                state,
                recovering: lost,
            } => {
                s.highest[to] = s.highest[to].max(state.promised);
                let Some(owner) = s.owners[to].as_mut() else {
                    return;
                };
                if owner.epoch != epoch {
                    return;
                }
                let Phase::Claiming {
                    quorum,
                    answers,
                    recovering,
                } = &mut owner.phase
                else {
                    return;
                };
                if !granted {
                    s.owners[to] = None;
                    return;
                }
                if answers.iter().any(|(n, _)| *n == from) {
                    return;
                }
                if lost {
                    recovering.push(from);
                }
                // The claimer's own answer first: `log::best` favours the first of equals.
                if from == to {
                    answers.insert(0, (from, state));
                } else {
                    answers.push((from, state));
                }
                if answers.len() == quorum.len() {
                    let answers = std::mem::take(answers);
                    let recovering = std::mem::take(recovering);
                    self.finish_claim(s, to, answers, &recovering);
                }
            }
            Msg::Appended {
                to,
                from,
                epoch,
                outcome,
            } => {
                let Some(owner) = s.owners[to].as_mut() else {
                    return;
                };
                if let Outcome::Fenced(promised) = outcome {
                    s.highest[to] = s.highest[to].max(promised);
                    if promised > owner.epoch {
                        s.owners[to] = None;
                    }
                    return;
                }
                if owner.epoch != epoch || matches!(owner.phase, Phase::Claiming { .. }) {
                    return;
                }
                let slot = if from == to { 0 } else { 1 };
                match outcome {
                    Outcome::Stored(last) => {
                        let last = last.min(owner.log.last_seq);
                        owner.acked[slot] = Some(owner.acked[slot].unwrap_or(0).max(last));
                        let matched = match owner.acked {
                            [Some(a), Some(b)] => Some(a.min(b)),
                            _ => None,
                        };
                        match (&owner.phase, matched) {
                            (Phase::Syncing, Some(m)) if m >= owner.adopted => {
                                s.activate(to);
                                s.commit(to, m);
                            }
                            (Phase::Active, Some(m)) if m >= owner.adopted => s.commit(to, m),
                            _ => {}
                        }
                    }
                    Outcome::NotPromised => s.owners[to] = None,
                    Outcome::Diverged(copy) => {
                        let point = log::common_prefix(&copy, &owner.log);
                        s.append_to(to, from, point);
                    }
                    Outcome::Fenced(_) => {}
                }
            }
        }
    }

    /// Every member of the quorum promised: adopt the best copy, then sync the placement (or,
    /// under the broken rules, count it committed at once).
    fn finish_claim(
        &self,
        s: &mut State,
        node: usize,
        answers: Vec<(usize, LogState)>,
        recovering: &[usize],
    ) {
        let named: Vec<(NodeName, LogState)> = answers
            .iter()
            .map(|(n, st)| (name(*n), st.clone()))
            .collect();
        let recovering: Vec<NodeName> = match self.rules {
            Rules::TrustLostDisk => Vec::new(),
            _ => recovering.iter().map(|n| name(*n)).collect(),
        };
        if !log::quorum_holds(&named, &recovering, NODES) {
            s.owners[node] = None;
            return;
        }
        let epoch = s.owners[node].as_ref().unwrap().epoch;
        if let Some(&other) = s.claimed.get(&epoch) {
            s.violation = Some(format!("n{node} and n{other} both claimed epoch {epoch}"));
            return;
        }
        s.claimed.insert(epoch, node);
        let best = match self.rules {
            Rules::Old => named.iter().reduce(|best, candidate| {
                let key =
                    |st: &LogState| (log::epoch_at(st, st.last_seq).unwrap_or(0), st.last_seq);
                if key(&candidate.1) > key(&best.1) {
                    candidate
                } else {
                    best
                }
            }),
            _ => log::best(&named),
        };
        let best = best.unwrap().1.clone();
        let owner = s.owners[node].as_mut().unwrap();
        owner.log = best.clone();
        owner.log.promised = owner.epoch;
        owner.adopted = best.last_seq;
        let partner = owner.partner;
        let base = |n: usize| {
            answers
                .iter()
                .find(|(a, _)| *a == n)
                .map_or(0, |(_, st)| log::common_prefix(st, &best))
        };
        let (own_base, partner_base) = (base(node), base(partner));
        if matches!(self.rules, Rules::Current | Rules::TrustLostDisk) {
            owner.phase = Phase::Syncing;
        } else {
            s.activate(node);
            let adopted = s.owners[node].as_ref().unwrap().adopted;
            s.commit(node, adopted);
        }
        s.append_to(node, node, own_base);
        s.append_to(node, partner, partner_base);
    }
}

/// One step of a path, as a reader wants it.
fn describe(state: &State, action: &Action) -> String {
    let (verb, i) = match *action {
        Action::Claim {
            node,
            epoch,
            ref quorum,
            partner,
        } => {
            return format!(
                "n{node} claims epoch {epoch} from {quorum:?}, placement [n{node}, n{partner}]"
            );
        }
        Action::Send(node) => return format!("n{node} takes a send"),
        Action::Wipe(node) => return format!("n{node} loses its disk"),
        Action::Deliver(i) => ("delivered", i),
        Action::Drop(i) => ("lost", i),
    };
    let what = match &state.msgs[i] {
        Msg::Promise {
            to, from, epoch, ..
        } => format!("n{from} asks n{to} to promise {epoch}"),
        Msg::Promised {
            to,
            from,
            epoch,
            granted,
            ..
        } => format!("n{from} answers n{to}'s claim of {epoch}, granted: {granted}"),
        Msg::Append {
            to,
            from,
            epoch,
            after_seq,
            entries,
            ..
        } => {
            format!("n{from} at epoch {epoch} appends to n{to} after seq {after_seq}: {entries:?}")
        }
        Msg::Appended {
            to,
            from,
            epoch,
            outcome,
        } => format!("n{from} answers n{to}'s append at epoch {epoch}: {outcome:?}"),
    };
    format!("{verb}: {what}")
}

/// What a check found: the states explored, and the first violation with the actions that led
/// to it.
struct Report {
    states: usize,
    complete: bool,
    violation: Option<(String, Vec<String>)>,
}

/// Explores every state reachable within the bounds, depth first (memory: the states seen, as
/// hashes, and the current path), up to `limit` states.
fn check(model: &Model, limit: usize) -> Report {
    let init = State {
        copies: Default::default(),
        lost: [false; NODES],
        owners: Default::default(),
        highest: [0; NODES],
        msgs: Vec::new(),
        committed: BTreeMap::new(),
        claimed: BTreeMap::new(),
        sends: 0,
        claims: 0,
        wipes: 0,
        violation: None,
    };
    let mut seen: HashSet<u64> = HashSet::new();
    seen.insert(hash_of(&init));
    // The path being explored: each state with the actions left to try from it.
    let mut stack: Vec<(State, Vec<Action>, String)> = Vec::new();
    let actions = model.actions(&init);
    stack.push((init, actions, String::new()));
    while let Some((state, actions, _)) = stack.last_mut() {
        let Some(action) = actions.pop() else {
            stack.pop();
            continue;
        };
        let described = describe(state, &action);
        let next = model.next(state, action);
        if !seen.insert(hash_of(&next)) {
            continue;
        }
        if let Some(violation) = &next.violation {
            let mut path: Vec<String> = stack.iter().skip(1).map(|(_, _, a)| a.clone()).collect();
            path.push(described);
            return Report {
                states: seen.len(),
                complete: false,
                violation: Some((violation.clone(), path)),
            };
        }
        if seen.len() >= limit {
            return Report {
                states: seen.len(),
                complete: false,
                violation: None,
            };
        }
        let actions = model.actions(&next);
        stack.push((next, actions, described));
    }
    Report {
        states: seen.len(),
        complete: true,
        violation: None,
    }
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The bounds of a check: claims, sends, disk losses, and the most states to explore.
fn bounds() -> (u8, u8, u8, usize) {
    (
        env_or("MODEL_CLAIMS", 2) as u8,
        env_or("MODEL_SENDS", 1) as u8,
        env_or("MODEL_WIPES", 1) as u8,
        env_or("MODEL_STATES", 30_000_000) as usize,
    )
}

/// Runs a check and prints what it did.
fn run(model: &Model, limit: usize) -> Report {
    let started = Instant::now();
    let report = check(model, limit);
    let Model {
        rules,
        claims,
        sends,
        wipes,
        narrow,
    } = model;
    println!(
        "model, {rules:?} rules, 3 nodes, placements of 2, {claims} claims, {sends} sends, \
         {wipes} disk losses{}: {} states in {:.1}s, {}",
        if *narrow { ", narrow claims" } else { "" },
        report.states,
        started.elapsed().as_secs_f64(),
        match (&report.violation, report.complete) {
            (Some(_), _) => "violation found",
            (None, true) => "every reachable state explored",
            (None, false) => "stopped at the state limit",
        }
    );
    report
}

/// The violation a check of broken rules must find, printed with the steps to it.
fn refuted(rules: Rules, report: Report) {
    let (violation, path) = report
        .violation
        .unwrap_or_else(|| panic!("{rules:?}: no violation in {} states", report.states));
    println!("  {violation}, after:\n    {}", path.join("\n    "));
}

#[test]
fn every_run_of_the_claim_sync_and_commit_rules_keeps_what_was_committed() {
    let (claims, sends, wipes, limit) = bounds();
    let model = Model {
        rules: Rules::Current,
        claims,
        sends,
        wipes,
        narrow: false,
    };
    let report = run(&model, limit);
    if let Some((violation, path)) = report.violation {
        panic!("{violation}, after:\n  {}", path.join("\n  "));
    }
    assert!(report.complete, "raise MODEL_STATES to explore every state");
}

#[test]
fn the_old_rules_and_committing_adopted_entries_at_once_are_refuted() {
    let (_, _, _, limit) = bounds();
    for rules in [Rules::Old, Rules::CommitAdopted] {
        let model = Model {
            rules,
            claims: 3,
            sends: 1,
            wipes: 0,
            narrow: true,
        };
        refuted(rules, run(&model, limit));
    }
}

#[test]
fn counting_a_node_that_lost_its_disk_is_refuted() {
    let (_, _, _, limit) = bounds();
    let model = Model {
        rules: Rules::TrustLostDisk,
        claims: 2,
        sends: 1,
        wipes: 1,
        narrow: true,
    };
    refuted(model.rules, run(&model, limit));
}
