//! One worker thread: a single-threaded runtime that accepts from its own handle of every
//! service listener, builds each service's upstreams, serves clients, and follows reloads.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::TcpListener;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::sync::watch;
use tracing::{error, info, warn};

use super::live;
use super::reload::Reloaded;
use crate::budget::QueryBudget;
use crate::config::Config;
use crate::locks::LockRecovered;
use crate::metrics::Metrics;
use crate::resp::Limits;
use crate::service::{Discard, ServiceCtx, SharedAuth, SharedParts, UpstreamSecrets, Upstreams};
use crate::session::{self, ClientGuard, Sessions};
use crate::upstream::cluster_nodes::ClusterStatus;
use crate::upstream::owned::GenerationConns;

/// What one worker thread needs to start.
pub(super) struct WorkerPlan {
    /// Worker number, for logs.
    pub(super) index: usize,
    /// The configuration.
    pub(super) config: Config,
    /// This worker's handles of the service listeners, in config order.
    pub(super) listeners: Vec<TcpListener>,
    /// Connected clients per service, shared by all workers.
    pub(super) counters: Vec<Arc<AtomicUsize>>,
    /// Becomes true at shutdown.
    pub(super) shutdown: watch::Receiver<bool>,
    /// The running config after each reload, with its upstreams' credentials.
    pub(super) reloads: watch::Receiver<Arc<Reloaded>>,
    /// The process's metrics.
    pub(super) metrics: Arc<Metrics>,
    /// Credentials of each upstream, by name.
    pub(super) upstream_auths: HashMap<String, UpstreamSecrets>,
    /// Client-facing credentials of each service, in config order.
    pub(super) client_auths: Vec<SharedAuth>,
    /// Where workers publish their view of each cluster upstream.
    pub(super) cluster_status: HashMap<String, Arc<ClusterStatus>>,
    /// Socket mark of every upstream connection (with interception), so the connect hook
    /// never sends the proxy to itself.
    pub(super) mark: Option<u32>,
    /// Where a failed connection to a sentinel upstream's master is reported.
    pub(super) kicks: tokio::sync::mpsc::Sender<String>,
    /// The process-wide budget for client input.
    pub(super) query_budget: Arc<QueryBudget>,
}

impl WorkerPlan {
    pub(super) fn run(self) -> Result<()> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("build worker runtime")?;
        let local = tokio::task::LocalSet::new();
        local.block_on(&rt, self.serve())
    }

    pub(super) async fn serve(self) -> Result<()> {
        let WorkerPlan {
            index,
            config,
            listeners,
            counters,
            shutdown,
            reloads,
            metrics,
            upstream_auths,
            client_auths,
            cluster_status,
            mark,
            kicks,
            query_budget,
        } = self;
        let sessions = Sessions::start(
            config.proxy.tracking_table_max_keys / config.proxy.worker_count().max(1),
            crate::tracking::TrackingMetrics {
                keys: metrics.tracking_keys.clone(),
                invalidations: metrics.tracking_invalidations.clone(),
            },
        );
        let mut ups = Upstreams {
            worker: index,
            auths: upstream_auths,
            limits: Limits::default(),
            metrics: Arc::clone(&metrics),
            pools: HashMap::new(),
            cluster_status,
            mark,
            kicks,
            query_budget,
            discard: Rc::new(Discard),
            owned: GenerationConns::default(),
            fresh: Vec::new(),
        };
        let mut current = Vec::new();
        let mut accepts = Vec::new();
        let mut first = Vec::new();
        for (((svc, listener), counter), client_auth) in config
            .services
            .iter()
            .zip(listeners)
            .zip(counters)
            .zip(client_auths)
        {
            let shared = SharedParts {
                policy: Rc::new(RefCell::new(Rc::new(crate::service::policy(svc)))),
                metrics: metrics.service(&svc.name, index),
                auth: client_auth,
                newest: Rc::default(),
            };
            let (ctx, pools) = ups.service(&config, svc, &shared)?;
            first.extend(pools);
            let ctx = Rc::new(ctx);
            *shared.newest.borrow_mut() = Rc::downgrade(&ctx);
            current.push(Some(ctx));
            accepts.push((listener, counter));
        }
        // Clients wait in the listen backlog until each cluster's first topology discovery
        // has succeeded (or taken too long), so early requests aren't refused for want of a
        // slot map.
        for pool in first {
            pool.wait_first(FIRST_DISCOVERY_WAIT).await;
        }
        let current = Rc::new(WorkerServices {
            list: RefCell::new(current),
            removed: tokio::sync::Notify::new(),
        });
        for (i, ((listener, counter), svc)) in accepts.into_iter().zip(&config.services).enumerate()
        {
            let listener = tokio::net::TcpListener::from_std(listener)?;
            tokio::task::spawn_local(accept_loop(
                listener,
                AcceptTarget {
                    current: Rc::clone(&current),
                    index: i,
                    name: svc.name.clone(),
                },
                counter,
                shutdown.clone(),
                Rc::clone(&sessions),
            ));
        }
        // Reloads reach this worker's services here; the task ends with the proxy.
        tokio::task::spawn_local(follow_reloads(
            reloads,
            ups,
            config.clone(),
            Rc::clone(&current),
            shutdown.clone(),
            Rc::clone(&sessions),
        ));
        let mut stop = shutdown.clone();
        while !*stop.borrow() {
            if stop.changed().await.is_err() {
                break;
            }
        }
        // Sessions stop reading and finish the replies they owe.
        sessions.shut_down();
        let deadline = tokio::time::Instant::now() + config.proxy.drain_timeout.0;
        while !sessions.is_empty() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
            // Sessions accepted just before the signal get it too.
            sessions.shut_down();
        }
        if !sessions.is_empty() {
            warn!(
                worker = index,
                clients = sessions.len(),
                "drain timeout: closing remaining clients"
            );
        }
        // Older generations close as their last clients go.
        for ctx in current.list.borrow().iter().flatten() {
            ctx.owned.close();
        }
        Ok(())
    }
}

