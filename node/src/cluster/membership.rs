//! Membership and failure detection over UDP heartbeats (filled in with cluster mode).
