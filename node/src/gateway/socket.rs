//! The task of a WebSocket connection: one per connection, it both reads and writes the socket.
//!
//! - **Reading**: frames go to the Session actor, each holding a permit so that a client cannot
//!   queue more than [`READ_AHEAD`] frames in the actor's (unbounded) mailbox. Oversized frames
//!   close the connection with 1009.
//! - **Writing**: the task drains the [`Outbox`] (in [`super::outbox`]) into the socket, batching
//!   frames per flush. The outbox is bounded: when it is full the client is too slow, and the
//!   connection is closed with 1013.
//! - **Liveness**: one timer per connection, kept by the pure [`Watchdog`], pings the client every
//!   third of `idle-timeout-ms` and closes (1001) a connection on which nothing (no frame, no
//!   pong) arrived for the whole timeout, so half-open connections do not keep their slot and
//!   their presence.
//!
//! One task instead of a reader and a writer: no lock to split the socket, one timer instead of a
//! timeout registered for every frame read (docs/benchmarks.md, "Idle connections").

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use ractor::ActorRef;
use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::{Error as WsError, Message, Utf8Bytes};

use crate::gateway::outbox::{Closing, Outbox, Outgoing, Queue};
use crate::gateway::session::SessionMessage;
use crate::metrics::Metrics;

/// The socket of a client connection.
pub type Socket = WebSocketStream<TokioIo<Upgraded>>;

/// Frames a client may have in flight towards its Session actor.
pub const READ_AHEAD: usize = 32;
/// How long a closing connection may take to flush its queue and close frame.
const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// Frames written per flush at most.
const BATCH_FRAMES: u64 = 64;

/// When to ping a connection and when to give up on it: a pure clock, driven by the instants
/// the task hands it.
#[derive(Debug, Clone, Copy)]
pub struct Watchdog {
    idle_timeout: Duration,
    ping_every: Duration,
    last_seen: Instant,
    next_ping: Instant,
}

/// What a [`Watchdog`] asks for when its timer fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Due {
    /// Nothing arrived for the whole idle timeout: close the connection.
    Idle,
    /// Send a ping.
    Ping,
    /// Nothing yet (the timer fired early).
    Nothing,
}

impl Watchdog {
    /// A watchdog for a connection opened at `now`; it pings every third of `idle_timeout`.
    pub fn new(now: Instant, idle_timeout: Duration) -> Self {
        let ping_every = idle_timeout / 3;
        Self {
            idle_timeout,
            ping_every,
            last_seen: now,
            next_ping: now + ping_every,
        }
    }

    /// Something (a frame, a pong) arrived at `now`.
    pub fn seen(&mut self, now: Instant) {
        self.last_seen = now;
    }

    /// The last instant by which nothing must have arrived for the connection to be idle.
    pub fn idle_at(&self) -> Instant {
        self.last_seen + self.idle_timeout
    }

    /// When the timer should fire next.
    pub fn due_at(&self) -> Instant {
        self.next_ping.min(self.idle_at())
    }

    /// What is due at `now`; a ping due moves the next one a period on.
    pub fn wake(&mut self, now: Instant) -> Due {
        if now >= self.idle_at() {
            Due::Idle
        } else if now >= self.next_ping {
            self.next_ping = now + self.ping_every;
            Due::Ping
        } else {
            Due::Nothing
        }
    }
}

/// Feeds one queued entry to the socket (without flushing); the number of frames fed.
async fn feed(socket: &mut Socket, outgoing: Outgoing) -> Result<u64, WsError> {
    match outgoing {
        Outgoing::Frame(frame) => socket.feed(Message::Text(frame)).await.map(|()| 1),
        Outgoing::Batch(frames) => feed_all(socket, frames).await,
        Outgoing::Deferred(deferred) => feed_all(socket, deferred.render()).await,
    }
}

async fn feed_all(socket: &mut Socket, frames: Vec<Utf8Bytes>) -> Result<u64, WsError> {
    let n = frames.len() as u64;
    for frame in frames {
        socket.feed(Message::Text(frame)).await?;
    }
    Ok(n)
}

/// What woke the connection's task up to write.
enum Write {
    /// An entry of the outbox, to be written with whatever else is queued.
    Queued(Outgoing),
    /// A ping.
    Ping,
}

