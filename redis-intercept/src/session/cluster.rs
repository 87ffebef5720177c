//! A client's requests on a Redis Cluster upstream: each goes to the node that owns its slot
//! (under the read policy), redirects are followed, multi-slot commands are split and their
//! replies merged, and keyless commands are sent to one master or all of them.
//!
//! Every forwarded request keeps its encoded bytes in a [`Follow`] sink, so a `MOVED`, `ASK`,
//! `TRYAGAIN` or `CLUSTERDOWN` reply is answered by re-sending, never passed to the client,
//! at most [`MAX_HOPS`] times and never past the request's deadline. Merged replies are the
//! only ones the proxy re-encodes.

use std::cell::{Cell, RefCell};
use std::rc::{Rc, Weak};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::time::Instant;

use crate::cluster::{Redirect, RedirectKind, ScanCursor, Slot, SlotMap};
use crate::command::Command;
use crate::config::{ReadPolicy, split_host_port};
use crate::resp::{Frame, Limits, Request, encode_command};
use crate::route::{self, CROSSSLOT, Keyless, Plan, SplitKind};
use crate::upstream::pool::ClusterPool;
use crate::upstream::{Reply, ReplySink, SharedConn, error_reply};

/// Most redirects and retries one request follows before the client gets an error.
pub const MAX_HOPS: u8 = 5;

/// First wait before re-sending after `TRYAGAIN` or `CLUSTERDOWN`; doubles per retry.
const RETRY_START: Duration = Duration::from_millis(20);

/// Size of the blocks request copies are cut from: small, so a request that waits long
/// (a blocked command) pins little memory.
const ARENA_BLOCK: usize = 4096;

/// A client's arena block (see [`ClusterClient::encode`]). `Rc`, not `Bytes`: an atomic
/// reference count per request cost about 5% of the proxy's CPU with `-P 16`.
type Block = RefCell<Vec<u8>>;

/// A request's RESP bytes, kept by its [`Follow`] for re-sending.
#[derive(Clone)]
enum Kept {
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

impl Kept {
    /// Calls `f` with the request's bytes.
    fn with<R>(&self, f: impl FnOnce(&[u8]) -> R) -> R {
        match self {
            Kept::Arena { block, start, end } => {
                f(block.borrow().get(*start..*end).unwrap_or_default())
            }
            Kept::Own(b) => f(b),
        }
    }
}

impl From<Bytes> for Kept {
    fn from(b: Bytes) -> Self {
        Kept::Own(b)
    }
}

/// Redis's reply for a slot no master serves.
const NOT_SERVED: &[u8] = b"-CLUSTERDOWN Hash slot not served\r\n";

/// What every request of one client on one cluster upstream shares.
pub struct ClusterShared {
    /// The upstream's connections and slot map on this worker.
    pub pool: Rc<ClusterPool>,
    /// Where reads may go.
    pub policy: ReadPolicy,
    /// The client's id: picks its connection of each node.
    pub client: u64,
    /// Swallows `ASKING` replies.
    pub discard: Rc<dyn ReplySink>,
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

    /// The request as RESP, kept for re-sending.
    fn encode(&self, req: &Request<'_>) -> Kept {
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
        Kept::Arena {
            block: Rc::clone(&arena),
            start,
            end: start + resp.len(),
        }
    }

    /// The cluster's pool on this worker.
    pub fn pool(&self) -> &Rc<ClusterPool> {
        &self.shared.pool
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
        parent: Rc<dyn ReplySink>,
        token: u64,
        deadline: Instant,
    ) -> Result<(), Bytes> {
        let read = route::is_read(cmd);
        let mut keys = std::mem::take(&mut self.keys);
        let plan = route::plan(cmd, req, &mut keys);
        self.keys = keys;
        match plan {
            Plan::Slot(slot) => {
                let request = self.encode(req);
                self.send_slot(request, slot, read, parent, token, deadline)
            }
            Plan::CrossSlot => Err(Bytes::from_static(CROSSSLOT)),
            Plan::Split(kind, parts) => {
                self.split(req, kind, &parts, read, parent, token, deadline)
            }
            Plan::Keyless(k) => self.keyless(req, k, parent, token, deadline),
        }
    }

