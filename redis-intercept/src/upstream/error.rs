//! What can go wrong between the proxy and a node, with the reply a client gets for it and
//! whether the request it hit can be sent again without running twice.

use bytes::Bytes;

/// Why a request could not be served by a node.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamError {
    /// TCP or TLS could not be established (refused, unreachable, timed out, bad
    /// certificate).
    #[error("upstream {addr} unavailable: {reason}")]
    Connect {
        /// The node.
        addr: String,
        /// What the connect attempt said.
        reason: String,
    },
    /// The node refused the handshake (AUTH, READONLY or SELECT).
    #[error("upstream authentication failed: {reason} ({addr})")]
    Auth {
        /// The node.
        addr: String,
        /// The node's answer (never the password).
        reason: String,
    },
    /// An established connection broke, so requests written to it may have run.
    #[error("upstream {addr} unavailable: {reason}")]
    Lost {
        /// The node.
        addr: String,
        /// Why the connection ended.
        reason: String,
    },
    /// The connection has not been up yet.
    #[error("upstream {addr} is not connected yet")]
    NotYet {
        /// The node.
        addr: String,
    },
    /// The connection's queue holds `max_pending_bytes` already.
    #[error("upstream {addr} has too many requests queued")]
    QueueFull {
        /// The node.
        addr: String,
    },
    /// A request waited past its `op_timeout`.
    #[error("operation timed out waiting for upstream {addr}")]
    Timeout {
        /// The node.
        addr: String,
    },
    /// The proxy is stopping.
    #[error("proxy is shutting down")]
    ShuttingDown,
}

impl UpstreamError {
    /// The error reply a client gets, in Redis's `-ERR …` form.
    pub fn reply(&self) -> Bytes {
        super::error_reply(&self.to_string())
    }

    /// Whether the request surely never reached the node, so sending it again (elsewhere,
    /// or later) can't run it twice. A broken connection or a timeout may have run it.
    pub fn never_sent(&self) -> bool {
        matches!(
            self,
            UpstreamError::Connect { .. }
                | UpstreamError::Auth { .. }
                | UpstreamError::NotYet { .. }
                | UpstreamError::QueueFull { .. }
        )
    }
}

impl From<UpstreamError> for super::Reply<'_> {
    fn from(e: UpstreamError) -> Self {
        super::Reply::Held(e.reply())
    }
}

impl From<UpstreamError> for Bytes {
    fn from(e: UpstreamError) -> Bytes {
        e.reply()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_keep_their_words_and_say_what_is_safe_to_resend() {
        let addr = "10.0.0.1:6379".to_owned();
        let refused = UpstreamError::Connect {
            addr: addr.clone(),
            reason: "Connection refused (os error 111)".into(),
        };
        assert_eq!(
            refused.reply(),
            Bytes::from_static(
                b"-ERR upstream 10.0.0.1:6379 unavailable: Connection refused (os error 111)\r\n"
            )
        );
        assert!(refused.never_sent());
        let lost = UpstreamError::Lost {
            addr: addr.clone(),
            reason: "closed by the server".into(),
        };
        assert!(!lost.never_sent());
        assert!(!UpstreamError::Timeout { addr: addr.clone() }.never_sent());
        assert!(UpstreamError::QueueFull { addr: addr.clone() }.never_sent());
        assert_eq!(
            UpstreamError::Auth {
                addr,
                reason: "WRONGPASS invalid username-password pair".into()
            }
            .reply(),
            Bytes::from_static(
                b"-ERR upstream authentication failed: WRONGPASS invalid username-password pair (10.0.0.1:6379)\r\n"
            )
        );
    }
}
