//! The bounded queue of frames between the node and one client connection.
//!
//! Whoever delivers to a client (the hub, the session) pushes without waiting. The queue is
//! bounded twice: in entries (`client-queue`) and in bytes (`client-queue-bytes`). When either is
//! exceeded the client is too slow: the outbox trips its close signal and the connection's
//! writer task closes it with 1013, so a stalled client never slows a room or anyone else, and
//! never costs the node more than its byte bound plus one reply. An entry always fits in an
//! empty queue, so a client that reads is never cut off for one large reply.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::Utf8Bytes;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

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
    /// 1001: the client answered none of the node's pings within `idle-timeout-ms`.
    Idle,
    /// 1000: a normal close.
    Normal,
    /// 1008: the connection's token expired and no `refresh` replaced it.
    Expired,
    /// 1008: a connection without a token in its upgrade request sent no valid `auth` frame
    /// first.
    Unauthenticated,
}

impl Closing {
    /// The close frame sent to the client.
    pub fn frame(self) -> CloseFrame {
        let (code, reason) = match self {
            Closing::Shutdown => (CloseCode::Away, "node shutting down"),
            Closing::TooLarge => (CloseCode::Size, "frame or message too large"),
            Closing::TooSlow => (CloseCode::Again, "client too slow to read its queue"),
            Closing::Internal => (CloseCode::Error, "internal error"),
            Closing::Idle => (CloseCode::Away, "no answer to pings"),
            Closing::Normal => (CloseCode::Normal, ""),
            Closing::Expired => (CloseCode::Policy, "token expired"),
            Closing::Unauthenticated => (CloseCode::Policy, "a valid token is required"),
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
            Closing::Idle => "idle",
            Closing::Normal => "normal",
            Closing::Expired => "token_expired",
            Closing::Unauthenticated => "unauthenticated",
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

impl Outgoing {
    /// The bytes of text it holds.
    fn bytes(&self) -> usize {
        match self {
            Outgoing::Frame(frame) => frame.len(),
            Outgoing::Batch(frames) => frames.iter().map(|frame| frame.len()).sum(),
        }
    }
}

/// The bounded queue of frames towards one client. Cheap to clone.
#[derive(Clone)]
pub struct Outbox {
    tx: mpsc::Sender<Outgoing>,
    close: Arc<watch::Sender<Option<Closing>>>,
    queued: Arc<AtomicUsize>,
    max_bytes: usize,
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
        let bytes = outgoing.bytes();
        let before = self.queued.fetch_add(bytes, Ordering::Relaxed);
        let over = before > 0 && before.saturating_add(bytes) > self.max_bytes;
        let result = if over {
            Err(mpsc::error::TrySendError::Full(outgoing))
        } else {
            self.tx.try_send(outgoing)
        };
        match result {
            Ok(()) => true,
            Err(refused) => {
                self.queued.fetch_sub(bytes, Ordering::Relaxed);
                if matches!(refused, mpsc::error::TrySendError::Full(_)) {
                    self.close(Closing::TooSlow);
                }
                false
            }
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

/// The writer's end of an outbox: takes entries off the queue and frees their bytes.
#[derive(Debug)]
pub struct Queue {
    rx: mpsc::Receiver<Outgoing>,
    queued: Arc<AtomicUsize>,
}

impl Queue {
    /// The next entry; `None` once every outbox is gone.
    pub async fn recv(&mut self) -> Option<Outgoing> {
        let next = self.rx.recv().await;
        self.taken(next)
    }

    /// The next entry if one is queued.
    pub fn try_recv(&mut self) -> Option<Outgoing> {
        let next = self.rx.try_recv().ok();
        self.taken(next)
    }

    fn taken(&self, next: Option<Outgoing>) -> Option<Outgoing> {
        if let Some(outgoing) = &next {
            self.queued.fetch_sub(outgoing.bytes(), Ordering::Relaxed);
        }
        next
    }
}

/// Creates an outbox holding up to `capacity` entries and `max_bytes` bytes (one entry always
/// fits in an empty queue), and the ends the writer task needs.
pub fn outbox(
    capacity: usize,
    max_bytes: usize,
) -> (Outbox, Queue, watch::Receiver<Option<Closing>>) {
    let (tx, rx) = mpsc::channel(capacity);
    let (close_tx, close_rx) = watch::channel(None);
    let queued = Arc::new(AtomicUsize::new(0));
    (
        Outbox {
            tx,
            close: Arc::new(close_tx),
            queued: queued.clone(),
            max_bytes,
        },
        Queue { rx, queued },
        close_rx,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_outbox_closes_with_1013_and_the_first_reason_wins() {
        let (outbox, _rx, close) = outbox(2, 1 << 20);
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
        assert_eq!(u16::from(Closing::Expired.frame().code), 1008);
    }

    #[test]
    fn the_byte_bound_closes_with_1013_but_one_entry_always_fits_an_empty_queue() {
        let (outbox, mut queue, close) = outbox(1024, 100);
        assert!(
            outbox.push_batch(vec!["x".repeat(300).into()]),
            "an empty queue takes it"
        );
        assert!(!outbox.is_closing());
        assert!(
            queue.try_recv().is_some(),
            "the writer takes it; its bytes are freed"
        );
        assert!(outbox.push_text("a".repeat(60)));
        assert!(outbox.push_text("b".repeat(40)), "exactly the bound");
        assert!(!outbox.is_closing());
        assert!(!outbox.push_text("c".into()), "one byte past the bound");
        assert_eq!(*close.borrow(), Some(Closing::TooSlow));
        assert_eq!(
            queue.queued.load(Ordering::Relaxed),
            100,
            "the refused frame is not counted"
        );
    }
}
