//! The gateway: HTTP and WebSocket on one port, one Session actor per connection.
//!
//! ```text
//!  TCP accept ─> hyper (http) ─┬─ GET /, /healthz, /metrics, /cluster…  (answered in place)
//!                              └─ GET /ws ─> 101 ─> Session actor (child of Sessions)
//!                                                 ├─ reader task ─> Session mailbox (≤ 32 frames)
//!                                                 └─ writer task <─ Outbox (bounded) <─ Hub, Session
//! ```
//!
//! - [`http`]: the server, routing, upgrade, connection limits.
//! - [`session`]: the Session actor.
//! - [`sessions`]: the supervisor of sessions and its policy.
//! - [`socket`]: the reader and writer tasks of a connection.
//! - [`outbox`]: the bounded queue towards a client, and the close codes.
//! - [`auth`]: HS256 token verification.
//! - [`rate`]: the per-connection token bucket.

pub mod admission;
pub mod auth;
pub mod http;
pub mod outbox;
pub mod rate;
pub mod session;
pub mod sessions;
pub mod socket;
