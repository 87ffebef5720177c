//! The local admin HTTP endpoint: `/metrics` (Prometheus), `/ready`, `/config` (secrets
//! redacted), `/topology` (each worker's view of each cluster), `/cgroups` (interception
//! settings: GET lists them, POST `enable|disable|clear PATH` changes one). It runs on its own
//! thread and runtime, away from the data path, and should only
//! listen on loopback.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::Result;
use hyper::StatusCode;
use tokio::sync::{mpsc, oneshot};

use crate::config::{Config, Mode};
use crate::locks::{LockRecovered, RwLockRecovered};
use crate::metrics::{Metrics, NodeLabels};
use crate::upstream::cluster_nodes::ClusterStatus;

mod http;
mod token;

pub use http::Admin;
pub use token::{OPEN_PATHS, Token};

/// What the admin handlers read.
pub struct AdminState {
    /// The process's metrics.
    pub metrics: Arc<Metrics>,
    /// The running config as TOML, secrets redacted: rendered at start and again by each
    /// reload.
    config_toml: std::sync::RwLock<String>,
    /// What `/ready` checks, for the config running now.
    needs: std::sync::RwLock<Needs>,
    /// How many workers run.
    workers: usize,
    /// The eBPF programs, when interception is configured.
    pub intercept: Option<crate::intercept::InterceptSlot>,
    /// Where `POST /reload` asks for a reload of the config file; set by `run` when the
    /// proxy was started with one.
    reloads: std::sync::OnceLock<mpsc::Sender<ReloadRequest>>,
    /// The bearer token every endpoint but `/ready` and `/metrics` needs (`[admin]
    /// token_file`); `None`: no token.
    pub token: Option<token::Token>,
}

/// A reload asked for over HTTP, and where its outcome goes: whether it was applied, and
/// what to tell the caller.
pub type ReloadRequest = oneshot::Sender<(bool, String)>;

/// Reload requests that may wait at once; more get 503 (each reload waits for the last).
const PENDING_RELOADS: usize = 4;

/// What the running config needs up to be ready.
struct Needs {
    /// For each service: its name and the upstream nodes it needs up to be ready.
    readiness: Vec<(String, Vec<NodeLabels>)>,
    /// Connections each node needs up: workers × `connections_per_node`, per upstream name.
    expected: HashMap<String, i64>,
    /// Workers' views of each cluster upstream, by upstream name.
    clusters: HashMap<String, Arc<ClusterStatus>>,
}

