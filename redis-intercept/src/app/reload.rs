//! Reload: a new config applied to the running proxy in named steps (diff the services,
//! bind the added ones, find changed upstreams, refresh secrets, apply intercept settings,
//! publish to the workers and wait). What triggers one (SIGHUP, the file watch,
//! `POST /reload`) is in `signals.rs`.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use anyhow::Result;
use tokio::sync::watch;
use tracing::{info, warn};

use super::bind::bind_service;
use super::ebpf::{cgroup_rules, vips};
use super::{BoundService, files, live, sentinel};
use crate::admin::AdminState;
use crate::config::{Config, Mode};
use crate::intercept::InterceptSlot;
use crate::locks::{LockRecovered, RwLockRecovered};
use crate::service::{ClientAuth, SharedAuth, UpstreamSecrets, client_auths, upstream_secrets};
use crate::upstream::cluster_nodes::ClusterStatus;
use crate::upstream::sentinel::View;

/// The running configuration and what a reload changes.
pub(super) struct Reloader {
    /// Every service listener, in config order (a reload appends the services it adds).
    pub(super) services: std::sync::Mutex<Vec<BoundService>>,
    /// Client credentials of each service (config order), shared with every worker so a
    /// reload changes them for all.
    pub(super) client_auths: std::sync::Mutex<Vec<SharedAuth>>,
    /// Whether each worker has its own listening socket (`[proxy] reuse_port`), for the
    /// services a reload adds.
    pub(super) reuse_port: bool,
    /// The configuration running now, with its upstreams' credentials.
    pub(super) running: std::sync::Mutex<Arc<Reloaded>>,
    /// Hands each reload's running config to the workers.
    pub(super) reloads: watch::Sender<Arc<Reloaded>>,
    /// How many workers run.
    pub(super) worker_count: usize,
    /// What the admin endpoint shows (`/config` follows reloads).
    pub(super) state: Arc<AdminState>,
    /// The eBPF programs; taken (and so detached) first at shutdown.
    pub(super) intercept: Option<InterceptSlot>,
    /// The master each sentinel upstream's sentinels last reported, by upstream name:
    /// written into every config that runs (`UpstreamConfig::master`).
    pub(super) masters: std::sync::Mutex<HashMap<String, View>>,
}

