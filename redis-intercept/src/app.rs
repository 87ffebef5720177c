//! Life cycle of the proxy: bind every listener, start the worker threads, serve, and drain
//! on shutdown.
//!
//! Each worker is an OS thread running a single-threaded tokio runtime. It accepts from its
//! own handle of every service listener and owns its own upstream connections, so the data
//! path shares nothing between threads and takes no locks.

mod bind;
mod ebpf;
mod files;
mod live;
mod reload;
mod sentinel;
mod signals;
mod worker;

pub use signals::run;

use bind::bind_service;
use ebpf::{load_interceptor, spawn_attacher};
use reload::{Reloaded, Reloader, cluster_statuses, tls_fingerprints, with_masters};
use worker::WorkerPlan;

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::admin::{Admin, AdminState};
use crate::config::Config;
use crate::intercept::Interceptor;
use crate::locks::LockRecovered;
use crate::metrics::Metrics;
use crate::service::{SharedAuth, client_auths, upstream_secrets};

/// A bound service listener.
#[derive(Debug, Clone)]
pub struct BoundService {
    /// Service name from the config.
    pub name: String,
    /// Address actually bound (useful when the config said port 0).
    pub addr: SocketAddr,
}

/// A running proxy. Dropping it without [`Proxy::shutdown`] leaves the workers running.
pub struct Proxy {
    /// What reloads change, shared with the sentinel watcher (which reloads on a failover).
    control: Arc<Reloader>,
    /// Tells workers to stop accepting and drain.
    shutdown: watch::Sender<bool>,
    /// Worker threads, joined on shutdown.
    workers: Vec<JoinHandle<()>>,
    /// The admin endpoint, when configured.
    admin: Option<Admin>,
    /// The process's metrics.
    pub metrics: Arc<Metrics>,
    /// The thread that follows sentinel upstreams' masters.
    sentinels: JoinHandle<()>,
    /// The thread that attaches the eBPF programs once the upstreams answer.
    attacher: Option<JoinHandle<()>>,
}

impl Proxy {
    /// Applies a new configuration without a restart: see [`Reloader::reload`].
    ///
    /// # Errors
    /// As [`Reloader::reload`]; nothing changes then.
    pub fn reload(&self, new: &Config) -> Result<Vec<String>> {
        self.control.reload(new)
    }

    /// The files besides the config that a reload reads and a config watch looks at: the
    /// running services' client `password_file`s and the upstreams' TLS files.
    pub fn watched_files(&self) -> Vec<PathBuf> {
        files::watched(&self.control.running.locked().config)
    }

    /// The bound address of the service called `name`.
    pub fn addr(&self, name: &str) -> Option<SocketAddr> {
        self.control
            .services
            .locked()
            .iter()
            .find(|s| s.name == name)
            .map(|s| s.addr)
    }

    /// Where the admin endpoint listens, when configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(|a| a.addr)
    }

    /// Stops accepting, lets clients receive the replies they are owed (up to the drain
    /// timeout), closes everything and waits for the workers.
    pub fn shutdown(self) {
        // Detach first: new connects go straight to their VIPs while clients drain. The maps
        // stay until the clients are gone: an accelerated socket that leaves the pairs map
        // loses the data queued on it.
        let mut interceptor = None;
        if let Some(slot) = &self.control.intercept {
            interceptor = slot.locked().take();
            if let Some(i) = &mut interceptor
                && i.is_attached()
            {
                i.detach();
                info!("eBPF interception detached");
            }
        }
        let _ = self.shutdown.send(true);
        for t in self.attacher.into_iter().chain([self.sentinels]) {
            let _ = t.join();
        }
        for w in self.workers {
            if w.join().is_err() {
                error!("a worker thread panicked");
            }
        }
        if let Some(admin) = self.admin {
            admin.join();
        }
        if interceptor.as_ref().is_some_and(Interceptor::accelerates) {
            // Replies handed to applications' sockets are queued there until read; give
            // them a moment before the pairs map, and those queues, go.
            std::thread::sleep(ACCELERATED_GRACE);
        }
        drop(interceptor);
    }
}

/// How long a shutdown keeps the pairs map after the last client closed.
const ACCELERATED_GRACE: Duration = Duration::from_millis(200);

