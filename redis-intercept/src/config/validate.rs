//! Loading and validating a config: every problem found, each with its key path.

use std::collections::HashSet;
use std::path::Path;

use super::{
    Config, Error, FaultKind, MirrorConfig, Mode, ReadPolicy, ServiceConfig, UpstreamConfig,
    located, split_host_port,
};

impl Config {
    /// Reads and validates a configuration file.
    ///
    /// # Errors
    /// An [`Error`] naming the file, each key path at fault, and what is wrong.
    pub fn load(path: &Path) -> Result<Config, Error> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| Error {
            file: file.clone(),
            problems: vec![(String::new(), format!("cannot read: {e}"))],
        })?;
        Config::parse(&text, &file)
    }

    /// Parses and validates configuration text; `file` names it in errors.
    ///
    /// # Errors
    /// An [`Error`] naming each key path at fault and what is wrong.
    pub fn parse(text: &str, file: &str) -> Result<Config, Error> {
        let fail = |path: String, msg: String| Error {
            file: file.to_owned(),
            problems: vec![(path, msg)],
        };
        let de = toml::de::Deserializer::parse(text)
            .map_err(|e| fail(String::new(), located(text, &e, e.message())))?;
        let config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let path = if path == "." { String::new() } else { path };
            let inner = e.into_inner();
            // Serde's messages quote the value ("invalid type: string \"…\""); a password's
            // must not reach a log.
            let message = if path.contains("password") {
                "not a valid value here (the value is not shown: it may be a secret)"
            } else {
                inner.message()
            };
            fail(path, located(text, &inner, message))
        })?;
        let problems = config.problems();
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(Error {
                file: file.to_owned(),
                problems,
            })
        }
    }

    /// Rules that span fields: references, uniqueness, ranges.
    fn problems(&self) -> Vec<(String, String)> {
        let mut p = Vec::new();
        let mut err = |path: String, msg: &str| p.push((path, msg.to_owned()));
        if let Some(ic) = &self.intercept
            && u32::try_from(ic.accelerate_backlog.0).is_err()
        {
            err(
                "intercept.accelerate_backlog".into(),
                "must be under 4GiB (the kernel's own count of a socket's bytes is 32-bit)",
            );
        }
        if self.services.is_empty() {
            err("service".into(), "at least one [[service]] is required");
        }
        let mut names = HashSet::new();
        for (i, u) in self.upstreams.iter().enumerate() {
            let at = |k: &str| format!("upstream[{i}].{k}");
            if u.name.is_empty() {
                err(at("name"), "must not be empty");
            } else if !names.insert(u.name.as_str()) {
                err(at("name"), &format!("duplicate upstream name {:?}", u.name));
            }
            check_upstream(i, u, &mut err);
        }
        let known = |name: &str| self.upstreams.iter().any(|u| u.name == name);
        let mut service_names = HashSet::new();
        let mut listens = HashSet::new();
        let mut vips = HashSet::new();
        for (i, s) in self.services.iter().enumerate() {
            let at = |k: &str| format!("service[{i}].{k}");
            if s.name.is_empty() {
                err(at("name"), "must not be empty");
            } else if !service_names.insert(s.name.as_str()) {
                err(at("name"), &format!("duplicate service name {:?}", s.name));
            }
            if !listens.insert(s.listen) {
                err(
                    at("listen"),
                    &format!("{} is already used by another service", s.listen),
                );
            }
            for (j, vip) in s.vips.iter().enumerate() {
                if !vips.insert(*vip) {
                    err(
                        format!("service[{i}].vips[{j}]"),
                        &format!("{vip} is listed twice"),
                    );
                }
            }
            check_service(i, s, &known, &mut err);
        }
        p
    }

    /// Settings that are valid but risky, each as one sentence for `check` and the start-up
    /// log.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(admin) = &self.admin
            && !admin.listen.ip().is_loopback()
        {
            out.push(format!(
                "admin.listen = {} is reachable from beyond this host, and the admin endpoint can \
                 reload the config and change interception (POST /reload, /cgroups){}",
                admin.listen,
                if admin.token_file.is_some() {
                    "; only token_file guards it"
                } else {
                    ": keep it on loopback, or set [admin] token_file"
                }
            ));
        }
        out
    }

    /// Features present in this file that this build does not enforce yet. Running with them
    /// would silently ignore them (an auth setting that isn't enforced is a hole), so `run`
    /// refuses and `check` warns.
    pub fn unsupported_features(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (i, s) in self.services.iter().enumerate() {
            // A standalone upstream without `replicas` has nowhere else to read from.
            let no_replicas = |name: &str| {
                self.upstream(name)
                    .is_some_and(|u| u.mode == Mode::Standalone && u.replicas.is_empty())
            };
            if s.read_policy != ReadPolicy::Master && no_replicas(&s.upstream) {
                out.push(format!(
                    "service[{i}].read_policy (only meaningful for a cluster, a sentinel upstream or one with replicas)"
                ));
            }
            for (j, r) in s.routes.iter().enumerate() {
                if r.read_policy.is_some_and(|p| p != ReadPolicy::Master)
                    && no_replicas(&r.upstream)
                {
                    out.push(format!(
                        "service[{i}].route[{j}].read_policy (only meaningful for a cluster, a sentinel upstream or one with replicas)"
                    ));
                }
            }
        }
        out
    }

    /// The configuration of the upstream called `name`.
    pub fn upstream(&self, name: &str) -> Option<&UpstreamConfig> {
        self.upstreams.iter().find(|u| u.name == name)
    }

    /// The configuration of the service called `name`.
    pub fn service(&self, name: &str) -> Option<&ServiceConfig> {
        self.services.iter().find(|s| s.name == name)
    }
}

