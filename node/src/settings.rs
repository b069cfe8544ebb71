//! Layered settings of a node: defaults < config file < `CHAT_*` environment < flags.
//!
//! Every setting has one name, the flag name (`max-frame-bytes`), used three ways:
//!
//! - as a flag: `--max-frame-bytes 65536`;
//! - as an environment variable `CHAT_<NAME>`, upper case with `-` as `_`:
//!   `CHAT_MAX_FRAME_BYTES=65536` (an empty variable counts as unset);
//! - as a key in the TOML file given with `--config FILE` (or `CHAT_CONFIG=FILE`):
//!   `max-frame-bytes = 65536`, or `max_frame_bytes = 65536`.
//!
//! A flag beats a variable, a variable beats the file, the file beats the default
//! (PROTOCOL.md §6). The `config` crate does the layering: [`defaults`] are its defaults, the
//! file and the environment are its sources, and only the flags actually given on the command
//! line become overrides, so a flag's absence never masks a variable or the file.
//!
//! One key is read from the file only: `[retention-rooms]`, a table of per-room retention
//! overrides ([`FILE_ONLY_KEYS`]), which has no flag or variable form.
//!
//! A key in the file that is not a setting is an error naming the key, so a typo cannot be
//! silently ignored; `CHAT_*` variables that are not settings are ignored. After layering,
//! [`Settings::validate`] checks ranges and the rules between settings; each
//! [`SettingsError`] names the offending key. `deploy/config/default.toml` documents every key
//! with its default, and a test keeps it in step with this file.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;
use std::net::IpAddr;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use chat_protocol::{NodeName, RoomId};
use clap::Parser as _;
use config::{
    Case, Config, ConfigBuilder, ConfigError, Environment, FileFormat, Map, Source, Value,
};
use serde::Deserialize;

use crate::rooms::retention::{Retention, RetentionPolicy};

/// Default values of the settings that have a fixed default.
///
/// `name` defaults to the host name and `data-dir` to `./data/<name>`; the settings without a
/// constant here are unset by default.
pub mod defaults {
    /// `listen`: the HTTP and WebSocket address.
    pub const LISTEN: &str = "127.0.0.1:8080";
    /// Parent of the default `data-dir`, which is `./data/<name>`.
    pub const DATA_ROOT: &str = "./data";
    /// The node name used when there is no usable host name.
    pub const FALLBACK_NAME: &str = "node";
    /// `max-frame-bytes`: the largest WebSocket frame or message accepted.
    pub const MAX_FRAME_BYTES: usize = 65_536;
    /// `max-text-bytes`: the largest `text` in `send` / `direct`.
    pub const MAX_TEXT_BYTES: usize = 4_096;
    /// `rate-limit`: `send` + `direct` per second per connection.
    pub const RATE_LIMIT: u32 = 100;
    /// `replication-factor`: copies of each room's log, owner included.
    pub const REPLICATION_FACTOR: usize = 2;
    /// `max-connections`: client connections served at once; 0: the open-files limit minus a reserve.
    pub const MAX_CONNECTIONS: usize = 0;
    /// `client-queue`: outbound frames queued per connection.
    pub const CLIENT_QUEUE: usize = 1_024;
    /// `client-queue-bytes`: outbound bytes queued per connection before a slow client is cut off (close 1013).
    pub const CLIENT_QUEUE_BYTES: usize = 4_194_304;
    /// `max-rooms-per-connection`: rooms one connection may have joined at once.
    pub const MAX_ROOMS_PER_CONNECTION: usize = 256;
    /// `request-rate`: `join` + `leave` + `history` + `who` per second per connection, bursts up to twice that.
    pub const REQUEST_RATE: u32 = 20;
    /// `direct-rate`: `direct` messages per second one user receives from all senders together, bursts up to twice that.
    pub const DIRECT_RATE: u32 = 50;
    /// `max-connections-per-user`: connections one user may hold on this node at once.
    pub const MAX_CONNECTIONS_PER_USER: usize = 32;
    /// `max-connections-per-address`: WebSocket connections from one remote IP address at once.
    pub const MAX_CONNECTIONS_PER_ADDRESS: usize = 1_000;
    /// `replay-cap`: the most messages a `join` with `since` replays.
    pub const REPLAY_CAP: usize = 1_000;
    /// `request-timeout-ms`: how long a request to another actor or node may take.
    pub const REQUEST_TIMEOUT_MS: u64 = 5_000;
    /// `idle-timeout-ms`: a client that answers none of the node's pings for this long is
    /// closed.
    pub const IDLE_TIMEOUT_MS: u64 = 60_000;
    /// `heartbeat-interval-ms`: how often members tell each other they are alive.
    pub const HEARTBEAT_INTERVAL_MS: u64 = 200;
    /// `failure-timeout-ms`: silence after which a member is declared down.
    pub const FAILURE_TIMEOUT_MS: u64 = 3_000;
    /// `room-idle-ms`: idle time after which a room stops.
    pub const ROOM_IDLE_MS: u64 = 60_000;
    /// `bootstrap-expect`: members seen together before rooms accept writes in cluster mode.
    pub const BOOTSTRAP_EXPECT: usize = 1;
    /// `shutdown-grace-ms`: how long graceful shutdown waits.
    pub const SHUTDOWN_GRACE_MS: u64 = 5_000;
    /// `retention-messages`: the newest messages kept per room; 0 keeps every message.
    pub const RETENTION_MESSAGES: u64 = 0;
    /// `retention-age-secs`: messages older than this are dropped; 0 keeps them however old.
    pub const RETENTION_AGE_SECS: u64 = 0;
}

/// Every setting's key, as a flag name and a config-file key.
const KEYS: &[&str] = &[
    "name",
    "listen",
    "cluster-listen",
    "seeds",
    "cookie",
    "cookie-file",
    "data-dir",
    "auth-secret",
    "auth-secret-file",
    "max-frame-bytes",
    "max-text-bytes",
    "rate-limit",
    "replication-factor",
    "advertise",
    "public-url",
    "cluster-tls-cert",
    "cluster-tls-key",
    "cluster-tls-ca",
    "max-connections",
    "client-queue",
    "client-queue-bytes",
    "max-rooms-per-connection",
    "request-rate",
    "direct-rate",
    "max-connections-per-user",
    "max-connections-per-address",
    "replay-cap",
    "request-timeout-ms",
    "idle-timeout-ms",
    "heartbeat-interval-ms",
    "failure-timeout-ms",
    "room-idle-ms",
    "bootstrap-expect",
    "log-format",
    "shutdown-grace-ms",
    "retention-messages",
    "retention-age-secs",
];

/// Settings read from the config file only: their values are tables, which neither a flag nor a
/// `CHAT_*` variable can carry.
pub const FILE_ONLY_KEYS: &[&str] = &["retention-rooms"];

/// The variable that would name [`FILE_ONLY_KEYS`]' `retention-rooms`: refused, not ignored.
const RETENTION_ROOMS_VAR: &str = "CHAT_RETENTION_ROOMS";

/// Prefix of the environment variables that carry settings.
const ENV_PREFIX: &str = "CHAT_";
/// The environment variable naming the config file; `--config` beats it.
const CONFIG_VAR: &str = "CHAT_CONFIG";
/// The shortest cookie accepted, in bytes: a short one could be guessed from a captured
/// challenge.
const MIN_COOKIE_BYTES: usize = 16;
/// The longest `retention-age-secs`: a hundred years, far from overflowing milliseconds.
const MAX_RETENTION_AGE_SECS: u64 = 100 * 365 * 24 * 3600;
/// What `Debug` prints instead of a secret.
const REDACTED: &str = "***";
/// `failure-timeout-ms` must exceed this many heartbeat intervals, so that a few lost or late
/// heartbeats never declare a live member down.
const FAILURE_TIMEOUT_HEARTBEATS: u64 = 5;

/// The node's settings, layered and validated.
///
/// `Debug` prints `Some("***")` for the cookie and the auth secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Settings {
    /// `name`: the node name, unique in the cluster. Default: the host name.
    pub name: NodeName,
    /// `listen`: HTTP and WebSocket address, `host:port`; a host name is resolved when binding.
    pub listen: String,
    /// `cluster-listen`: node-to-node address, `host:port`. `None` runs a single node.
    pub cluster_listen: Option<String>,
    /// `seeds`: node-to-node addresses (`host:port`, host names allowed) to join the cluster
    /// through. Default: none.
    pub seeds: Vec<String>,
    /// `cookie`: the shared cluster secret; set whenever `cluster_listen` is.
    pub cookie: Option<String>,
    /// `data-dir`: where the node keeps its data. Default: `./data/<name>`.
    pub data_dir: PathBuf,
    /// `auth-secret`: HS256 secret of client JWTs. `None` trusts the `user` parameter.
    pub auth_secret: Option<String>,
    /// `max-frame-bytes`: the largest WebSocket frame or message accepted, else close 1009.
    pub max_frame_bytes: usize,
    /// `max-text-bytes`: the largest `text` in `send` / `direct`, else `too_large`.
    pub max_text_bytes: usize,
    /// `rate-limit`: `send` + `direct` per second per connection, bursts up to twice that;
    /// 0 turns the limit off.
    pub rate_limit: u32,
    /// `replication-factor`: copies of each room's log, owner included, capped by live members.
    pub replication_factor: usize,
    /// `advertise`: the `host:port` other nodes use to reach this node's cluster port.
    /// `None` derives it from `cluster_listen`; see [`Settings::advertised_cluster_addr`].
    pub advertise: Option<String>,
    /// `public-url`: the URL browsers use to reach this node, listed in `/cluster` for client
    /// failover. Default: unset.
    pub public_url: Option<String>,
    /// `cluster-tls-cert`: this node's certificate chain (PEM) for node-to-node TLS. With
    /// `cluster-tls-key` and `cluster-tls-ca` (all three or none), every node-to-node TCP session
    /// is mutual TLS and the heartbeat key is bound to the CA. Default: unset (no TLS).
    pub cluster_tls_cert: Option<PathBuf>,
    /// `cluster-tls-key`: the private key (PEM) of `cluster-tls-cert`.
    pub cluster_tls_key: Option<PathBuf>,
    /// `cluster-tls-ca`: the CA certificate (PEM) peers' certificates must chain to.
    pub cluster_tls_ca: Option<PathBuf>,
    /// `max-connections`: client connections served at once; more are refused. 0: the process's
    /// open-files limit minus a reserve ([`crate::fds`]); a value above that is lowered to it.
    pub max_connections: usize,
    /// `client-queue`: outbound frames queued per connection before a slow client is cut off
    /// (close 1013).
    pub client_queue: usize,
    /// `client-queue-bytes`: outbound bytes queued per connection before a slow client is cut off (close 1013).
    pub client_queue_bytes: usize,
    /// `max-rooms-per-connection`: rooms one connection may have joined at once; more get `too_many_rooms`.
    pub max_rooms_per_connection: usize,
    /// `request-rate`: `join` + `leave` + `history` + `who` per second per connection, bursts up to twice that; 0 turns the limit off.
    pub request_rate: u32,
    /// `direct-rate`: `direct` messages per second one user receives from all senders together, bursts up to twice that; 0 turns the limit off.
    pub direct_rate: u32,
    /// `max-connections-per-user`: connections one user may hold on this node at once; more are refused (HTTP 429).
    pub max_connections_per_user: usize,
    /// `max-connections-per-address`: WebSocket connections from one remote IP address at once; more are refused (HTTP 429).
    pub max_connections_per_address: usize,
    /// `replay-cap`: the most messages a `join` with `since` replays.
    pub replay_cap: usize,
    /// `request-timeout-ms`: how long a request to another actor or node may take.
    pub request_timeout_ms: u64,
    /// `idle-timeout-ms`: the node pings every client; one silent (no frame, no pong) this long
    /// is closed (1001).
    pub idle_timeout_ms: u64,
    /// `heartbeat-interval-ms`: how often members tell each other they are alive.
    pub heartbeat_interval_ms: u64,
    /// `failure-timeout-ms`: a member silent this long is declared down.
    pub failure_timeout_ms: u64,
    /// `room-idle-ms`: a room with no members and no traffic for this long stops; its log stays
    /// on disk.
    pub room_idle_ms: u64,
    /// `bootstrap-expect`: in cluster mode, rooms accept writes only once this many members have
    /// been seen together, so a cluster formed from two halves never accepts writes in both.
    pub bootstrap_expect: usize,
    /// `log-format`: how logs are written.
    pub log_format: LogFormat,
    /// `shutdown-grace-ms`: how long graceful shutdown waits for clients and storage.
    pub shutdown_grace_ms: u64,
    /// `retention-messages`: keep at most the newest this many messages of each room; older
    /// ones are dropped from every copy and `history` says where the room's log now starts.
    /// 0 keeps every message.
    pub retention_messages: u64,
    /// `retention-age-secs`: drop messages older than this many seconds (checked as rooms
    /// commit messages); 0 keeps them however old.
    pub retention_age_secs: u64,
    /// `[retention-rooms]` (config file only): per-room overrides of the two above.
    pub retention_rooms: BTreeMap<RoomId, RoomRetention>,
}

