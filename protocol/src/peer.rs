//! Node-to-node messages. Only these types cross nodes; `codec` is their one encoding.
//!
//! Messages are typed by the part of the receiving node that handles them: [`ToRooms`] (the
//! rooms it owns; [`ToRoom`] for one room's actor), [`ToKeeper`] (its copies of room logs:
//! promises, appends, fetches), [`ToHub`] (replies and events for its connections) and
//! [`ToDirectory`] (where users are connected); [`Heartbeat`]s go to the membership service,
//! over UDP. A receiver routes with one match and each part matches only its own messages.

use serde::{Deserialize, Serialize};

use crate::client::{ErrorCode, PresenceEvent};
use crate::ids::{NodeName, RoomId, UserName};

/// A connection id, unique on its node.
pub type SessionId = u64;

/// A room's ownership epoch. A node promises each epoch to at most one claimer, and accepts log
/// writes only for the epoch it promised last, which fences owners that lost the room.
pub type Epoch = u64;

/// Where a request came from, so that its reply can find the way back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Origin {
    /// The node holding the requesting connection.
    pub node: NodeName,
    /// The request's id, unique on that node.
    pub req: u64,
}

/// One stored chat message: an entry of a room's replicated log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Position in the room, from 1, contiguous.
    pub seq: u64,
    /// The ownership epoch under which the entry was first written.
    pub epoch: Epoch,
    /// The sender.
    pub from: UserName,
    /// The text.
    pub text: String,
    /// Milliseconds since the Unix epoch when the owner sequenced it.
    pub ts: u64,
    /// The sender's client message id, for deduplicating retried sends.
    pub client_id: Option<String>,
}

/// Which nodes hold a room's log for one epoch: the owner first, then the replicas.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Placement {
    /// The epoch this placement belongs to.
    pub epoch: Epoch,
    /// The owner, then the replicas, in ring order.
    pub nodes: Vec<NodeName>,
}

/// A stretch of a log written under one epoch: entries from `first_seq` up to the next run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Run {
    /// The epoch of every entry in the run.
    pub epoch: Epoch,
    /// The first sequence number of the run.
    pub first_seq: u64,
}

/// What a node holds of a room's log: its answer to a promise request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LogState {
    /// The highest epoch promised.
    pub promised: Epoch,
    /// The last sequence number stored.
    pub last_seq: u64,
    /// The epochs of the stored entries, as runs, ascending.
    pub runs: Vec<Run>,
    /// The placement of the latest epoch this node accepted, if any.
    pub placement: Option<Placement>,
    /// The epoch of the owner that last brought this copy up to date: the copy is a prefix of
    /// that owner's log holding at least the log the owner adopted when it claimed the room
    /// (0: never). Claims adopt the copy with the highest `synced`, then the longest.
    pub synced: Epoch,
}

/// What a log keeper did with an append.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AppendOutcome {
    /// Stored durably: the copy is the owner's log up to `last_seq`.
    Stored {
        /// The copy's last sequence number.
        last_seq: u64,
    },
    /// Refused: the node promised a newer epoch; the writer lost the room.
    Fenced {
        /// The promised epoch.
        promised: Epoch,
    },
    /// Refused: the node has not promised this epoch (it lost its promise with its disk): the
    /// owner must claim again.
    NotPromised {
        /// The promised epoch.
        promised: Epoch,
    },
    /// Refused: the entries do not follow the copy; the copy is described so that the owner can
    /// resend from where the two agree.
    Diverged {
        /// The copy.
        state: LogState,
    },
    /// Not stored: the node cannot write to its disk (full, or failing). The owner answers the
    /// sends waiting on it `unavailable` at once and sends again later. (Added last, so the
    /// other outcomes keep their bytes; a node from before it fails to decode it and drops it,
    /// which is what it did with a failed write before.)
    Unwritable,
    /// Recorded durably: the copy holds the horizon `horizon` (what a [`ToKeeper::Trim`] asked,
    /// or more). (Added last: only owners with retention send `Trim`.)
    Trimmed {
        /// The copy's horizon.
        horizon: u64,
    },
}

