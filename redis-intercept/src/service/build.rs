//! Turns the config into a service's run-time parts on one worker: each route's upstream
//! (standalone connections, or a cluster pool shared by every service that uses the cluster
//! the same way), its mirrors, and the credentials upstream connections present.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::{
    Backend, ClientAuth, Fault, FaultAction, Mirror, Policy, RouteCtx, ServiceCtx, SharedAuth,
};
use crate::budget::QueryBudget;
use crate::config::{Config, FaultConfig, FaultKind, LegacyAuth, Mode, ServiceConfig};
use crate::metrics::GaugeGuard;
use crate::metrics::Metrics;
use crate::resp::Limits;
use crate::upstream::cluster_nodes::{ClusterNodes, ClusterSettings, ClusterStatus};
use crate::upstream::owned::{GenerationConns, NodesLease};
use crate::upstream::standalone::Standalone;
use crate::upstream::tls::{self, TlsSettings};
use crate::upstream::{ConnSettings, PasswordSource, UpstreamAuth};

/// What every generation of a service's routes shares: the settings and credentials a
/// reload changes in place, and the metric handles.
pub struct SharedParts {
    /// The service's [`Policy`].
    pub policy: Rc<RefCell<Rc<Policy>>>,
    /// The service's metric handles.
    pub metrics: crate::metrics::ServiceMetrics,
    /// Client-facing credentials.
    pub auth: SharedAuth,
    /// The newest generation.
    pub newest: Rc<RefCell<std::rc::Weak<ServiceCtx>>>,
}

impl SharedParts {
    pub fn of(ctx: &ServiceCtx) -> SharedParts {
        SharedParts {
            policy: Rc::clone(&ctx.policy),
            metrics: ctx.metrics.clone(),
            auth: Arc::clone(&ctx.auth),
            newest: Rc::clone(&ctx.newest),
        }
    }
}

/// A worker's upstreams: standalone connections are made for each use, cluster pools are
/// shared by everything that uses the same cluster the same way.
pub struct Upstreams {
    /// The worker's number.
    pub worker: usize,
    /// Credentials and TLS of each upstream, by name.
    pub auths: HashMap<String, UpstreamSecrets>,
    /// Reply limits.
    pub limits: Limits,
    /// The process's metrics.
    pub metrics: Arc<Metrics>,
    /// Cluster pools by (upstream, whether replicas serve reads), while some generation of
    /// some service's routes uses them.
    pub pools: HashMap<(String, bool), std::rc::Weak<NodesLease>>,
    /// Where workers publish their view of each cluster.
    pub cluster_status: HashMap<String, Arc<ClusterStatus>>,
    /// Socket mark of upstream connections.
    pub mark: Option<u32>,
    /// Where a failed connection to a sentinel upstream's master is reported, so the
    /// sentinels are asked at once.
    pub kicks: tokio::sync::mpsc::Sender<String>,
    /// The process-wide budget for client input, handed to every service.
    pub query_budget: Arc<QueryBudget>,
    /// The sink that swallows mirror replies.
    pub discard: Rc<dyn crate::upstream::ReplySink>,
    /// What the service being built opens or shares.
    pub owned: GenerationConns,
    /// Cluster pools made for the service being built.
    pub fresh: Vec<Rc<ClusterNodes>>,
}

