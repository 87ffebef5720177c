//! One client connection: parse its commands, answer local ones, hand the rest to upstream
//! connections, and write replies back strictly in request order.
//!
//! Each request takes a numbered slot in [`Core`]; replies fill slots as they arrive. After
//! each upstream read, the filled prefix of a client's slots is written to the client in one
//! system call, by the upstream task itself ([`ReplySink::flush`]): the session task is woken
//! only when it waits on reply progress (pipeline full, closing, idle timer, full socket). A
//! client may have at most `max_pipeline` requests in flight; past that the session stops
//! reading it (back pressure) until replies drain. A client that doesn't read its replies is
//! disconnected once they exceed `max_client_buffer`; nobody else is affected.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::future::poll_fn;
use std::io::Read;
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::Poll;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::{debug, info, warn};

mod cluster;
mod forward;
mod pubsub;
mod stateful;

use crate::command::{self, Command, Handling, Local, flags};
use crate::metrics::{
    CommandHandles, CommandStats, Latency, LatencyBatch, ServiceMetrics, UNKNOWN,
};
use crate::resp::{Request, RequestParser};
use crate::service::{Fault, FaultAction, PolicyCell, ServiceCtx};
use crate::signal::Signal;
use crate::upstream::{Reply, ReplySink, error_reply};

/// Initial read buffer of a client; grows while reads fill it.
const READ_START: usize = 4 * 1024;
/// Largest read buffer growth step.
const READ_MAX_STEP: usize = 256 * 1024;
/// Buffers larger than this are released when empty, so an idle client costs little.
const KEEP_BUFFER: usize = 16 * 1024;
/// Largest request a client may send (Redis's default `client-query-buffer-limit`).
const MAX_QUERY_BUFFER: usize = 1024 * 1024 * 1024;

/// A small xorshift generator for fault dice: statistically fine for percentages, and
/// cheaper than a shared generator.
pub(crate) struct Dice(u64);

impl Dice {
    fn new(seed: u64) -> Dice {
        Dice(seed | 1)
    }

    /// A number in `0..n`.
    pub(crate) fn below(&mut self, n: u32) -> u32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 32) % u64::from(n)) as u32
    }

    /// The next 64 random bits.
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// A request held back by a delay fault.
struct Delayed {
    /// When it may go.
    until: Instant,
    /// The command, encoded.
    request: Bytes,
    /// Its reply slot.
    token: u64,
}

/// Applies a fault to `req` if one hits. Returns true when the request was consumed: an
/// error reply took its slot, or it was held back in `delayed`.
fn inject_fault(
    req: &Request<'_>,
    cmd: Option<Command>,
    faults: &[Fault],
    core: &Core,
    dice: &mut Dice,
    delayed: &mut Option<Delayed>,
    metrics: &ServiceMetrics,
) -> bool {
    let Some(action) = pick_fault(req, cmd, faults, dice) else {
        return false;
    };
    match action {
        FaultAction::Error(reply) => {
            metrics.fault_errors.inc();
            core.push_ready(reply.clone());
        }
        FaultAction::Delay(delay) => {
            metrics.fault_delays.inc();
            let token = core.push_pending();
            let mut request = BytesMut::new();
            req.write_resp(&mut request);
            *delayed = Some(Delayed {
                until: Instant::now() + *delay,
                request: request.freeze(),
                token,
            });
        }
    }
    true
}

/// The fault to apply to `req`, if any: only commands that would be forwarded are affected
/// (AUTH, PING and other local commands never are).
fn pick_fault<'f>(
    req: &Request<'_>,
    cmd: Option<Command>,
    faults: &'f [Fault],
    dice: &mut Dice,
) -> Option<&'f FaultAction> {
    if !matches!(cmd.map(|c| c.handling), None | Some(Handling::Forward)) {
        return None;
    }
    let name = req.arg(0)?;
    for fault in faults {
        if !fault.commands.is_empty()
            && !fault.commands.iter().any(|c| c.eq_ignore_ascii_case(name))
        {
            continue;
        }
        if let Some(prefix) = &fault.key_prefix {
            let mut keys = Vec::new();
            if let Some(c) = cmd {
                c.info.key_indexes(req, &mut keys);
            }
            let first = keys.first().and_then(|&i| req.arg(i));
            if !first.is_some_and(|k| k.starts_with(prefix)) {
                continue;
            }
        }
        if dice.below(10_000) < fault.per_10000 {
            return Some(&fault.action);
        }
    }
    None
}

