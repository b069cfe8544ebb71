//! The two tasks of a WebSocket connection and the bounded outbox between the node and it.
//!
//! - The **reader** reads frames and hands them to the Session actor, holding a permit per frame
//!   so that a client cannot queue more than [`READ_AHEAD`] frames in the actor's (unbounded)
//!   mailbox. Oversized frames close the connection with 1009.
//! - The **writer** drains the [`Outbox`] into the socket, batching frames per flush, and pings
//!   the client every third of `idle-timeout-ms`; the reader closes a connection on which nothing
//!   (no frame, no pong) arrived for the whole timeout (1001), so half-open connections do not
//!   keep their slot and their presence.
//! - The [`Outbox`] (in [`super::outbox`]) is the bounded queue the writer drains: when it is
//!   full the client is too slow, and the writer closes the connection with 1013.

use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use ractor::ActorRef;
use tokio::sync::{Semaphore, watch};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use crate::gateway::outbox::{Closing, Outbox, Outgoing, Queue};
use crate::gateway::session::SessionMessage;
use crate::metrics::Metrics;

/// The socket of a client connection.
pub type Socket = WebSocketStream<TokioIo<Upgraded>>;

/// Frames a client may have in flight towards its Session actor.
pub const READ_AHEAD: usize = 32;
/// How long a closing connection may take to flush its queue and close frame.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// Feeds one queued entry to the sink (without flushing); the number of frames fed.
async fn feed(sink: &mut SplitSink<Socket, Message>, outgoing: Outgoing) -> Result<u64, WsError> {
    match outgoing {
        Outgoing::Frame(frame) => sink.feed(Message::Text(frame)).await.map(|()| 1),
        Outgoing::Batch(frames) => {
            let n = frames.len() as u64;
            for frame in frames {
                sink.feed(Message::Text(frame)).await?;
            }
            Ok(n)
        }
    }
}

/// Writes queued frames to the socket until the outbox closes or the socket fails, then sends
/// the close frame (within a grace period), stops the reader (which drops the socket) and tells
/// the session.
pub async fn write_loop(
    mut sink: SplitSink<Socket, Message>,
    mut queue: Queue,
    mut close: watch::Receiver<Option<Closing>>,
    reader: tokio::task::AbortHandle,
    session: ActorRef<SessionMessage>,
    metrics: Metrics,
    ping_every: Duration,
) {
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + ping_every, ping_every);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let why = loop {
        let first = tokio::select! {
            biased;
            changed = close.changed() => {
                break if changed.is_ok() { *close.borrow() } else { None };
            }
            next = queue.recv() => match next {
                Some(next) => Some(next),
                None => break None,
            },
            _ = ping.tick() => None,
        };
        // Every write can block on a client that does not read: race all of them against the
        // close signal, so that a stalled client is cut off rather than waited for.
        let write = async {
            let mut sent = match first {
                Some(first) => feed(&mut sink, first).await?,
                None => {
                    sink.feed(Message::Ping(Default::default())).await?;
                    0
                }
            };
            while sent < 64 {
                match queue.try_recv() {
                    Some(next) => sent += feed(&mut sink, next).await?,
                    None => break,
                }
            }
            sink.flush().await?;
            Ok::<u64, WsError>(sent)
        };
        tokio::select! {
            biased;
            changed = close.changed() => {
                break if changed.is_ok() { *close.borrow() } else { None };
            }
            written = write => match written {
                Ok(sent) => {
                    metrics.messages_out.inc_by(sent);
                }
                Err(_) => break None,
            },
        }
    };
    if let Some(why) = why {
        Metrics::count(&metrics.connections_closed, why.label());
        tracing::debug!(reason = why.label(), "closing connection");
    }
    let _ = tokio::time::timeout(CLOSE_GRACE, async {
        if let Some(why) = why {
            if why != Closing::TooSlow {
                // Deliver what was queued before the close (replies, last messages).
                while let Some(next) = queue.try_recv() {
                    if feed(&mut sink, next).await.is_err() {
                        return;
                    }
                }
            }
            let _ = sink.send(Message::Close(Some(why.frame()))).await;
        }
        let _ = sink.close().await;
    })
    .await;
    // The reader holds the other half of the socket: stopping it drops the connection, also
    // when the client never reads again (its close frame could not be written).
    reader.abort();
    let _ = session.cast(SessionMessage::Closed);
}

/// Reads frames and hands them to the session until the socket closes or fails.
pub async fn read_loop(
    mut stream: SplitStream<Socket>,
    session: ActorRef<SessionMessage>,
    outbox: Outbox,
    idle_timeout: Duration,
) {
    let permits = Arc::new(Semaphore::new(READ_AHEAD));
    loop {
        let Ok(next) = tokio::time::timeout(idle_timeout, stream.next()).await else {
            tracing::debug!("no frame and no pong within the idle timeout");
            outbox.close(Closing::Idle);
            break;
        };
        let Some(message) = next else {
            break;
        };
        match message {
            Ok(Message::Text(text)) => {
                let Ok(permit) = permits.clone().acquire_owned().await else {
                    break;
                };
                if session.cast(SessionMessage::Frame(text, permit)).is_err() {
                    break;
                }
            }
            Ok(Message::Binary(_)) => {
                let _ = session.cast(SessionMessage::Binary);
            }
            Ok(Message::Close(_)) => break,
            // Pings are answered by tungstenite itself; a pong (like any frame) shows the client
            // is there.
            Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)) => {}
            Err(WsError::Capacity(e)) => {
                tracing::debug!(error = %e, "frame over the limit");
                outbox.close(Closing::TooLarge);
                break;
            }
            Err(e) => {
                tracing::debug!(error = %e, "socket read failed");
                break;
            }
        }
    }
    let _ = session.cast(SessionMessage::Closed);
}
