//! How much a client may have owed by upstreams at once, in reply bytes rather than in
//! requests: a client's window (`reply_window`), and its worker's budget for clients whose
//! replies are big or not yet known (`big_reply_budget`), so that a few clients pipelining
//! megabyte replies can neither fill a shared connection ahead of everyone else nor make
//! Redis buffer gigabytes for the proxy.
//!
//! Reply sizes aren't known before they come; each client's next reply is estimated from
//! its last ones (rising at once, falling by an eighth per reply). Until its first reply a
//! client counts against the budget, with one request at a time, so a new connection's
//! first pipeline is bounded too (it costs a new connection one round trip).

use std::cell::Cell;

use std::rc::Rc;

use super::{ReplySlots, Sessions};
use crate::service::Policy;

/// An estimated reply at least this big makes a client's requests go on the bulk lane
/// (see `upstream::lanes`).
pub(super) const BIG_REPLY: usize = 64 * 1024;

/// What a client's request counts for against the budget before any of its replies has
/// come: a quarter of a MiB, so that a worker has at most sixteen such requests in flight
/// with the default 4 MiB budget. New connections rarely wait; a burst of new connections
/// asking for big values makes Redis buffer at most sixteen of those replies at once.
const UNKNOWN_REPLY: usize = 256 * 1024;

/// One client's estimate of its next reply's size.
pub(super) struct ReplyEstimate {
    /// Bytes.
    bytes: Cell<usize>,
    /// A reply has been seen.
    sized: Cell<bool>,
}

impl Default for ReplyEstimate {
    fn default() -> Self {
        ReplyEstimate {
            bytes: Cell::new(BIG_REPLY),
            sized: Cell::new(false),
        }
    }
}

impl ReplyEstimate {
    /// Counts a reply of `len` bytes: the estimate jumps up to a bigger reply at once and
    /// comes down slowly, so a client alternating sizes is judged by its big ones.
    pub(super) fn observe(&self, len: usize) {
        let now = self.bytes.get();
        self.bytes.set(len.max(now - now / 8));
        self.sized.set(true);
    }

    /// The estimate, at least one byte.
    pub(super) fn bytes(&self) -> usize {
        self.bytes.get().max(1)
    }

    /// What one more request of the client is taken to cost: the estimate, or before any
    /// reply has come, [`UNKNOWN_REPLY`] (one request at a time: nothing is known of what
    /// it will get).
    pub(super) fn cost(&self, policy: &Policy) -> usize {
        if self.sized.get() {
            self.bytes()
        } else {
            UNKNOWN_REPLY.min(policy.reply_window).max(1)
        }
    }

    /// Whether the client counts against its worker's big-reply budget: its replies are big,
    /// or none has come yet.
    pub(super) fn is_big(&self) -> bool {
        !self.sized.get() || self.bytes.get() >= BIG_REPLY
    }

    /// Whether the client's requests belong on the bulk lane: replies seen, and big.
    pub(super) fn wants_bulk(&self) -> bool {
        self.sized.get() && self.bytes.get() >= BIG_REPLY
    }
}

/// Whether a client may send one more request now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Room {
    /// Yes.
    Yes,
    /// Its own limit (`max_pipeline` or `reply_window`) is reached: wait for its replies.
    Full,
    /// The worker's big-reply budget is spent by others: look again shortly.
    Budget,
}

/// A session's share of its worker's big-reply budget.
#[derive(Default)]
pub(super) struct Window {
    /// What this session has added to the worker's total.
    charged: usize,
}

impl Window {
    /// Brings this session's part of `owed` (the worker's total for big-reply clients) up to
    /// date with its requests in flight, and says whether one more may go.
    pub(super) fn room(&mut self, core: &ReplySlots, policy: &Policy, sessions: &Sessions) -> Room {
        let owed = &sessions.big_replies_owed;
        let est = &core.estimate;
        let unfilled = core.unfilled.get();
        let charge = if est.is_big() {
            unfilled.saturating_mul(est.cost(policy))
        } else {
            0
        };
        owed.set(
            owed.get()
                .saturating_sub(self.charged)
                .saturating_add(charge),
        );
        if charge < self.charged {
            wake_waiters(sessions);
        }
        self.charged = charge;
        let class = if !est.is_big() {
            Class::Small
        } else if est.wants_bulk() {
            Class::Big
        } else {
            Class::Unknown
        };
        decide(
            core.outstanding(),
            unfilled,
            est.cost(policy),
            class,
            owed.get() - charge,
            policy,
        )
    }

    /// Takes this session's part out of the worker's total (the session ends).
    pub(super) fn release(&mut self, sessions: &Sessions) {
        let owed = &sessions.big_replies_owed;
        owed.set(owed.get().saturating_sub(self.charged));
        if self.charged > 0 {
            wake_waiters(sessions);
        }
        self.charged = 0;
    }
}

