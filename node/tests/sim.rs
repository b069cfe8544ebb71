//! The deterministic simulation of a whole cluster: 3 to 5 nodes running the node's real cores
//! (rooms, log keepers, hubs, membership) in one process over a simulated network, clock and
//! disk, with clients chatting and faults landing where a seed puts them. The checker
//! (`sim/checker.rs`) asserts every guarantee of docs/failover.md after every event it applies
//! to; a failing seed is reported with the one-line command that replays it.
//!
//! ```sh
//! cargo test --release -p chat-node --test sim -- --nocapture              # the CI budget
//! SIM_SEEDS=1000000 cargo test --release -p chat-node --test sim seeds -- --nocapture
//! SIM_SEED=1234 SIM_TRACE=1 cargo test --release -p chat-node --test sim seeds -- --nocapture
//! ```
//!
//! `SIM_SEEDS` is how many seeds run (default 2000), from `SIM_FIRST` (default 0); `SIM_SEED`
//! runs that one seed only, and `SIM_TRACE=1` prints every event of it.
//! Room `r0` of half the seeds has a small retention (3–32 messages): the checker then accepts
//! messages gone below the horizon, and requires every acknowledged one at or above it.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "sim/checker.rs"]
mod checker;
#[path = "sim/client.rs"]
mod client;
#[path = "sim/rng.rs"]
mod rng;
#[path = "sim/world.rs"]
mod world;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use chat_node::rooms::core::Flaw;
use chat_protocol::RoomId;

use crate::client::Time;
use crate::world::{Settings, World};

const SEC: Time = 1_000_000;
/// How long the cluster has, once every fault is healed, to serve every client again.
const RECOVERY: Time = 60 * SEC;

/// What one seed found.
struct Outcome {
    violations: Vec<String>,
    summary: String,
    events: u64,
}

