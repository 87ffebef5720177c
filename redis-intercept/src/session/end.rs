//! Why a session ended: the access log's words and the close metric's `reason` label.

/// Why a session ended, for the access log.
#[derive(Debug)]
pub(super) enum End {
    /// The client closed the connection.
    ClientClosed,
    /// QUIT, or shutdown after the owed replies were written.
    Done,
    /// The client broke the protocol.
    ProtocolError,
    /// The client's replies exceeded `max_client_buffer`.
    SlowReader,
    /// The client's unparsed input reached `client_query_buffer_limit`.
    QueryBufferLimit,
    /// Idle longer than `idle_timeout`.
    Idle,
    /// A socket error.
    Io(String),
    /// The client subscribed: the pub/sub pipe takes over from the subscribe command.
    Subscribe,
    /// A subscribed client's pipe ended (why).
    PubSub(String),
    /// CLIENT KILL.
    Killed,
}

impl End {
    /// The `reason` label of the close metric.
    pub(super) fn reason(&self) -> &'static str {
        match self {
            End::ClientClosed => "client_closed",
            End::Done => "quit_or_shutdown",
            End::ProtocolError => "protocol_error",
            End::SlowReader => "slow_reader",
            End::QueryBufferLimit => "query_buffer_limit",
            End::Idle => "idle",
            End::Io(_) => "io_error",
            End::Subscribe | End::PubSub(_) => "pubsub",
            End::Killed => "killed",
        }
    }
}

impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            End::ClientClosed => f.write_str("client closed"),
            End::Done => f.write_str("done"),
            End::ProtocolError => f.write_str("protocol error"),
            End::SlowReader => f.write_str("slow reader"),
            End::QueryBufferLimit => f.write_str("query buffer limit reached"),
            End::Idle => f.write_str("idle timeout"),
            End::Io(e) => write!(f, "socket error: {e}"),
            End::Subscribe => f.write_str("subscribed"),
            End::PubSub(why) => write!(f, "pub/sub pipe ended: {why}"),
            End::Killed => f.write_str("killed by CLIENT KILL"),
        }
    }
}
