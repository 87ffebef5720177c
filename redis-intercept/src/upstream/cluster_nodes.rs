//! A cluster upstream on one worker: its slot map, shared connections to each node, and the
//! topology refresh that keeps both current.
//!
//! The slot map is an `Rc<SlotMap>` replaced whole by each refresh, so a request sees either
//! the old map or the new one. Refreshes run on their own task over a dedicated connection
//! (never the shared pipelined ones), so the request path never waits for one. A refresh
//! happens every `refresh_interval`, and sooner after redirects or connection failures (at
//! most once per `redirect_refresh_interval`). Connections to nodes that left are retired:
//! they finish what they carry, then close.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use prometheus_client::metrics::counter::Counter;
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::cluster_status::view;
pub use super::cluster_status::{ClusterStatus, TopologyView};
use super::dedicated::DedicatedPool;
use super::standalone::protocol_settings;
use super::tls::Stream;
use super::{ConnSettings, NodeConn, lanes, open, read_replies};
use crate::cluster::{RefreshTrigger, Slot, SlotMap, TopologyError};
use crate::config::NodeAddr;
use crate::metrics::Metrics;
use crate::resp::{Frame, encode_command};
use crate::wake::Wake;

/// Most nodes one pool connects to; redirects naming more nodes are refused, so a confused
/// cluster can't make the proxy open connections without end.
const MAX_NODES: usize = 1024;

/// First retry delay after a discovery that found nothing; doubles up to `refresh_interval`.
const DISCOVERY_RETRY: Duration = Duration::from_millis(100);

/// Everything a pool needs that comes from the config.
pub struct ClusterSettings {
    /// Upstream name.
    pub name: String,
    /// Seed nodes from the config, tried when no known node answers.
    pub seeds: Vec<String>,
    /// Settings of every node connection.
    pub conn: ConnSettings,
    /// Shared connections per node on this worker.
    pub per_node: usize,
    /// Periodic refresh.
    pub refresh_interval: Duration,
    /// Redirects or failures that trigger an early refresh.
    pub refresh_threshold: u32,
    /// Shortest time between two refreshes.
    pub refresh_min_interval: Duration,
    /// This worker's number, for the admin view.
    pub worker: usize,
    /// Clean dedicated connections kept idle per node (`max_idle_dedicated`).
    pub max_idle_dedicated: usize,
}

/// A cluster upstream's connections and slot map on one worker.
pub struct ClusterNodes {
    /// Settings from the config.
    settings: ClusterSettings,
    /// The current slot map, replaced whole by refreshes and patched by MOVED.
    map: RefCell<Rc<SlotMap>>,
    /// Shared connections by node address.
    nodes: RefCell<HashMap<String, Rc<[NodeConn]>>>,
    /// The connections of each shard's master by shard index, so the request path needn't
    /// hash an address; each entry is checked against the master's address before use.
    by_shard: RefCell<Vec<Option<Rc<[NodeConn]>>>>,
    /// Decides when redirects and failures call for a refresh.
    trigger: RefCell<RefreshTrigger>,
    /// Wakes the refresh task early.
    wake: Wake,
    /// Set once the first discovery succeeded (or was given up on).
    first_done: Wake,
    /// Whether any discovery has succeeded.
    discovered: Cell<bool>,
    /// Set at shutdown.
    closed: Cell<bool>,
    /// The process's metrics.
    metrics: Arc<Metrics>,
    /// Published views for the admin endpoint.
    status: Arc<ClusterStatus>,
    /// Counters of redirects followed.
    moved: Counter,
    ask: Counter,
    retried: Counter,
    /// Counters of refreshes.
    refresh_ok: Counter,
    refresh_failed: Counter,
    /// A handle to this pool, for connection failure hooks.
    me: Weak<ClusterNodes>,
    /// Connections lent to one client at a time (transactions, blocking commands), for
    /// RESP2 and RESP3 clients.
    dedicated: [Rc<DedicatedPool>; 2],
}