/// Applies each reload on one worker: services whose routes, mirrors or upstreams changed get
/// a new generation of their routes (new clients start on it; connected ones move to it at
/// their next command that nothing ties to the old one), then every service takes the new
/// policy and mirror rates. `config` is what the worker runs now.
pub(super) async fn follow_reloads(
    mut reloads: watch::Receiver<Arc<Reloaded>>,
    mut ups: Upstreams,
    mut config: Config,
    current: Rc<WorkerServices>,
    shutdown: watch::Receiver<bool>,
    sessions: Rc<Sessions>,
) {
    while reloads.changed().await.is_ok() {
        let new = Arc::clone(&reloads.borrow_and_update());
        // What the reload found changed, and what differs from what this worker ran (the
        // same, unless the worker missed a reload).
        let mut changed = live::changed_upstreams(&config, &new.config);
        for name in &new.changed {
            if !changed.contains(name) {
                changed.push(name.clone());
            }
        }
        ups.pools.retain(|(name, _), _| !changed.contains(name));
        ups.auths.clone_from(&new.secrets);
        ups.cluster_status.clone_from(&new.cluster_status);
        let mut built = Vec::new();
        let mut fresh = Vec::new();
        for (i, ctx) in current.list.borrow().iter().enumerate() {
            let Some(ctx) = ctx else { continue };
            let find = |c: &Config| c.services.iter().find(|s| s.name == ctx.name).cloned();
            let (Some(old), Some(svc)) = (find(&config), find(&new.config)) else {
                continue;
            };
            if !live::routing_changed(&old, &svc, &changed) {
                continue;
            }
            match ups.service(&new.config, &svc, &SharedParts::of(ctx)) {
                Ok((next, pools)) => {
                    built.push((i, Rc::new(next)));
                    fresh.extend(pools);
                }
                Err(e) => {
                    error!(worker = ups.worker, service = %ctx.name, error = %format!("{e:#}"), "reload: routes not rebuilt; the old ones stay");
                }
            }
        }
        // New clusters get their slot map before anyone is sent there.
        for pool in fresh {
            pool.wait_first(FIRST_DISCOVERY_WAIT).await;
        }
        {
            let mut list = current.list.borrow_mut();
            for (i, next) in built {
                if let Some(Some(slot)) = list.get_mut(i) {
                    info!(worker = ups.worker, service = %next.name, "reload: new routes in use; connected clients move to them at their next command");
                    *slot.newest.borrow_mut() = Rc::downgrade(&next);
                    *slot = next;
                }
            }
        }
        serve_added(&new, &mut ups, &current, &shutdown, &sessions).await;
        // Removed services: no more accepts, and their clients finish what they owe and
        // are closed, as at shutdown.
        let mut removed = false;
        for slot in current.list.borrow_mut().iter_mut() {
            if let Some(ctx) = slot
                && new.removed.contains(&ctx.name)
            {
                info!(worker = ups.worker, service = %ctx.name, "reload: service removed; its clients are closed once their replies are out");
                sessions.shut_down_service(ctx);
                *slot = None;
                removed = true;
            }
        }
        if removed {
            current.removed.notify_waiters();
        }
        config.clone_from(&new.config);
        let running: Vec<Rc<ServiceCtx>> =
            current.list.borrow().iter().flatten().cloned().collect();
        live::apply(&running, &config);
        sessions.wake_all();
        if let Some(done) = &new.done {
            let _ = done.send(());
        }
    }
}

