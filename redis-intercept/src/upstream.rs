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
//! user and no reconnect, lent out by [`dedicated::DedicatedPool`]. [`pool`] keeps the
//! connections of a cluster upstream and its slot map.

pub mod dedicated;
pub mod owned;
pub mod pool;
pub mod sentinel;
pub mod standalone;
pub mod tls;

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::metrics::{LatencyBatch, NodeMetrics};
use crate::resp::{Limits, ReplyScanner, Request, encode_command};
use crate::signal::Signal;
use tls::{Stream, TlsSettings};

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

/// Connects to `addr` (TCP, then TLS if configured, then AUTH/READONLY). The error says
/// whether authentication was what failed.
pub(crate) async fn open(addr: &str, settings: &ConnSettings) -> Result<Stream, (bool, String)> {
    let tcp = connect_tcp(addr, settings.mark)
        .await
        .map_err(|e| (false, e.to_string()))?;
    if let Err(e) = tcp.set_nodelay(true) {
        debug!(upstream = %addr, error = %e, "set_nodelay failed");
    }
    let host = crate::config::split_host_port(addr)
        .map(|(h, _)| h)
        .unwrap_or_default();
    let mut stream = Stream::establish(tcp, settings.tls.as_ref(), &host)
        .await
        .map_err(|e| (false, e))?;
    if settings.auth.is_some() || settings.readonly || settings.db != 0 {
        handshake(&mut stream, settings)
            .await
            .map_err(|e| (true, e))?;
    }
    Ok(stream)
}

/// First reconnect delay after a failed attempt; doubles up to `backoff_max`.
const BACKOFF_START: Duration = Duration::from_millis(50);

/// Read buffer growth step for upstream replies.
const READ_CHUNK: usize = 64 * 1024;

/// A connection with a write delay (a mirror) writes as soon as this much is queued, without
/// waiting out the delay.
const BATCH_BYTES: usize = 64 * 1024;

/// Write buffers larger than this are released once empty, so one big value doesn't pin
/// memory forever.
const KEEP_BUFFER: usize = 1024 * 1024;

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// A connect attempt is under way; requests queue and go out once it succeeds.
    Connecting,
    /// Connected; requests go out as soon as the socket takes them.
    Up,
    /// The last attempt failed; requests are refused at once until the backoff ends.
    Down,
}

/// A request written (or about to be written) whose reply hasn't come back yet.
struct InFlight {
    /// Who gets the reply.
    sink: Rc<dyn ReplySink>,
    /// The sink's identifier for the request.
    token: u64,
    /// When the client stops waiting.
    deadline: Instant,
    /// When its write batch began to gather (for the latency histogram).
    queued: Instant,
}

/// A shared pipelined connection to one node. Cloning gives another handle to the same
/// connection.
#[derive(Clone)]
pub struct SharedConn(Rc<Inner>);

struct Inner {
    /// `host:port` as configured, for connecting and for messages.
    addr: String,
    /// Behaviour settings.
    settings: ConnSettings,
    /// This node's metrics.
    metrics: NodeMetrics,
    /// Current life-cycle state.
    state: Cell<State>,
    /// Error reply given to requests while the connection is down.
    down_reply: RefCell<Bytes>,
    /// Request bytes not yet handed to the socket.
    out: RefCell<BytesMut>,
    /// Requests awaiting replies, in the order they were queued (and written).
    inflight: RefCell<VecDeque<InFlight>>,
    /// When the bytes in `out` began to gather: one clock read per write batch, shared by
    /// its requests.
    batch_at: Cell<Instant>,
    /// Wakes the writer when `out` gains bytes.
    wake_writer: Signal,
    /// Wakes the timeout watcher when `inflight` stops being empty.
    wake_timer: Signal,
    /// Set when the worker shuts down; the task then ends.
    closed: Cell<bool>,
    /// Wakes the task out of a backoff sleep on shutdown.
    wake_close: Signal,
    /// Close as soon as nothing is waiting (the node left the cluster).
    retiring: Cell<bool>,
    /// Called when the connection fails, so a cluster pool can refresh its topology.
    on_failure: RefCell<Option<Rc<dyn Fn()>>>,
    /// Called when a reply is a `-READONLY` error: the server was demoted to a replica (a
    /// sentinel upstream asks its sentinels for the new master).
    on_readonly: RefCell<Option<Rc<dyn Fn()>>>,
    /// One client's connection (a transaction, a blocking command): its server-side state
    /// dies with it, so it never reconnects.
    dedicated: bool,
}