/// How much of a room's log retention dropped, as a copy records it (the default: nothing).
///
/// Entries with `seq < horizon` are gone for every client: the owner that declared the horizon
/// made sure every node of its placement recorded it before serving it, and a new owner adopts the
/// highest horizon its claim hears of. Entries with `seq < compacted` are deleted from the copy's
/// store; `compacted <= horizon`, and `compacted` is only ever a horizon already served.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Horizon {
    /// The smallest seq still served (0 and 1: nothing dropped).
    pub horizon: u64,
    /// The smallest seq the copy still stores.
    pub compacted: u64,
}

/// A request to the owner of a room, from a connection on `origin.node`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RoomOp {
    /// Adds a connection to the room and replays `(since, latest]`.
    Join {
        /// The connection.
        session: SessionId,
        /// Its user.
        user: UserName,
        /// Replay messages after this sequence number.
        since: Option<u64>,
    },
    /// Removes a connection from the room.
    Leave {
        /// The connection.
        session: SessionId,
        /// Its user.
        user: UserName,
    },
    /// Sequences, stores and fans out a message.
    Publish {
        /// The sender.
        user: UserName,
        /// The text.
        text: String,
        /// The sender's message id, for deduplication.
        client_id: Option<String>,
    },
    /// Reads stored messages with `seq < before`, the newest `limit`.
    GetHistory {
        /// Upper bound, exclusive.
        before: Option<u64>,
        /// At most this many.
        limit: u32,
    },
    /// Lists the users in the room.
    GetMembers,
}

impl RoomOp {
    /// The operation's name, for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            RoomOp::Join { .. } => "join",
            RoomOp::Leave { .. } => "leave",
            RoomOp::Publish { .. } => "send",
            RoomOp::GetHistory { .. } => "history",
            RoomOp::GetMembers => "who",
        }
    }
}

/// The reply to a request, addressed to the origin node's hub.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    /// The connection joined; `replay` holds the messages after `since`, oldest first.
    Joined {
        /// The room.
        room: RoomId,
        /// The room's latest sequence number at the join.
        seq: u64,
        /// The replayed messages.
        replay: Vec<Entry>,
    },
    /// The connection left.
    Left {
        /// The room.
        room: RoomId,
    },
    /// The message is stored (replicated) with this sequence number.
    Acked {
        /// The room.
        room: RoomId,
        /// Its sequence number.
        seq: u64,
    },
    /// Stored messages, oldest first.
    History {
        /// The room.
        room: RoomId,
        /// The messages.
        messages: Vec<Entry>,
    },
    /// The users in the room, sorted, each once.
    Members {
        /// The room.
        room: RoomId,
        /// The users.
        users: Vec<UserName>,
    },
    /// The direct message was handed to every node where the addressee is connected.
    DirectSent,
    /// The request failed.
    Failed {
        /// The stable code.
        code: ErrorCode,
        /// Human-readable detail.
        message: String,
    },
    /// [`Reply::Joined`] for a join whose `since` reached below the room's horizon: the messages
    /// after `since` and before `horizon` were dropped by retention. (Added last; sent only then.)
    JoinedBelowHorizon {
        /// The room.
        room: RoomId,
        /// The room's latest sequence number at the join.
        seq: u64,
        /// The replayed messages (none below `horizon`).
        replay: Vec<Entry>,
        /// The smallest seq still kept.
        horizon: u64,
    },
    /// [`Reply::History`] for a request that reached below the room's horizon. (Added last; sent
    /// only then.)
    HistoryBelowHorizon {
        /// The room.
        room: RoomId,
        /// The messages (none below `horizon`).
        messages: Vec<Entry>,
        /// The smallest seq still kept.
        horizon: u64,
    },
}

impl Reply {
    /// A reply below a room's horizon as the plain reply and the horizon (`None` for every
    /// other reply, returned as it is).
    pub fn split_horizon(self) -> (Reply, Option<u64>) {
        match self {
            Reply::JoinedBelowHorizon {
                room,
                seq,
                replay,
                horizon,
            } => (Reply::Joined { room, seq, replay }, Some(horizon)),
            Reply::HistoryBelowHorizon {
                room,
                messages,
                horizon,
            } => (Reply::History { room, messages }, Some(horizon)),
            reply => (reply, None),
        }
    }
}

/// What travels between two nodes' routers: a message and its sender.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// The sending node.
    pub from: NodeName,
    /// The message.
    pub message: PeerMessage,
}