impl Needs {
    fn of(config: &Config, workers: usize, clusters: HashMap<String, Arc<ClusterStatus>>) -> Needs {
        let expected = config
            .upstreams
            .iter()
            .map(|u| (u.name.clone(), (workers * u.connections_per_node) as i64))
            .collect();
        let readiness = config
            .services
            .iter()
            .map(|s| {
                let nodes = config
                    .upstream(&s.upstream)
                    // A cluster's nodes come from its topology, checked separately.
                    .filter(|u| u.mode != Mode::Cluster)
                    .map(|u| {
                        let nodes = match u.mode {
                            // The master the sentinels gave; none yet is never ready.
                            Mode::Sentinel => vec![
                                u.master
                                    .clone()
                                    .unwrap_or_else(|| "(master not known yet)".to_owned()),
                            ],
                            Mode::Standalone | Mode::Cluster => u.nodes.clone(),
                        };
                        nodes
                            .into_iter()
                            .map(|node| NodeLabels {
                                upstream: u.name.clone(),
                                node,
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                (s.name.clone(), nodes)
            })
            .collect();
        Needs {
            readiness,
            expected,
            clusters,
        }
    }
}

impl AdminState {
    /// Builds the state for `config` run by `workers` worker threads.
    pub fn new(
        config: &Config,
        workers: usize,
        metrics: Arc<Metrics>,
        clusters: HashMap<String, Arc<ClusterStatus>>,
        intercept: Option<crate::intercept::InterceptSlot>,
    ) -> AdminState {
        AdminState {
            metrics,
            config_toml: std::sync::RwLock::new(redacted_toml(config)),
            needs: std::sync::RwLock::new(Needs::of(config, workers, clusters)),
            workers,
            intercept,
            reloads: std::sync::OnceLock::new(),
            token: None,
        }
    }

    /// Serves `POST /reload` from now on: each request is handed to the returned receiver,
    /// whose owner reloads the config file and answers.
    pub fn accept_reloads(&self) -> mpsc::Receiver<ReloadRequest> {
        let (tx, rx) = mpsc::channel(PENDING_RELOADS);
        // Called once, by `run`; a second call would leave the first receiver serving.
        let _ = self.reloads.set(tx);
        rx
    }

    /// Asks for a reload and waits for its outcome.
    async fn reload(&self) -> (StatusCode, String) {
        let Some(tx) = self.reloads.get() else {
            return (
                StatusCode::NOT_FOUND,
                "nothing to reload: the proxy was started without --config\n".into(),
            );
        };
        let (done, outcome) = oneshot::channel();
        if tx.try_send(done).is_err() {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                "too many reloads waiting; try again\n".into(),
            );
        }
        match outcome.await {
            Ok((true, text)) => (StatusCode::OK, text),
            Ok((false, text)) => (StatusCode::UNPROCESSABLE_ENTITY, text),
            Err(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "the proxy is shutting down\n".into(),
            ),
        }
    }

    /// Shows `config` at `/config`, and checks what it needs at `/ready`, from now on (after
    /// a reload). `clusters` are the statuses its workers publish to.
    pub fn set_running(&self, config: &Config, clusters: HashMap<String, Arc<ClusterStatus>>) {
        *self.config_toml.write_recovered() = redacted_toml(config);
        *self.needs.write_recovered() = Needs::of(config, self.workers, clusters);
    }

    fn needs(&self) -> std::sync::RwLockReadGuard<'_, Needs> {
        self.needs.read_recovered()
    }

    /// Copies the eBPF counters into the metrics about to be served.
    fn copy_intercept_counters(&self) {
        let Some(slot) = &self.intercept else { return };
        let guard = slot.locked();
        let Some(Ok(counters)) = guard.as_ref().map(|i| i.counters()) else {
            return;
        };
        let families = [&self.metrics.intercepted_connects; 4]
            .into_iter()
            .chain([&self.metrics.accelerated; 4]);
        for ((name, value), family) in [
            "redirected",
            "skipped_mark",
            "skipped_policy",
            "skipped_no_pod_address",
            "paired",
            "spliced",
            "unpaired",
            "backlogged",
        ]
        .into_iter()
        .zip(counters)
        .zip(families)
        {
            family
                .get_or_create(&crate::metrics::ResultLabels {
                    result: name.to_owned(),
                })
                .set(i64::try_from(value).unwrap_or(i64::MAX));
        }
    }

    /// `GET /cgroups`: where the programs attach, the counters and every explicit setting.
    fn cgroups(&self) -> (StatusCode, String) {
        let Some(slot) = &self.intercept else {
            return (
                StatusCode::NOT_FOUND,
                "interception is not configured ([intercept] is absent)\n".into(),
            );
        };
        let guard = slot.locked();
        let Some(i) = guard.as_ref() else {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                "interception is detached (shutting down)\n".into(),
            );
        };
        let mut out = format!(
            "attached to {} ({})\n",
            i.attach_point().display(),
            if i.is_attached() {
                "attached"
            } else {
                "waiting for the upstreams"
            }
        );
        if let Ok(c) = i.counters() {
            out.push_str(&format!(
                "counters: redirected {} skipped_by_mark {} skipped_by_policy {} skipped_no_pod_address {}\n",
                c[0], c[1], c[2], c[3]
            ));
            if i.accelerates() {
                out.push_str(&format!(
                    "accelerate: paired sockets {} spliced writes {} unpaired sockets {} backlogged sockets {}\n",
                    c[4], c[5], c[6], c[7]
                ));
            }
        }
        out.push_str("PATH\tID\tSETTING\tEXISTS\n");
        for r in i.rules() {
            out.push_str(&format!(
                "{}\t{}\t{}\t{}\n",
                r.path.display(),
                r.id,
                if r.on { "enable" } else { "disable" },
                if r.exists { "yes" } else { "no" }
            ));
        }
        (StatusCode::OK, out)
    }

    /// `POST /cgroups` with `enable|disable|clear PATH`.
    fn set_cgroup(&self, body: &str) -> (StatusCode, String) {
        let Some(slot) = &self.intercept else {
            return (
                StatusCode::NOT_FOUND,
                "interception is not configured ([intercept] is absent)\n".into(),
            );
        };
        let body = body.trim_end_matches(['\r', '\n']);
        let Some((action, path)) = body.split_once(' ') else {
            return (
                StatusCode::BAD_REQUEST,
                "expected: enable|disable|clear PATH\n".into(),
            );
        };
        let setting = match action {
            "enable" => Some(true),
            "disable" => Some(false),
            "clear" => None,
            _ => {
                return (
                    StatusCode::BAD_REQUEST,
                    format!("unknown action {action:?}\n"),
                );
            }
        };
        let mut guard = slot.locked();
        let Some(i) = guard.as_mut() else {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                "interception is detached\n".into(),
            );
        };
        let path = std::path::Path::new(path);
        match i.set(path, setting) {
            Ok(id) => (
                StatusCode::OK,
                format!("{action} {} (cgroup id {id})\n", i.resolve(path).display()),
            ),
            Err(e) => (StatusCode::BAD_REQUEST, format!("{e}\n")),
        }
    }

