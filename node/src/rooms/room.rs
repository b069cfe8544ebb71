//! The Room actor: the owner of one room on this node, a thin shell around [`RoomCore`].
//!
//! It feeds the core what arrives (peer messages through the room host, view changes, node
//! resets, its own flushes and timers) with the time, and carries out what the core decides:
//! messages to log keepers and hubs through [`Net`], a flush cast to itself (so that the sends
//! already in its mailbox go out in one append), one timer for the core's next deadline, and
//! stopping. The rules (claim, recovery, sequencing, commit, fan-out) are all in
//! [`super::core`].

use std::sync::Arc;
use std::time::Instant;

use chat_protocol::RoomId;
use chat_protocol::peer::ToRoom;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use ractor_cluster::RactorMessage;

use crate::clock::now_ms;
use crate::cluster::view::View;
use crate::net::Net;
use crate::rooms::core::{Effect, RoomConfig, RoomCore};
use crate::store::Store;

/// The Room actor.
#[derive(Debug)]
pub struct Room;

/// What a room starts with.
#[derive(Debug)]
pub struct RoomArgs {
    /// The room.
    pub id: RoomId,
    /// For messaging.
    pub net: Net,
    /// The view when the room starts (the host forwards later ones).
    pub view: Arc<View>,
    /// For reading older entries.
    pub store: Store,
    /// Settings.
    pub config: RoomConfig,
}

/// Messages of a room (all arrive through the room host, but its own).
#[derive(Debug, RactorMessage)]
pub enum RoomMessage {
    /// A message from a node (this one included), and when it reached this node.
    Peer(ToRoom, Instant),
    /// The view changed.
    ViewChanged(Arc<View>),
    /// Every connection of this node is gone (its hub restarted).
    NodeReset(chat_protocol::NodeName),
    /// Sends what was sequenced since the last flush.
    Flush,
    /// The core's next deadline is due (or an earlier timer fired).
    Wake,
    /// Panics inside the handler: lets tests prove that a failing room is contained.
    Crash,
}

/// A room's state: its core, and the shell's bookkeeping.
pub struct RoomState {
    core: RoomCore,
    net: Net,
    /// The deadline a timer is set for.
    wake_at: Option<Instant>,
    span: tracing::Span,
}

impl Actor for Room {
    type Msg = RoomMessage;
    type State = RoomState;
    type Arguments = RoomArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<RoomMessage>,
        args: RoomArgs,
    ) -> Result<RoomState, ActorProcessingErr> {
        args.net.metrics().rooms_hosted.inc();
        // Start the claim above what this node already promised (a hint: the keeper is the
        // authority and refuses a stale epoch anyway).
        let promised = args.store.log_state(&args.id).map_or(0, |s| s.promised);
        let span = tracing::info_span!("room", room = %args.id);
        let core = RoomCore::new(
            args.id,
            args.net.me().clone(),
            args.view,
            args.config,
            Arc::new(args.store),
            args.net.metrics().clone(),
            promised,
            rand::random(),
            Instant::now(),
        );
        let mut state = RoomState {
            core,
            net: args.net,
            wake_at: None,
            span,
        };
        state.carry_out(&myself);
        Ok(state)
    }

    async fn handle(
        &self,
        myself: ActorRef<RoomMessage>,
        message: RoomMessage,
        state: &mut RoomState,
    ) -> Result<(), ActorProcessingErr> {
        // Every log line of the room carries its id (the handler never awaits).
        let span = state.span.clone();
        let _entered = span.enter();
        let now = Instant::now();
        match message {
            RoomMessage::Peer(message, received) => {
                state.core.on_peer(message, received, now, now_ms());
            }
            RoomMessage::ViewChanged(view) => state.core.on_view(view, now),
            RoomMessage::NodeReset(node) => state.core.on_node_reset(&node),
            RoomMessage::Flush => state.core.on_flush(),
            RoomMessage::Wake => {
                // Only the timer of the deadline being waited for clears it: a timer set for a
                // deadline that was later replaced by an earlier one just ticks.
                if state.wake_at.is_some_and(|at| now >= at) {
                    state.wake_at = None;
                }
                state.core.on_tick(now);
            }
            RoomMessage::Crash => panic!("injected failure in room {}", state.core.id()),
        }
        state.carry_out(&myself);
        Ok(())
    }
}

/// However the room stops (ractor skips `post_stop` after a panic), the requests it holds get
/// `unavailable` at once instead of waiting for their timeout.
impl Drop for RoomState {
    fn drop(&mut self) {
        self.net.metrics().rooms_hosted.dec();
        self.core.abandon();
        for effect in self.core.take_effects() {
            if let Effect::Hub(node, message) = effect {
                let _ = self.net.to_hub(&node, message);
            }
        }
    }
}

impl RoomState {
    fn carry_out(&mut self, myself: &ActorRef<RoomMessage>) {
        for effect in self.core.take_effects() {
            match effect {
                Effect::Keeper(node, message) => {
                    let _ = self.net.to_keeper(&node, message);
                }
                Effect::Hub(node, message) => {
                    let _ = self.net.to_hub(&node, message);
                }
                Effect::Flush => {
                    let _ = myself.cast(RoomMessage::Flush);
                }
                Effect::Stop(why) => myself.stop(Some(why.as_str().to_owned())),
            }
        }
        // One timer for the core's next deadline; a later one replaces it only when earlier.
        if let Some(wake) = self.core.next_wake()
            && self.wake_at.is_none_or(|at| wake < at)
        {
            self.wake_at = Some(wake);
            let delay = wake.saturating_duration_since(Instant::now());
            myself.send_after(delay, || RoomMessage::Wake);
        }
    }
}
