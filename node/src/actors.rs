//! Small pieces every actor shell of the node uses.
//!
//! - [`Slot`]: the current actor of a role that its supervisor restarts (the hub, the session
//!   supervisor), for the parts of the node that are not its children (the gateway, the node
//!   handle).
//! - [`Tasks`]: background tasks that belong to an actor and end with it, also when it panics
//!   (ractor skips `post_stop` then, but the state is dropped).
//! - [`forward`]: casts every new value of a watch channel (the cluster view, the state of the
//!   node-to-node sessions) into an actor's mailbox.

use std::sync::{Arc, RwLock};

use ractor::{ActorRef, Message};
use tokio::sync::watch;
use tokio::task::AbortHandle;

/// The current actor of a restartable role. Cheap to clone.
pub struct Slot<M: Message>(Arc<RwLock<Option<ActorRef<M>>>>);

impl<M: Message> Clone for Slot<M> {
    fn clone(&self) -> Self {
        Slot(self.0.clone())
    }
}

impl<M: Message> Default for Slot<M> {
    fn default() -> Self {
        Slot(Arc::new(RwLock::new(None)))
    }
}

impl<M: Message> std::fmt::Debug for Slot<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Slot")
    }
}

impl<M: Message> Slot<M> {
    /// The actor now in the slot, if any.
    pub fn get(&self) -> Option<ActorRef<M>> {
        // A poisoned lock only means a writer panicked while replacing an Option: still valid.
        self.0
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Puts `actor` in the slot.
    pub fn set(&self, actor: ActorRef<M>) {
        *self
            .0
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(actor);
    }
}

/// Background tasks aborted when dropped.
#[derive(Debug, Default)]
pub struct Tasks(Vec<AbortHandle>);

impl Tasks {
    /// Adds a task.
    pub fn add(&mut self, task: AbortHandle) {
        self.0.push(task);
    }
}

impl Drop for Tasks {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// Casts `wrap(value)` to `actor` for every new value of `rx` (not the current one), until the
/// channel closes or the actor is gone.
pub fn forward<T, M>(
    mut rx: watch::Receiver<T>,
    actor: ActorRef<M>,
    wrap: fn(T) -> M,
) -> AbortHandle
where
    T: Clone + Send + Sync + 'static,
    M: Message,
{
    tokio::spawn(async move {
        while rx.changed().await.is_ok() {
            let value = rx.borrow_and_update().clone();
            if actor.cast(wrap(value)).is_err() {
                break;
            }
        }
    })
    .abort_handle()
}
