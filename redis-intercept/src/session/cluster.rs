//! A client's requests on a Redis Cluster upstream: each goes to the node that owns its slot
//! (under the read policy), redirects are followed, multi-slot commands are split and their
//! replies merged, and keyless commands are sent to one master or all of them.
//!
//! Every forwarded request keeps its encoded bytes in a [`ClusterRequest`] sink
//! (`cluster_request.rs`), so a `MOVED`, `ASK`, `TRYAGAIN` or `CLUSTERDOWN` reply is answered by
//! re-sending, never passed to the client, within the request's deadline (and at most
//! [`crate::cluster::MAX_HOPS`] redirects). Merged replies are the only ones the proxy
//! re-encodes.

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use bytes::{Bytes, BytesMut};

use super::cluster_request::ClusterRequest;
use super::info::InfoCtx;
use super::merge::{Merge, MergeKind, Positions};
use super::scan::ScanSink;
use crate::cluster::{ScanCursor, Slot, SlotMap};
use crate::command::Command;
use crate::config::ReadPolicy;
use crate::resp::{Request, encode_command};
use crate::route::{self, CROSSSLOT, Keyless, Plan, SplitKind};
use crate::upstream::cluster_nodes::ClusterNodes;
use crate::upstream::lanes;
use crate::upstream::{ReplySink, ReplyTo, error_reply};

/// Size of the blocks request copies are cut from: small, so a request that waits long
/// (a blocked command) pins little memory.
const ARENA_BLOCK: usize = 4096;

/// A client's arena block (see [`ClusterClient::encode`]). `Rc`, not `Bytes`: an atomic
/// reference count per request cost about 5% of the proxy's CPU with `-P 16`.
type Block = RefCell<Vec<u8>>;

/// A request's RESP bytes, kept by its [`ClusterRequest`] for re-sending.
#[derive(Clone)]
pub(super) enum EncodedRequest {
    /// `start..end` of a client's arena block.
    Arena {
        /// The block; never shrunk while shared, so the range stays valid.
        block: Rc<Block>,
        /// Where the request starts.
        start: usize,
        /// Where it ends.
        end: usize,
    },
    /// Bytes of its own (split parts, broadcasts).
    Own(Bytes),
}

impl EncodedRequest {
    /// Calls `f` with the request's bytes.
    pub(super) fn with<R>(&self, f: impl FnOnce(&[u8]) -> R) -> R {
        match self {
            EncodedRequest::Arena { block, start, end } => {
                f(block.borrow().get(*start..*end).unwrap_or_default())
            }
            EncodedRequest::Own(b) => f(b),
        }
    }
}

impl From<Bytes> for EncodedRequest {
    fn from(b: Bytes) -> Self {
        EncodedRequest::Own(b)
    }
}

/// Redis's reply for a slot no master serves.
pub(super) const NOT_SERVED: &[u8] = b"-CLUSTERDOWN Hash slot not served\r\n";

/// What every request of one client on one cluster upstream shares.
pub struct ClusterShared {
    /// The upstream's connections and slot map on this worker.
    pub pool: Rc<ClusterNodes>,
    /// Where reads may go.
    pub policy: ReadPolicy,
    /// The client's id.
    pub client: u64,
    /// Picks its shared connection of each node: the client's id, or `lanes::BULK` while
    /// its replies are big.
    pub key: Cell<u64>,
    /// Swallows `ASKING` replies.
    pub discard: Rc<dyn ReplySink>,
    /// What INFO's clients section says of the service.
    pub counts: ClientCounts,
}

/// The service's clients, as INFO reports them on a cluster (the masters' own counts
/// would mostly be the proxy's connections).
#[derive(Clone)]
pub struct ClientCounts {
    /// Connected clients, all workers.
    pub connected: prometheus_client::metrics::gauge::Gauge,
    /// The service's settings, for `max_clients` as reloaded.
    pub policy: crate::service::PolicyCell,
}

