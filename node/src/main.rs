//! `chat-node`: runs one node of the chat cluster until SIGTERM or SIGINT.

use std::process::ExitCode;

use anyhow::Context as _;
use chat_node::settings::Settings;
use chat_node::{start_node, telemetry};

/// File descriptors kept free for the store, the cluster and HTTP beyond client connections.
const FD_RESERVE: usize = 512;

fn main() -> ExitCode {
    let mut settings = match Settings::load() {
        Ok(settings) => settings,
        Err(e) => {
            report(&format!("{e:#}"));
            return ExitCode::from(2);
        }
    };
    telemetry::init(settings.log_format);
    fit_connections_to_fd_limit(&mut settings);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            report(&format!("cannot start the runtime: {e}"));
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(settings)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "node failed");
            report(&format!("{e:#}"));
            ExitCode::FAILURE
        }
    }
}

async fn run(settings: Settings) -> anyhow::Result<()> {
    let mut node = start_node(settings).await?;
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
        _ = terminate.recv() => tracing::info!("SIGTERM received"),
        () = node.stopped() => anyhow::bail!("the node's actors failed repeatedly"),
    }
    node.shutdown().await;
    Ok(())
}

/// Prints why the node stops; a stderr that cannot be written (a full disk) is not a panic.
fn report(why: &str) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr(), "chat-node: {why}");
}

/// Lowers `max-connections` when the process may not open that many files, so that the node
/// refuses connections cleanly instead of failing to accept them.
fn fit_connections_to_fd_limit(settings: &mut Settings) {
    let Some(limit) = open_files_limit() else {
        return;
    };
    let usable = limit.saturating_sub(FD_RESERVE);
    if settings.max_connections > usable {
        tracing::warn!(
            max_connections = settings.max_connections,
            open_files_limit = limit,
            using = usable,
            "max-connections lowered to fit the open-files limit"
        );
        settings.max_connections = usable.max(1);
    }
}

/// The soft limit on open files, from /proc/self/limits.
fn open_files_limit() -> Option<usize> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}
