//! Life cycle of the proxy: bind every listener, start the worker threads, serve, and drain
//! on shutdown.
//!
//! Each worker is an OS thread running a single-threaded tokio runtime. It accepts from its
//! own handle of every service listener and owns its own upstream connections, so the data
//! path shares nothing between threads and takes no locks.

mod files;
mod live;
mod sentinel;

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::admin::{Admin, AdminState};
use crate::config::{Config, Mode};
use crate::intercept::{self, Interceptor};
use crate::metrics::Metrics;
use crate::resp::Limits;
use crate::service::{
    Discard, ServiceCtx, Shared, SharedAuth, UpstreamSecrets, Upstreams, client_auths,
    upstream_secrets,
};
use crate::session::{self, ClientGuard, Sessions};
use crate::upstream::owned::Owned;
use crate::upstream::pool::ClusterStatus;
use crate::upstream::sentinel::View;

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
    control: Arc<Control>,
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

/// The running configuration and what a reload changes.
struct Control {
    /// Every service listener, in config order (a reload appends the services it adds).
    services: std::sync::Mutex<Vec<BoundService>>,
    /// Client credentials of each service (config order), shared with every worker so a
    /// reload changes them for all.
    client_auths: std::sync::Mutex<Vec<SharedAuth>>,
    /// Whether each worker has its own listening socket (`[proxy] reuse_port`), for the
    /// services a reload adds.
    reuse_port: bool,
    /// The configuration running now, with its upstreams' credentials.
    running: std::sync::Mutex<Arc<Reloaded>>,
    /// Hands each reload's running config to the workers.
    reloads: watch::Sender<Arc<Reloaded>>,
    /// How many workers run.
    worker_count: usize,
    /// What the admin endpoint shows (`/config` follows reloads).
    state: Arc<AdminState>,
    /// The eBPF programs; taken (and so detached) first at shutdown.
    intercept: Option<InterceptSlot>,
    /// The master each sentinel upstream's sentinels last reported, by upstream name:
    /// written into every config that runs (`UpstreamConfig::master`).
    masters: std::sync::Mutex<HashMap<String, View>>,
}

/// The loaded eBPF programs, shared with the admin endpoint; `None` once detached.
pub type InterceptSlot = Arc<std::sync::Mutex<Option<Interceptor>>>;

impl Proxy {
    /// Applies a new configuration without a restart: see [`Control::reload`].
    ///
    /// # Errors
    /// As [`Control::reload`]; nothing changes then.
    pub fn reload(&self, new: &Config) -> Result<Vec<String>> {
        self.control.reload(new)
    }

    /// The files besides the config that a reload reads and a config watch looks at: the
    /// running services' client `password_file`s and the upstreams' TLS files.
    pub fn watched_files(&self) -> Vec<PathBuf> {
        let running = self
            .control
            .running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let config = &running.config;
        let mut out: Vec<PathBuf> = config
            .services
            .iter()
            .filter_map(|s| s.auth.as_ref()?.password_file.clone())
            .collect();
        out.extend(config.upstreams.iter().flat_map(files::tls_files));
        out
    }

