//! The process-wide budget for client input (`[proxy] query_buffer_budget`): the bytes every
//! client's unparsed input holds, across workers, with a rule for who may read more once it
//! is spent.
//!
//! Two kinds of bytes count: clients' unparsed input, and requests queued for upstream
//! connections but not yet taken by their writers (`queued`). Under the budget everyone
//! reads. Over it, clients holding little (an ordinary command) still read, and the clients
//! holding the most stop, except one at a time: the first to ask gets the permit and reads
//! until its request is complete, so big requests still finish one after another instead of
//! all waiting for each other. The permit is only given while the queued part is under the
//! budget, so a slow node makes the big writers wait instead of its queue growing; queues
//! drain by themselves, so that wait always ends. Memory then stays within about twice the
//! budget plus one client's request.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;

/// What counts as holding little once the budget is spent: a fraction of it, at least
/// this much.
const SMALL_FLOOR: usize = 1024 * 1024;

/// The shared budget; one per process, handed to every session.
#[derive(Debug)]
pub struct QueryBudget {
    /// Bytes held by all clients now: input buffers and queued requests.
    held: AtomicUsize,
    /// Of `held`, the bytes queued for upstream connections.
    queued: AtomicUsize,
    /// The budget (`query_buffer_budget`).
    limit: usize,
    /// Most input one client may hold (`client_query_buffer_limit`); past it the client is
    /// closed, as Redis does.
    pub client_limit: usize,
    /// Client id of the one big holder that may read while the budget is spent; 0: none.
    permit: AtomicU64,
    /// `held`, exported.
    gauge: Gauge,
    /// Times a client had to stop reading because the budget was spent.
    pub paused: Counter,
}

impl QueryBudget {
    /// A budget of `limit` bytes, with `client_limit` per client.
    pub fn new(limit: usize, client_limit: usize, gauge: Gauge, paused: Counter) -> QueryBudget {
        QueryBudget {
            held: AtomicUsize::new(0),
            queued: AtomicUsize::new(0),
            limit,
            client_limit,
            permit: AtomicU64::new(0),
            gauge,
            paused,
        }
    }

    /// Counts `n` more bytes held.
    pub fn charge(&self, n: usize) {
        let now = self.held.fetch_add(n, Ordering::Relaxed) + n;
        self.gauge.set(i64::try_from(now).unwrap_or(i64::MAX));
    }

    /// Counts `n` bytes given back.
    pub fn refund(&self, n: usize) {
        let now = self.held.fetch_sub(n, Ordering::Relaxed).saturating_sub(n);
        self.gauge.set(i64::try_from(now).unwrap_or(i64::MAX));
    }

    /// Counts `n` more request bytes queued for an upstream connection.
    pub fn charge_queued(&self, n: usize) {
        self.queued.fetch_add(n, Ordering::Relaxed);
        self.charge(n);
    }

    /// Counts `n` queued request bytes taken by their connection's writer.
    pub fn refund_queued(&self, n: usize) {
        let _ = self
            .queued
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |q| {
                Some(q.saturating_sub(n))
            });
        self.refund(n);
    }

    /// Whether client `id`, holding `mine` bytes, may read more now.
    pub fn may_read(&self, id: u64, mine: usize) -> bool {
        if self.held.load(Ordering::Relaxed) < self.limit || mine < self.small() {
            return true;
        }
        if self.queued.load(Ordering::Relaxed) >= self.limit {
            // The nodes are behind: nobody big goes on until their queues drain.
            return false;
        }
        match self
            .permit
            .compare_exchange(0, id, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => true,
            Err(holder) => holder == id,
        }
    }

    /// Client `id` holds nothing any more: if it had the permit, the next big holder may
    /// take it.
    pub fn done(&self, id: u64) {
        // A load first: this runs at every turn of every session, and only the permit's
        // holder needs the exchange.
        if self.permit.load(Ordering::Relaxed) == id {
            let _ = self
                .permit
                .compare_exchange(id, 0, Ordering::AcqRel, Ordering::Acquire);
        }
    }

    /// Below this a client holds little.
    fn small(&self) -> usize {
        (self.limit / 16).max(SMALL_FLOOR)
    }

    /// Bytes held now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(limit: usize) -> QueryBudget {
        QueryBudget::new(limit, usize::MAX, Gauge::default(), Counter::default())
    }

    #[test]
    fn under_the_budget_everyone_reads() {
        let b = budget(64 << 20);
        b.charge(10 << 20);
        assert!(b.may_read(1, 10 << 20));
        assert!(b.may_read(2, 0));
    }

    #[test]
    fn over_it_small_holders_read_and_one_big_holder_at_a_time() {
        let b = budget(64 << 20);
        for _ in 0..4 {
            b.charge(20 << 20);
        }
        assert!(b.held() >= 64 << 20);
        // Ordinary clients go on.
        assert!(b.may_read(9, 4096));
        // The first big holder takes the permit; the others wait.
        assert!(b.may_read(1, 20 << 20));
        assert!(!b.may_read(2, 20 << 20));
        assert!(b.may_read(1, 30 << 20));
        // Its request done, the permit passes on.
        b.refund(30 << 20);
        b.done(1);
        b.done(2);
        assert!(b.held() < 64 << 20);
        b.charge(30 << 20);
        assert!(b.may_read(2, 20 << 20));
        assert!(!b.may_read(3, 20 << 20));
        // Someone else's done doesn't take the permit away.
        b.done(3);
        assert!(b.may_read(2, 20 << 20));
    }

    #[test]
    fn no_big_reads_while_the_nodes_queues_hold_the_budget() {
        let b = budget(64 << 20);
        b.charge(8 << 20);
        b.charge_queued(64 << 20);
        // Even the permit holder waits: its request would only join the queue.
        assert!(!b.may_read(1, 8 << 20));
        assert!(b.may_read(2, 4096));
        // The writers took the queue: reading goes on.
        b.refund_queued(64 << 20);
        assert!(b.may_read(1, 8 << 20));
    }
}