    /// What is missing for cluster `name` to be ready: every worker has a map that covers
    /// every slot, and all connections to each master are up.
    fn cluster_missing(
        &self,
        needs: &Needs,
        name: &str,
        status: &ClusterStatus,
        missing: &mut Vec<String>,
    ) {
        let want = needs.expected.get(name).copied().unwrap_or(1);
        let workers = status.workers.locked();
        let mut masters = std::collections::BTreeSet::new();
        for (i, view) in workers.iter().enumerate() {
            match view {
                None => missing.push(format!(
                    "cluster {name}: worker {i} has not discovered the topology yet"
                )),
                Some(v) if !v.complete => missing.push(format!(
                    "cluster {name}: worker {i} sees {} of 16384 slots served",
                    v.covered
                )),
                Some(v) => masters.extend(v.shards.iter().map(|s| s.1.clone())),
            }
        }
        for master in masters {
            let up = self
                .metrics
                .upstream_connections_up
                .get_or_create(&NodeLabels {
                    upstream: name.to_owned(),
                    node: master.clone(),
                })
                .get();
            if up < want {
                missing.push(format!(
                    "cluster {name}: master {master}: {up} of {want} connections up"
                ));
            }
        }
    }

    /// Each worker's view of each cluster upstream, as text.
    pub fn topology(&self) -> String {
        let mut out = String::new();
        let needs = self.needs();
        let mut names: Vec<&String> = needs.clusters.keys().collect();
        names.sort();
        for name in names {
            let workers = needs.clusters[name].workers.locked();
            for (i, view) in workers.iter().enumerate() {
                match view {
                    None => out.push_str(&format!("{name} worker {i}: not discovered yet\n")),
                    Some(v) => {
                        out.push_str(&format!(
                            "{name} worker {i}: {} slots served{}\n",
                            v.covered,
                            if v.complete { "" } else { " (INCOMPLETE)" }
                        ));
                        for (slots, master, replicas) in &v.shards {
                            out.push_str(&format!(
                                "  {slots} master {master} replicas [{}]\n",
                                replicas.join(", ")
                            ));
                        }
                    }
                }
            }
        }
        if out.is_empty() {
            out.push_str("no cluster upstreams\n");
        }
        out
    }

    /// `Ok` when every worker has all its connections up to each node of every service's
    /// upstream (a client may land on any worker); otherwise what is missing.
    pub fn ready(&self) -> Result<(), String> {
        let mut missing = Vec::new();
        let needs = self.needs();
        for (service, nodes) in &needs.readiness {
            for node in nodes {
                let up = self
                    .metrics
                    .upstream_connections_up
                    .get_or_create(node)
                    .get();
                let want = needs.expected.get(&node.upstream).copied().unwrap_or(1);
                if up < want {
                    missing.push(format!(
                        "service {service}: upstream {} node {}: {up} of {want} connections up",
                        node.upstream, node.node
                    ));
                }
            }
        }
        let mut names: Vec<&String> = needs.clusters.keys().collect();
        names.sort();
        for name in names {
            self.cluster_missing(&needs, name, &needs.clusters[name], &mut missing);
        }
        if missing.is_empty() {
            Ok(())
        } else {
            Err(missing.join("\n"))
        }
    }
}

/// The config as TOML with every secret replaced (passwords are serialized as `<redacted>`).
pub fn redacted_toml(config: &Config) -> String {
    toml::to_string(config).unwrap_or_else(|e| format!("# config could not be rendered: {e}\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_dump_redacts_passwords() {
        let text = format!(
            "{}[service.auth]\npasswords = [\"hunter2\", \"swordfish\"]\n",
            crate::config::MINIMAL
        );
        let config = Config::parse(&text, "t").unwrap();
        let dump = redacted_toml(&config);
        assert!(
            !dump.contains("hunter2") && !dump.contains("swordfish"),
            "{dump}"
        );
        assert!(dump.contains("<redacted>"), "{dump}");
        assert!(dump.contains("127.0.0.1:16379"), "{dump}");
        // What the dump shows parses back as a config.
        assert!(Config::parse(&dump, "dump").is_ok(), "{dump}");
    }
}