impl Upstreams {
    /// A generation of `svc`'s routes, and the cluster pools made for it (which have yet
    /// to discover their topology).
    pub fn service(
        &mut self,
        config: &Config,
        svc: &crate::config::ServiceConfig,
        shared: &SharedParts,
    ) -> Result<(ServiceCtx, Vec<Rc<ClusterNodes>>)> {
        self.owned = GenerationConns::default();
        self.fresh.clear();
        let Some(up) = config.upstream(&svc.upstream) else {
            bail!(
                "service {:?}: unknown upstream {:?}",
                svc.name,
                svc.upstream
            );
        };
        let mut routes = vec![RouteCtx {
            remove_prefix: false,
            backend: self.backend(
                up,
                svc.read_policy,
                up.max_pending_bytes.0,
                Duration::ZERO,
                true,
            ),
            mirrors: self.mirrors(config, &svc.name, &svc.mirrors)?,
        }];
        for r in &svc.routes {
            let Some(target) = config.upstream(&r.upstream) else {
                bail!(
                    "service {:?}: unknown route upstream {:?}",
                    svc.name,
                    r.upstream
                );
            };
            routes.push(RouteCtx {
                remove_prefix: r.remove_prefix,
                backend: self.backend(
                    target,
                    r.read_policy.unwrap_or(svc.read_policy),
                    target.max_pending_bytes.0,
                    Duration::ZERO,
                    true,
                ),
                mirrors: self.mirrors(config, &svc.name, &r.mirrors)?,
            });
        }
        let prefixes = crate::route::Prefixes::new(
            &svc.routes
                .iter()
                .map(|r| (r.prefix.as_bytes().to_vec(), r.case_insensitive))
                .collect::<Vec<_>>(),
        );
        let ctx = ServiceCtx {
            name: svc.name.clone(),
            routes,
            prefixes,
            policy: Rc::clone(&shared.policy),
            limits: self.limits,
            metrics: shared.metrics.clone(),
            auth: Arc::clone(&shared.auth),
            discard: Rc::clone(&self.discard),
            newest: Rc::clone(&shared.newest),
            owned: std::mem::take(&mut self.owned),
            generation: GaugeGuard::new(&shared.metrics.generations),
            query_budget: Arc::clone(&self.query_budget),
        };
        Ok((ctx, std::mem::take(&mut self.fresh)))
    }

    /// Lets reads on `server` go to `up`'s replicas under `policy` (not `master`): each gets
    /// connections of its own, owned by the generation being built. `report` is called when
    /// one of them fails.
    fn add_reads(
        &mut self,
        server: &Standalone,
        up: &crate::config::UpstreamConfig,
        policy: crate::config::ReadPolicy,
        settings: &ConnSettings,
        report: Option<Rc<dyn Fn()>>,
    ) {
        if policy == crate::config::ReadPolicy::Master {
            return;
        }
        let replicas: Vec<Rc<Standalone>> = up
            .replicas
            .iter()
            .map(|addr| {
                let replica = Standalone::new(
                    up,
                    addr,
                    settings.clone(),
                    Arc::clone(&self.metrics),
                    report.clone(),
                );
                self.owned.standalones.push(Rc::clone(&replica));
                replica
            })
            .collect();
        server.set_reads(policy, replicas);
    }

    /// This worker's way to `up`: new shared connections for a standalone server (with
    /// `max_pending` bytes of queue each), or the cluster's pool.
    fn backend(
        &mut self,
        up: &crate::config::UpstreamConfig,
        policy: crate::config::ReadPolicy,
        max_pending: usize,
        write_delay: Duration,
        charged: bool,
    ) -> Backend {
        let secrets = self.auths.get(&up.name).cloned().unwrap_or_default();
        let settings = ConnSettings {
            write_delay,
            mark: self.mark,
            budget: charged.then(|| Arc::clone(&self.query_budget)),
            ..conn_settings(up, &secrets, max_pending, self.limits)
        };
        match up.mode {
            Mode::Standalone => {
                // Config validation gives a standalone upstream exactly one node (without
                // one, the server has no connections and requests get an error).
                let node = up.nodes.first().map_or("", String::as_str);
                let server =
                    Standalone::new(up, node, settings.clone(), Arc::clone(&self.metrics), None);
                self.owned.standalones.push(Rc::clone(&server));
                self.add_reads(&server, up, policy, &settings, None);
                Backend::Standalone(server)
            }
            Mode::Sentinel => {
                // The master the sentinels gave (none yet: no connections, and requests get
                // an error until the watcher finds one).
                let node = up.master.as_deref().unwrap_or_default();
                let kicks = self.kicks.clone();
                let name = up.name.clone();
                let report: Rc<dyn Fn()> = Rc::new(move || {
                    // Full: a report is already waiting, which is as good.
                    let _ = kicks.try_send(name.clone());
                });
                let server = Standalone::new(
                    up,
                    node,
                    settings.clone(),
                    Arc::clone(&self.metrics),
                    Some(Rc::clone(&report)),
                );
                self.owned.standalones.push(Rc::clone(&server));
                // A failed replica connection makes the proxy ask the sentinels too.
                self.add_reads(&server, up, policy, &settings, Some(report));
                Backend::Standalone(server)
            }
            Mode::Cluster => {
                let readonly = policy != crate::config::ReadPolicy::Master;
                let key = (up.name.clone(), readonly);
                let lease = match self.pools.get(&key).and_then(std::rc::Weak::upgrade) {
                    Some(lease) => lease,
                    None => {
                        let worker = self.worker;
                        let status = self.cluster_status.get(&up.name).cloned();
                        let pool = ClusterNodes::new(
                            ClusterSettings {
                                name: up.name.clone(),
                                seeds: up.nodes.clone(),
                                conn: ConnSettings {
                                    readonly,
                                    ..settings
                                },
                                per_node: up.connections_per_node,
                                refresh_interval: up.refresh_interval.0,
                                refresh_threshold: up.redirect_refresh_threshold,
                                refresh_min_interval: up.redirect_refresh_interval.0,
                                worker,
                                max_idle_dedicated: up.max_idle_dedicated,
                            },
                            Arc::clone(&self.metrics),
                            status.unwrap_or_else(|| ClusterStatus::new(worker + 1)),
                        );
                        tokio::task::spawn_local(Rc::clone(&pool).run());
                        self.fresh.push(Rc::clone(&pool));
                        let lease = Rc::new(NodesLease(pool));
                        self.pools.insert(key, Rc::downgrade(&lease));
                        lease
                    }
                };
                let pool = Rc::clone(&lease.0);
                if !self.owned.pools.iter().any(|l| Rc::ptr_eq(l, &lease)) {
                    self.owned.pools.push(lease);
                }
                Backend::Cluster(pool, policy)
            }
        }
    }

