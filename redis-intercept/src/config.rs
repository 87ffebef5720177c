//! The TOML configuration: model, defaults, and validation with errors that name the file,
//! the key path and the problem.
//!
//! Split as Aeraki does: `[[upstream]]` says how to reach a Redis deployment, `[[service]]`
//! says what clients see. Durations are strings ("5s", "250ms"); sizes are bytes or strings
//! ("64MiB").

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

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
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            workers: 0,
            reuse_port: true,
            drain_timeout: default_drain_timeout(),
            watch_config: default_watch_config(),
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

/// How an upstream is deployed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// A Redis Cluster; `nodes` are seeds.
    Cluster,
    /// One Redis server.
    Standalone,
    /// One Redis server whose address Redis Sentinel gives: `nodes` are sentinels, asked
    /// for the master of `master_name`; a failover moves the proxy to the new master.
    Sentinel,
}

/// How to reach one Redis deployment (`[[upstream]]`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Name services, routes and mirrors refer to.
    pub name: String,
    /// Cluster or standalone.
    pub mode: Mode,
    /// `host:port` of the server (standalone), the seed nodes (cluster) or the sentinels
    /// (sentinel).
    pub nodes: Vec<String>,
    /// Sentinel: the name the sentinels monitor the master under.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub master_name: Option<String>,
    /// Sentinel: the ACL user the proxy authenticates to the sentinels as.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sentinel_username: Option<String>,
    /// Sentinel: file holding the sentinels' own password (their `requirepass`), read at
    /// each question.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sentinel_password_file: Option<PathBuf>,
    /// Sentinel: environment variable holding the sentinels' password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sentinel_password_env: Option<String>,
    /// Sentinel: the master the sentinels reported, filled in by the proxy (shown at
    /// `/config`; a change gives the upstream new connections, as a reload does).
    #[serde(default, skip_deserializing, skip_serializing_if = "Option::is_none")]
    pub master: Option<String>,
    /// The server's replicas, where reads go under a `read_policy` other than `master`.
    /// Standalone: set in the file (`host:port`, e.g. a managed service's reader endpoint).
    /// Sentinel: filled in by the proxy with the replicas the sentinels list as up and in
    /// sync (the file may not set it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replicas: Vec<String>,
    /// ACL user the proxy authenticates as.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// File holding the upstream password (as Kubernetes mounts a Secret).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// Environment variable holding the upstream password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_env: Option<String>,
    /// TLS to the upstream; absent: plain TCP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
    /// Longest time one connection attempt may take.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: Dur,
    /// Shared pipelined connections per node and worker thread.
    #[serde(default = "default_connections_per_node")]
    pub connections_per_node: usize,
    /// Longest wait between reconnection attempts (the backoff doubles from 50ms up to this).
    #[serde(default = "default_backoff_max")]
    pub reconnect_backoff_max: Dur,
    /// Largest amount of request bytes queued for one upstream connection before new
    /// requests are refused with an error.
    #[serde(default = "default_upstream_backlog")]
    pub max_pending_bytes: ByteSize,
    /// Cluster: how often the slot map is refreshed. Sentinel: how often the sentinels are
    /// asked for the master.
    #[serde(default = "default_refresh_interval")]
    pub refresh_interval: Dur,
    /// Cluster: redirects or connection failures that trigger an early refresh.
    #[serde(default = "default_redirect_refresh_threshold")]
    pub redirect_refresh_threshold: u32,
    /// Cluster: shortest time between two refreshes triggered by redirects or failures.
    #[serde(default = "default_redirect_refresh_interval")]
    pub redirect_refresh_interval: Dur,
    /// Standalone: the server's `databases` setting. `SELECT` of a database below it gets
    /// connections of its own; others get Redis's out-of-range error from the proxy.
    #[serde(default = "default_databases")]
    pub databases: u32,
    /// Clean connections kept idle per node (and database) and worker for the next
    /// transaction or blocking command, instead of a connect each time.
    #[serde(default = "default_max_idle_dedicated")]
    pub max_idle_dedicated: usize,
}