impl SharedConn {
    /// A connection to `addr`, not started yet: call [`SharedConn::run`] on a task.
    pub fn new(addr: String, settings: ConnSettings, metrics: NodeMetrics) -> SharedConn {
        Self::build(addr, settings, metrics, false)
    }

    /// A dedicated connection to `addr`: like [`SharedConn::new`], but once it fails it fails
    /// every later request instead of reconnecting.
    pub fn new_dedicated(addr: String, settings: ConnSettings, metrics: NodeMetrics) -> SharedConn {
        Self::build(addr, settings, metrics, true)
    }

    fn build(
        addr: String,
        settings: ConnSettings,
        metrics: NodeMetrics,
        dedicated: bool,
    ) -> SharedConn {
        SharedConn(Rc::new(Inner {
            down_reply: RefCell::new(error_reply(&format!(
                "upstream {addr} is not connected yet"
            ))),
            addr,
            settings,
            metrics,
            state: Cell::new(State::Connecting),
            out: RefCell::new(BytesMut::new()),
            inflight: RefCell::new(VecDeque::new()),
            batch_at: Cell::new(Instant::now()),
            wake_writer: Signal::default(),
            wake_timer: Signal::default(),
            closed: Cell::new(false),
            wake_close: Signal::default(),
            retiring: Cell::new(false),
            on_failure: RefCell::new(None),
            on_readonly: RefCell::new(None),
            dedicated,
        }))
    }

    /// Whether the connection is up with nothing queued or waiting, so it can be lent again.
    pub fn is_idle(&self) -> bool {
        let inner = &*self.0;
        inner.state.get() == State::Up
            && !inner.closed.get()
            && inner.inflight.borrow().is_empty()
            && inner.out.borrow().is_empty()
    }

    /// Whether [`SharedConn::close`] was called or a dedicated connection failed.
    pub fn is_closed(&self) -> bool {
        self.0.closed.get()
    }

    /// Calls `hook` whenever the connection fails or a connect attempt does.
    pub fn set_failure_hook(&self, hook: Rc<dyn Fn()>) {
        *self.0.on_failure.borrow_mut() = Some(hook);
    }

    /// Calls `hook` whenever a reply is a `-READONLY` error.
    pub fn set_readonly_hook(&self, hook: Rc<dyn Fn()>) {
        *self.0.on_readonly.borrow_mut() = Some(hook);
    }

    /// Whether the last connect attempt failed and the connection waits out its backoff:
    /// requests sent now fail at once.
    pub fn is_down(&self) -> bool {
        self.0.state.get() == State::Down || self.0.closed.get()
    }

    /// Closes the connection once the requests already sent have their replies, for a node
    /// that left the topology. Requests may still be sent until then.
    pub fn retire(&self) {
        self.0.retiring.set(true);
        self.0.wake_timer.notify();
        if self.0.inflight.borrow().is_empty() {
            self.close();
        }
    }

    /// Sends `ASKING` and then `resp` (an encoded command) back to back, as a redirect during
    /// slot migration requires: nothing else can come between them on the connection. The
    /// `ASKING` reply goes to `discard`.
    ///
    /// # Errors
    /// As [`SharedConn::send`].
    pub fn send_asking(
        &self,
        resp: &[u8],
        discard: Rc<dyn ReplySink>,
        sink: Rc<dyn ReplySink>,
        token: u64,
        deadline: Instant,
    ) -> Result<(), Bytes> {
        self.enqueue(
            |out| {
                out.extend_from_slice(b"*1\r\n$6\r\nASKING\r\n");
                out.extend_from_slice(resp);
            },
            sink,
            token,
            deadline,
        )?;
        // The ASKING reply comes first: its entry goes in front of the command's.
        let mut inflight = self.0.inflight.borrow_mut();
        if let Some(cmd) = inflight.pop_back() {
            inflight.push_back(InFlight {
                sink: discard,
                token: 0,
                deadline,
                queued: cmd.queued,
            });
            inflight.push_back(cmd);
        }
        Ok(())
    }

