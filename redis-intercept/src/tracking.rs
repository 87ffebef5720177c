//! Client-side caching through the proxy (`CLIENT TRACKING`): which client read which key,
//! and the invalidation messages fanned out to them, per worker.
//!
//! Clients' reads go over the ordinary shared connections, so Redis can't know who read
//! what. Instead each worker holds, per upstream node, one listener connection in RESP3
//! with `CLIENT TRACKING ON BCAST` (`upstream/tracking_listener.rs`): Redis tells it of
//! every key modified on that node. The worker keeps its own table of which client read
//! which key (bounded, evicted by invalidating, as Redis does) and sends each reader its
//! invalidation.
//!
//! Never stale: a read's reply and the listener's message for a later write come on
//! different sockets, so the message may be handled before the reply. Every key the
//! listeners report is remembered for a while with a sequence number (`Recent`); a read
//! records the number when it is sent, and when its reply arrives, a key invalidated since
//! (or any doubt: a listener down or restarted since, the memory overflowed) makes the
//! proxy send the invalidation right after the reply instead of recording the read. A
//! listener that comes up (a new node, a reconnect) invalidates everything its tracking
//! clients hold, since writes before it went unseen.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::rc::{Rc, Weak};

use bytes::Bytes;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;

use crate::upstream::ConnSettings;
use crate::upstream::tracking_listener::{Listener, NoloopWrite};

mod message;
mod table;

pub use message::{Deliver, Message, encode};
use table::{Readers, Recent};

/// Most `CLIENT TRACKING ON` replies waiting for listeners; past it they are answered at
/// once (their first reads are then invalidated as soon as answered).
const MAX_WAITING: usize = 4096;

/// A client's `CLIENT TRACKING ON` options.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Options {
    /// `REDIRECT id` (0: none).
    pub redirect: u64,
    /// `BCAST`.
    pub bcast: bool,
    /// `PREFIX`es (BCAST only; none means every key).
    pub prefixes: Vec<Bytes>,
    /// `OPTIN`.
    pub optin: bool,
    /// `OPTOUT`.
    pub optout: bool,
    /// `NOLOOP`.
    pub noloop: bool,
}

/// One tracking client, shared by its session and the worker's tracker.
pub struct Client {
    /// Its client id.
    pub id: u64,
    /// Its options.
    pub opts: RefCell<Options>,
    /// Its redirect target was gone when an invalidation was due (`broken_redirect`).
    pub broken_redirect: Cell<bool>,
    /// Its `CLIENT TRACKING ON` was answered: the listeners were up. Until then its reads
    /// are invalidated as soon as they are answered.
    pub ready: Cell<bool>,
    /// It may hold keys read since it was last told to drop everything: a flush seen by
    /// several listeners (a cluster's FLUSHALL) tells it once.
    holds: Cell<bool>,
}

impl Client {
    /// A client with tracking on, with `opts`.
    pub fn new(id: u64, opts: Options) -> Rc<Client> {
        Rc::new(Client {
            id,
            opts: RefCell::new(opts),
            broken_redirect: Cell::new(false),
            ready: Cell::new(false),
            holds: Cell::new(true),
        })
    }
}

/// What the tracker counts, for metrics.
#[derive(Clone, Default)]
pub struct TrackingMetrics {
    /// Keys in the tracking tables.
    pub keys: Gauge,
    /// Invalidation messages sent to clients.
    pub invalidations: Counter,
}