/// Runs one seed: chat under faults for the seed's duration, heal, then require that every
/// client gets all it sent acknowledged and every message delivered, and that a full read of
/// every room holds every acknowledged message.
fn run(settings: Settings) -> Outcome {
    let seed = settings.seed;
    let duration = settings.duration;
    let mut world = World::new(settings);
    let rooms = world.rooms.clone();
    for i in 0..world.settings.clients {
        // Every client is in one or two rooms; every room has clients.
        let mut mine = vec![rooms[i % rooms.len()].clone()];
        if i % 2 == 1 && rooms.len() > 1 {
            mine.push(rooms[(i + 1) % rooms.len()].clone());
        }
        world.add_client(mine, true);
    }
    world.run_until(4 * SEC, World::formed);
    if world.settings.faults {
        world.start_faults(SEC);
    }
    world.run_until(duration, |_| false);
    world.heal();
    for client in &mut world.clients {
        client.chatty = false;
    }
    let deadline = world.now + RECOVERY;
    let settled = world.run_until(deadline, |w| {
        w.converged()
            && w.clients.iter().all(|c| c.settled())
            && w.rooms.iter().all(|room| {
                let last = w.checker.last_acked(room);
                w.clients
                    .iter()
                    .filter(|c| c.rooms.contains(room))
                    .all(|c| c.position(room).is_some_and(|p| p >= last))
            })
    });
    if !settled && world.checker.violations.is_empty() {
        let stuck: Vec<String> = world
            .clients
            .iter()
            .filter(|c| !c.settled())
            .map(|c| {
                format!(
                    "u{} conn {:?} outbox {} rooms {:?}",
                    c.index,
                    c.conn.as_ref().map(|c| c.node),
                    c.outbox.len(),
                    c.rooms
                        .iter()
                        .map(|r| (r.to_string(), c.position(r)))
                        .collect::<Vec<_>>()
                )
            })
            .collect();
        let behind: Vec<String> = world
            .rooms
            .iter()
            .flat_map(|room| {
                let last = world.checker.last_acked(room);
                world
                    .clients
                    .iter()
                    .filter(|c| c.rooms.contains(room) && c.position(room).is_none_or(|p| p < last))
                    .map(|c| {
                        format!(
                            "u{} on {:?} at {:?} of {room} (last acked {last})",
                            c.index,
                            c.conn.as_ref().map(|c| c.node + 1),
                            c.position(room)
                        )
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        let message = format!(
            "not available {}s after healing: unconverged {:?}, clients stuck {stuck:?}, behind {behind:?}; {}",
            RECOVERY / SEC,
            world.unconverged(),
            world.describe()
        );
        world.checker.violate(message);
    }
    if world.checker.violations.is_empty() {
        // A full read of every room, through a fresh connection to some node.
        let reader = world.add_client(Vec::new(), false);
        world.clients[reader].reads.extend(rooms.iter().cloned());
        let deadline = world.now + 20 * SEC;
        let read = world.run_until(deadline, |w| w.clients[reader].reads_done == rooms.len());
        if !read {
            world
                .checker
                .violate("the final read of every room did not complete".into());
        }
    }
    let acked: usize = world.checker.acked.values().map(|m| m.len()).sum();
    let stats = world.clients.iter().fold((0, 0, 0), |(u, r, s), c| {
        (
            u + c.stats.unavailable,
            r + c.stats.reconnects,
            s + c.stats.stale_joins,
        )
    });
    Outcome {
        violations: world.checker.violations.clone(),
        summary: format!(
            "seed {seed}: {} nodes (+{} spare), rf {}, {} rooms, {} clients, {:.0}s: {acked} acked, \
             {} unavailable, {} reconnects, {} stale joins; retention {:?}; faults {:?}",
            world.settings.nodes,
            world.settings.spares,
            world.settings.replication_factor,
            world.settings.rooms,
            world.settings.clients,
            duration as f64 / SEC as f64,
            stats.0,
            stats.1,
            stats.2,
            world.settings.retention,
            world.faults
        ),
        events: world.events,
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

fn replay_command(seed: u64) -> String {
    format!(
        "SIM_SEED={seed} SIM_TRACE=1 cargo test --release -p chat-node --test sim seeds -- --nocapture"
    )
}

/// Runs `count` seeds from `first` on every core; the failing ones, with their violations.
fn run_seeds(
    first: u64,
    count: u64,
    flaw: Option<Flaw>,
    stop_at_first: bool,
) -> (Vec<(u64, Vec<String>)>, u64, u64) {
    let next = AtomicU64::new(first);
    let failures = std::sync::Mutex::new(Vec::new());
    let done = AtomicU64::new(0);
    let events = AtomicU64::new(0);
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                loop {
                    let seed = next.fetch_add(1, Ordering::Relaxed);
                    if seed >= first + count {
                        return;
                    }
                    if stop_at_first && !failures.lock().unwrap().is_empty() {
                        return;
                    }
                    let mut settings = Settings::for_seed(seed);
                    settings.flaw = flaw;
                    let outcome = run(settings);
                    done.fetch_add(1, Ordering::Relaxed);
                    events.fetch_add(outcome.events, Ordering::Relaxed);
                    if !outcome.violations.is_empty() {
                        failures.lock().unwrap().push((seed, outcome.violations));
                    }
                }
            });
        }
    });
    let mut failures = failures.into_inner().unwrap();
    failures.sort();
    (failures, done.into_inner(), events.into_inner())
}

#[test]
fn seeds() {
    if let Some(seed) = env_u64("SIM_SEED") {
        let mut settings = Settings::for_seed(seed);
        settings.trace = std::env::var("SIM_TRACE").is_ok_and(|v| v == "1");
        let outcome = run(settings);
        println!("{}", outcome.summary);
        assert!(
            outcome.violations.is_empty(),
            "seed {seed} breaks a guarantee:\n  {}",
            outcome.violations.join("\n  ")
        );
        return;
    }
    let first = env_u64("SIM_FIRST").unwrap_or(0);
    let count = env_u64("SIM_SEEDS").unwrap_or(2000);
    let started = Instant::now();
    let (failures, done, events) = run_seeds(first, count, None, false);
    let elapsed = started.elapsed();
    println!(
        "sim: {done} seeds ({first}..{}) in {:.1}s, {events} events ({:.0} events/s), {} failed",
        first + count,
        elapsed.as_secs_f64(),
        events as f64 / elapsed.as_secs_f64(),
        failures.len()
    );
    if let Some((seed, violations)) = failures.first() {
        panic!(
            "{} of {done} seeds break a guarantee; the first, seed {seed}:\n  {}\nreplay: {}\nall failing seeds: {:?}",
            failures.len(),
            violations.join("\n  "),
            replay_command(*seed),
            failures.iter().map(|(s, _)| *s).collect::<Vec<_>>()
        );
    }
}

/// The rule broken on purpose (committing adopted entries at once) is caught within the CI
/// budget: the checker can fail, and does on this bug.
#[test]
fn a_broken_commit_rule_is_caught() {
    let count = env_u64("SIM_FLAW_SEEDS").unwrap_or(2000);
    let flaw = match std::env::var("SIM_FLAW").as_deref() {
        Ok("old") => Flaw::OldRules,
        _ => Flaw::CommitAdopted,
    };
    let started = Instant::now();
    let (failures, done, _) =
        run_seeds(0, count, Some(flaw), std::env::var("SIM_FLAW_ALL").is_err());
    println!(
        "sim: with adopted entries committed at once, {} of {done} seeds caught it in {:.1}s{}",
        failures.len(),
        started.elapsed().as_secs_f64(),
        failures
            .first()
            .map(|(seed, v)| format!(" (seed {seed}: {})", v[0]))
            .unwrap_or_default()
    );
    assert!(
        !failures.is_empty(),
        "{done} seeds ran with adopted entries committed at once and the checker saw nothing"
    );
}

/// The double-fault fork of the issue, replayed step by step:
/// 1. the owner A stores seq N, its replica B does not, A is SIGKILLed (no ack); B claims and
///    the room stays idle;
/// 2. A restarts and claims the room back; the client retries N's id;
/// 3. A is killed again before B stores N; B claims, and the next send gets a seq.
///
/// Returns the checker's violations.
fn double_fault_fork(flaw: Option<Flaw>) -> Vec<String> {
    let settings = Settings {
        seed: 7,
        nodes: 3,
        spares: 0,
        replication_factor: 2,
        rooms: 0,
        clients: 0,
        duration: 0,
        faults: false,
        flaw,
        trace: std::env::var("SIM_TRACE").is_ok_and(|v| v == "1"),
        retention: None,
    };
    let mut world = World::new(settings);
    assert!(
        world.run_until(10 * SEC, World::formed),
        "{}",
        world.describe()
    );
    // The room: owner n1 with replica n2 in the full view, owner n2 without n1.
    let full = view_with(&["n1", "n2", "n3"]);
    let without_n1 = view_with(&["n2", "n3"]);
    let room = (0..10_000)
        .map(|i| RoomId::new(&format!("fork-{i}")).unwrap())
        .find(|room| {
            let placement = full.room_placement(room, 2);
            placement.len() == 2
                && placement[0].as_str() == "n1"
                && placement[1].as_str() == "n2"
                && without_n1.owner(room).map(|n| n.as_str()) == Some("n2")
        })
        .expect("a room placed on n1 then n2");
    // The client is connected to n3 throughout.
    let client = world.add_client(vec![room.clone()], false);
    world.clients[client].home = Some(2);
    let at = |w: &World, t: Time| w.now + t;
    // The client (on some node) joins and gets m1 acknowledged.
    world.clients[client].say(&room, "a", "m1");
    let until = at(&world, 10 * SEC);
    assert!(
        world.run_until(until, |w| w.checker.last_acked(&room) == 1),
        "m1 not acked: {}",
        world.describe()
    );

    // Step 1: n1 stores m2 (id x) but its appends to n2 are lost; n1 is killed before any ack.
    let r = room.clone();
    world.filter = Some(Box::new(move |from, to, message| {
        from == 0 && to == 1 && is_append(message, &r)
    }));
    world.clients[client].say(&room, "x", "m2");
    let until = at(&world, 5 * SEC);
    assert!(
        world.run_until(until, |w| w.disk_last_seq(0, &room) == 2),
        "n1 never stored m2: {}",
        world.describe()
    );
    world.clients[client].pause(true);
    world.fault(world::Fault::Crash {
        node: 0,
        lose_disk: false,
    });
    world.filter = None;
    let until = at(&world, 10 * SEC);
    assert!(
        world.run_until(until, |w| w.active_owner(&room) == Some(1)),
        "n2 never took the room: {}",
        world.describe()
    );

    // Step 2: n1 comes back and claims the room back; its appends to n2 are lost again, and the
    // client retries x.
    let r = room.clone();
    world.filter = Some(Box::new(move |from, to, message| {
        from == 0 && to == 1 && is_append(message, &r)
    }));
    world.fault(world::Fault::Restart(0));
    let until = at(&world, 15 * SEC);
    world.run_until(until, |w| w.active_owner(&room) == Some(0));
    world.clients[client].pause(false);
    let until = at(&world, 3 * SEC);
    world.run_until(until, |_| false);

    // Step 3: n1 is killed again before n2 stored m2; n2 claims; the client sends m3.
    world.clients[client].pause(true);
    world.fault(world::Fault::Crash {
        node: 0,
        lose_disk: false,
    });
    world.filter = None;
    let until = at(&world, 10 * SEC);
    world.run_until(until, |w| w.active_owner(&room) == Some(1));
    world.clients[client].pause(false);
    world.clients[client].say(&room, "y", "m3");
    let until = at(&world, 20 * SEC);
    world.run_until(until, |w| w.clients[client].settled());
    // Everything back, and a full read.
    world.heal();
    let until = at(&world, 30 * SEC);
    world.run_until(until, |w| w.converged() && w.clients[client].settled());
    let reader = world.add_client(Vec::new(), false);
    world.clients[reader].reads.push_back(room.clone());
    let until = at(&world, 10 * SEC);
    world.run_until(until, |w| w.clients[reader].reads_done == 1);
    if !world.clients[client].settled() {
        world.checker.violate(format!(
            "the client never got everything acked: {}",
            world.describe()
        ));
    }
    world.checker.violations.clone()
}

/// A view of n1..n3 in which `up` are up.
fn view_with(up: &[&str]) -> chat_node::cluster::view::View {
    use chat_node::cluster::view::{Member, Status, View};
    use chat_protocol::NodeName;
    let members = ["n1", "n2", "n3"]
        .iter()
        .map(|name| Member {
            name: NodeName::new(name).unwrap(),
            addr: format!("{name}:7000"),
            status: if up.contains(name) {
                Status::Up
            } else {
                Status::Down
            },
            public_url: None,
            session: 1,
        })
        .collect();
    View::new(NodeName::new("n3").unwrap(), members, true, 1)
}

fn is_append(message: &chat_protocol::peer::PeerMessage, room: &RoomId) -> bool {
    matches!(
        message,
        chat_protocol::peer::PeerMessage::Keeper(chat_protocol::peer::ToKeeper::Append { room: r, .. })
            if r == room
    )
}

#[test]
fn the_double_fault_fork_is_fixed() {
    let violations = double_fault_fork(None);
    assert!(
        violations.is_empty(),
        "the fork scenario breaks a guarantee:\n  {}",
        violations.join("\n  ")
    );
}

#[test]
fn the_double_fault_fork_happens_under_the_old_rules() {
    // The same steps with the rules before the fix (adopt the longest copy of the newest last
    // entry, commit it at once): an acknowledged message is lost and its seq reused.
    let violations = double_fault_fork(Some(Flaw::OldRules));
    println!("old rules: {violations:?}");
    assert!(
        violations
            .iter()
            .any(|v| v.contains("seq reused") || v.contains("acked message lost")),
        "the old rules did not fork: {violations:?}"
    );
}
