//! One client connection: parse its commands, answer local ones, hand the rest to upstream
//! connections, and write replies back strictly in request order.
//!
//! Each request takes a numbered slot in [`Core`]; replies fill slots as they arrive and the
//! session writes the filled prefix in one batch. A client may have at most `max_pipeline`
//! requests in flight: past that the session stops reading it (back pressure) until replies
//! drain. A client that doesn't read its replies is disconnected once they exceed
//! `max_client_buffer`; nobody else is affected.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::Poll;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::net::TcpStream;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::command::{self, Handling, Local};
use crate::resp::{Limits, Request, RequestParser};
use crate::upstream::{ReplySink, SharedConn, error_reply};

/// Initial read buffer of a client; grows while reads fill it.
const READ_START: usize = 8 * 1024;
/// Largest read buffer growth step.
const READ_MAX_STEP: usize = 256 * 1024;
/// Buffers larger than this are released when empty, so an idle client costs little.
const KEEP_BUFFER: usize = 16 * 1024;
/// Largest request a client may send (Redis's default `client-query-buffer-limit`).
const MAX_QUERY_BUFFER: usize = 1024 * 1024 * 1024;

/// Everything a session needs from its service, shared by the sessions of one worker.
pub struct ServiceCtx {
    /// Service name, for logs.
    pub name: String,
    /// Shared connections to the service's upstream node, picked by client id.
    pub conns: Vec<SharedConn>,
    /// How long a request may wait for its reply.
    pub op_timeout: Duration,
    /// Close clients idle this long (`None`: never).
    pub idle_timeout: Option<Duration>,
    /// Most reply bytes held for one client.
    pub max_client_buffer: usize,
    /// Most requests of one client in flight.
    pub max_pipeline: usize,
    /// Request parsing limits.
    pub limits: Limits,
}

/// Process-wide client ids, as CLIENT ID reports them.
static NEXT_CLIENT_ID: AtomicU64 = AtomicU64::new(1);

/// Gives out a new client id.
pub fn next_client_id() -> u64 {
    NEXT_CLIENT_ID.fetch_add(1, Ordering::Relaxed)
}

/// Counts a service's connected clients across workers; the guard gives the place back.
pub struct ClientGuard(Arc<AtomicUsize>);

impl ClientGuard {
    /// Takes a place if fewer than `max` are taken.
    pub fn acquire(count: &Arc<AtomicUsize>, max: usize) -> Option<ClientGuard> {
        count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| ClientGuard(Arc::clone(count)))
    }
}

impl Drop for ClientGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Reply slots of one session, shared with the upstream connections that fill them.
#[derive(Default)]
struct Core {
    /// One entry per request not yet written to the client, in request order; `None` until
    /// its reply arrives.
    slots: RefCell<VecDeque<Option<Bytes>>>,
    /// Token of `slots[0]`.
    head: Cell<u64>,
    /// Bytes of replies received and not yet moved to the output buffer.
    held: Cell<usize>,
    /// Wakes the session when the first slot is filled.
    ready: Notify,
}

impl ReplySink for Core {
    fn deliver(&self, token: u64, reply: Bytes) {
        let Some(index) = token.checked_sub(self.head.get()) else {
            return;
        };
        let mut slots = self.slots.borrow_mut();
        if let Some(slot) = slots.get_mut(index as usize) {
            self.held.set(self.held.get() + reply.len());
            *slot = Some(reply);
            if index == 0 {
                self.ready.notify_one();
            }
        }
    }
}

impl Core {
    /// Reserves the next slot; returns its token.
    fn push_pending(&self) -> u64 {
        let mut slots = self.slots.borrow_mut();
        slots.push_back(None);
        self.head.get() + slots.len() as u64 - 1
    }

    /// Appends a reply the proxy made itself.
    fn push_ready(&self, reply: Bytes) {
        self.held.set(self.held.get() + reply.len());
        self.slots.borrow_mut().push_back(Some(reply));
    }

    /// Moves the filled prefix of the slots into `out`.
    fn drain_ready(&self, out: &mut BytesMut) {
        let mut slots = self.slots.borrow_mut();
        while let Some(Some(_)) = slots.front() {
            if let Some(Some(reply)) = slots.pop_front() {
                self.held.set(self.held.get() - reply.len());
                self.head.set(self.head.get() + 1);
                out.extend_from_slice(&reply);
            }
        }
    }

    /// Requests whose replies haven't been written yet.
    fn outstanding(&self) -> usize {
        self.slots.borrow().len()
    }
}

