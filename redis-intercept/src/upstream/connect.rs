//! Opening a connection to a node: TCP (marked, so the connect hook skips it), TLS, and the
//! handshake (AUTH, READONLY, SELECT) with the node's answers read back.

use std::path::PathBuf;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::debug;

use super::UpstreamError;
use super::tls::{Stream, TlsSettings};
use crate::config::NodeAddr;
use crate::resp::{Limits, ReplyScanner, encode_command};

/// Where the upstream password comes from.
#[derive(Clone)]
pub enum PasswordSource {
    /// A file, read at every connect so a rotated Kubernetes Secret is picked up.
    File(PathBuf),
    /// A value read once at start (from an environment variable).
    Value(String),
}

impl PasswordSource {
    fn read(&self) -> Result<String, String> {
        match self {
            PasswordSource::File(path) => std::fs::read_to_string(path)
                .map(|p| p.trim_end_matches(['\r', '\n']).to_owned())
                .map_err(|e| format!("cannot read password_file {}: {e}", path.display())),
            PasswordSource::Value(v) => Ok(v.clone()),
        }
    }
}

/// Credentials every connection sends (`AUTH [username] password`) before carrying traffic.
#[derive(Clone)]
pub struct UpstreamAuth {
    /// ACL user; `None` authenticates the default user.
    pub username: Option<String>,
    /// The password.
    pub password: PasswordSource,
}

impl std::fmt::Debug for UpstreamAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the password, even in debug output.
        f.debug_struct("UpstreamAuth")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// How one connection behaves; shared by all connections of an upstream.
#[derive(Debug, Clone)]
pub struct ConnSettings {
    /// Credentials sent after connecting.
    pub auth: Option<UpstreamAuth>,
    /// Longest time one connect attempt may take.
    pub connect_timeout: Duration,
    /// Longest wait between reconnect attempts.
    pub backoff_max: Duration,
    /// Most request bytes queued before new requests are refused.
    pub max_pending_bytes: usize,
    /// Limits applied to replies.
    pub limits: Limits,
    /// Send `READONLY` after connecting, so a cluster replica serves reads.
    pub readonly: bool,
    /// TLS to the node; `None`: plain TCP.
    pub tls: Option<TlsSettings>,
    /// Let requests gather this long before writing them (mirrors, whose replies nobody
    /// waits for); zero writes at once, as the request path must.
    pub write_delay: Duration,
    /// `SO_MARK` for the socket (with interception: the connect hook skips marked sockets).
    pub mark: Option<u32>,
    /// The database selected after connecting (standalone servers; 0 sends nothing).
    pub db: u32,
    /// The input budget that request bytes queued here count against, so a slow node makes
    /// the clients writing the most wait instead of its queue growing (`None`: mirrors, whose
    /// backlog must never slow anyone, and connections that carry no client requests).
    pub budget: Option<std::sync::Arc<crate::budget::QueryBudget>>,
    /// `HELLO` sent after connecting: `None` sends none; `Some(2)` sends `HELLO 2` to learn
    /// the server's version (a server without HELLO, before 6.0, is fine); `Some(3)` switches
    /// the connection to RESP3 (a server that can't fails the connect).
    pub protocol: Option<u8>,
    /// The server's version as its last `HELLO` reply gave it, shared by every connection
    /// made with these settings (clones included).
    pub version: ServerVersion,
}

/// A server's name and version, learned from `HELLO` when a connection is made: what the
/// proxy reports to clients as the server it is (`HELLO`, `INFO server`), since libraries
/// gate features on it (`redis` or `valkey`, and its version).
#[derive(Debug, Clone, Default)]
pub struct ServerVersion(std::sync::Arc<std::sync::Mutex<Option<(String, String)>>>);

impl ServerVersion {
    /// The version, once a connection has learned it.
    pub fn get(&self) -> Option<String> {
        use crate::locks::LockRecovered;
        self.0.locked().as_ref().map(|(_, version)| version.clone())
    }

