//! The sessions of one worker and the counts across workers: client ids, the per-service client
//! limit, and the registry that shutdown and reload reach every session through.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use super::ReplySlots;
use crate::service::{PolicyCell, ServiceCtx};

/// Process-wide client ids, as CLIENT ID reports them.
pub(super) static NEXT_CLIENT_ID: AtomicU64 = AtomicU64::new(1);

/// Gives out a new client id.
pub fn next_client_id() -> u64 {
    NEXT_CLIENT_ID.fetch_add(1, Ordering::Relaxed)
}

/// Counts a service's connected clients across workers; the guard gives the place back.
pub struct ClientGuard(Arc<AtomicUsize>);

impl ClientGuard {
    /// Takes a place if fewer than `max` are taken.
    pub fn acquire(count: &Arc<AtomicUsize>, max: usize) -> Option<ClientGuard> {
        count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| ClientGuard(Arc::clone(count)))
    }
}

impl Drop for ClientGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The sessions of one worker, so shutdown can reach them and the worker can wait for them.
pub struct Sessions {
    /// Where CLIENT KILL from any worker sends the ids of this worker's clients to close.
    pub(super) killer: tokio::sync::mpsc::Sender<u64>,
    /// Live sessions by client id, with their service (the policy cell every generation of
    /// a service shares stands for it).
    pub(super) live: RefCell<HashMap<u64, (PolicyCell, Rc<ReplySlots>)>>,
    /// Estimated reply bytes owed upstream to this worker's big-reply clients
    /// (`big_reply_budget`; see `window.rs`).
    pub(super) big_replies_owed: Cell<usize>,
    /// Sessions waiting for room in that budget, woken when some is given back.
    pub(super) budget_waiters: RefCell<Vec<std::rc::Weak<ReplySlots>>>,
}

impl Sessions {
    /// A worker's sessions, with the task (on the current `LocalSet`) that closes the ones
    /// CLIENT KILL names.
    pub fn start() -> Rc<Sessions> {
        let (killer, mut kills) = tokio::sync::mpsc::channel(super::directory::KILL_QUEUE);
        let sessions = Rc::new(Sessions {
            killer,
            live: RefCell::default(),
            big_replies_owed: Cell::new(0),
            budget_waiters: RefCell::default(),
        });
        let weak = Rc::downgrade(&sessions);
        tokio::task::spawn_local(async move {
            while let Some(id) = kills.recv().await {
                let Some(sessions) = weak.upgrade() else {
                    return;
                };
                if let Some((_, core)) = sessions.live.borrow().get(&id) {
                    core.killed.set(true);
                    core.signal.notify();
                }
            }
        });
        sessions
    }

    /// Sessions still running.
    pub fn len(&self) -> usize {
        self.live.borrow().len()
    }

    /// Whether no session runs.
    pub fn is_empty(&self) -> bool {
        self.live.borrow().is_empty()
    }

    /// Wakes every session to read its service's [`Policy`] again after a reload: a wait
    /// that began before it (an idle client's, say) may end sooner now.
    pub fn wake_all(&self) {
        for (_, core) in self.live.borrow().values() {
            core.signal.notify();
        }
    }

    /// Asks every session to stop reading, finish the replies it owes, and close.
    pub fn shut_down(&self) {
        for (_, core) in self.live.borrow().values() {
            core.shutdown.set(true);
            core.signal.notify();
        }
    }

    /// [`Sessions::shut_down`] for the clients of `svc`'s service only (a reload removed
    /// it).
    pub fn shut_down_service(&self, svc: &ServiceCtx) {
        for (service, core) in self.live.borrow().values() {
            if Rc::ptr_eq(service, &svc.policy) {
                core.shutdown.set(true);
                core.signal.notify();
            }
        }
    }
}
