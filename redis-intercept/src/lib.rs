//! redis-intercept: a node-level transparent Redis proxy.
//!
//! # Layout
//! Lower layers never import higher ones; ARCHITECTURE.md has a line for every file.
//! - [`resp`]: bytes ⇄ RESP frames, with limits.
//! - [`wake`], [`locks`]: a single-threaded wake-up flag; locks with poisoning recovered.
//! - [`budget`]: the process-wide budget for client input.
//! - [`command`]: the Redis command table, argument checks, and how the proxy handles each.
//! - [`cluster`]: Redis Cluster slots, slot maps, redirect decisions, SCAN cursor (pure).
//! - [`config`]: the TOML configuration and its validation.
//! - [`route`]: where a request goes: prefixes, slots, splits, read policy (pure).
//! - [`metrics`]: Prometheus metrics.
//! - [`intercept`]: the eBPF programs: load, attach, maps, per-cgroup settings.
//! - [`upstream`]: pipelined connections to Redis nodes, and typed upstream errors.
//! - [`service`]: what one service is at run time, and the builder from config.
//! - [`session`]: one client connection.
//! - [`admin`]: the local HTTP endpoint (`/metrics`, `/ready`, `/config`, …).
//! - [`app`]: binding, worker threads, reload, signals, shutdown.
pub mod admin;
pub mod app;
pub mod budget;
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
pub mod tracking;
pub mod upstream;
pub mod wake;
