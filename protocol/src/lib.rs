//! Wire types of the chat cluster.
//!
//! - [`ids`]: validated identifiers (`UserName`, `RoomId`, `NodeName`).
//! - [`client`]: the JSON frames between clients and nodes (`docs/protocol.md`).
//! - [`peer`]: the messages between nodes.
//! - [`codec`]: the one binary encoding of node-to-node messages.

pub mod client;
pub mod codec;
pub mod ids;
pub mod peer;

pub use client::{ErrorCode, PresenceEvent};
pub use ids::{InvalidId, NodeName, RoomId, UserName};