/// One room's entry in `[retention-rooms]`: a bound not given is the node-wide one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RoomRetention {
    /// `messages`: keep at most the newest this many of the room's messages (0: all).
    pub messages: Option<u64>,
    /// `age-secs`: drop the room's messages older than this many seconds (0: however old).
    #[serde(alias = "age_secs")]
    pub age_secs: Option<u64>,
}

/// How the node writes its logs (`log-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for containers.
    Json,
}

impl LogFormat {
    /// The setting's value as written in flags, variables and files.
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

/// Why the settings are not usable; every variant names the offending key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SettingsError {
    /// A number is below the smallest value the setting allows.
    #[error("invalid value for `{key}`: must be at least {min} (got {value})")]
    TooSmall {
        /// The setting.
        key: &'static str,
        /// The smallest allowed value.
        min: u64,
        /// The value given.
        value: u64,
    },
    /// A number is above the largest value the setting allows.
    #[error("invalid value for `{key}`: must be at most {max} (got {value})")]
    TooLarge {
        /// The setting.
        key: &'static str,
        /// The largest allowed value.
        max: u64,
        /// The value given.
        value: u64,
    },
    /// A number is above the value of another setting that bounds it.
    #[error("invalid value for `{key}`: must be at most `{other}` ({limit})")]
    ExceedsOther {
        /// The setting.
        key: &'static str,
        /// The setting that bounds it.
        other: &'static str,
        /// The value of `other`.
        limit: u64,
    },
    /// A setting is missing that another setting needs.
    #[error("`{key}` is required when `{because}` is set")]
    Required {
        /// The missing setting.
        key: &'static str,
        /// The setting that needs it.
        because: &'static str,
    },
    /// A value is malformed.
    #[error("invalid value for `{key}`: {reason}")]
    Invalid {
        /// The setting.
        key: &'static str,
        /// What is wrong with the value.
        reason: String,
    },
    /// The config file holds a key that is not a setting.
    #[error(
        "unknown key `{key}` in config file {}{}",
        .file.display(),
        .suggestion.map(|s| format!(" (did you mean `{s}`?)")).unwrap_or_default()
    )]
    UnknownKey {
        /// The key as written in the file.
        key: String,
        /// The config file.
        file: PathBuf,
        /// The setting with the most similar name, if one is close.
        suggestion: Option<&'static str>,
    },
    /// The config file gives a setting twice, once in kebab-case and once in snake_case.
    #[error("`{key}` is given twice in config file {}, in kebab-case and in snake_case", .file.display())]
    DuplicateKey {
        /// The setting, in kebab-case.
        key: String,
        /// The config file.
        file: PathBuf,
    },
}

impl SettingsError {
    /// The key of the offending setting, as a flag name.
    pub fn key(&self) -> &str {
        match self {
            SettingsError::TooSmall { key, .. }
            | SettingsError::TooLarge { key, .. }
            | SettingsError::ExceedsOther { key, .. }
            | SettingsError::Required { key, .. }
            | SettingsError::Invalid { key, .. } => key,
            SettingsError::UnknownKey { key, .. } | SettingsError::DuplicateKey { key, .. } => key,
        }
    }
}

/// The command line of `chat-node`: one optional flag per setting, plus `--config`.
///
/// A flag left out is `None`, so it never masks a variable or the file. There is deliberately
/// no `Debug`: the struct holds the cookie and the auth secret in clear.
#[derive(Clone, Default, clap::Parser)]
#[command(
    name = "chat-node",
    version,
    about = "A node of the distributed chat server: serves WebSocket clients, and joins other \
             nodes into a cluster when --cluster-listen is set",
    long_about = None,
    after_help = "Every flag is also an environment variable CHAT_<FLAG> (upper case, - as _, \
                  e.g. CHAT_MAX_FRAME_BYTES) and a key of the --config TOML file \
                  (e.g. max-frame-bytes = 65536). A flag beats a variable, a variable beats \
                  the file, the file beats the default."
)]
pub struct Cli {
    /// TOML file of settings, keyed by flag name [env: CHAT_CONFIG]
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Node name, unique in the cluster [default: the host name]
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// HTTP and WebSocket address [default: 127.0.0.1:8080]
    #[arg(long, value_name = "HOST:PORT")]
    pub listen: Option<String>,
    /// Node-to-node address; unset = single-node mode
    #[arg(long, value_name = "HOST:PORT")]
    pub cluster_listen: Option<String>,
    /// Comma-separated node-to-node addresses to join through (host names allowed)
    #[arg(long, value_name = "HOST:PORT,...")]
    pub seeds: Option<String>,
    /// Shared cluster secret, at least 16 bytes; required with --cluster-listen
    #[arg(long, value_name = "SECRET")]
    pub cookie: Option<String>,
    /// File holding the cookie (a Docker or Kubernetes secret), instead of --cookie
    #[arg(long, value_name = "FILE")]
    pub cookie_file: Option<String>,
    /// Where the node keeps its data [default: ./data/NAME]
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<String>,
    /// HS256 secret of client JWTs; unset = the `user` parameter is trusted
    #[arg(long, value_name = "SECRET")]
    pub auth_secret: Option<String>,
    /// File holding the auth secret (a Docker or Kubernetes secret), instead of --auth-secret
    #[arg(long, value_name = "FILE")]
    pub auth_secret_file: Option<String>,
    /// Largest WebSocket frame / message accepted, else close 1009 [default: 65536]
    #[arg(long, value_name = "BYTES")]
    pub max_frame_bytes: Option<usize>,
    /// Largest `text` in send / direct, else too_large [default: 4096]
    #[arg(long, value_name = "BYTES")]
    pub max_text_bytes: Option<usize>,
    /// send + direct per second per connection, bursts up to twice that; 0 = off [default: 100]
    #[arg(long, value_name = "PER_SECOND")]
    pub rate_limit: Option<u32>,
    /// Copies of each room's log, owner included, capped by live members (1-5) [default: 2]
    #[arg(long, value_name = "COPIES")]
    pub replication_factor: Option<usize>,
    /// Address other nodes use to reach this node's cluster port [default: derived from
    /// --cluster-listen]
    #[arg(long, value_name = "HOST:PORT")]
    pub advertise: Option<String>,
    /// URL browsers use to reach this node, listed in /cluster for client failover
    #[arg(long, value_name = "URL")]
    pub public_url: Option<String>,
    /// This node's certificate chain (PEM) for node-to-node mutual TLS
    #[arg(long, value_name = "FILE")]
    pub cluster_tls_cert: Option<String>,
    /// The private key (PEM) of --cluster-tls-cert
    #[arg(long, value_name = "FILE")]
    pub cluster_tls_key: Option<String>,
    /// The CA certificate (PEM) every node's certificate must chain to
    #[arg(long, value_name = "FILE")]
    pub cluster_tls_ca: Option<String>,
    /// Client connections served at once; 0 follows the open-files limit [default: 0]
    #[arg(long, value_name = "COUNT")]
    pub max_connections: Option<usize>,
    /// Outbound frames queued per connection before a slow client is cut off [default: 1024]
    #[arg(long, value_name = "FRAMES")]
    pub client_queue: Option<usize>,
    /// Outbound bytes queued per connection before a slow client is cut off [default: 4194304]
    #[arg(long, value_name = "BYTES")]
    pub client_queue_bytes: Option<usize>,
    /// Rooms one connection may have joined at once [default: 256]
    #[arg(long, value_name = "COUNT")]
    pub max_rooms_per_connection: Option<usize>,
    /// join + leave + history + who per second per connection, bursts up to twice that; 0 = off [default: 20]
    #[arg(long, value_name = "PER_SECOND")]
    pub request_rate: Option<u32>,
    /// direct messages per second one user receives, from all senders together, bursts up to twice that; 0 = off [default: 50]
    #[arg(long, value_name = "PER_SECOND")]
    pub direct_rate: Option<u32>,
    /// Connections one user may hold on this node at once [default: 32]
    #[arg(long, value_name = "COUNT")]
    pub max_connections_per_user: Option<usize>,
    /// WebSocket connections from one remote IP address at once [default: 1000]
    #[arg(long, value_name = "COUNT")]
    pub max_connections_per_address: Option<usize>,
    /// Most messages a join with `since` replays [default: 1000]
    #[arg(long, value_name = "MESSAGES")]
    pub replay_cap: Option<usize>,
    /// How long a request to another actor or node may take [default: 5000]
    #[arg(long, value_name = "MS")]
    pub request_timeout_ms: Option<u64>,
    /// Close a client that answers no ping for this long [default: 60000]
    #[arg(long, value_name = "MS")]
    pub idle_timeout_ms: Option<u64>,
    /// How often cluster members send heartbeats [default: 200]
    #[arg(long, value_name = "MS")]
    pub heartbeat_interval_ms: Option<u64>,
    /// Silence after which a member is declared down [default: 3000]
    #[arg(long, value_name = "MS")]
    pub failure_timeout_ms: Option<u64>,
    /// A room without members or traffic for this long stops [default: 60000]
    #[arg(long, value_name = "MS")]
    pub room_idle_ms: Option<u64>,
    /// Members seen together before rooms accept writes in cluster mode [default: 1]
    #[arg(long, value_name = "COUNT")]
    pub bootstrap_expect: Option<usize>,
    /// Log format [default: text]
    #[arg(long, value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,
    /// How long graceful shutdown waits for clients and storage [default: 5000]
    #[arg(long, value_name = "MS")]
    pub shutdown_grace_ms: Option<u64>,
    /// Newest messages kept per room; older ones are dropped; 0 = keep all [default: 0]
    #[arg(long, value_name = "MESSAGES")]
    pub retention_messages: Option<u64>,
    /// Messages older than this are dropped; 0 = keep them however old [default: 0]
    #[arg(long, value_name = "SECONDS")]
    pub retention_age_secs: Option<u64>,
}