    /// The node this connection goes to.
    pub fn addr(&self) -> &str {
        &self.0.addr
    }

    /// Whether the connection is up right now.
    pub fn is_up(&self) -> bool {
        self.0.state.get() == State::Up
    }

    /// Queues `req`; its reply goes to `sink` with `token`. If the reply hasn't come by
    /// `deadline`, the connection is reset and every waiting request gets an error.
    ///
    /// # Errors
    /// The error reply to give the client at once: the upstream is down, or its queue is full.
    pub fn send(
        &self,
        req: &Request<'_>,
        sink: Rc<dyn ReplySink>,
        token: u64,
        deadline: Instant,
    ) -> Result<(), Bytes> {
        self.enqueue(|out| req.write_resp(out), sink, token, deadline)
    }

    /// Like [`SharedConn::send`] for a command already encoded as RESP (e.g. one held back by
    /// a delay fault).
    ///
    /// # Errors
    /// As [`SharedConn::send`].
    pub fn send_encoded(
        &self,
        resp: &[u8],
        sink: Rc<dyn ReplySink>,
        token: u64,
        deadline: Instant,
    ) -> Result<(), Bytes> {
        self.enqueue(|out| out.extend_from_slice(resp), sink, token, deadline)
    }

    fn enqueue(
        &self,
        write: impl FnOnce(&mut BytesMut),
        sink: Rc<dyn ReplySink>,
        token: u64,
        deadline: Instant,
    ) -> Result<(), Bytes> {
        let inner = &self.0;
        if inner.state.get() == State::Down || inner.closed.get() {
            return Err(inner.down_reply.borrow().clone());
        }
        let mut out = inner.out.borrow_mut();
        if out.len() >= inner.settings.max_pending_bytes {
            return Err(error_reply(&format!(
                "upstream {} has too many requests queued",
                inner.addr
            )));
        }
        let before = out.len();
        if before == 0 {
            inner.batch_at.set(Instant::now());
        }
        write(&mut out);
        // A delayed writer also wants to know when a batch's worth is queued.
        let wake = before == 0
            || (!inner.settings.write_delay.is_zero()
                && before < BATCH_BYTES
                && out.len() >= BATCH_BYTES);
        drop(out);
        let mut inflight = inner.inflight.borrow_mut();
        if inflight.is_empty() {
            inner.wake_timer.notify();
        }
        inflight.push_back(InFlight {
            sink,
            token,
            deadline,
            queued: inner.batch_at.get(),
        });
        if wake {
            inner.wake_writer.notify();
        }
        Ok(())
    }

    /// Stops the connection: the task ends and waiting requests get an error.
    pub fn close(&self) {
        self.0.closed.set(true);
        self.0.wake_close.notify();
        self.0.wake_writer.notify();
    }