/// A message from one node to another, typed by the part of the receiver that handles it: the
/// receiving node hands each variant's content to that part and to no other.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerMessage {
    /// For the receiver's rooms (its room host, which owns the room actors).
    Rooms(ToRooms),
    /// For the receiver's log keeper (its copies of room logs).
    Keeper(ToKeeper),
    /// For the receiver's hub (its client connections).
    Hub(ToHub),
    /// For the receiver's directory (where the users homed there are connected).
    Directory(ToDirectory),
    /// Flow control of the link itself: the receiver processed this many more bytes of what it
    /// was sent.
    Credit {
        /// The processed bytes since the last credit.
        bytes: u64,
    },
}

impl PeerMessage {
    /// The message's name, for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            PeerMessage::Rooms(m) => m.kind(),
            PeerMessage::Keeper(m) => m.kind(),
            PeerMessage::Hub(m) => m.kind(),
            PeerMessage::Directory(m) => m.kind(),
            PeerMessage::Credit { .. } => "credit",
        }
    }
}

/// Messages for the rooms of the receiving node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToRooms {
    /// For the actor of one room, which the receiver owns (or is about to own).
    Room {
        /// The room.
        room: RoomId,
        /// The message.
        message: ToRoom,
    },
    /// Rooms the receiver owns under the current placement and should take over now.
    Activate {
        /// The rooms.
        rooms: Vec<RoomId>,
    },
    /// The sender's hub (re)started empty: every connection it had is gone.
    SessionsReset {
        /// The sending node.
        node: NodeName,
    },
}

impl ToRooms {
    /// The message's name, for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            ToRooms::Room { message, .. } => message.kind(),
            ToRooms::Activate { .. } => "activate",
            ToRooms::SessionsReset { .. } => "sessions_reset",
        }
    }
}

/// Messages for the owner of one room.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToRoom {
    /// A connection's request.
    Request {
        /// Where to send the reply.
        origin: Origin,
        /// What is asked.
        op: RoomOp,
        /// How many times the request was forwarded (a stale view forwards at most once).
        hops: u8,
    },
    /// The sender's connections in the room, sent when the room's owner changed or the sender
    /// missed messages: the owner replaces the sender's members with these and re-sends every
    /// message after `cursor` (from its horizon on, announced first with [`ToHub::Horizon`], when
    /// retention dropped some of them).
    Subscribe {
        /// The sending node.
        node: NodeName,
        /// The last sequence number the sender delivered.
        cursor: u64,
        /// The sender's connections in the room.
        sessions: Vec<(SessionId, UserName)>,
    },
    /// A log keeper's answer to [`ToKeeper::Promise`].
    Promised {
        /// The epoch that was asked for.
        epoch: Epoch,
        /// Whether the promise was given (false: a higher epoch was promised before).
        granted: bool,
        /// The answering node.
        node: NodeName,
        /// The answering node's copy; its `placement` is the one it recorded before this promise
        /// (the latest it heard of).
        state: LogState,
        /// The answering node lost its disk and has not been brought up to date for this room
        /// since: its copy may lack what it once acknowledged.
        recovering: bool,
    },
    /// A log keeper's answer to [`ToKeeper::Append`] (once the entries are durable when they
    /// were stored).
    Appended {
        /// The epoch of the append.
        epoch: Epoch,
        /// The answering node.
        node: NodeName,
        /// What became of it.
        outcome: AppendOutcome,
    },
    /// A log keeper's answer to [`ToKeeper::Fetch`]: a prefix of the wanted range (empty when
    /// nothing is held).
    Fetched {
        /// The answering node.
        node: NodeName,
        /// The entries, ascending.
        entries: Vec<Entry>,
    },
    /// [`ToRoom::Promised`] from a copy that retention trimmed: the same, with the copy's
    /// horizon. (Added last; a copy that never trimmed answers `Promised`.)
    PromisedTrimmed {
        /// The epoch that was asked for.
        epoch: Epoch,
        /// Whether the promise was given.
        granted: bool,
        /// The answering node.
        node: NodeName,
        /// The answering node's copy (as in `Promised`).
        state: LogState,
        /// The answering node lost its disk and was not synced for this room since.
        recovering: bool,
        /// What retention dropped from the copy.
        horizon: Horizon,
    },
}

