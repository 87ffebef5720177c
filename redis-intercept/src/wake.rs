//! A wake-up flag for one waiting task on a single-threaded runtime: cheaper than
//! `tokio::sync::Notify` (no mutex, no waiter list) on the per-request path.

use std::cell::Cell;
use std::future::poll_fn;
use std::task::{Context, Poll, Waker};

/// Set by [`Wake::notify`], consumed by one waiter. Notifications don't accumulate: many
/// notifies before a wait make it return once.
#[derive(Default)]
pub struct Wake {
    /// A notification is pending.
    set: Cell<bool>,
    /// The task waiting, if any.
    waker: Cell<Option<Waker>>,
}

impl Wake {
    /// Records a notification and wakes the waiter.
    pub fn notify(&self) {
        self.set.set(true);
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }

    /// Ready (and consumed) if a notification is pending; otherwise registers `cx`'s waker.
    pub fn poll(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.set.replace(false) {
            return Poll::Ready(());
        }
        let waker = match self.waker.take() {
            Some(w) if w.will_wake(cx.waker()) => w,
            _ => cx.waker().clone(),
        };
        self.waker.set(Some(waker));
        Poll::Pending
    }

    /// Waits for the next notification (or consumes a pending one).
    pub async fn wait(&self) {
        poll_fn(|cx| self.poll(cx)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn notifications_before_the_wait_are_kept_once() {
        let s = Wake::default();
        s.notify();
        s.notify();
        s.wait().await;
        let pending = poll_fn(|cx| Poll::Ready(s.poll(cx).is_pending())).await;
        assert!(pending);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn notify_wakes_a_waiting_task() {
        let local = tokio::task::LocalSet::new();
        local
            .run_until(async {
                let s = std::rc::Rc::new(Wake::default());
                let s2 = s.clone();
                let waiter = tokio::task::spawn_local(async move { s2.wait().await });
                tokio::task::yield_now().await;
                s.notify();
                waiter.await.unwrap();
            })
            .await;
    }
}
