//! How the proxy treats each command of the table: answered by the proxy, forwarded,
//! refused, or run on a connection of the client's own. Policy, apart from the table itself.

use super::{CommandInfo, flags};

/// How the proxy treats a command. Lower layers decide *where* a command goes; this decides
/// *whether and how* it can go anywhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handling {
    /// Sent to the upstream on a shared pipelined connection.
    Forward,
    /// Answered by the proxy itself.
    Local(Local),
    /// Needs a connection of its own for the whole MULTI…EXEC (`session/stateful.rs`).
    Transaction,
    /// Turns the connection into a subscriber (`session/pubsub.rs`).
    PubSub,
    /// May block its connection: served on a dedicated one (`session/stateful.rs`).
    Blocking,
    /// Makes no sense through a proxy, or would change the shared connection.
    Unsupported,
}

/// Commands the proxy answers itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Local {
    /// PING [message]
    Ping,
    /// ECHO message
    Echo,
    /// QUIT: reply OK, then close after earlier replies.
    Quit,
    /// SELECT db: only database 0.
    Select,
    /// HELLO [protover [AUTH user pass] [SETNAME name]]
    Hello,
    /// AUTH [user] pass
    Auth,
    /// CLIENT ID
    ClientId,
    /// CLIENT SETNAME name
    ClientSetName,
    /// CLIENT GETNAME
    ClientGetName,
    /// CLIENT SETINFO LIB-NAME|LIB-VER value (sent by newer client libraries on connect)
    ClientSetInfo,
    /// CLIENT LIST: the service's clients.
    ClientList,
    /// CLIENT INFO: this client.
    ClientInfo,
    /// CLIENT KILL: some of the service's clients.
    ClientKill,
    /// RESET: back to a fresh connection's state.
    Reset,
    /// CLIENT TRACKING ON|OFF …: client-side caching, by the proxy.
    ClientTracking,
    /// CLIENT CACHING YES|NO
    ClientCaching,
    /// CLIENT GETREDIR
    ClientGetRedir,
    /// CLIENT TRACKINGINFO
    ClientTrackingInfo,
    /// CLIENT REPLY ON|OFF|SKIP: the client's replies, dropped by the proxy.
    ClientReply,
    /// CLIENT PAUSE: the service's clients' commands, held by the proxy.
    ClientPause,
    /// CLIENT UNPAUSE
    ClientUnpause,
    /// CLIENT NO-EVICT ON|OFF
    ClientNoEvict,
    /// MONITOR: the service's clients' commands, shown by the proxy.
    Monitor,
    /// ACL WHOAMI: the user the client authenticated as with the proxy.
    AclWhoami,
    /// ACL CAT [category]: the categories, or a category's commands.
    AclCat,
    /// CLIENT UNBLOCK id [TIMEOUT|ERROR]: reaches the client's dedicated connection.
    ClientUnblock,
}

/// Decides the proxy's handling of a command by its full name and flags.
pub fn handling_for(info: &CommandInfo) -> Handling {
    use Handling::*;
    match info.name {
        "ping" => Local(self::Local::Ping),
        "echo" => Local(self::Local::Echo),
        "quit" => Local(self::Local::Quit),
        "select" => Local(self::Local::Select),
        "hello" => Local(self::Local::Hello),
        "auth" => Local(self::Local::Auth),
        "reset" => Local(self::Local::Reset),
        "client|id" => Local(self::Local::ClientId),
        "client|setname" => Local(self::Local::ClientSetName),
        "client|getname" => Local(self::Local::ClientGetName),
        "client|setinfo" => Local(self::Local::ClientSetInfo),
        "client|list" => Local(self::Local::ClientList),
        "client|info" => Local(self::Local::ClientInfo),
        "client|kill" => Local(self::Local::ClientKill),
        "client|tracking" => Local(self::Local::ClientTracking),
        "client|caching" => Local(self::Local::ClientCaching),
        "client|getredir" => Local(self::Local::ClientGetRedir),
        "client|trackinginfo" => Local(self::Local::ClientTrackingInfo),
        "client|reply" => Local(self::Local::ClientReply),
        "client|pause" => Local(self::Local::ClientPause),
        "client|unpause" => Local(self::Local::ClientUnpause),
        "client|no-evict" => Local(self::Local::ClientNoEvict),
        "monitor" => Local(self::Local::Monitor),
        "acl|whoami" => Local(self::Local::AclWhoami),
        "acl|cat" => Local(self::Local::AclCat),
        "client|unblock" => Local(self::Local::ClientUnblock),
        "multi" | "exec" | "discard" | "watch" | "unwatch" => Transaction,
        "subscribe" | "unsubscribe" | "psubscribe" | "punsubscribe" | "ssubscribe"
        | "sunsubscribe" => PubSub,
        // Would change or inspect the shared upstream connection, not the client's.
        "readonly" | "readwrite" | "migrate" | "asking" | "sync" | "psync" | "replconf"
        | "shutdown" => Unsupported,
        name if name.starts_with("client|") || name.starts_with("cluster|") => Unsupported,
        // The server's settings: forwarded (on a cluster SET/RESETSTAT/REWRITE: every node).
        "config|get" | "config|set" | "config|resetstat" | "config|rewrite" | "config|help" => {
            Forward
        }
        // The server's logs, memory report and persistence: forwarded to a standalone
        // server; on a cluster summed, concatenated, sent to every master or asked of one
        // (`route::keyless`). DEBUG: only DEBUG OBJECT (`Session::refusal`).
        "slowlog|get"
        | "slowlog|len"
        | "slowlog|reset"
        | "slowlog|help"
        | "latency|doctor"
        | "latency|graph"
        | "latency|help"
        | "latency|histogram"
        | "latency|history"
        | "latency|latest"
        | "latency|reset"
        | "memory|doctor"
        | "memory|help"
        | "memory|malloc-stats"
        | "memory|purge"
        | "memory|stats"
        | "memory|usage"
        | "lastsave"
        | "bgsave"
        | "bgrewriteaof"
        | "save"
        | "debug" => Forward,
        _ if info.has(flags::ADMIN) => Unsupported,
        // Not flagged `blocking` by Redis 7.0, but it blocks its connection until replicas
        // acknowledge (refused: see `session::dispatch`).
        "wait" => Blocking,
        _ if info.has(flags::BLOCKING) => Blocking,
        _ => Forward,
    }
}
