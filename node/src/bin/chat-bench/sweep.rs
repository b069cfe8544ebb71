//! `chat-bench sweep`: steps of increasing offered rate on one set of connected clients, then a
//! bisection; the highest rate that is delivered (≥ 99%) with p99 send→delivery under a bound.

use std::path::PathBuf;

use serde_json::json;

use crate::chart;
use crate::report::Step;
use crate::workload::{Fleet, Workload, open, say};

/// How a sweep steps and what passes.
#[derive(clap::Args, Debug, Clone)]
pub struct Sweep {
    /// Bound on p99 send→delivery for a step to pass, milliseconds.
    #[arg(long, default_value_t = 100.0)]
    pub p99_ms: f64,
    /// Rate of the first step, messages per second.
    #[arg(long, default_value_t = 1000.0)]
    pub from: f64,
    /// Each step's rate over the previous one's.
    #[arg(long, default_value_t = 1.25)]
    pub factor: f64,
    /// Most steps of increasing rate.
    #[arg(long, default_value_t = 20)]
    pub max_steps: usize,
    /// Bisection steps between the last passing and the first failing rate.
    #[arg(long, default_value_t = 2)]
    pub refine: usize,
}

/// Fraction of the expected deliveries a passing sweep step must reach.
const MIN_DELIVERED: f64 = 0.99;

/// Whether a sweep step passes: nearly everything delivered, p99 under the bound.
fn passes(step: &Step, p99_ms: f64) -> bool {
    step.delivered_fraction() >= MIN_DELIVERED && step.delivery.p99 < p99_ms
}

/// `sweep`: steps of increasing rate, then a bisection, keeping the clients connected.
pub async fn run(
    workload: Workload,
    sweep: Sweep,
    json: bool,
    svg: Option<PathBuf>,
) -> anyhow::Result<()> {
    anyhow::ensure!(sweep.factor > 1.0, "need --factor > 1");
    anyhow::ensure!(sweep.from > 0.0, "need --from > 0");
    let mut fleet = open(workload, json).await?;
    let mut steps: Vec<(Step, bool)> = Vec::new();
    let (mut good, mut bad) = (None::<f64>, None::<f64>);
    let mut rate = sweep.from;
    for _ in 0..sweep.max_steps {
        let ok = run_step(&mut fleet, rate, &sweep, json, &mut steps).await?;
        if !ok {
            bad = Some(rate);
            break;
        }
        good = Some(rate);
        rate *= sweep.factor;
    }
    if let (Some(mut lo), Some(mut hi)) = (good, bad) {
        for _ in 0..sweep.refine {
            let mid = (lo * hi).sqrt();
            if run_step(&mut fleet, mid, &sweep, json, &mut steps).await? {
                lo = mid;
                good = Some(mid);
            } else {
                hi = mid;
            }
        }
    }
    steps.sort_by(|a, b| a.0.rate.total_cmp(&b.0.rate));
    say(json, &table(&steps));
    say(
        json,
        &match good {
            Some(rate) => format!(
                "highest rate passing (≥ {:.0}% delivered, p99 send→delivery < {} ms): {rate:.0} msg/s",
                MIN_DELIVERED * 100.0,
                sweep.p99_ms
            ),
            None => format!("no step passed; the first ({:.0} msg/s) failed", sweep.from),
        },
    );
    if let Some(path) = svg {
        let points = |f: fn(&Step) -> f64| steps.iter().map(|(s, _)| (s.rate, f(s))).collect();
        let chart = chart::Chart {
            title: format!(
                "send → delivery, {} rooms × {} members, {} senders per room",
                fleet.workload.rooms,
                fleet.workload.members,
                fleet.workload.senders()
            ),
            x_label: "offered rate (msg/s)".into(),
            y_label: "latency (ms)".into(),
            log_y: true,
            series: vec![
                chart::Series::new("p50", "#1f77b4", points(|s| s.delivery.p50)),
                chart::Series::new("p99", "#d62728", points(|s| s.delivery.p99)),
            ],
            threshold: Some((sweep.p99_ms, format!("bound {} ms", sweep.p99_ms))),
        };
        std::fs::write(&path, chart.svg())?;
        say(json, &format!("chart written to {}", path.display()));
    }
    if json {
        let out = json!({
            "mode": "sweep",
            "workload": fleet.workload.json(),
            "p99_ms": sweep.p99_ms,
            "min_delivered_fraction": MIN_DELIVERED,
            "highest_passing_rate": good,
            "steps": steps.iter().map(|(s, ok)| {
                let mut v = s.json();
                v["passed"] = (*ok).into();
                v
            }).collect::<Vec<_>>(),
        });
        println!("{out}");
    }
    Ok(())
}

async fn run_step(
    fleet: &mut Fleet,
    rate: f64,
    sweep: &Sweep,
    json: bool,
    steps: &mut Vec<(Step, bool)>,
) -> anyhow::Result<bool> {
    let reconnected = fleet.connect_missing().await?;
    if reconnected > 0 {
        say(json, &format!("reconnected {reconnected} clients"));
    }
    say(json, &format!("step: {rate:.0} msg/s"));
    let step = fleet.run(rate).await?;
    let ok = passes(&step, sweep.p99_ms);
    say(json, &step.text());
    steps.push((step, ok));
    Ok(ok)
}

fn table(steps: &[(Step, bool)]) -> String {
    let mut out = String::from(
        "offered/s   acked/s  deliveries/s  delivered  ack p99 ms  delivery p50 ms  p99 ms  pass\n",
    );
    for (s, ok) in steps {
        out += &format!(
            "{:>9.0} {:>9.0} {:>13.0} {:>9.2}% {:>11.2} {:>16.2} {:>7.2}  {}\n",
            s.rate,
            s.acked as f64 / s.secs,
            s.deliveries as f64 / s.secs,
            100.0 * s.delivered_fraction(),
            s.ack.p99,
            s.delivery.p50,
            s.delivery.p99,
            if *ok { "yes" } else { "no" }
        );
    }
    out
}