impl ClusterNodes {
    /// A pool with no map yet; [`ClusterNodes::run`] discovers the topology.
    pub fn new(
        settings: ClusterSettings,
        metrics: Arc<Metrics>,
        status: Arc<ClusterStatus>,
    ) -> Rc<ClusterNodes> {
        let counter = |family, kind| Metrics::cluster(family, &settings.name, kind);
        let moved = counter(&metrics.cluster_redirects, "moved");
        let ask = counter(&metrics.cluster_redirects, "ask");
        let retried = counter(&metrics.cluster_redirects, "retry");
        let refresh_ok = counter(&metrics.cluster_refreshes, "ok");
        let refresh_failed = counter(&metrics.cluster_refreshes, "failed");
        let dedicated = [2, 3].map(|protocol| {
            DedicatedPool::new(
                &settings.name,
                protocol_settings(&settings.conn, protocol),
                settings.max_idle_dedicated,
                Arc::clone(&metrics),
            )
        });
        Rc::new_cyclic(|me| ClusterNodes {
            dedicated,
            trigger: RefCell::new(RefreshTrigger::new(
                settings.refresh_threshold,
                settings.refresh_min_interval,
            )),
            settings,
            map: RefCell::new(Rc::new(SlotMap::empty())),
            nodes: RefCell::new(HashMap::new()),
            by_shard: RefCell::new(Vec::new()),
            wake: Wake::default(),
            first_done: Wake::default(),
            discovered: Cell::new(false),
            closed: Cell::new(false),
            metrics,
            status,
            moved,
            ask,
            retried,
            refresh_ok,
            refresh_failed,
            me: me.clone(),
        })
    }

    /// The upstream's name.
    pub fn name(&self) -> &str {
        &self.settings.name
    }

    /// Where the server's name and version are learned.
    pub fn version_source(&self) -> &crate::upstream::ServerVersion {
        &self.settings.conn.version
    }

    /// The current slot map.
    pub fn map(&self) -> Rc<SlotMap> {
        Rc::clone(&self.map.borrow())
    }

    /// A shared connection to `addr` for the connection key `client` (a client id, or
    /// [`lanes::BULK`]), opening the node's connections if
    /// this is the first use.
    ///
    /// # Errors
    /// An error reply when the pool already has [`MAX_NODES`] nodes.
    pub fn conn(&self, addr: &str, client: u64) -> Result<NodeConn, Bytes> {
        if let Some(conns) = self.nodes.borrow().get(addr) {
            return Ok(conns[lanes::index(conns.len(), client)].clone());
        }
        let conns = self.open_node(addr)?;
        Ok(conns[lanes::index(conns.len(), client)].clone())
    }

    /// Like [`ClusterNodes::conn`] for the master `addr` of shard `shard` of the current map,
    /// through a per-shard cache.
    ///
    /// # Errors
    /// As [`ClusterNodes::conn`].
    pub fn master_conn(&self, shard: usize, addr: &str, client: u64) -> Result<NodeConn, Bytes> {
        let pick = |conns: &Rc<[NodeConn]>| conns[lanes::index(conns.len(), client)].clone();
        if let Some(Some(conns)) = self.by_shard.borrow().get(shard)
            && conns[0].addr() == addr
        {
            return Ok(pick(conns));
        }
        let conns = match self.nodes.borrow().get(addr) {
            Some(c) => Some(Rc::clone(c)),
            None => None,
        };
        let conns = match conns {
            Some(c) => c,
            None => self.open_node(addr)?,
        };
        let mut cache = self.by_shard.borrow_mut();
        if cache.len() <= shard {
            cache.resize(shard + 1, None);
        }
        cache[shard] = Some(Rc::clone(&conns));
        Ok(pick(&conns))
    }

    /// Whether `addr` can take requests now: its connections exist and aren't in backoff.
    pub fn usable(&self, addr: &str) -> bool {
        self.nodes
            .borrow()
            .get(addr)
            // RESP2's ordinary connections: the others may never have been started.
            .is_some_and(|c| c[..lanes::ordinary(c.len())].iter().any(|c| !c.is_down()))
    }