/// Registers `core`'s session to be woken when budget is given back (it found none).
pub(super) fn wait_for_budget(core: &Rc<ReplySlots>, sessions: &Sessions) {
    let mut waiters = sessions.budget_waiters.borrow_mut();
    // Bounded by the sessions: each waits at most once at a time.
    if !waiters
        .iter()
        .any(|w| std::ptr::eq(w.as_ptr(), Rc::as_ptr(core)))
    {
        waiters.push(Rc::downgrade(core));
    }
}

/// Wakes every session waiting for budget; each looks again on its next turn (a new
/// connection's first request must not wait out a timer behind big-reply clients).
fn wake_waiters(sessions: &Sessions) {
    let waiters = std::mem::take(&mut *sessions.budget_waiters.borrow_mut());
    for w in waiters {
        if let Some(core) = w.upgrade() {
            core.signal.notify();
        }
    }
}

/// What a client's replies are known to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    /// Small: bounded by its window alone.
    Small,
    /// Big: also by the worker's budget, of which it may use three quarters.
    Big,
    /// Not known yet (no reply so far): by the whole budget. The quarter big clients can't
    /// take keeps new connections from waiting behind them.
    Unknown,
}

/// [`Window::room`]'s rule: `outstanding` requests without their reply written, `unfilled`
/// of them still owed upstream, `est` bytes each, `others` owed to the worker's other
/// big-reply clients.
fn decide(
    outstanding: usize,
    unfilled: usize,
    est: usize,
    class: Class,
    others: usize,
    policy: &Policy,
) -> Room {
    if outstanding >= policy.max_pipeline {
        return Room::Full;
    }
    // Nothing known of its replies yet: one at a time.
    if class == Class::Unknown && unfilled > 0 {
        return Room::Full;
    }
    let after = unfilled.saturating_add(1).saturating_mul(est);
    // One request at a time always fits its own window, however big its reply.
    if unfilled > 0 && after > policy.reply_window {
        return Room::Full;
    }
    let budget = match class {
        Class::Small => return Room::Yes,
        Class::Big => policy.big_reply_budget - policy.big_reply_budget / 4,
        Class::Unknown => policy.big_reply_budget,
    };
    // Nobody else owed anything: one client alone is bounded by its window.
    if others > 0 && others.saturating_add(after) > budget {
        return Room::Budget;
    }
    Room::Yes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;

    fn policy() -> Policy {
        let c = config::Config::parse(config::MINIMAL, "test.toml").unwrap();
        let mut p = crate::service::policy(&c.services[0]);
        p.max_pipeline = 100;
        p.reply_window = 1 << 20;
        p.big_reply_budget = 16 << 20;
        p
    }

    #[test]
    fn small_replies_are_bounded_by_the_pipeline_only() {
        let p = policy();
        assert_eq!(decide(99, 99, 10, Class::Small, 1 << 30, &p), Room::Yes);
        assert_eq!(decide(100, 0, 10, Class::Small, 0, &p), Room::Full);
    }

    #[test]
    fn big_replies_are_bounded_by_the_window_and_the_budget() {
        let p = policy();
        let big = Class::Big;
        // 1 MiB replies: one at a time.
        assert_eq!(decide(0, 0, 1 << 20, big, 0, &p), Room::Yes);
        assert_eq!(decide(1, 1, 1 << 20, big, 0, &p), Room::Full);
        // 64 KiB: sixteen at a time.
        assert_eq!(decide(15, 15, 64 << 10, big, 0, &p), Room::Yes);
        assert_eq!(decide(16, 16, 64 << 10, big, 0, &p), Room::Full);
        // Others hold the budget: wait, unless nobody else owes anything.
        assert_eq!(decide(0, 0, 1 << 20, big, 16 << 20, &p), Room::Budget);
        assert_eq!(decide(0, 0, 32 << 20, big, 0, &p), Room::Yes);
        // Big clients leave a quarter to clients not known yet.
        assert_eq!(decide(0, 0, 1 << 20, big, 12 << 20, &p), Room::Budget);
        assert_eq!(
            decide(0, 0, 1 << 20, Class::Unknown, 12 << 20, &p),
            Room::Yes
        );
        assert_eq!(
            decide(0, 0, 1 << 20, Class::Unknown, 15 << 20, &p),
            Room::Yes
        );
        assert_eq!(
            decide(0, 0, 1 << 20, Class::Unknown, 16 << 20, &p),
            Room::Budget
        );
        // Not known yet: one at a time, whatever it is taken to cost.
        assert_eq!(decide(1, 1, 10, Class::Unknown, 0, &p), Room::Full);
        // A small client never waits for the budget.
        assert_eq!(decide(0, 0, 10, Class::Small, 1 << 30, &p), Room::Yes);
    }

    #[test]
    fn the_estimate_rises_at_once_and_falls_slowly() {
        let e = ReplyEstimate::default();
        assert!(e.is_big() && !e.wants_bulk());
        e.observe(10);
        assert_eq!(e.bytes(), 56 << 10);
        assert!(!e.is_big());
        e.observe(1 << 20);
        assert!(e.wants_bulk());
        for _ in 0..20 {
            e.observe(10);
        }
        assert!(e.wants_bulk(), "still judged by its big replies");
        for _ in 0..10 {
            e.observe(10);
        }
        assert!(!e.is_big());
    }
}
