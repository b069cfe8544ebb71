//! The process's open-files limit, which bounds the client connections a node can hold.
//!
//! At start the node raises its soft limit to the hard one ([`raise_limit`]); `max-connections`
//! then defaults to that limit minus [`RESERVE`], and an explicit value above it is lowered, so
//! that past its limit the node refuses connections with HTTP 503 instead of failing to accept
//! them.

/// File descriptors kept free beyond client connections: peer links, the store, listeners, the
/// runtime, and the plain HTTP connections (health checks, metrics) accepted past the limit.
pub const RESERVE: usize = 512;

/// Raises the soft open-files limit to the hard limit; returns the limit now in force.
pub fn raise_limit() -> Option<usize> {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => usize::try_from(limit).ok(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot raise the open-files limit");
            open_files_limit()
        }
    }
}

/// The client connections to serve: `configured` (0 means as many as the open-files limit
/// allows), never more than the limit minus [`RESERVE`].
pub fn connection_limit(configured: usize, open_files: Option<usize>) -> usize {
    let Some(open_files) = open_files else {
        return if configured == 0 {
            DEFAULT_WITHOUT_LIMIT
        } else {
            configured
        };
    };
    let usable = open_files.saturating_sub(RESERVE).max(1);
    if configured == 0 {
        usable
    } else if configured > usable {
        tracing::warn!(
            max_connections = configured,
            open_files_limit = open_files,
            using = usable,
            "max-connections lowered to fit the open-files limit"
        );
        usable
    } else {
        configured
    }
}

/// The connection limit when the open-files limit cannot be read.
const DEFAULT_WITHOUT_LIMIT: usize = 10_000;

/// The soft limit on open files, from /proc/self/limits.
pub fn open_files_limit() -> Option<usize> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    match line.split_whitespace().nth(3)? {
        "unlimited" => Some(usize::MAX),
        n => n.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_follows_the_open_files_limit() {
        assert_eq!(connection_limit(0, Some(20_000)), 20_000 - RESERVE);
        assert_eq!(connection_limit(0, Some(100)), 1);
        assert_eq!(connection_limit(0, None), DEFAULT_WITHOUT_LIMIT);
    }

    #[test]
    fn an_explicit_limit_is_kept_unless_the_files_do_not_allow_it() {
        assert_eq!(connection_limit(2, Some(20_000)), 2);
        assert_eq!(connection_limit(50_000, Some(20_000)), 20_000 - RESERVE);
        assert_eq!(connection_limit(50_000, None), 50_000);
    }

    #[test]
    fn the_limit_of_this_process_is_readable() {
        assert!(open_files_limit().is_some_and(|n| n > 0));
    }
}
