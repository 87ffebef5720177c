//! The process's run loop: serve until SIGTERM or SIGINT, reload on SIGHUP, on a change the
//! file watch sees, and on `POST /reload`; then drain.

use std::time::Duration;

use anyhow::{Context, Result};
use tracing::info;

use super::reload::reload;
use super::{files, start};
use crate::config::Config;

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
                    // What the reload is about to read counts as seen.
                    if let Some(f) = &mut files {
                        f.changed();
                    }
                    reload(&proxy, path);
                    if let Some(f) = &mut files {
                        f.reloaded(&proxy);
                    }
                }
                Some(done) = async { posted.as_mut()?.recv().await }, if posted.is_some() => {
                    if let Some(f) = &mut files {
                        f.changed();
                    }
                    let outcome = reload(&proxy, path);
                    if let Some(f) = &mut files {
                        f.reloaded(&proxy);
                    }
                    let _ = done.send(outcome);
                }
                _ = tick.tick(), if every.is_some() => {
                    if let Some(f) = &mut files
                        && f.changed()
                    {
                        info!("the config file or a client password file changed: reloading");
                        reload(&proxy, path);
                        f.reloaded(&proxy);
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
