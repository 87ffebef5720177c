//! Reply slots and output of one session: each request takes a numbered slot, replies fill
//! slots as they arrive from any upstream connection, and the filled prefix is written to the
//! client in one system call.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;

use bytes::Bytes;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::debug;

use super::output::{OWN_CHUNK, Output};
use super::window::ReplyEstimate;
use crate::command::Command;
use crate::metrics::{CommandHandles, CommandStats, Latency, LatencyBatch, UNKNOWN};
use crate::tracking;
use crate::upstream::{Reply, ReplySink};
use crate::wake::Wake;

/// What made a session's reply writing fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Failure {
    /// Writing to the client failed.
    Broken,
    /// Replies held for the client exceeded `max_client_buffer`.
    SlowReader,
    /// The session ended for another reason; set by `ReplySlots::close`.
    Closed,
}

/// Reply slots and output of one session, shared with the upstream connections that fill
/// and flush them.
pub(super) struct ReplySlots {
    /// The client socket, written by whoever flushes; taken away when the session ends, so
    /// that requests still in flight upstream don't keep the client's socket open.
    pub(super) stream: RefCell<Option<Rc<TcpStream>>>,
    /// One entry per request not yet written to the client, in request order; `None` until
    /// its reply arrives.
    pub(super) slots: RefCell<VecDeque<Option<Bytes>>>,
    /// Token of `slots[0]`.
    pub(super) head: Cell<u64>,
    /// Bytes of replies in `slots`.
    pub(super) held: Cell<usize>,
    /// Slots still waiting for their reply.
    pub(super) unfilled: Cell<usize>,
    /// Reply bytes the client socket hasn't taken yet.
    pub(super) out: RefCell<Output>,
    /// Most bytes `held` + `out` may reach: the service's `max_client_buffer`, set again
    /// by the session on each turn so a reload reaches it.
    pub(super) max_buffer: Cell<usize>,
    /// A flush is already queued for the end of the current upstream batch.
    pub(super) flush_queued: Cell<bool>,
    /// The session task waits on reply progress and wants a wake-up after flushes.
    pub(super) wake_on_progress: Cell<bool>,
    /// Writing to the client failed or overflowed; the session ends.
    pub(super) failure: Cell<Option<Failure>>,
    /// Shutdown was requested.
    pub(super) shutdown: Cell<bool>,
    /// Wakes the session task.
    pub(super) signal: Wake,
    /// The first request of the last read batch (its token, and when it was read), until
    /// its reply goes to the socket: one latency sample per batch, no clock read per reply.
    pub(super) sample: Cell<Option<(u64, Instant)>>,
    /// The service's request latency histogram.
    pub(super) latency: Latency,
    /// Per-command statistics of the requests in flight; `None` while the service's
    /// `command_stats` is off.
    pub(super) tracked: RefCell<Option<Tracked>>,
    /// The size of this client's next upstream reply, as its last ones suggest.
    pub(super) estimate: ReplyEstimate,
    /// CLIENT KILL named this client: the session ends.
    pub(super) killed: Cell<bool>,
    /// Tracked requests waiting for their replies, in token order.
    pub(super) tracked_ops: RefCell<VecDeque<TrackedOp>>,
    /// CLIENT REPLY OFF or SKIP: the slots taken now get no reply.
    pub(super) muting: Cell<bool>,
    /// Slots taken while muting whose reply hasn't come, in order.
    pub(super) muted: RefCell<VecDeque<u64>>,
    /// A NOLOOP write a listener gave back (redirected, or the listener went down before
    /// sending it): its slot and bytes, for the session to send the ordinary way.
    pub(super) redo: RefCell<Option<(u64, Bytes)>>,
}

/// One session's requests whose replies are counted per command.
pub(super) struct Tracked {
    /// The service's per-command handles on this worker.
    pub(super) stats: Rc<CommandStats>,
    /// Requests waiting for their reply, in token order: the token, the command's handles
    /// and when the request was read. At most one per reply slot.
    pub(super) open: VecDeque<(u64, Rc<CommandHandles>, Instant)>,
}

/// A tracking client's request whose reply the tracker must see (`tracking.rs`).
pub(super) struct TrackedOp {
    /// Its slot.
    pub(super) token: u64,
    /// The client's id.
    pub(super) id: u64,
    /// Keys it reads (recorded when the reply comes).
    pub(super) reads: Vec<Bytes>,
    /// The tracker's sequence number when it was sent.
    pub(super) seq: u64,
}

impl ReplySink for ReplySlots {
    fn deliver(&self, token: u64, reply: Reply<'_>) -> bool {
        let flush = self.fill(token, reply);
        if !self.tracked_ops.borrow().is_empty() {
            self.settle_tracking(token);
        }
        flush
    }

    fn flush(&self) {
        self.write_out();
        let out_left = !self.out.borrow().is_empty();
        if self.wake_on_progress.get() || out_left || self.failure.get().is_some() {
            self.signal.notify();
        }
    }