impl Settings {
    /// Loads settings from command-line `args`, the environment `env` and the config file.
    ///
    /// `args` starts with the program name, as for [`clap::Parser::parse_from`]; `env` stands in
    /// for the process environment, so tests never touch it. `--help`, `--version` and a bad flag
    /// come back as a [`clap::Error`] inside the `Err`.
    pub fn load_from<I, T>(args: I, env: &[(String, String)]) -> anyhow::Result<Settings>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        let cli = Cli::try_parse_from(args)?;
        Settings::from_cli(cli, env)
    }

    /// Loads settings from the process's arguments and environment, and the config file.
    ///
    /// `--help`, `--version` and a bad flag print and exit, as clap does.
    pub fn load() -> anyhow::Result<Settings> {
        let cli = Cli::parse();
        Settings::from_cli(cli, &process_env()?)
    }

    /// Layers parsed flags over the environment `env`, the config file and the defaults, then
    /// validates the result.
    pub fn from_cli(cli: Cli, env: &[(String, String)]) -> anyhow::Result<Settings> {
        let config_file = cli
            .config
            .clone()
            .or_else(|| env_var(env, CONFIG_VAR).map(PathBuf::from));
        let mut builder = with_defaults(Config::builder())?;
        let mut file_only = FileOnly::default();
        if let Some(path) = &config_file {
            let (layer, only) = read_config_file(path)?;
            builder = builder.add_source(layer);
            file_only = only;
        }
        if env_var(env, RETENTION_ROOMS_VAR).is_some() {
            return Err(invalid(
                "retention-rooms",
                format!("is read from the config file only, not from {RETENTION_ROOMS_VAR}"),
            )
            .into());
        }
        builder = with_flags(builder.add_source(env_source(env)), cli)?;
        // Type errors name the key and where the value came from, e.g. "invalid type: string
        // \"lots\", expected an integer for key `max-frame-bytes` in the environment".
        let layered: Layered = builder.build()?.try_deserialize()?;
        let settings = layered.resolve(env, file_only)?;
        settings.validate()?;
        Ok(settings)
    }

    /// Checks every setting's range and the rules between settings.
    ///
    /// Returns the first problem found; its message names the key.
    pub fn validate(&self) -> Result<(), SettingsError> {
        if matches!(self.name.as_str(), "." | "..") {
            return Err(invalid(
                "name",
                "must not be `.` or `..` (it names the data directory)",
            ));
        }
        check_addr("listen", &self.listen, Port::AnyOrZero)?;
        if let Some(cluster_listen) = &self.cluster_listen {
            check_addr("cluster-listen", cluster_listen, Port::AnyOrZero)?;
            if cluster_listen == &self.listen && !cluster_listen.ends_with(":0") {
                return Err(invalid("cluster-listen", "must differ from `listen`"));
            }
            if self.cookie.is_none() {
                return Err(SettingsError::Required {
                    key: "cookie",
                    because: "cluster-listen",
                });
            }
        }
        for seed in &self.seeds {
            check_addr("seeds", seed, Port::NonZero)?;
        }
        check_secret("cookie", self.cookie.as_deref())?;
        if let Some(cookie) = &self.cookie
            && cookie.len() < MIN_COOKIE_BYTES
        {
            return Err(invalid(
                "cookie",
                format!(
                    "must be at least {MIN_COOKIE_BYTES} bytes (got {}); e.g. `openssl rand -hex 32`",
                    cookie.len()
                ),
            ));
        }
        check_secret("auth-secret", self.auth_secret.as_deref())?;
        if self.data_dir.as_os_str().is_empty() {
            return Err(invalid("data-dir", "must not be empty"));
        }
        if let Some(advertise) = &self.advertise {
            check_addr("advertise", advertise, Port::NonZero)?;
            if split_host_port(advertise).is_some_and(|(host, _)| is_wildcard(host)) {
                return Err(invalid(
                    "advertise",
                    "must be an address other nodes can reach, not a wildcard",
                ));
            }
        }
        if let Some(url) = &self.public_url {
            check_public_url(url)?;
        }
        self.check_cluster_tls()?;
        at_least("max-frame-bytes", wide(self.max_frame_bytes), 1024)?;
        at_least("max-text-bytes", wide(self.max_text_bytes), 1)?;
        if self.max_text_bytes > self.max_frame_bytes {
            return Err(SettingsError::ExceedsOther {
                key: "max-text-bytes",
                other: "max-frame-bytes",
                limit: wide(self.max_frame_bytes),
            });
        }
        check_range("replication-factor", wide(self.replication_factor), 1..=5)?;
        at_least("client-queue", wide(self.client_queue), 16)?;
        at_least("client-queue-bytes", wide(self.client_queue_bytes), 65536)?;
        at_least(
            "max-rooms-per-connection",
            wide(self.max_rooms_per_connection),
            1,
        )?;
        at_least(
            "max-connections-per-user",
            wide(self.max_connections_per_user),
            1,
        )?;
        at_least(
            "max-connections-per-address",
            wide(self.max_connections_per_address),
            1,
        )?;
        check_range("replay-cap", wide(self.replay_cap), 1..=100_000)?;
        at_least("request-timeout-ms", self.request_timeout_ms, 100)?;
        at_least("idle-timeout-ms", self.idle_timeout_ms, 1000)?;
        at_least("heartbeat-interval-ms", self.heartbeat_interval_ms, 10)?;
        let min_failure_timeout = self
            .heartbeat_interval_ms
            .saturating_mul(FAILURE_TIMEOUT_HEARTBEATS);
        if self.failure_timeout_ms <= min_failure_timeout {
            return Err(invalid(
                "failure-timeout-ms",
                format!(
                    "must be more than {FAILURE_TIMEOUT_HEARTBEATS} times `heartbeat-interval-ms`, \
                     i.e. more than {min_failure_timeout} (got {})",
                    self.failure_timeout_ms
                ),
            ));
        }
        at_least("bootstrap-expect", wide(self.bootstrap_expect), 1)?;
        check_range(
            "retention-age-secs",
            self.retention_age_secs,
            0..=MAX_RETENTION_AGE_SECS,
        )?;
        for age_secs in self.retention_rooms.values().filter_map(|r| r.age_secs) {
            check_range("retention-rooms", age_secs, 0..=MAX_RETENTION_AGE_SECS)?;
        }
        Ok(())
    }

    /// How much of each room's log to keep: the node-wide bounds, overridden per room.
    pub fn retention(&self) -> RetentionPolicy {
        let retention = |messages: u64, age_secs: u64| Retention {
            messages,
            age_ms: age_secs.saturating_mul(1000),
        };
        let rooms = self
            .retention_rooms
            .iter()
            .map(|(room, over)| {
                let messages = over.messages.unwrap_or(self.retention_messages);
                let age_secs = over.age_secs.unwrap_or(self.retention_age_secs);
                (room.clone(), retention(messages, age_secs))
            })
            .collect();
        RetentionPolicy {
            default: retention(self.retention_messages, self.retention_age_secs),
            rooms: Arc::new(rooms),
        }
    }

    /// Settings of a single node for tests: name `n1`, listening on `127.0.0.1:0`, every other
    /// setting at its default.
    ///
    /// `data_dir` is left empty on purpose: the test sets it to a fresh temporary directory, and
    /// [`Settings::validate`] rejects it if the test forgets, instead of writing under the
    /// working directory.
    pub fn single_node() -> Settings {
        #[expect(clippy::expect_used, reason = "`n1` is a constant, valid node name")]
        let name = NodeName::new("n1").expect("`n1` is a valid node name");
        Settings {
            name,
            listen: "127.0.0.1:0".to_owned(),
            cluster_listen: None,
            seeds: Vec::new(),
            cookie: None,
            data_dir: PathBuf::new(),
            auth_secret: None,
            max_frame_bytes: defaults::MAX_FRAME_BYTES,
            max_text_bytes: defaults::MAX_TEXT_BYTES,
            rate_limit: defaults::RATE_LIMIT,
            replication_factor: defaults::REPLICATION_FACTOR,
            advertise: None,
            public_url: None,
            cluster_tls_cert: None,
            cluster_tls_key: None,
            cluster_tls_ca: None,
            max_connections: defaults::MAX_CONNECTIONS,
            client_queue: defaults::CLIENT_QUEUE,
            client_queue_bytes: defaults::CLIENT_QUEUE_BYTES,
            max_rooms_per_connection: defaults::MAX_ROOMS_PER_CONNECTION,
            request_rate: defaults::REQUEST_RATE,
            direct_rate: defaults::DIRECT_RATE,
            max_connections_per_user: defaults::MAX_CONNECTIONS_PER_USER,
            max_connections_per_address: defaults::MAX_CONNECTIONS_PER_ADDRESS,
            replay_cap: defaults::REPLAY_CAP,
            request_timeout_ms: defaults::REQUEST_TIMEOUT_MS,
            idle_timeout_ms: defaults::IDLE_TIMEOUT_MS,
            heartbeat_interval_ms: defaults::HEARTBEAT_INTERVAL_MS,
            failure_timeout_ms: defaults::FAILURE_TIMEOUT_MS,
            room_idle_ms: defaults::ROOM_IDLE_MS,
            bootstrap_expect: defaults::BOOTSTRAP_EXPECT,
            log_format: LogFormat::Text,
            shutdown_grace_ms: defaults::SHUTDOWN_GRACE_MS,
            retention_messages: defaults::RETENTION_MESSAGES,
            retention_age_secs: defaults::RETENTION_AGE_SECS,
            retention_rooms: BTreeMap::new(),
        }
    }

    /// The node-to-node TLS files (certificate chain, key, CA), when all three are set.
    pub fn cluster_tls(&self) -> Option<(&Path, &Path, &Path)> {
        Some((
            self.cluster_tls_cert.as_deref()?,
            self.cluster_tls_key.as_deref()?,
            self.cluster_tls_ca.as_deref()?,
        ))
    }

    /// The three TLS files come together, and only in cluster mode.
    fn check_cluster_tls(&self) -> Result<(), SettingsError> {
        let given = [
            ("cluster-tls-cert", &self.cluster_tls_cert),
            ("cluster-tls-key", &self.cluster_tls_key),
            ("cluster-tls-ca", &self.cluster_tls_ca),
        ];
        let Some((first, _)) = given.iter().find(|(_, path)| path.is_some()) else {
            return Ok(());
        };
        if let Some((missing, _)) = given.iter().find(|(_, path)| path.is_none()) {
            return Err(SettingsError::Required {
                key: missing,
                because: first,
            });
        }
        if self.cluster_listen.is_none() {
            return Err(SettingsError::Required {
                key: "cluster-listen",
                because: first,
            });
        }
        Ok(())
    }

    /// The `host:port` other nodes use to reach this node's cluster port; `None` in single-node
    /// mode.
    ///
    /// `advertise` when set; else `cluster-listen`, unless its host is a wildcard (`0.0.0.0`,
    /// `[::]`), which peers cannot dial: then `<name>:<port>`, which resolves where node names
    /// are host names (docker compose services).
    pub fn advertised_cluster_addr(&self) -> Option<String> {
        if let Some(advertise) = &self.advertise {
            return Some(advertise.clone());
        }
        let cluster_listen = self.cluster_listen.as_deref()?;
        match split_host_port(cluster_listen) {
            Some((host, port)) if is_wildcard(host) => Some(format!("{}:{port}", self.name)),
            _ => Some(cluster_listen.to_owned()),
        }
    }
}

