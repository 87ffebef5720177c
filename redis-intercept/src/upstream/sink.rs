//! Where replies go: the sink a request names when it is sent, and the reply as it arrives.

use std::rc::Rc;

use bytes::{Bytes, BytesMut};
use tokio::time::Instant;

use super::UpstreamError;

/// Receives the reply to a request. Implemented by client sessions; the upstream side only
/// knows the token it was given.
///
/// Replies arrive in batches (everything one upstream read produced). A sink that returns true
/// from `deliver` gets one `flush` call after the batch, so it can write all of a client's
/// replies from that batch in one system call.
pub trait ReplySink {
    /// Hands over the reply (or an error reply the proxy made) for request `token`. Returns
    /// true if the sink wants [`ReplySink::flush`] at the end of the current batch (at most
    /// once per batch).
    fn deliver(&self, token: u64, reply: Reply<'_>) -> bool;
    /// Called after a batch for every sink whose `deliver` asked for it.
    fn flush(&self);
    /// Whether replies are still owed to this sink after the ones delivered so far. Such a
    /// sink's flush waits until the other connections that became readable at the same time
    /// have delivered too, so a client whose pipeline spans several nodes gets one write, not
    /// one per node.
    fn expects_more(&self) -> bool {
        false
    }
    /// The request `token` failed on its connection without a reply from the node: its
    /// error reply, by default. A sink that can send the request again elsewhere (a cluster
    /// request during a failover) looks at whether it may have run
    /// ([`UpstreamError::never_sent`]).
    fn fail(&self, token: u64, error: &UpstreamError) -> bool {
        self.deliver(token, Reply::Held(error.reply()))
    }
}

/// A reply handed to a [`ReplySink`]. Most sinks copy the reply into a client's output at
/// once, so it stays in the connection's read buffer until then: cutting a `Bytes` out of the
/// buffer for every reply costs an atomic reference count each way (7% of the proxy's CPU
/// with `-P 16`).
pub enum Reply<'a> {
    /// The first `len` bytes of a connection's read buffer.
    InBuffer(&'a mut BytesMut, usize),
    /// A reply the proxy holds: one it made, or one already cut out of a buffer.
    Held(Bytes),
}

impl Reply<'_> {
    /// The reply's RESP bytes.
    pub fn as_slice(&self) -> &[u8] {
        match self {
            Reply::InBuffer(buf, len) => buf.get(..*len).unwrap_or(buf),
            Reply::Held(b) => b,
        }
    }

    /// The reply as `Bytes`, for a sink that keeps it (cut out of the read buffer, which the
    /// connection sees and does not skip it again).
    pub fn into_bytes(self) -> Bytes {
        match self {
            Reply::InBuffer(buf, len) => buf.split_to(len.min(buf.len())).freeze(),
            Reply::Held(b) => b,
        }
    }
}

impl From<Bytes> for Reply<'_> {
    fn from(b: Bytes) -> Self {
        Reply::Held(b)
    }
}

/// Where one request's reply goes: the sink, the token the sink knows the request by, and
/// when the client stops waiting for it.
#[derive(Clone)]
pub struct ReplyTo {
    /// Who gets the reply.
    pub sink: Rc<dyn ReplySink>,
    /// The sink's name for the request.
    pub token: u64,
    /// Past this the connection is reset and the request gets a timeout error.
    pub deadline: Instant,
}

impl ReplyTo {
    /// Where `sink`'s request `token` gets its reply, awaited until `deadline`.
    pub fn new(sink: Rc<dyn ReplySink>, token: u64, deadline: Instant) -> ReplyTo {
        ReplyTo {
            sink,
            token,
            deadline,
        }
    }

    /// Hands `reply` to the sink (an error made in place of the request's reply); flushes
    /// when the sink asks for it.
    pub fn answer(&self, reply: Bytes) {
        if self.sink.deliver(self.token, reply.into()) {
            self.sink.flush();
        }
    }
}