    /// The mirrors of a service or route.
    fn mirrors(
        &mut self,
        config: &Config,
        service: &str,
        list: &[crate::config::MirrorConfig],
    ) -> Result<Vec<Mirror>> {
        let mut mirrors = Vec::new();
        for m in list {
            let Some(target) = config.upstream(&m.upstream) else {
                bail!(
                    "service {service:?}: unknown mirror upstream {:?}",
                    m.upstream
                );
            };
            let (sent, dropped) = self.metrics.mirror(service, &target.name);
            mirrors.push(Mirror {
                backend: self.backend(
                    target,
                    crate::config::ReadPolicy::Master,
                    m.max_queue.0,
                    m.batch_delay.0,
                    false,
                ),
                per_10000: Cell::new(percent_to_per_10000(m.percentage)),
                exclude_reads: Cell::new(m.exclude_reads),
                batch_delay: m.batch_delay.0,
                sent,
                dropped,
            });
        }
        Ok(mirrors)
    }
}

/// How the connections of `up` behave.
pub fn conn_settings(
    up: &crate::config::UpstreamConfig,
    secrets: &UpstreamSecrets,
    max_pending_bytes: usize,
    limits: Limits,
) -> ConnSettings {
    ConnSettings {
        auth: secrets.auth.clone(),
        tls: secrets.tls.clone(),
        write_delay: Duration::ZERO,
        mark: None,
        connect_timeout: up.connect_timeout.0,
        backoff_max: up.reconnect_backoff_max.0,
        max_pending_bytes,
        limits,
        readonly: false,
        db: 0,
        budget: None,
        protocol: None,
        version: crate::upstream::ServerVersion::default(),
    }
}

/// What an upstream's connections need from files and the environment, read at start so a
/// missing one fails start-up.
#[derive(Clone, Default)]
pub struct UpstreamSecrets {
    /// AUTH credentials.
    pub auth: Option<UpstreamAuth>,
    /// TLS client configuration.
    pub tls: Option<TlsSettings>,
}

/// Reads the credentials and TLS files of `up`.
pub fn upstream_secrets(up: &crate::config::UpstreamConfig) -> Result<UpstreamSecrets> {
    let tls = up
        .tls
        .as_ref()
        .map(|t| {
            tls::settings(&tls::TlsOptions {
                ca_file: t.ca_file.as_deref(),
                server_name: t.server_name.as_deref(),
                client_cert_file: t.client_cert_file.as_deref(),
                client_key_file: t.client_key_file.as_deref(),
                insecure_skip_verify: t.insecure_skip_verify,
            })
            .map_err(|e| anyhow::anyhow!("upstream {:?}: {e}", up.name))
        })
        .transpose()?;
    Ok(UpstreamSecrets {
        auth: upstream_auth(up)?,
        tls,
    })
}