fn check_mirror(
    m: &MirrorConfig,
    at: &str,
    known: &dyn Fn(&str) -> bool,
    err: &mut dyn FnMut(String, &str),
) {
    if !known(&m.upstream) {
        err(
            format!("{at}.upstream"),
            &format!("no [[upstream]] is named {:?}", m.upstream),
        );
    }
    if !(0.0..=100.0).contains(&m.percentage) {
        err(format!("{at}.percentage"), "must be between 0 and 100");
    }
}

/// The rules of one `[[upstream]]` on its own (names are checked across upstreams).
fn check_upstream(i: usize, u: &UpstreamConfig, err: &mut dyn FnMut(String, &str)) {
    let at = |k: &str| format!("upstream[{i}].{k}");
    if u.nodes.is_empty() {
        err(at("nodes"), "needs at least one host:port");
    }
    for (j, node) in u.nodes.iter().enumerate() {
        if let Err(e) = split_host_port(node) {
            err(format!("upstream[{i}].nodes[{j}]"), &e);
        }
    }
    if u.mode == Mode::Standalone && u.nodes.len() > 1 {
        err(at("nodes"), "a standalone upstream has exactly one node");
    }
    for (j, replica) in u.replicas.iter().enumerate() {
        if let Err(e) = split_host_port(replica) {
            err(format!("upstream[{i}].replicas[{j}]"), &e);
        }
    }
    match u.mode {
        Mode::Standalone => {}
        Mode::Sentinel if !u.replicas.is_empty() => err(
            at("replicas"),
            "a sentinel upstream's replicas come from its sentinels",
        ),
        Mode::Sentinel => {}
        Mode::Cluster if !u.replicas.is_empty() => err(
            at("replicas"),
            "a cluster upstream's replicas come from its topology",
        ),
        Mode::Cluster => {}
    }
    match (u.mode, &u.master_name) {
        (Mode::Sentinel, None) => err(at("master_name"), "a sentinel upstream needs one"),
        (Mode::Sentinel, Some(n)) if n.is_empty() => {
            err(at("master_name"), "must not be empty");
        }
        (Mode::Standalone | Mode::Cluster, Some(_)) => {
            err(at("master_name"), "only a sentinel upstream has one");
        }
        _ => {}
    }
    let sentinel_keys = [
        ("sentinel_username", u.sentinel_username.is_some()),
        ("sentinel_password_file", u.sentinel_password_file.is_some()),
        ("sentinel_password_env", u.sentinel_password_env.is_some()),
    ];
    for (key, set) in sentinel_keys {
        if set && u.mode != Mode::Sentinel {
            err(at(key), "only a sentinel upstream has one");
        }
    }
    if u.sentinel_password_file.is_some() && u.sentinel_password_env.is_some() {
        err(
            at("sentinel_password_env"),
            "set sentinel_password_file or sentinel_password_env, not both",
        );
    }
    if u.sentinel_username.is_some()
        && u.sentinel_password_file.is_none()
        && u.sentinel_password_env.is_none()
    {
        err(
            at("sentinel_username"),
            "needs sentinel_password_file or sentinel_password_env",
        );
    }
    if u.password_file.is_some() && u.password_env.is_some() {
        err(
            at("password_env"),
            "set password_file or password_env, not both",
        );
    }
    if u.username.is_some() && u.password_file.is_none() && u.password_env.is_none() {
        err(at("username"), "needs password_file or password_env");
    }
    if u.connections_per_node == 0 {
        err(at("connections_per_node"), "must be at least 1");
    }
    if u.databases == 0 {
        err(at("databases"), "must be at least 1");
    }
    if u.connect_timeout.0.is_zero() {
        err(at("connect_timeout"), "must be more than 0");
    }
}