    /// The server's name (`HELLO`'s `server`), once a connection has learned it.
    pub fn server(&self) -> Option<String> {
        use crate::locks::LockRecovered;
        self.0.locked().as_ref().map(|(server, _)| server.clone())
    }

    /// Records the name and version from a `HELLO` reply (RESP2 or RESP3).
    fn learn(&self, hello_reply: &[u8]) {
        use crate::locks::LockRecovered;
        use crate::resp::Frame;
        let buf = Bytes::copy_from_slice(hello_reply);
        let Ok(Some((frame, _))) = Frame::parse(&buf, &Limits::default()) else {
            return;
        };
        let pairs: Vec<(Frame, Frame)> = match frame {
            Frame::Map(pairs) => pairs,
            Frame::Array(items) => {
                let mut it = items.into_iter();
                std::iter::from_fn(|| Some((it.next()?, it.next()?))).collect()
            }
            _ => return,
        };
        let field = |name: &[u8]| {
            pairs.iter().find_map(|(k, v)| match (k, v) {
                (Frame::Bulk(k), Frame::Bulk(v)) if &k[..] == name => {
                    Some(String::from_utf8_lossy(v).into_owned())
                }
                _ => None,
            })
        };
        if let Some(version) = field(b"version") {
            let server = field(b"server").unwrap_or_else(|| "redis".to_owned());
            *self.0.locked() = Some((server, version));
        }
    }
}

/// A TCP connection to `addr` (resolved if it is a name), marked with `mark` before the
/// connect so the connect hook sees the mark.
async fn connect_tcp(addr: &str, mark: Option<u32>) -> std::io::Result<TcpStream> {
    let Some(mark) = mark else {
        return TcpStream::connect(addr).await;
    };
    let mut last = None;
    for sa in tokio::net::lookup_host(addr).await? {
        let socket = if sa.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket2::SockRef::from(&socket)
            .set_mark(mark)
            .map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!("cannot set SO_MARK for interception (needs CAP_NET_ADMIN): {e}"),
                )
            })?;
        match socket.connect(sa).await {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other(format!("{addr} resolved to nothing"))))
}

/// Connects to `addr` (TCP, then TLS if configured, then AUTH/READONLY/SELECT).
pub(crate) async fn open(
    addr: &NodeAddr,
    settings: &ConnSettings,
) -> Result<Stream, UpstreamError> {
    let failed = |reason: String| UpstreamError::Connect {
        addr: addr.to_string(),
        reason,
    };
    let tcp = connect_tcp(addr.as_str(), settings.mark)
        .await
        .map_err(|e| failed(e.to_string()))?;
    if let Err(e) = tcp.set_nodelay(true) {
        debug!(upstream = %addr, error = %e, "set_nodelay failed");
    }
    let mut stream = Stream::establish(tcp, settings.tls.as_ref(), addr.host())
        .await
        .map_err(failed)?;
    if settings.auth.is_some()
        || settings.readonly
        || settings.db != 0
        || settings.protocol.is_some()
    {
        handshake(&mut stream, settings).await.map_err(|reason| {
            // A connection lost in the middle (a server going down) is not a refusal.
            let lost = reason.starts_with("read failed")
                || reason.starts_with("write failed")
                || reason == "closed by the server";
            if lost {
                failed(reason)
            } else {
                UpstreamError::Auth {
                    addr: addr.to_string(),
                    reason,
                }
            }
        })?;
    }
    Ok(stream)
}

