//! One client connection: parse its commands, answer local ones, hand the rest to upstream
//! connections, and write replies back strictly in request order.
//!
//! Each request takes a numbered slot in `ReplySlots` (`replies.rs`); replies fill slots as they arrive. After
//! each upstream read, the filled prefix of a client's slots is written to the client in one
//! system call, by the upstream task itself ([`ReplySink::flush`]): the session task is woken
//! only when it waits on reply progress (pipeline full, closing, idle timer, full socket). A
//! client may have at most `max_pipeline` requests, and `reply_window` estimated reply
//! bytes, owed upstream (`window.rs`); past that the session stops reading it (back
//! pressure) until replies come in. A client that doesn't read its replies is disconnected
//! once they exceed `max_client_buffer`; nobody else is affected.

use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::{debug, info, warn};

mod auth;
mod cluster;
mod cluster_request;
mod directory;
mod dispatch;
mod end;
mod faults;
mod follow;
mod forward;
mod info;
mod input;
mod local;
mod merge;
mod mirror;
mod modes;
mod monitor;
mod output;
mod probe;
mod pubsub;
mod pubsub_node;
mod refusal;
mod registry;
mod replies;
mod scan;
mod stateful;
mod target;
mod tracking;
mod unblock;
mod window;

pub use registry::{ClientGuard, Sessions, next_client_id};

use auth::auth_required;
use dispatch::{dispatch, routing};
use end::End;
use faults::{Delayed, Sampler, inject_fault};
use input::{InputBuf, read_input};
use replies::{Failure, ReplySlots};

use crate::command::{self, Command};
use crate::metrics::GaugeGuard;
use crate::resp::{Request, RequestParser};
use crate::service::ServiceCtx;
use crate::wake::Wake;

/// How often a client that stopped being read because the input budget was spent looks
/// again.
const BUDGET_RECHECK: Duration = Duration::from_millis(5);

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
    /// The client switched to RESP3 with `HELLO 3`.
    resp3: bool,
    /// What CLIENT LIST shows of it.
    entry: Arc<directory::ClientEntry>,
    /// CLIENT TRACKING is on.
    tracking: Option<Rc<crate::tracking::Client>>,
    /// CLIENT CACHING YES|NO given for the next command.
    caching: bool,
    /// Keys of the transaction being queued, while tracking.
    txn_keys: tracking::TxnKeys,
    /// Its service, across workers (CLIENT PAUSE holds the service's clients).
    service_key: usize,
}

