//! The eBPF glue: load the programs with the services' VIPs and cgroup settings, and
//! attach them once every upstream answers.

use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::sync::watch;
use tracing::{error, warn};

use super::BoundService;
use crate::admin::AdminState;
use crate::config::Config;
use crate::intercept::InterceptSlot;
use crate::intercept::{self, Interceptor};
use crate::locks::LockRecovered;

/// Loads the eBPF programs for `[intercept]` with the services' VIPs.
pub(super) fn load_interceptor(
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
pub(super) fn cgroup_rules(ic: &crate::config::InterceptConfig) -> Vec<(PathBuf, bool)> {
    ic.enable
        .iter()
        .map(|p| (p.clone(), true))
        .chain(ic.disable.iter().map(|p| (p.clone(), false)))
        .collect()
}

/// Every VIP of the services that are running, with the listener it goes to.
pub(super) fn vips(config: &Config, services: &[BoundService]) -> Vec<intercept::Vip> {
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
pub(super) fn spawn_attacher(
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
                        let mut guard = slot.locked();
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