    /// Drives the connection until [`SharedConn::close`]: connect, serve, and on failure fail
    /// the waiting requests and reconnect with backoff.
    pub async fn run(self) {
        let inner = &*self.0;
        let mut backoff = BACKOFF_START;
        let mut reconnect_now = false;
        while !inner.closed.get() {
            if !reconnect_now {
                inner.state.set(State::Connecting);
            }
            let attempt = tokio::time::timeout(
                inner.settings.connect_timeout,
                open(&inner.addr, &inner.settings),
            )
            .await;
            let mut auth_failed = false;
            let reason = match attempt {
                Ok(Ok(stream)) => {
                    if inner.dedicated {
                        debug!(upstream = %inner.addr, "dedicated connection up");
                    } else {
                        info!(upstream = %inner.addr, "connected");
                    }
                    inner.state.set(State::Up);
                    inner.metrics.up.inc();
                    backoff = BACKOFF_START;
                    let reason = self.serve(stream).await;
                    inner.metrics.up.dec();
                    // A connection that worked gets one immediate retry before backoff.
                    reconnect_now = true;
                    reason
                }
                Ok(Err((auth, e))) => {
                    reconnect_now = false;
                    auth_failed = auth;
                    if auth {
                        format!("authentication failed: {e}")
                    } else {
                        e
                    }
                }
                Err(_) => {
                    reconnect_now = false;
                    format!(
                        "connect timed out after {:?}",
                        inner.settings.connect_timeout
                    )
                }
            };
            if inner.closed.get() {
                self.fail_all(&error_reply("proxy is shutting down"));
                break;
            }
            inner.metrics.failures.inc();
            let hook = inner.on_failure.borrow().clone();
            if let Some(hook) = hook {
                hook();
            }
            let reply = if auth_failed {
                error_reply(&format!("upstream {reason} ({})", inner.addr))
            } else {
                error_reply(&format!("upstream {} unavailable: {reason}", inner.addr))
            };
            self.fail_all(&reply);
            *inner.down_reply.borrow_mut() = reply;
            if inner.dedicated {
                // The transaction or blocked command it carried is gone on the server too;
                // a new connection would run the client's next commands outside of it.
                warn!(upstream = %inner.addr, %reason, "dedicated upstream connection lost");
                inner.closed.set(true);
                break;
            }
            if reconnect_now {
                warn!(upstream = %inner.addr, %reason, "upstream connection lost, reconnecting");
                inner.state.set(State::Connecting);
                continue;
            }
            warn!(upstream = %inner.addr, %reason, retry_in = ?backoff, "upstream connect failed");
            inner.state.set(State::Down);
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                () = inner.wake_close.wait() => {}
            }
            backoff = (backoff * 2).min(inner.settings.backoff_max.max(BACKOFF_START));
        }
        inner.state.set(State::Down);
        self.fail_all(&error_reply("proxy is shutting down"));
    }

    /// Serves one established connection until it fails; returns why it ended.
    async fn serve(&self, stream: Stream) -> String {
        match stream {
            Stream::Plain(tcp) => self.serve_plain(&tcp).await,
            Stream::Tls(tls) => self.serve_tls(*tls).await,
        }
    }

    /// The plain TCP path: reads and writes driven by readiness, so a short read needs no
    /// second read to learn that the socket is empty.
    async fn serve_plain(&self, stream: &TcpStream) -> String {
        let reader = async {
            let mut replies = Replies::default();
            loop {
                let buf = replies.room();
                let room = buf.capacity() - buf.len();
                match stream.try_read_buf(buf) {
                    Ok(0) => return "closed by the server".to_owned(),
                    Ok(n) if n < room => {
                        // A short read emptied the socket: drop tokio's readiness now (no
                        // system call), instead of finding out with a read that says EAGAIN.
                        // New data sets it again through the edge-triggered poller.
                        let _ = stream.try_io(tokio::io::Interest::READABLE, || {
                            Err::<(), _>(std::io::ErrorKind::WouldBlock.into())
                        });
                    }
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if let Err(e) = stream.readable().await {
                            return format!("read failed: {e}");
                        }
                        continue;
                    }
                    Err(e) => return format!("read failed: {e}"),
                }
                if let Err(e) = self.take_replies(&mut replies) {
                    return e;
                }
                replies.flush_deferred().await;
            }
        };
        let writer = async {
            let mut spare = BytesMut::new();
            loop {
                if !self.next_out(&mut spare).await {
                    return "closed".to_owned();
                }
                let mut written = 0;
                while written < spare.len() {
                    match stream.try_write(&spare[written..]) {
                        Ok(n) => written += n,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            if let Err(e) = stream.writable().await {
                                return format!("write failed: {e}");
                            }
                        }
                        Err(e) => return format!("write failed: {e}"),
                    }
                }
                release(&mut spare);
            }
        };
        self.serve_io(reader, writer).await
    }

    /// The TLS path: the same loops over the TLS stream's async reads and writes.
    async fn serve_tls(&self, stream: tokio_rustls::client::TlsStream<TcpStream>) -> String {
        let (mut rd, mut wr) = tokio::io::split(stream);
        let reader = async {
            let mut replies = Replies::default();
            loop {
                let buf = replies.room();
                match rd.read_buf(buf).await {
                    Ok(0) => return "closed by the server".to_owned(),
                    Ok(_) => {}
                    Err(e) => return format!("read failed: {e}"),
                }
                if let Err(e) = self.take_replies(&mut replies) {
                    return e;
                }
                replies.flush_deferred().await;
            }
        };
        let writer = async {
            let mut spare = BytesMut::new();
            loop {
                if !self.next_out(&mut spare).await {
                    return "closed".to_owned();
                }
                if let Err(e) = wr.write_all(&spare).await {
                    return format!("write failed: {e}");
                }
                // TLS may hold the last record until flushed.
                if let Err(e) = wr.flush().await {
                    return format!("write failed: {e}");
                }
                release(&mut spare);
            }
        };
        self.serve_io(reader, writer).await
    }

    /// Hands every complete reply in `buf` to its request's sink, then flushes the sinks
    /// that asked for it and expect nothing more; the others go to `deferred` for
    /// [`Replies::flush_deferred`]. `Err` is why the connection must end.
    fn take_replies(&self, replies: &mut Replies) -> Result<(), String> {
        let inner = &*self.0;
        let Replies {
            buf,
            scanner,
            to_flush,
            deferred,
        } = replies;
        // One clock read for the whole read batch.
        let now = inner.metrics.latency.as_ref().map(|_| Instant::now());
        let mut latency = LatencyBatch::default();
        loop {
            match scanner.scan(buf, &inner.settings.limits) {
                Ok(Some(len)) => {
                    let next = inner.inflight.borrow_mut().pop_front();
                    let Some(req) = next else {
                        return Err("reply with no request waiting".to_owned());
                    };
                    if let Some(now) = now {
                        latency.observe(now.saturating_duration_since(req.queued));
                    }
                    // The reply is at the front of `buf`.
                    if buf.first() == Some(&b'-') && buf.starts_with(b"-READONLY") {
                        let hook = inner.on_readonly.borrow().clone();
                        if let Some(hook) = hook {
                            hook();
                        }
                    }
                    let before = buf.len();
                    if req.sink.deliver(req.token, Reply::InBuffer(buf, len)) {
                        to_flush.push(req.sink);
                    }
                    // A sink that kept the reply cut it out already. (`scan` only returns
                    // the length of a whole reply inside `buf`, so `advance` can't overrun.)
                    if buf.len() == before {
                        buf.advance(len);
                    }
                }
                Ok(None) => break,
                Err(e) => return Err(format!("protocol error from server: {e}")),
            }
        }
        if let Some(histogram) = &inner.metrics.latency {
            histogram.add(&latency);
        }
        for sink in to_flush.drain(..) {
            if sink.expects_more() {
                deferred.push(sink);
            } else {
                sink.flush();
            }
        }
        Ok(())
    }

    /// Waits for queued request bytes and swaps them into `spare`; false when the connection
    /// is closed with nothing queued.
    async fn next_out(&self, spare: &mut BytesMut) -> bool {
        loop {
            {
                let mut out = self.0.out.borrow_mut();
                if !out.is_empty() {
                    std::mem::swap(&mut *out, spare);
                    return true;
                }
            }
            if self.0.closed.get() {
                return false;
            }
            self.0.wake_writer.wait().await;
            let delay = self.0.settings.write_delay;
            if !delay.is_zero() {
                // Gather until the delay ends or a batch's worth is queued (enqueue wakes us
                // again when it crosses BATCH_BYTES).
                let until = Instant::now() + delay;
                while self.0.out.borrow().len() < BATCH_BYTES && !self.0.closed.get() {
                    tokio::select! {
                        _ = tokio::time::sleep_until(until) => break,
                        () = self.0.wake_writer.wait() => {}
                        () = self.0.wake_close.wait() => {}
                    }
                }
            }
        }
    }

    /// Runs a connection's reader and writer with the op-timeout watcher until one ends.
    async fn serve_io(
        &self,
        reader: impl std::future::Future<Output = String>,
        writer: impl std::future::Future<Output = String>,
    ) -> String {
        let inner = &*self.0;
        let timer = async {
            loop {
                let head = inner.inflight.borrow().front().map(|r| r.deadline);
                match head {
                    None if inner.retiring.get() => {
                        inner.closed.set(true);
                        return "retired: the node left the cluster".to_owned();
                    }
                    None => inner.wake_timer.wait().await,
                    Some(deadline) if deadline <= Instant::now() => {
                        return "a request timed out (op_timeout)".to_owned();
                    }
                    Some(deadline) => {
                        tokio::select! {
                            _ = tokio::time::sleep_until(deadline) => {}
                            () = inner.wake_timer.wait() => {}
                        }
                    }
                }
            }
        };
        let reason = tokio::select! {
            r = reader => r,
            r = writer => r,
            r = timer => r,
        };
        if reason.starts_with("a request timed out") {
            inner.metrics.timeouts.inc();
            self.fail_all(&error_reply(&format!(
                "operation timed out waiting for upstream {}",
                inner.addr
            )));
        }
        reason
    }

    /// Answers every waiting request with `reply` and drops unsent bytes.
    fn fail_all(&self, reply: &Bytes) {
        let inner = &*self.0;
        inner.out.borrow_mut().clear();
        let waiting: Vec<InFlight> = inner.inflight.borrow_mut().drain(..).collect();
        let mut to_flush = Vec::new();
        for req in waiting {
            if req.sink.deliver(req.token, reply.clone().into()) {
                to_flush.push(req.sink);
            }
        }
        for sink in to_flush {
            sink.flush();
        }
    }
}