/// What ended a session's wait.
enum Woke {
    /// The signal: replies flushed, shutdown, or a failure.
    Wake,
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
    guard: ClientGuard,
) {
    let id = next_client_id();
    let peer = stream.peer_addr().ok();
    let started = std::time::Instant::now();
    let _ = stream.set_nodelay(true);
    let stream = Rc::new(stream);
    let core = Rc::new(ReplySlots {
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
        signal: Wake::default(),
        sample: Cell::new(None),
        latency: svc.metrics.latency.clone(),
        tracked: RefCell::new(None),
        estimate: window::ReplyEstimate::default(),
        killed: Cell::new(false),
        tracked_ops: RefCell::default(),
        redo: RefCell::default(),
        muting: Cell::new(false),
        muted: RefCell::default(),
    });
    let entry = directory::ClientEntry::register(
        id,
        Arc::from(svc.name.as_str()),
        &stream,
        sessions.mailbox.clone(),
    );
    sessions.live.borrow_mut().insert(
        id,
        registry::Live {
            service: Rc::clone(&svc.policy),
            core: Rc::clone(&core),
            entry: Arc::clone(&entry),
        },
    );
    let connected = (
        GaugeGuard::new(&svc.metrics.connected),
        GaugeGuard::new(&svc.metrics.worker_connected),
    );
    let mut session = Session {
        core,
        parser: RequestParser::new(svc.limits),
        state: ClientState {
            id,
            name: None,
            closing: false,
            protocol_error: false,
            authenticated: !auth_required(&svc),
            resp3: false,
            entry,
            tracking: None,
            caching: false,
            txn_keys: tracking::TxnKeys::default(),
            service_key: guard.service_key(),
        },
        forwarder: forward::Forwarder::new(&svc.routes, id, &svc.discard, &client_counts(&svc)),
        svc,
        commands: 0,
        dice: Sampler::new(
            id.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ u64::from(started.elapsed().subsec_nanos()),
        ),
        delayed: None,
        stateful: stateful::Stateful::default(),
        declined: None,
        window: window::Window::default(),
        sessions: Rc::clone(&sessions),
        noloop_pending: None,
        reply_mode: modes::ReplyMode::default(),
        txn_writes: false,
        held_by_pause: false,
    };
    let mut input = InputBuf::new(Arc::clone(&session.svc.query_budget), id);
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
    session.end_tracking();
    monitor::stop(id);
    session.state.entry.unregister();
    session.release_at_end();
    session.window.release(&sessions);
    sessions.live.borrow_mut().remove(&id);
    session.core.close();
    drain_unread(&stream);
    drop(stream);
    drop(connected);
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

/// What INFO on a cluster reports of `svc`'s clients.
fn client_counts(svc: &ServiceCtx) -> cluster::ClientCounts {
    cluster::ClientCounts {
        connected: svc.metrics.connected.clone(),
        policy: Rc::clone(&svc.policy),
    }
}

/// Reads and drops what the client sent that nobody will serve (up to 1 MiB), so that
/// closing the socket sends FIN: closing with unread input sends RST, and a client that
/// gets RST may lose the replies it hasn't read yet (shutdown, QUIT mid-pipeline).
fn drain_unread(stream: &TcpStream) {
    let mut scratch = [0u8; 16 * 1024];
    for _ in 0..64 {
        match stream.try_read(&mut scratch) {
            Ok(n) if n > 0 => {}
            _ => break,
        }
    }
}

struct Session {
    /// Reply slots shared with upstream connections.
    core: Rc<ReplySlots>,
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
    /// Random draws for fault injection.
    dice: Sampler,
    /// A request held back by a delay fault; input processing waits until it is sent.
    delayed: Option<Delayed>,
    /// Transaction and blocking-command state (a connection of its own while it lasts).
    stateful: stateful::Stateful,
    /// A generation of the service's routes the client can't move to, and the database it
    /// had selected then (the new routes don't have it), so it isn't tried at every turn.
    declined: Option<(Weak<ServiceCtx>, u32)>,
    /// Its share of the worker's big-reply budget.
    window: window::Window,
    /// The worker's sessions (and their big-reply total).
    sessions: Rc<Sessions>,
    /// The slot of a NOLOOP write sent on a tracking listener: later commands wait for it.
    noloop_pending: Option<u64>,
    /// CLIENT REPLY.
    reply_mode: modes::ReplyMode,
    /// The transaction being queued has a write (CLIENT PAUSE WRITE holds its EXEC).
    txn_writes: bool,
    /// A CLIENT PAUSE holds the next command: look again shortly.
    held_by_pause: bool,
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
        let budget_sleep = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(budget_sleep);
        let mut was_paused = false;
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
            if core.killed.get() {
                return End::Killed;
            }
            self.show_flags();
            if core.shutdown.get() {
                self.state.closing = true;
                if self.stateful.is_blocked() && core.unfilled.get() > 0 {
                    // A blocked command may wait for ever; closing its connection ends it.
                    return End::Done;
                }
            }
            let redo = self.core.redo.borrow_mut().take();
            if let Some((token, request)) = redo {
                // A NOLOOP write a listener gave back goes the ordinary way, from its slot.
                self.delayed = Some(Delayed {
                    until: Instant::now(),
                    request,
                    token,
                });
            }
            if self
                .delayed
                .as_ref()
                .is_some_and(|d| d.until <= Instant::now())
            {
                self.send_delayed();
            }
            self.follow_probe();
            self.follow_lane();
            if self.follow_reload() && !input.is_empty() {
                // Read on once the replies owed on the old routes are in.
                self.stateful.barrier = true;
            } else if !self.state.closing && !input.is_empty() && self.stateful.subscribe.is_none()
            {
                self.process_input(input);
            }
            self.maybe_unpin();
            // Again after the input: a command just sent may have blocked the client.
            self.show_flags();
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
            let Ok(budget_ok) = input.may_read() else {
                return End::QueryBufferLimit;
            };
            let paused = !budget_ok && !self.state.closing && !eof;
            if paused && !was_paused {
                self.svc.query_budget.paused.inc();
            }
            was_paused = paused;
            // Not read while its requests can't be sent: its window is full (woken by reply
            // progress) or big replies owed to others hold the worker's budget (looked at
            // again shortly). A client that doesn't read what it is sent is cut off at
            // `max_client_buffer`.
            let room = self.window.room(&core, &policy, &self.sessions);
            if room == window::Room::Budget {
                window::wait_for_budget(&core, &self.sessions);
            }
            let recheck = paused || room == window::Room::Budget || self.held_by_pause;
            if recheck {
                budget_sleep.as_mut().reset(Instant::now() + BUDGET_RECHECK);
            }
            let can_read = budget_ok
                && !self.state.closing
                && !self.stateful.barrier
                && self.stateful.subscribe.is_none()
                && !eof
                && room == window::Room::Yes;
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
                    return Poll::Ready(Woke::Wake);
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
                if recheck && budget_sleep.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Woke::Delay);
                }
                Poll::Pending
            })
            .await;
            match woke {
                Woke::Wake | Woke::Writable | Woke::Delay => {}
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
        self.held_by_pause = false;
        // Out of `self` while its requests borrow it; put back below (no early return).
        let mut parser = std::mem::replace(&mut self.parser, RequestParser::new(self.svc.limits));
        while !self.state.closing
            && self.delayed.is_none()
            && self.window.room(&self.core, &policy, &self.sessions) == window::Room::Yes
        {
            match parser.parse(input.data()) {
                Ok(None) => break,
                Ok(Some(n)) => {
                    let data = input.data();
                    let req = parser.request(&data[..n]);
                    if !req.is_empty() {
                        // Looked up once for faults, dispatch and mirrors.
                        let cmd = command::lookup(&req);
                        self.state.entry.ran(cmd, now.into_std());
                        let tracked = self.core.track(cmd, now);
                        // Before routing, splitting, mirroring or queueing, as Redis checks
                        // before running or queueing: a split MSET must never run a half.
                        if let Some(refusal) = self.refusal(&req, cmd) {
                            self.commands += 1;
                            self.core.push_ready(refusal::refusal_reply(&refusal));
                            self.core.untrack_unused(tracked);
                            input.consume(n);
                            continue;
                        }
                        if self.paused(cmd) {
                            // Offered again shortly (the parser is resumable).
                            self.core.untrack_unused(tracked);
                            break;
                        }
                        let mode_before = self.reply_mode;
                        let muted = self.reply_muted(&req, cmd);
                        self.core.muting.set(muted);
                        let was_multi = self.stateful.multi;
                        let token = self.core.next_token();
                        let keys = tracking::keys_of(&self.state, &req, cmd);
                        let step = match self.noloop_write(&req, cmd) {
                            Some(step) => step,
                            None => self.stateful(&req, cmd, deadline),
                        };
                        if matches!(step, stateful::Step::Wait | stateful::Step::Subscribe) {
                            // Offered again once the replies owed on shared connections
                            // are in (the parser is resumable, so nothing is lost).
                            self.reply_mode = mode_before;
                            self.core.muting.set(false);
                            self.core.untrack_unused(tracked);
                            break;
                        }
                        monitor::feed(self.state.service_key, &self.state.entry, &req, cmd);
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
                        self.note_tracking(token, was_multi, cmd, keys);
                        self.core.muting.set(false);
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
