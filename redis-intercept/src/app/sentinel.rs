//! Follows the masters of sentinel upstreams: their sentinels are asked at start, every
//! `refresh_interval`, and at once when a worker's connection to the master fails (at most
//! once per `redirect_refresh_interval`). A new master is applied as a reload in which only
//! that upstream changed, so clients move to it between commands.

use std::collections::HashMap;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{info, warn};

use super::Reloader;
use crate::config::{Config, Mode, UpstreamConfig};
use crate::resp::Limits;
use crate::service::{UpstreamSecrets, conn_settings, upstream_secrets};
use crate::upstream::sentinel::{View, ask};
use crate::upstream::{ConnSettings, PasswordSource, UpstreamAuth};

/// The watcher wakes at least this often: a reload may have added a sentinel upstream, and
/// a new master whose reload failed is tried again.
const TICK: Duration = Duration::from_secs(1);

/// Failure reports a worker may queue for the watcher; more are dropped (one is enough to
/// make it ask).
pub(super) const KICKS: usize = 64;

/// How the sentinels of `up` are reached: the upstream's TLS and socket mark, and the
/// sentinels' own credentials (`sentinel_username`, `sentinel_password_file` or `_env`).
fn settings(up: &UpstreamConfig, mark: Option<u32>) -> ConnSettings {
    let tls = upstream_secrets(up).ok().and_then(|s| s.tls);
    let password = match (&up.sentinel_password_file, &up.sentinel_password_env) {
        (Some(path), _) => Some(PasswordSource::File(path.clone())),
        (None, Some(var)) => match std::env::var(var) {
            Ok(v) => Some(PasswordSource::Value(v)),
            Err(_) => {
                warn!(upstream = %up.name, "sentinel: environment variable {var} (sentinel_password_env) is not set; asking without a password");
                None
            }
        },
        (None, None) => None,
    };
    let auth = password.map(|password| UpstreamAuth {
        username: up.sentinel_username.clone(),
        password,
    });
    ConnSettings {
        mark,
        ..conn_settings(up, &UpstreamSecrets { auth, tls }, 0, Limits::default())
    }
}

/// The socket mark of the proxy's own connections under `config`.
fn mark(config: &Config) -> Option<u32> {
    config
        .intercept
        .as_ref()
        .map(|_| redis_intercept_common::PROXY_SO_MARK)
}

/// Asks the sentinels of every sentinel upstream of `config` whose master isn't in `known`,
/// before anything connects to it (at start, and for upstreams a reload adds). An upstream
/// none of whose sentinels answers is left out: it has no connections (its requests get an
/// error) until the watcher learns its master. Runs on a thread of its own, so callers may
/// be on a runtime.
pub(super) fn first_masters(
    config: &Config,
    known: &HashMap<String, View>,
) -> HashMap<String, View> {
    let ups: Vec<&UpstreamConfig> = config
        .upstreams
        .iter()
        .filter(|u| u.mode == Mode::Sentinel && !known.contains_key(&u.name))
        .collect();
    if ups.is_empty() {
        return HashMap::new();
    }
    std::thread::scope(|s| s.spawn(|| ask_all(config, &ups)).join().unwrap_or_default())
}

/// [`first_masters`] on the calling thread.
fn ask_all(config: &Config, ups: &[&UpstreamConfig]) -> HashMap<String, View> {
    let mut out = HashMap::new();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            warn!(error = %e, "sentinel: cannot build a runtime to ask the sentinels");
            return out;
        }
    };
    for up in ups {
        let name = up.master_name.as_deref().unwrap_or_default();
        match runtime.block_on(ask(&up.nodes, name, &settings(up, mark(config)))) {
            Ok(view) => {
                info!(upstream = %up.name, master = %view.master, replicas = ?view.replicas, "sentinel: master found");
                out.insert(up.name.clone(), view);
            }
            Err(e) => {
                warn!(upstream = %up.name, error = %e, "sentinel: no sentinel gave the master; will keep asking");
            }
        }
    }
    out
}

