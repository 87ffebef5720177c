//! Dedicated connections of one upstream on one worker: lent to a client for a transaction
//! or a blocking command, and taken back for the next client when the client leaves them
//! clean, so a busy transactional app doesn't open a connection per transaction.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::{Rc, Weak};
use std::sync::Arc;

use super::{ConnSettings, NodeConn};
use crate::metrics::Metrics;

/// A worker's dedicated connections to the nodes of one upstream.
pub struct DedicatedPool {
    /// The upstream's name, for metrics.
    name: String,
    /// How connections behave (never `READONLY`: transactions and blocking pops write).
    settings: ConnSettings,
    /// Where node metrics come from.
    metrics: Arc<Metrics>,
    /// Clean connections waiting for their next client, by node address.
    idle: RefCell<HashMap<String, Vec<NodeConn>>>,
    /// Every connection lent out or idle, so shutdown can close them all.
    all: RefCell<Vec<Weak<super::conn::Inner>>>,
    /// Set at shutdown: nothing more is lent or kept.
    closed: Cell<bool>,
    /// Idle connections kept per node (`max_idle_dedicated`); more are closed when given back.
    max_idle: usize,
}

impl DedicatedPool {
    /// An empty pool for the upstream `name` that keeps up to `max_idle` clean connections
    /// per node for the next client.
    pub fn new(
        name: &str,
        settings: ConnSettings,
        max_idle: usize,
        metrics: Arc<Metrics>,
    ) -> Rc<DedicatedPool> {
        Rc::new(DedicatedPool {
            name: name.to_owned(),
            settings: ConnSettings {
                readonly: false,
                ..settings
            },
            metrics,
            idle: RefCell::new(HashMap::new()),
            all: RefCell::new(Vec::new()),
            closed: Cell::new(false),
            max_idle,
        })
    }

    /// A connection to `addr` for one client alone: an idle one if there is one, else a new
    /// one (requests queue while it connects).
    pub fn take(&self, addr: &str) -> NodeConn {
        if let Some(list) = self.idle.borrow_mut().get_mut(addr) {
            while let Some(conn) = list.pop() {
                if conn.is_idle() {
                    return conn;
                }
                conn.close();
            }
        }
        let conn = NodeConn::new_dedicated(
            addr.to_owned(),
            self.settings.clone(),
            self.metrics.dedicated_node(&self.name, addr),
        );
        if self.closed.get() {
            conn.close();
        }
        tokio::task::spawn_local(conn.clone().run());
        let mut all = self.all.borrow_mut();
        all.retain(|w| w.strong_count() > 0);
        all.push(Rc::downgrade(&conn.0));
        conn
    }

    /// Takes back a connection. `clean` says the client left no state on it (no transaction,
    /// no WATCH, nothing waiting); anything else is closed, since its state is unknown.
    pub fn give_back(&self, conn: NodeConn, clean: bool) {
        if !clean || !conn.is_idle() || self.closed.get() {
            conn.close();
            return;
        }
        let mut idle = self.idle.borrow_mut();
        let list = idle.entry(conn.addr().to_owned()).or_default();
        if list.len() >= self.max_idle {
            conn.close();
        } else {
            list.push(conn);
        }
    }

    /// Closes the idle connections to nodes `keep` rejects: after a topology change, nodes
    /// that left or are no longer masters (a transaction there would only get redirects).
    pub fn keep_nodes(&self, keep: impl Fn(&str) -> bool) {
        self.idle.borrow_mut().retain(|addr, list| {
            if keep(addr) {
                return true;
            }
            for conn in list.drain(..) {
                conn.close();
            }
            false
        });
    }

    /// Closes every connection, lent or idle (shutdown).
    pub fn close(&self) {
        self.closed.set(true);
        self.idle.borrow_mut().clear();
        for conn in self.all.borrow_mut().drain(..) {
            if let Some(inner) = conn.upgrade() {
                NodeConn(inner).close();
            }
        }
    }

    /// How its connections are made (also for a client's plain pub/sub connection).
    pub fn settings(&self) -> &ConnSettings {
        &self.settings
    }

    /// Idle connections kept for `addr` (for tests and the pool's own limit).
    pub fn idle_count(&self, addr: &str) -> usize {
        self.idle.borrow().get(addr).map_or(0, Vec::len)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn settings() -> ConnSettings {
        ConnSettings {
            budget: None,
            auth: None,
            connect_timeout: Duration::from_secs(1),
            backoff_max: Duration::from_secs(1),
            max_pending_bytes: 1 << 20,
            limits: crate::resp::Limits::default(),
            readonly: false,
            tls: None,
            write_delay: Duration::ZERO,
            mark: None,
            db: 0,
            protocol: None,
            version: crate::upstream::ServerVersion::default(),
        }
    }

    /// Waits (on the local task set) until `f` holds.
    async fn until(f: impl Fn() -> bool) {
        for _ in 0..200 {
            if f() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("condition not reached");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn idle_connections_to_nodes_no_longer_wanted_are_closed() {
        let local = tokio::task::LocalSet::new();
        local
            .run_until(async {
                let a = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                let b = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                let (addr_a, addr_b) = (
                    a.local_addr().unwrap().to_string(),
                    b.local_addr().unwrap().to_string(),
                );
                let pool = DedicatedPool::new("t", settings(), 8, Metrics::new());
                let (ca, cb) = (pool.take(&addr_a), pool.take(&addr_b));
                // Keep the server ends open while the connections are in use.
                let (_sa, _sb) = (a.accept().await.unwrap(), b.accept().await.unwrap());
                until(|| ca.is_up() && cb.is_up()).await;
                pool.give_back(ca.clone(), true);
                pool.give_back(cb.clone(), true);
                assert_eq!((pool.idle_count(&addr_a), pool.idle_count(&addr_b)), (1, 1));
                pool.keep_nodes(|n| n == addr_a);
                assert_eq!((pool.idle_count(&addr_a), pool.idle_count(&addr_b)), (1, 0));
                assert!(cb.is_closed());
                assert!(!ca.is_closed());
                // The kept one is lent again rather than a new one opened.
                let again = pool.take(&addr_a);
                assert!(Rc::ptr_eq(&again.0, &ca.0));
                pool.close();
            })
            .await;
    }
}