/// A worker's tracking state.
pub struct Tracker {
    /// Tracking clients by id.
    clients: RefCell<HashMap<u64, Rc<Client>>>,
    /// `clients` isn't empty (read on every request, so kept apart).
    any: Cell<bool>,
    /// Clients in BCAST mode.
    bcast: RefCell<Vec<Weak<Client>>>,
    /// Which clients read each key since its last invalidation.
    table: RefCell<HashMap<Bytes, Readers, foldhash::fast::RandomState>>,
    /// Most keys in `table`.
    max_keys: Cell<usize>,
    /// Sequence number of the last invalidated key (or event).
    seq: Cell<u64>,
    /// Reads sent before this number are not recorded (a listener came up or went down).
    reset_at: Cell<u64>,
    /// Keys invalidated lately.
    recent: RefCell<Recent>,
    /// Listener per node address.
    listeners: RefCell<HashMap<String, Rc<Listener>>>,
    /// Listeners not up.
    down: Cell<usize>,
    /// Bumped when the listeners are all closed, so connections look again.
    epoch: Cell<u64>,
    /// Waiting for every listener to be up (`CLIENT TRACKING ON` replies then).
    ready: RefCell<Vec<Box<dyn FnOnce()>>>,
    /// Nodes this worker connects to, with settings to reach them.
    nodes: RefCell<HashMap<String, ConnSettings>>,
    /// The worker's sessions.
    deliver: RefCell<Option<Rc<Deliver>>>,
    /// Metrics.
    metrics: RefCell<TrackingMetrics>,
    /// Hasher for `recent`.
    hasher: foldhash::fast::FixedState,
}

thread_local! {
    /// This worker's tracker.
    static TRACKER: Rc<Tracker> = Rc::new(Tracker::new());
}

/// This worker's tracker.
pub fn tracker() -> Rc<Tracker> {
    TRACKER.with(Rc::clone)
}

/// The sequence number a read sent now records (see [`Tracker::seq`]).
pub fn seq() -> u64 {
    TRACKER.with(|t| t.seq())
}

/// A tracked read got its reply (see [`Tracker::read_done`]).
pub fn read_done(id: u64, keys: &[Bytes], seq: u64) {
    TRACKER.with(|t| t.read_done(id, keys, seq));
}

/// Remembers a node this worker's clients' requests go to (see [`Tracker::note_node`]).
pub fn note_node(addr: &str, settings: &ConnSettings) {
    TRACKER.with(|t| t.note_node(addr, settings));
}

/// A request is about to go to `addr`: while clients track keys, its node needs a listener.
/// `seen` is the connection's last epoch, so this costs a comparison once it is sure.
pub fn on_send(addr: &str, settings: &ConnSettings, seen: &Cell<u64>) {
    TRACKER.with(|t| {
        if seen.get() != t.epoch() && t.active() {
            t.ensure_listener(addr, settings);
            seen.set(t.epoch());
        }
    });
}

impl Tracker {
    fn new() -> Tracker {
        Tracker {
            clients: RefCell::default(),
            any: Cell::new(false),
            bcast: RefCell::default(),
            table: RefCell::default(),
            max_keys: Cell::new(1_000_000),
            seq: Cell::new(0),
            reset_at: Cell::new(0),
            recent: RefCell::default(),
            listeners: RefCell::default(),
            down: Cell::new(0),
            epoch: Cell::new(1),
            ready: RefCell::default(),
            nodes: RefCell::default(),
            deliver: RefCell::default(),
            metrics: RefCell::default(),
            hasher: foldhash::fast::FixedState::default(),
        }
    }

    /// Sets the worker's table size, metrics and sessions.
    pub fn install(&self, max_keys: usize, metrics: TrackingMetrics, deliver: Rc<Deliver>) {
        self.max_keys.set(max_keys.max(1));
        *self.metrics.borrow_mut() = metrics;
        *self.deliver.borrow_mut() = Some(deliver);
    }

    /// Whether any client of this worker tracks keys (connections then make sure their
    /// node has a listener).
    pub fn active(&self) -> bool {
        self.any.get()
    }

    /// The current epoch: a connection that saw it already made sure of its listener.
    pub fn epoch(&self) -> u64 {
        self.epoch.get()
    }

    /// The sequence number a read sent now records.
    pub fn seq(&self) -> u64 {
        self.seq.get()
    }