impl Reloader {
    /// Applies a new configuration without a restart, as far as it can be. For every
    /// service still in the file: client passwords (`[service.auth]`, with `password_file`
    /// read again), VIPs, `op_timeout`, `idle_timeout`, `max_clients`, `max_client_buffer`,
    /// `max_pipeline`, `reply_window`, `big_reply_budget`, `legacy_auth`, the fault rules and the mirrors' `percentage` and
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
        let mut running = self.running.locked();
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
        let mut masters = self.masters.locked().clone();
        masters.retain(|name, _| keep(name));
        let found = sentinel::first_masters(new, &masters);
        masters.extend(found.clone());
        let notes = self.apply(&mut running, new, &masters)?;
        // Applied: the same change to the map (the watcher may have written to it since).
        let mut now = self.masters.locked();
        now.retain(|name, _| keep(name));
        now.extend(found);
        Ok(notes)
    }

    /// The configuration running now.
    pub(super) fn config(&self) -> Config {
        self.running.locked().config.clone()
    }

    /// Records what the sentinels of upstream `name` say; true if the master or the
    /// replicas changed.
    pub(super) fn set_master(&self, name: &str, view: View) -> bool {
        let mut masters = self.masters.locked();
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
    pub(super) fn follow_masters(&self) -> Result<Vec<String>> {
        let mut running = self.running.locked();
        let config = running.config.clone();
        let masters = self.masters.locked().clone();
        self.apply(&mut running, &config, &masters)
    }

    /// [`Reloader::reload`] with its lock held, with the sentinel upstreams' `masters`: the
    /// steps below, in order. Everything that can fail comes before anything changes, except
    /// the eBPF maps (the one step that can fail after binding new services).
    pub(super) fn apply(
        &self,
        running: &mut Arc<Reloaded>,
        new: &Config,
        masters: &HashMap<String, View>,
    ) -> Result<Vec<String>> {
        let new = &with_masters(new, masters);
        let auths = client_auths(new)?;
        let diff = diff_services(&running.config, new);
        let mut applied = diff.applied;
        let added = self.bind_added(new, &diff.added, &auths)?;
        applied
            .services
            .extend(added.iter().filter_map(|a| new.service(&a.name)).cloned());
        applied.upstreams.clone_from(&new.upstreams);
        let ChangedUpstreams {
            names: changed,
            tls_files,
            cluster_status,
        } = self.changed_upstreams(running, &applied);
        let secrets = refresh_secrets(running, &applied, &changed)?;
        let mut notes = self.apply_intercept(new, &diff.removed, &added)?;
        self.swap_client_auths(&running.config, new, &auths, &added);
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
        let next = Reloaded {
            config: applied,
            secrets,
            cluster_status,
            tls_files,
            changed,
            added,
            removed: diff.removed,
            done: None,
        };
        notes.extend(self.publish_and_wait(running, next));
        Ok(notes)
    }

    /// Binds the services only the new file has (a port in use fails the reload); every
    /// worker serves them from the reload on.
    fn bind_added(
        &self,
        new: &Config,
        names: &[String],
        auths: &[Option<ClientAuth>],
    ) -> Result<Vec<AddedService>> {
        let mut added = Vec::new();
        for (j, svc) in new.services.iter().enumerate() {
            if !names.contains(&svc.name) {
                continue;
            }
            let sockets = bind_service(svc, self.worker_count, self.reuse_port)?;
            added.push(AddedService {
                name: svc.name.clone(),
                addr: sockets.addr,
                listeners: std::sync::Mutex::new(
                    sockets.per_worker.into_iter().map(Some).collect(),
                ),
                counter: Arc::new(AtomicUsize::new(0)),
                auth: Arc::new(std::sync::RwLock::new(auths.get(j).cloned().flatten())),
            });
        }
        Ok(added)
    }

    /// Upstreams whose connections the reload makes again: changed settings, changed TLS
    /// files, or a cluster with a new status for `/ready` (it became a service's catch-all).
    /// Also returns the TLS files' fingerprints and the clusters' statuses now.
    fn changed_upstreams(&self, running: &Reloaded, applied: &Config) -> ChangedUpstreams {
        let mut changed = live::changed_upstreams(&running.config, applied);
        let tls_files = tls_fingerprints(applied);
        for (name, print) in &tls_files {
            if running.tls_files.get(name).is_some_and(|p| p != print) && !changed.contains(name) {
                changed.push(name.clone());
            }
        }
        let cluster_status = cluster_statuses(
            applied,
            self.worker_count,
            &running.cluster_status,
            &changed,
        );
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
        ChangedUpstreams {
            names: changed,
            tls_files,
            cluster_status,
        }
    }

    /// The VIPs of the services that run from now on, and the file's cgroup settings and
    /// default policy, applied at once to the eBPF maps. Records the new listener list.
    fn apply_intercept(
        &self,
        new: &Config,
        removed: &[String],
        added: &[AddedService],
    ) -> Result<Vec<String>> {
        let mut services = self.services.locked();
        let mut bound: Vec<BoundService> = services
            .iter()
            .filter(|s| !removed.contains(&s.name))
            .cloned()
            .collect();
        bound.extend(added.iter().map(|a| BoundService {
            name: a.name.clone(),
            addr: a.addr,
        }));
        if let Some(slot) = &self.intercept
            && let Some(interceptor) = slot.locked().as_mut()
        {
            interceptor
                .set_vips(&vips(new, &bound))
                .map_err(|e| anyhow::anyhow!("intercept: {e}"))?;
        }
        for a in added {
            info!(service = %a.name, addr = %a.addr, "reload: listening for a new service");
        }
        *services = bound;
        drop(services);
        let mut notes = Vec::new();
        if let (Some(slot), Some(ic)) = (&self.intercept, &new.intercept)
            && let Some(interceptor) = slot.locked().as_mut()
        {
            notes.extend(
                interceptor
                    .reconcile(ic.default == crate::config::OnOff::On, cgroup_rules(ic))
                    .map_err(|e| anyhow::anyhow!("intercept: {e}"))?,
            );
        }
        Ok(notes)
    }

    /// New client credentials for the services that stay (every worker sees them at the
    /// next AUTH), and the added services' credentials.
    fn swap_client_auths(
        &self,
        old: &Config,
        new: &Config,
        auths: &[Option<ClientAuth>],
        added: &[AddedService],
    ) {
        let mut slots = self.client_auths.locked();
        let mut kept = Vec::new();
        for (slot, svc) in slots.iter().zip(&old.services) {
            let Some(j) = new.services.iter().position(|s| s.name == svc.name) else {
                continue;
            };
            if let Some(auth) = auths.get(j) {
                *slot.write_recovered() = auth.clone();
            }
            kept.push(Arc::clone(slot));
        }
        kept.extend(added.iter().map(|a| Arc::clone(&a.auth)));
        *slots = kept;
    }

    /// Hands `next` to the workers (they apply it on their own threads; nothing on the data
    /// path takes a lock) and returns once every worker runs it, so what follows a reload
    /// sees it (new clusters have their slot maps). Notes the workers that were late.
    fn publish_and_wait(&self, running: &mut Arc<Reloaded>, mut next: Reloaded) -> Vec<String> {
        let (done, applied_by) = std::sync::mpsc::channel();
        next.done = Some(done);
        let next = Arc::new(next);
        *running = Arc::clone(&next);
        self.reloads.send_replace(next);
        let deadline = std::time::Instant::now() + RELOAD_WAIT;
        for n in 0..self.worker_count {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if applied_by.recv_timeout(left).is_err() {
                return vec![format!(
                    "{} of {} workers had not applied the new config after {RELOAD_WAIT:?}; they will",
                    self.worker_count - n,
                    self.worker_count
                )];
            }
        }
        Vec::new()
    }
}