/// Whether a service asks clients for credentials now.
fn auth_required(svc: &ServiceCtx) -> bool {
    svc.auth
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .is_some()
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

/// The sessions of one worker, so shutdown can reach them and the worker can wait for them.
#[derive(Default)]
pub struct Sessions {
    /// Live sessions by client id, with their service (the policy cell every generation of
    /// a service shares stands for it).
    live: RefCell<HashMap<u64, (PolicyCell, Rc<Core>)>>,
}

impl Sessions {
    /// Sessions still running.
    pub fn len(&self) -> usize {
        self.live.borrow().len()
    }

    /// Whether no session runs.
    pub fn is_empty(&self) -> bool {
        self.live.borrow().is_empty()
    }

    /// Wakes every session to read its service's [`Policy`] again after a reload: a wait
    /// that began before it (an idle client's, say) may end sooner now.
    pub fn wake_all(&self) {
        for (_, core) in self.live.borrow().values() {
            core.signal.notify();
        }
    }

    /// Asks every session to stop reading, finish the replies it owes, and close.
    pub fn shut_down(&self) {
        for (_, core) in self.live.borrow().values() {
            core.shutdown.set(true);
            core.signal.notify();
        }
    }

    /// [`Sessions::shut_down`] for the clients of `svc`'s service only (a reload removed
    /// it).
    pub fn shut_down_service(&self, svc: &ServiceCtx) {
        for (service, core) in self.live.borrow().values() {
            if Rc::ptr_eq(service, &svc.policy) {
                core.shutdown.set(true);
                core.signal.notify();
            }
        }
    }
}

/// What made a session's reply writing fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    /// Writing to the client failed.
    Broken,
    /// Replies held for the client exceeded `max_client_buffer`.
    SlowReader,
    /// The session ended for another reason; set by `Core::close`.
    Closed,
}

/// Reply slots and output of one session, shared with the upstream connections that fill
/// and flush them.
struct Core {
    /// The client socket, written by whoever flushes; taken away when the session ends, so
    /// that requests still in flight upstream don't keep the client's socket open.
    stream: RefCell<Option<Rc<TcpStream>>>,
    /// One entry per request not yet written to the client, in request order; `None` until
    /// its reply arrives.
    slots: RefCell<VecDeque<Option<Bytes>>>,
    /// Token of `slots[0]`.
    head: Cell<u64>,
    /// Bytes of replies in `slots`.
    held: Cell<usize>,
    /// Slots still waiting for their reply.
    unfilled: Cell<usize>,
    /// Reply bytes the client socket hasn't taken yet.
    out: RefCell<BytesMut>,
    /// Most bytes `held` + `out` may reach: the service's `max_client_buffer`, set again
    /// by the session on each turn so a reload reaches it.
    max_buffer: Cell<usize>,
    /// A flush is already queued for the end of the current upstream batch.
    flush_queued: Cell<bool>,
    /// The session task waits on reply progress and wants a wake-up after flushes.
    wake_on_progress: Cell<bool>,
    /// Writing to the client failed or overflowed; the session ends.
    failure: Cell<Option<Failure>>,
    /// Shutdown was requested.
    shutdown: Cell<bool>,
    /// Wakes the session task.
    signal: Signal,
    /// The first request of the last read batch (its token, and when it was read), until
    /// its reply goes to the socket: one latency sample per batch, no clock read per reply.
    sample: Cell<Option<(u64, Instant)>>,
    /// The service's request latency histogram.
    latency: Latency,
    /// Per-command statistics of the requests in flight; `None` while the service's
    /// `command_stats` is off.
    tracked: RefCell<Option<Tracked>>,
}

/// One session's requests whose replies are counted per command.
struct Tracked {
    /// The service's per-command handles on this worker.
    stats: Rc<CommandStats>,
    /// Requests waiting for their reply, in token order: the token, the command's handles
    /// and when the request was read. At most one per reply slot.
    open: VecDeque<(u64, Rc<CommandHandles>, Instant)>,
}

impl ReplySink for Core {
    fn deliver(&self, token: u64, reply: Reply<'_>) -> bool {
        if self.failure.get().is_some() {
            // The session is ending (or has ended, see `close`): nobody will read this, so
            // it isn't kept. Without this, a client that left with many big requests in
            // flight would have every reply piled up here until the last one arrived.
            return false;
        }
        let Some(index) = token.checked_sub(self.head.get()) else {
            return false;
        };
        let mut slots = self.slots.borrow_mut();
        let Some(slot) = slots.get_mut(index as usize) else {
            return false;
        };
        if slot.is_none() {
            self.unfilled.set(self.unfilled.get().saturating_sub(1));
            self.settle(token, reply.as_slice());
            if index == 0 {
                // Next in line: straight to the output, nothing kept.
                slots.pop_front();
                self.head.set(self.head.get() + 1);
                self.out.borrow_mut().extend_from_slice(reply.as_slice());
                return !self.flush_queued.replace(true);
            }
        }
        let reply = reply.into_bytes();
        self.held.set(self.held.get() + reply.len());
        *slot = Some(reply);
        if self.held.get() + self.out.borrow().len() > self.max_buffer.get() {
            // Over the limit between two flushes (replies that wait for an earlier slot
            // are never flushed): fail now rather than keep what won't be read.
            drop(slots);
            self.fail(Failure::SlowReader);
            return true;
        }
        let head_ready = slots.front().is_some_and(Option::is_some);
        head_ready && !self.flush_queued.replace(true)
    }

    fn flush(&self) {
        self.write_out();
        let out_left = !self.out.borrow().is_empty();
        if self.wake_on_progress.get() || out_left || self.failure.get().is_some() {
            self.signal.notify();
        }
    }