    /// Remembers a node this worker connects to, so tracking can listen to it.
    pub fn note_node(&self, addr: &str, settings: &ConnSettings) {
        if !self.nodes.borrow().contains_key(addr) {
            self.nodes
                .borrow_mut()
                .insert(addr.to_owned(), settings.clone());
        }
    }

    /// `addr` left the cluster: nothing is read from it any more, so its listener goes (a
    /// dead node's would count as down for ever, and no read would be cached).
    pub fn forget_node(&self, addr: &str) {
        self.nodes.borrow_mut().remove(addr);
        let gone = self.listeners.borrow_mut().remove(addr);
        if let Some(l) = gone {
            if !l.is_up() {
                self.down.set(self.down.get().saturating_sub(1));
            }
            l.close();
            if self.down.get() == 0 {
                let waiting: Vec<_> = self.ready.borrow_mut().drain(..).collect();
                for f in waiting {
                    f();
                }
            }
        }
    }

    /// Makes sure `addr` has a listener (tracking is active and a connection to it is used).
    pub fn ensure_listener(self: &Rc<Self>, addr: &str, settings: &ConnSettings) {
        if self.listeners.borrow().contains_key(addr) {
            return;
        }
        self.note_node(addr, settings);
        let listener = Listener::start(addr, settings, Rc::downgrade(self));
        self.down.set(self.down.get() + 1);
        self.listeners
            .borrow_mut()
            .insert(addr.to_owned(), listener);
    }

    /// Turns tracking on for `client`; `then` runs once every node this worker knows has a
    /// listener up (at once if they are), so that the client's first reads are recorded.
    pub fn enable(self: &Rc<Self>, client: &Rc<Client>, then: Box<dyn FnOnce()>) {
        let nodes: Vec<(String, ConnSettings)> = self
            .nodes
            .borrow()
            .iter()
            .map(|(a, s)| (a.clone(), s.clone()))
            .collect();
        for (addr, settings) in &nodes {
            self.ensure_listener(addr, settings);
        }
        self.clients
            .borrow_mut()
            .insert(client.id, Rc::clone(client));
        self.any.set(true);
        if client.opts.borrow().bcast {
            self.bcast.borrow_mut().push(Rc::downgrade(client));
        }
        if self.down.get() == 0 || self.ready.borrow().len() >= MAX_WAITING {
            then();
        } else {
            self.ready.borrow_mut().push(then);
        }
    }

    /// Tells client `id` to drop everything it holds (a transaction read more keys than the
    /// proxy notes).
    pub fn invalidate_client(&self, id: u64) {
        let client = self.clients.borrow().get(&id).cloned();
        if let Some(c) = client {
            self.send(&c, &Message::All);
        }
    }

    /// Turns tracking off for client `id` (its table entries go lazily, as in Redis).
    pub fn disable(&self, id: u64) {
        let gone = self.clients.borrow_mut().remove(&id);
        if gone.is_none() {
            return;
        }
        self.bcast
            .borrow_mut()
            .retain(|c| c.upgrade().is_some_and(|c| c.id != id));
        if self.clients.borrow().is_empty() {
            self.any.set(false);
            // Nobody tracks: stop the listeners (Redis sends them every write) and forget.
            for (_, l) in self.listeners.borrow_mut().drain() {
                l.close();
            }
            self.down.set(0);
            self.epoch.set(self.epoch.get() + 1);
            let dropped = self.table.borrow().len();
            self.table.borrow_mut().clear();
            self.metrics.borrow().keys.dec_by(dropped as i64);
            for f in self.ready.borrow_mut().drain(..) {
                f();
            }
        }
    }

