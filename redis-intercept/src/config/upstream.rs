//! `[[upstream]]`: how to reach one Redis deployment (mode, nodes, credentials, TLS,
//! timeouts, topology refresh), with its defaults.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{ByteSize, Dur};

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