/// Per-connection client state that local commands read and change.
struct ClientState {
    /// CLIENT ID.
    id: u64,
    /// CLIENT SETNAME.
    name: Option<Bytes>,
    /// QUIT seen or a protocol error: stop reading, finish replies, close.
    closing: bool,
    /// The client broke the protocol (the reason to close).
    protocol_error: bool,
}

/// Why a session ended, for the access log.
#[derive(Debug)]
enum End {
    /// The client closed the connection.
    ClientClosed,
    /// QUIT, or shutdown after the owed replies were written.
    Done,
    /// The client broke the protocol.
    ProtocolError,
    /// The client's replies exceeded `max_client_buffer`.
    SlowReader,
    /// Idle longer than `idle_timeout`.
    Idle,
    /// A socket error.
    Io(std::io::Error),
}

impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            End::ClientClosed => f.write_str("client closed"),
            End::Done => f.write_str("done"),
            End::ProtocolError => f.write_str("protocol error"),
            End::SlowReader => f.write_str("slow reader"),
            End::Idle => f.write_str("idle timeout"),
            End::Io(e) => write!(f, "socket error: {e}"),
        }
    }
}

/// Serves one client until it leaves, breaks the protocol, or shutdown completes.
pub async fn run(
    stream: TcpStream,
    svc: Rc<ServiceCtx>,
    mut shutdown: watch::Receiver<bool>,
    _guard: ClientGuard,
) {
    let id = next_client_id();
    let peer = stream.peer_addr().ok();
    let started = std::time::Instant::now();
    let _ = stream.set_nodelay(true);
    let mut session = Session {
        core: Rc::new(Core::default()),
        parser: RequestParser::new(svc.limits),
        state: ClientState {
            id,
            name: None,
            closing: false,
            protocol_error: false,
        },
        conn: svc.conns[(id as usize) % svc.conns.len().max(1)].clone(),
        svc,
        commands: 0,
    };
    let mut stream = stream;
    let end = session.serve(&mut stream, &mut shutdown).await;
    let level_warn = matches!(end, End::SlowReader);
    if level_warn {
        warn!(service = %session.svc.name, client = id, ?peer, "client disconnected: replies exceeded max_client_buffer (slow reader)");
    }
    info!(
        target: "access",
        service = %session.svc.name,
        client = id,
        ?peer,
        commands = session.commands,
        duration_ms = started.elapsed().as_millis() as u64,
        end = %end,
        "client closed"
    );
}

struct Session {
    /// Reply slots shared with upstream connections.
    core: Rc<Core>,
    /// Request parser with its resumable state.
    parser: RequestParser,
    /// Client-visible connection state.
    state: ClientState,
    /// This client's shared upstream connection.
    conn: SharedConn,
    /// The service.
    svc: Rc<ServiceCtx>,
    /// Commands received, for the access log.
    commands: u64,
}

impl Session {
    async fn serve(&mut self, stream: &mut TcpStream, shutdown: &mut watch::Receiver<bool>) -> End {
        let mut input = BytesMut::new();
        let mut out = BytesMut::new();
        let mut eof = false;
        let idle = self.svc.idle_timeout;
        let idle_sleep = tokio::time::sleep(idle.unwrap_or(Duration::from_secs(86400)));
        tokio::pin!(idle_sleep);
        let mut last_active = Instant::now();
        loop {
            // Drain first: freed pipeline places let already-buffered commands through, and the
            // client may have nothing more to send to wake us.
            self.core.drain_ready(&mut out);
            if !self.state.closing && !input.is_empty() {
                self.process_input(&mut input);
                self.core.drain_ready(&mut out);
            }
            if out.len() + self.core.held.get() > self.svc.max_client_buffer {
                return End::SlowReader;
            }
            if !out.is_empty() {
                match stream.try_write(&out) {
                    Ok(n) => out.advance(n),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => return End::Io(e),
                }
                if out.is_empty() && out.capacity() > KEEP_BUFFER {
                    out = BytesMut::new();
                }
            }
            let outstanding = self.core.outstanding();
            if (self.state.closing || eof) && outstanding == 0 && out.is_empty() {
                return if self.state.protocol_error {
                    End::ProtocolError
                } else if eof {
                    End::ClientClosed
                } else {
                    End::Done
                };
            }
            if input.is_empty() && input.capacity() > KEEP_BUFFER {
                input = BytesMut::new();
            }
            let can_read = !self.state.closing
                && !eof
                && outstanding < self.svc.max_pipeline
                && out.len() < self.svc.max_client_buffer / 2
                && input.len() < MAX_QUERY_BUFFER;
            let idle_armed = idle.is_some() && outstanding == 0 && out.is_empty();
            let mut readable = false;
            tokio::select! {
                biased;
                r = stream.writable(), if !out.is_empty() => {
                    if let Err(e) = r {
                        return End::Io(e);
                    }
                }
                _ = self.core.ready.notified(), if outstanding > 0 => {}
                r = stream.readable(), if can_read => {
                    if let Err(e) = r {
                        return End::Io(e);
                    }
                    readable = true;
                }
                _ = shutdown.changed(), if !self.state.closing => {
                    self.state.closing = true;
                }
                () = &mut idle_sleep, if idle_armed => {
                    if let Some(limit) = idle {
                        if last_active.elapsed() >= limit {
                            return End::Idle;
                        }
                        idle_sleep.as_mut().reset(last_active + limit);
                    }
                }
            }
            if readable {
                match read_some(stream, &mut input) {
                    Poll::Ready(Ok(0)) => {
                        eof = true;
                        if input.is_empty() && outstanding == 0 {
                            return End::ClientClosed;
                        }
                    }
                    Poll::Ready(Ok(_)) => last_active = Instant::now(),
                    Poll::Ready(Err(e)) => return End::Io(e),
                    Poll::Pending => {}
                }
            }
            if *shutdown.borrow() {
                self.state.closing = true;
            }
        }
    }