    fn expects_more(&self) -> bool {
        self.unfilled.get() > 0
    }
}

impl Core {
    /// Reserves the next slot; returns its token.
    /// The token the next slot will get.
    fn next_token(&self) -> u64 {
        self.head.get() + self.slots.borrow().len() as u64
    }

    fn push_pending(&self) -> u64 {
        let mut slots = self.slots.borrow_mut();
        slots.push_back(None);
        self.unfilled.set(self.unfilled.get() + 1);
        self.head.get() + slots.len() as u64 - 1
    }

    /// Appends a reply the proxy made itself.
    fn push_ready(&self, reply: Bytes) {
        if self.tracked.borrow().is_some() {
            self.settle(self.next_token(), &reply);
        }
        self.held.set(self.held.get() + reply.len());
        self.slots.borrow_mut().push_back(Some(reply));
    }

    /// Moves the filled prefix of the slots to the output and writes as much as the socket
    /// takes, without waiting. Records a failure instead of returning it, since upstream tasks
    /// call this for the session.
    fn write_out(&self) {
        self.flush_queued.set(false);
        if self.failure.get().is_some() {
            return;
        }
        let mut out = self.out.borrow_mut();
        {
            let mut slots = self.slots.borrow_mut();
            while let Some(Some(_)) = slots.front() {
                if let Some(Some(reply)) = slots.pop_front() {
                    self.held.set(self.held.get() - reply.len());
                    self.head.set(self.head.get() + 1);
                    out.extend_from_slice(&reply);
                }
            }
        }
        let stream = self.stream.borrow();
        let Some(stream) = stream.as_ref() else {
            return;
        };
        if !out.is_empty() {
            match stream.try_write(&out) {
                Ok(n) => out.advance(n),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    debug!(error = %e, "write to client failed");
                    self.failure.set(Some(Failure::Broken));
                    return;
                }
            }
        }
        if let Some((token, read_at)) = self.sample.get()
            && self.head.get() > token
        {
            // Its reply is in `out` or written: sampled at the first write attempt.
            self.sample.set(None);
            let mut batch = LatencyBatch::default();
            batch.observe(read_at.elapsed());
            self.latency.add(&batch);
        }
        if out.is_empty() && out.capacity() > KEEP_BUFFER {
            *out = BytesMut::new();
        }
        if out.len() + self.held.get() > self.max_buffer.get() {
            drop(out);
            self.fail(Failure::SlowReader);
        }
    }

    /// Records why the session must end and drops the replies held for it: they will never
    /// be written, and replies still in flight are dropped as they arrive (`deliver`).
    fn fail(&self, failure: Failure) {
        if self.failure.get().is_none() {
            self.failure.set(Some(failure));
        }
        self.slots.borrow_mut().clear();
        self.held.set(0);
        self.unfilled.set(0);
        *self.out.borrow_mut() = BytesMut::new();
        if let Some(t) = self.tracked.borrow_mut().as_mut() {
            t.open.clear();
        }
    }

    /// The session ended: closes the client socket (requests still in flight upstream must
    /// not keep it open) and drops what is held for it.
    fn close(&self) {
        self.stream.borrow_mut().take();
        self.fail(Failure::Closed);
    }

    /// Turns per-command statistics on (`Some`: the service's handles) or off.
    fn count_commands(&self, stats: Option<&Rc<CommandStats>>) {
        let mut tracked = self.tracked.borrow_mut();
        match stats {
            Some(stats) if tracked.is_none() => {
                *tracked = Some(Tracked {
                    stats: Rc::clone(stats),
                    open: VecDeque::new(),
                });
            }
            None if tracked.is_some() => *tracked = None,
            _ => {}
        }
    }

    /// Starts tracking the request about to take the next slot, read at `read_at`; returns
    /// its token, or `None` when statistics are off.
    fn track(&self, cmd: Option<Command>, read_at: Instant) -> Option<u64> {
        let mut tracked = self.tracked.borrow_mut();
        let t = tracked.as_mut()?;
        let token = self.next_token();
        let head = self.head.get();
        // A slot before the head has gone to the client: its entry can never settle. (Every
        // slot is settled as it fills; this only keeps the queue bounded by the slots.)
        while t.open.front().is_some_and(|(open, ..)| *open < head) {
            t.open.pop_front();
        }
        let name = cmd.map_or(UNKNOWN, |c| c.info.name);
        t.open.push_back((token, t.stats.handles(name), read_at));
        Some(token)
    }

    /// Forgets the request tracked as `token` if it took no slot (it is offered again later,
    /// or it left normal mode).
    fn untrack_unused(&self, token: Option<u64>) {
        let Some(token) = token else {
            return;
        };
        if self.next_token() != token {
            return;
        }
        if let Some(t) = self.tracked.borrow_mut().as_mut()
            && t.open.back().is_some_and(|(open, ..)| *open == token)
        {
            t.open.pop_back();
        }
    }

    /// Counts `reply` for the request in slot `token`, if it is tracked.
    fn settle(&self, token: u64, reply: &[u8]) {
        let mut tracked = self.tracked.borrow_mut();
        let Some(t) = tracked.as_mut() else {
            return;
        };
        let i = t.open.partition_point(|(open, ..)| *open < token);
        if t.open.get(i).is_some_and(|(open, ..)| *open == token)
            && let Some((_, handles, read_at)) = t.open.remove(i)
        {
            handles.record(reply.first() == Some(&b'-'), read_at.elapsed());
        }
    }

    /// Requests whose replies haven't been moved to the output yet.
    fn outstanding(&self) -> usize {
        self.slots.borrow().len()
    }

    /// Bytes waiting for the client socket.
    fn out_len(&self) -> usize {
        self.out.borrow().len()
    }
}