    /// A tracked read of `keys` by client `id`, sent at `seq`, got its reply: record it, or
    /// invalidate the keys at once if they may have changed since.
    pub fn read_done(&self, id: u64, keys: &[Bytes], seq: u64) {
        let client = self.clients.borrow().get(&id).cloned();
        let Some(client) = client else {
            return;
        };
        if client.opts.borrow().bcast || keys.is_empty() {
            return;
        }
        if !client.ready.get() || !self.safe_since(seq, keys) {
            for key in keys {
                self.send(&client, &Message::Keys(std::slice::from_ref(key)));
            }
            return;
        }
        client.holds.set(true);
        let mut evict = Vec::new();
        {
            let mut table = self.table.borrow_mut();
            for key in keys {
                let full = table.len() >= self.max_keys.get();
                match table.entry(key.clone()) {
                    std::collections::hash_map::Entry::Occupied(mut e) => e.get_mut().add(id),
                    std::collections::hash_map::Entry::Vacant(e) => {
                        e.insert(Readers::One(id));
                        self.metrics.borrow().keys.inc();
                        if full
                            && let Some(k) = table.keys().find(|k| *k != key).cloned()
                            && let Some(readers) = table.remove(&k)
                        {
                            evict.push((k, readers));
                        }
                    }
                }
            }
        }
        for (key, readers) in evict {
            self.metrics.borrow().keys.dec();
            self.fan_out_key(&key, readers.ids(), None);
        }
    }

    /// Whether nothing may have changed `keys` since `seq` unseen.
    fn safe_since(&self, seq: u64, keys: &[Bytes]) -> bool {
        if self.down.get() > 0 || seq < self.reset_at.get() || self.listeners.borrow().is_empty() {
            return false;
        }
        self.recent
            .borrow()
            .unchanged_since(seq, keys.iter().map(|k| self.hasher.hash_one(k)))
    }

    /// Whether `addr`'s listener is up, and every other one (so writes can run on it).
    pub fn is_listening(&self, addr: &str) -> bool {
        self.down.get() == 0 && self.listeners.borrow().contains_key(addr)
    }

    /// Sends a NOLOOP client's write over `addr`'s listener (see `upstream/tracking_listener.rs`);
    /// gives it back when that listener isn't up.
    pub fn noloop_write(
        &self,
        addr: &str,
        request: &[u8],
        write: NoloopWrite,
    ) -> Result<(), NoloopWrite> {
        let listener = self.listeners.borrow().get(addr).cloned();
        match listener {
            Some(l) if self.down.get() == 0 => l.send(request, write),
            _ => Err(write),
        }
    }

    /// A NOLOOP write run on a listener was answered: the reply goes to its client, and
    /// since Redis reports the write to no one, every other reader of its keys is told here.
    /// A redirected write didn't run: it goes again the ordinary way.
    pub fn noloop_answered(&self, write: NoloopWrite, frame: crate::resp::Frame, raw: Bytes) {
        use crate::resp::Frame;
        if let Frame::Error(e) = &frame
            && (e.starts_with(b"MOVED ")
                || e.starts_with(b"ASK ")
                || e.starts_with(b"TRYAGAIN")
                || e.starts_with(b"CLUSTERDOWN"))
        {
            (write.redo)();
            return;
        }
        let failed = matches!(frame, Frame::Error(_) | Frame::BulkError(_));
        let reply = if write.resp2 {
            frame.into_resp2().to_bytes()
        } else {
            raw
        };
        write.to.answer(reply);
        if !failed {
            self.modified(&write.keys, Some(write.client));
        }
    }

    /// A listener reported `keys` modified on its node.
    pub fn invalidated(&self, keys: &[Bytes]) {
        self.modified(keys, None);
    }

    /// `keys` were modified (by the NOLOOP client `writer`, if known): their readers are told,
    /// the writer excepted.
    fn modified(&self, keys: &[Bytes], writer: Option<u64>) {
        {
            let mut recent = self.recent.borrow_mut();
            for key in keys {
                let seq = self.seq.get() + 1;
                self.seq.set(seq);
                recent.record(self.hasher.hash_one(key), seq);
            }
        }
        for key in keys {
            let readers = self.table.borrow_mut().remove(key);
            if let Some(readers) = readers {
                self.metrics.borrow().keys.dec();
                self.fan_out_key(key, readers.ids(), writer);
            }
        }
        self.broadcast(keys, writer);
    }

