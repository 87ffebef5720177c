//! A shared pipelined connection as its users see it: requests queued with their reply
//! sinks, in FIFO order, whatever state the connection is in.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;

use bytes::BytesMut;
use tokio::time::Instant;

use super::driver::BATCH_BYTES;
use super::{ConnSettings, ReplySink, ReplyTo, UpstreamError};
use crate::config::NodeAddr;
use crate::metrics::NodeMetrics;
use crate::resp::Request;
use crate::wake::Wake;

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum State {
    /// A connect attempt is under way; requests queue and go out once it succeeds.
    Connecting,
    /// Connected; requests go out as soon as the socket takes them.
    Up,
    /// The last attempt failed; requests are refused at once until the backoff ends.
    Down,
}

/// A request written (or about to be written) whose reply hasn't come back yet.
pub(super) struct InFlight {
    /// Who gets the reply.
    pub(super) sink: Rc<dyn ReplySink>,
    /// The sink's identifier for the request.
    pub(super) token: u64,
    /// When the client stops waiting.
    pub(super) deadline: Instant,
    /// When its write batch began to gather (for the latency histogram).
    pub(super) queued: Instant,
}

/// Queued request bytes are charged to the input budget once they exceed what was charged by
/// this much: a queue that stays small (the usual case) is never charged.
const CHARGE_STEP: usize = 64 * 1024;

/// A shared pipelined connection to one node. Cloning gives another handle to the same
/// connection.
#[derive(Clone)]
pub struct NodeConn(pub(super) Rc<Inner>);

pub(super) struct Inner {
    /// `host:port` as configured, for connecting and for messages.
    pub(super) addr: NodeAddr,
    /// Behaviour settings.
    pub(super) settings: ConnSettings,
    /// This node's metrics.
    pub(super) metrics: NodeMetrics,
    /// Current life-cycle state.
    pub(super) state: Cell<State>,
    /// Error reply given to requests while the connection is down.
    /// Bytes of `out` charged to the input budget (see [`CHARGE_STEP`]).
    pub(super) charged: Cell<usize>,
    pub(super) down: RefCell<UpstreamError>,
    /// Request bytes not yet handed to the socket.
    pub(super) out: RefCell<BytesMut>,
    /// Requests awaiting replies, in the order they were queued (and written).
    pub(super) inflight: RefCell<VecDeque<InFlight>>,
    /// When the bytes in `out` began to gather: one clock read per write batch, shared by
    /// its requests.
    pub(super) batch_at: Cell<Instant>,
    /// Wakes the writer when `out` gains bytes.
    pub(super) wake_writer: Wake,
    /// Wakes the timeout watcher when `inflight` stops being empty.
    pub(super) wake_timer: Wake,
    /// Set when the worker shuts down; the task then ends.
    pub(super) closed: Cell<bool>,
    /// Wakes the task out of a backoff sleep on shutdown.
    pub(super) wake_close: Wake,
    /// Close as soon as nothing is waiting (the node left the cluster).
    pub(super) retiring: Cell<bool>,
    /// Called when the connection fails, so a cluster pool can refresh its topology.
    pub(super) on_failure: RefCell<Option<Rc<dyn Fn()>>>,
    /// Called when a reply is a `-READONLY` error: the server was demoted to a replica (a
    /// sentinel upstream asks its sentinels for the new master).
    pub(super) on_readonly: RefCell<Option<Rc<dyn Fn()>>>,
    /// One client's connection (a transaction, a blocking command): its server-side state
    /// dies with it, so it never reconnects.
    pub(super) dedicated: bool,
    /// Its task runs (or ran). A lazy connection (a node's bulk lane) starts it with its
    /// first request.
    pub(super) started: Cell<bool>,
    /// The tracking epoch at which this connection last made sure its node has a tracking
    /// listener (`tracking.rs`); 0: never.
    pub(super) tracking_seen: Cell<u64>,
}

impl NodeConn {
    /// A connection to `addr`, not started yet: call [`NodeConn::run`] on a task.
    pub fn new(addr: String, settings: ConnSettings, metrics: NodeMetrics) -> NodeConn {
        Self::build(addr, settings, metrics, false)
    }

    /// Like [`NodeConn::new`], but the connection starts its own task (on the current
    /// `LocalSet`) with its first request: for a connection that may never be needed.
    pub fn new_lazy(addr: String, settings: ConnSettings, metrics: NodeMetrics) -> NodeConn {
        let conn = Self::build(addr, settings, metrics, false);
        conn.0.started.set(false);
        conn
    }

    /// A dedicated connection to `addr`: like [`NodeConn::new`], but once it fails it fails
    /// every later request instead of reconnecting.
    pub fn new_dedicated(addr: String, settings: ConnSettings, metrics: NodeMetrics) -> NodeConn {
        Self::build(addr, settings, metrics, true)
    }