/// Serves a connection until the outbox closes or the socket fails: hands read frames to the
/// session, writes queued frames, pings. Then sends the close frame (within a grace period),
/// drops the socket and tells the session.
pub async fn serve(
    mut socket: Socket,
    mut queue: Queue,
    mut close: watch::Receiver<Option<Closing>>,
    outbox: Outbox,
    session: ActorRef<SessionMessage>,
    metrics: Metrics,
    idle_timeout: Duration,
) {
    let permits = Arc::new(Semaphore::new(READ_AHEAD));
    let mut watchdog = Watchdog::new(Instant::now(), idle_timeout);
    let timer = tokio::time::sleep_until(watchdog.due_at());
    tokio::pin!(timer);
    let why = loop {
        // Not biased: a busy outbox must not starve reading, nor a busy client writing.
        let write = tokio::select! {
            changed = close.changed() => {
                break if changed.is_ok() { *close.borrow() } else { None };
            }
            next = queue.recv() => match next {
                Some(next) => Write::Queued(next),
                None => break None,
            },
            () = &mut timer => {
                let due = watchdog.wake(Instant::now());
                timer.as_mut().reset(watchdog.due_at());
                match due {
                    Due::Ping => Write::Ping,
                    Due::Idle => {
                        tracing::debug!("no frame and no pong within the idle timeout");
                        outbox.close(Closing::Idle);
                        continue;
                    }
                    Due::Nothing => continue,
                }
            }
            next = socket.next() => {
                watchdog.seen(Instant::now());
                read(next, &permits, &session, &outbox).await;
                continue;
            }
        };
        // Every write can block on a client that does not read: race all of them against the
        // close signal and the idle timeout, so that a stalled client is cut off rather than
        // waited for.
        let written = async {
            let mut sent = match write {
                Write::Queued(first) => feed(&mut socket, first).await?,
                Write::Ping => {
                    socket.feed(Message::Ping(Default::default())).await?;
                    0
                }
            };
            while sent < BATCH_FRAMES {
                match queue.try_recv() {
                    Some(next) => sent += feed(&mut socket, next).await?,
                    None => break,
                }
            }
            socket.flush().await?;
            Ok::<u64, WsError>(sent)
        };
        tokio::select! {
            biased;
            changed = close.changed() => {
                break if changed.is_ok() { *close.borrow() } else { None };
            }
            written = written => match written {
                Ok(sent) => {
                    metrics.messages_out.inc_by(sent);
                }
                Err(_) => break None,
            },
            () = tokio::time::sleep_until(watchdog.idle_at()) => {
                tracing::debug!("a write stalled for the idle timeout");
                outbox.close(Closing::Idle);
            }
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
                    if feed(&mut socket, next).await.is_err() {
                        return;
                    }
                }
            }
            let _ = socket.send(Message::Close(Some(why.frame()))).await;
        }
        let _ = SinkExt::close(&mut socket).await;
    })
    .await;
    // Dropping the socket here ends the connection, also when the client never reads again
    // (its close frame could not be written).
    drop(socket);
    let _ = session.cast(SessionMessage::Closed);
}

/// Handles one read from the socket: frames go to the session; the end of the stream, an error
/// or an oversized frame closes the connection.
async fn read(
    next: Option<Result<Message, WsError>>,
    permits: &Arc<Semaphore>,
    session: &ActorRef<SessionMessage>,
    outbox: &Outbox,
) {
    let closed = match next {
        None | Some(Ok(Message::Close(_))) => true,
        Some(Ok(Message::Text(text))) => {
            // The semaphore is never closed.
            let Ok(permit) = permits.clone().acquire_owned().await else {
                return;
            };
            session.cast(SessionMessage::Frame(text, permit)).is_err()
        }
        Some(Ok(Message::Binary(_))) => session.cast(SessionMessage::Binary).is_err(),
        // Pings are answered by tungstenite itself; a pong (like any frame) shows the client is
        // there.
        Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => false,
        Some(Err(WsError::Capacity(e))) => {
            tracing::debug!(error = %e, "frame over the limit");
            outbox.close(Closing::TooLarge);
            false
        }
        Some(Err(e)) => {
            tracing::debug!(error = %e, "socket read failed");
            true
        }
    };
    if closed {
        // The session stops at once (the hub forgets the connection) and its guard closes the
        // outbox; closing it here too ends the task even if the session is already gone.
        let _ = session.cast(SessionMessage::Closed);
        outbox.close(Closing::Normal);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watchdog_pings_every_third_of_the_timeout_and_gives_up_after_it() {
        let start = Instant::now();
        let s = Duration::from_secs;
        let mut dog = Watchdog::new(start, s(60));
        assert_eq!(dog.due_at(), start + s(20));
        assert_eq!(
            dog.wake(start + s(19)),
            Due::Nothing,
            "early wake-ups do nothing"
        );
        assert_eq!(dog.wake(start + s(20)), Due::Ping);
        assert_eq!(dog.due_at(), start + s(40), "the next ping a period on");
        assert_eq!(dog.wake(start + s(40)), Due::Ping);
        assert_eq!(dog.due_at(), start + s(60), "the idle deadline comes first");
        assert_eq!(dog.wake(start + s(60)), Due::Idle);
    }

    #[test]
    fn a_frame_or_a_pong_moves_the_idle_deadline() {
        let start = Instant::now();
        let s = Duration::from_secs;
        let mut dog = Watchdog::new(start, s(60));
        assert_eq!(dog.wake(start + s(20)), Due::Ping);
        dog.seen(start + s(30));
        assert_eq!(dog.idle_at(), start + s(90));
        assert_eq!(dog.wake(start + s(40)), Due::Ping);
        assert_eq!(dog.wake(start + s(60)), Due::Ping);
        assert_eq!(
            dog.wake(start + s(80)),
            Due::Ping,
            "still pinged while quiet"
        );
        assert_eq!(dog.wake(start + s(89)), Due::Nothing);
        assert_eq!(dog.wake(start + s(90)), Due::Idle);
    }
}