impl ToRoom {
    /// The message's name, for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            ToRoom::Request { .. } => "room",
            ToRoom::Subscribe { .. } => "subscribe",
            ToRoom::Promised { .. } => "promised",
            ToRoom::Appended { .. } => "appended",
            ToRoom::Fetched { .. } => "fetched",
            ToRoom::PromisedTrimmed { .. } => "promised",
        }
    }
}

/// Messages for the log keeper of a node holding (or about to hold) a copy of a room's log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToKeeper {
    /// A claimer asks the receiver to promise `epoch` for `room` and to report its log.
    Promise {
        /// The room.
        room: RoomId,
        /// The claimed epoch.
        epoch: Epoch,
        /// The placement the claimer will use.
        placement: Placement,
    },
    /// The owner of `epoch` writes entries. The receiver accepts only the epoch it promised,
    /// and only when its entry at `after_seq` is the owner's (same epoch: the log matching
    /// check); it then stores `entries` (which start at `after_seq + 1`), keeps what it holds
    /// beyond them as long as it matches the owner's log (`owner_runs`), and drops the rest.
    Append {
        /// The room.
        room: RoomId,
        /// The writer's epoch.
        epoch: Epoch,
        /// The placement of that epoch.
        placement: Placement,
        /// The entries follow this sequence number.
        after_seq: u64,
        /// The epoch of the owner's entry at `after_seq` (0 when `after_seq` is 0).
        after_epoch: Epoch,
        /// The entries.
        entries: Vec<Entry>,
        /// The owner's last sequence number.
        owner_last_seq: u64,
        /// The epochs of the owner's entries after `after_seq`, as runs.
        owner_runs: Vec<Run>,
        /// The owner's log when it claimed the room: a copy holding this much of the owner's log
        /// is synced with the owner's epoch.
        adopted: u64,
    },
    /// Asks for the entries `from_seq..=to_seq` of a room (in bounded chunks).
    Fetch {
        /// The room.
        room: RoomId,
        /// Where to send the entries.
        from: NodeName,
        /// The first wanted sequence number.
        from_seq: u64,
        /// The last wanted sequence number.
        to_seq: u64,
    },
    /// The owner of `epoch` declares the room's horizon (retention): the receiver records
    /// `horizon` and deletes its entries below `compacted`. A copy that does not hold the owner's
    /// log up to `compacted - 1` (it lacks it, or diverges: `runs` are the owner's up to there)
    /// takes the owner's log up to there, without entries, and drops what it holds above: the
    /// owner can no longer send those entries. (Added last: only owners with retention send it.)
    Trim {
        /// The room.
        room: RoomId,
        /// The writer's epoch.
        epoch: Epoch,
        /// The writer (where the answer goes).
        owner: NodeName,
        /// The horizon to record, and the deletion point.
        horizon: Horizon,
        /// The epochs of the owner's entries before `horizon.compacted`, as runs.
        runs: Vec<Run>,
    },
}

impl ToKeeper {
    /// The message's name, for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            ToKeeper::Promise { .. } => "promise",
            ToKeeper::Append { .. } => "append",
            ToKeeper::Fetch { .. } => "fetch",
            ToKeeper::Trim { .. } => "trim",
        }
    }

    /// The room the message is about.
    pub fn room(&self) -> &RoomId {
        match self {
            ToKeeper::Promise { room, .. }
            | ToKeeper::Append { room, .. }
            | ToKeeper::Fetch { room, .. }
            | ToKeeper::Trim { room, .. } => room,
        }
    }
}