    fn open_node(&self, addr: &str) -> Result<Rc<[NodeConn]>, Bytes> {
        let mut nodes = self.nodes.borrow_mut();
        if nodes.len() >= MAX_NODES {
            return Err(super::error_reply(&format!(
                "cluster {} names more than {MAX_NODES} nodes; refusing to connect to {addr}",
                self.settings.name
            )));
        }
        let hook: Rc<dyn Fn()> = {
            let me = self.me.clone();
            Rc::new(move || {
                if let Some(pool) = me.upgrade() {
                    pool.note_event();
                }
            })
        };
        let conns: Rc<[NodeConn]> = lanes::node_conns(self.settings.per_node, |lazy, protocol| {
            let (conn, metrics) = (
                protocol_settings(&self.settings.conn, protocol),
                self.metrics.node(&self.settings.name, addr),
            );
            let c = if lazy {
                NodeConn::new_lazy(addr.to_owned(), conn, metrics)
            } else {
                NodeConn::new(addr.to_owned(), conn, metrics)
            };
            c.set_failure_hook(Rc::clone(&hook));
            if !lazy {
                tokio::task::spawn_local(c.clone().run());
            }
            c
        })
        .into();
        nodes.insert(addr.to_owned(), Rc::clone(&conns));
        Ok(conns)
    }

    /// Counts a redirect or failure toward an early refresh.
    fn note_event(&self) {
        if self.trigger.borrow_mut().note() {
            self.wake.notify();
        }
    }

    /// Follows a MOVED: the slot's owner changes in the map now (so the next request goes
    /// straight there), and a refresh is asked for.
    pub fn note_moved(&self, slot: Slot, addr: &str) {
        self.moved.inc();
        {
            let mut map = self.map.borrow_mut();
            if map.master(slot) != Some(addr) {
                Rc::make_mut(&mut map).set_owner(slot, addr);
            }
        }
        self.note_event();
    }

    /// Counts an ASK redirect (the map doesn't change: the migration isn't finished).
    pub fn note_ask(&self) {
        self.ask.inc();
    }

    /// Counts a TRYAGAIN or CLUSTERDOWN retry; a refresh may help.
    pub fn note_retry(&self) {
        self.retried.inc();
        self.note_event();
    }

    /// Waits until the first discovery has succeeded or given up (at most `limit`).
    pub async fn wait_first(&self, limit: Duration) {
        if self.discovered.get() {
            return;
        }
        let _ = tokio::time::timeout(limit, self.first_done.wait()).await;
    }

    /// A connection of its own for one client, to the master of `slot` (any master when
    /// `None`), and the pool to give it back to.
    ///
    /// # Errors
    /// `-CLUSTERDOWN` when nobody owns the slot (or the map is empty).
    pub fn dedicated(
        &self,
        slot: Option<Slot>,
        resp3: bool,
    ) -> Result<(NodeConn, Rc<DedicatedPool>), Bytes> {
        let addr = self.master_of(slot)?;
        let pool = &self.dedicated[usize::from(resp3)];
        Ok((pool.take(&addr), Rc::clone(pool)))
    }

    /// The pool of dedicated connections for RESP2 or RESP3 clients.
    pub fn dedicated_pool(&self, resp3: bool) -> &Rc<DedicatedPool> {
        &self.dedicated[usize::from(resp3)]
    }

    /// The master of `slot` (any master when `None`) and how to connect to it, for a client
    /// that gets a plain connection of its own (pub/sub).
    ///
    /// # Errors
    /// As [`ClusterNodes::dedicated`].
    pub fn plain_target(
        &self,
        slot: Option<Slot>,
        resp3: bool,
    ) -> Result<(String, ConnSettings), Bytes> {
        let settings = self.dedicated[usize::from(resp3)].settings().clone();
        Ok((self.master_of(slot)?, settings))
    }

    fn master_of(&self, slot: Option<Slot>) -> Result<String, Bytes> {
        let map = self.map();
        let master = match slot {
            Some(slot) => map.master(slot),
            None => map.shards().first().map(|s| s.master.as_str()),
        };
        master
            .map(str::to_owned)
            .ok_or_else(|| Bytes::from_static(b"-CLUSTERDOWN Hash slot not served\r\n"))
    }