    /// Parses and dispatches every complete command in `input`, up to the pipeline limit.
    fn process_input(&mut self, input: &mut BytesMut) {
        let deadline = Instant::now() + self.svc.op_timeout;
        while !self.state.closing && self.core.outstanding() < self.svc.max_pipeline {
            match self.parser.parse(input) {
                Ok(None) => break,
                Ok(Some(n)) => {
                    let req = self.parser.request(&input[..n]);
                    if !req.is_empty() {
                        self.commands += 1;
                        dispatch(&req, &self.core, &mut self.state, &self.conn, deadline);
                    }
                    input.advance(n);
                }
                Err(e) => {
                    debug!(client = self.state.id, error = %e, "protocol error; closing the client");
                    self.core.push_ready(e.to_reply());
                    self.state.closing = true;
                    self.state.protocol_error = true;
                    input.clear();
                }
            }
        }
    }
}

/// Reads what the socket has into `input` with a single non-blocking attempt.
///
/// Uses `poll_read`, which on Linux marks the socket drained when a read returns less than
/// asked, saving the extra `read` that would only say "would block".
fn read_some(stream: &mut TcpStream, input: &mut BytesMut) -> Poll<std::io::Result<usize>> {
    let spare = input.capacity() - input.len();
    if spare < READ_START / 2 {
        let step = input.capacity().clamp(READ_START, READ_MAX_STEP);
        input.reserve(step);
    }
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    tokio_util::io::poll_read_buf(Pin::new(stream), &mut cx, input)
}

/// Handles one command: a local reply, a refusal, or a hand-off to the upstream.
fn dispatch(
    req: &Request<'_>,
    core: &Rc<Core>,
    state: &mut ClientState,
    conn: &SharedConn,
    deadline: Instant,
) {
    let handling = command::lookup(req).map(|c| (c.handling, c.info));
    match handling {
        // Standalone upstreams answer unknown commands themselves, in Redis's words.
        None | Some((Handling::Forward, _)) => {
            let token = core.push_pending();
            let sink: Rc<dyn ReplySink> = core.clone();
            if let Err(reply) = conn.send(req, sink, token, deadline) {
                core.deliver(token, reply);
            }
        }
        Some((Handling::Local(local), info)) => {
            let reply = if info.arity_ok(req.len()) {
                local_reply(local, req, state)
            } else {
                wrong_arity(req)
            };
            core.push_ready(reply);
        }
        Some((handling, info)) => {
            let name = display_name(info.name);
            let why = match handling {
                Handling::Transaction => {
                    "transactions need a dedicated upstream connection, which this version does not provide yet"
                }
                Handling::PubSub => {
                    "pub/sub needs a dedicated upstream connection, which this version does not provide yet"
                }
                Handling::Blocking => {
                    "blocking commands need a dedicated upstream connection, which this version does not provide yet"
                }
                _ => {
                    "it would act on the proxy's shared upstream connection or on the server as a whole"
                }
            };
            core.push_ready(error_reply(&format!(
                "'{name}' is not supported by redis-intercept: {why}"
            )));
        }
    }
}

/// `config|set` → `CONFIG SET`.
fn display_name(name: &str) -> String {
    name.replace('|', " ").to_uppercase()
}