/// A client's cluster routing state.
pub struct ClusterClient {
    /// Shared with the client's in-flight requests.
    shared: Rc<ClusterShared>,
    /// Key indexes of the current request (reused).
    keys: Vec<usize>,
    /// Spreads reads over replicas and keyless commands over masters.
    roll: Cell<u32>,
    /// Copies of requests kept for re-sending after a redirect are cut from this block, so
    /// they share an allocation instead of taking one each.
    arena: RefCell<Rc<Block>>,
}

impl ClusterClient {
    /// Routing state for one client.
    pub fn new(shared: ClusterShared) -> ClusterClient {
        let roll = shared.client as u32;
        ClusterClient {
            shared: Rc::new(shared),
            keys: Vec::new(),
            roll: Cell::new(roll),
            arena: RefCell::new(Rc::default()),
        }
    }

    /// Moves the client's requests to the shared connections that `key` picks. Only while
    /// none is in flight: requests on two connections to one node could run out of order.
    pub fn set_key(&self, key: u64) {
        self.shared.key.set(key);
    }

    /// The request as RESP, kept for re-sending.
    fn encode(&self, req: &Request<'_>) -> EncodedRequest {
        let encoded;
        let resp = match req.raw() {
            Some(raw) => raw,
            None => {
                // Inline commands are rare; upstreams always get RESP.
                let mut out = BytesMut::new();
                req.write_resp(&mut out);
                encoded = out;
                &encoded[..]
            }
        };
        let mut arena = self.arena.borrow_mut();
        let fresh = match Rc::get_mut(&mut arena) {
            // No request of this client is in flight: start the block over.
            Some(only) if only.borrow().capacity() <= 4 * ARENA_BLOCK => {
                only.get_mut().clear();
                false
            }
            // A block a large request grew is not kept for an idle client.
            Some(_) => true,
            None => {
                let block = arena.borrow();
                block.capacity() - block.len() < resp.len()
            }
        };
        if fresh {
            // A shared old block is freed when its last request has its reply.
            *arena = Rc::new(RefCell::new(Vec::with_capacity(
                ARENA_BLOCK.max(resp.len()),
            )));
        }
        let start = {
            let mut block = arena.borrow_mut();
            let start = block.len();
            block.extend_from_slice(resp);
            start
        };
        EncodedRequest::Arena {
            block: Rc::clone(&arena),
            start,
            end: start + resp.len(),
        }
    }

    /// The cluster's pool on this worker.
    pub fn pool(&self) -> &Rc<ClusterNodes> {
        &self.shared.pool
    }

    /// Whether the client speaks RESP3 (its connections are RESP3's).
    pub fn resp3(&self) -> bool {
        lanes::is_resp3(self.shared.key.get())
    }

    fn next_roll(&self) -> u32 {
        let r = self.roll.get().wrapping_add(1);
        self.roll.set(r);
        r
    }

    /// Sends `req` on its way; its (possibly merged) reply goes to `parent` as `token`.
    ///
    /// # Errors
    /// A reply to give the client at once (CROSSSLOT, an unserved slot, a node that is down).
    pub fn forward(
        &mut self,
        req: &Request<'_>,
        cmd: Option<Command>,
        to: ReplyTo,
    ) -> Result<(), Bytes> {
        let read = route::is_read(cmd);
        let mut keys = std::mem::take(&mut self.keys);
        let plan = route::plan(cmd, req, &mut keys);
        self.keys = keys;
        match plan {
            Plan::Slot(slot) => {
                let request = self.encode(req);
                self.send_slot(request, slot, read, to)
            }
            Plan::CrossSlot => Err(Bytes::from_static(CROSSSLOT)),
            Plan::Split(kind, parts) => self.split(req, kind, &parts, read, to),
            Plan::Keyless(k) => self.keyless(req, k, to),
        }
    }

