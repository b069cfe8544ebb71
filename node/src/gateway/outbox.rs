//! The bounded queue of frames between the node and one client connection.
//!
//! Whoever delivers to a client (the hub, the session) pushes without waiting. The queue is
//! bounded twice: in entries (`client-queue`) and in bytes (`client-queue-bytes`). When either is
//! exceeded the client is too slow: the outbox trips its close signal and the connection's
//! writer task closes it with 1013, so a stalled client never slows a room or anyone else, and
//! never costs the node more than its byte bound plus one reply. An entry always fits in an
//! empty queue, so a client that reads is never cut off for one large reply.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::{Notify, watch};
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
    /// Frames rendered by the connection's own task when it comes to write them: a long reply
    /// (a page of history, a join's replay) costs the one connection that asked for it, and
    /// never holds up whoever queued it (the hub, which serves every connection).
    Deferred(Deferred),
}

/// Frames not rendered yet, with the bytes the data they are rendered from holds.
pub struct Deferred {
    bytes: usize,
    render: Box<dyn FnOnce() -> Vec<Utf8Bytes> + Send>,
}

impl Deferred {
    /// Frames `render` will make from data of about `bytes` bytes.
    pub fn new(bytes: usize, render: impl FnOnce() -> Vec<Utf8Bytes> + Send + 'static) -> Self {
        Self {
            bytes,
            render: Box::new(render),
        }
    }

    /// The frames, in order.
    pub fn render(self) -> Vec<Utf8Bytes> {
        (self.render)()
    }
}

impl std::fmt::Debug for Deferred {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Deferred({} bytes)", self.bytes)
    }
}

impl Outgoing {
    /// The bytes of text it holds (for a deferred entry, of the data it is rendered from).
    fn bytes(&self) -> usize {
        match self {
            Outgoing::Frame(frame) => frame.len(),
            Outgoing::Batch(frames) => frames.iter().map(|frame| frame.len()).sum(),
            Outgoing::Deferred(deferred) => deferred.bytes,
        }
    }
}

/// What the outboxes of a connection and its task share. A `VecDeque` under a lock rather than
/// a channel: tokio's channels allocate a first block of 32 entries (1.5 KiB) whether or not a
/// connection ever receives anything, the deque only what is queued (docs/benchmarks.md).
struct Shared {
    entries: Mutex<Entries>,
    /// Wakes the connection's task when an entry is queued or the last outbox is dropped.
    ready: Notify,
    close: watch::Sender<Option<Closing>>,
    capacity: usize,
    max_bytes: usize,
}

struct Entries {
    queue: VecDeque<Outgoing>,
    /// Bytes of text in `queue`.
    bytes: usize,
    /// Live [`Outbox`] clones; at 0 the queue ends once drained.
    outboxes: usize,
    /// The [`Queue`] was dropped: nothing will be written any more.
    abandoned: bool,
}

impl Shared {
    /// The entries; a panic while they were held cannot leave them inconsistent (every update
    /// is a single push or pop with its byte count), so a poisoned lock is taken as is.
    fn entries(&self) -> MutexGuard<'_, Entries> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether `bytes` more fit beside what `entries` holds: anything fits in an empty queue.
    fn fits(&self, entries: &Entries, bytes: usize) -> bool {
        entries.bytes == 0 || entries.bytes.saturating_add(bytes) <= self.max_bytes
    }
}

/// The bounded queue of frames towards one client. Cheap to clone.
pub struct Outbox {
    shared: Arc<Shared>,
}

impl Clone for Outbox {
    fn clone(&self) -> Self {
        self.shared.entries().outboxes += 1;
        Self {
            shared: self.shared.clone(),
        }
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        let last = {
            let mut entries = self.shared.entries();
            entries.outboxes -= 1;
            entries.outboxes == 0
        };
        if last {
            self.shared.ready.notify_one();
        }
    }
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
        let shared = &*self.shared;
        {
            let mut entries = shared.entries();
            if entries.abandoned {
                return false;
            }
            let full = entries.queue.len() >= shared.capacity || !shared.fits(&entries, bytes);
            if !full {
                entries.queue.push_back(outgoing);
                entries.bytes += bytes;
                drop(entries);
                shared.ready.notify_one();
                return true;
            }
        }
        self.close(Closing::TooSlow);
        false
    }

    /// Queues frames that the connection's task renders when it writes them, in one slot.
    pub fn push_deferred(&self, deferred: Deferred) -> bool {
        self.queue(Outgoing::Deferred(deferred))
    }

    /// Queues a JSON text frame.
    pub fn push_text(&self, text: String) -> bool {
        self.push(Utf8Bytes::from(text))
    }

    /// Closes the connection with `why` (the first reason given wins).
    pub fn close(&self, why: Closing) {
        self.shared.close.send_if_modified(|current| {
            if current.is_none() {
                *current = Some(why);
                true
            } else {
                false
            }
        });
    }

    /// Whether `bytes` more would fit in the queue now; true for a connection that is closing,
    /// as nothing more is waited for there.
    pub fn has_room_for(&self, bytes: usize) -> bool {
        if self.is_closing() {
            return true;
        }
        let entries = self.shared.entries();
        entries.abandoned || self.shared.fits(&entries, bytes)
    }

    /// Whether the connection is closing.
    pub fn is_closing(&self) -> bool {
        self.shared.close.borrow().is_some()
    }
}

