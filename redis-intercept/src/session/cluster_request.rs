//! One request in flight on a cluster: it follows MOVED and ASK, retries TRYAGAIN and
//! CLUSTERDOWN as `cluster::decide` says, and is held and sent again while its node is
//! down or its slot has no master, within its deadline; then it hands the final reply to its
//! parent (the client's slot, or a merge).

use std::cell::{Cell, RefCell};
use std::rc::{Rc, Weak};

use bytes::Bytes;
use tokio::time::Instant;

use super::cluster::{ClusterShared, EncodedRequest, NOT_SERVED};
use crate::cluster::{Decision, Hops, RedirectKind, Slot, decide, retry_wait};
use crate::upstream::{NodeConn, Reply, ReplySink, ReplyTo, UpstreamError, error_reply};

/// A request in flight on a cluster: follows redirects and retries, then hands the final
/// reply to its parent (the client's slot, or a merge).
pub(super) struct ClusterRequest {
    /// The client's shared routing state.
    pub(super) shared: Rc<ClusterShared>,
    /// Who gets the final reply.
    pub(super) parent: Rc<dyn ReplySink>,
    /// The parent's token for it.
    pub(super) token: u64,
    /// The encoded request, for re-sending.
    pub(super) request: EncodedRequest,
    /// The request's slot (`None` for keyless commands).
    pub(super) slot: Option<Slot>,
    /// Redirects and retries so far.
    pub(super) hops: Cell<Hops>,
    /// When the client stops waiting.
    pub(super) deadline: Instant,
    /// The command only reads: after a connection broke under it, running it again can't
    /// apply anything twice.
    pub(super) read_only: bool,
    /// Where it was last sent (its host fills redirects that name none).
    pub(super) sent_to: RefCell<Option<NodeConn>>,
    /// This sink, to hand to connections when re-sending.
    pub(super) me: Weak<ClusterRequest>,
}

impl ClusterRequest {
    /// A request on its way to the node `conn` (`None`: none serves its slot yet).
    pub(super) fn new(
        shared: &Rc<ClusterShared>,
        conn: Option<&NodeConn>,
        request: EncodedRequest,
        slot: Option<Slot>,
        read_only: bool,
        to: ReplyTo,
    ) -> Rc<ClusterRequest> {
        let deadline = to.deadline;
        Rc::new_cyclic(|me| ClusterRequest {
            read_only,
            shared: Rc::clone(shared),
            parent: to.sink,
            token: to.token,
            request,
            slot,
            hops: Cell::new(Hops::default()),
            deadline,
            sent_to: RefCell::new(conn.cloned()),
            me: me.clone(),
        })
    }

    /// Sends `request` to `conn` with a new follower as its sink.
    pub(super) fn send(
        shared: &Rc<ClusterShared>,
        conn: &NodeConn,
        request: EncodedRequest,
        slot: Option<Slot>,
        read_only: bool,
        to: ReplyTo,
    ) -> Result<(), Bytes> {
        let deadline = to.deadline;
        let follow = ClusterRequest::new(shared, Some(conn), request, slot, read_only, to);
        let sent = follow
            .request
            .with(|resp| conn.send_encoded(resp, ReplyTo::new(follow.clone(), 0, deadline)));
        match sent {
            Ok(()) => Ok(()),
            Err(e) => follow.hold_or_fail(e).map_or(Ok(()), Err),
        }
    }

    /// Re-sends after a redirect, a retry or a hold; `Err` is the reply to give instead (or
    /// the request is held again, see [`ClusterRequest::hold_or_fail`]).
    pub(super) fn resend(&self, conn: NodeConn, asking: bool) -> Result<(), Bytes> {
        let Some(me) = self.me.upgrade() else {
            return Err(error_reply("request abandoned"));
        };
        let result = self.request.with(|resp| {
            if asking {
                conn.send_asking(
                    resp,
                    Rc::clone(&self.shared.discard),
                    ReplyTo::new(me, 0, self.deadline),
                )
            } else {
                conn.send_encoded(resp, ReplyTo::new(me, 0, self.deadline))
            }
        });
        *self.sent_to.borrow_mut() = Some(conn);
        match result {
            Ok(()) => Ok(()),
            Err(e) => self.hold_or_fail(e).map_or(Ok(()), Err),
        }
    }

    /// A request whose node failed it without running it (refused, not connected yet,
    /// queue full), or a read whose connection broke under it: while its deadline allows,
    /// it waits and goes again to its slot's master as the slot map says then, so a
    /// failover shorter than `op_timeout` isn't seen. Anything that may have run is never
    /// sent again. `Some` is the reply to give instead; `None`: held.
    pub(super) fn hold_or_fail(&self, error: UpstreamError) -> Option<Bytes> {
        let safe =
            error.never_sent() || (self.read_only && matches!(error, UpstreamError::Lost { .. }));
        self.hold(safe, error.reply())
    }