    /// Stops the refresh task and closes every connection.
    pub fn close(&self) {
        self.closed.set(true);
        self.wake.notify();
        for pool in &self.dedicated {
            pool.close();
        }
        for conns in self.nodes.borrow().values() {
            for c in conns.iter() {
                c.close();
            }
        }
    }

    /// Replaces the slot map, opens connections to new nodes and retires those of nodes that
    /// are no longer used.
    fn install(&self, map: SlotMap) {
        let mut wanted: HashSet<&str> = HashSet::new();
        for shard in map.shards() {
            wanted.insert(&shard.master);
            if self.settings.conn.readonly {
                wanted.extend(shard.replicas.iter().map(String::as_str));
            }
        }
        for addr in &wanted {
            if !self.nodes.borrow().contains_key(*addr)
                && let Err(e) = self.open_node(addr)
            {
                warn!(upstream = %self.settings.name, error = %String::from_utf8_lossy(&e).trim_end(), "node not opened");
            }
        }
        let gone: Vec<String> = self
            .nodes
            .borrow()
            .keys()
            .filter(|a| !wanted.contains(a.as_str()))
            .cloned()
            .collect();
        for addr in gone {
            if let Some(conns) = self.nodes.borrow_mut().remove(&addr) {
                info!(upstream = %self.settings.name, node = %addr, "node left the topology; retiring its connections");
                for c in conns.iter() {
                    c.retire();
                }
                crate::tracking::tracker().forget_node(&addr);
            }
        }
        let masters: HashSet<&str> = map.shards().iter().map(|s| s.master.as_str()).collect();
        for pool in &self.dedicated {
            pool.keep_nodes(|addr| masters.contains(addr));
        }
        let old = self.map.replace(Rc::new(map));
        let new = self.map.borrow();
        if old.shards() != new.shards() || old.covered() != new.covered() {
            info!(upstream = %self.settings.name, shards = new.shards().len(), covered = new.covered(), "cluster topology changed");
            // Slots may have new masters, which don't know what was read from the old ones.
            crate::tracking::tracker().topology_changed();
        }
        self.status.publish(self.settings.worker, view(&new));
    }

    /// Keeps the topology current until [`ClusterNodes::close`].
    pub async fn run(self: Rc<Self>) {
        let mut disco: Option<(String, Stream)> = None;
        let mut retry = DISCOVERY_RETRY;
        while !self.closed.get() {
            let started = Instant::now();
            self.trigger.borrow_mut().refreshed(started.into_std());
            let found = self.discover(&mut disco).await;
            let next = match found {
                Ok(map) => {
                    self.refresh_ok.inc();
                    self.install(map);
                    self.discovered.set(true);
                    retry = DISCOVERY_RETRY;
                    started + self.settings.refresh_interval
                }
                Err(e) => {
                    self.refresh_failed.inc();
                    warn!(upstream = %self.settings.name, error = %e, "cluster topology refresh failed");
                    if self.discovered.get() {
                        started + self.settings.refresh_interval
                    } else {
                        retry = (retry * 2).min(self.settings.refresh_interval);
                        started + retry
                    }
                }
            };
            self.first_done.notify();
            // Sleep until the periodic refresh, or until enough redirects and failures ask
            // for one (no sooner than the minimum interval).
            loop {
                if self.closed.get() {
                    return;
                }
                let due = self
                    .trigger
                    .borrow()
                    .due(Instant::now().into_std())
                    .map(Instant::from_std);
                let at = due.map_or(next, |d| d.min(next));
                if at <= Instant::now() {
                    break;
                }
                tokio::select! {
                    _ = tokio::time::sleep_until(at) => break,
                    () = self.wake.wait() => {}
                }
            }
        }
    }

