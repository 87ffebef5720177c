//! `[[service]]`: what clients see (listener, VIPs, read policy, limits, client auth, routes,
//! mirrors, faults), with its defaults.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize, Serializer};

use super::{ByteSize, Dur};

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
    /// Most reply bytes one client may have owed by upstreams at once, estimated from the
    /// sizes of its recent replies; past it the proxy sends none of its requests until
    /// replies come in. Keeps one client's pipeline of big replies from filling a shared
    /// connection ahead of everyone else.
    #[serde(default = "default_reply_window")]
    pub reply_window: ByteSize,
    /// Most reply bytes owed at once, per worker, to clients whose replies are big (or not
    /// yet known). It bounds what Redis buffers for the proxy's connections
    /// (`omem`) whatever such clients send.
    #[serde(default = "default_big_reply_budget")]
    pub big_reply_budget: ByteSize,
    /// Client-facing authentication; absent: clients need no password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<AuthConfig>,
    /// Without `auth`: what AUTH from a client gets. "accept" (OK, so apps that still send
    /// the old password keep working after it moved into the proxy) or "reject" (Redis's own
    /// error for AUTH without a configured password).
    #[serde(default)]
    pub legacy_auth: LegacyAuth,
    /// Which commands the service's clients may run, in Redis's ACL rule syntax
    /// (`rules = "+@all -@admin -flushall"`). Absent: every command, with the upstream
    /// user's own ACL as the only limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acl: Option<AclConfig>,
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
fn default_reply_window() -> ByteSize {
    ByteSize(1024 * 1024)
}
fn default_big_reply_budget() -> ByteSize {
    ByteSize(4 * 1024 * 1024)
}

/// A service's command policy (`[service.acl]`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AclConfig {
    /// Rules such as `+@all -@admin -flushall`, applied left to right from no commands.
    pub rules: String,
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