/// What [`Reloader::changed_upstreams`] finds.
struct ChangedUpstreams {
    /// Upstreams whose connections are made again.
    names: Vec<String>,
    /// A hash of each upstream's TLS files now.
    tls_files: HashMap<String, u64>,
    /// A status for each cluster that is some service's catch-all.
    cluster_status: HashMap<String, Arc<ClusterStatus>>,
}

/// Credentials and TLS of every upstream of `applied`: kept for those that didn't change,
/// read again (so a missing file fails the reload before anything changes) for the rest.
fn refresh_secrets(
    running: &Reloaded,
    applied: &Config,
    changed: &[String],
) -> Result<HashMap<String, UpstreamSecrets>> {
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
    Ok(secrets)
}

/// How the services of a new file relate to the running ones.
#[derive(Debug)]
struct ServiceDiff {
    /// What runs from now on before added services: the running services still in the new
    /// file, each with every setting of the new file that a reload applies in place.
    applied: Config,
    /// Services only the running config has: their listeners close, and their clients
    /// finish what they owe and are closed.
    removed: Vec<String>,
    /// Services only the new file has, in its order: bound by the reload.
    added: Vec<String>,
}

/// Compares the running config's services with a new file's. Pure, so the rules are
/// unit-tested.
fn diff_services(old: &Config, new: &Config) -> ServiceDiff {
    let mut applied = old.clone();
    for s in &mut applied.services {
        if let Some(n) = new.service(&s.name) {
            live::take_live(s, n);
        }
    }
    let removed: Vec<String> = old
        .services
        .iter()
        .filter(|s| new.service(&s.name).is_none())
        .map(|s| s.name.clone())
        .collect();
    applied.services.retain(|s| !removed.contains(&s.name));
    let added = new
        .services
        .iter()
        .filter(|s| old.service(&s.name).is_none())
        .map(|s| s.name.clone())
        .collect();
    ServiceDiff {
        applied,
        removed,
        added,
    }
}