/// Starts the thread that follows the masters until `shutdown`. Workers report failed
/// connections to a master on `kicks` (the upstream's name).
pub(super) fn spawn_watch(
    control: Arc<Reloader>,
    kicks: mpsc::Receiver<String>,
    shutdown: watch::Receiver<bool>,
) -> Result<JoinHandle<()>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("build the sentinel runtime")?;
    std::thread::Builder::new()
        .name("ri-sentinel".into())
        .spawn(move || runtime.block_on(watch_masters(&control, kicks, shutdown)))
        .context("spawn the sentinel thread")
}

/// When each sentinel upstream is asked next, when it was last asked, and what went wrong.
#[derive(Default)]
struct Due {
    /// Next periodic question, by upstream.
    next: HashMap<String, Instant>,
    /// Last question, by upstream (failure reports wait for `redirect_refresh_interval`).
    last: HashMap<String, Instant>,
    /// The last failure, by upstream: logged when it changes, not at every question.
    failing: HashMap<String, String>,
}

async fn watch_masters(
    control: &Reloader,
    mut kicks: mpsc::Receiver<String>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut due = Due::default();
    // A new master that couldn't be applied yet (the reload failed): tried again each tick.
    let mut pending = false;
    loop {
        let config = control.config();
        let ups: Vec<UpstreamConfig> = config
            .upstreams
            .iter()
            .filter(|u| u.mode == Mode::Sentinel)
            .cloned()
            .collect();
        let now = Instant::now();
        for up in &ups {
            // Known at start or by the reload that added it: asked again after an interval.
            // Not known: asked every tick until a sentinel answers.
            let next = if up.master.is_some() {
                now + up.refresh_interval.0
            } else {
                now + TICK
            };
            due.next.entry(up.name.clone()).or_insert(next);
        }
        let wake = ups
            .iter()
            .filter_map(|u| due.next.get(&u.name))
            .min()
            .copied()
            .map_or(now + TICK, |due| due.min(now + TICK));
        let mut due_now: Vec<&UpstreamConfig> = Vec::new();
        tokio::select! {
            _ = shutdown.changed() => return,
            () = tokio::time::sleep_until(wake) => {
                let now = Instant::now();
                due_now.extend(ups.iter().filter(|u| due.next.get(&u.name).is_some_and(|t| *t <= now)));
            }
            kick = kicks.recv() => {
                let Some(name) = kick else { return };
                if let Some(up) = ups.iter().find(|u| u.name == name)
                    && due
                        .last
                        .get(&name)
                        .is_none_or(|t| t.elapsed() >= up.redirect_refresh_interval.0)
                {
                    due_now.push(up);
                }
            }
        }
        let mut moved = false;
        for up in due_now {
            let now = Instant::now();
            due.last.insert(up.name.clone(), now);
            let name = up.master_name.as_deref().unwrap_or_default();
            let answer = ask(&up.nodes, name, &settings(up, mark(&config))).await;
            let found = answer.is_ok() || up.master.is_some();
            let every = if found { up.refresh_interval.0 } else { TICK };
            due.next.insert(up.name.clone(), now + every);
            match answer {
                Ok(view) => {
                    if due.failing.remove(&up.name).is_some() {
                        info!(upstream = %up.name, "sentinel: the sentinels answer again");
                    }
                    moved |= control.set_master(&up.name, view);
                }
                Err(e) => {
                    if due.failing.get(&up.name) != Some(&e) {
                        warn!(upstream = %up.name, error = %e, "sentinel: no sentinel gave the master");
                        due.failing.insert(up.name.clone(), e);
                    }
                }
            }
        }
        if moved || pending {
            match control.follow_masters() {
                Ok(_) => {
                    pending = false;
                    info!("sentinel: clients move to the new master");
                }
                Err(e) => {
                    pending = true;
                    warn!(error = %format!("{e:#}"), "sentinel: applying the new master failed; trying again");
                }
            }
        }
    }
}