    fn expects_more(&self) -> bool {
        self.unfilled.get() > 0
    }
}

impl ReplySlots {
    /// Puts `reply` in slot `token`; true when the caller should flush.
    fn fill(&self, token: u64, mut reply: Reply<'_>) -> bool {
        if self.failure.get().is_some() {
            // The session is ending (or has ended, see `close`): nobody will read this, so
            // it isn't kept. Without this, a client that left with many big requests in
            // flight would have every reply piled up here until the last one arrived.
            return false;
        }
        let Some(index) = token.checked_sub(self.head.get()) else {
            return false;
        };
        let mut slots = self.slots.borrow_mut();
        let Some(slot) = slots.get_mut(index as usize) else {
            return false;
        };
        if slot.is_none() {
            self.unfilled.set(self.unfilled.get().saturating_sub(1));
            self.estimate.observe(reply.as_slice().len());
            self.settle(token, reply.as_slice());
            if self.is_muted(token) {
                // CLIENT REPLY OFF or SKIP: the reply was read, and goes nowhere.
                reply = Reply::Held(Bytes::new());
            }
            if index == 0 {
                // Next in line: straight to the output, nothing kept.
                slots.pop_front();
                self.head.set(self.head.get() + 1);
                let mut out = self.out.borrow_mut();
                if reply.as_slice().len() < OWN_CHUNK {
                    out.push_slice(reply.as_slice());
                } else {
                    out.push(reply.into_bytes());
                }
                return !self.flush_queued.replace(true);
            }
        }
        let reply = reply.into_bytes();
        self.held.set(self.held.get() + reply.len());
        *slot = Some(reply);
        if self.held.get() + self.out.borrow().len() > self.max_buffer.get() {
            // Over the limit between two flushes (replies that wait for an earlier slot
            // are never flushed): fail now rather than keep what won't be read.
            drop(slots);
            self.fail(Failure::SlowReader);
            return true;
        }
        let head_ready = slots.front().is_some_and(Option::is_some);
        head_ready && !self.flush_queued.replace(true)
    }

    /// The reply of slot `token` came: a tracked read is recorded (or invalidated at once,
    /// behind the reply).
    fn settle_tracking(&self, token: u64) {
        let op = {
            // Only slots waiting for a reply get an entry, and each such slot is filled
            // once (or `fail` clears them all), so this stays as long as the pipeline.
            let mut ops = self.tracked_ops.borrow_mut();
            let at = ops.iter().position(|o| o.token == token);
            at.and_then(|i| ops.remove(i))
        };
        if let Some(op) = op {
            tracking::read_done(op.id, &op.reads, op.seq);
        }
    }

    /// Whether slot `token` waits for its reply.
    pub(super) fn is_pending(&self, token: u64) -> bool {
        token
            .checked_sub(self.head.get())
            .and_then(|i| self.slots.borrow().get(i as usize).map(Option::is_none))
            .unwrap_or(false)
    }

    /// Appends a message that isn't a reply (an invalidation push): behind every reply owed
    /// now, so it never overtakes the reply it is about.
    pub(super) fn push_oob(&self, msg: Bytes) {
        if self.failure.get().is_some() {
            return;
        }
        let mut slots = self.slots.borrow_mut();
        if slots.is_empty() {
            self.out.borrow_mut().push_slice(&msg);
        } else {
            self.held.set(self.held.get() + msg.len());
            slots.push_back(Some(msg));
        }
    }

    /// Reserves the next slot; returns its token.
    /// The token the next slot will get.
    pub(super) fn next_token(&self) -> u64 {
        self.head.get() + self.slots.borrow().len() as u64
    }

    pub(super) fn push_pending(&self) -> u64 {
        let mut slots = self.slots.borrow_mut();
        slots.push_back(None);
        self.unfilled.set(self.unfilled.get() + 1);
        let token = self.head.get() + slots.len() as u64 - 1;
        if self.muting.get() {
            self.muted.borrow_mut().push_back(token);
        }
        token
    }

    /// Whether slot `token`'s reply is dropped (CLIENT REPLY); forgets it if so.
    fn is_muted(&self, token: u64) -> bool {
        let mut muted = self.muted.borrow_mut();
        if muted.is_empty() {
            return false;
        }
        let head = self.head.get();
        // Slots before the head went out (or were dropped with a failure).
        while muted.front().is_some_and(|&t| t < head) {
            muted.pop_front();
        }
        match muted.iter().position(|&t| t == token) {
            Some(i) => {
                muted.remove(i);
                true
            }
            None => false,
        }
    }

    /// Appends a reply the proxy made itself.
    pub(super) fn push_ready(&self, reply: Bytes) {
        let reply = if self.muting.get() {
            Bytes::new()
        } else {
            reply
        };
        if self.tracked.borrow().is_some() {
            self.settle(self.next_token(), &reply);
        }
        self.held.set(self.held.get() + reply.len());
        self.slots.borrow_mut().push_back(Some(reply));
    }