fn wrong_arity(req: &Request<'_>) -> Bytes {
    let name = String::from_utf8_lossy(req.arg(0).unwrap_or_default()).to_lowercase();
    error_reply(&format!("wrong number of arguments for '{name}' command"))
}

/// Encodes a bulk string reply.
fn bulk(data: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(data.len() + 16);
    crate::resp::Frame::Bulk(Bytes::copy_from_slice(data)).encode(&mut out);
    out.freeze()
}

const OK: &[u8] = b"+OK\r\n";

/// Answers a command the proxy handles itself. Arity was checked by the caller.
fn local_reply(local: Local, req: &Request<'_>, state: &mut ClientState) -> Bytes {
    use crate::resp::Frame;
    let arg = |i| req.arg(i).unwrap_or_default();
    match local {
        Local::Ping if req.len() > 2 => wrong_arity(req),
        Local::Ping if req.len() == 1 => Bytes::from_static(b"+PONG\r\n"),
        Local::Ping | Local::Echo => bulk(arg(1)),
        Local::Quit => {
            state.closing = true;
            Bytes::from_static(OK)
        }
        Local::Select => match std::str::from_utf8(arg(1))
            .ok()
            .and_then(|s| s.parse::<i64>().ok())
        {
            Some(0) => Bytes::from_static(OK),
            Some(db) => error_reply(&format!(
                "redis-intercept serves database 0 only; SELECT {db} is not supported"
            )),
            None => error_reply("value is not an integer or out of range"),
        },
        Local::Auth => Bytes::from_static(OK),
        Local::ClientId => Frame::Integer(state.id as i64).to_bytes(),
        Local::ClientGetName => match &state.name {
            Some(name) => bulk(name),
            None => Bytes::from_static(b"$-1\r\n"),
        },
        Local::ClientSetName => match set_name(state, arg(2)) {
            Ok(()) => Bytes::from_static(OK),
            Err(e) => e,
        },
        Local::ClientSetInfo => Bytes::from_static(OK),
        Local::Reset => {
            state.name = None;
            Bytes::from_static(b"+RESET\r\n")
        }
        Local::Hello => hello(req, state),
    }
}

fn set_name(state: &mut ClientState, name: &[u8]) -> Result<(), Bytes> {
    if name.iter().any(|&b| !(b'!'..=b'~').contains(&b)) {
        return Err(error_reply(
            "Client names cannot contain spaces, newlines or special characters.",
        ));
    }
    state.name = (!name.is_empty()).then(|| Bytes::copy_from_slice(name));
    Ok(())
}

/// HELLO [protover [AUTH user pass] [SETNAME name]]: RESP2 only for now.
fn hello(req: &Request<'_>, state: &mut ClientState) -> Bytes {
    use crate::resp::Frame;
    if let Some(ver) = req.arg(1) {
        match std::str::from_utf8(ver)
            .ok()
            .and_then(|v| v.parse::<i64>().ok())
        {
            Some(2) => {}
            Some(3) => {
                return Bytes::from_static(
                    b"-NOPROTO sorry, this protocol version is not supported.\r\n",
                );
            }
            Some(_) => return Bytes::from_static(b"-NOPROTO unsupported protocol version\r\n"),
            None => return error_reply("Protocol version is not an integer or out of range"),
        }
    }
    let mut i = 2;
    while let Some(opt) = req.arg(i) {
        if opt.eq_ignore_ascii_case(b"AUTH") && req.len() > i + 2 {
            // No client-facing auth is configured: any credentials are accepted.
            i += 3;
        } else if opt.eq_ignore_ascii_case(b"SETNAME") && req.len() > i + 1 {
            if let Err(e) = set_name(state, req.arg(i + 1).unwrap_or_default()) {
                return e;
            }
            i += 2;
        } else {
            return error_reply(&format!(
                "Syntax error in HELLO option '{}'",
                String::from_utf8_lossy(opt)
            ));
        }
    }
    let s = |t: &'static str| Frame::Bulk(Bytes::from_static(t.as_bytes()));
    Frame::Array(vec![
        s("server"),
        s("redis"),
        s("version"),
        s("7.0.0"),
        s("proto"),
        Frame::Integer(2),
        s("id"),
        Frame::Integer(state.id as i64),
        s("mode"),
        s("standalone"),
        s("role"),
        s("master"),
        s("modules"),
        Frame::Array(vec![]),
        s("proxy"),
        Frame::Bulk(Bytes::from(format!(
            "redis-intercept {}",
            env!("CARGO_PKG_VERSION")
        ))),
    ])
    .to_bytes()
}