impl fmt::Debug for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Settings")
            .field("name", &self.name)
            .field("listen", &self.listen)
            .field("cluster_listen", &self.cluster_listen)
            .field("seeds", &self.seeds)
            .field("cookie", &self.cookie.as_ref().map(|_| REDACTED))
            .field("data_dir", &self.data_dir)
            .field("auth_secret", &self.auth_secret.as_ref().map(|_| REDACTED))
            .field("max_frame_bytes", &self.max_frame_bytes)
            .field("max_text_bytes", &self.max_text_bytes)
            .field("rate_limit", &self.rate_limit)
            .field("replication_factor", &self.replication_factor)
            .field("advertise", &self.advertise)
            .field("public_url", &self.public_url)
            .field("cluster_tls_cert", &self.cluster_tls_cert)
            .field("cluster_tls_key", &self.cluster_tls_key)
            .field("cluster_tls_ca", &self.cluster_tls_ca)
            .field("max_connections", &self.max_connections)
            .field("client_queue", &self.client_queue)
            .field("client_queue_bytes", &self.client_queue_bytes)
            .field("max_rooms_per_connection", &self.max_rooms_per_connection)
            .field("request_rate", &self.request_rate)
            .field("direct_rate", &self.direct_rate)
            .field("max_connections_per_user", &self.max_connections_per_user)
            .field(
                "max_connections_per_address",
                &self.max_connections_per_address,
            )
            .field("replay_cap", &self.replay_cap)
            .field("request_timeout_ms", &self.request_timeout_ms)
            .field("idle_timeout_ms", &self.idle_timeout_ms)
            .field("heartbeat_interval_ms", &self.heartbeat_interval_ms)
            .field("failure_timeout_ms", &self.failure_timeout_ms)
            .field("room_idle_ms", &self.room_idle_ms)
            .field("bootstrap_expect", &self.bootstrap_expect)
            .field("log_format", &self.log_format)
            .field("shutdown_grace_ms", &self.shutdown_grace_ms)
            .field("retention_messages", &self.retention_messages)
            .field("retention_age_secs", &self.retention_age_secs)
            .field("retention_rooms", &self.retention_rooms)
            .finish()
    }
}

/// The settings as layered, before the defaults that depend on other settings are filled in.
#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
struct Layered {
    name: Option<String>,
    listen: String,
    cluster_listen: Option<String>,
    #[serde(deserialize_with = "comma_list")]
    seeds: Vec<String>,
    cookie: Option<String>,
    cookie_file: Option<PathBuf>,
    data_dir: Option<PathBuf>,
    auth_secret: Option<String>,
    auth_secret_file: Option<PathBuf>,
    max_frame_bytes: usize,
    max_text_bytes: usize,
    rate_limit: u32,
    replication_factor: usize,
    advertise: Option<String>,
    public_url: Option<String>,
    cluster_tls_cert: Option<PathBuf>,
    cluster_tls_key: Option<PathBuf>,
    cluster_tls_ca: Option<PathBuf>,
    max_connections: usize,
    client_queue: usize,
    client_queue_bytes: usize,
    max_rooms_per_connection: usize,
    request_rate: u32,
    direct_rate: u32,
    max_connections_per_user: usize,
    max_connections_per_address: usize,
    replay_cap: usize,
    request_timeout_ms: u64,
    idle_timeout_ms: u64,
    heartbeat_interval_ms: u64,
    failure_timeout_ms: u64,
    room_idle_ms: u64,
    bootstrap_expect: usize,
    log_format: LogFormat,
    shutdown_grace_ms: u64,
    retention_messages: u64,
    retention_age_secs: u64,
}

impl Layered {
    /// Validates the name and fills in the name and data directory defaults.
    fn resolve(
        self,
        env: &[(String, String)],
        file_only: FileOnly,
    ) -> Result<Settings, SettingsError> {
        let name = match self.name {
            Some(name) => NodeName::new(&name)
                .map_err(|err| invalid("name", format!("{err} (got `{name}`)")))?,
            None => default_node_name(env)?,
        };
        let data_dir = self
            .data_dir
            .unwrap_or_else(|| Path::new(defaults::DATA_ROOT).join(name.as_str()));
        let cookie = secret("cookie", self.cookie, "cookie-file", self.cookie_file)?;
        let auth_secret = secret(
            "auth-secret",
            self.auth_secret,
            "auth-secret-file",
            self.auth_secret_file,
        )?;
        Ok(Settings {
            name,
            listen: self.listen,
            cluster_listen: self.cluster_listen,
            seeds: self.seeds,
            cookie,
            data_dir,
            auth_secret,
            max_frame_bytes: self.max_frame_bytes,
            max_text_bytes: self.max_text_bytes,
            rate_limit: self.rate_limit,
            replication_factor: self.replication_factor,
            advertise: self.advertise,
            public_url: self.public_url,
            cluster_tls_cert: self.cluster_tls_cert,
            cluster_tls_key: self.cluster_tls_key,
            cluster_tls_ca: self.cluster_tls_ca,
            max_connections: self.max_connections,
            client_queue: self.client_queue,
            client_queue_bytes: self.client_queue_bytes,
            max_rooms_per_connection: self.max_rooms_per_connection,
            request_rate: self.request_rate,
            direct_rate: self.direct_rate,
            max_connections_per_user: self.max_connections_per_user,
            max_connections_per_address: self.max_connections_per_address,
            replay_cap: self.replay_cap,
            request_timeout_ms: self.request_timeout_ms,
            idle_timeout_ms: self.idle_timeout_ms,
            heartbeat_interval_ms: self.heartbeat_interval_ms,
            failure_timeout_ms: self.failure_timeout_ms,
            room_idle_ms: self.room_idle_ms,
            bootstrap_expect: self.bootstrap_expect,
            log_format: self.log_format,
            shutdown_grace_ms: self.shutdown_grace_ms,
            retention_messages: self.retention_messages,
            retention_age_secs: self.retention_age_secs,
            retention_rooms: file_only.retention_rooms,
        })
    }
}

/// The `config` builder, before any I/O.
type Builder = ConfigBuilder<config::builder::DefaultState>;

/// The lowest layer: every fixed default. `name` and `data-dir` are filled in after layering.
fn with_defaults(builder: Builder) -> Result<Builder, ConfigError> {
    builder
        .set_default("listen", defaults::LISTEN)?
        .set_default("seeds", Vec::<String>::new())?
        .set_default("max-frame-bytes", wide(defaults::MAX_FRAME_BYTES))?
        .set_default("max-text-bytes", wide(defaults::MAX_TEXT_BYTES))?
        .set_default("rate-limit", defaults::RATE_LIMIT)?
        .set_default("replication-factor", wide(defaults::REPLICATION_FACTOR))?
        .set_default("max-connections", wide(defaults::MAX_CONNECTIONS))?
        .set_default("client-queue", wide(defaults::CLIENT_QUEUE))?
        .set_default("client-queue-bytes", wide(defaults::CLIENT_QUEUE_BYTES))?
        .set_default(
            "max-rooms-per-connection",
            wide(defaults::MAX_ROOMS_PER_CONNECTION),
        )?
        .set_default("request-rate", defaults::REQUEST_RATE)?
        .set_default("direct-rate", defaults::DIRECT_RATE)?
        .set_default(
            "max-connections-per-user",
            wide(defaults::MAX_CONNECTIONS_PER_USER),
        )?
        .set_default(
            "max-connections-per-address",
            wide(defaults::MAX_CONNECTIONS_PER_ADDRESS),
        )?
        .set_default("replay-cap", wide(defaults::REPLAY_CAP))?
        .set_default("request-timeout-ms", defaults::REQUEST_TIMEOUT_MS)?
        .set_default("idle-timeout-ms", defaults::IDLE_TIMEOUT_MS)?
        .set_default("heartbeat-interval-ms", defaults::HEARTBEAT_INTERVAL_MS)?
        .set_default("failure-timeout-ms", defaults::FAILURE_TIMEOUT_MS)?
        .set_default("room-idle-ms", defaults::ROOM_IDLE_MS)?
        .set_default("bootstrap-expect", wide(defaults::BOOTSTRAP_EXPECT))?
        .set_default("log-format", LogFormat::default().as_str())?
        .set_default("shutdown-grace-ms", defaults::SHUTDOWN_GRACE_MS)?
        .set_default("retention-messages", defaults::RETENTION_MESSAGES)?
        .set_default("retention-age-secs", defaults::RETENTION_AGE_SECS)
}