/// A connection's read side: received bytes, the scanner's progress through them, and the
/// sinks to flush after a batch.
#[derive(Default)]
struct Replies {
    /// Bytes read and not yet cut into replies.
    buf: BytesMut,
    /// Where the scan of `buf` stands.
    scanner: ReplyScanner,
    /// Sinks that asked for a flush in the current batch.
    to_flush: Vec<Rc<dyn ReplySink>>,
    /// Sinks whose flush waits for the other connections read in the same tick.
    deferred: Vec<Rc<dyn ReplySink>>,
}

impl Replies {
    /// Flushes the deferred sinks after letting every task already queued on this worker
    /// run: the connections woken by the same poll deliver their replies first, so each
    /// client gets one write with all of them.
    async fn flush_deferred(&mut self) {
        if self.deferred.is_empty() {
            return;
        }
        yield_to_queued().await;
        for sink in self.deferred.drain(..) {
            sink.flush();
        }
    }

    /// The read buffer, with room for the next read.
    fn room(&mut self) -> &mut BytesMut {
        if self.buf.capacity() - self.buf.len() < READ_CHUNK / 4 {
            self.buf.reserve(READ_CHUNK);
        }
        &mut self.buf
    }
}

/// Returns after every task queued on this worker before the caller has been polled once.
///
/// The task wakes itself at once, which on a `LocalSet` puts it at the back of the local
/// queue, behind the tasks the I/O driver woke in the same poll. (`tokio::task::yield_now`
/// would wait for another driver poll, a system call.)
async fn yield_to_queued() {
    let mut yielded = false;
    std::future::poll_fn(|cx| {
        if yielded {
            return std::task::Poll::Ready(());
        }
        yielded = true;
        cx.waker().wake_by_ref();
        std::task::Poll::Pending
    })
    .await;
}

/// Empties a written buffer, releasing it if it grew large.
fn release(spare: &mut BytesMut) {
    spare.clear();
    if spare.capacity() > KEEP_BUFFER {
        *spare = BytesMut::new();
    }
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
    stream
        .write_all(&out)
        .await
        .map_err(|e| format!("write failed: {e}"))?;
    for reply in read_replies(stream, expected, &settings.limits).await? {
        if !reply.starts_with(b"+") {
            let text = String::from_utf8_lossy(&reply);
            return Err(text.trim_start_matches('-').trim_end().to_owned());
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

/// A RESP error reply `-ERR <message>\r\n`.
pub fn error_reply(message: &str) -> Bytes {
    Bytes::from(format!("-ERR {message}\r\n"))
}