/// Messages for the hub of a node with connections.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToHub {
    /// The reply to request `req` of the receiver.
    Reply {
        /// The request id from `Origin::req`.
        req: u64,
        /// The outcome.
        reply: Reply,
    },
    /// Sequenced messages of a room, contiguous and ascending, for the receiver's members.
    Fanout {
        /// The room.
        room: RoomId,
        /// The messages.
        entries: Vec<Entry>,
    },
    /// A presence change in a room, for the receiver's members.
    Presence {
        /// The room.
        room: RoomId,
        /// The user.
        user: UserName,
        /// Join or leave.
        event: PresenceEvent,
    },
    /// A direct message for every connection of `to` on the receiver.
    DeliverDirect {
        /// The addressee.
        to: UserName,
        /// The sender.
        from: UserName,
        /// The text.
        text: String,
        /// Milliseconds since the Unix epoch.
        ts: u64,
    },
    /// The sender now serves `room` (after a claim): nodes with members in it subscribe again.
    RoomActive {
        /// The room.
        room: RoomId,
        /// Its owner.
        owner: NodeName,
    },
    /// The sender's directory (re)started empty: announce the users whose home it is.
    Reannounce {
        /// The sending node.
        node: NodeName,
    },
    /// The answer to a [`ToRoom::Subscribe`] whose cursor was below `horizon - 1`: the room's
    /// messages before `horizon` were dropped by retention, and the re-sent ones (the fan-outs
    /// that follow) start at it. (Added last; sent only then.)
    Horizon {
        /// The room.
        room: RoomId,
        /// The smallest seq still kept.
        horizon: u64,
    },
    /// Follows the fan-outs that answered a [`ToRoom::Subscribe`] when they could not hold
    /// everything after the cursor (a node far behind; a part is about [`CATCH_UP_BYTES`]):
    /// subscribe again, with the cursor they moved, for the next part, once the connections
    /// have room for it. (Added last.)
    Behind {
        /// The room.
        room: RoomId,
    },
}

impl ToHub {
    /// The message's name, for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            ToHub::Reply { .. } => "reply",
            ToHub::Fanout { .. } => "fanout",
            ToHub::Presence { .. } => "presence",
            ToHub::DeliverDirect { .. } => "deliver_direct",
            ToHub::RoomActive { .. } => "room_active",
            ToHub::Reannounce { .. } => "reannounce",
            ToHub::Horizon { .. } => "horizon",
            ToHub::Behind { .. } => "behind",
        }
    }
}

/// Rendered bytes of one part of a re-send to a node far behind, about: well below a
/// connection's byte bound, so a part fits beside what a reading client still has queued.
pub const CATCH_UP_BYTES: usize = 1 << 20;

/// Messages for the directory of a user's home node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToDirectory {
    /// The users with connections on `node` changed: `online` connected, `offline` left.
    Presences {
        /// The node whose connections changed.
        node: NodeName,
        /// Users now connected to `node`.
        online: Vec<UserName>,
        /// Users no longer connected to `node`.
        offline: Vec<UserName>,
    },
    /// A direct message to route to every node where `to` is connected.
    Direct {
        /// Where to send the reply.
        origin: Origin,
        /// The sender.
        from: UserName,
        /// The addressee.
        to: UserName,
        /// The text.
        text: String,
    },
    /// The sender's hub (re)started empty: every connection it had is gone.
    SessionsReset {
        /// The sending node.
        node: NodeName,
    },
}

impl ToDirectory {
    /// The message's name, for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            ToDirectory::Presences { .. } => "presences",
            ToDirectory::Direct { .. } => "direct",
            ToDirectory::SessionsReset { .. } => "sessions_reset",
        }
    }
}

/// A heartbeat datagram of the membership service (sent over UDP, sealed with the cookie).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// The sender.
    pub from: MemberInfo,
    /// What the datagram is.
    pub kind: HeartbeatKind,
    /// Members the sender knows of, for discovery (gossip).
    pub members: Vec<MemberInfo>,
    /// Members the sender saw leave gracefully, as they were when they left (gossip: a node
    /// that was away when a member left learns it from the others).
    pub departed: Vec<MemberInfo>,
}

/// The purpose of a heartbeat datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum HeartbeatKind {
    /// Asks for an `Ack` carrying the same nonce.
    Ping {
        /// Identifies the ping.
        nonce: u64,
    },
    /// Answers a ping.
    Ack {
        /// The ping's nonce.
        nonce: u64,
        /// Whether the answering member knew an earlier life of the pinger (an older
        /// incarnation, or its name from before the answerer's own restart): a pinger whose
        /// store is new learns from this that it lost its disk.
        knew_you: bool,
    },
    /// The sender is shutting down: drop it at once.
    Leave,
}

/// How a member can be reached.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MemberInfo {
    /// The member's name.
    pub name: NodeName,
    /// Grows on every restart of the member: tells a restarted member from its previous life.
    pub incarnation: u64,
    /// The member's node-to-node address (`host:port`; TCP for sessions, UDP for heartbeats).
    pub addr: String,
    /// The URL browsers use to reach the member, when configured.
    pub public_url: Option<String>,
}
