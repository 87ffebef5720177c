//! The TOML configuration: model, defaults, and validation with errors that name the file,
//! the key path and the problem.
//!
//! Split as Aeraki does: `[[upstream]]` says how to reach a Redis deployment, `[[service]]`
//! says what clients see. Durations are strings ("5s", "250ms"); sizes are bytes or strings
//! ("64MiB").

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

mod service;
mod units;
mod upstream;
mod validate;

pub use service::{
    AuthConfig, FaultConfig, FaultKind, LegacyAuth, MirrorConfig, ReadPolicy, RouteConfig,
    ServiceConfig,
};
pub use units::{ByteSize, Dur, NodeAddr, parse_duration, parse_size, split_host_port};
pub use upstream::{Mode, TlsConfig, UpstreamConfig};

/// Every problem found in one configuration file.
#[derive(Debug, thiserror::Error)]
pub struct Error {
    /// File the configuration came from (or `<command line>`).
    pub file: String,
    /// Each problem as (key path, message).
    pub problems: Vec<(String, String)>,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (path, msg)) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            if path.is_empty() {
                write!(f, "{}: {msg}", self.file)?;
            } else {
                write!(f, "{}: {path}: {msg}", self.file)?;
            }
        }
        Ok(())
    }
}

/// `message` with the line and column of `e` in `text`. The offending line itself is not
/// quoted, as toml's own rendering does: it may hold a password, and reload errors are logged.
fn located(text: &str, e: &toml::de::Error, message: &str) -> String {
    let message = message.trim_end();
    let Some(at) = e.span().map(|r| r.start.min(text.len())) else {
        return message.to_owned();
    };
    let before = text.get(..at).unwrap_or_default();
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    format!("line {line}, column {column}: {message}")
}

/// The whole configuration file.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Process-wide settings.
    #[serde(default)]
    pub proxy: ProxyConfig,
    /// Local HTTP endpoint for metrics, readiness and state; absent: no admin listener.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin: Option<AdminConfig>,
    /// eBPF interception; absent: plain proxy, no eBPF.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub intercept: Option<InterceptConfig>,
    /// Redis deployments the proxy talks to.
    #[serde(default, rename = "upstream")]
    pub upstreams: Vec<UpstreamConfig>,
    /// What clients connect to.
    #[serde(default, rename = "service")]
    pub services: Vec<ServiceConfig>,
}

/// Process-wide settings (`[proxy]`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    /// Worker threads, each with its own event loop and upstream connections; 0 means one
    /// per CPU.
    #[serde(default)]
    pub workers: usize,
    /// Give every worker its own listening socket (`SO_REUSEPORT`), so the kernel spreads
    /// connections evenly over workers. Off: the workers share one socket, and whichever is
    /// awake takes a connection, which can put a whole connection pool on one worker.
    #[serde(default = "yes")]
    pub reuse_port: bool,
    /// How long shutdown waits for clients to receive the replies they are owed.
    #[serde(default = "default_drain_timeout")]
    pub drain_timeout: Dur,
    /// How often the running proxy reads its config file, and the client `password_file`s
    /// it names, and reloads (as SIGHUP does) when one has changed: an updated Kubernetes
    /// ConfigMap or Secret then applies with no signal. `"0s"`: only SIGHUP reloads.
    #[serde(default = "default_watch_config")]
    pub watch_config: Dur,
    /// Most unparsed input one client may hold (Redis's `client-query-buffer-limit`); a
    /// client past it is closed, as Redis does.
    #[serde(default = "default_client_query_buffer_limit")]
    pub client_query_buffer_limit: ByteSize,
    /// Most unparsed input all clients together may hold. Once it is spent, clients holding
    /// much stop being read (one at a time finishes its request); ordinary commands go on.
    #[serde(default = "default_query_buffer_budget")]
    pub query_buffer_budget: ByteSize,
    /// Most keys the proxy remembers as read by tracking clients (`CLIENT TRACKING`), over
    /// all workers, like Redis's `tracking-table-max-keys`: past it, keys are forgotten by
    /// sending their readers an invalidation.
    #[serde(default = "default_tracking_table_max_keys")]
    pub tracking_table_max_keys: usize,
}