/// `config` with each sentinel upstream's `master` and `replicas` set from `masters` (unset:
/// not known yet).
pub(super) fn with_masters(config: &Config, masters: &HashMap<String, View>) -> Config {
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
pub(super) fn tls_fingerprints(config: &Config) -> HashMap<String, u64> {
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
pub(super) fn cluster_statuses(
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

/// A service a reload added: bound by the reload, served by each worker from its socket.
pub(super) struct AddedService {
    /// The service's name.
    pub(super) name: String,
    /// Where it listens.
    pub(super) addr: SocketAddr,
    /// One listener per worker, each taken by its worker.
    pub(super) listeners: std::sync::Mutex<Vec<Option<TcpListener>>>,
    /// Its connected clients, over all workers (for `max_clients`).
    pub(super) counter: Arc<AtomicUsize>,
    /// Its client credentials (a later reload changes them).
    pub(super) auth: SharedAuth,
}

/// The running config a reload hands to the workers, with what its upstreams need.
pub(super) struct Reloaded {
    /// The configuration now running.
    pub(super) config: Config,
    /// Credentials and TLS of each upstream, by name.
    pub(super) secrets: HashMap<String, UpstreamSecrets>,
    /// Where workers publish their view of each cluster that is a service's catch-all.
    pub(super) cluster_status: HashMap<String, Arc<ClusterStatus>>,
    /// A hash of each upstream's TLS files, to see at the next reload whether they changed.
    pub(super) tls_files: HashMap<String, u64>,
    /// Upstreams whose connections this reload makes again: changed settings or TLS files,
    /// or a cluster with a new status.
    pub(super) changed: Vec<String>,
    /// Services this reload added, with their listeners.
    pub(super) added: Vec<AddedService>,
    /// Services this reload removed, by name.
    pub(super) removed: Vec<String>,
    /// Each worker says here that it runs this config (`None` at start).
    pub(super) done: Option<std::sync::mpsc::Sender<()>>,
}

/// Longest a reload waits for every worker to apply it.
pub(super) const RELOAD_WAIT: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::*;

    fn config(services: &[(&str, &str)]) -> Config {
        let mut text = String::from(
            "[[upstream]]\nname = \"main\"\nmode = \"standalone\"\nnodes = [\"127.0.0.1:6379\"]\n",
        );
        for (name, extra) in services {
            text.push_str(&format!(
                "\n[[service]]\nname = \"{name}\"\nlisten = \"127.0.0.1:{port}\"\nupstream = \"main\"\n{extra}\n",
                // One port per name, the same in both files.
                port = 16000 + u16::from(name.as_bytes()[0])
            ));
        }
        Config::parse(&text, "<test>").unwrap()
    }

    fn names(c: &Config) -> Vec<&str> {
        c.services.iter().map(|s| s.name.as_str()).collect()
    }

    #[test]
    fn services_are_kept_removed_or_added_by_name() {
        let old = config(&[("a", ""), ("b", ""), ("c", "")]);
        let new = config(&[("d", ""), ("c", ""), ("a", ""), ("e", "")]);
        let diff = diff_services(&old, &new);
        assert_eq!(diff.removed, ["b"]);
        assert_eq!(diff.added, ["d", "e"]);
        // The running order stays; added services come after, bound by the reload.
        assert_eq!(names(&diff.applied), ["a", "c"]);
    }

    #[test]
    fn kept_services_take_live_settings_but_not_their_listener() {
        let old = config(&[("a", "op_timeout = \"1s\"")]);
        let new = config(&[("a", "op_timeout = \"3s\"\nmax_pipeline = 7")]);
        let mut moved = new.clone();
        moved.services[0].listen = "127.0.0.1:1".parse().unwrap();
        let diff = diff_services(&old, &moved);
        let a = &diff.applied.services[0];
        assert_eq!(a.op_timeout.0, std::time::Duration::from_secs(3));
        assert_eq!(a.max_pipeline, 7);
        // A listener can't move without a restart: the running one stays.
        assert_eq!(a.listen, old.services[0].listen);
        assert!(diff.removed.is_empty() && diff.added.is_empty());
    }

    #[test]
    fn unchanged_file_changes_nothing() {
        let old = config(&[("a", ""), ("b", "")]);
        let diff = diff_services(&old, &old);
        assert!(diff.removed.is_empty() && diff.added.is_empty());
        assert_eq!(names(&diff.applied), ["a", "b"]);
    }
}