/// Sends `AUTH [username] password` (if configured), `READONLY` (if asked) and `SELECT db`
/// (if not 0) and reads the answers. The error text returned is the server's (it never contains the password).
pub(crate) async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    settings: &ConnSettings,
) -> Result<(), String> {
    let mut out = BytesMut::new();
    let mut expected = 0;
    if let Some(auth) = &settings.auth {
        let password = auth.password.read()?;
        let mut args: Vec<&[u8]> = vec![b"AUTH"];
        if let Some(user) = &auth.username {
            args.push(user.as_bytes());
        }
        args.push(password.as_bytes());
        encode_command(args.into_iter(), &mut out);
        expected += 1;
    }
    if settings.readonly {
        encode_command([&b"READONLY"[..]].into_iter(), &mut out);
        expected += 1;
    }
    if settings.db != 0 {
        let db = settings.db.to_string();
        encode_command([&b"SELECT"[..], db.as_bytes()].into_iter(), &mut out);
        expected += 1;
    }
    // Last, so its reply is the last one read.
    if let Some(protocol) = settings.protocol {
        let ver = protocol.to_string();
        encode_command([&b"HELLO"[..], ver.as_bytes()].into_iter(), &mut out);
    }
    stream
        .write_all(&out)
        .await
        .map_err(|e| format!("write failed: {e}"))?;
    let n = expected + usize::from(settings.protocol.is_some());
    let replies = read_replies(stream, n, &settings.limits).await?;
    let failed = |reply: &[u8]| {
        let text = String::from_utf8_lossy(reply);
        text.trim_start_matches('-').trim_end().to_owned()
    };
    for reply in &replies[..expected] {
        if !reply.starts_with(b"+") {
            return Err(failed(reply));
        }
    }
    if let Some(hello) = replies.get(expected) {
        if hello.starts_with(b"-") {
            if settings.protocol == Some(3) {
                return Err(failed(hello));
            }
        } else {
            settings.version.learn(hello);
        }
    }
    Ok(())
}

/// Reads `n` replies from a connection that carries nothing else (handshakes and topology
/// queries). The caller sent exactly `n` commands, so nothing follows the last reply.
pub(crate) async fn read_replies<S: AsyncRead + Unpin>(
    stream: &mut S,
    n: usize,
    limits: &Limits,
) -> Result<Vec<Bytes>, String> {
    let mut buf = BytesMut::with_capacity(512);
    let mut scanner = ReplyScanner::default();
    let mut replies = Vec::with_capacity(n);
    while replies.len() < n {
        match scanner.scan(&buf, limits) {
            Ok(Some(len)) => {
                replies.push(buf.split_to(len).freeze());
                scanner.reset();
                continue;
            }
            Ok(None) => {}
            Err(e) => return Err(format!("protocol error: {e}")),
        }
        match stream.read_buf(&mut buf).await {
            Ok(0) => return Err("closed by the server".into()),
            Ok(_) => {}
            Err(e) => return Err(format!("read failed: {e}")),
        }
    }
    Ok(replies)
}

/// Sends one command on a connection of its own to `addr` and returns the reply: for the
/// rare command that must reach a node outside the shared connections (CLIENT UNBLOCK of a
/// client's dedicated connection).
///
/// # Errors
/// The connection's failure.
pub async fn one_command(
    addr: &str,
    settings: &ConnSettings,
    args: &[&[u8]],
) -> Result<Bytes, UpstreamError> {
    let node = NodeAddr::parse(addr).unwrap_or_else(|_| NodeAddr::unparsed(addr.to_owned()));
    let mut stream = tokio::time::timeout(settings.connect_timeout, open(&node, settings))
        .await
        .map_err(|_| UpstreamError::Connect {
            addr: addr.to_owned(),
            reason: "connect timed out".to_owned(),
        })??;
    let mut out = BytesMut::new();
    encode_command(args.iter().copied(), &mut out);
    let lost = |reason: String| UpstreamError::Lost {
        addr: addr.to_owned(),
        reason,
    };
    stream
        .write_all(&out)
        .await
        .map_err(|e| lost(format!("write failed: {e}")))?;
    let mut replies = read_replies(&mut stream, 1, &settings.limits)
        .await
        .map_err(lost)?;
    replies.pop().ok_or_else(|| lost("no reply".to_owned()))
}