    /// Sends an encoded single-slot request to the node the read policy picks.
    fn send_slot(
        &self,
        request: Kept,
        slot: Slot,
        read: bool,
        parent: Rc<dyn ReplySink>,
        token: u64,
        deadline: Instant,
    ) -> Result<(), Bytes> {
        let pool = &self.shared.pool;
        let map = pool.map();
        let Some(index) = map.shard_index(slot) else {
            return Err(Bytes::from_static(NOT_SERVED));
        };
        let Some(shard) = map.shards().get(index) else {
            return Err(Bytes::from_static(NOT_SERVED));
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
            pool.master_conn(index, node, self.shared.client)?
        } else {
            pool.conn(node, self.shared.client)?
        };
        Follow::send(
            &self.shared,
            &conn,
            request,
            Some(slot),
            parent,
            token,
            deadline,
        )
    }

    /// Splits a multi-slot MGET/MSET/DEL/… into one command per slot and merges the replies.
    #[allow(
        clippy::too_many_arguments,
        reason = "one call site; a struct adds nothing"
    )]
    fn split(
        &self,
        req: &Request<'_>,
        kind: SplitKind,
        parts: &[(Slot, usize)],
        read: bool,
        parent: Rc<dyn ReplySink>,
        token: u64,
        deadline: Instant,
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
        let merge = Merge::new(parent, token, MergeKind::Split(kind, positions), count);
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
                Rc::clone(&sink),
                i as u64,
                deadline,
            ) {
                let _ = merge.deliver(i as u64, e.into());
            }
        }
        Ok(())
    }

    /// Commands without keys: one master, every master, SCAN or INFO.
    fn keyless(
        &self,
        req: &Request<'_>,
        kind: Keyless,
        parent: Rc<dyn ReplySink>,
        token: u64,
        deadline: Instant,
    ) -> Result<(), Bytes> {
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
                let conn = pool.conn(node, self.shared.client)?;
                Follow::send(
                    &self.shared,
                    &conn,
                    self.encode(req),
                    None,
                    parent,
                    token,
                    deadline,
                )
            }
            Keyless::Scan => self.scan(req, &map, parent, token, deadline),
            Keyless::Info => {
                let sections = info_sections(req);
                let merge_kind = MergeKind::Info(sections, Rc::clone(&map), pool.name().into());
                if !sections.keyspace {
                    // Nothing to ask the masters.
                    let merge = Merge::new(parent, token, merge_kind, 0);
                    let _ = merge.finish();
                    return Ok(());
                }
                let mut out = BytesMut::new();
                encode_command([&b"INFO"[..], b"keyspace"].into_iter(), &mut out);
                self.broadcast(
                    &masters,
                    out.freeze().into(),
                    merge_kind,
                    parent,
                    token,
                    deadline,
                )
            }
            Keyless::Concat | Keyless::Sum | Keyless::AllOk | Keyless::First => self.broadcast(
                &masters,
                self.encode(req),
                MergeKind::All(kind),
                parent,
                token,
                deadline,
            ),
        }
    }

    /// Sends `request` to every master and merges their replies.
    fn broadcast(
        &self,
        masters: &[&str],
        request: Kept,
        kind: MergeKind,
        parent: Rc<dyn ReplySink>,
        token: u64,
        deadline: Instant,
    ) -> Result<(), Bytes> {
        let merge = Merge::new(parent, token, kind, masters.len());
        let sink: Rc<dyn ReplySink> = merge.clone();
        for (i, node) in masters.iter().enumerate() {
            let sent = self
                .shared
                .pool
                .conn(node, self.shared.client)
                .and_then(|conn| {
                    Follow::send(
                        &self.shared,
                        &conn,
                        request.clone(),
                        None,
                        Rc::clone(&sink),
                        i as u64,
                        deadline,
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
    fn scan(
        &self,
        req: &Request<'_>,
        map: &Rc<SlotMap>,
        parent: Rc<dyn ReplySink>,
        token: u64,
        deadline: Instant,
    ) -> Result<(), Bytes> {
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
        let conn = self.shared.pool.conn(master, self.shared.client)?;
        let sink = Rc::new(ScanSink {
            parent,
            token,
            map: Rc::clone(map),
            shard: step.shard,
        });
        // SCAN always goes to the master: a node's cursor is only valid on that node.
        conn.send_encoded(&out, sink, 0, deadline)
    }
}

/// A request in flight on a cluster: follows redirects and retries, then hands the final
/// reply to its parent (the client's slot, or a merge).
struct Follow {
    /// The client's shared routing state.
    shared: Rc<ClusterShared>,
    /// Who gets the final reply.
    parent: Rc<dyn ReplySink>,
    /// The parent's token for it.
    token: u64,
    /// The encoded request, for re-sending.
    request: Kept,
    /// The request's slot (`None` for keyless commands).
    slot: Option<Slot>,
    /// Redirects and retries so far.
    hops: Cell<u8>,
    /// When the client stops waiting.
    deadline: Instant,
    /// Where it was last sent (its host fills redirects that name none).
    sent_to: RefCell<Option<SharedConn>>,
    /// This sink, to hand to connections when re-sending.
    me: Weak<Follow>,
}

impl Follow {
    /// Sends `request` to `conn` with a new follower as its sink.
    fn send(
        shared: &Rc<ClusterShared>,
        conn: &SharedConn,
        request: Kept,
        slot: Option<Slot>,
        parent: Rc<dyn ReplySink>,
        token: u64,
        deadline: Instant,
    ) -> Result<(), Bytes> {
        let follow = Rc::new_cyclic(|me| Follow {
            shared: Rc::clone(shared),
            parent,
            token,
            request,
            slot,
            hops: Cell::new(0),
            deadline,
            sent_to: RefCell::new(Some(conn.clone())),
            me: me.clone(),
        });
        follow
            .request
            .with(|resp| conn.send_encoded(resp, follow.clone(), 0, deadline))
    }

    /// Re-sends after a redirect; `Err` is the reply to give instead.
    fn resend(&self, conn: SharedConn, asking: bool) -> Result<(), Bytes> {
        let Some(me) = self.me.upgrade() else {
            return Err(error_reply("request abandoned"));
        };
        let result = self.request.with(|resp| {
            if asking {
                conn.send_asking(resp, Rc::clone(&self.shared.discard), me, 0, self.deadline)
            } else {
                conn.send_encoded(resp, me, 0, self.deadline)
            }
        });
        *self.sent_to.borrow_mut() = Some(conn);
        result
    }

    /// Handles a redirect or retry reply; `None` when the request went out again, otherwise
    /// the reply to pass on.
    fn redirect(&self, reply: Bytes) -> Option<Bytes> {
        let hops = self.hops.get();
        let pool = &self.shared.pool;
        let host = self
            .sent_to
            .borrow()
            .as_ref()
            .and_then(|c| split_host_port(c.addr()).ok())
            .map(|(h, _)| h)
            .unwrap_or_default();
        if let Some(r) = Redirect::parse(&reply, &host) {
            if hops >= MAX_HOPS || Instant::now() >= self.deadline {
                return Some(too_many(&reply));
            }
            self.hops.set(hops + 1);
            let conn = match pool.conn(&r.addr, self.shared.client) {
                Ok(c) => c,
                Err(e) => return Some(e),
            };
            let asking = r.kind == RedirectKind::Ask;
            if asking {
                pool.note_ask();
            } else {
                pool.note_moved(r.slot, &r.addr);
            }
            return self.resend(conn, asking).err();
        }
        let retry = reply.starts_with(b"-TRYAGAIN") || reply.starts_with(b"-CLUSTERDOWN");
        if !retry {
            return Some(reply);
        }
        let wait = RETRY_START * (1 << hops);
        if hops >= MAX_HOPS || Instant::now() + wait >= self.deadline {
            return Some(reply);
        }
        self.hops.set(hops + 1);
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

    /// Where a retried request goes: the slot's master now, or (keyless) where it went.
    fn retry_target(&self) -> Result<SharedConn, Bytes> {
        let pool = &self.shared.pool;
        match self.slot {
            Some(slot) => {
                let map = pool.map();
                let master = map
                    .master(slot)
                    .ok_or_else(|| Bytes::from_static(NOT_SERVED))?;
                pool.conn(master, self.shared.client)
            }
            None => self
                .sent_to
                .borrow()
                .clone()
                .ok_or_else(|| error_reply("request abandoned")),
        }
    }
}

/// The error for a request that was redirected too often.
fn too_many(last: &[u8]) -> Bytes {
    let last = String::from_utf8_lossy(last);
    error_reply(&format!(
        "too many cluster redirects for one request (last: {})",
        last.trim_start_matches('-').trim_end()
    ))
}

impl ReplySink for Follow {
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

/// Which INFO sections a client asked for (only these three are served on a cluster).
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct InfoSections {
    server: bool,
    cluster: bool,
    keyspace: bool,
}

fn info_sections(req: &Request<'_>) -> InfoSections {
    if req.len() == 1 {
        return InfoSections {
            server: true,
            cluster: true,
            keyspace: true,
        };
    }
    let mut s = InfoSections::default();
    for arg in req.args().skip(1) {
        let arg = arg.to_ascii_lowercase();
        match arg.as_slice() {
            b"default" | b"all" | b"everything" => {
                s = InfoSections {
                    server: true,
                    cluster: true,
                    keyspace: true,
                };
            }
            b"server" => s.server = true,
            b"cluster" => s.cluster = true,
            b"keyspace" => s.keyspace = true,
            _ => {}
        }
    }
    s
}

/// Where the values of MGET's parts go in the merged reply.
#[derive(Default)]
pub(super) struct Positions {
    /// Value positions of every part's keys, part after part.
    at: Vec<usize>,
    /// Where each part's positions end in `at`.
    ends: Vec<usize>,
    /// Keys in the client's MGET.
    total: usize,
}

impl Positions {
    /// From each part's key argument indexes (MGET's key argument k is value k-1).
    pub(super) fn new<P, K>(parts: P, total: usize) -> Positions
    where
        P: Iterator<Item = K>,
        K: Iterator<Item = usize>,
    {
        let mut p = Positions {
            total,
            ..Positions::default()
        };
        for keys in parts {
            p.at.extend(keys.map(|k| k.saturating_sub(1)));
            p.ends.push(p.at.len());
        }
        p
    }

    /// Part `i`'s value positions.
    fn of(&self, i: usize) -> &[usize] {
        let start = if i == 0 {
            0
        } else {
            self.ends.get(i - 1).copied().unwrap_or(self.at.len())
        };
        let end = self.ends.get(i).copied().unwrap_or(self.at.len());
        self.at.get(start..end).unwrap_or_default()
    }
}

/// How part replies are combined.
pub(super) enum MergeKind {
    /// A split multi-key command; for MGET, where each part's values go.
    Split(SplitKind, Positions),
    /// A keyless command sent to every master.
    All(Keyless),
    /// INFO: the sections, the map for the cluster section, and the upstream name.
    Info(InfoSections, Rc<SlotMap>, String),
}

/// Collects the replies of a split or broadcast request and gives the parent one reply.
pub(super) struct Merge {
    /// Who gets the merged reply.
    parent: Rc<dyn ReplySink>,
    /// The parent's token for it.
    token: u64,
    /// How to combine.
    kind: MergeKind,
    /// Part replies by part number.
    parts: RefCell<Vec<Option<Bytes>>>,
    /// Parts still missing.
    remaining: Cell<usize>,
}

impl Merge {
    pub(super) fn new(
        parent: Rc<dyn ReplySink>,
        token: u64,
        kind: MergeKind,
        parts: usize,
    ) -> Rc<Merge> {
        Rc::new(Merge {
            parent,
            token,
            kind,
            parts: RefCell::new(vec![None; parts]),
            remaining: Cell::new(parts),
        })
    }

    /// Builds the merged reply and hands it to the parent.
    fn finish(&self) -> bool {
        let parts: Vec<Bytes> = self.parts.borrow_mut().drain(..).flatten().collect();
        let reply = merge(&self.kind, &parts).unwrap_or_else(|e| e);
        self.parent.deliver(self.token, reply.into())
    }
}

impl ReplySink for Merge {
    fn deliver(&self, token: u64, reply: Reply<'_>) -> bool {
        {
            let mut parts = self.parts.borrow_mut();
            let Some(slot) = parts.get_mut(token as usize) else {
                return false;
            };
            if slot.is_some() {
                return false;
            }
            *slot = Some(reply.into_bytes());
        }
        let left = self.remaining.get().saturating_sub(1);
        self.remaining.set(left);
        left == 0 && self.finish()
    }

    fn flush(&self) {
        self.parent.flush();
    }

    fn expects_more(&self) -> bool {
        self.parent.expects_more()
    }
}

/// Parses one part reply.
fn frame(reply: &Bytes) -> Result<Frame, Bytes> {
    match Frame::parse(reply, &Limits::default()) {
        Ok(Some((f, _))) => Ok(f),
        _ => Err(error_reply("unexpected reply from a cluster node")),
    }
}

/// Combines part replies (all present, in part order). `Err` carries the reply to give
/// instead: the first part's error, or a malformed part.
fn merge(kind: &MergeKind, parts: &[Bytes]) -> Result<Bytes, Bytes> {
    if let Some(err) = parts.iter().find(|p| p.first() == Some(&b'-')) {
        return Err(err.clone());
    }
    let sum = |parts: &[Bytes]| -> Result<Bytes, Bytes> {
        let mut total: i64 = 0;
        for p in parts {
            match frame(p)? {
                Frame::Integer(n) => total = total.saturating_add(n),
                _ => return Err(error_reply("unexpected reply from a cluster node")),
            }
        }
        Ok(Frame::Integer(total).to_bytes())
    };
    match kind {
        MergeKind::Split(SplitKind::Values, positions) => {
            let mut values = vec![Frame::NullBulk; positions.total];
            for (i, p) in parts.iter().enumerate() {
                let Frame::Array(items) = frame(p)? else {
                    return Err(error_reply("unexpected reply from a cluster node"));
                };
                for (item, &at) in items.into_iter().zip(positions.of(i)) {
                    if let Some(v) = values.get_mut(at) {
                        *v = item;
                    }
                }
            }
            Ok(Frame::Array(values).to_bytes())
        }
        MergeKind::Split(SplitKind::AllOk, ..) | MergeKind::All(Keyless::AllOk) => {
            Ok(Bytes::from_static(b"+OK\r\n"))
        }
        MergeKind::Split(SplitKind::Sum, ..) | MergeKind::All(Keyless::Sum) => sum(parts),
        MergeKind::All(Keyless::Concat) => {
            let mut all = Vec::new();
            for p in parts {
                match frame(p)? {
                    Frame::Array(items) | Frame::Set(items) => all.extend(items),
                    _ => return Err(error_reply("unexpected reply from a cluster node")),
                }
            }
            Ok(Frame::Array(all).to_bytes())
        }
        MergeKind::All(_) => parts
            .first()
            .cloned()
            .ok_or_else(|| error_reply("no master answered")),
        MergeKind::Info(sections, map, name) => Ok(info(*sections, map, name, parts)),
    }
}

/// INFO for a client of a cluster: the proxy's server section, the cluster as the proxy sees
/// it, and the masters' keyspace added up.
fn info(sections: InfoSections, map: &SlotMap, upstream: &str, parts: &[Bytes]) -> Bytes {
    let mut text = String::new();
    if sections.server {
        text.push_str(&format!(
            "# Server\r\nredis_version:7.0.0\r\nredis_mode:standalone\r\nproxy:redis-intercept {}\r\nprocess_id:{}\r\n\r\n",
            env!("CARGO_PKG_VERSION"),
            std::process::id()
        ));
    }
    if sections.cluster {
        text.push_str(&format!(
            "# Cluster\r\ncluster_enabled:0\r\nupstream:{upstream}\r\nupstream_cluster_state:{}\r\nupstream_cluster_slots_covered:{}\r\nupstream_cluster_masters:{}\r\n\r\n",
            if map.is_complete() { "ok" } else { "fail" },
            map.covered(),
            map.serving_masters().len()
        ));
    }
    if sections.keyspace {
        // db -> (keys, expires, avg_ttl × expires)
        let mut dbs: std::collections::BTreeMap<String, (u64, u64, u128)> = Default::default();
        for p in parts {
            let Ok(Frame::Bulk(body) | Frame::Verbatim(body)) = frame(p) else {
                continue;
            };
            for line in String::from_utf8_lossy(&body).lines() {
                let Some((db, fields)) = line.split_once(':') else {
                    continue;
                };
                if !db.starts_with("db") {
                    continue;
                }
                let mut keys = 0;
                let mut expires = 0;
                let mut ttl: u64 = 0;
                for kv in fields.split(',') {
                    match kv.split_once('=') {
                        Some(("keys", v)) => keys = v.parse().unwrap_or(0),
                        Some(("expires", v)) => expires = v.parse().unwrap_or(0),
                        Some(("avg_ttl", v)) => ttl = v.parse().unwrap_or(0),
                        _ => {}
                    }
                }
                let e = dbs.entry(db.to_owned()).or_default();
                e.0 += keys;
                e.1 += expires;
                e.2 += u128::from(ttl) * u128::from(expires);
            }
        }
        text.push_str("# Keyspace\r\n");
        for (db, (keys, expires, ttl)) in dbs {
            let avg = if expires == 0 {
                0
            } else {
                ttl / u128::from(expires)
            };
            text.push_str(&format!(
                "{db}:keys={keys},expires={expires},avg_ttl={avg}\r\n"
            ));
        }
    }
    Frame::Bulk(Bytes::from(text)).to_bytes()
}

/// Rewrites a master's SCAN reply with the cluster-wide cursor.
struct ScanSink {
    /// Who gets the reply.
    parent: Rc<dyn ReplySink>,
    /// The parent's token.
    token: u64,
    /// The map the step was planned with.
    map: Rc<SlotMap>,
    /// The shard scanned.
    shard: usize,
}

impl ReplySink for ScanSink {
    fn deliver(&self, _token: u64, reply: Reply<'_>) -> bool {
        let reply = reply.into_bytes();
        let rewritten = (|| {
            if reply.first() == Some(&b'-') {
                return Ok(reply.clone());
            }
            let Frame::Array(mut items) = frame(&reply)? else {
                return Err(error_reply("unexpected SCAN reply from a cluster node"));
            };
            let node_next = match items.first() {
                Some(Frame::Bulk(c)) => std::str::from_utf8(c)
                    .ok()
                    .and_then(|c| c.parse::<u64>().ok()),
                _ => None,
            }
            .ok_or_else(|| error_reply("unexpected SCAN reply from a cluster node"))?;
            let next = self
                .map
                .scan_next(self.shard, node_next)
                .ok_or_else(|| error_reply("a node's SCAN cursor is too large for the proxy"))?;
            if let Some(c) = items.first_mut() {
                *c = Frame::Bulk(Bytes::from(next.to_string()));
            }
            Ok(Frame::Array(items).to_bytes())
        })();
        self.parent
            .deliver(self.token, rewritten.unwrap_or_else(|e: Bytes| e).into())
    }

    fn flush(&self) {
        self.parent.flush();
    }

    fn expects_more(&self) -> bool {
        self.parent.expects_more()
    }
}