    pub(super) fn build(
        addr: String,
        settings: ConnSettings,
        metrics: NodeMetrics,
        dedicated: bool,
    ) -> NodeConn {
        if settings.budget.is_some() {
            // It carries clients' requests: client-side caching listens to its node.
            crate::tracking::note_node(&addr, &settings);
        }
        NodeConn(Rc::new(Inner {
            down: RefCell::new(UpstreamError::NotYet { addr: addr.clone() }),
            charged: Cell::new(0),
            // Addresses come from the config or a node's topology or redirect, all parsed
            // before; a bad one fails its connects with the parse error.
            addr: NodeAddr::parse(&addr).unwrap_or_else(|_| NodeAddr::unparsed(addr)),
            settings,
            metrics,
            state: Cell::new(State::Connecting),
            out: RefCell::new(BytesMut::new()),
            inflight: RefCell::new(VecDeque::new()),
            batch_at: Cell::new(Instant::now()),
            wake_writer: Wake::default(),
            wake_timer: Wake::default(),
            closed: Cell::new(false),
            wake_close: Wake::default(),
            retiring: Cell::new(false),
            on_failure: RefCell::new(None),
            on_readonly: RefCell::new(None),
            dedicated,
            started: Cell::new(true),
            tracking_seen: Cell::new(0),
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

    /// Whether [`NodeConn::close`] was called or a dedicated connection failed.
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
    /// As [`NodeConn::send`].
    pub fn send_asking(
        &self,
        resp: &[u8],
        discard: Rc<dyn ReplySink>,
        to: ReplyTo,
    ) -> Result<(), UpstreamError> {
        let deadline = to.deadline;
        self.enqueue(
            |out| {
                out.extend_from_slice(b"*1\r\n$6\r\nASKING\r\n");
                out.extend_from_slice(resp);
            },
            to,
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

    /// How it connects (for another connection to the same node).
    pub fn settings(&self) -> &ConnSettings {
        &self.0.settings
    }

    /// The node this connection goes to.
    pub fn addr(&self) -> &str {
        self.0.addr.as_str()
    }

    /// The host of the node's address, for redirects that name no host.
    pub fn host(&self) -> &str {
        self.0.addr.host()
    }

    /// Whether the connection is up right now.
    pub fn is_up(&self) -> bool {
        self.0.state.get() == State::Up
    }

    /// Queues `req`; its reply goes to `to`. If the reply hasn't come by `to.deadline`, the
    /// connection is reset and every waiting request gets an error.
    ///
    /// # Errors
    /// The error reply to give the client at once: the upstream is down, or its queue is full.
    pub fn send(&self, req: &Request<'_>, to: ReplyTo) -> Result<(), UpstreamError> {
        self.enqueue(|out| req.write_resp(out), to)
    }

    /// Like [`NodeConn::send`] for a command already encoded as RESP (e.g. one held back by
    /// a delay fault).
    ///
    /// # Errors
    /// As [`NodeConn::send`].
    pub fn send_encoded(&self, resp: &[u8], to: ReplyTo) -> Result<(), UpstreamError> {
        self.enqueue(|out| out.extend_from_slice(resp), to)
    }

    pub(super) fn enqueue(
        &self,
        write: impl FnOnce(&mut BytesMut),
        ReplyTo {
            sink,
            token,
            deadline,
        }: ReplyTo,
    ) -> Result<(), UpstreamError> {
        let inner = &self.0;
        if !inner.started.replace(true) {
            tokio::task::spawn_local(self.clone().run());
        }
        if inner.state.get() == State::Down || inner.closed.get() {
            // Whatever took the connection down, this request never went out.
            return Err(match &*inner.down.borrow() {
                UpstreamError::Lost { addr, reason } => UpstreamError::Connect {
                    addr: addr.clone(),
                    reason: reason.clone(),
                },
                other => other.clone(),
            });
        }
        if inner.settings.budget.is_some() {
            crate::tracking::on_send(inner.addr.as_str(), &inner.settings, &inner.tracking_seen);
        }
        let mut out = inner.out.borrow_mut();
        if out.len() >= inner.settings.max_pending_bytes {
            return Err(UpstreamError::QueueFull {
                addr: inner.addr.to_string(),
            });
        }
        let before = out.len();
        if before == 0 {
            inner.batch_at.set(Instant::now());
        }
        write(&mut out);
        if let Some(b) = &inner.settings.budget {
            // Charged in steps, so an ordinary queue of small requests costs no atomics.
            let charged = inner.charged.get();
            if out.len() >= charged + CHARGE_STEP {
                b.charge_queued(out.len() - charged);
                inner.charged.set(out.len());
            }
        }
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
}