/// The top layer: the flags given on the command line, and only those.
fn with_flags(builder: Builder, cli: Cli) -> Result<Builder, ConfigError> {
    builder
        .set_override_option("name", cli.name)?
        .set_override_option("listen", cli.listen)?
        .set_override_option("cluster-listen", cli.cluster_listen)?
        .set_override_option("seeds", cli.seeds)?
        .set_override_option("cookie", cli.cookie)?
        .set_override_option("cookie-file", cli.cookie_file)?
        .set_override_option("data-dir", cli.data_dir)?
        .set_override_option("auth-secret", cli.auth_secret)?
        .set_override_option("auth-secret-file", cli.auth_secret_file)?
        .set_override_option("max-frame-bytes", cli.max_frame_bytes.map(wide))?
        .set_override_option("max-text-bytes", cli.max_text_bytes.map(wide))?
        .set_override_option("rate-limit", cli.rate_limit)?
        .set_override_option("replication-factor", cli.replication_factor.map(wide))?
        .set_override_option("advertise", cli.advertise)?
        .set_override_option("public-url", cli.public_url)?
        .set_override_option("cluster-tls-cert", cli.cluster_tls_cert)?
        .set_override_option("cluster-tls-key", cli.cluster_tls_key)?
        .set_override_option("cluster-tls-ca", cli.cluster_tls_ca)?
        .set_override_option("max-connections", cli.max_connections.map(wide))?
        .set_override_option("client-queue", cli.client_queue.map(wide))?
        .set_override_option("client-queue-bytes", cli.client_queue_bytes.map(wide))?
        .set_override_option(
            "max-rooms-per-connection",
            cli.max_rooms_per_connection.map(wide),
        )?
        .set_override_option("request-rate", cli.request_rate)?
        .set_override_option("direct-rate", cli.direct_rate)?
        .set_override_option(
            "max-connections-per-user",
            cli.max_connections_per_user.map(wide),
        )?
        .set_override_option(
            "max-connections-per-address",
            cli.max_connections_per_address.map(wide),
        )?
        .set_override_option("replay-cap", cli.replay_cap.map(wide))?
        .set_override_option("request-timeout-ms", cli.request_timeout_ms)?
        .set_override_option("idle-timeout-ms", cli.idle_timeout_ms)?
        .set_override_option("heartbeat-interval-ms", cli.heartbeat_interval_ms)?
        .set_override_option("failure-timeout-ms", cli.failure_timeout_ms)?
        .set_override_option("room-idle-ms", cli.room_idle_ms)?
        .set_override_option("bootstrap-expect", cli.bootstrap_expect.map(wide))?
        .set_override_option("log-format", cli.log_format.map(LogFormat::as_str))?
        .set_override_option("shutdown-grace-ms", cli.shutdown_grace_ms)?
        .set_override_option("retention-messages", cli.retention_messages)?
        .set_override_option("retention-age-secs", cli.retention_age_secs)
}

/// The `CHAT_*` variables of `env` as a source, with keys turned into kebab-case.
fn env_source(env: &[(String, String)]) -> Environment {
    // Only upper-case `CHAT_` names are passed on (the `config` crate would also match
    // `chat_`); variables that are not settings are ignored when deserializing.
    let vars: Map<String, String> = env
        .iter()
        .filter(|(key, _)| key.starts_with(ENV_PREFIX) && key != CONFIG_VAR)
        .cloned()
        .collect();
    Environment::with_prefix("CHAT")
        .prefix_separator("_")
        .convert_case(Case::Kebab)
        .ignore_empty(true)
        .source(Some(vars))
}

/// An already collected table of settings, as a `config` source.
#[derive(Debug, Clone)]
struct Layer(Map<String, Value>);

impl Source for Layer {
    fn clone_into_box(&self) -> Box<dyn Source + Send + Sync> {
        Box::new(self.clone())
    }

    fn collect(&self) -> Result<Map<String, Value>, ConfigError> {
        Ok(self.0.clone())
    }
}

/// What the config file holds besides the layered settings ([`FILE_ONLY_KEYS`]).
#[derive(Debug, Default)]
struct FileOnly {
    retention_rooms: BTreeMap<RoomId, RoomRetention>,
}

/// Reads the TOML config file at `path`, with keys in kebab-case; unknown keys are an error.
fn read_config_file(path: &Path) -> anyhow::Result<(Layer, FileOnly)> {
    // Checked here because `config::File` would otherwise also try `path` + `.toml` etc.
    if !path.is_file() {
        anyhow::bail!(
            "config file {} does not exist or is not a file",
            path.display()
        );
    }
    let mut table = config::File::from(path)
        .format(FileFormat::Toml)
        .collect()
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    let file_only = take_file_only(&mut table, path)?;
    Ok((Layer(normalize_file_keys(table, path)?), file_only))
}

/// Takes the [`FILE_ONLY_KEYS`] out of the file's `table`, checked, before the rest is layered.
fn take_file_only(table: &mut Map<String, Value>, file: &Path) -> Result<FileOnly, SettingsError> {
    let key = "retention-rooms";
    let value = match (table.remove(key), table.remove("retention_rooms")) {
        (Some(_), Some(_)) => {
            return Err(SettingsError::DuplicateKey {
                key: key.to_owned(),
                file: file.to_owned(),
            });
        }
        (Some(value), None) | (None, Some(value)) => value,
        (None, None) => return Ok(FileOnly::default()),
    };
    let rooms: BTreeMap<String, RoomRetention> = value.try_deserialize().map_err(|err| {
        invalid(
            key,
            format!("must be a table of rooms, each `{{ messages = N, age-secs = S }}` ({err})"),
        )
    })?;
    let mut retention_rooms = BTreeMap::new();
    for (room, retention) in rooms {
        let id = RoomId::new(&room).map_err(|err| invalid(key, format!("room `{room}`: {err}")))?;
        retention_rooms.insert(id, retention);
    }
    Ok(FileOnly { retention_rooms })
}

/// Turns snake_case keys into kebab-case and refuses keys that are not settings.
fn normalize_file_keys(
    table: Map<String, Value>,
    file: &Path,
) -> Result<Map<String, Value>, SettingsError> {
    let mut entries: Vec<(String, Value)> = table.into_iter().collect();
    // Sorted so that the error for several bad keys is always about the same one.
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    let mut normalized = Map::new();
    for (written, value) in entries {
        let key = written.replace('_', "-");
        if !KEYS.contains(&key.as_str()) {
            return Err(SettingsError::UnknownKey {
                suggestion: closest_key(&key),
                key: written,
                file: file.to_owned(),
            });
        }
        if normalized.insert(key.clone(), value).is_some() {
            return Err(SettingsError::DuplicateKey {
                key,
                file: file.to_owned(),
            });
        }
    }
    Ok(normalized)
}

/// The setting whose name is within two edits of `key`, for "did you mean" hints.
fn closest_key(key: &str) -> Option<&'static str> {
    KEYS.iter()
        .map(|candidate| (edit_distance(key, candidate), *candidate))
        .filter(|(distance, _)| *distance <= 2)
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, candidate)| candidate)
}

/// Levenshtein distance between `a` and `b`, in characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, a_char) in a.chars().enumerate() {
        let mut current = Vec::with_capacity(b.len() + 1);
        current.push(i + 1);
        for (j, b_char) in b.iter().enumerate() {
            let substitute = previous[j] + usize::from(a_char != *b_char);
            let delete = previous[j + 1] + 1;
            let insert = current[j] + 1;
            current.push(substitute.min(delete).min(insert));
        }
        previous = current;
    }
    previous[b.len()]
}

/// Deserializes a list given as `"a:1, b:2"` or as `["a:1", "b:2"]`; items are trimmed and
/// empty ones dropped.
fn comma_list<'de, D>(deserializer: D) -> Result<Vec<String>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    struct CommaList;

    impl<'de> serde::de::Visitor<'de> for CommaList {
        type Value = Vec<String>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a comma-separated string or an array of strings")
        }

        fn visit_str<E: serde::de::Error>(self, value: &str) -> Result<Vec<String>, E> {
            Ok(split_list(value))
        }

        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Vec<String>, A::Error> {
            let mut items = Vec::new();
            while let Some(item) = seq.next_element::<String>()? {
                items.extend(split_list(&item));
            }
            Ok(items)
        }
    }

    deserializer.deserialize_any(CommaList)
}

/// Splits a comma-separated list, trimming items and dropping empty ones.
fn split_list(list: &str) -> Vec<String> {
    list.split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(str::to_owned)
        .collect()
}

/// The node name used when `name` is not set: the host name, made valid.
///
/// The host name comes from `/proc/sys/kernel/hostname`, else `HOSTNAME` in `env`, else is
/// [`defaults::FALLBACK_NAME`].
fn default_node_name(env: &[(String, String)]) -> Result<NodeName, SettingsError> {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|host| host.trim().to_owned())
        .filter(|host| !host.is_empty())
        .or_else(|| env_var(env, "HOSTNAME").map(|host| host.trim().to_owned()))
        .unwrap_or_else(|| defaults::FALLBACK_NAME.to_owned());
    let name = sanitize_node_name(&host);
    NodeName::new(&name).map_err(|err| {
        invalid(
            "name",
            format!("not set, and the host name `{host}` does not make one ({err}); set `name`"),
        )
    })
}

/// Makes a node name of a host name: characters outside `A-Z a-z 0-9 _ . -` become `-`, the
/// result is cut at [`NodeName::MAX_LEN`], and a name of only dots becomes the fallback.
fn sanitize_node_name(host: &str) -> String {
    let name: String = host
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') {
                c
            } else {
                '-'
            }
        })
        .take(NodeName::MAX_LEN)
        .collect();
    if name.chars().all(|c| c == '.') {
        defaults::FALLBACK_NAME.to_owned()
    } else {
        name
    }
}

/// The value of `key` in `env`, if set and not empty.
fn env_var<'a>(env: &'a [(String, String)], key: &str) -> Option<&'a str> {
    env.iter()
        .rev()
        .find(|(name, _)| name == key)
        .map(|(_, value)| value.as_str())
        .filter(|value| !value.is_empty())
}

/// The process environment; variables that are not UTF-8 are skipped unless they are ours.
fn process_env() -> anyhow::Result<Vec<(String, String)>> {
    let mut vars = Vec::new();
    for (key, value) in std::env::vars_os() {
        match (key.into_string(), value.into_string()) {
            (Ok(key), Ok(value)) => vars.push((key, value)),
            (Ok(key), Err(_)) if key.starts_with(ENV_PREFIX) => {
                anyhow::bail!("environment variable {key} is not valid UTF-8");
            }
            _ => {}
        }
    }
    Ok(vars)
}

/// Whether an address may use port 0 (pick any free port).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Port {
    /// A listen address: port 0 picks a free port.
    AnyOrZero,
    /// An address to dial: port 0 is meaningless.
    NonZero,
}

/// Checks that `addr` is `host:port`.
fn check_addr(key: &'static str, addr: &str, port: Port) -> Result<(), SettingsError> {
    match split_host_port(addr) {
        Some((_, 0)) if port == Port::NonZero => Err(invalid(
            key,
            format!("`{addr}` has port 0, which cannot be dialled"),
        )),
        Some(_) => Ok(()),
        None => Err(invalid(
            key,
            format!("`{addr}` is not HOST:PORT (e.g. `node1:7000`, `10.0.0.5:7000`, `[::1]:7000`)"),
        )),
    }
}

/// Splits `host:port`; the host is a name, an IPv4 address or a bracketed IPv6 address.
fn split_host_port(addr: &str) -> Option<(&str, u16)> {
    let (host, port) = addr.rsplit_once(':')?;
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let port: u16 = port.parse().ok()?;
    let host_ok = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => v6.parse::<std::net::Ipv6Addr>().is_ok(),
        None => {
            !host.is_empty()
                && host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
        }
    };
    host_ok.then_some((host, port))
}

