//! The sessions of one worker and the counts across workers: client ids, the per-service client
//! limit, and the registry that shutdown and reload reach every session through.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::rc::Weak;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use super::ReplySlots;
use super::directory::{ClientEntry, Mail, Mailbox};
use crate::service::{PolicyCell, ServiceCtx};
use crate::tracking::{Message, TrackingMetrics, encode};
use crate::upstream::ReplySink;

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

impl ClientGuard {
    /// Names the service across workers (and apart from another proxy's service of the same
    /// name in one process): the address of the count it shares.
    pub(super) fn service_key(&self) -> usize {
        Arc::as_ptr(&self.0) as usize
    }
}

impl Drop for ClientGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The sessions of one worker, so shutdown can reach them and the worker can wait for them.
pub struct Sessions {
    /// Where other workers send this worker's clients kills and invalidations.
    pub(super) mailbox: Mailbox,
    /// Live sessions by client id, with their service (the policy cell every generation of
    /// a service shares stands for it) and what CLIENT LIST shows of them.
    pub(super) live: RefCell<HashMap<u64, Live>>,
    /// Estimated reply bytes owed upstream to this worker's big-reply clients
    /// (`big_reply_budget`; see `window.rs`).
    pub(super) big_replies_owed: Cell<usize>,
    /// Sessions waiting for room in that budget, woken when some is given back.
    pub(super) budget_waiters: RefCell<Vec<std::rc::Weak<ReplySlots>>>,
}

/// A live session as the worker reaches it.
pub(super) struct Live {
    /// Its service.
    pub(super) service: PolicyCell,
    /// Its reply slots.
    pub(super) core: Rc<ReplySlots>,
    /// Its directory entry.
    pub(super) entry: Arc<ClientEntry>,
}

impl Sessions {
    /// A worker's sessions, with the task (on the current `LocalSet`) that delivers what
    /// other workers send them (CLIENT KILL, invalidations), and the worker's client-side
    /// caching table (`max_tracked_keys` keys at most) delivering to them.
    pub fn start(max_tracked_keys: usize, tracking: TrackingMetrics) -> Rc<Sessions> {
        let (tx, mut mail) = tokio::sync::mpsc::channel(super::directory::MAIL_QUEUE);
        let sessions = Rc::new(Sessions {
            mailbox: Mailbox {
                tx,
                lost: Arc::default(),
            },
            live: RefCell::default(),
            big_replies_owed: Cell::new(0),
            budget_waiters: RefCell::default(),
        });
        let weak = Rc::downgrade(&sessions);
        crate::tracking::tracker().install(
            max_tracked_keys,
            tracking,
            Rc::new(move |target, redirected, msg| deliver(&weak, target, redirected, msg)),
        );
        let weak = Rc::downgrade(&sessions);
        tokio::task::spawn_local(async move {
            while let Some(m) = mail.recv().await {
                let Some(sessions) = weak.upgrade() else {
                    return;
                };
                let live = sessions.live.borrow();
                match m {
                    Mail::Kill(id) => {
                        if let Some(l) = live.get(&id) {
                            l.core.killed.set(true);
                            l.core.signal.notify();
                        }
                    }
                    Mail::Push(id, push) => {
                        if let Some(l) = live.get(&id) {
                            l.core.push_oob(push);
                            l.core.flush();
                        }
                    }
                    Mail::Lost => {}
                }
                if sessions.mailbox.lost.swap(false, Ordering::AcqRel) {
                    for l in live.values() {
                        if l.entry.lost.swap(false, Ordering::AcqRel) {
                            let (resp3, pubsub) = l.entry.protocol();
                            if let Some(all) = encode(&Message::All, resp3, pubsub) {
                                l.core.push_oob(all);
                                l.core.flush();
                            }
                        }
                    }
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
        for l in self.live.borrow().values() {
            l.core.signal.notify();
        }
    }

    /// Asks every session to stop reading, finish the replies it owes, and close.
    pub fn shut_down(&self) {
        for l in self.live.borrow().values() {
            l.core.shutdown.set(true);
            l.core.signal.notify();
        }
    }

    /// [`Sessions::shut_down`] for the clients of `svc`'s service only (a reload removed
    /// it).
    pub fn shut_down_service(&self, svc: &ServiceCtx) {
        for l in self.live.borrow().values() {
            if Rc::ptr_eq(&l.service, &svc.policy) {
                l.core.shutdown.set(true);
                l.core.signal.notify();
            }
        }
    }
}

/// Hands an invalidation message to client `target`, on this worker or another, encoded for
/// it; false when no such client is connected.
fn deliver(sessions: &Weak<Sessions>, target: u64, redirected: bool, msg: &Message<'_>) -> bool {
    if let Some(sessions) = sessions.upgrade()
        && let Some(l) = sessions.live.borrow().get(&target)
    {
        let (resp3, pubsub) = l.entry.protocol();
        if let Some(push) = encode(msg, resp3, redirected && pubsub) {
            l.core.push_oob(push);
            l.core.flush();
        }
        return true;
    }
    let Some(entry) = super::directory::find(target) else {
        return false;
    };
    let (resp3, pubsub) = entry.protocol();
    if let Some(push) = encode(msg, resp3, redirected && pubsub) {
        entry.post(push);
    }
    true
}