/// Starts serving, on this worker, the services `new` added: routes, then an accept loop on
/// the worker's own socket.
pub(super) async fn serve_added(
    new: &Reloaded,
    ups: &mut Upstreams,
    current: &Rc<WorkerServices>,
    shutdown: &watch::Receiver<bool>,
    sessions: &Rc<Sessions>,
) {
    for added in &new.added {
        let Some(svc) = new.config.services.iter().find(|s| s.name == added.name) else {
            continue;
        };
        let listener = added
            .listeners
            .locked()
            .get_mut(ups.worker)
            .and_then(Option::take);
        let Some(listener) = listener.map(tokio::net::TcpListener::from_std) else {
            continue;
        };
        let shared = SharedParts {
            policy: Rc::new(RefCell::new(Rc::new(crate::service::policy(svc)))),
            metrics: ups.metrics.service(&svc.name, ups.worker),
            auth: Arc::clone(&added.auth),
            newest: Rc::default(),
        };
        let built = listener
            .map_err(anyhow::Error::from)
            .and_then(|l| Ok((l, ups.service(&new.config, svc, &shared)?)));
        let (listener, (ctx, pools)) = match built {
            Ok(b) => b,
            Err(e) => {
                error!(worker = ups.worker, service = %svc.name, error = %format!("{e:#}"), "reload: the new service is not served by this worker");
                continue;
            }
        };
        for pool in pools {
            pool.wait_first(FIRST_DISCOVERY_WAIT).await;
        }
        let ctx = Rc::new(ctx);
        *shared.newest.borrow_mut() = Rc::downgrade(&ctx);
        let index = {
            let mut list = current.list.borrow_mut();
            list.push(Some(ctx));
            list.len() - 1
        };
        tokio::task::spawn_local(accept_loop(
            listener,
            AcceptTarget {
                current: Rc::clone(current),
                index,
                name: svc.name.clone(),
            },
            Arc::clone(&added.counter),
            shutdown.clone(),
            Rc::clone(sessions),
        ));
    }
}

/// Longest a worker waits for a cluster's first topology before it accepts clients anyway
/// (or, after a reload, sends clients there anyway).
pub(super) const FIRST_DISCOVERY_WAIT: Duration = Duration::from_secs(5);

/// Every service a worker serves: its newest generation, in config order (`None` once a
/// reload removed it).
pub(super) struct WorkerServices {
    /// The generations.
    pub(super) list: RefCell<Vec<Option<Rc<ServiceCtx>>>>,
    /// Wakes the accept loops when a reload removed a service.
    pub(super) removed: tokio::sync::Notify,
}

/// One service's newest generation on this worker, looked up at each accept (holding a
/// generation would keep its connections open after a reload replaced it).
pub(super) struct AcceptTarget {
    /// Every service's newest generation.
    pub(super) current: Rc<WorkerServices>,
    /// This service's place in it.
    pub(super) index: usize,
    /// The service's name, for logs.
    pub(super) name: String,
}

impl AcceptTarget {
    pub(super) fn get(&self) -> Option<Rc<ServiceCtx>> {
        self.current
            .list
            .borrow()
            .get(self.index)
            .cloned()
            .flatten()
    }
}

/// Accepts clients of one service on this worker until shutdown.
pub(super) async fn accept_loop(
    listener: tokio::net::TcpListener,
    service: AcceptTarget,
    counter: Arc<AtomicUsize>,
    mut shutdown: watch::Receiver<bool>,
    sessions: Rc<Sessions>,
) {
    let mut backoff = Duration::from_millis(10);
    loop {
        if service.get().is_none() {
            // A reload removed the service: dropping the listener closes its socket.
            return;
        }
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = shutdown.changed() => return,
            () = service.current.removed.notified() => continue,
        };
        match accepted {
            Ok((stream, _peer)) => {
                backoff = Duration::from_millis(10);
                // New clients start on the newest routes (a reload may have built them).
                let Some(ctx) = service.get() else { return };
                let max_clients = ctx.policy().max_clients;
                let Some(guard) = ClientGuard::acquire(&counter, max_clients) else {
                    ctx.metrics.rejected.inc();
                    // Redis's own words, then close.
                    let _ = stream.try_write(b"-ERR max number of clients reached\r\n");
                    continue;
                };
                ctx.metrics.accepted.inc();
                tokio::task::spawn_local(session::run(
                    stream,
                    Rc::clone(&ctx),
                    Rc::clone(&sessions),
                    guard,
                ));
            }
            Err(e) => {
                // Out of file descriptors and the like: wait rather than spin.
                warn!(service = %service.name, error = %e, "accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}