/// Whether `host` is an "any address" (`0.0.0.0`, `[::]`), which only makes sense to listen on.
fn is_wildcard(host: &str) -> bool {
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    bare.parse::<IpAddr>().is_ok_and(|ip| ip.is_unspecified())
}

/// Checks that a secret, when set, is not empty.
fn check_secret(key: &'static str, secret: Option<&str>) -> Result<(), SettingsError> {
    match secret {
        Some("") => Err(invalid(key, "must not be empty")),
        _ => Ok(()),
    }
}

/// Checks that the public URL is an absolute `http` or `https` URL.
fn check_public_url(url: &str) -> Result<(), SettingsError> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"));
    match rest {
        Some(rest) if !rest.is_empty() && !url.contains(char::is_whitespace) => Ok(()),
        _ => Err(invalid(
            "public-url",
            format!("`{url}` is not an http:// or https:// URL (e.g. `http://localhost:8081`)"),
        )),
    }
}

/// Checks that `value` lies in `range`.
fn check_range(
    key: &'static str,
    value: u64,
    range: RangeInclusive<u64>,
) -> Result<(), SettingsError> {
    if value < *range.start() {
        Err(SettingsError::TooSmall {
            key,
            min: *range.start(),
            value,
        })
    } else if value > *range.end() {
        Err(SettingsError::TooLarge {
            key,
            max: *range.end(),
            value,
        })
    } else {
        Ok(())
    }
}

/// Checks that `value` is at least `min`.
fn at_least(key: &'static str, value: u64, min: u64) -> Result<(), SettingsError> {
    check_range(key, value, min..=u64::MAX)
}

/// A malformed-value error for `key`.
/// A secret given directly (`key`) or in a file (`file_key`), not both. The file's content is
/// the secret, without a trailing line break.
fn secret(
    key: &'static str,
    value: Option<String>,
    file_key: &'static str,
    file: Option<PathBuf>,
) -> Result<Option<String>, SettingsError> {
    match (value, file) {
        (Some(_), Some(_)) => Err(invalid(
            file_key,
            format!("give `{key}` or `{file_key}`, not both"),
        )),
        (value, None) => Ok(value),
        (None, Some(path)) => {
            let text = std::fs::read_to_string(&path)
                .map_err(|e| invalid(file_key, format!("cannot read {}: {e}", path.display())))?;
            Ok(Some(text.trim_end_matches(['\r', '\n']).to_owned()))
        }
    }
}

fn invalid(key: &'static str, reason: impl Into<String>) -> SettingsError {
    SettingsError::Invalid {
        key,
        reason: reason.into(),
    }
}

