//! What a reload changes without a restart: each service's `Policy` and mirror rates
//! (applied in place), and its routes, mirrors and upstreams (a worker builds a new
//! generation of the service's routes, and clients move to it). Listeners, the proxy's own
//! settings and the list of services need a restart.

use std::rc::Rc;

use crate::config::{Config, MirrorConfig, RouteConfig, ServiceConfig};
use crate::service::{ServiceCtx, percent_to_per_10000, policy};

/// Copies into `running` (a service as it runs) every setting of `new` (the same service
/// in the reloaded file) that a reload applies in place. Whatever still differs afterwards
/// needs a restart.
pub(super) fn take_live(running: &mut ServiceConfig, new: &ServiceConfig) {
    running.auth.clone_from(&new.auth);
    running.vips.clone_from(&new.vips);
    running.op_timeout = new.op_timeout;
    running.idle_timeout = new.idle_timeout;
    running.max_clients = new.max_clients;
    running.max_client_buffer = new.max_client_buffer;
    running.max_pipeline = new.max_pipeline;
    running.reply_window = new.reply_window;
    running.big_reply_budget = new.big_reply_budget;
    running.legacy_auth = new.legacy_auth;
    running.command_stats = new.command_stats;
    running.faults.clone_from(&new.faults);
    running.acl.clone_from(&new.acl);
    // Routing: workers build a new generation of the service's routes when these change.
    running.upstream.clone_from(&new.upstream);
    running.read_policy = new.read_policy;
    running.mirrors.clone_from(&new.mirrors);
    running.routes.clone_from(&new.routes);
}

/// Every upstream a service sends to: its own, its routes' and all mirrors'.
fn uses(svc: &ServiceConfig) -> Vec<&str> {
    let mut names = vec![svc.upstream.as_str()];
    names.extend(svc.mirrors.iter().map(|m| m.upstream.as_str()));
    for r in &svc.routes {
        names.push(r.upstream.as_str());
        names.extend(r.mirrors.iter().map(|m| m.upstream.as_str()));
    }
    names
}

