//! A worker's listener on one node for client-side caching: a RESP3 connection in
//! `CLIENT TRACKING ON BCAST NOLOOP` mode, to which Redis pushes every key modified on the
//! node by anyone but the listener itself. It reports them to the worker's tracker
//! (`tracking.rs`), and reports when it is up and when it is lost, since keys modified while
//! it is down go unseen. NOLOOP clients' writes run on it, so that Redis doesn't report them
//! and the proxy knows who wrote (it tells every other reader itself).

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::{Rc, Weak};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::{debug, warn};

use super::connect::{open, read_replies};
use super::driver::BACKOFF_START;
use super::{ConnSettings, ReplyTo, UpstreamError};
use crate::config::NodeAddr;
use crate::resp::Frame;
use crate::tracking::Tracker;
use crate::wake::Wake;

/// Read buffer growth step.
const READ_CHUNK: usize = 16 * 1024;

/// Most NOLOOP writes waiting on one listener (each client has at most one); more go the
/// ordinary way.
const MAX_WRITES: usize = 4096;

/// One node's listener.
pub struct Listener {
    /// The node.
    addr: NodeAddr,
    /// How to reach it (RESP3, no database, no READONLY).
    settings: ConnSettings,
    /// Set by [`Listener::close`].
    closed: Cell<bool>,
    /// Wakes the task to end.
    wake_close: Wake,
    /// Connected with tracking on.
    up: Cell<bool>,
    /// NOLOOP clients' writes sent on it, waiting for their replies, in order.
    waiting: RefCell<VecDeque<NoloopWrite>>,
    /// Their bytes not yet written.
    out: RefCell<BytesMut>,
    /// Wakes the task to write them.
    wake_write: Wake,
}

/// A NOLOOP client's write sent over a listener (see `tracking.rs`): Redis reports the keys
/// it modifies to no one (the listener is in NOLOOP mode), and the proxy tells the other
/// clients itself.
pub struct NoloopWrite {
    /// Where its reply goes.
    pub to: ReplyTo,
    /// The writing client.
    pub client: u64,
    /// The keys it writes.
    pub keys: Vec<bytes::Bytes>,
    /// The client speaks RESP2: the listener's RESP3 reply is re-encoded.
    pub resp2: bool,
    /// Sends the write again the ordinary way (it was redirected, so it didn't run).
    pub redo: Box<dyn FnOnce()>,
}

impl Listener {
    /// Starts the listener for `addr` on the current `LocalSet`.
    pub fn start(addr: &str, settings: &ConnSettings, tracker: Weak<Tracker>) -> Rc<Listener> {
        let mut settings = settings.clone();
        settings.protocol = Some(3);
        settings.readonly = false;
        settings.db = 0;
        settings.budget = None;
        settings.write_delay = Duration::ZERO;
        let listener = Rc::new(Listener {
            addr: NodeAddr::unparsed(addr.to_owned()),
            settings,
            closed: Cell::new(false),
            wake_close: Wake::default(),
            up: Cell::new(false),
            waiting: RefCell::default(),
            out: RefCell::default(),
            wake_write: Wake::default(),
        });
        tokio::task::spawn_local(Rc::clone(&listener).run(tracker));
        listener
    }

    /// Whether it is connected with tracking on.
    pub fn is_up(&self) -> bool {
        self.up.get()
    }

    /// Sends a NOLOOP client's write; gives it back if the listener is down.
    pub fn send(&self, request: &[u8], write: NoloopWrite) -> Result<(), NoloopWrite> {
        if !self.up.get() || self.waiting.borrow().len() >= MAX_WRITES {
            return Err(write);
        }
        self.out.borrow_mut().extend_from_slice(request);
        self.waiting.borrow_mut().push_back(write);
        self.wake_write.notify();
        Ok(())
    }

    /// Fails the writes waiting for a reply: the connection is gone, and whether they ran is
    /// unknown, as for any lost connection.
    fn fail_writes(&self, why: &str) {
        self.out.borrow_mut().clear();
        let waiting: Vec<NoloopWrite> = self.waiting.borrow_mut().drain(..).collect();
        let error = UpstreamError::Lost {
            addr: self.addr.to_string(),
            reason: why.to_owned(),
        };
        for w in waiting {
            w.to.answer(error.reply());
        }
    }

    /// Ends the listener (nobody tracks any more).
    pub fn close(&self) {
        self.closed.set(true);
        self.wake_close.notify();
    }

