//! What one idle ractor actor costs: spawns `N` (default 100,000) actors with no state, each
//! linked to one supervisor as rooms are, and prints the resident memory before and after.
//!
//! ```sh
//! cargo run --release -p chat-node --example actor_cost -- 100000
//! ```

use ractor::{Actor, ActorProcessingErr, ActorRef};

struct Idle;

impl Actor for Idle {
    type Msg = ();
    type State = ();
    type Arguments = ();

    async fn pre_start(&self, _myself: ActorRef<()>, _args: ()) -> Result<(), ActorProcessingErr> {
        Ok(())
    }
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let count: usize = std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(100_000);
    let (supervisor, _) = Actor::spawn(None, Idle, ()).await?;
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let before = rss_kib();
    let mut actors = Vec::with_capacity(count);
    for _ in 0..count {
        let (actor, _) = Actor::spawn_linked(None, Idle, (), supervisor.get_cell()).await?;
        actors.push(actor);
    }
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let after = rss_kib();
    println!(
        "actors={count} rss_before={before}KiB rss_after={after}KiB per_actor={}B",
        after.saturating_sub(before) * 1024 / count.max(1) as u64
    );
    Ok(())
}