    /// Sends the invalidation of `key` to the clients in `ids` but `writer`.
    fn fan_out_key(&self, key: &Bytes, ids: &[u64], writer: Option<u64>) {
        for id in ids.iter().filter(|&&id| Some(id) != writer) {
            let client = self.clients.borrow().get(id).cloned();
            if let Some(c) = client
                && !c.opts.borrow().bcast
            {
                self.send(&c, &Message::Keys(std::slice::from_ref(key)));
            }
        }
    }

    /// Sends BCAST clients (but `writer`) the keys that match their prefixes, one message
    /// per prefix.
    fn broadcast(&self, keys: &[Bytes], writer: Option<u64>) {
        let clients: Vec<Rc<Client>> = self
            .bcast
            .borrow()
            .iter()
            .filter_map(Weak::upgrade)
            .filter(|c| Some(c.id) != writer)
            .collect();
        for c in clients {
            let prefixes = c.opts.borrow().prefixes.clone();
            let all = [Bytes::new()];
            let prefixes = if prefixes.is_empty() {
                &all[..]
            } else {
                &prefixes[..]
            };
            for p in prefixes {
                let matching: Vec<Bytes> =
                    keys.iter().filter(|k| k.starts_with(p)).cloned().collect();
                if !matching.is_empty() {
                    self.send(&c, &Message::Keys(&matching));
                }
            }
        }
    }

    /// A listener reported a flush: every tracking client is told to drop everything.
    pub fn flushed(&self) {
        self.reset();
        self.invalidate_all();
    }

    /// A listener came up (after `CLIENT TRACKING ON BCAST`): writes before went unseen, so
    /// everything tracked until now is invalidated.
    pub fn listener_up(&self) {
        self.down.set(self.down.get().saturating_sub(1));
        self.reset();
        self.invalidate_all();
        if self.down.get() == 0 {
            let waiting: Vec<_> = self.ready.borrow_mut().drain(..).collect();
            for f in waiting {
                f();
            }
        }
    }

    /// A listener lost its connection: writes from now on go unseen until it is back.
    pub fn listener_down(&self) {
        self.down.set(self.down.get() + 1);
        self.reset();
        self.invalidate_all();
    }

    /// The cluster's slots moved (a failover, a resharding): a new master doesn't know what
    /// was read from the old one.
    pub fn topology_changed(&self) {
        if self.active() {
            self.reset();
            self.invalidate_all();
        }
    }

    /// Reads in flight from now on are not recorded.
    fn reset(&self) {
        self.seq.set(self.seq.get() + 1);
        self.reset_at.set(self.seq.get());
    }

    /// Drops the table and tells every tracking client to drop everything.
    fn invalidate_all(&self) {
        let dropped = self.table.borrow().len();
        if dropped > 0 {
            self.table.borrow_mut().clear();
            self.metrics.borrow().keys.dec_by(dropped as i64);
        }
        let clients: Vec<Rc<Client>> = self.clients.borrow().values().cloned().collect();
        for c in clients.iter().filter(|c| c.ready.get()) {
            let bcast = c.opts.borrow().bcast;
            if c.holds.replace(bcast) {
                self.send(c, &Message::All);
            }
        }
    }

    /// Sends `msg` to `client`, or to the client it redirects to.
    fn send(&self, client: &Client, msg: &Message<'_>) {
        let Some(deliver) = self.deliver.borrow().clone() else {
            return;
        };
        let redirect = client.opts.borrow().redirect;
        let target = if redirect == 0 { client.id } else { redirect };
        if deliver(target, redirect != 0, msg) {
            self.metrics.borrow().invalidations.inc();
        } else if redirect != 0 {
            client.broken_redirect.set(true);
            deliver(client.id, false, &Message::RedirBroken(redirect));
        }
    }
}
