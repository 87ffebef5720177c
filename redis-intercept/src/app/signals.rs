//! The process's run loop and its OS signals: serve until SIGTERM or SIGINT, reload the
//! config file on SIGHUP, on a change the file watch sees, and on `POST /reload`; then drain.

use std::time::Duration;

use anyhow::{Context, Result};
use tracing::{error, info, warn};

use super::{Proxy, files, start};
use crate::config::Config;

/// Runs the proxy until SIGTERM or SIGINT, then drains and stops it. SIGHUP reloads
/// `path` ([`Proxy::reload`]; an invalid file keeps the running config), and so does a
/// change to it or to a client password file, seen every `watch_config`.
///
/// # Errors
/// Start-up failures from [`start`], or signal handlers that can't be installed.
pub fn run(config: &Config, path: Option<&std::path::Path>) -> Result<()> {
    // The files as the config was read, before anything is served: a change made once
    // clients can connect is a change.
    let mut files = path.map(|p| files::Watch::new(p, files::watched(config)));
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
