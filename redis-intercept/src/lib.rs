//! redis-intercept: a node-level transparent Redis proxy.
//!
//! # Layout
//! Lower layers never import higher ones.
//! - [`resp`]: bytes ⇄ RESP frames, with limits.
//! - [`command`]: the Redis command table and how the proxy handles each command.
//! - [`cluster`]: Redis Cluster slots, slot maps and redirects (pure logic).
//! - [`route`]: where a request goes on a cluster: slots, splits, read policy (pure logic).
//! - [`config`]: the TOML configuration and its validation.
//! - [`signal`]: a cheap single-threaded wake-up flag.
//! - [`intercept`]: the eBPF programs: load, attach, maps, per-cgroup settings.
//! - [`upstream`]: shared pipelined connections to Redis nodes.
//! - [`session`]: one client connection.
//! - [`metrics`]: Prometheus metrics.
//! - [`admin`]: the local HTTP endpoint (`/metrics`, `/ready`, `/config`).
//! - [`app`]: binding, worker threads, shutdown.
pub mod admin;
pub mod app;
pub mod cluster;
pub mod command;
pub mod config;
pub mod intercept;
pub mod locks;
pub mod metrics;
pub mod resp;
pub mod route;
pub mod service;
pub mod session;
pub mod upstream;
pub mod wake;