    async fn run(self: Rc<Self>, tracker: Weak<Tracker>) {
        let mut backoff = BACKOFF_START;
        while !self.closed.get() {
            let served = tokio::select! {
                r = self.serve(&tracker) => r,
                () = self.wake_close.wait() => return,
            };
            let Some(t) = tracker.upgrade() else { return };
            match served {
                Ok(why) => {
                    // It was up: the tracker counted it up, and counts it down now.
                    warn!(upstream = %self.addr, reason = %why, "tracking listener lost");
                    if self.closed.get() {
                        return;
                    }
                    t.listener_down();
                    backoff = BACKOFF_START;
                }
                Err(why) => {
                    debug!(upstream = %self.addr, reason = %why, "tracking listener failed to start");
                }
            }
            drop(t);
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                () = self.wake_close.wait() => return,
            }
            backoff = (backoff * 2).min(self.settings.backoff_max.max(BACKOFF_START));
        }
    }

    /// Connects, turns tracking on and reports pushes until the connection fails: `Err`
    /// before it was up, `Ok` after.
    async fn serve(&self, tracker: &Weak<Tracker>) -> Result<String, String> {
        // `Err` while not up yet; `Ok` once it was.
        let connect = tokio::time::timeout(
            self.settings.connect_timeout,
            open(&self.addr, &self.settings),
        );
        let mut stream = match connect.await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => return Err("connect timed out".to_owned()),
        };
        stream
            .write_all(
                b"*5\r\n$6\r\nCLIENT\r\n$8\r\nTRACKING\r\n$2\r\nON\r\n$5\r\nBCAST\r\n$6\r\nNOLOOP\r\n",
            )
            .await
            .map_err(|e| format!("write failed: {e}"))?;
        let reply = read_replies(&mut stream, 1, &self.settings.limits).await?;
        if reply.first().is_none_or(|r| !r.starts_with(b"+OK")) {
            return Err(format!(
                "CLIENT TRACKING refused: {}",
                String::from_utf8_lossy(reply.first().map_or(&b""[..], |r| &r[..])).trim_end()
            ));
        }
        let Some(t) = tracker.upgrade() else {
            return Err("worker ended".to_owned());
        };
        self.up.set(true);
        t.listener_up();
        drop(t);
        let why = self.pushes(stream, tracker).await;
        self.up.set(false);
        self.fail_writes(&why);
        Ok(why)
    }

    /// Reports the pushes of an established listener until the connection fails; returns
    /// why.
    async fn pushes(&self, stream: super::tls::Stream, tracker: &Weak<Tracker>) -> String {
        let (mut rd, mut wr) = tokio::io::split(stream);
        let mut buf = BytesMut::with_capacity(READ_CHUNK);
        loop {
            buf.reserve(READ_CHUNK);
            // The oldest write's deadline, as on any connection (op_timeout).
            let deadline = self.waiting.borrow().front().map(|w| w.to.deadline);
            let read = tokio::select! {
                r = rd.read_buf(&mut buf) => r,
                () = tokio::time::sleep_until(deadline.unwrap_or_else(far_future)),
                    if deadline.is_some() =>
                {
                    return "a request timed out (op_timeout)".to_owned();
                }
                () = self.wake_write.wait() => {
                    let out = std::mem::take(&mut *self.out.borrow_mut());
                    if !out.is_empty() {
                        if let Err(e) = wr.write_all(&out).await {
                            return format!("write failed: {e}");
                        }
                        if let Err(e) = wr.flush().await {
                            return format!("write failed: {e}");
                        }
                    }
                    continue;
                }
            };
            match read {
                Ok(0) => return "closed by the server".to_owned(),
                Ok(_) => {}
                Err(e) => return format!("read failed: {e}"),
            }
            // Cut whole frames out of what was read; a partial one goes back to `buf`.
            let data = buf.split().freeze();
            let mut pos = 0;
            loop {
                match Frame::parse(&data.slice(pos..), &self.settings.limits) {
                    Ok(Some((frame, len))) => {
                        let raw = data.slice(pos..pos + len);
                        pos += len;
                        let Some(t) = tracker.upgrade() else {
                            return "worker ended".to_owned();
                        };
                        if matches!(frame, Frame::Push(_)) {
                            report(&t, frame);
                        } else {
                            // The reply to the oldest NOLOOP write.
                            let Some(write) = self.waiting.borrow_mut().pop_front() else {
                                return "reply with no request waiting".to_owned();
                            };
                            t.noloop_answered(write, frame, raw);
                        }
                    }
                    Ok(None) => break,
                    Err(e) => return format!("protocol error from server: {e}"),
                }
            }
            buf.extend_from_slice(&data[pos..]);
        }
    }
}

/// A deadline that never comes (for a timer with nothing to time).
fn far_future() -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(86400 * 365)
}

/// Hands one push to the tracker: `invalidate` with keys, or with null for a flush.
fn report(tracker: &Tracker, frame: Frame) {
    let Frame::Push(mut parts) = frame else {
        return;
    };
    if parts.len() != 2 || parts[0] != Frame::Bulk(Bytes::from_static(b"invalidate")) {
        return;
    }
    match parts.pop() {
        Some(Frame::Array(keys)) => {
            let keys: Vec<Bytes> = keys
                .into_iter()
                .filter_map(|k| match k {
                    Frame::Bulk(k) => Some(k),
                    _ => None,
                })
                .collect();
            tracker.invalidated(&keys);
        }
        Some(Frame::Null | Frame::NullBulk | Frame::NullArray) => tracker.flushed(),
        _ => {}
    }
}