    /// The bound address of the service called `name`.
    pub fn addr(&self, name: &str) -> Option<SocketAddr> {
        self.control
            .services
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
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
            interceptor = slot
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take();
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

impl Control {
    /// Applies a new configuration without a restart, as far as it can be. For every
    /// service still in the file: client passwords (`[service.auth]`, with `password_file`
    /// read again), VIPs, `op_timeout`, `idle_timeout`, `max_clients`, `max_client_buffer`,
    /// `max_pipeline`, `legacy_auth`, the fault rules and the mirrors' `percentage` and
    /// `exclude_reads` reach clients already connected at their next command. A service whose
    /// upstream, `read_policy`, routes or mirrors changed, or which sends to an upstream whose
    /// settings changed, gets new routes with new connections: new clients start on them, and
    /// connected clients move to them at their first command that nothing ties to the old
    /// ones (see ARCHITECTURE.md); so does an upstream whose TLS files' contents changed.
    /// A service only the new file has is bound and served by every worker; one only the
    /// old file had stops accepting, and its clients are closed once their replies are out.
    /// Returns once every worker runs the result (at most 10 s), with notes about what
    /// differs but needs a restart (a running service's listener, the proxy's own settings). Upstream `password_file`s need no reload: they are read at every connect.
    ///
    /// # Errors
    /// A password or TLS file that can't be read, a new service's port that can't be bound,
    /// or VIPs the eBPF map refuses; nothing changes then.
    pub fn reload(&self, new: &Config) -> Result<Vec<String>> {
        let mut running = self
            .running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // A master stays known only for the sentinels and name it came from: a sentinel
        // upstream the file adds, or whose nodes or master_name changed, is asked now,
        // before clients go there.
        let old = running.config.clone();
        let keep = |name: &String| {
            let same = |c: &Config| {
                c.upstream(name)
                    .filter(|u| u.mode == Mode::Sentinel)
                    .map(|u| (u.nodes.clone(), u.master_name.clone()))
            };
            same(new).is_some() && same(new) == same(&old)
        };
        let mut masters = self
            .masters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        masters.retain(|name, _| keep(name));
        let found = sentinel::first_masters(new, &masters);
        masters.extend(found.clone());
        let notes = self.apply(&mut running, new, &masters)?;
        // Applied: the same change to the map (the watcher may have written to it since).
        let mut now = self
            .masters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        now.retain(|name, _| keep(name));
        now.extend(found);
        Ok(notes)
    }

    /// The configuration running now.
    fn config(&self) -> Config {
        self.running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .config
            .clone()
    }

    /// Records what the sentinels of upstream `name` say; true if the master or the
    /// replicas changed.
    fn set_master(&self, name: &str, view: View) -> bool {
        let mut masters = self
            .masters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let old = masters.insert(name.to_owned(), view.clone());
        match old {
            Some(old) if old == view => false,
            Some(old) if old.master == view.master => {
                info!(upstream = %name, replicas = ?view.replicas, "sentinel: the replicas changed");
                true
            }
            old => {
                let from = old.map_or_else(|| "none".to_owned(), |o| o.master);
                warn!(upstream = %name, %from, to = %view.master, "sentinel: the master moved");
                true
            }
        }
    }

    /// Runs the running configuration again with the masters known now: the sentinel
    /// upstreams whose master moved get new connections, nothing else changes. (Under the
    /// reload lock, so a file reload can't come between reading the config and applying it.)
    fn follow_masters(&self) -> Result<Vec<String>> {
        let mut running = self
            .running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let config = running.config.clone();
        let masters = self
            .masters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        self.apply(&mut running, &config, &masters)
    }

    /// [`Control::reload`] with its lock held, with the sentinel upstreams' `masters`.
    fn apply(
        &self,
        running: &mut Arc<Reloaded>,
        new: &Config,
        masters: &HashMap<String, View>,
    ) -> Result<Vec<String>> {
        let new = &with_masters(new, masters);
        let auths = client_auths(new)?;
        let old = &running.config;
        // What runs from now on: the same services and listeners, with every setting of the
        // new file that a reload applies.
        let mut applied = old.clone();
        for s in &mut applied.services {
            if let Some(n) = new.services.iter().find(|n| n.name == s.name) {
                live::take_live(s, n);
            }
        }
        // Services only the old file has stop: their listeners close, and their clients
        // finish what they owe and are closed.
        let removed: Vec<String> = old
            .services
            .iter()
            .filter(|s| !new.services.iter().any(|n| n.name == s.name))
            .map(|s| s.name.clone())
            .collect();
        applied.services.retain(|s| !removed.contains(&s.name));
        // Services only the new file has are bound now (a port in use fails the reload)
        // and served by every worker from now on.
        let mut added = Vec::new();
        for svc in &new.services {
            if old.services.iter().any(|s| s.name == svc.name) {
                continue;
            }
            let bound = bind_for_workers(svc.listen, self.worker_count, self.reuse_port)
                .with_context(|| {
                    format!("service {:?}: cannot listen on {}", svc.name, svc.listen)
                })?;
            let addr = bound
                .first()
                .context("no listener was bound")?
                .local_addr()?;
            let listeners = (0..self.worker_count)
                .map(|i| {
                    bound
                        .get(i)
                        .or(bound.first())
                        .map(TcpListener::try_clone)
                        .transpose()
                })
                .collect::<std::io::Result<Vec<_>>>()?;
            let auth = new
                .services
                .iter()
                .position(|s| s.name == svc.name)
                .and_then(|j| auths.get(j))
                .cloned()
                .flatten();
            added.push(AddedService {
                name: svc.name.clone(),
                addr,
                listeners: std::sync::Mutex::new(listeners),
                counter: Arc::new(AtomicUsize::new(0)),
                auth: Arc::new(std::sync::RwLock::new(auth)),
            });
            applied.services.push(svc.clone());
        }
        applied.upstreams.clone_from(&new.upstreams);
        // Upstreams whose settings or TLS files changed get new credentials and TLS (read
        // now, so a missing file fails the reload before anything changes) and new
        // connections.
        let mut changed = live::changed_upstreams(old, &applied);
        let tls_files = tls_fingerprints(&applied);
        for (name, print) in &tls_files {
            if running.tls_files.get(name).is_some_and(|p| p != print) && !changed.contains(name) {
                changed.push(name.clone());
            }
        }
        let cluster_status = cluster_statuses(
            &applied,
            self.worker_count,
            &running.cluster_status,
            &changed,
        );
        // A cluster that became a service's catch-all has a new status for /ready: its
        // pools are made again to publish there.
        for (name, status) in &cluster_status {
            if !running
                .cluster_status
                .get(name)
                .is_some_and(|s| Arc::ptr_eq(s, status))
                && !changed.contains(name)
            {
                changed.push(name.clone());
            }
        }
        let mut secrets = HashMap::new();
        for up in &applied.upstreams {
            let kept = running
                .secrets
                .get(&up.name)
                .filter(|_| !changed.contains(&up.name));
            let s = match kept {
                Some(s) => s.clone(),
                None => upstream_secrets(up)?,
            };
            secrets.insert(up.name.clone(), s);
        }
        let mut services = self
            .services
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut bound: Vec<BoundService> = services
            .iter()
            .filter(|s| !removed.contains(&s.name))
            .cloned()
            .collect();
        bound.extend(added.iter().map(|a| BoundService {
            name: a.name.clone(),
            addr: a.addr,
        }));
        // VIPs of running services change at once (the one step that can fail after this).
        if let Some(slot) = &self.intercept
            && let Some(interceptor) = slot
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .as_mut()
        {
            interceptor
                .set_vips(&vips(new, &bound))
                .map_err(|e| anyhow::anyhow!("intercept: {e}"))?;
        }
        for a in &added {
            info!(service = %a.name, addr = %a.addr, "reload: listening for a new service");
        }
        *services = bound;
        drop(services);
        let mut notes = Vec::new();
        // The file's cgroup settings and default policy change at once too.
        if let (Some(slot), Some(ic)) = (&self.intercept, &new.intercept)
            && let Some(interceptor) = slot
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .as_mut()
        {
            notes.extend(
                interceptor
                    .reconcile(ic.default == crate::config::OnOff::On, cgroup_rules(ic))
                    .map_err(|e| anyhow::anyhow!("intercept: {e}"))?,
            );
        }
        let mut slots = self
            .client_auths
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut kept = Vec::new();
        for (slot, svc) in slots.iter().zip(&old.services) {
            let Some(j) = new.services.iter().position(|s| s.name == svc.name) else {
                continue;
            };
            if let Some(auth) = auths.get(j) {
                *slot
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = auth.clone();
            }
            kept.push(Arc::clone(slot));
        }
        kept.extend(added.iter().map(|a| Arc::clone(&a.auth)));
        *slots = kept;
        drop(slots);
        if let (Some(running_ic), Some(ic)) = (&mut applied.intercept, &new.intercept)
            && self.intercept.is_some()
        {
            running_ic.default = ic.default;
            running_ic.enable.clone_from(&ic.enable);
            running_ic.disable.clone_from(&ic.disable);
        }
        let left = live::differences(&applied, &live::in_running_order(new, &applied));
        if !left.is_empty() {
            notes.push(format!(
                "these settings changed and take effect after a restart: {}",
                left.join(", ")
            ));
        }
        self.state.set_running(&applied, cluster_status.clone());
        let (done, applied_by) = std::sync::mpsc::channel();
        let next = Arc::new(Reloaded {
            config: applied,
            secrets,
            cluster_status,
            tls_files,
            changed,
            added,
            removed,
            done: Some(done),
        });
        *running = Arc::clone(&next);
        // Workers apply it on their own threads; nothing on the data path takes a lock.
        self.reloads.send_replace(next);
        // Returns once every worker runs it (new clusters have their slot maps), so what
        // follows a reload sees it. (The lock is held: reloads don't overlap.)
        let deadline = std::time::Instant::now() + RELOAD_WAIT;
        for n in 0..self.worker_count {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if applied_by.recv_timeout(left).is_err() {
                notes.push(format!(
                    "{} of {} workers had not applied the new config after {RELOAD_WAIT:?}; they will",
                    self.worker_count - n,
                    self.worker_count
                ));
                break;
            }
        }
        Ok(notes)
    }
}

/// Runs the proxy until SIGTERM or SIGINT, then drains and stops it. SIGHUP reloads
/// `path` ([`Proxy::reload`]; an invalid file keeps the running config), and so does a
/// change to it or to a client password file, seen every `watch_config`.
///
/// # Errors
/// Start-up failures from [`start`], or signal handlers that can't be installed.
pub fn run(config: &Config, path: Option<&std::path::Path>) -> Result<()> {
    let proxy = start(config)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("build signal runtime")?;
    runtime.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut hup = signal(SignalKind::hangup())?;
        let every = config
            .proxy
            .watch_config
            .non_zero()
            .filter(|_| path.is_some());
        let mut files = path.map(|p| files::Watch::new(p, &proxy));
        // POST /reload on the admin endpoint, when there is a file to reload.
        let mut posted = path.map(|_| proxy.control.state.accept_reloads());
        let mut tick = tokio::time::interval(every.unwrap_or(Duration::from_secs(3600)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                r = tokio::signal::ctrl_c() => { r?; break; }
                _ = term.recv() => break,
                _ = hup.recv() => {
                    reload(&proxy, path);
                    if let Some(f) = &mut files {
                        f.changed(&proxy);
                    }
                }
                Some(done) = async { posted.as_mut()?.recv().await }, if posted.is_some() => {
                    let outcome = reload(&proxy, path);
                    if let Some(f) = &mut files {
                        f.changed(&proxy);
                    }
                    let _ = done.send(outcome);
                }
                _ = tick.tick(), if every.is_some() => {
                    if let Some(f) = &mut files
                        && f.changed(&proxy)
                    {
                        info!("the config file or a client password file changed: reloading");
                        reload(&proxy, path);
                        f.changed(&proxy);
                    }
                }
            }
        }
        anyhow::Ok(())
    })?;
    info!("shutting down: draining clients");
    proxy.shutdown();
    Ok(())
}