/// The credentials of an upstream, with `password_env` read now (it can't appear later).
pub fn upstream_auth(up: &crate::config::UpstreamConfig) -> Result<Option<UpstreamAuth>> {
    let password = match (&up.password_file, &up.password_env) {
        (Some(path), _) => PasswordSource::File(path.clone()),
        (None, Some(var)) => PasswordSource::Value(std::env::var(var).with_context(|| {
            format!(
                "upstream {:?}: environment variable {var} (password_env) is not set",
                up.name
            )
        })?),
        (None, None) => return Ok(None),
    };
    Ok(Some(UpstreamAuth {
        username: up.username.clone(),
        password,
    }))
}

/// The client credentials of every service, password files read now.
pub fn client_auths(config: &Config) -> Result<Vec<Option<ClientAuth>>> {
    config
        .services
        .iter()
        .map(|s| {
            s.auth
                .as_ref()
                .map(|a| {
                    let passwords = a
                        .load_passwords()
                        .map_err(|e| anyhow::anyhow!("service {:?}: auth: {e}", s.name))?;
                    Ok(ClientAuth {
                        username: a.username.clone().unwrap_or_else(|| "default".to_owned()),
                        passwords: passwords.into_iter().map(String::into_bytes).collect(),
                    })
                })
                .transpose()
        })
        .collect()
}

/// The runtime form of a service's reloadable settings.
pub fn policy(svc: &ServiceConfig) -> Policy {
    Policy {
        op_timeout: svc.op_timeout.0,
        idle_timeout: svc.idle_timeout.non_zero(),
        max_client_buffer: svc.max_client_buffer.0,
        max_pipeline: svc.max_pipeline,
        reply_window: svc.reply_window.0,
        big_reply_budget: svc.big_reply_budget.0,
        max_clients: svc.max_clients,
        legacy_auth_reject: svc.legacy_auth == LegacyAuth::Reject,
        command_stats: svc.command_stats,
        faults: svc.faults.iter().map(fault).collect(),
        // Checked when the config was loaded; a rule set that no longer compiles can't occur.
        acl: svc.acl.as_ref().and_then(|a| {
            crate::command::acl::Acl::compile(&a.rules)
                .ok()
                .map(std::sync::Arc::new)
        }),
    }
}

/// The runtime form of a fault rule.
fn fault(f: &FaultConfig) -> Fault {
    let action = match f.kind {
        FaultKind::Error => {
            let message = f.message.as_deref().unwrap_or("ERR Fault Injected: Error");
            // One line: a CR or LF would break the reply framing.
            let message: String = message
                .chars()
                .filter(|c| *c != '\r' && *c != '\n')
                .collect();
            FaultAction::Error(bytes::Bytes::from(format!("-{message}\r\n")))
        }
        FaultKind::Delay => FaultAction::Delay(f.delay.map(|d| d.0).unwrap_or_default()),
    };
    Fault {
        action,
        per_10000: percent_to_per_10000(f.percentage),
        commands: f.commands.iter().map(|c| c.as_bytes().to_vec()).collect(),
        key_prefix: f.key_prefix.as_ref().map(|p| p.as_bytes().to_vec()),
    }
}

/// A percentage (0 to 100, validated by the config) in hundredths of a percent.
pub fn percent_to_per_10000(percentage: f64) -> u32 {
    (percentage * 100.0).round().clamp(0.0, 10_000.0) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_rules_become_runtime_faults() {
        let text = format!(
            "{}{}",
            crate::config::MINIMAL,
            r#"
[[service.fault]]
kind = "error"
percentage = 12.5
commands = ["GET"]
message = "ERR boom\r\nx"

[[service.fault]]
kind = "delay"
percentage = 100.0
delay = "20ms"
key_prefix = "slow:"
"#
        );
        let config = Config::parse(&text, "<test>").unwrap();
        let p = policy(&config.services[0]);
        assert_eq!(p.faults.len(), 2);
        assert_eq!(p.faults[0].per_10000, 1250);
        assert_eq!(p.faults[0].commands, [b"GET".to_vec()]);
        assert!(
            matches!(&p.faults[0].action, FaultAction::Error(e) if e.as_ref() == b"-ERR boomx\r\n")
        );
        assert!(matches!(p.faults[1].action, FaultAction::Delay(d) if d.as_millis() == 20));
        assert_eq!(p.faults[1].key_prefix.as_deref(), Some(&b"slow:"[..]));
    }
}
