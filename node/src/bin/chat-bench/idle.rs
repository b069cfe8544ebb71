//! `chat-bench idle`: many connections that only join a room, to measure a node's memory per
//! connection; with `--pid` the node's RSS is read as they open, and charted with `--svg`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::json;

use crate::chart;
use crate::workload::{Auth, connect, join};

/// Open files this process needs besides its connections (runtime, stdio, /proc reads).
const SPARE_FILES: u64 = 64;

/// Flags of `idle`.
#[derive(clap::Args, Debug)]
pub struct Idle {
    /// HTTP addresses of the nodes.
    #[arg(long, value_delimiter = ',', required = true)]
    nodes: Vec<String>,
    /// Connections to open (by this process: run several with --first to share a count).
    #[arg(long, default_value_t = 1000)]
    connections: usize,
    /// How long to hold them, seconds.
    #[arg(long, default_value_t = 30)]
    secs: u64,
    /// Index of this process's first connection (users `idle<N>`), so processes sharing a
    /// count use distinct users.
    #[arg(long, default_value_t = 0)]
    first: usize,
    /// Source addresses to connect from, in turn (comma separated): a node caps the connections
    /// of one address (`--max-connections-per-address`), so a count above that needs several,
    /// e.g. `--bind $(seq -s, -f 127.0.1.%g 1 20)` towards nodes on loopback.
    #[arg(long, value_delimiter = ',')]
    bind: Vec<std::net::IpAddr>,
    /// PID of a node on this machine whose RSS is read (from /proc/PID/status) as connections open.
    #[arg(long)]
    pid: Option<u32>,
    /// Connections between two RSS readings [default: a twentieth of --connections].
    #[arg(long)]
    step: Option<usize>,
    /// Write an SVG chart of the node's RSS against connections (needs --pid).
    #[arg(long, value_name = "FILE", requires = "pid")]
    svg: Option<PathBuf>,
    /// Print the results (and the RSS readings) as one JSON object on stdout.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    auth: Auth,
}

/// Raises the soft open-file limit to the hard one; fails before any connection is opened if
/// that is still too low for `connections`.
fn ensure_file_limit(connections: usize) -> anyhow::Result<()> {
    let need = connections as u64 + SPARE_FILES;
    let (soft, hard) = rlimit::Resource::NOFILE.get()?;
    if soft >= need {
        return Ok(());
    }
    anyhow::ensure!(
        hard >= need,
        "{connections} connections need about {need} open files, but this process may open at \
         most {hard} (RLIMIT_NOFILE): run several `chat-bench idle` processes, each with a share \
         of the connections and its own --first, or raise the hard limit"
    );
    rlimit::Resource::NOFILE.set(hard, hard)?;
    Ok(())
}

/// The resident set of process `pid`, in KiB (`VmRSS` of /proc/PID/status).
fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no VmRSS in /proc/{pid}/status"))
}

/// Opens the connections, holds them, reports.
pub async fn run(args: Idle) -> anyhow::Result<()> {
    anyhow::ensure!(!args.nodes.is_empty(), "need --nodes");
    ensure_file_limit(args.connections)?;
    let say = |text: String| {
        if args.json {
            eprintln!("{text}");
        } else {
            println!("{text}");
        }
    };
    let step = args.step.unwrap_or(args.connections / 20).max(1);
    let mut readings: Vec<(usize, u64)> = Vec::new();
    if let Some(pid) = args.pid {
        readings.push((0, rss_kib(pid)?));
    }
    let started = Instant::now();
    let mut readers = Vec::with_capacity(args.connections);
    for n in 0..args.connections {
        let i = args.first + n;
        let node = &args.nodes[i % args.nodes.len()];
        let from = (!args.bind.is_empty()).then(|| args.bind[i % args.bind.len()]);
        let mut ws = connect(node, &format!("idle{i}"), &args.auth, from).await?;
        join(&mut ws, &format!("idle-{}", i % 100)).await?;
        // Keep reading so that presence events do not fill the node's queues.
        readers.push(tokio::spawn(async move {
            let (_sink, mut stream) = ws.split();
            while let Some(Ok(_)) = stream.next().await {}
        }));
        let open = n + 1;
        if open % step == 0 || open == args.connections {
            match args.pid {
                Some(pid) => {
                    let rss = rss_kib(pid)?;
                    readings.push((open, rss));
                    eprintln!(
                        "{open} connections, node RSS {:.1} MiB",
                        rss as f64 / 1024.0
                    );
                }
                None => eprintln!("{open} connections"),
            }
        }
    }
    say(format!(
        "{} connections open and joined in {:.1} s; holding for {} s",
        args.connections,
        started.elapsed().as_secs_f64(),
        args.secs
    ));
    tokio::time::sleep(Duration::from_secs(args.secs)).await;
    let mut per_connection_kib = None;
    if let (Some(pid), Some(&(_, before))) = (args.pid, readings.first()) {
        let after = rss_kib(pid)?;
        readings.push((args.connections, after));
        let per = (after as f64 - before as f64) / args.connections.max(1) as f64;
        per_connection_kib = Some(per);
        say(format!(
            "node RSS {:.1} MiB before, {:.1} MiB after holding: {per:.1} KiB per connection",
            before as f64 / 1024.0,
            after as f64 / 1024.0
        ));
    }
    if let Some(path) = &args.svg {
        let chart = chart::Chart {
            title: format!("node RSS, {} idle connections", args.connections),
            x_label: "connections".into(),
            y_label: "RSS (MiB)".into(),
            log_y: false,
            series: vec![chart::Series::new(
                "RSS",
                "#1f77b4",
                readings
                    .iter()
                    .map(|&(n, kib)| (n as f64, kib as f64 / 1024.0))
                    .collect(),
            )],
            threshold: None,
        };
        std::fs::write(path, chart.svg())?;
        say(format!("chart written to {}", path.display()));
    }
    if args.json {
        let out = json!({
            "mode": "idle",
            "nodes": args.nodes,
            "connections": args.connections,
            "first": args.first,
            "secs": args.secs,
            "rss_kib": readings.iter().map(|(n, kib)| json!({"connections": n, "kib": kib})).collect::<Vec<_>>(),
            "per_connection_kib": per_connection_kib,
        });
        println!("{out}");
    }
    for reader in readers {
        reader.abort();
    }
    Ok(())
}