/// A client's unparsed input. The buffer stays initialized, so reads go straight into it
/// without unsafe code; `start..end` are the bytes not yet consumed.
#[derive(Default)]
struct InputBuf {
    /// Storage; allocated on the first read.
    buf: Vec<u8>,
    /// First unconsumed byte.
    start: usize,
    /// One past the last byte read.
    end: usize,
}

impl InputBuf {
    fn data(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    fn len(&self) -> usize {
        self.end - self.start
    }

    fn is_empty(&self) -> bool {
        self.start == self.end
    }

    fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start >= self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    fn clear(&mut self) {
        self.start = 0;
        self.end = 0;
    }

    /// Drops a large buffer once it is empty.
    fn release_if_empty(&mut self) {
        if self.is_empty() && self.buf.len() > KEEP_BUFFER {
            self.buf = Vec::new();
        }
    }

    /// Room for the next read: compacts, then grows while reads fill the buffer.
    fn spare(&mut self) -> &mut [u8] {
        if self.start > 0 && self.buf.len() - self.end < READ_START / 2 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.buf.len() - self.end < READ_START / 2 {
            let grow = self.buf.len().clamp(READ_START, READ_MAX_STEP);
            self.buf.resize(self.buf.len() + grow, 0);
        }
        &mut self.buf[self.end..]
    }
}

/// Reads what the socket has without waiting. `Ok(None)`: nothing yet. `Ok(Some(0))`: the
/// client closed its side.
///
/// A read that returns less than asked has emptied the socket; reporting "would block" to
/// tokio then clears its readiness, which saves the `read` that would only say EAGAIN.
fn read_input(stream: &TcpStream, input: &mut InputBuf) -> std::io::Result<Option<usize>> {
    let spare = input.spare();
    let want = spare.len();
    let mut got = 0;
    let result = stream.try_io(Interest::READABLE, || {
        let n = (&*socket2::SockRef::from(stream)).read(spare)?;
        got = n;
        if n > 0 && n < want {
            Err(std::io::ErrorKind::WouldBlock.into())
        } else {
            Ok(n)
        }
    });
    match result {
        Ok(n) => {
            input.end += n;
            Ok(Some(n))
        }
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
            input.end += got;
            Ok((got > 0).then_some(got))
        }
        Err(e) => Err(e),
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
    /// AUTH (or HELLO … AUTH) succeeded, or the service needs none.
    authenticated: bool,
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
    Io(String),
    /// The client subscribed: the pub/sub pipe takes over from the subscribe command.
    Subscribe,
    /// A subscribed client's pipe ended (why).
    PubSub(String),
}

impl End {
    /// The `reason` label of the close metric.
    fn reason(&self) -> &'static str {
        match self {
            End::ClientClosed => "client_closed",
            End::Done => "quit_or_shutdown",
            End::ProtocolError => "protocol_error",
            End::SlowReader => "slow_reader",
            End::Idle => "idle",
            End::Io(_) => "io_error",
            End::Subscribe | End::PubSub(_) => "pubsub",
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
            End::Idle => f.write_str("idle timeout"),
            End::Io(e) => write!(f, "socket error: {e}"),
            End::Subscribe => f.write_str("subscribed"),
            End::PubSub(why) => write!(f, "pub/sub pipe ended: {why}"),
        }
    }
}

/// What ended a session's wait.
enum Woke {
    /// The signal: replies flushed, shutdown, or a failure.
    Signal,
    /// The socket has input.
    Readable,
    /// The socket takes output again.
    Writable,
    /// The idle timer fired.
    Idle,
    /// A delayed request may go now.
    Delay,
}