/// Whether two config items are the same setting for setting (compared as TOML).
pub(super) fn same<T: serde::Serialize>(a: &T, b: &T) -> bool {
    match (toml::Value::try_from(a), toml::Value::try_from(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// The names of the upstreams whose settings differ between `old` and `new`, or that only
/// one of them has: their connections are made again.
pub(super) fn changed_upstreams(old: &Config, new: &Config) -> Vec<String> {
    let mut out = Vec::new();
    for up in &old.upstreams {
        if !new.upstream(&up.name).is_some_and(|n| same(up, n)) {
            out.push(up.name.clone());
        }
    }
    for up in &new.upstreams {
        if old.upstream(&up.name).is_none() {
            out.push(up.name.clone());
        }
    }
    out
}

/// Whether service `old` (as it ran) and `new` (the same service after a reload) route
/// differently, so that a worker must build its routes again: another upstream, read
/// policy, route or mirror list (a mirror's `percentage` and `exclude_reads` change in
/// place), or an upstream in `changed` that it sends to.
pub(super) fn routing_changed(
    old: &ServiceConfig,
    new: &ServiceConfig,
    changed: &[String],
) -> bool {
    let view = |s: &ServiceConfig| {
        let rates_off = |list: &[MirrorConfig]| -> Vec<MirrorConfig> {
            list.iter()
                .map(|m| MirrorConfig {
                    percentage: 0.0,
                    exclude_reads: false,
                    ..m.clone()
                })
                .collect()
        };
        let routes: Vec<RouteConfig> = s
            .routes
            .iter()
            .map(|r| RouteConfig {
                mirrors: rates_off(&r.mirrors),
                ..r.clone()
            })
            .collect();
        (
            s.upstream.clone(),
            s.read_policy,
            rates_off(&s.mirrors),
            routes,
        )
    };
    !same(&view(old), &view(new))
        || uses(old)
            .into_iter()
            .chain(uses(new))
            .any(|n| changed.iter().any(|c| c == n))
}

/// Applies `config` (the running config after a reload) to one worker's services, matched
/// by name. Clients already connected see it at their next command.
pub(super) fn apply(services: &[Rc<ServiceCtx>], config: &Config) {
    for ctx in services {
        let Some(svc) = config.services.iter().find(|s| s.name == ctx.name) else {
            continue;
        };
        *ctx.policy.borrow_mut() = Rc::new(policy(svc));
        // Route 0 is the catch-all, with the service's own mirrors.
        let lists = std::iter::once(&svc.mirrors).chain(svc.routes.iter().map(|r| &r.mirrors));
        for (route, list) in ctx.routes.iter().zip(lists) {
            for (m, conf) in route.mirrors.iter().zip(list) {
                m.per_10000.set(percent_to_per_10000(conf.percentage));
                m.exclude_reads.set(conf.exclude_reads);
            }
        }
    }
}

/// `new` with its services in the order they run in `applied` (services keep their
/// places, added ones come last), so that [`differences`] compares each service with
/// itself.
pub(super) fn in_running_order(new: &Config, applied: &Config) -> Config {
    let mut out = new.clone();
    out.services = applied
        .services
        .iter()
        .map(|s| {
            new.services
                .iter()
                .find(|n| n.name == s.name)
                .unwrap_or(s)
                .clone()
        })
        .collect();
    out
}

/// The key paths (`service[0].read_policy`) where two configs differ, secrets redacted:
/// what a reload could not apply.
pub(super) fn differences(running: &Config, new: &Config) -> Vec<String> {
    let (Ok(a), Ok(b)) = (toml::Value::try_from(running), toml::Value::try_from(new)) else {
        return vec!["(the configuration could not be compared)".to_owned()];
    };
    let mut out = Vec::new();
    diff(&a, &b, "", &mut out);
    out
}

fn diff(a: &toml::Value, b: &toml::Value, at: &str, out: &mut Vec<String>) {
    let key = |k: &str| {
        if at.is_empty() {
            k.to_owned()
        } else {
            format!("{at}.{k}")
        }
    };
    match (a, b) {
        (toml::Value::Table(x), toml::Value::Table(y)) => {
            let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                match (x.get(k), y.get(k)) {
                    (Some(p), Some(q)) => diff(p, q, &key(k), out),
                    _ => out.push(key(k)),
                }
            }
        }
        // Arrays of tables (`[[service]]`) are compared entry by entry; plain arrays whole.
        (toml::Value::Array(x), toml::Value::Array(y))
            if x.iter().chain(y).all(toml::Value::is_table) =>
        {
            for i in 0..x.len().max(y.len()) {
                match (x.get(i), y.get(i)) {
                    (Some(p), Some(q)) => diff(p, q, &format!("{at}[{i}]"), out),
                    _ => out.push(format!("{at}[{i}]")),
                }
            }
        }
        _ if a != b => out.push(at.to_owned()),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
[[upstream]]
name = "main"
mode = "standalone"
nodes = ["127.0.0.1:6379"]

[[upstream]]
name = "copy"
mode = "standalone"
nodes = ["127.0.0.1:6380"]

[[service]]
name = "svc"
listen = "127.0.0.1:0"
upstream = "main"

[[service.mirror]]
upstream = "copy"
percentage = 100.0

[[service.route]]
prefix = "a:"
upstream = "main"

[[service.route.mirror]]
upstream = "copy"
"#;

    fn parse(text: &str) -> Config {
        Config::parse(text, "t").unwrap()
    }

    /// What `Proxy::reload` does: carry the live settings over, then list what remains.
    fn left_over(running: &str, new: &str) -> Vec<String> {
        let old = parse(running);
        let new = parse(new);
        let mut applied = old.clone();
        for s in &mut applied.services {
            if let Some(n) = new.services.iter().find(|n| n.name == s.name) {
                take_live(s, n);
            }
        }
        applied
            .services
            .retain(|s| new.services.iter().any(|n| n.name == s.name));
        for s in &new.services {
            if !old.services.iter().any(|o| o.name == s.name) {
                applied.services.push(s.clone());
            }
        }
        applied.upstreams.clone_from(&new.upstreams);
        differences(&applied, &in_running_order(&new, &applied))
    }

    #[test]
    fn live_settings_leave_nothing_for_a_restart() {
        let new = BASE
            .replace(
                "upstream = \"main\"\n\n[[service.mirror]]",
                "upstream = \"main\"\nop_timeout = \"1s\"\nidle_timeout = \"9s\"\nmax_clients = 7\n\
                 max_pipeline = 3\nmax_client_buffer = \"1MiB\"\nlegacy_auth = \"reject\"\n\
                 vips = [\"127.0.100.1:6379\"]\n\n[[service.fault]]\nkind = \"error\"\npercentage = 5.0\n\n\
                 [service.auth]\npasswords = [\"p\"]\n\n[[service.mirror]]",
            )
            .replace("percentage = 100.0", "percentage = 10.0\nexclude_reads = true");
        assert_eq!(left_over(BASE, &new), Vec::<String>::new());
        // Routes, mirrors and upstreams are rebuilt, so they need no restart either.
        let new = BASE
            .replace("prefix = \"a:\"", "prefix = \"b:\"")
            .replace(
                "nodes = [\"127.0.0.1:6380\"]",
                "nodes = [\"127.0.0.1:6380\"]\nconnect_timeout = \"3s\"",
            )
            .replace(
                "percentage = 100.0",
                "percentage = 50.0\nbatch_delay = \"5ms\"",
            )
            .replace(
                "[[service.route]]",
                "[[service.mirror]]\nupstream = \"main\"\npercentage = 1.0\n\n[[service.route]]",
            );
        assert_eq!(left_over(BASE, &new), Vec::<String>::new());
    }

    #[test]
    fn a_listener_is_named_for_a_restart_and_an_added_service_is_not() {
        let new = BASE.replace("listen = \"127.0.0.1:0\"", "listen = \"127.0.0.1:1\"");
        assert_eq!(left_over(BASE, &new), ["service[0].listen"]);
        let two = "\n[[service]]\nname = \"two\"\nlisten = \"127.0.0.1:1\"\nupstream = \"main\"\n";
        assert_eq!(
            left_over(BASE, &format!("{BASE}{two}")),
            Vec::<String>::new()
        );
        // Added in front of the running one: each is still compared with itself.
        let front = BASE.replacen(
            "[[service]]",
            &format!("{}\n[[service]]", two.trim_start()),
            1,
        );
        assert_eq!(left_over(BASE, &front), Vec::<String>::new());
    }

    #[test]
    fn routes_are_rebuilt_only_when_routing_changes() {
        let old = parse(BASE);
        let svc = |text: &str| parse(text).services[0].clone();
        // Rates change in place.
        let rates = svc(&format!("{BASE}percentage = 0.0\nexclude_reads = true\n"));
        assert!(!routing_changed(&old.services[0], &rates, &[]));
        assert!(!routing_changed(
            &old.services[0],
            &svc(&BASE.replace(
                "upstream = \"main\"\n\n[[service.mirror]]",
                "upstream = \"main\"\nop_timeout = \"2s\"\n\n[[service.mirror]]"
            )),
            &[]
        ));
        for changed in [
            BASE.replace("prefix = \"a:\"", "prefix = \"b:\""),
            BASE.replace("prefix = \"a:\"", "prefix = \"a:\"\nremove_prefix = true"),
            BASE.replace(
                "upstream = \"main\"\n\n[[service.mirror]]",
                "upstream = \"copy\"\n\n[[service.mirror]]",
            ),
            format!("{BASE}batch_delay = \"5ms\"\n"),
        ] {
            assert!(
                routing_changed(&old.services[0], &svc(&changed), &[]),
                "{changed}"
            );
        }
        // An upstream it sends to changed; another one didn't matter.
        assert!(routing_changed(
            &old.services[0],
            &old.services[0],
            &["copy".to_owned()]
        ));
        assert!(!routing_changed(
            &old.services[0],
            &old.services[0],
            &["x".to_owned()]
        ));
        let timeout = parse(&BASE.replace(
            "nodes = [\"127.0.0.1:6380\"]",
            "nodes = [\"127.0.0.1:6380\"]\nconnect_timeout = \"3s\"",
        ));
        assert_eq!(changed_upstreams(&old, &timeout), ["copy"]);
        assert_eq!(changed_upstreams(&old, &old), Vec::<String>::new());
    }
}