fn default_tracking_table_max_keys() -> usize {
    1_000_000
}

impl ProxyConfig {
    /// The worker threads to run: `workers`, or one per CPU.
    pub fn worker_count(&self) -> usize {
        match self.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }
}

fn default_client_query_buffer_limit() -> ByteSize {
    ByteSize(1024 * 1024 * 1024)
}

fn default_query_buffer_budget() -> ByteSize {
    ByteSize(512 * 1024 * 1024)
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            workers: 0,
            reuse_port: true,
            drain_timeout: default_drain_timeout(),
            watch_config: default_watch_config(),
            client_query_buffer_limit: default_client_query_buffer_limit(),
            query_buffer_budget: default_query_buffer_budget(),
            tracking_table_max_keys: default_tracking_table_max_keys(),
        }
    }
}

fn default_watch_config() -> Dur {
    Dur(Duration::from_secs(10))
}

fn default_drain_timeout() -> Dur {
    Dur(Duration::from_secs(5))
}

/// The admin HTTP endpoint (`[admin]`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Address of the admin listener; keep it on loopback.
    pub listen: SocketAddr,
    /// A file whose first line is a bearer token that every endpoint but `/ready` and
    /// `/metrics` then needs (`Authorization: Bearer <token>`); read at every request.
    #[serde(default)]
    pub token_file: Option<std::path::PathBuf>,
}

/// Interception settings (`[intercept]`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct InterceptConfig {
    /// cgroup2 directory the programs attach to; default: the cgroup2 mount root.
    #[serde(default)]
    pub cgroup: Option<PathBuf>,
    /// Policy for cgroups with no explicit setting.
    #[serde(default)]
    pub default: OnOff,
    /// cgroups explicitly intercepted at start.
    #[serde(default)]
    pub enable: Vec<PathBuf>,
    /// cgroups explicitly not intercepted at start.
    #[serde(default)]
    pub disable: Vec<PathBuf>,
    /// Where connections from other network namespaces (pods) are sent: a node address every
    /// pod can reach and the services listen on, at most one per address family. Empty: pods'
    /// connections are not redirected (host processes still are).
    #[serde(default)]
    pub pod_addresses: Vec<std::net::IpAddr>,
    /// Attach `getpeername` hooks so redirected sockets report the VIP (Linux 5.8+).
    #[serde(default = "yes")]
    pub getpeername: bool,
    /// Pair both ends of each local connection to a service listener (sock_ops + sk_msg), so
    /// that data between an application and the proxy skips the TCP/IP stack.
    #[serde(default)]
    pub accelerate: bool,
    /// With `accelerate`: unread bytes a paired socket may hold before writes to it go
    /// through TCP, whose receive window then holds the writer back. A paired write skips the
    /// receive buffer, so without a limit a client that stops reading could take kernel memory
    /// until the node's TCP memory limit; `0` sets no limit.
    #[serde(default = "default_accelerate_backlog")]
    pub accelerate_backlog: ByteSize,
}

fn yes() -> bool {
    true
}

fn default_accelerate_backlog() -> ByteSize {
    ByteSize(4 << 20)
}

/// An on/off switch written as "on" or "off".
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnOff {
    /// Enabled.
    On,
    /// Disabled.
    #[default]
    Off,
}

/// The smallest valid config, for unit tests to build on: one standalone upstream `main`
/// and one service `cache` in front of it (its `[[service]]` table is the last, so service
/// settings and sub-tables can follow).
#[cfg(test)]
pub(crate) const MINIMAL: &str = r#"
[[upstream]]
name = "main"
mode = "standalone"
nodes = ["127.0.0.1:6379"]