    /// Moves the filled prefix of the slots to the output and writes as much as the socket
    /// takes, without waiting. Records a failure instead of returning it, since upstream tasks
    /// call this for the session.
    pub(super) fn write_out(&self) {
        self.flush_queued.set(false);
        if self.failure.get().is_some() {
            return;
        }
        let mut out = self.out.borrow_mut();
        {
            let mut slots = self.slots.borrow_mut();
            while let Some(Some(_)) = slots.front() {
                if let Some(Some(reply)) = slots.pop_front() {
                    self.held.set(self.held.get() - reply.len());
                    self.head.set(self.head.get() + 1);
                    out.push(reply);
                }
            }
        }
        let stream = self.stream.borrow();
        let Some(stream) = stream.as_ref() else {
            return;
        };
        if let Err(e) = out.write_to(stream) {
            debug!(error = %e, "write to client failed");
            self.failure.set(Some(Failure::Broken));
            return;
        }
        if let Some((token, read_at)) = self.sample.get()
            && self.head.get() > token
        {
            // Its reply is in `out` or written: sampled at the first write attempt.
            self.sample.set(None);
            let mut batch = LatencyBatch::default();
            batch.observe(read_at.elapsed());
            self.latency.add(&batch);
        }
        if out.len() + self.held.get() > self.max_buffer.get() {
            drop(out);
            self.fail(Failure::SlowReader);
        }
    }

    /// Records why the session must end and drops the replies held for it: they will never
    /// be written, and replies still in flight are dropped as they arrive (`deliver`).
    pub(super) fn fail(&self, failure: Failure) {
        if self.failure.get().is_none() {
            self.failure.set(Some(failure));
        }
        self.slots.borrow_mut().clear();
        self.held.set(0);
        self.unfilled.set(0);
        self.out.borrow_mut().clear();
        self.tracked_ops.borrow_mut().clear();
        if let Some(t) = self.tracked.borrow_mut().as_mut() {
            t.open.clear();
        }
    }

    /// The session ended: closes the client socket (requests still in flight upstream must
    /// not keep it open) and drops what is held for it.
    pub(super) fn close(&self) {
        self.stream.borrow_mut().take();
        self.fail(Failure::Closed);
    }

    /// Turns per-command statistics on (`Some`: the service's handles) or off.
    pub(super) fn count_commands(&self, stats: Option<&Rc<CommandStats>>) {
        let mut tracked = self.tracked.borrow_mut();
        match stats {
            Some(stats) if tracked.is_none() => {
                *tracked = Some(Tracked {
                    stats: Rc::clone(stats),
                    open: VecDeque::new(),
                });
            }
            None if tracked.is_some() => *tracked = None,
            _ => {}
        }
    }

    /// Starts tracking the request about to take the next slot, read at `read_at`; returns
    /// its token, or `None` when statistics are off.
    pub(super) fn track(&self, cmd: Option<Command>, read_at: Instant) -> Option<u64> {
        let mut tracked = self.tracked.borrow_mut();
        let t = tracked.as_mut()?;
        let token = self.next_token();
        let head = self.head.get();
        // A slot before the head has gone to the client: its entry can never settle. (Every
        // slot is settled as it fills; this only keeps the queue bounded by the slots.)
        while t.open.front().is_some_and(|(open, ..)| *open < head) {
            t.open.pop_front();
        }
        let name = cmd.map_or(UNKNOWN, |c| c.info.name);
        t.open.push_back((token, t.stats.handles(name), read_at));
        Some(token)
    }

    /// Forgets the request tracked as `token` if it took no slot (it is offered again later,
    /// or it left normal mode).
    pub(super) fn untrack_unused(&self, token: Option<u64>) {
        let Some(token) = token else {
            return;
        };
        if self.next_token() != token {
            return;
        }
        if let Some(t) = self.tracked.borrow_mut().as_mut()
            && t.open.back().is_some_and(|(open, ..)| *open == token)
        {
            t.open.pop_back();
        }
    }

    /// Counts `reply` for the request in slot `token`, if it is tracked.
    pub(super) fn settle(&self, token: u64, reply: &[u8]) {
        let mut tracked = self.tracked.borrow_mut();
        let Some(t) = tracked.as_mut() else {
            return;
        };
        let i = t.open.partition_point(|(open, ..)| *open < token);
        if t.open.get(i).is_some_and(|(open, ..)| *open == token)
            && let Some((_, handles, read_at)) = t.open.remove(i)
        {
            handles.record(reply.first() == Some(&b'-'), read_at.elapsed());
        }
    }

    /// Requests whose replies haven't been moved to the output yet.
    pub(super) fn outstanding(&self) -> usize {
        self.slots.borrow().len()
    }

    /// Bytes waiting for the client socket.
    pub(super) fn out_len(&self) -> usize {
        self.out.borrow().len()
    }
}