    /// Sends an encoded single-slot request to the node the read policy picks.
    fn send_slot(
        &self,
        request: EncodedRequest,
        slot: Slot,
        read: bool,
        to: ReplyTo,
    ) -> Result<(), Bytes> {
        let pool = &self.shared.pool;
        let map = pool.map();
        let Some((index, shard)) = map
            .shard_index(slot)
            .and_then(|i| Some((i, map.shards().get(i)?)))
        else {
            // No master serves the slot (a failover under way): the request waits for the
            // topology that names one, within its deadline.
            let held = ClusterRequest::new(&self.shared, None, request, Some(slot), read, to);
            return held
                .hold(true, Bytes::from_static(NOT_SERVED))
                .map_or(Ok(()), Err);
        };
        let node = route::pick_node(
            shard,
            self.shared.policy,
            read,
            |a| pool.usable(a),
            self.next_roll(),
        )
        .ok_or_else(|| {
            error_reply(&format!(
                "no replica serves slot {} (read_policy = \"replica\")",
                slot.get()
            ))
        })?;
        let conn = if std::ptr::eq(node, shard.master.as_str()) {
            pool.master_conn(index, node, self.shared.key.get())?
        } else {
            pool.conn(node, self.shared.key.get())?
        };
        ClusterRequest::send(&self.shared, &conn, request, Some(slot), read, to)
    }

    /// Splits a multi-slot MGET/MSET/DEL/… into one command per slot and merges the replies.
    fn split(
        &self,
        req: &Request<'_>,
        kind: SplitKind,
        parts: &[(Slot, usize)],
        read: bool,
        to: ReplyTo,
    ) -> Result<(), Bytes> {
        let name = req.arg(0).unwrap_or_default();
        let positions = match kind {
            SplitKind::Values => Positions::new(
                route::slot_groups(parts).map(|g| g.iter().map(|&(_, k)| k)),
                req.len() - 1,
            ),
            _ => Positions::default(),
        };
        let count = route::slot_groups(parts).count();
        let _deadline = to.deadline;
        let merge = Merge::new(to.sink, to.token, MergeKind::Split(kind, positions), count);
        let sink: Rc<dyn ReplySink> = merge.clone();
        // Every part is encoded into one buffer and split off it: one allocation in all.
        let size: usize = req.args().map(|a| a.len() + 16).sum::<usize>() + parts.len() * 32;
        let mut out = BytesMut::with_capacity(size);
        let mut args: Vec<&[u8]> = Vec::new();
        for (i, group) in route::slot_groups(parts).enumerate() {
            // `chunk_by` yields no empty groups.
            let slot = group[0].0;
            args.clear();
            args.push(name);
            for &(_, k) in group {
                args.push(req.arg(k).unwrap_or_default());
                if kind == SplitKind::AllOk {
                    // MSET: the value follows its key.
                    args.push(req.arg(k + 1).unwrap_or_default());
                }
            }
            encode_command(args.iter().copied(), &mut out);
            if let Err(e) = self.send_slot(
                out.split().freeze().into(),
                slot,
                read,
                ReplyTo::new(Rc::clone(&sink), i as u64, to.deadline),
            ) {
                let _ = merge.deliver(i as u64, e.into());
            }
        }
        Ok(())
    }