[[service]]
name = "cache"
listen = "127.0.0.1:16379"
upstream = "main"
"#;

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(text: &str) -> String {
        Config::parse(text, "test.toml").unwrap_err().to_string()
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = Config::parse(MINIMAL, "test.toml").unwrap();
        let s = &c.services[0];
        assert_eq!(s.op_timeout.0, Duration::from_secs(5));
        assert_eq!(s.idle_timeout.non_zero(), None);
        assert_eq!(s.max_client_buffer.0, 64 << 20);
        assert_eq!(c.upstreams[0].connections_per_node, 1);
        assert!(c.unsupported_features().is_empty());
    }

    #[test]
    fn accelerate_backlog_defaults_to_4_mib_and_stays_under_4_gib() {
        let with = |line: &str| format!("[intercept]\naccelerate = true\n{line}\n{MINIMAL}");
        let c = Config::parse(&with(""), "test.toml").unwrap();
        assert_eq!(c.intercept.unwrap().accelerate_backlog.0, 4 << 20);
        let c = Config::parse(&with("accelerate_backlog = \"0\""), "test.toml").unwrap();
        assert_eq!(c.intercept.unwrap().accelerate_backlog.0, 0);
        let e = errors(&with("accelerate_backlog = \"4GiB\""));
        assert!(
            e.contains("intercept.accelerate_backlog") && e.contains("under 4GiB"),
            "{e}"
        );
    }

    #[test]
    fn errors_never_quote_a_password() {
        let with = |line: &str| format!("{MINIMAL}\n        [service.auth]\n        {line}\n");
        for line in [
            "passwords = [\"hunter2\", 5]",
            "passwords = \"hunter2\"",
            "passwords = [\"hunter2\"",
            "passwords = [\"hunter2\"] x",
        ] {
            let e = errors(&with(line));
            assert!(!e.contains("hunter2"), "{line}: {e}");
            assert!(e.contains("line 13, column "), "{line}: {e}");
        }
        let e = errors(&with("passwords = [\"hunter2\", 5]"));
        assert!(e.contains("service[0].auth.passwords[1]"), "{e}");
    }

    #[test]
    fn type_errors_name_file_and_key_path() {
        let bad = MINIMAL.replace("mode = \"standalone\"", "mode = \"clustr\"");
        let e = errors(&bad);
        assert!(e.starts_with("test.toml: upstream[0].mode: "), "{e}");
        assert!(e.contains("unknown variant `clustr`"), "{e}");
        let bad = MINIMAL.replace(
            "upstream = \"main\"",
            "upstream = \"main\"\nop_timeout = \"5 parsecs\"",
        );
        let e = errors(&bad);
        assert!(e.contains("service[0].op_timeout"), "{e}");
        assert!(e.contains("unknown unit"), "{e}");
        let bad = MINIMAL.replace("[[service]]", "[[service]]\nlisten_addr = 1");
        assert!(errors(&bad).contains("unknown field `listen_addr`"));
    }

    #[test]
    fn cross_field_rules() {
        let bad = MINIMAL.replace("upstream = \"main\"", "upstream = \"nope\"");
        assert_eq!(
            errors(&bad),
            "test.toml: service[0].upstream: no [[upstream]] is named \"nope\""
        );
        let e = errors(&MINIMAL.replace("nodes = [\"127.0.0.1:6379\"]", "nodes = [\"localhost\"]"));
        assert!(
            e.contains("upstream[0].nodes[0]: \"localhost\" is not host:port"),
            "{e}"
        );
        let e = errors("[[upstream]]\nname='a'\nmode='standalone'\nnodes=[]\n");
        assert!(
            e.contains("service: at least one [[service]] is required"),
            "{e}"
        );
        assert!(
            e.contains("upstream[0].nodes: needs at least one host:port"),
            "{e}"
        );
    }

    #[test]
    fn a_sentinel_upstream_names_its_master_and_only_it_does() {
        let sentinel = MINIMAL.replace("mode = \"standalone\"", "mode = \"sentinel\"");
        assert!(
            errors(&sentinel).contains("upstream[0].master_name: a sentinel upstream needs one"),
            "{}",
            errors(&sentinel)
        );
        let named = sentinel.replace(
            "mode = \"sentinel\"",
            "mode = \"sentinel\"\nmaster_name = \"cache\"",
        );
        let c = Config::parse(&named, "test.toml").unwrap();
        assert_eq!(c.upstreams[0].master_name.as_deref(), Some("cache"));
        assert_eq!(c.upstreams[0].master, None);
        // `master` is the proxy's to fill in, never the file's.
        let e = errors(&named.replace("master_name", "master"));
        assert!(e.contains("unknown field `master`"), "{e}");
        let e = errors(&MINIMAL.replace(
            "mode = \"standalone\"",
            "mode = \"standalone\"\nmaster_name = \"cache\"",
        ));
        assert!(
            e.contains("upstream[0].master_name: only a sentinel upstream has one"),
            "{e}"
        );
        let e = errors(&named.replace(
            "master_name = \"cache\"",
            "master_name = \"cache\"\nsentinel_username = \"u\"",
        ));
        assert!(
            e.contains("upstream[0].sentinel_username: needs sentinel_password_file or sentinel_password_env"),
            "{e}"
        );
        let e = errors(&MINIMAL.replace(
            "mode = \"standalone\"",
            "mode = \"standalone\"\nsentinel_password_env = \"X\"",
        ));
        assert!(
            e.contains("upstream[0].sentinel_password_env: only a sentinel upstream has one"),
            "{e}"
        );
        let e = errors(&named.replace(
            "master_name = \"cache\"",
            "master_name = \"cache\"\nreplicas = [\"10.0.0.2:6379\"]",
        ));
        assert!(
            e.contains(
                "upstream[0].replicas: a sentinel upstream's replicas come from its sentinels"
            ),
            "{e}"
        );
        let e = errors(&MINIMAL.replace(
            "mode = \"standalone\"",
            "mode = \"standalone\"\nreplicas = [\"nope\"]",
        ));
        assert!(e.contains("upstream[0].replicas[0]"), "{e}");
        let with_replica = MINIMAL.replace(
            "mode = \"standalone\"",
            "mode = \"standalone\"\nreplicas = [\"10.0.0.2:6379\"]",
        );
        let c = Config::parse(&with_replica, "test.toml").unwrap();
        assert_eq!(c.upstreams[0].replicas, vec!["10.0.0.2:6379".to_owned()]);
    }

    #[test]
    fn syntax_errors_point_at_the_line() {
        let e = errors("[[service]\nname = 1");
        assert!(e.starts_with("test.toml: "), "{e}");
        assert!(e.contains("line 1"), "{e}");
    }

    #[test]
    fn durations_and_sizes() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert!(parse_duration("5").is_err());
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("10MB"), Ok(10_000_000));
        assert_eq!(parse_size("100"), Ok(100));
        assert!(parse_size("1TiB").is_err());
    }

    #[test]
    fn features_not_built_yet_are_reported() {
        let text = format!(
            "{MINIMAL}\n[[service.route]]\nprefix = \"a:\"\nupstream = \"main\"\nread_policy = \"replica\"\n"
        );
        let c = Config::parse(&text, "t").unwrap();
        assert_eq!(
            c.unsupported_features(),
            [
                "service[0].route[0].read_policy (only meaningful for a cluster, a sentinel upstream or one with replicas)"
            ]
        );
    }

    #[test]
    fn client_passwords_come_from_the_list_and_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        std::fs::write(&file, "rotated\r\n\nolder\n").unwrap();
        let auth = AuthConfig {
            username: None,
            passwords: vec!["inline".into()],
            password_file: Some(file),
        };
        assert_eq!(
            auth.load_passwords().unwrap(),
            ["inline", "rotated", "older"]
        );
        let missing = AuthConfig {
            username: None,
            passwords: vec![],
            password_file: Some(dir.path().join("nope")),
        };
        assert!(
            missing
                .load_passwords()
                .unwrap_err()
                .contains("cannot read password_file")
        );
    }
}
