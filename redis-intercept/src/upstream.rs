//! Connections to Redis nodes: a few shared, pipelined connections per node and worker, each
//! matching replies to requests in FIFO order.
//!
//! Many clients' requests are appended to one connection's write buffer and sent in one write
//! as soon as the socket takes them (no flush timer), so N non-pipelined clients become one
//! pipelined stream for Redis. Replies are cut at frame boundaries and handed back as the bytes
//! Redis sent. Each connection is driven by one task on its worker's single-threaded runtime,
//! so the shared state needs no locks.
//!
//! Dedicated connections (transactions, blocking commands) are the same machinery with one
//! user and no reconnect, lent out by [`dedicated::DedicatedPool`]. [`cluster_nodes`] keeps the
//! connections of a cluster upstream and its slot map.

pub mod cluster_nodes;
mod cluster_status;
mod conn;
mod connect;
pub mod dedicated;
mod driver;
mod error;
pub mod lanes;
pub mod owned;
pub mod sentinel;
mod sink;
pub mod standalone;
pub mod tls;
pub mod tracking_listener;

use bytes::Bytes;

pub use conn::NodeConn;
pub use connect::{ConnSettings, PasswordSource, ServerVersion, UpstreamAuth, one_command};
pub(crate) use connect::{open, read_replies};
pub use error::UpstreamError;
pub use sink::{Reply, ReplySink, ReplyTo};

/// A RESP error reply `-ERR <message>\r\n`.
pub fn error_reply(message: &str) -> Bytes {
    Bytes::from(format!("-ERR {message}\r\n"))
}