fn default_max_idle_dedicated() -> usize {
    8
}

fn default_databases() -> u32 {
    16
}
fn default_connect_timeout() -> Dur {
    Dur(Duration::from_secs(1))
}
fn default_connections_per_node() -> usize {
    1
}
fn default_backoff_max() -> Dur {
    Dur(Duration::from_secs(2))
}
fn default_upstream_backlog() -> ByteSize {
    ByteSize(256 * 1024 * 1024)
}
fn default_refresh_interval() -> Dur {
    Dur(Duration::from_secs(5))
}
fn default_redirect_refresh_threshold() -> u32 {
    5
}
fn default_redirect_refresh_interval() -> Dur {
    Dur(Duration::from_secs(1))
}

/// TLS settings of an upstream.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM bundle of CAs trusted for the server certificate; default: system roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Name checked against the server certificate; default: the node's host.
    #[serde(default)]
    pub server_name: Option<String>,
    /// Client certificate (PEM) for mutual TLS.
    #[serde(default)]
    pub client_cert_file: Option<PathBuf>,
    /// Client key (PEM) for mutual TLS.
    #[serde(default)]
    pub client_key_file: Option<PathBuf>,
    /// Accept any server certificate. For tests only.
    #[serde(default)]
    pub insecure_skip_verify: bool,
}

/// Where replicas may serve reads (Envoy's `read_policy`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReadPolicy {
    /// Reads go to masters.
    #[default]
    Master,
    /// Masters, replicas when no master is reachable.
    PreferMaster,
    /// Replicas only.
    Replica,
    /// Replicas, masters when no replica is reachable.
    PreferReplica,
    /// Any node of the shard.
    Any,
}

/// What clients see (`[[service]]`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// Name used in logs and metrics.
    pub name: String,
    /// The proxy listener for this service (also the redirect target of its VIPs).
    pub listen: SocketAddr,
    /// Addresses clients connect to, intercepted when `[intercept]` is on.
    #[serde(default)]
    pub vips: Vec<SocketAddr>,
    /// The upstream serving every key no route claims.
    pub upstream: String,
    /// Where reads go in a cluster.
    #[serde(default)]
    pub read_policy: ReadPolicy,
    /// Longest time a request may wait for its reply before the client gets an error.
    #[serde(default = "default_op_timeout")]
    pub op_timeout: Dur,
    /// Most clients connected at once; more are refused with Redis's own error.
    #[serde(default = "default_max_clients")]
    pub max_clients: usize,
    /// Close a client idle this long; "0s" (the default) never does.
    #[serde(default)]
    pub idle_timeout: Dur,
    /// Most reply bytes held for one client that doesn't read them; over it the client is
    /// disconnected (a slow reader must not grow the proxy without bound).
    #[serde(default = "default_max_client_buffer")]
    pub max_client_buffer: ByteSize,
    /// Most requests of one client in flight at once; the proxy stops reading that client
    /// until replies drain (back pressure, not an error).
    #[serde(default = "default_max_pipeline")]
    pub max_pipeline: usize,
    /// Client-facing authentication; absent: clients need no password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<AuthConfig>,
    /// Without `auth`: what AUTH from a client gets. "accept" (OK, so apps that still send
    /// the old password keep working after it moved into the proxy) or "reject" (Redis's own
    /// error for AUTH without a configured password).
    #[serde(default)]
    pub legacy_auth: LegacyAuth,
    /// Count calls and reply latency per command (`command_calls_total`,
    /// `command_duration_seconds`). Off by default: it reads the clock once per reply.
    #[serde(default)]
    pub command_stats: bool,
    /// Key-prefix routes; longest prefix wins.
    #[serde(default, rename = "route", skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<RouteConfig>,
    /// Traffic mirrors.
    #[serde(default, rename = "mirror", skip_serializing_if = "Vec::is_empty")]
    pub mirrors: Vec<MirrorConfig>,
    /// Fault injection rules.
    #[serde(default, rename = "fault", skip_serializing_if = "Vec::is_empty")]
    pub faults: Vec<FaultConfig>,
}

