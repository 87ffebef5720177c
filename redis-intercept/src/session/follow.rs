//! What a session follows between two turns: a reload's new routes, the lane its replies'
//! sizes call for, and the flags CLIENT LIST shows.

use std::rc::Rc;

use tracing::debug;

use super::{Session, client_counts, directory, forward};

impl Session {
    /// Moves the client to the newest generation of its service's routes once a reload has
    /// built one and nothing ties the client to its own: no transaction, WATCH, blocking
    /// command, subscription or delayed request. Replies still owed on the old connections
    /// come in first, so the client's commands keep their order. Returns whether it waits
    /// for them.
    pub(super) fn follow_reload(&mut self) -> bool {
        if self.delayed.is_some()
            || self.stateful.subscribe.is_some()
            || self.stateful.active(&self.forwarder)
        {
            return false;
        }
        let Some(latest) = self.svc.replaced_by() else {
            return false;
        };
        if self.declined.as_ref().is_some_and(|(old, db)| {
            std::ptr::eq(old.as_ptr(), Rc::as_ptr(&latest)) && *db == self.forwarder.db()
        }) {
            return false;
        }
        if self.core.unfilled.get() > 0 {
            return true;
        }
        let mut forwarder = forward::Forwarder::new(
            &latest.routes,
            self.state.id,
            &latest.discard,
            &client_counts(&latest),
        );
        if self.state.resp3 {
            forwarder.set_protocol(true);
        }
        let db = self.forwarder.db();
        if db != 0 && forwarder.select(i64::from(db)).is_err() {
            debug!(service = %self.svc.name, client = self.state.id, db, "the reloaded routes can't serve the client's database; it keeps the old ones");
            self.declined = Some((Rc::downgrade(&latest), db));
            return false;
        }
        self.forwarder = forwarder;
        self.svc = latest;
        false
    }

    /// Keeps the flags CLIENT LIST shows up to date (a store only when they change).
    pub(super) fn show_flags(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        let mut flags = 0;
        if self.stateful.multi {
            flags |= directory::flag::MULTI;
        }
        if self.stateful.is_blocked() && self.core.unfilled.get() > 0 {
            flags |= directory::flag::BLOCKED;
        }
        if let Some(t) = &self.state.tracking {
            flags |= directory::flag::TRACKING;
            if t.broken_redirect.get() {
                flags |= directory::flag::BROKEN_REDIRECT;
            }
            if t.opts.borrow().bcast {
                flags |= directory::flag::BCAST;
            }
        }
        let entry = &self.state.entry;
        if entry.flags.load(Relaxed) != flags {
            entry.flags.store(flags, Relaxed);
        }
    }

    /// Moves the client to the bulk lane once its replies are big, and back once they are
    /// small, between two requests: never with a request in flight, which could then run
    /// after a later one sent on the other connection.
    pub(super) fn follow_lane(&mut self) {
        if self.core.unfilled.get() == 0 && self.delayed.is_none() {
            let bulk = self.core.estimate.wants_bulk();
            if bulk != self.forwarder.is_bulk() {
                self.forwarder.set_bulk(bulk);
            }
        }
    }
}
