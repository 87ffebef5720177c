//! A standalone server as one worker reaches it: shared connections and a dedicated pool for
//! each database a client has selected. Database 0's are made at start, the others on the
//! first `SELECT` of a client of this worker, and all of them are kept until shutdown (at
//! most `databases` sets).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;

use super::dedicated::DedicatedPool;
use super::{ConnSettings, NodeConn, lanes};
use crate::config::{ReadPolicy, UpstreamConfig};
use crate::metrics::Metrics;

/// One database's connections on this worker.
#[derive(Clone)]
pub struct Db {
    /// Shared pipelined connections (`connections_per_node`, then the bulk lane's; see
    /// [`lanes`]).
    pub conns: Vec<NodeConn>,
    /// Connections lent to one client at a time (transactions, blocking commands), for
    /// RESP2 and RESP3 clients.
    pub dedicated: [Rc<DedicatedPool>; 2],
}

/// A worker's way to one standalone server, per database.
pub struct Standalone {
    /// The upstream's name, for metrics.
    name: String,
    /// The server.
    addr: String,
    /// How connections behave; `db` is set per database.
    settings: ConnSettings,
    /// Shared connections per database.
    per_node: usize,
    /// Databases the server has (`databases`): SELECT of another is refused.
    databases: u32,
    /// Clean dedicated connections kept idle per database (`max_idle_dedicated`).
    max_idle_dedicated: usize,
    /// Where node metrics come from.
    metrics: Arc<Metrics>,
    /// The databases in use, 0 always.
    dbs: RefCell<HashMap<u32, Db>>,
    /// Set at shutdown: connections made after it are closed at once.
    closed: Cell<bool>,
    /// Called when a shared connection fails or gets a `-READONLY` reply (a sentinel
    /// upstream asks its sentinels).
    on_failure: Option<Rc<dyn Fn()>>,
    /// Where reads may go besides this server (a sentinel upstream's replicas under a read
    /// policy other than `master`).
    reads: RefCell<Option<Reads>>,
}

/// A server's replicas for reads, and the policy that picks between them and the server.
#[derive(Clone)]
pub struct Reads {
    /// Envoy's read policy.
    pub policy: ReadPolicy,
    /// The replicas on this worker.
    pub replicas: Vec<Rc<Standalone>>,
}

impl Standalone {
    /// Starts database 0's shared connections to `addr` (tasks on the current `LocalSet`).
    /// `up` gives the counts: `connections_per_node`, `databases`, `max_idle_dedicated`.
    /// Without an address (a config with no node) there are no connections. `on_failure`
    /// is called whenever a shared connection fails or gets a `-READONLY` reply.
    pub fn new(
        up: &UpstreamConfig,
        addr: &str,
        settings: ConnSettings,
        metrics: Arc<Metrics>,
        on_failure: Option<Rc<dyn Fn()>>,
    ) -> Rc<Standalone> {
        let me = Rc::new(Standalone {
            name: up.name.clone(),
            addr: addr.to_owned(),
            settings,
            per_node: if addr.is_empty() {
                0
            } else {
                up.connections_per_node
            },
            databases: up.databases,
            max_idle_dedicated: up.max_idle_dedicated,
            metrics,
            dbs: RefCell::new(HashMap::new()),
            closed: Cell::new(false),
            on_failure,
            reads: RefCell::new(None),
        });
        me.db(0);
        me
    }

    /// Lets reads go to `replicas` as `policy` says (the replicas are closed by their owner).
    pub fn set_reads(&self, policy: ReadPolicy, replicas: Vec<Rc<Standalone>>) {
        *self.reads.borrow_mut() = Some(Reads { policy, replicas });
    }

    /// Where reads may go besides this server, if anywhere.
    pub fn reads(&self) -> Option<Reads> {
        self.reads.borrow().clone()
    }

    /// Where the server's name and version are learned.
    pub fn version_source(&self) -> &crate::upstream::ServerVersion {
        &self.settings.version
    }

    /// The databases the server has, as configured.
    pub fn databases(&self) -> u32 {
        self.databases
    }

    /// Database `db`'s connections, started now if this is the first use on this worker.
    /// (`db` is below `databases`: callers check, so at most that many sets exist.)
    pub fn db(&self, db: u32) -> Db {
        if let Some(d) = self.dbs.borrow().get(&db) {
            return d.clone();
        }
        let settings = ConnSettings {
            db,
            ..self.settings.clone()
        };
        let conns = if self.per_node == 0 {
            Vec::new()
        } else {
            lanes::node_conns(self.per_node, |lazy, protocol| {
                let (addr, metrics) =
                    (self.addr.clone(), self.metrics.node(&self.name, &self.addr));
                let settings = protocol_settings(&settings, protocol);
                let c = if lazy {
                    NodeConn::new_lazy(addr, settings, metrics)
                } else {
                    NodeConn::new(addr, settings, metrics)
                };
                if let Some(hook) = &self.on_failure {
                    c.set_failure_hook(Rc::clone(hook));
                    c.set_readonly_hook(Rc::clone(hook));
                }
                if !lazy {
                    tokio::task::spawn_local(c.clone().run());
                }
                c
            })
        };
        let pool = |protocol| {
            DedicatedPool::new(
                &self.name,
                protocol_settings(&settings, protocol),
                self.max_idle_dedicated,
                Arc::clone(&self.metrics),
            )
        };
        let d = Db {
            conns,
            dedicated: [pool(2), pool(3)],
        };
        if self.closed.get() {
            close(&d);
        }
        self.dbs.borrow_mut().insert(db, d.clone());
        d
    }

    /// Closes every connection of every database (shutdown).
    pub fn close(&self) {
        self.closed.set(true);
        for d in self.dbs.borrow().values() {
            close(d);
        }
    }
}

fn close(d: &Db) {
    for c in &d.conns {
        c.close();
    }
    for pool in &d.dedicated {
        pool.close();
    }
}

/// `settings` for connections in `protocol` (2 or 3). RESP2's learn the server's version
/// with `HELLO 2`, except a mirror's (`budget` unset), whose server may not even answer.
pub(super) fn protocol_settings(settings: &ConnSettings, protocol: u8) -> ConnSettings {
    ConnSettings {
        protocol: match protocol {
            3 => Some(3),
            _ if settings.budget.is_some() => Some(2),
            _ => None,
        },
        ..settings.clone()
    }
}