/// The rules of one `[[service]]` on its own (names, listeners and VIPs are checked across
/// services); `known` says whether an upstream name exists.
fn check_service(
    i: usize,
    s: &ServiceConfig,
    known: &dyn Fn(&str) -> bool,
    err: &mut dyn FnMut(String, &str),
) {
    let at = |k: &str| format!("service[{i}].{k}");
    if !known(&s.upstream) {
        err(
            at("upstream"),
            &format!("no [[upstream]] is named {:?}", s.upstream),
        );
    }
    if s.op_timeout.0.is_zero() {
        err(at("op_timeout"), "must be more than 0");
    }
    if s.max_clients == 0 {
        err(at("max_clients"), "must be at least 1");
    }
    if s.max_pipeline == 0 {
        err(at("max_pipeline"), "must be at least 1");
    }
    if s.reply_window.0 == 0 {
        err(at("reply_window"), "must be more than 0");
    }
    if s.big_reply_budget.0 == 0 {
        err(at("big_reply_budget"), "must be more than 0");
    }
    if let Some(acl) = &s.acl
        && let Err(e) = crate::command::acl::Acl::compile(&acl.rules)
    {
        err(at("acl.rules"), &e);
    }
    if let Some(a) = &s.auth
        && a.passwords.is_empty()
        && a.password_file.is_none()
    {
        err(
            format!("service[{i}].auth"),
            "needs passwords or password_file",
        );
    }
    for (j, r) in s.routes.iter().enumerate() {
        if !known(&r.upstream) {
            err(
                format!("service[{i}].route[{j}].upstream"),
                &format!("no [[upstream]] is named {:?}", r.upstream),
            );
        }
        for (k, m) in r.mirrors.iter().enumerate() {
            check_mirror(
                m,
                &format!("service[{i}].route[{j}].mirror[{k}]"),
                known,
                err,
            );
        }
    }
    for (j, m) in s.mirrors.iter().enumerate() {
        check_mirror(m, &format!("service[{i}].mirror[{j}]"), known, err);
    }
    for (j, f) in s.faults.iter().enumerate() {
        let at = |k: &str| format!("service[{i}].fault[{j}].{k}");
        if !(0.0..=100.0).contains(&f.percentage) {
            err(at("percentage"), "must be between 0 and 100");
        }
        if f.kind == FaultKind::Delay && f.delay.is_none() {
            err(at("delay"), "is required for kind = \"delay\"");
        }
    }
}