fn default_op_timeout() -> Dur {
    Dur(Duration::from_secs(5))
}
fn default_max_clients() -> usize {
    10_000
}
fn default_max_client_buffer() -> ByteSize {
    ByteSize(64 * 1024 * 1024)
}
fn default_max_pipeline() -> usize {
    1024
}

/// Client-facing authentication of a service.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// ACL-style user name for `AUTH user pass`.
    #[serde(default)]
    pub username: Option<String>,
    /// Accepted passwords (several, for rotation).
    #[serde(default, serialize_with = "redact_list")]
    pub passwords: Vec<String>,
    /// File with one accepted password per line.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
}

/// What AUTH gets on a service without client-facing auth.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LegacyAuth {
    /// Answer OK.
    #[default]
    Accept,
    /// Answer Redis's error for AUTH without a configured password.
    Reject,
}

impl AuthConfig {
    /// Every accepted password: the `passwords` list, then each non-empty line of
    /// `password_file`.
    ///
    /// # Errors
    /// The file can't be read, or no password results.
    pub fn load_passwords(&self) -> Result<Vec<String>, String> {
        let mut all = self.passwords.clone();
        if let Some(path) = &self.password_file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read password_file {}: {e}", path.display()))?;
            all.extend(
                text.lines()
                    .map(|l| l.trim_end_matches('\r'))
                    .filter(|l| !l.is_empty())
                    .map(str::to_owned),
            );
        }
        if all.is_empty() {
            return Err(
                "no password configured (passwords is empty and password_file has no line)".into(),
            );
        }
        Ok(all)
    }
}

/// A key-prefix route of a service.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Keys starting with this go to `upstream`.
    pub prefix: String,
    /// Upstream for those keys.
    pub upstream: String,
    /// Strip the prefix before sending.
    #[serde(default)]
    pub remove_prefix: bool,
    /// Match the prefix ignoring ASCII case.
    #[serde(default)]
    pub case_insensitive: bool,
    /// Read policy for this route; default: the service's.
    #[serde(default)]
    pub read_policy: Option<ReadPolicy>,
    /// Mirrors for this route.
    #[serde(default, rename = "mirror")]
    pub mirrors: Vec<MirrorConfig>,
}

/// A traffic mirror.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MirrorConfig {
    /// Upstream receiving the copies.
    pub upstream: String,
    /// Share of requests copied, 0 to 100.
    #[serde(default = "hundred")]
    pub percentage: f64,
    /// Copy writes only.
    #[serde(default)]
    pub exclude_reads: bool,
    /// Most request bytes queued for the mirror per connection; copies beyond it (or while
    /// the mirror is down) are dropped and counted, never waited for.
    #[serde(default = "default_mirror_queue")]
    pub max_queue: ByteSize,
    /// How long copies gather (at most 64 KiB of them) before they are written to the
    /// mirror. Mirror replies are never waited for, so a short wait costs nothing and turns
    /// many small writes (and wake-ups of the mirror's Redis) into one. "0s": write at once.
    #[serde(default = "default_mirror_batch_delay")]
    pub batch_delay: Dur,
}

fn default_mirror_batch_delay() -> Dur {
    Dur(Duration::from_millis(1))
}

fn default_mirror_queue() -> ByteSize {
    ByteSize(16 * 1024 * 1024)
}

fn hundred() -> f64 {
    100.0
}

/// Kind of injected fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FaultKind {
    /// Reply with an error instead of forwarding.
    Error,
    /// Forward after a delay.
    Delay,
}

