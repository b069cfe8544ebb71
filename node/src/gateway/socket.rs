//! The two tasks of a WebSocket connection and the bounded outbox between the node and it.
//!
//! - The **reader** reads frames and hands them to the Session actor, holding a permit per frame
//!   so that a client cannot queue more than [`READ_AHEAD`] frames in the actor's (unbounded)
//!   mailbox. Oversized frames close the connection with 1009.
//! - The **writer** drains the [`Outbox`] into the socket, batching frames per flush.
//! - The **outbox** is a bounded queue: whoever delivers to the client (hub, session) pushes
//!   without waiting. When it is full the client is too slow: the outbox trips its close signal
//!   and the writer closes the connection with 1013, so a stalled client never slows a room or
//!   anyone else.

use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use ractor::ActorRef;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message, Utf8Bytes};

use crate::gateway::session::SessionMessage;
use crate::metrics::Metrics;

/// The socket of a client connection.
pub type Socket = WebSocketStream<TokioIo<Upgraded>>;

/// Frames a client may have in flight towards its Session actor.
pub const READ_AHEAD: usize = 32;
/// How long a closing connection may take to flush its queue and close frame.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// Why the node closes a connection (the WebSocket close code and reason).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closing {
    /// 1001: the node is shutting down.
    Shutdown,
    /// 1009: a frame or message over `max-frame-bytes`.
    TooLarge,
    /// 1013: the client does not read its queue fast enough.
    TooSlow,
    /// 1011: an internal failure of the connection's actor.
    Internal,
    /// 1000: a normal close.
    Normal,
}

impl Closing {
    fn frame(self) -> CloseFrame {
        let (code, reason) = match self {
            Closing::Shutdown => (CloseCode::Away, "node shutting down"),
            Closing::TooLarge => (CloseCode::Size, "frame or message too large"),
            Closing::TooSlow => (CloseCode::Again, "client too slow to read its queue"),
            Closing::Internal => (CloseCode::Error, "internal error"),
            Closing::Normal => (CloseCode::Normal, ""),
        };
        CloseFrame {
            code,
            reason: reason.into(),
        }
    }

    /// The reason as a metric label.
    pub fn label(self) -> &'static str {
        match self {
            Closing::Shutdown => "shutdown",
            Closing::TooLarge => "too_large",
            Closing::TooSlow => "slow",
            Closing::Internal => "internal",
            Closing::Normal => "normal",
        }
    }
}

/// What the outbox holds: one frame, or frames that must go out together (a join's reply and
/// its replay, a catch-up after a room moved). A batch takes one slot: a client is cut off for
/// not reading, not for having asked for a long replay.
#[derive(Debug)]
pub enum Outgoing {
    /// One frame.
    Frame(Utf8Bytes),
    /// Several frames, in order.
    Batch(Vec<Utf8Bytes>),
}

/// The bounded queue of frames towards one client. Cheap to clone.
#[derive(Clone)]
pub struct Outbox {
    tx: mpsc::Sender<Outgoing>,
    close: Arc<watch::Sender<Option<Closing>>>,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Outbox")
    }
}

impl Outbox {
    /// Queues a frame without waiting; false if it could not be queued. A full queue closes
    /// the connection (1013).
    pub fn push(&self, frame: Utf8Bytes) -> bool {
        self.queue(Outgoing::Frame(frame))
    }

    /// Queues frames that go out together, in one slot of the queue.
    pub fn push_batch(&self, frames: Vec<Utf8Bytes>) -> bool {
        match frames.len() {
            0 => true,
            _ => self.queue(Outgoing::Batch(frames)),
        }
    }

    fn queue(&self, outgoing: Outgoing) -> bool {
        match self.tx.try_send(outgoing) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.close(Closing::TooSlow);
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    /// Queues a JSON text frame.
    pub fn push_text(&self, text: String) -> bool {
        self.push(Utf8Bytes::from(text))
    }

    /// Closes the connection with `why` (the first reason given wins).
    pub fn close(&self, why: Closing) {
        self.close.send_if_modified(|current| {
            if current.is_none() {
                *current = Some(why);
                true
            } else {
                false
            }
        });
    }

    /// Whether the connection is closing.
    pub fn is_closing(&self) -> bool {
        self.close.borrow().is_some()
    }
}

/// Creates an outbox holding up to `capacity` entries, and the ends the writer task needs.
pub fn outbox(
    capacity: usize,
) -> (
    Outbox,
    mpsc::Receiver<Outgoing>,
    watch::Receiver<Option<Closing>>,
) {
    let (tx, rx) = mpsc::channel(capacity);
    let (close_tx, close_rx) = watch::channel(None);
    (
        Outbox {
            tx,
            close: Arc::new(close_tx),
        },
        rx,
        close_rx,
    )
}

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
    mut queue: mpsc::Receiver<Outgoing>,
    mut close: watch::Receiver<Option<Closing>>,
    reader: tokio::task::AbortHandle,
    session: ActorRef<SessionMessage>,
    metrics: Metrics,
) {
    let why = loop {
        let Some(first) = (tokio::select! {
            biased;
            changed = close.changed() => {
                break if changed.is_ok() { *close.borrow() } else { None };
            }
            next = queue.recv() => next,
        }) else {
            break None;
        };
        // Every write can block on a client that does not read: race all of them against the
        // close signal, so that a stalled client is cut off rather than waited for.
        let write = async {
            let mut sent = feed(&mut sink, first).await?;
            while sent < 64 {
                match queue.try_recv() {
                    Ok(next) => sent += feed(&mut sink, next).await?,
                    Err(_) => break,
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
                while let Ok(next) = queue.try_recv() {
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
) {
    let permits = Arc::new(Semaphore::new(READ_AHEAD));
    while let Some(message) = stream.next().await {
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
            // Pings are answered by tungstenite itself; pongs and raw frames need nothing.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_outbox_closes_with_1013_and_the_first_reason_wins() {
        let (outbox, _rx, close) = outbox(2);
        assert!(outbox.push_text("a".into()));
        assert!(outbox.push_text("b".into()));
        assert!(!outbox.is_closing());
        assert!(
            !outbox.push_text("c".into()),
            "the third frame does not fit"
        );
        assert_eq!(*close.borrow(), Some(Closing::TooSlow));
        outbox.close(Closing::Shutdown);
        assert_eq!(*close.borrow(), Some(Closing::TooSlow));
        assert_eq!(Closing::TooSlow.frame().code, CloseCode::Again);
        assert_eq!(u16::from(Closing::TooLarge.frame().code), 1009);
        assert_eq!(u16::from(Closing::Shutdown.frame().code), 1001);
    }
}