/// Serves one client until it leaves, breaks the protocol, or shutdown completes.
pub async fn run(
    stream: TcpStream,
    svc: Rc<ServiceCtx>,
    sessions: Rc<Sessions>,
    _guard: ClientGuard,
) {
    let id = next_client_id();
    let peer = stream.peer_addr().ok();
    let started = std::time::Instant::now();
    let _ = stream.set_nodelay(true);
    let stream = Rc::new(stream);
    let core = Rc::new(Core {
        stream: RefCell::new(Some(Rc::clone(&stream))),
        slots: RefCell::default(),
        head: Cell::new(0),
        held: Cell::new(0),
        unfilled: Cell::new(0),
        out: RefCell::default(),
        max_buffer: Cell::new(svc.policy().max_client_buffer),
        flush_queued: Cell::new(false),
        wake_on_progress: Cell::new(false),
        failure: Cell::new(None),
        shutdown: Cell::new(false),
        signal: Signal::default(),
        sample: Cell::new(None),
        latency: svc.metrics.latency.clone(),
        tracked: RefCell::new(None),
    });
    sessions
        .live
        .borrow_mut()
        .insert(id, (Rc::clone(&svc.policy), Rc::clone(&core)));
    svc.metrics.connected.inc();
    svc.metrics.worker_connected.inc();
    let mut session = Session {
        core,
        parser: RequestParser::new(svc.limits),
        state: ClientState {
            id,
            name: None,
            closing: false,
            protocol_error: false,
            authenticated: !auth_required(&svc),
        },
        forwarder: forward::Forwarder::new(&svc.routes, id, &svc.discard),
        svc,
        commands: 0,
        dice: Dice::new(
            id.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ u64::from(started.elapsed().subsec_nanos()),
        ),
        delayed: None,
        stateful: stateful::Stateful::default(),
        declined: None,
    };
    let mut input = InputBuf::default();
    let end = loop {
        let end = session.serve(&stream, &mut input).await;
        let (End::Subscribe, Some(target)) = (&end, session.stateful.subscribe.take()) else {
            break end;
        };
        match session.pubsub(&stream, &mut input, target).await {
            pubsub::Piped::Back => {}
            pubsub::Piped::End(end) => break end,
        }
    };
    session.release_at_end();
    sessions.live.borrow_mut().remove(&id);
    session.core.close();
    drop(stream);
    session.svc.metrics.connected.dec();
    session.svc.metrics.worker_connected.dec();
    session.svc.metrics.closed(end.reason());
    if matches!(end, End::SlowReader) {
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
    /// This client's way to the service's upstreams and mirrors.
    forwarder: forward::Forwarder,
    /// The service.
    svc: Rc<ServiceCtx>,
    /// Commands received, for the access log.
    commands: u64,
    /// Dice for fault injection.
    dice: Dice,
    /// A request held back by a delay fault; input processing waits until it is sent.
    delayed: Option<Delayed>,
    /// Transaction and blocking-command state (a connection of its own while it lasts).
    stateful: stateful::Stateful,
    /// A generation of the service's routes the client can't move to, and the database it
    /// had selected then (the new routes don't have it), so it isn't tried at every turn.
    declined: Option<(Weak<ServiceCtx>, u32)>,
}

impl Session {
    async fn serve(&mut self, stream: &TcpStream, input: &mut InputBuf) -> End {
        let mut eof = false;
        let mut idle = self.svc.policy().idle_timeout;
        let idle_sleep = tokio::time::sleep(idle.unwrap_or(Duration::from_secs(86400)));
        tokio::pin!(idle_sleep);
        let mut last_active = Instant::now();
        let core = Rc::clone(&self.core);
        let delay_sleep = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(delay_sleep);
        loop {
            let policy = self.svc.policy();
            if policy.idle_timeout != idle {
                // A reload changed it: count from the last activity, as if it had always been.
                idle = policy.idle_timeout;
                if let Some(limit) = idle {
                    idle_sleep.as_mut().reset(last_active + limit);
                }
            }
            core.max_buffer.set(policy.max_client_buffer);
            if core.shutdown.get() {
                self.state.closing = true;
                if self.stateful.is_blocked() && core.unfilled.get() > 0 {
                    // A blocked command may wait for ever; closing its connection ends it.
                    return End::Done;
                }
            }
            if self
                .delayed
                .as_ref()
                .is_some_and(|d| d.until <= Instant::now())
            {
                self.send_delayed();
            }
            self.follow_probe();
            if self.follow_reload() && !input.is_empty() {
                // Read on once the replies owed on the old routes are in.
                self.stateful.barrier = true;
            } else if !self.state.closing && !input.is_empty() && self.stateful.subscribe.is_none()
            {
                self.process_input(input);
            }
            self.maybe_unpin();
            core.write_out();
            match core.failure.get() {
                Some(Failure::SlowReader) => return End::SlowReader,
                Some(Failure::Broken) => return End::Io("write failed".to_owned()),
                // Only `close` sets it, after the session's last turn.
                Some(Failure::Closed) => return End::Done,
                None => {}
            }
            let outstanding = core.outstanding();
            let out_len = core.out_len();
            if self.stateful.subscribe.is_some() && outstanding == 0 && out_len == 0 {
                return End::Subscribe;
            }
            if (self.state.closing || eof) && outstanding == 0 && out_len == 0 {
                return if self.state.protocol_error {
                    End::ProtocolError
                } else if eof {
                    End::ClientClosed
                } else {
                    End::Done
                };
            }
            input.release_if_empty();
            let can_read = !self.state.closing
                && !self.stateful.barrier
                && self.stateful.subscribe.is_none()
                && !eof
                && outstanding < policy.max_pipeline
                && out_len < policy.max_client_buffer / 2
                && input.len() < MAX_QUERY_BUFFER;
            let idle_armed = idle.is_some() && outstanding == 0 && out_len == 0;
            let delay_until = self.delayed.as_ref().map(|d| d.until);
            if let Some(until) = delay_until
                && delay_sleep.deadline() != until
            {
                delay_sleep.as_mut().reset(until);
            }
            // Replies are flushed without us; we only need waking when our wait depends on
            // them.
            // A pinned client's connection goes back once its replies are in.
            core.wake_on_progress.set(
                !can_read
                    || self.state.closing
                    || eof
                    || idle.is_some()
                    || self.forwarder.is_pinned(),
            );
            let woke = poll_fn(|cx| {
                if core.signal.poll(cx).is_ready() {
                    return Poll::Ready(Woke::Signal);
                }
                if out_len > 0 && stream.poll_write_ready(cx).is_ready() {
                    return Poll::Ready(Woke::Writable);
                }
                if can_read && stream.poll_read_ready(cx).is_ready() {
                    return Poll::Ready(Woke::Readable);
                }
                if idle_armed && idle_sleep.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Woke::Idle);
                }
                if delay_until.is_some() && delay_sleep.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Woke::Delay);
                }
                Poll::Pending
            })
            .await;
            match woke {
                Woke::Signal | Woke::Writable | Woke::Delay => {}
                Woke::Readable => match read_input(stream, input) {
                    Ok(Some(0)) => {
                        eof = true;
                        // A blocked command's reply may never come; closing its connection
                        // ends the wait on the server, as the client's own close would.
                        if (input.is_empty() && outstanding == 0)
                            || (self.stateful.is_blocked() && core.unfilled.get() > 0)
                        {
                            return End::ClientClosed;
                        }
                    }
                    Ok(Some(_)) => last_active = Instant::now(),
                    Ok(None) => {}
                    Err(e) => return End::Io(e.to_string()),
                },
                Woke::Idle => {
                    if let Some(limit) = idle {
                        if last_active.elapsed() >= limit {
                            return End::Idle;
                        }
                        idle_sleep.as_mut().reset(last_active + limit);
                    }
                }
            }
        }
    }

    /// Moves the client to the newest generation of its service's routes once a reload has
    /// built one and nothing ties the client to its own: no transaction, WATCH, blocking
    /// command, subscription or delayed request. Replies still owed on the old connections
    /// come in first, so the client's commands keep their order. Returns whether it waits
    /// for them.
    fn follow_reload(&mut self) -> bool {
        if self.delayed.is_some()
            || self.stateful.subscribe.is_some()
            || self.stateful.active(&self.forwarder)
        {
            return false;
        }
        let Some(latest) = self.svc.replaced_by() else {
            return false;
        };
        if self.declined.as_ref().is_some_and(|(old, db)| {
            std::ptr::eq(old.as_ptr(), Rc::as_ptr(&latest)) && *db == self.forwarder.db()
        }) {
            return false;
        }
        if self.core.unfilled.get() > 0 {
            return true;
        }
        let mut forwarder = forward::Forwarder::new(&latest.routes, self.state.id, &latest.discard);
        let db = self.forwarder.db();
        if db != 0 && forwarder.select(i64::from(db)).is_err() {
            debug!(service = %self.svc.name, client = self.state.id, db, "the reloaded routes can't serve the client's database; it keeps the old ones");
            self.declined = Some((Rc::downgrade(&latest), db));
            return false;
        }
        self.forwarder = forwarder;
        self.svc = latest;
        false
    }

    /// Sends the request a delay fault held back.
    fn send_delayed(&mut self) {
        let Some(d) = self.delayed.take() else {
            return;
        };
        let deadline = Instant::now() + self.svc.policy().op_timeout;
        let sink: Rc<dyn ReplySink> = self.core.clone();
        // The held request was encoded from a parsed one, so it parses again.
        let mut parser = RequestParser::new(self.svc.limits);
        let sent = match parser.parse(&d.request) {
            Ok(Some(n)) => {
                let req = parser.request(&d.request[..n]);
                let routing = routing(&self.svc);
                let mut cx = forward::Ctx {
                    svc: &routing,
                    deadline,
                    dice: &mut self.dice,
                };
                self.forwarder
                    .forward(&mut cx, &req, command::lookup(&req), sink, d.token)
            }
            _ => Err(error_reply("internal error: delayed request lost")),
        };
        if let Err(reply) = sent {
            // The session writes its output right after this; no flush needed.
            let _ = self.core.deliver(d.token, reply.into());
        }
    }

    /// [`dispatch`] with the session's parts.
    fn dispatch_normal(&mut self, req: &Request<'_>, cmd: Option<Command>, deadline: Instant) {
        dispatch(
            req,
            cmd,
            &self.core,
            &mut self.state,
            &self.svc,
            &mut self.forwarder,
            &mut self.dice,
            deadline,
        );
    }

    /// Parses and dispatches every complete command in `input`, up to the pipeline limit.
    /// A delayed request stops it until that request is sent, so the client's commands keep
    /// their order.
    fn process_input(&mut self, input: &mut InputBuf) {
        let policy = self.svc.policy();
        let now = Instant::now();
        let deadline = now + policy.op_timeout;
        // Here rather than at the top of the loop: a reload's wake-up may come with input.
        self.core
            .count_commands(policy.command_stats.then_some(&self.svc.metrics.by_command));
        if self.core.sample.get().is_none() && !input.is_empty() {
            // The batch's first request takes the next slot.
            self.core.sample.set(Some((self.core.next_token(), now)));
        }
        let before = self.commands;
        self.stateful.barrier = false;
        // Out of `self` while its requests borrow it; put back below (no early return).
        let mut parser = std::mem::replace(&mut self.parser, RequestParser::new(self.svc.limits));
        while !self.state.closing
            && self.delayed.is_none()
            && self.core.outstanding() < policy.max_pipeline
        {
            match parser.parse(input.data()) {
                Ok(None) => break,
                Ok(Some(n)) => {
                    let data = input.data();
                    let req = parser.request(&data[..n]);
                    if !req.is_empty() {
                        // Looked up once for faults, dispatch and mirrors.
                        let cmd = command::lookup(&req);
                        let tracked = self.core.track(cmd, now);
                        // Before routing, splitting, mirroring or queueing, as Redis checks
                        // before running or queueing: a split MSET must never run a half.
                        if let Some(refusal) = self.refusal(&req, cmd) {
                            self.commands += 1;
                            self.core.push_ready(error_reply(&refusal));
                            self.core.untrack_unused(tracked);
                            input.consume(n);
                            continue;
                        }
                        let step = self.stateful(&req, cmd, deadline);
                        if matches!(step, stateful::Step::Wait | stateful::Step::Subscribe) {
                            // Offered again once the replies owed on shared connections
                            // are in (the parser is resumable, so nothing is lost).
                            self.core.untrack_unused(tracked);
                            break;
                        }
                        self.commands += 1;
                        let faulted = matches!(step, stateful::Step::Normal)
                            && self.state.authenticated
                            && !self.stateful.active(&self.forwarder)
                            && !policy.faults.is_empty()
                            && inject_fault(
                                &req,
                                cmd,
                                &policy.faults,
                                &self.core,
                                &mut self.dice,
                                &mut self.delayed,
                                &self.svc.metrics,
                            );
                        if !faulted && matches!(step, stateful::Step::Normal) {
                            self.dispatch_normal(&req, cmd, deadline);
                        }
                        self.core.untrack_unused(tracked);
                    }
                    input.consume(n);
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
        self.parser = parser;
        self.svc.metrics.commands.inc_by(self.commands - before);
    }
}

/// What a forward needs of the service.
fn routing(svc: &ServiceCtx) -> forward::Routing<'_> {
    forward::Routing {
        routes: &svc.routes,
        prefixes: &svc.prefixes,
        discard: &svc.discard,
        limits: svc.limits,
    }
}

/// Handles one command: a local reply, a refusal, or a hand-off to the upstream.
#[allow(
    clippy::too_many_arguments,
    reason = "the session's parts, borrowed separately"
)]
fn dispatch(
    req: &Request<'_>,
    cmd: Option<Command>,
    core: &Rc<Core>,
    state: &mut ClientState,
    svc: &ServiceCtx,
    forwarder: &mut forward::Forwarder,
    dice: &mut Dice,
    deadline: Instant,
) {
    let handling = cmd.map(|c| (c.handling, c.info));
    if !state.authenticated && !handling.is_some_and(|(_, info)| info.has(flags::NO_AUTH)) {
        core.push_ready(Bytes::from_static(b"-NOAUTH Authentication required.\r\n"));
        return;
    }
    match handling {
        // Standalone upstreams answer unknown commands themselves, in Redis's words.
        None | Some((Handling::Forward, _)) => {
            let token = core.push_pending();
            let sink: Rc<dyn ReplySink> = core.clone();
            let routing = routing(svc);
            let mut cx = forward::Ctx {
                svc: &routing,
                deadline,
                dice,
            };
            let sent = forwarder.forward(&mut cx, req, cmd, sink, token);
            if let Err(reply) = sent {
                // The session writes its output right after dispatching; no flush needed.
                let _ = core.deliver(token, reply.into());
            }
        }
        Some((Handling::Local(local), _)) => {
            // Arity was checked when the request was read (`Session::refusal`).
            let reply = if local == Local::Select {
                select(req, forwarder)
            } else {
                if local == Local::Reset {
                    // RESET selects database 0 again, as in Redis (0 is always valid).
                    let _ = forwarder.select(0);
                }
                local_reply(local, req, state, svc)
            };
            core.push_ready(reply);
        }
        Some((handling, info)) => {
            let name = display_name(info.name);
            let why = match handling {
                Handling::PubSub => {
                    "a client can't subscribe during a transaction, a WATCH or a blocking command"
                }
                Handling::Blocking => {
                    "WAIT counts the replicas that acknowledged one connection's writes, and the proxy sends a client's writes over shared connections"
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

/// `SELECT db`: the client's standalone upstreams move to that database's connections.
fn select(req: &Request<'_>, forwarder: &mut forward::Forwarder) -> Bytes {
    let db = std::str::from_utf8(req.arg(1).unwrap_or_default())
        .ok()
        .and_then(|s| s.parse::<i64>().ok());
    match db.map(|db| forwarder.select(db)) {
        Some(Ok(())) => Bytes::from_static(OK),
        Some(Err(reply)) => reply,
        None => error_reply("value is not an integer or out of range"),
    }
}

/// `config|set` → `CONFIG SET`.
fn display_name(name: &str) -> String {
    name.replace('|', " ").to_uppercase()
}

/// PING's own rule beyond its arity: at most one message.
fn wrong_ping_arity() -> Bytes {
    error_reply("wrong number of arguments for 'ping' command")
}

/// Encodes a bulk string reply.
fn bulk(data: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(data.len() + 16);
    crate::resp::Frame::Bulk(Bytes::copy_from_slice(data)).encode(&mut out);
    out.freeze()
}

const OK: &[u8] = b"+OK\r\n";

/// Answers a command the proxy handles itself. Arity was checked by the caller.
fn local_reply(
    local: Local,
    req: &Request<'_>,
    state: &mut ClientState,
    svc: &ServiceCtx,
) -> Bytes {
    use crate::resp::Frame;
    let arg = |i| req.arg(i).unwrap_or_default();
    match local {
        Local::Ping if req.len() > 2 => wrong_ping_arity(),
        Local::Ping if req.len() == 1 => Bytes::from_static(b"+PONG\r\n"),
        Local::Ping | Local::Echo => bulk(arg(1)),
        Local::Quit => {
            state.closing = true;
            Bytes::from_static(OK)
        }
        // Answered by `select`, which moves the client's connections.
        Local::Select => Bytes::from_static(OK),
        Local::Auth => auth(req, state, svc),
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
            state.authenticated = !auth_required(svc);
            Bytes::from_static(b"+RESET\r\n")
        }
        Local::Hello => hello(req, state, svc),
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

const WRONGPASS: &[u8] = b"-WRONGPASS invalid username-password pair or user is disabled.\r\n";

/// Checks credentials against the service's client auth. Without client auth, AUTH is
/// accepted (or refused with Redis's words when `legacy_auth = "reject"`). A failed attempt
/// leaves an authenticated client authenticated, as in Redis.
fn check_credentials(
    user: Option<&[u8]>,
    pass: &[u8],
    state: &mut ClientState,
    svc: &ServiceCtx,
) -> Result<(), Bytes> {
    let auth = svc
        .auth
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    match &*auth {
        Some(auth) => {
            if auth.check(user.unwrap_or(b"default"), pass) {
                state.authenticated = true;
                Ok(())
            } else {
                Err(Bytes::from_static(WRONGPASS))
            }
        }
        None if svc.policy().legacy_auth_reject => Err(match user {
            Some(_) => Bytes::from_static(WRONGPASS),
            None => Bytes::from_static(
                b"-ERR AUTH <password> called without any password configured for the default user. Are you sure your configuration is correct?\r\n",
            ),
        }),
        None => Ok(()),
    }
}

/// AUTH [username] password, answered by the proxy: it never reaches Redis.
fn auth(req: &Request<'_>, state: &mut ClientState, svc: &ServiceCtx) -> Bytes {
    let arg = |i| req.arg(i).unwrap_or_default();
    let result = match req.len() {
        2 => check_credentials(None, arg(1), state, svc),
        3 => check_credentials(Some(arg(1)), arg(2), state, svc),
        _ => return error_reply("syntax error"),
    };
    match result {
        Ok(()) => Bytes::from_static(OK),
        Err(e) => e,
    }
}

/// HELLO [protover [AUTH user pass] [SETNAME name]]: RESP2 only for now.
fn hello(req: &Request<'_>, state: &mut ClientState, svc: &ServiceCtx) -> Bytes {
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
    let mut credentials = None;
    let mut name = None;
    while let Some(opt) = req.arg(i) {
        if opt.eq_ignore_ascii_case(b"AUTH") && req.len() > i + 2 {
            credentials = Some((
                req.arg(i + 1).unwrap_or_default(),
                req.arg(i + 2).unwrap_or_default(),
            ));
            i += 3;
        } else if opt.eq_ignore_ascii_case(b"SETNAME") && req.len() > i + 1 {
            name = req.arg(i + 1);
            i += 2;
        } else {
            return error_reply(&format!(
                "Syntax error in HELLO option '{}'",
                String::from_utf8_lossy(opt)
            ));
        }
    }
    if let Some((user, pass)) = credentials
        && let Err(e) = check_credentials(Some(user), pass, state, svc)
    {
        return e;
    }
    if !state.authenticated {
        return Bytes::from_static(
            b"-NOAUTH HELLO must be called with the client already authenticated, otherwise the HELLO <proto> AUTH <user> <pass> option can be used to authenticate the client and select the RESP protocol version at the same time\r\n",
        );
    }
    if let Some(name) = name
        && let Err(e) = set_name(state, name)
    {
        return e;
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
