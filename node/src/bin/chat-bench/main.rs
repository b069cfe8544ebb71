//! `chat-bench`: load generator and measuring tool for a chat node or cluster, with a baseline
//! server to compare against.
//!
//! ```text
//! # rooms with members on every node; 2 senders per room, 2000 msg/s offered in total
//! chat-bench chat --nodes 127.0.0.2:8080,127.0.0.3:8080 --rooms 10 --members 100 --senders 2 \
//!     --rate 2000 --size 64 --warmup 2 --secs 20 [--json] [--token JWT | --secret S]
//! # the highest rate at which ≥ 99% is delivered and p99 send→delivery stays under 100 ms
//! chat-bench sweep --nodes 127.0.0.1:8080 --rooms 10 --members 10 --secs 5 \
//!     --p99-ms 100 --from 1000 --factor 1.25 [--refine 2] [--json] [--svg sweep.svg]
//! # idle connections, with the node's RSS read at steps and charted
//! chat-bench idle --nodes 127.0.0.1:8080 --connections 10000 --secs 30 [--pid PID --svg rss.svg]
//! # a minimal broadcast server speaking the frames chat-bench uses (no storage, no actors)
//! chat-bench baseline --listen 127.0.0.1:18500
//! ```
//!
//! `chat` connects `rooms × members` clients spread round-robin over the nodes (so every room has
//! members on every node); `--senders K` of each room's members send (default: all), at an even
//! share of `--rate`. Every sender keeps a schedule (intended send time = start + k / its rate)
//! and latencies are measured from the *intended* time, so a send that leaves late counts its own
//! delay (no coordinated omission). The text carries the intended time, so every receiving client
//! measures send→delivery on the shared clock of this process; the `ref` carries it for the ack.
//! Messages intended during `--warmup` are not measured. A progress line goes to stderr every
//! second; `--json` prints one JSON object with the results as the last thing on stdout (the
//! human summary then goes to stderr).
//!
//! `sweep` keeps the clients connected and runs steps of increasing offered rate (× `--factor`)
//! until one fails (< 99% of the offered messages delivered to every member, or p99
//! send→delivery ≥ `--p99-ms`), then bisects `--refine` times between the last passing and the
//! first failing rate.
//!
//! `idle` opens many connections that only join a room, to measure a node's memory per
//! connection: with `--pid` it reads the node's RSS (`/proc/PID/status`) as it goes. One process
//! holds at most what its open-file limit allows; run several with `--first` to share a count.

mod baseline;
mod chart;
mod idle;
mod report;
mod sweep;
mod workload;

use clap::{Parser, Subcommand};

/// Command line of chat-bench.
#[derive(Parser, Debug)]
#[command(
    name = "chat-bench",
    version,
    about = "Load generator for the chat cluster"
)]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand, Debug)]
enum Mode {
    /// Rooms with members on every node, K senders per room, at one offered rate.
    Chat {
        #[command(flatten)]
        workload: workload::Workload,
        /// Messages per second offered in total.
        #[arg(long, default_value_t = 1000.0)]
        rate: f64,
        /// Print the results as one JSON object on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Steps of increasing rate: the highest rate that is delivered in time.
    Sweep {
        #[command(flatten)]
        workload: workload::Workload,
        #[command(flatten)]
        sweep: sweep::Sweep,
        /// Print the steps as one JSON object on stdout.
        #[arg(long)]
        json: bool,
        /// Write an SVG chart of p50 / p99 send→delivery against the offered rate.
        #[arg(long, value_name = "FILE")]
        svg: Option<std::path::PathBuf>,
    },
    /// Many idle connections, each joined to a room.
    Idle(idle::Idle),
    /// A minimal in-memory broadcast server speaking the frames chat-bench uses.
    Baseline {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:18500")]
        listen: String,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        match cli.mode {
            Mode::Chat {
                workload,
                rate,
                json,
            } => workload::chat(workload, rate, json).await,
            Mode::Sweep {
                workload,
                sweep,
                json,
                svg,
            } => sweep::run(workload, sweep, json, svg).await,
            Mode::Idle(args) => idle::run(args).await,
            Mode::Baseline { listen } => baseline::serve(&listen).await,
        }
    })
}
