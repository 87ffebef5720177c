//! redis-intercept: a node-level transparent Redis proxy.
//!
//! # Layout
//! - [`resp`]: bytes ⇄ RESP frames, with limits.
//! - [`command`]: the Redis command table and how the proxy handles each command.
pub mod command;
pub mod resp;