    /// Holds the request for another try if `safe` and its deadline allows (keyed requests
    /// only: their slot says where to go next); otherwise `Some(reply)` to give instead.
    pub(super) fn hold(&self, safe: bool, reply: Bytes) -> Option<Bytes> {
        let hops = self.hops.get();
        let left = self.deadline.saturating_duration_since(Instant::now());
        let wait = retry_wait(hops.retries, left).filter(|_| safe && self.slot.is_some());
        let (Some(wait), Some(me)) = (wait, self.me.upgrade()) else {
            return Some(reply);
        };
        self.hops.set(Hops {
            retries: hops.retries.saturating_add(1),
            ..hops
        });
        // Counts toward a topology refresh, which is what names the new master.
        self.shared.pool.note_retry();
        tokio::task::spawn_local(async move {
            tokio::time::sleep(wait).await;
            let result = match me.retry_target() {
                Ok(conn) => me.resend(conn, false),
                // Still no master for the slot: wait on.
                Err(e) if e == NOT_SERVED => me.hold(true, e).map_or(Ok(()), Err),
                Err(e) => Err(e),
            };
            if let Err(e) = result
                && me.parent.deliver(me.token, e.into())
            {
                me.parent.flush();
            }
        });
        None
    }

    /// Handles a redirect or retry reply as [`decide`] says; `None` when the request went
    /// out again, otherwise the reply to pass on.
    pub(super) fn redirect(&self, reply: Bytes) -> Option<Bytes> {
        let hops = self.hops.get();
        let pool = &self.shared.pool;
        let host = self
            .sent_to
            .borrow()
            .as_ref()
            .map(|c| c.host().to_owned())
            .unwrap_or_default();
        let left = self.deadline.saturating_duration_since(Instant::now());
        match decide(&reply, &host, hops, left) {
            Decision::PassOn => Some(reply),
            Decision::GiveUp(error) => Some(error),
            Decision::Follow(r) => {
                self.hops.set(Hops {
                    redirects: hops.redirects.saturating_add(1),
                    ..hops
                });
                let conn = match pool.conn(&r.addr, self.shared.key.get()) {
                    Ok(c) => c,
                    Err(e) => return Some(e),
                };
                let asking = r.kind == RedirectKind::Ask;
                if asking {
                    pool.note_ask();
                } else {
                    pool.note_moved(r.slot, &r.addr);
                }
                self.resend(conn, asking).err()
            }
            Decision::RetryAfter(wait) => {
                self.hops.set(Hops {
                    retries: hops.retries.saturating_add(1),
                    ..hops
                });
                pool.note_retry();
                let me = self.me.upgrade()?;
                tokio::task::spawn_local(async move {
                    tokio::time::sleep(wait).await;
                    let target = me.retry_target();
                    let result = target.and_then(|conn| me.resend(conn, false));
                    if let Err(e) = result
                        && me.parent.deliver(me.token, e.into())
                    {
                        me.parent.flush();
                    }
                });
                None
            }
        }
    }

    /// Where a retried request goes: the slot's master now, or (keyless) where it went.
    pub(super) fn retry_target(&self) -> Result<NodeConn, Bytes> {
        let pool = &self.shared.pool;
        match self.slot {
            Some(slot) => {
                let map = pool.map();
                let master = map
                    .master(slot)
                    .ok_or_else(|| Bytes::from_static(NOT_SERVED))?;
                pool.conn(master, self.shared.key.get())
            }
            None => self
                .sent_to
                .borrow()
                .clone()
                .ok_or_else(|| error_reply("request abandoned")),
        }
    }
}

impl ReplySink for ClusterRequest {
    fn fail(&self, token: u64, error: &UpstreamError) -> bool {
        match self.hold_or_fail(error.clone()) {
            None => false,
            Some(reply) => self.deliver(token, reply.into()),
        }
    }

    fn deliver(&self, _token: u64, reply: Reply<'_>) -> bool {
        if reply.as_slice().first() == Some(&b'-') {
            match self.redirect(reply.into_bytes()) {
                None => return false,
                Some(r) => return self.parent.deliver(self.token, r.into()),
            }
        }
        self.parent.deliver(self.token, reply)
    }

    fn flush(&self) {
        self.parent.flush();
    }

    fn expects_more(&self) -> bool {
        self.parent.expects_more()
    }
}
