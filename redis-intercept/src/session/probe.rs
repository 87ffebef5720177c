//! The probe of a pinned cluster connection: the first keyed command sent on it is kept
//! until its reply shows that the node owns the key's slot; a MOVED (the slot map was out of
//! date) sends the held commands and that command again to the slot's new owner.

use std::cell::RefCell;
use std::rc::Rc;

use bytes::Bytes;
use tokio::time::Instant;

use super::Session;
use super::replies::ReplySlots;
use crate::resp::RequestParser;
use crate::upstream::{Reply, ReplySink};

/// The first keyed command sent on a client's new cluster connection, kept until its reply
/// is in: a MOVED (the slot map was out of date) sends it again, with the held commands
/// before it, to the slot's new owner, so the transaction or blocking command runs where the
/// key is. The client's later commands wait meanwhile (they would go to the old node).
pub(super) struct Probe {
    /// Held commands sent before it (MULTI, keyless ones), encoded; their replies are dropped.
    pub(super) held: Vec<Bytes>,
    /// The command, encoded as the client sent it.
    pub(super) first: Bytes,
    /// Its reply slot.
    pub(super) token: u64,
    /// Redirects followed so far.
    pub(super) hops: u8,
    /// A MOVED reply, caught by [`ProbeSink`] instead of reaching the client.
    pub(super) redirect: Rc<RefCell<Option<Bytes>>>,
}

/// Redirects a probe follows before its MOVED goes to the client as it is.
pub(super) const MAX_PROBE_HOPS: u8 = 5;

/// Where a probe's reply goes: a MOVED is kept for the session, anything else fills the
/// client's reply slot.
pub(super) struct ProbeSink {
    /// The client.
    pub(super) core: Rc<ReplySlots>,
    /// Where a MOVED is kept.
    pub(super) redirect: Rc<RefCell<Option<Bytes>>>,
}

impl ReplySink for ProbeSink {
    fn deliver(&self, token: u64, reply: Reply<'_>) -> bool {
        if reply.as_slice().starts_with(b"-MOVED ") {
            *self.redirect.borrow_mut() = Some(reply.into_bytes());
            // The session follows it; its slot stays unfilled meanwhile.
            self.core.signal.notify();
            return false;
        }
        self.core.deliver(token, reply)
    }

    fn flush(&self) {
        self.core.flush();
    }

    fn expects_more(&self) -> bool {
        self.core.expects_more()
    }
}

impl Session {
    /// Follows a probe's MOVED: pins the client to the slot's new owner and sends the held
    /// commands and the probed one there. After [`MAX_PROBE_HOPS`], or if the MOVED can't be
    /// followed, the client gets it as it is. Also ends a probe whose reply came.
    pub(super) fn follow_probe(&mut self) {
        let Some(probe) = &mut self.stateful.probe else {
            return;
        };
        let Some(moved) = probe.redirect.borrow_mut().take() else {
            if self.core.unfilled.get() == 0 {
                self.stateful.probe = None;
            }
            return;
        };
        probe.hops += 1;
        if probe.hops > MAX_PROBE_HOPS || !self.forwarder.follow_moved(&moved) {
            let token = probe.token;
            self.stateful.probe = None;
            let _ = self.core.deliver(token, moved.into());
            return;
        }
        let (held, first, token) = (probe.held.clone(), probe.first.clone(), probe.token);
        let redirect = Rc::clone(&probe.redirect);
        let deadline = Instant::now() + self.svc.policy().op_timeout;
        self.send_held(&held, deadline);
        let mut parser = RequestParser::new(self.svc.limits);
        // `first` was encoded from a parsed request, so it parses again.
        if let Ok(Some(n)) = parser.parse(&first) {
            let req = parser.request(&first[..n]);
            let cmd = crate::command::lookup(&req);
            let sink = Rc::new(ProbeSink {
                core: Rc::clone(&self.core),
                redirect,
            });
            self.send_to(&req, cmd, token, deadline, sink);
        }
    }
}