/// The writer's end of an outbox: takes entries off the queue and frees their bytes.
pub struct Queue {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Queue")
    }
}

impl Drop for Queue {
    fn drop(&mut self) {
        let mut entries = self.shared.entries();
        entries.abandoned = true;
        entries.queue = VecDeque::new();
        entries.bytes = 0;
    }
}

/// What [`Queue::take`] found.
enum Taken {
    Entry(Outgoing),
    Empty,
    Ended,
}

impl Queue {
    /// The next entry; `None` once every outbox is gone and the queue is drained.
    pub async fn recv(&mut self) -> Option<Outgoing> {
        loop {
            match self.take() {
                Taken::Entry(next) => return Some(next),
                Taken::Ended => return None,
                // One consumer: a push between `take` and here leaves a permit, so the wake-up
                // is not lost.
                Taken::Empty => self.shared.ready.notified().await,
            }
        }
    }

    /// The next entry if one is queued.
    pub fn try_recv(&mut self) -> Option<Outgoing> {
        match self.take() {
            Taken::Entry(next) => Some(next),
            Taken::Empty | Taken::Ended => None,
        }
    }

    fn take(&self) -> Taken {
        let mut entries = self.shared.entries();
        match entries.queue.pop_front() {
            Some(next) => {
                entries.bytes -= next.bytes();
                if entries.queue.is_empty() && entries.queue.capacity() > 4 {
                    // A burst is over: an idle connection keeps no large buffer.
                    entries.queue = VecDeque::new();
                }
                Taken::Entry(next)
            }
            None if entries.outboxes == 0 => Taken::Ended,
            None => Taken::Empty,
        }
    }

    /// Bytes of text queued.
    pub fn queued_bytes(&self) -> usize {
        self.shared.entries().bytes
    }
}

/// Creates an outbox holding up to `capacity` entries and `max_bytes` bytes (one entry always
/// fits in an empty queue), and the ends the connection's task needs.
pub fn outbox(
    capacity: usize,
    max_bytes: usize,
) -> (Outbox, Queue, watch::Receiver<Option<Closing>>) {
    let (close, close_rx) = watch::channel(None);
    let shared = Arc::new(Shared {
        entries: Mutex::new(Entries {
            queue: VecDeque::new(),
            bytes: 0,
            outboxes: 1,
            abandoned: false,
        }),
        ready: Notify::new(),
        close,
        capacity,
        max_bytes,
    });
    (
        Outbox {
            shared: shared.clone(),
        },
        Queue { shared },
        close_rx,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deferred_entry_counts_its_bytes_and_is_rendered_by_whoever_takes_it() {
        let (outbox, mut queue, _close) = outbox(8, 100);
        let rendered = Arc::new(Mutex::new(0));
        let count = rendered.clone();
        let deferred = Deferred::new(60, move || {
            *count.lock().unwrap() += 1;
            vec![Utf8Bytes::from("one"), Utf8Bytes::from("two")]
        });
        assert!(outbox.push_deferred(deferred));
        assert_eq!(queue.queued_bytes(), 60);
        assert_eq!(
            *rendered.lock().unwrap(),
            0,
            "not rendered by the one who queued it"
        );
        assert!(!outbox.has_room_for(50));
        assert!(outbox.has_room_for(40));
        let Some(Outgoing::Deferred(taken)) = queue.try_recv() else {
            panic!("the deferred entry");
        };
        assert_eq!(queue.queued_bytes(), 0);
        assert_eq!(taken.render(), vec!["one", "two"]);
        assert_eq!(*rendered.lock().unwrap(), 1);
    }

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
            queue.queued_bytes(),
            100,
            "the refused frame is not counted"
        );
    }
}
