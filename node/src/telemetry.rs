//! Logging: `tracing` to stderr, as text or JSON (`--log-format`), filtered by `RUST_LOG`.

use tracing_subscriber::EnvFilter;

use crate::settings::LogFormat;

/// The filter when `RUST_LOG` is not set: the node at info, the actor runtime quieter.
pub const DEFAULT_FILTER: &str = "info,ractor=warn,ractor_cluster=warn";

/// Installs the global subscriber; a second call is ignored (tests start several nodes).
pub fn init(format: LogFormat) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    // A log that cannot be written (stderr on a full disk) loses lines, never the node: by
    // default the subscriber would report the failure with `eprintln!`, which panics.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .log_internal_errors(false);
    let _ = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init(),
        LogFormat::Text => builder.try_init(),
    };
}
