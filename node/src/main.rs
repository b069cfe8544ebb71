//! `chat-node`: runs one node of the chat cluster until SIGTERM or SIGINT.

use std::process::ExitCode;

use anyhow::Context as _;
use chat_node::settings::Settings;
use chat_node::{start_node, telemetry};

fn main() -> ExitCode {
    let settings = match Settings::load() {
        Ok(settings) => settings,
        Err(e) => {
            report(&format!("{e:#}"));
            return ExitCode::from(2);
        }
    };
    telemetry::init(settings.log_format);
    chat_node::fds::raise_limit();
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