/// A fault injection rule.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FaultConfig {
    /// Error or delay.
    pub kind: FaultKind,
    /// Share of matching requests affected, 0 to 100.
    pub percentage: f64,
    /// Commands affected; empty: all but AUTH and PING.
    #[serde(default)]
    pub commands: Vec<String>,
    /// Only keys starting with this.
    #[serde(default)]
    pub key_prefix: Option<String>,
    /// Delay for `kind = "delay"`.
    #[serde(default)]
    pub delay: Option<Dur>,
    /// Error text for `kind = "error"`.
    #[serde(default)]
    pub message: Option<String>,
}

fn redact_list<S: Serializer>(list: &[String], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(list.iter().map(|_| "<redacted>"))
}

/// A duration written as a string with a unit: "250ms", "5s", "1m", "1h".
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl Dur {
    /// The duration, or `None` when it is zero ("off").
    pub fn non_zero(self) -> Option<Duration> {
        (!self.0.is_zero()).then_some(self.0)
    }
}

/// Parses "250ms", "5s", "1.5s", "2m", "1h", "0".
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    if t == "0" {
        return Ok(Duration::ZERO);
    }
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| format!("duration {text:?} needs a unit (ms, s, m, h)"))?;
    let (num, unit) = t.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("duration {text:?} does not start with a number"))?;
    let secs = match unit {
        "us" => value / 1e6,
        "ms" => value / 1e3,
        "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => {
            return Err(format!(
                "duration {text:?} has unknown unit {unit:?} (use ms, s, m, h)"
            ));
        }
    };
    Duration::try_from_secs_f64(secs).map_err(|_| format!("duration {text:?} is out of range"))
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        parse_duration(&text)
            .map(Dur)
            .map_err(serde::de::Error::custom)
    }
}

impl Serialize for Dur {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{}ms", self.0.as_millis()))
    }
}

/// A size in bytes, written as a number or a string with a unit: "64MiB", "512KiB", "1GB".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub usize);

/// Parses "1024", "64KiB", "64MiB", "1GiB", "10MB", "5KB", "1GB".
pub fn parse_size(text: &str) -> Result<usize, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: usize = num
        .parse()
        .map_err(|_| format!("size {text:?} does not start with a whole number"))?;
    let mult: usize = match unit.trim() {
        "" | "B" => 1,
        "KB" => 1000,
        "KiB" => 1 << 10,
        "MB" => 1000 * 1000,
        "MiB" => 1 << 20,
        "GB" => 1000 * 1000 * 1000,
        "GiB" => 1 << 30,
        other => {
            return Err(format!(
                "size {text:?} has unknown unit {other:?} (use B, KiB, MiB, GiB, KB, MB, GB)"
            ));
        }
    };
    value
        .checked_mul(mult)
        .ok_or_else(|| format!("size {text:?} is too large"))
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Number(n) => usize::try_from(n)
                .map(ByteSize)
                .map_err(|_| serde::de::Error::custom("size is too large")),
            Raw::Text(t) => parse_size(&t)
                .map(ByteSize)
                .map_err(serde::de::Error::custom),
        }
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0 as u64)
    }
}

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
                        &known,
                        &mut err,
                    );
                }
            }
            for (j, m) in s.mirrors.iter().enumerate() {
                check_mirror(m, &format!("service[{i}].mirror[{j}]"), &known, &mut err);
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
        p
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

/// Splits `host:port` (or `[v6]:port`).
///
/// # Errors
/// A message saying what is malformed.
pub fn split_host_port(node: &str) -> Result<(String, u16), String> {
    let (host, port) = node
        .rsplit_once(':')
        .ok_or_else(|| format!("{node:?} is not host:port"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(format!("{node:?} has no host"));
    }
    let port: u16 = port
        .parse()
        .ok()
        .filter(|&p| p != 0)
        .ok_or_else(|| format!("{node:?} has no valid port"))?;
    Ok((host.to_owned(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [[upstream]]
        name = "main"
        mode = "standalone"
        nodes = ["127.0.0.1:6379"]

        [[service]]
        name = "cache"
        listen = "127.0.0.1:16379"
        upstream = "main"
    "#;

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