/// Loads the eBPF programs for `[intercept]` with the services' VIPs.
fn load_interceptor(
    config: &Config,
    ic: &crate::config::InterceptConfig,
    services: &[BoundService],
) -> Result<Interceptor> {
    let attach = match &ic.cgroup {
        Some(c) => c.clone(),
        None => intercept::cgroup2_mount()?,
    };
    let mut interceptor = Interceptor::load(intercept::Plan {
        attach,
        default_on: ic.default == crate::config::OnOff::On,
        rules: cgroup_rules(ic),
        pod_addresses: ic.pod_addresses.clone(),
        getpeername: ic.getpeername,
        accelerate: ic.accelerate,
        // Checked below 4 GiB when the config was read.
        backlog_limit: u32::try_from(ic.accelerate_backlog.0).unwrap_or(u32::MAX),
    })
    .context("intercept (needs root, or CAP_BPF, CAP_SYS_ADMIN and CAP_NET_ADMIN)")?;
    interceptor
        .set_vips(&vips(config, services))
        .context("intercept")?;
    Ok(interceptor)
}

/// The explicit cgroup settings of `[intercept]`: `enable` on, `disable` off.
fn cgroup_rules(ic: &crate::config::InterceptConfig) -> Vec<(PathBuf, bool)> {
    ic.enable
        .iter()
        .map(|p| (p.clone(), true))
        .chain(ic.disable.iter().map(|p| (p.clone(), false)))
        .collect()
}