/// Binds every listener, then starts the workers. Errors (a port in use, a bad address)
/// surface here, before anything is served.
///
/// # Errors
/// Configuration this build can't run, or a listener that can't be bound.
pub fn start(config: &Config) -> Result<Proxy> {
    // Where the sentinel upstreams' masters are, asked before anything connects.
    let masters = sentinel::first_masters(config, &HashMap::new());
    let config = &with_masters(config, &masters);
    let unsupported = config.unsupported_features();
    if !unsupported.is_empty() {
        bail!(
            "this build of redis-intercept does not support: {}. Remove these settings to run \
             (they would otherwise be silently ignored).",
            unsupported.join(", ")
        );
    }
    let workers = config.proxy.worker_count();
    // listeners[service][worker]
    let mut listeners: Vec<Vec<TcpListener>> = Vec::new();
    let mut services = Vec::new();
    for svc in &config.services {
        let sockets = bind_service(svc, workers, config.proxy.reuse_port)?;
        info!(service = %svc.name, addr = %sockets.addr, "listening");
        services.push(BoundService {
            name: svc.name.clone(),
            addr: sockets.addr,
        });
        listeners.push(sockets.per_worker);
    }
    // Secrets are resolved before anything runs, so a missing one fails start-up.
    let mut upstream_auths = HashMap::new();
    for up in &config.upstreams {
        upstream_auths.insert(up.name.clone(), upstream_secrets(up)?);
    }
    let client_auths = client_auths(config)?
        .into_iter()
        .map(|a| Arc::new(std::sync::RwLock::new(a)))
        .collect::<Vec<SharedAuth>>();
    let (tx, rx) = watch::channel(false);
    let metrics = Metrics::new();
    // Every worker publishes its view of each cluster upstream here, for /ready and /topology.
    let cluster_status = cluster_statuses(config, workers, &HashMap::new(), &[]);
    let running = Arc::new(Reloaded {
        config: config.clone(),
        secrets: upstream_auths.clone(),
        cluster_status: cluster_status.clone(),
        tls_files: tls_fingerprints(config),
        changed: Vec::new(),
        added: Vec::new(),
        removed: Vec::new(),
        done: None,
    });
    let (reload_tx, reload_rx) = watch::channel(Arc::clone(&running));
    // Workers report failed connections to a sentinel upstream's master here.
    let (kick_tx, kicks) = tokio::sync::mpsc::channel(sentinel::KICKS);
    // The eBPF programs are loaded (and checked by the verifier) now, so a problem stops
    // start-up; they are attached once every upstream answers.
    let intercept = match &config.intercept {
        Some(ic) => Some(Arc::new(std::sync::Mutex::new(Some(load_interceptor(
            config, ic, &services,
        )?)))),
        None => None,
    };
    let mut state = AdminState::new(
        config,
        workers,
        Arc::clone(&metrics),
        cluster_status.clone(),
        intercept.clone(),
    );
    // A token file that can't be read fails start-up, before anything is served.
    if let Some(file) = config.admin.as_ref().and_then(|a| a.token_file.as_ref()) {
        state.token = Some(crate::admin::Token::load(file).map_err(anyhow::Error::msg)?);
    }
    for warning in config.warnings() {
        warn!("{warning}");
    }
    let state = Arc::new(state);
    let admin = match &config.admin {
        Some(a) => {
            let admin = Admin::start(a.listen, Arc::clone(&state), rx.clone())?;
            if a.token_file.is_some() {
                info!("admin endpoint needs its token, except for /ready and /metrics");
            }
            info!(addr = %admin.addr, "admin endpoint listening");
            Some(admin)
        }
        None => None,
    };
    let counters: Vec<Arc<AtomicUsize>> = config
        .services
        .iter()
        .map(|_| Arc::new(AtomicUsize::new(0)))
        .collect();
    let query_budget = Arc::new(crate::budget::QueryBudget::new(
        config.proxy.query_buffer_budget.0,
        config.proxy.client_query_buffer_limit.0,
        metrics.query_buffer_bytes.clone(),
        metrics.query_buffer_paused.clone(),
    ));
    let mut handles = Vec::new();
    for index in 0..workers {
        let plan = WorkerPlan {
            index,
            config: config.clone(),
            listeners: listeners
                .iter()
                .map(|per_worker| per_worker.get(index).map(TcpListener::try_clone))
                .collect::<Option<std::io::Result<_>>>()
                .context("no listener for a worker")?
                .context("clone listener for a worker")?,
            counters: counters.clone(),
            shutdown: rx.clone(),
            reloads: reload_rx.clone(),
            metrics: Arc::clone(&metrics),
            upstream_auths: upstream_auths.clone(),
            client_auths: client_auths.clone(),
            cluster_status: cluster_status.clone(),
            mark: intercept
                .as_ref()
                .map(|_| redis_intercept_common::PROXY_SO_MARK),
            kicks: kick_tx.clone(),
            query_budget: Arc::clone(&query_budget),
        };
        let handle = std::thread::Builder::new()
            .name(format!("ri-worker-{index}"))
            .spawn(move || {
                if let Err(e) = plan.run() {
                    error!(error = %format!("{e:#}"), "worker failed");
                }
            })
            .context("spawn worker thread")?;
        handles.push(handle);
    }
    info!(workers, "proxy started");
    let attacher = match &intercept {
        Some(slot) => Some(spawn_attacher(
            Arc::clone(slot),
            Arc::clone(&state),
            rx.clone(),
        )?),
        None => None,
    };
    let control = Arc::new(Reloader {
        intercept,
        services: std::sync::Mutex::new(services),
        client_auths: std::sync::Mutex::new(client_auths),
        reuse_port: config.proxy.reuse_port,
        running: std::sync::Mutex::new(running),
        reloads: reload_tx,
        worker_count: workers,
        state,
        masters: std::sync::Mutex::new(masters),
    });
    // Always, as a reload may add a sentinel upstream (idle, it wakes once a second).
    let sentinels = sentinel::spawn_watch(Arc::clone(&control), kicks, rx.clone())?;
    Ok(Proxy {
        control,
        shutdown: tx,
        workers: handles,
        admin,
        metrics,
        sentinels,
        attacher,
    })
}