/// Widens a count to `u64` for the `config` crate and error messages (lossless on every
/// platform Rust supports, which have at most 64-bit `usize`).
fn wide(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// A TOML file under the temp dir, unique to this process and test, removed on drop.
    struct TempToml(PathBuf);

    impl TempToml {
        fn new(contents: &str) -> TempToml {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let path = std::env::temp_dir().join(format!(
                "chat-settings-test-{}-{}.toml",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::write(&path, contents).unwrap();
            TempToml(path)
        }

        fn path(&self) -> &str {
            self.0.to_str().unwrap()
        }
    }

    impl Drop for TempToml {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn env_of(vars: &[(&str, &str)]) -> Vec<(String, String)> {
        vars.iter()
            .map(|(key, value)| (key.to_string(), value.to_string()))
            .collect()
    }

    fn load(args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<Settings> {
        let argv = std::iter::once("chat-node").chain(args.iter().copied());
        Settings::load_from(argv, &env_of(env))
    }

    fn load_ok(args: &[&str], env: &[(&str, &str)]) -> Settings {
        load(args, env).unwrap_or_else(|err| panic!("{args:?} {env:?}: {err:#}"))
    }

    fn settings_error(args: &[&str], env: &[(&str, &str)]) -> SettingsError {
        match load(args, env) {
            Ok(settings) => panic!("{args:?} {env:?} loaded: {settings:?}"),
            Err(err) => err
                .downcast::<SettingsError>()
                .unwrap_or_else(|err| panic!("{args:?}: not a SettingsError: {err:#}")),
        }
    }

    /// Settings naming a file that holds a secret: read when the settings load, never kept.
    const FILE_KEYS: &[&str] = &["cookie-file", "auth-secret-file"];

    fn defaults() -> Settings {
        load_ok(&[], &[])
    }

    /// One non-default value for every setting, as given on a command line.
    const NON_DEFAULTS: &[(&str, &str)] = &[
        ("name", "n7"),
        ("listen", "0.0.0.0:9090"),
        ("cluster-listen", "0.0.0.0:7007"),
        ("seeds", "n1:7000,n2:7000"),
        ("cookie", "sesame-sesame-sesame"),
        ("data-dir", "/srv/chat/n7"),
        ("auth-secret", "jwt-secret"),
        ("max-frame-bytes", "131072"),
        ("max-text-bytes", "8192"),
        ("rate-limit", "0"),
        ("replication-factor", "3"),
        ("advertise", "n7.internal:7007"),
        ("public-url", "http://localhost:8087"),
        ("cluster-tls-cert", "/certs/n7.pem"),
        ("cluster-tls-key", "/certs/n7.key"),
        ("cluster-tls-ca", "/certs/ca.pem"),
        ("max-connections", "500"),
        ("client-queue", "64"),
        ("client-queue-bytes", "1048576"),
        ("max-rooms-per-connection", "10"),
        ("request-rate", "3"),
        ("direct-rate", "0"),
        ("max-connections-per-user", "4"),
        ("max-connections-per-address", "100"),
        ("replay-cap", "50"),
        ("request-timeout-ms", "250"),
        ("idle-timeout-ms", "4321"),
        ("heartbeat-interval-ms", "50"),
        ("failure-timeout-ms", "1000"),
        ("room-idle-ms", "1234"),
        ("bootstrap-expect", "3"),
        ("log-format", "json"),
        ("shutdown-grace-ms", "777"),
        ("retention-messages", "1000"),
        ("retention-age-secs", "86400"),
    ];

    fn non_default_settings() -> Settings {
        Settings {
            name: NodeName::new("n7").unwrap(),
            listen: "0.0.0.0:9090".into(),
            cluster_listen: Some("0.0.0.0:7007".into()),
            seeds: vec!["n1:7000".into(), "n2:7000".into()],
            cookie: Some("sesame-sesame-sesame".into()),
            data_dir: PathBuf::from("/srv/chat/n7"),
            auth_secret: Some("jwt-secret".into()),
            max_frame_bytes: 131_072,
            max_text_bytes: 8192,
            rate_limit: 0,
            replication_factor: 3,
            advertise: Some("n7.internal:7007".into()),
            public_url: Some("http://localhost:8087".into()),
            cluster_tls_cert: Some("/certs/n7.pem".into()),
            cluster_tls_key: Some("/certs/n7.key".into()),
            cluster_tls_ca: Some("/certs/ca.pem".into()),
            max_connections: 500,
            client_queue: 64,
            client_queue_bytes: 1048576,
            max_rooms_per_connection: 10,
            request_rate: 3,
            direct_rate: 0,
            max_connections_per_user: 4,
            max_connections_per_address: 100,
            replay_cap: 50,
            request_timeout_ms: 250,
            idle_timeout_ms: 4321,
            heartbeat_interval_ms: 50,
            failure_timeout_ms: 1000,
            room_idle_ms: 1234,
            bootstrap_expect: 3,
            log_format: LogFormat::Json,
            shutdown_grace_ms: 777,
            retention_messages: 1000,
            retention_age_secs: 86400,
            retention_rooms: BTreeMap::new(),
        }
    }

    fn env_name(key: &str) -> String {
        format!("CHAT_{}", key.to_uppercase().replace('-', "_"))
    }

    #[test]
    fn defaults_without_input_are_the_protocol_defaults() {
        let settings = defaults();
        assert_eq!(settings.name, default_node_name(&[]).unwrap());
        assert_eq!(settings.listen, "127.0.0.1:8080");
        assert_eq!(settings.cluster_listen, None);
        assert!(settings.seeds.is_empty());
        assert_eq!(settings.cookie, None);
        assert_eq!(
            settings.data_dir,
            PathBuf::from(format!("./data/{}", settings.name))
        );
        assert_eq!(settings.auth_secret, None);
        assert_eq!(settings.max_frame_bytes, 65_536);
        assert_eq!(settings.max_text_bytes, 4096);
        assert_eq!(settings.rate_limit, 100);
        assert_eq!(settings.replication_factor, 2);
        assert_eq!(settings.advertised_cluster_addr(), None);
    }

    #[test]
    fn defaults_without_input_match_single_node_apart_from_identity() {
        let single = Settings {
            name: defaults().name,
            listen: defaults::LISTEN.into(),
            data_dir: defaults().data_dir,
            ..Settings::single_node()
        };
        assert_eq!(defaults(), single);
    }

    #[test]
    fn single_node_listens_on_a_free_port_and_wants_a_data_dir() {
        let settings = Settings::single_node();
        assert_eq!(settings.name.as_str(), "n1");
        assert_eq!(settings.listen, "127.0.0.1:0");
        assert_eq!(settings.cluster_listen, None);
        assert_eq!(settings.validate().unwrap_err().key(), "data-dir");
        let with_dir = Settings {
            data_dir: std::env::temp_dir().join("chat-n1"),
            ..settings
        };
        assert_eq!(with_dir.validate(), Ok(()));
    }

    #[test]
    fn flag_beats_env_beats_file_beats_default() {
        let file = TempToml::new(
            "max-frame-bytes = 2000\nmax-text-bytes = 1000\nrate-limit = 7\nreplication-factor = 3\n",
        );
        let env = [
            ("CHAT_CONFIG", file.path()),
            ("CHAT_MAX_FRAME_BYTES", "3000"),
            ("CHAT_MAX_TEXT_BYTES", "1500"),
        ];
        let settings = load_ok(&["--max-frame-bytes", "4000"], &env);
        assert_eq!(settings.max_frame_bytes, 4000, "flag beats env and file");
        assert_eq!(settings.max_text_bytes, 1500, "env beats file");
        assert_eq!(settings.rate_limit, 7, "file beats default");
        assert_eq!(settings.replication_factor, 3, "file beats default");
        assert_eq!(settings.replay_cap, defaults::REPLAY_CAP, "default");
    }

    #[test]
    fn env_var_for_a_setting_given_as_a_flag_loses() {
        let env = [("CHAT_LISTEN", "0.0.0.0:1111"), ("CHAT_NAME", "from-env")];
        let settings = load_ok(&["--listen", "127.0.0.1:2222", "--name", "from-flag"], &env);
        assert_eq!(settings.listen, "127.0.0.1:2222");
        assert_eq!(settings.name.as_str(), "from-flag");
    }

    #[test]
    fn every_setting_works_as_flag_env_var_and_file_key() {
        let keys: Vec<&str> = NON_DEFAULTS.iter().map(|(key, _)| *key).collect();
        let settings: Vec<&str> = KEYS
            .iter()
            .copied()
            .filter(|k| !FILE_KEYS.contains(k))
            .collect();
        assert_eq!(
            keys, settings,
            "NON_DEFAULTS covers every setting but the files, in order"
        );

        let args: Vec<String> = NON_DEFAULTS
            .iter()
            .flat_map(|(key, value)| [format!("--{key}"), value.to_string()])
            .collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        assert_eq!(load_ok(&args, &[]), non_default_settings(), "flags");

        let env: Vec<(String, String)> = NON_DEFAULTS
            .iter()
            .map(|(key, value)| (env_name(key), value.to_string()))
            .collect();
        let settings = Settings::load_from(["chat-node"], &env).unwrap();
        assert_eq!(settings, non_default_settings(), "environment");

        let toml: String = NON_DEFAULTS
            .iter()
            .map(|(key, value)| match value.parse::<u64>() {
                Ok(number) => format!("{key} = {number}\n"),
                Err(_) => format!("{key} = {value:?}\n"),
            })
            .collect();
        let file = TempToml::new(&toml);
        let settings = load_ok(&["--config", file.path()], &[]);
        assert_eq!(settings, non_default_settings(), "file");
    }

    #[test]
    fn every_setting_has_a_long_flag() {
        use clap::CommandFactory as _;
        let command = Cli::command();
        command.clone().debug_assert();
        let mut flags: Vec<&str> = command
            .get_arguments()
            .filter_map(|arg| arg.get_long())
            .filter(|long| !matches!(*long, "help" | "version"))
            .collect();
        flags.sort_unstable();
        let mut expected: Vec<&str> = KEYS.iter().copied().chain(["config"]).collect();
        expected.sort_unstable();
        assert_eq!(flags, expected);
        assert!(command.get_arguments().all(|arg| arg.get_short().is_none()));
    }

    #[test]
    fn toml_file_accepts_kebab_case_and_snake_case_keys() {
        let file = TempToml::new(
            "max-frame-bytes = 2048\nmax_text_bytes = 1024\nlog_format = \"json\"\n\
             heartbeat-interval-ms = 100\n",
        );
        let settings = load_ok(&["--config", file.path()], &[]);
        assert_eq!(settings.max_frame_bytes, 2048);
        assert_eq!(settings.max_text_bytes, 1024);
        assert_eq!(settings.log_format, LogFormat::Json);
        assert_eq!(settings.heartbeat_interval_ms, 100);
    }

    #[test]
    fn unknown_file_key_is_an_error_naming_it() {
        let file = TempToml::new("max-frame-byte = 2048\n");
        let err = settings_error(&["--config", file.path()], &[]);
        assert_eq!(err.key(), "max-frame-byte");
        let message = err.to_string();
        assert!(
            message.contains("unknown key `max-frame-byte`"),
            "{message}"
        );
        assert!(message.contains(file.path()), "{message}");
        assert!(
            message.contains("did you mean `max-frame-bytes`?"),
            "{message}"
        );

        let file = TempToml::new("[cluster]\nseeds = []\n");
        assert_eq!(
            settings_error(&["--config", file.path()], &[]).key(),
            "cluster"
        );
    }

    #[test]
    fn retention_rooms_override_the_node_wide_retention_from_the_file_only() {
        let file = TempToml::new(
            "retention-messages = 500\n\
             [retention-rooms]\n\
             Lobby = { messages = 10 }\n\
             \"audit.log\" = { age-secs = 3600 }\n\
             chat_2 = { messages = 0, age_secs = 60 }\n",
        );
        let settings = load_ok(
            &["--config", file.path()],
            &[("CHAT_RETENTION_AGE_SECS", "7")],
        );
        let policy = settings.retention();
        let room = |name: &str| RoomId::new(name).unwrap();
        let retention = |messages, age_ms| Retention { messages, age_ms };
        assert_eq!(policy.of(&room("Lobby")), retention(10, 7_000));
        assert_eq!(
            policy.of(&room("lobby")),
            retention(500, 7_000),
            "names keep their case"
        );
        assert_eq!(policy.of(&room("audit.log")), retention(500, 3_600_000));
        assert_eq!(policy.of(&room("chat_2")), retention(0, 60_000));
        assert_eq!(policy.of(&room("other")), retention(500, 7_000));
        // A table has no variable form: the variable is refused, not ignored.
        let err = settings_error(&[], &[("CHAT_RETENTION_ROOMS", "lobby=1")]);
        assert_eq!(err.key(), "retention-rooms");
    }

    #[test]
    fn a_bad_retention_rooms_entry_is_an_error_naming_the_key() {
        for toml in [
            "[retention-rooms]\n\"no spaces\" = { messages = 1 }\n",
            "[retention-rooms]\nlobby = { message = 1 }\n",
            "[retention-rooms]\nlobby = 5\n",
            "retention-rooms = 5\n",
            "[retention-rooms]\nlobby = { age-secs = 99999999999 }\n",
        ] {
            let file = TempToml::new(toml);
            let err = settings_error(&["--config", file.path()], &[]);
            assert_eq!(err.key(), "retention-rooms", "{toml}: {err}");
        }
    }

    #[test]
    fn same_key_in_both_cases_is_an_error() {
        let file = TempToml::new("rate-limit = 1\nrate_limit = 2\n");
        let err = settings_error(&["--config", file.path()], &[]);
        assert!(matches!(err, SettingsError::DuplicateKey { ref key, .. } if key == "rate-limit"));
    }

    #[test]
    fn config_flag_beats_chat_config_variable() {
        let from_env = TempToml::new("rate-limit = 1\n");
        let from_flag = TempToml::new("rate-limit = 2\n");
        let env = [("CHAT_CONFIG", from_env.path())];
        assert_eq!(load_ok(&[], &env).rate_limit, 1);
        assert_eq!(load_ok(&["--config", from_flag.path()], &env).rate_limit, 2);
    }

    #[test]
    fn missing_or_malformed_config_file_is_an_error() {
        let missing = std::env::temp_dir().join("chat-settings-test-does-not-exist.toml");
        let err = load(&["--config", missing.to_str().unwrap()], &[]).unwrap_err();
        assert!(format!("{err:#}").contains("does not exist"), "{err:#}");

        let file = TempToml::new("max-frame-bytes = = 3\n");
        let err = load(&["--config", file.path()], &[]).unwrap_err();
        assert!(format!("{err:#}").contains(file.path()), "{err:#}");
    }

    #[test]
    fn mistyped_values_name_their_key() {
        let err = load(&[], &[("CHAT_MAX_FRAME_BYTES", "lots")]).unwrap_err();
        assert!(format!("{err:#}").contains("`max-frame-bytes`"), "{err:#}");

        let file = TempToml::new("replay-cap = -1\n");
        let err = load(&["--config", file.path()], &[]).unwrap_err();
        assert!(format!("{err:#}").contains("`replay-cap`"), "{err:#}");

        let err = load(&["--log-format", "xml"], &[]).unwrap_err();
        assert!(format!("{err:#}").contains("--log-format"), "{err:#}");
    }

    #[test]
    fn unknown_chat_variables_are_ignored() {
        let env = [
            ("CHAT_NO_SUCH_SETTING", "1"),
            ("CHAT_", "x"),
            ("chat_rate_limit", "5"),
            ("PATH", "/bin"),
        ];
        assert_eq!(load_ok(&[], &env), defaults());
    }

    #[test]
    fn empty_env_var_counts_as_unset() {
        let file = TempToml::new("rate-limit = 9\n");
        let env = [("CHAT_CONFIG", file.path()), ("CHAT_RATE_LIMIT", "")];
        assert_eq!(load_ok(&[], &env).rate_limit, 9);
        assert_eq!(load_ok(&[], &[("CHAT_CONFIG", "")]), defaults());
    }

    #[test]
    fn seeds_parse_from_a_comma_list_with_spaces_trimmed() {
        let expected = vec!["a:1".to_owned(), "b:2".to_owned()];
        assert_eq!(load_ok(&["--seeds", "a:1, b:2"], &[]).seeds, expected);
        assert_eq!(
            load_ok(&[], &[("CHAT_SEEDS", " a:1 ,b:2, ")]).seeds,
            expected
        );
        let array = TempToml::new("seeds = [\"a:1\", \" b:2\"]\n");
        assert_eq!(load_ok(&["--config", array.path()], &[]).seeds, expected);
        let string = TempToml::new("seeds = \"a:1,b:2\"\n");
        assert_eq!(load_ok(&["--config", string.path()], &[]).seeds, expected);
        let env = [("CHAT_SEEDS", "a:1")];
        assert!(load_ok(&["--seeds", ""], &env).seeds.is_empty());
    }

    #[test]
    fn cookie_is_required_with_cluster_listen() {
        let err = settings_error(&["--cluster-listen", "0.0.0.0:7000"], &[]);
        assert_eq!(
            err.to_string(),
            "`cookie` is required when `cluster-listen` is set"
        );
        assert_eq!(err.key(), "cookie");
        let env = [("CHAT_COOKIE", "sesame-sesame-sesame")];
        assert!(load(&["--cluster-listen", "0.0.0.0:7000"], &env).is_ok());
    }

    #[test]
    fn the_cluster_tls_files_come_together_and_only_in_cluster_mode() {
        let cluster = [
            "--cluster-listen",
            "127.0.0.1:7000",
            "--cookie",
            "sixteen-bytes-xx",
        ];
        let tls = [
            "--cluster-tls-cert",
            "n.pem",
            "--cluster-tls-key",
            "n.key",
            "--cluster-tls-ca",
            "ca.pem",
        ];
        let err = settings_error(&[&cluster[..], &tls[..4]].concat(), &[]);
        assert_eq!(err.key(), "cluster-tls-ca");
        let err = settings_error(&tls, &[]);
        assert_eq!(err.key(), "cluster-listen");
        let settings = load_ok(&[&cluster[..], &tls[..]].concat(), &[]);
        let (cert, key, ca) = settings.cluster_tls().unwrap();
        assert_eq!(
            (cert, key, ca),
            (Path::new("n.pem"), Path::new("n.key"), Path::new("ca.pem"))
        );
        assert!(load_ok(&cluster, &[]).cluster_tls().is_none());
    }

    #[test]
    fn a_cookie_shorter_than_16_bytes_is_refused() {
        let err = settings_error(&["--cookie", "fifteen-bytes-x"], &[]);
        assert_eq!(err.key(), "cookie");
        assert!(err.to_string().contains("at least 16 bytes"), "{err}");
        assert!(load(&["--cookie", "sixteen-bytes-xx"], &[]).is_ok());
    }

    #[test]
    fn secrets_are_read_from_files_without_the_line_break_and_never_twice() {
        let cookie = TempToml::new("cookie-from-a-secret-file\n");
        let auth = TempToml::new("auth-from-a-file");
        let settings = load_ok(
            &[
                "--cookie-file",
                cookie.path(),
                "--auth-secret-file",
                auth.path(),
            ],
            &[],
        );
        assert_eq!(
            settings.cookie.as_deref(),
            Some("cookie-from-a-secret-file")
        );
        assert_eq!(settings.auth_secret.as_deref(), Some("auth-from-a-file"));
        let env = [("CHAT_COOKIE_FILE", cookie.path())];
        assert_eq!(
            load_ok(&[], &env).cookie.as_deref(),
            Some("cookie-from-a-secret-file")
        );
        let both = settings_error(
            &[
                "--cookie",
                "sixteen-bytes-xx",
                "--cookie-file",
                cookie.path(),
            ],
            &[],
        );
        assert_eq!(both.key(), "cookie-file");
        let missing = settings_error(&["--auth-secret-file", "/nonexistent/secret"], &[]);
        assert_eq!(missing.key(), "auth-secret-file");
        assert!(
            missing.to_string().contains("/nonexistent/secret"),
            "{missing}"
        );
        let short = TempToml::new("short\n");
        assert_eq!(
            settings_error(&["--cookie-file", short.path()], &[]).key(),
            "cookie"
        );
    }

    #[test]
    fn max_text_bytes_above_max_frame_bytes_is_refused() {
        let err = settings_error(&["--max-text-bytes", "65537"], &[]);
        assert_eq!(
            err.to_string(),
            "invalid value for `max-text-bytes`: must be at most `max-frame-bytes` (65536)"
        );
        assert!(load(&["--max-text-bytes", "65536"], &[]).is_ok());
    }

    #[test]
    fn bad_node_name_is_refused() {
        let err = settings_error(&["--name", "my node"], &[]);
        assert_eq!(err.key(), "name");
        assert!(
            err.to_string().starts_with("invalid value for `name`: "),
            "{err}"
        );
        assert_eq!(settings_error(&[], &[("CHAT_NAME", "a/b")]).key(), "name");
        assert_eq!(settings_error(&["--name", ".."], &[]).key(), "name");
    }

    #[test]
    fn seeds_without_port_are_refused() {
        let err = settings_error(&["--seeds", "n1:7000,n2"], &[]);
        assert_eq!(err.key(), "seeds");
        assert!(err.to_string().contains("`n2`"), "{err}");
        assert_eq!(settings_error(&["--seeds", "n1:0"], &[]).key(), "seeds");
        assert_eq!(settings_error(&["--seeds", "n1:70000"], &[]).key(), "seeds");
    }

    #[test]
    fn replication_factor_must_be_one_to_five() {
        let err = settings_error(&["--replication-factor", "0"], &[]);
        assert_eq!(
            err.to_string(),
            "invalid value for `replication-factor`: must be at least 1 (got 0)"
        );
        assert_eq!(
            settings_error(&["--replication-factor", "6"], &[]).key(),
            "replication-factor"
        );
        assert!(load(&["--replication-factor", "5"], &[]).is_ok());
    }

    #[test]
    fn failure_timeout_must_exceed_five_heartbeats() {
        let err = settings_error(
            &[
                "--heartbeat-interval-ms",
                "500",
                "--failure-timeout-ms",
                "2500",
            ],
            &[],
        );
        assert_eq!(err.key(), "failure-timeout-ms");
        assert!(
            err.to_string()
                .contains("times `heartbeat-interval-ms`, i.e. more than 2500"),
            "{err}"
        );
        let ok = [
            "--heartbeat-interval-ms",
            "500",
            "--failure-timeout-ms",
            "2501",
        ];
        assert!(load(&ok, &[]).is_ok());
    }

    #[test]
    fn every_validation_error_names_its_key() {
        let cases: &[(&[&str], &str)] = &[
            (&["--listen", "8080"], "listen"),
            (&["--listen", "localhost"], "listen"),
            (&["--listen", "::1:8080"], "listen"),
            (
                &["--cluster-listen", "0.0.0.0", "--cookie", "c"],
                "cluster-listen",
            ),
            (
                &["--cluster-listen", "127.0.0.1:8080", "--cookie", "c"],
                "cluster-listen",
            ),
            (
                &["--cluster-listen", "0.0.0.0:7000", "--cookie", ""],
                "cookie",
            ),
            (&["--auth-secret", ""], "auth-secret"),
            (&["--data-dir", ""], "data-dir"),
            (&["--advertise", "0.0.0.0:7000"], "advertise"),
            (&["--advertise", "n1"], "advertise"),
            (&["--public-url", "localhost:8081"], "public-url"),
            (&["--max-frame-bytes", "1023"], "max-frame-bytes"),
            (&["--max-text-bytes", "0"], "max-text-bytes"),
            (&["--client-queue", "15"], "client-queue"),
            (&["--client-queue-bytes", "65535"], "client-queue-bytes"),
            (
                &["--max-rooms-per-connection", "0"],
                "max-rooms-per-connection",
            ),
            (
                &["--max-connections-per-user", "0"],
                "max-connections-per-user",
            ),
            (
                &["--max-connections-per-address", "0"],
                "max-connections-per-address",
            ),
            (&["--replay-cap", "0"], "replay-cap"),
            (&["--replay-cap", "100001"], "replay-cap"),
            (&["--request-timeout-ms", "99"], "request-timeout-ms"),
            (&["--idle-timeout-ms", "999"], "idle-timeout-ms"),
            (&["--heartbeat-interval-ms", "9"], "heartbeat-interval-ms"),
            (&["--failure-timeout-ms", "1000"], "failure-timeout-ms"),
            (&["--bootstrap-expect", "0"], "bootstrap-expect"),
        ];
        for (args, key) in cases {
            let err = settings_error(args, &[]);
            assert_eq!(err.key(), *key, "{args:?}: {err}");
            assert!(
                err.to_string().contains(&format!("`{key}`")),
                "{args:?}: {err}"
            );
        }
    }

    #[test]
    fn debug_hides_secrets() {
        let settings = Settings {
            cookie: Some("cookie-value".into()),
            auth_secret: Some("secret-value".into()),
            ..Settings::single_node()
        };
        let debug = format!("{settings:?}");
        assert!(!debug.contains("cookie-value"), "{debug}");
        assert!(!debug.contains("secret-value"), "{debug}");
        assert!(debug.contains(r#"cookie: Some("***")"#), "{debug}");
        assert!(debug.contains(r#"auth_secret: Some("***")"#), "{debug}");
        assert!(format!("{:?}", Settings::single_node()).contains("cookie: None"));
    }

    #[test]
    fn advertised_address_replaces_a_wildcard_host_with_the_name() {
        let mut settings = Settings {
            cluster_listen: Some("0.0.0.0:7000".into()),
            ..Settings::single_node()
        };
        assert_eq!(
            settings.advertised_cluster_addr().as_deref(),
            Some("n1:7000")
        );
        settings.cluster_listen = Some("[::]:7000".into());
        assert_eq!(
            settings.advertised_cluster_addr().as_deref(),
            Some("n1:7000")
        );
        settings.cluster_listen = Some("10.0.0.5:7000".into());
        assert_eq!(
            settings.advertised_cluster_addr().as_deref(),
            Some("10.0.0.5:7000")
        );
        settings.advertise = Some("chat-1.example:7000".into());
        assert_eq!(
            settings.advertised_cluster_addr().as_deref(),
            Some("chat-1.example:7000")
        );
        assert_eq!(Settings::single_node().advertised_cluster_addr(), None);
    }

    #[test]
    fn host_names_are_sanitized_into_node_names() {
        assert_eq!(
            sanitize_node_name("chat-1.example.com"),
            "chat-1.example.com"
        );
        assert_eq!(sanitize_node_name("my host/é"), "my-host--");
        assert_eq!(sanitize_node_name(""), "node");
        assert_eq!(sanitize_node_name(".."), "node");
        assert_eq!(
            sanitize_node_name(&"h".repeat(100)).len(),
            NodeName::MAX_LEN
        );
        assert!(NodeName::new(&sanitize_node_name("weird host!")).is_ok());
    }

    #[test]
    fn host_port_accepts_names_ipv4_and_bracketed_ipv6() {
        assert_eq!(split_host_port("n1:7000"), Some(("n1", 7000)));
        assert_eq!(split_host_port("10.0.0.5:0"), Some(("10.0.0.5", 0)));
        assert_eq!(split_host_port("[::1]:80"), Some(("[::1]", 80)));
        for bad in [
            "n1", "n1:", ":80", "::1:80", "n1:+80", "n1:65536", "a b:1", "[zz]:1",
        ] {
            assert_eq!(split_host_port(bad), None, "{bad}");
        }
        assert!(is_wildcard("0.0.0.0") && is_wildcard("[::]"));
        assert!(!is_wildcard("127.0.0.1") && !is_wildcard("n1"));
    }

    #[test]
    fn help_and_version_come_back_as_clap_errors() {
        for flag in ["--help", "--version"] {
            let err = load(&[flag], &[]).unwrap_err();
            assert!(err.downcast_ref::<clap::Error>().is_some(), "{flag}");
        }
    }

    const DEFAULT_TOML: &str = include_str!("../../deploy/config/default.toml");

    /// Keys whose `# key = value` line in default.toml is an example, not the default.
    const EXAMPLE_ONLY: &[&str] = &[
        "name",
        "cluster-listen",
        "cookie",
        "cookie-file",
        "data-dir",
        "auth-secret",
        "auth-secret-file",
        "advertise",
        "public-url",
        "cluster-tls-cert",
        "cluster-tls-key",
        "cluster-tls-ca",
    ];

    /// The `# key = value` line of every setting in default.toml, uncommented.
    fn default_toml_lines() -> Vec<(&'static str, String)> {
        KEYS.iter()
            .map(|key| {
                let prefix = format!("# {key} = ");
                let lines: Vec<&str> = DEFAULT_TOML
                    .lines()
                    .filter(|line| line.starts_with(&prefix))
                    .collect();
                assert_eq!(lines.len(), 1, "default.toml shows `{key}` once: {lines:?}");
                (*key, lines[0].trim_start_matches("# ").to_owned())
            })
            .collect()
    }

    #[test]
    fn default_toml_changes_nothing() {
        let file = TempToml::new(DEFAULT_TOML);
        assert_eq!(load_ok(&["--config", file.path()], &[]), defaults());
    }

    #[test]
    fn default_toml_shows_every_default() {
        let defaults_only: String = default_toml_lines()
            .into_iter()
            .filter(|(key, _)| !EXAMPLE_ONLY.contains(key))
            .map(|(_, line)| line + "\n")
            .collect();
        let file = TempToml::new(&defaults_only);
        assert_eq!(load_ok(&["--config", file.path()], &[]), defaults());
    }

    #[test]
    fn default_toml_examples_are_valid() {
        // The `*-file` examples name secrets of a deployment, which a test cannot read.
        let every_line: String = default_toml_lines()
            .into_iter()
            .filter(|(key, _)| !FILE_KEYS.contains(key))
            .map(|(_, line)| line + "\n")
            .collect();
        let file = TempToml::new(&every_line);
        let settings = load_ok(&["--config", file.path()], &[]);
        assert!(settings.cluster_listen.is_some() && settings.public_url.is_some());
    }
}