/// Every VIP of the services that are running, with the listener it goes to.
fn vips(config: &Config, services: &[BoundService]) -> Vec<intercept::Vip> {
    let mut out = Vec::new();
    for (i, bound) in services.iter().enumerate() {
        if let Some(svc) = config.services.iter().find(|s| s.name == bound.name) {
            out.extend(svc.vips.iter().map(|&vip| intercept::Vip {
                vip,
                listener: bound.addr,
                service: i as u32,
            }));
        }
    }
    out
}

/// Attaches the programs once every upstream answers (as `/ready` says), so no connect is
/// sent to a proxy that can't serve it yet.
fn spawn_attacher(
    slot: InterceptSlot,
    state: Arc<AdminState>,
    shutdown: watch::Receiver<bool>,
) -> Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("ri-intercept".into())
        .spawn(move || {
            let mut waited = 0u32;
            while !*shutdown.borrow() {
                match state.ready() {
                    Ok(()) => {
                        let mut guard = slot.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                        if let Some(i) = guard.as_mut()
                            && let Err(e) = i.attach()
                        {
                            error!(error = %e, "eBPF interception could not attach; connects go straight to their VIPs");
                        }
                        return;
                    }
                    Err(why) => {
                        waited += 1;
                        // After 2 s, then every 10 s: say why connects aren't intercepted yet.
                        if waited % 100 == 20 {
                            warn!(reason = %why.replace('\n', "; "), "not attaching eBPF interception until the upstreams answer");
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
        .context("spawn the intercept thread")
}

/// Handles SIGHUP, a change the config watch saw, and `POST /reload`: reads and checks the
/// file again and applies it, or logs why not. Returns whether it was applied, and the
/// outcome in words (what `POST /reload` answers).
fn reload(proxy: &Proxy, path: Option<&std::path::Path>) -> (bool, String) {
    let Some(path) = path else {
        warn!("SIGHUP: the proxy was started without --config; nothing to reload");
        return (false, "the proxy was started without --config\n".into());
    };
    let (applied, text) = match Config::load(path) {
        Ok(config) => match proxy.reload(&config) {
            Ok(notes) => {
                info!(file = %path.display(), "configuration reloaded");
                let mut text = format!("reloaded {}\n", path.display());
                for note in notes {
                    warn!("reload: {note}");
                    text.push_str(&format!("note: {note}\n"));
                }
                (true, text)
            }
            Err(e) => {
                let e = format!("{e:#}");
                error!(error = %e, "reload failed, keeping the running config");
                (
                    false,
                    format!("reload failed, keeping the running config: {e}\n"),
                )
            }
        },
        Err(e) => {
            error!("reload failed, keeping the running config:\n{e}");
            (
                false,
                format!("reload failed, keeping the running config:\n{e}\n"),
            )
        }
    };
    let m = &proxy.metrics;
    let result = if applied { "applied" } else { "failed" };
    m.config_reloads
        .get_or_create(&crate::metrics::ResultLabels {
            result: result.to_owned(),
        })
        .inc();
    m.config_last_reload_successful.set(i64::from(applied));
    (applied, text)
}

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
    let workers = match config.proxy.workers {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    // listeners[service][worker]
    let mut listeners: Vec<Vec<TcpListener>> = Vec::new();
    let mut services = Vec::new();
    for svc in &config.services {
        let bound = bind_for_workers(svc.listen, workers, config.proxy.reuse_port)
            .with_context(|| format!("service {:?}: cannot listen on {}", svc.name, svc.listen))?;
        let addr = bound
            .first()
            .context("no listener was bound")?
            .local_addr()?;
        info!(service = %svc.name, %addr, "listening");
        services.push(BoundService {
            name: svc.name.clone(),
            addr,
        });
        listeners.push(bound);
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
    let state = Arc::new(AdminState::new(
        config,
        workers,
        Arc::clone(&metrics),
        cluster_status.clone(),
        intercept.clone(),
    ));
    let admin = match &config.admin {
        Some(a) => {
            let admin = Admin::start(a.listen, Arc::clone(&state), rx.clone())?;
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
    let mut handles = Vec::new();
    for index in 0..workers {
        let plan = WorkerPlan {
            index,
            config: config.clone(),
            listeners: listeners
                .iter()
                .map(|per_worker| {
                    // Without a socket of its own, a worker gets a handle of the shared one.
                    per_worker
                        .get(index)
                        .or(per_worker.first())
                        .ok_or_else(|| std::io::Error::other("no listener was bound"))?
                        .try_clone()
                })
                .collect::<std::io::Result<_>>()
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
    let control = Arc::new(Control {
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

/// `config` with each sentinel upstream's `master` and `replicas` set from `masters` (unset:
/// not known yet).
fn with_masters(config: &Config, masters: &HashMap<String, View>) -> Config {
    let mut config = config.clone();
    for up in &mut config.upstreams {
        up.master = match up.mode {
            Mode::Sentinel => masters.get(&up.name).map(|v| v.master.clone()),
            Mode::Standalone | Mode::Cluster => None,
        };
        if up.mode == Mode::Sentinel {
            up.replicas = masters
                .get(&up.name)
                .map(|v| v.replicas.clone())
                .unwrap_or_default();
        }
    }
    config
}

/// A hash of each upstream's TLS files (0 files: the hash of none).
fn tls_fingerprints(config: &Config) -> HashMap<String, u64> {
    config
        .upstreams
        .iter()
        .map(|u| {
            let paths = files::tls_files(u);
            (
                u.name.clone(),
                files::fingerprint(paths.iter().map(PathBuf::as_path)),
            )
        })
        .collect()
}

/// A status for each cluster upstream that is some service's catch-all (what `/ready` and
/// `/topology` show): the one in `kept` unless the upstream is in `changed`, else a new one.
fn cluster_statuses(
    config: &Config,
    workers: usize,
    kept: &HashMap<String, Arc<ClusterStatus>>,
    changed: &[String],
) -> HashMap<String, Arc<ClusterStatus>> {
    config
        .upstreams
        .iter()
        .filter(|u| u.mode == Mode::Cluster)
        .filter(|u| config.services.iter().any(|s| s.upstream == u.name))
        .map(|u| {
            let status = match kept.get(&u.name) {
                Some(s) if !changed.contains(&u.name) => Arc::clone(s),
                _ => ClusterStatus::new(workers),
            };
            (u.name.clone(), status)
        })
        .collect()
}

/// The listening sockets of one service: one per worker with `reuse_port` (and more than
/// one worker), otherwise one that the workers share.
///
/// `SO_REUSEPORT` would also let this proxy join another process's sockets on the same port
/// without an error, so the port is first bound once without it: that fails if anything
/// holds the port. The probe also resolves port 0.
fn bind_for_workers(
    addr: SocketAddr,
    workers: usize,
    reuse_port: bool,
) -> std::io::Result<Vec<TcpListener>> {
    if !reuse_port || workers <= 1 {
        return Ok(vec![bind(addr, false)?]);
    }
    let addr = {
        let probe = socket(addr)?;
        probe.bind(&addr.into())?;
        probe
            .local_addr()?
            .as_socket()
            .ok_or_else(|| std::io::Error::other("listener has no IP address"))?
    };
    (0..workers).map(|_| bind(addr, true)).collect()
}

/// A non-blocking TCP socket for `addr`'s family with SO_REUSEADDR, so a restarted proxy can
/// bind at once.
fn socket(addr: SocketAddr) -> std::io::Result<socket2::Socket> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    Ok(socket)
}

/// Binds a listener, with SO_REUSEPORT if `reuse_port`.
fn bind(addr: SocketAddr, reuse_port: bool) -> std::io::Result<TcpListener> {
    let socket = socket(addr)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// What one worker thread needs to start.
struct WorkerPlan {
    /// Worker number, for logs.
    index: usize,
    /// The configuration.
    config: Config,
    /// This worker's handles of the service listeners, in config order.
    listeners: Vec<TcpListener>,
    /// Connected clients per service, shared by all workers.
    counters: Vec<Arc<AtomicUsize>>,
    /// Becomes true at shutdown.
    shutdown: watch::Receiver<bool>,
    /// The running config after each reload, with its upstreams' credentials.
    reloads: watch::Receiver<Arc<Reloaded>>,
    /// The process's metrics.
    metrics: Arc<Metrics>,
    /// Credentials of each upstream, by name.
    upstream_auths: HashMap<String, UpstreamSecrets>,
    /// Client-facing credentials of each service, in config order.
    client_auths: Vec<SharedAuth>,
    /// Where workers publish their view of each cluster upstream.
    cluster_status: HashMap<String, Arc<ClusterStatus>>,
    /// Socket mark of every upstream connection (with interception), so the connect hook
    /// never sends the proxy to itself.
    mark: Option<u32>,
    /// Where a failed connection to a sentinel upstream's master is reported.
    kicks: tokio::sync::mpsc::Sender<String>,
}

impl WorkerPlan {
    fn run(self) -> Result<()> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("build worker runtime")?;
        let local = tokio::task::LocalSet::new();
        local.block_on(&rt, self.serve())
    }

    async fn serve(self) -> Result<()> {
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
        } = self;
        let sessions = Rc::new(Sessions::default());
        let mut ups = Upstreams {
            worker: index,
            auths: upstream_auths,
            limits: Limits::default(),
            metrics: Arc::clone(&metrics),
            pools: HashMap::new(),
            cluster_status,
            mark,
            kicks,
            discard: Rc::new(Discard),
            owned: Owned::default(),
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
            let shared = Shared {
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
        let current = Rc::new(Served {
            list: RefCell::new(current),
            removed: tokio::sync::Notify::new(),
        });
        for (i, ((listener, counter), svc)) in accepts.into_iter().zip(&config.services).enumerate()
        {
            let listener = tokio::net::TcpListener::from_std(listener)?;
            tokio::task::spawn_local(accept_loop(
                listener,
                Service {
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
async fn follow_reloads(
    mut reloads: watch::Receiver<Arc<Reloaded>>,
    mut ups: Upstreams,
    mut config: Config,
    current: Rc<Served>,
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
            match ups.service(&new.config, &svc, &Shared::of(ctx)) {
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
async fn serve_added(
    new: &Reloaded,
    ups: &mut Upstreams,
    current: &Rc<Served>,
    shutdown: &watch::Receiver<bool>,
    sessions: &Rc<Sessions>,
) {
    for added in &new.added {
        let Some(svc) = new.config.services.iter().find(|s| s.name == added.name) else {
            continue;
        };
        let listener = added
            .listeners
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get_mut(ups.worker)
            .and_then(Option::take);
        let Some(listener) = listener.map(tokio::net::TcpListener::from_std) else {
            continue;
        };
        let shared = Shared {
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
            Service {
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

/// A service a reload added: bound by the reload, served by each worker from its socket.
struct AddedService {
    /// The service's name.
    name: String,
    /// Where it listens.
    addr: SocketAddr,
    /// One listener per worker, each taken by its worker.
    listeners: std::sync::Mutex<Vec<Option<TcpListener>>>,
    /// Its connected clients, over all workers (for `max_clients`).
    counter: Arc<AtomicUsize>,
    /// Its client credentials (a later reload changes them).
    auth: SharedAuth,
}

/// The running config a reload hands to the workers, with what its upstreams need.
struct Reloaded {
    /// The configuration now running.
    config: Config,
    /// Credentials and TLS of each upstream, by name.
    secrets: HashMap<String, UpstreamSecrets>,
    /// Where workers publish their view of each cluster that is a service's catch-all.
    cluster_status: HashMap<String, Arc<ClusterStatus>>,
    /// A hash of each upstream's TLS files, to see at the next reload whether they changed.
    tls_files: HashMap<String, u64>,
    /// Upstreams whose connections this reload makes again: changed settings or TLS files,
    /// or a cluster with a new status.
    changed: Vec<String>,
    /// Services this reload added, with their listeners.
    added: Vec<AddedService>,
    /// Services this reload removed, by name.
    removed: Vec<String>,
    /// Each worker says here that it runs this config (`None` at start).
    done: Option<std::sync::mpsc::Sender<()>>,
}

/// Longest a worker waits for a cluster's first topology before it accepts clients anyway
/// (or, after a reload, sends clients there anyway).
const FIRST_DISCOVERY_WAIT: Duration = Duration::from_secs(5);

/// Longest a reload waits for every worker to apply it.
const RELOAD_WAIT: Duration = Duration::from_secs(10);

/// Every service a worker serves: its newest generation, in config order (`None` once a
/// reload removed it).
struct Served {
    /// The generations.
    list: RefCell<Vec<Option<Rc<ServiceCtx>>>>,
    /// Wakes the accept loops when a reload removed a service.
    removed: tokio::sync::Notify,
}

/// One service's newest generation on this worker, looked up at each accept (holding a
/// generation would keep its connections open after a reload replaced it).
struct Service {
    /// Every service's newest generation.
    current: Rc<Served>,
    /// This service's place in it.
    index: usize,
    /// The service's name, for logs.
    name: String,
}

impl Service {
    fn get(&self) -> Option<Rc<ServiceCtx>> {
        self.current
            .list
            .borrow()
            .get(self.index)
            .cloned()
            .flatten()
    }
}

/// Accepts clients of one service on this worker until shutdown.
async fn accept_loop(
    listener: tokio::net::TcpListener,
    service: Service,
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