    /// Commands without keys: one master, every master, SCAN or INFO.
    fn keyless(&self, req: &Request<'_>, kind: Keyless, to: ReplyTo) -> Result<(), Bytes> {
        let pool = &self.shared.pool;
        let map = pool.map();
        let masters = map.serving_masters();
        if masters.is_empty() {
            return Err(error_reply(&format!(
                "cluster {} topology is not known yet",
                pool.name()
            )));
        }
        match kind {
            Keyless::AnyMaster | Keyless::RandomKey => {
                let node = masters[self.next_roll() as usize % masters.len()];
                let conn = pool.conn(node, self.shared.key.get())?;
                ClusterRequest::send(&self.shared, &conn, self.encode(req), None, false, to)
            }
            Keyless::Scan => self.scan(req, &map, to),
            Keyless::Info => {
                let counts = &self.shared.counts;
                let merge_kind = MergeKind::Info(Box::new(InfoCtx {
                    map: Some(Rc::clone(&map)),
                    upstream: pool.name().into(),
                    resp3: self.resp3(),
                    connected_clients: usize::try_from(counts.connected.get()).unwrap_or(0),
                    max_clients: counts.policy.borrow().max_clients,
                }));
                // Every master gets the client's request as sent, whatever sections it
                // names.
                self.broadcast(&masters, self.encode(req), merge_kind, to)
            }
            Keyless::AnyOk => {
                // A master running a script serves nothing more on the connection that sent
                // it, which may be this client's own shared one: the kill goes to every
                // master on a connection of its own, closed once answered.
                let pool = self.shared.pool.dedicated_pool(self.resp3());
                let merge = Merge::new(to.sink, to.token, MergeKind::All(kind), masters.len());
                let sink: Rc<dyn ReplySink> = merge.clone();
                let request = self.encode(req);
                for (i, node) in masters.iter().enumerate() {
                    let conn = pool.take(node);
                    let reply_to = ReplyTo::new(Rc::clone(&sink), i as u64, to.deadline);
                    let sent = request.with(|bytes| conn.send_encoded(bytes, reply_to));
                    conn.retire();
                    if let Err(e) = sent {
                        let _ = merge.deliver(i as u64, e.reply().into());
                    }
                }
                Ok(())
            }
            Keyless::EveryNode => {
                let nodes: Vec<&str> = map
                    .shards()
                    .iter()
                    .flat_map(|s| {
                        std::iter::once(s.master.as_str())
                            .chain(s.replicas.iter().map(String::as_str))
                    })
                    .collect();
                let names = nodes.iter().map(|n| (*n).to_owned()).collect();
                self.broadcast(&nodes, self.encode(req), MergeKind::EveryNode(names), to)
            }
            Keyless::Concat
            | Keyless::Sum
            | Keyless::AllOk
            | Keyless::First
            | Keyless::Union
            | Keyless::NumSub
            | Keyless::Min
            | Keyless::AllHave => {
                self.broadcast(&masters, self.encode(req), MergeKind::All(kind), to)
            }
        }
    }

    /// Sends `request` to every master and merges their replies.
    fn broadcast(
        &self,
        masters: &[&str],
        request: EncodedRequest,
        kind: MergeKind,
        to: ReplyTo,
    ) -> Result<(), Bytes> {
        let _deadline = to.deadline;
        let merge = Merge::new(to.sink, to.token, kind, masters.len());
        let sink: Rc<dyn ReplySink> = merge.clone();
        for (i, node) in masters.iter().enumerate() {
            let sent = self
                .shared
                .pool
                .conn(node, self.shared.key.get())
                .and_then(|conn| {
                    ClusterRequest::send(
                        &self.shared,
                        &conn,
                        request.clone(),
                        None,
                        false,
                        ReplyTo::new(Rc::clone(&sink), i as u64, to.deadline),
                    )
                });
            if let Err(e) = sent {
                let _ = merge.deliver(i as u64, e.into());
            }
        }
        Ok(())
    }

    /// One step of a cluster-wide SCAN: the shard the cursor names, with the cursor rewritten
    /// in the reply (see [`ScanCursor`]).
    fn scan(&self, req: &Request<'_>, map: &Rc<SlotMap>, to: ReplyTo) -> Result<(), Bytes> {
        let cursor = req
            .arg(1)
            .and_then(|c| std::str::from_utf8(c).ok())
            .and_then(|c| c.parse::<u64>().ok())
            .ok_or_else(|| error_reply("invalid cursor"))?;
        let step = map
            .scan_step(ScanCursor::decode(cursor))
            .ok_or_else(|| Bytes::from_static(NOT_SERVED))?;
        let master = &map.shards()[step.shard].master;
        let node_cursor = step.node_cursor.to_string();
        let mut out = BytesMut::new();
        encode_command(
            [req.arg(0).unwrap_or_default(), node_cursor.as_bytes()]
                .into_iter()
                .chain(req.args().skip(2))
                .collect::<Vec<_>>()
                .into_iter(),
            &mut out,
        );
        let conn = self.shared.pool.conn(master, self.shared.key.get())?;
        let deadline = to.deadline;
        let sink = Rc::new(ScanSink {
            parent: to.sink,
            token: to.token,
            map: Rc::clone(map),
            shard: step.shard,
        });
        // SCAN always goes to the master: a node's cursor is only valid on that node.
        conn.send_encoded(&out, ReplyTo::new(sink, 0, deadline))
            .map_err(Bytes::from)
    }
}