    /// Asks known nodes (masters first), then the seeds, for the topology, reusing the last
    /// discovery connection when it still works.
    async fn discover(&self, disco: &mut Option<(String, Stream)>) -> Result<SlotMap, String> {
        let mut candidates: Vec<String> = Vec::new();
        if let Some((addr, _)) = disco.as_ref() {
            candidates.push(addr.clone());
        }
        {
            let map = self.map.borrow();
            candidates.extend(map.shards().iter().map(|s| s.master.clone()));
            candidates.extend(map.shards().iter().flat_map(|s| s.replicas.clone()));
        }
        candidates.extend(self.settings.seeds.iter().cloned());
        let mut seen = HashSet::new();
        candidates.retain(|c| seen.insert(c.clone()));
        let mut errors = Vec::new();
        for addr in candidates {
            let node = match NodeAddr::parse(&addr) {
                Ok(node) => node,
                Err(e) => {
                    errors.push(e);
                    continue;
                }
            };
            let stream = match disco.take() {
                Some((a, s)) if a == addr => Ok(s),
                _ => self.connect(&node).await,
            };
            let mut stream = match stream {
                Ok(s) => s,
                Err(e) => {
                    errors.push(format!("{addr}: {e}"));
                    continue;
                }
            };
            match self.query(&mut stream, &node).await {
                Ok(map) if map.covered() > 0 => {
                    *disco = Some((addr, stream));
                    return Ok(map);
                }
                Ok(_) => errors.push(format!("{addr}: no slots assigned")),
                Err(e) => errors.push(format!("{addr}: {e}")),
            }
        }
        Err(errors.join("; "))
    }

    /// A dedicated discovery connection to `addr` (TLS and AUTH as configured).
    async fn connect(&self, addr: &NodeAddr) -> Result<Stream, String> {
        let settings = ConnSettings {
            readonly: false,
            ..self.settings.conn.clone()
        };
        tokio::time::timeout(settings.connect_timeout, open(addr, &settings))
            .await
            .map_err(|_| format!("connect timed out after {:?}", settings.connect_timeout))?
            .map_err(|e| match e {
                super::UpstreamError::Auth { reason, .. } => {
                    format!("authentication failed: {reason}")
                }
                super::UpstreamError::Connect { reason, .. } => reason,
                other => other.to_string(),
            })
    }

    /// `CLUSTER SHARDS` (Redis 7), or `CLUSTER SLOTS` where that is unknown.
    async fn query(&self, stream: &mut Stream, addr: &NodeAddr) -> Result<SlotMap, String> {
        let host = addr.host();
        let shards = self.cluster_command(stream, b"SHARDS").await?;
        match SlotMap::from_cluster_shards(&shards, host) {
            Ok(map) => Ok(map),
            Err(TopologyError::NodeError(e)) if e.contains("nknown") => {
                debug!(node = %addr, "CLUSTER SHARDS unknown; using CLUSTER SLOTS");
                let slots = self.cluster_command(stream, b"SLOTS").await?;
                SlotMap::from_cluster_slots(&slots, host).map_err(|e| e.to_string())
            }
            Err(e) => Err(e.to_string()),
        }
    }

    /// Sends `CLUSTER <sub>` on the discovery connection and parses the reply.
    async fn cluster_command(&self, stream: &mut Stream, sub: &[u8]) -> Result<Frame, String> {
        let limits = &self.settings.conn.limits;
        let timeout = self
            .settings
            .conn
            .connect_timeout
            .max(Duration::from_secs(1));
        let mut out = bytes::BytesMut::new();
        encode_command([&b"CLUSTER"[..], sub].into_iter(), &mut out);
        let replies = tokio::time::timeout(timeout, async {
            stream
                .write_all(&out)
                .await
                .map_err(|e| format!("write failed: {e}"))?;
            read_replies(stream, 1, limits).await
        })
        .await
        .map_err(|_| "topology query timed out".to_owned())??;
        let reply = replies.into_iter().next().unwrap_or_default();
        match Frame::parse(&reply, limits) {
            Ok(Some((frame, _))) => Ok(frame),
            Ok(None) => Err("incomplete topology reply".to_owned()),
            Err(e) => Err(format!("bad topology reply: {e}")),
        }
    }
}
