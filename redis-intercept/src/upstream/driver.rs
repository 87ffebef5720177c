//! The task that drives one connection: connect, write queued requests in batches, cut
//! replies at frame boundaries and hand them to their sinks, and on failure fail the waiting
//! requests and reconnect with backoff.

use std::rc::Rc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::conn::{InFlight, State};
use super::tls::Stream;
use super::{NodeConn, Reply, ReplySink, UpstreamError, open};
use crate::metrics::GaugeGuard;
use crate::metrics::LatencyBatch;
use crate::resp::ReplyScanner;

/// First reconnect delay after a failed attempt; doubles up to `backoff_max`.
pub(super) const BACKOFF_START: Duration = Duration::from_millis(50);

/// Read buffer growth step for upstream replies.
pub(super) const READ_CHUNK: usize = 64 * 1024;

/// A connection with a write delay (a mirror) writes as soon as this much is queued, without
/// waiting out the delay.
pub(super) const BATCH_BYTES: usize = 64 * 1024;

/// Write buffers larger than this are released once empty, so one big value doesn't pin
/// memory forever.
pub(super) const KEEP_BUFFER: usize = 1024 * 1024;

impl NodeConn {
    /// Drives the connection until [`NodeConn::close`]: connect, serve, and on failure fail
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
            let error = match attempt {
                Ok(Ok(stream)) => {
                    if inner.dedicated {
                        debug!(upstream = %inner.addr, "dedicated connection up");
                    } else {
                        info!(upstream = %inner.addr, "connected");
                    }
                    inner.state.set(State::Up);
                    if inner.settings.budget.is_some() && crate::command::learned::start_learning()
                    {
                        // The first upstream the proxy reaches teaches it the commands newer
                        // than its built-in table.
                        let (addr, settings) = (inner.addr.to_string(), inner.settings.clone());
                        tokio::task::spawn_local(learn_commands(addr, settings));
                    }
                    let up = GaugeGuard::new(&inner.metrics.up);
                    backoff = BACKOFF_START;
                    let reason = self.serve(stream).await;
                    drop(up);
                    // A connection that worked gets one immediate retry before backoff.
                    reconnect_now = true;
                    UpstreamError::Lost {
                        addr: inner.addr.to_string(),
                        reason,
                    }
                }
                Ok(Err(e)) => {
                    reconnect_now = false;
                    e
                }
                Err(_) => {
                    reconnect_now = false;
                    UpstreamError::Connect {
                        addr: inner.addr.to_string(),
                        reason: format!(
                            "connect timed out after {:?}",
                            inner.settings.connect_timeout
                        ),
                    }
                }
            };
            if inner.closed.get() {
                self.fail_all(&UpstreamError::ShuttingDown);
                break;
            }
            inner.metrics.failures.inc();
            let hook = inner.on_failure.borrow().clone();
            if let Some(hook) = hook {
                hook();
            }
            let reason = match &error {
                UpstreamError::Auth { reason, .. } => format!("authentication failed: {reason}"),
                UpstreamError::Connect { reason, .. } | UpstreamError::Lost { reason, .. } => {
                    reason.clone()
                }
                other => other.to_string(),
            };
            self.fail_all(&error);
            *inner.down.borrow_mut() = error;
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
        self.fail_all(&UpstreamError::ShuttingDown);
    }

    /// Serves one established connection until it fails; returns why it ended.
    pub(super) async fn serve(&self, stream: Stream) -> String {
        match stream {
            Stream::Plain(tcp) => self.serve_plain(&tcp).await,
            Stream::Tls(tls) => self.serve_tls(*tls).await,
        }
    }

    /// The plain TCP path: reads and writes driven by readiness, so a short read needs no
    /// second read to learn that the socket is empty.
    pub(super) async fn serve_plain(&self, stream: &TcpStream) -> String {
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
                    Ok(n) => replies.pace(n).await,
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
    pub(super) async fn serve_tls(
        &self,
        stream: tokio_rustls::client::TlsStream<TcpStream>,
    ) -> String {
        let (mut rd, mut wr) = tokio::io::split(stream);
        let reader = async {
            let mut replies = Replies::default();
            loop {
                let buf = replies.room();
                match rd.read_buf(buf).await {
                    Ok(0) => return "closed by the server".to_owned(),
                    Ok(n) => replies.pace(n).await,
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
    pub(super) fn take_replies(&self, replies: &mut Replies) -> Result<(), String> {
        let inner = &*self.0;
        let Replies {
            buf,
            scanner,
            to_flush,
            deferred,
            since_yield: _,
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
    pub(super) async fn next_out(&self, spare: &mut BytesMut) -> bool {
        loop {
            {
                let mut out = self.0.out.borrow_mut();
                if !out.is_empty() {
                    std::mem::swap(&mut *out, spare);
                    // The batch is the writer's now: it is written or dropped with the
                    // connection, and the queue can take more.
                    self.written();
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

    /// Gives request bytes that left the queue (taken by the writer, or dropped with their
    /// requests) back to the input budget.
    pub(super) fn written(&self) {
        let charged = self.0.charged.replace(0);
        if charged > 0
            && let Some(b) = &self.0.settings.budget
        {
            b.refund_queued(charged);
        }
    }

    /// Runs a connection's reader and writer with the op-timeout watcher until one ends.
    pub(super) async fn serve_io(
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
            self.fail_all(&UpstreamError::Timeout {
                addr: inner.addr.to_string(),
            });
        }
        reason
    }

    /// Answers every waiting request with `reply` and drops unsent bytes.
    pub(super) fn fail_all(&self, error: &UpstreamError) {
        let inner = &*self.0;
        {
            let mut out = inner.out.borrow_mut();
            self.written();
            out.clear();
        }
        let waiting: Vec<InFlight> = inner.inflight.borrow_mut().drain(..).collect();
        let mut to_flush = Vec::new();
        for req in waiting {
            if req.sink.fail(req.token, error) {
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
pub(super) struct Replies {
    /// Bytes read and not yet cut into replies.
    pub(super) buf: BytesMut,
    /// Where the scan of `buf` stands.
    pub(super) scanner: ReplyScanner,
    /// Sinks that asked for a flush in the current batch.
    pub(super) to_flush: Vec<Rc<dyn ReplySink>>,
    /// Sinks whose flush waits for the other connections read in the same tick.
    pub(super) deferred: Vec<Rc<dyn ReplySink>>,
    /// Bytes read since the task last let the worker poll for I/O.
    pub(super) since_yield: usize,
}

/// A connection that keeps having replies to read lets the worker look at its other sockets
/// after this many bytes: a stream of big replies must not keep small ones elsewhere waiting.
const YIELD_AFTER: usize = 256 * 1024;

impl Replies {
    /// Flushes the deferred sinks after letting every task already queued on this worker
    /// run: the connections woken by the same poll deliver their replies first, so each
    /// client gets one write with all of them.
    pub(super) async fn flush_deferred(&mut self) {
        if self.deferred.is_empty() {
            return;
        }
        yield_to_queued().await;
        for sink in self.deferred.drain(..) {
            sink.flush();
        }
    }

    /// Counts `n` bytes read without waiting; past [`YIELD_AFTER`], yields to the runtime
    /// (which polls for I/O before this task runs again).
    pub(super) async fn pace(&mut self, n: usize) {
        self.since_yield += n;
        if self.since_yield >= YIELD_AFTER {
            self.since_yield = 0;
            tokio::task::yield_now().await;
        }
    }

    /// The read buffer, with room for the next read.
    pub(super) fn room(&mut self) -> &mut BytesMut {
        if self.buf.capacity() - self.buf.len() < READ_CHUNK / 4 {
            self.buf.reserve(READ_CHUNK);
        }
        &mut self.buf
    }
}

/// Reads `COMMAND` from `addr` and merges what the built-in table lacks
/// (`command::learned`).
async fn learn_commands(addr: String, settings: super::ConnSettings) {
    match super::one_command(&addr, &settings, &[b"COMMAND"]).await {
        Ok(reply) => match crate::resp::Frame::parse(&reply, &settings.limits) {
            Ok(Some((frame, _))) => {
                let n = crate::command::learned::learn(&frame);
                info!(upstream = %addr, commands = n, "learned the commands the upstream has beyond the built-in table");
            }
            _ => warn!(upstream = %addr, "COMMAND reply unreadable; unknown commands stay unknown"),
        },
        Err(e) => {
            warn!(upstream = %addr, error = %e, "COMMAND failed; unknown commands stay unknown")
        }
    }
}

/// Returns after every task queued on this worker before the caller has been polled once.
///
/// The task wakes itself at once, which on a `LocalSet` puts it at the back of the local
/// queue, behind the tasks the I/O driver woke in the same poll. (`tokio::task::yield_now`
/// would wait for another driver poll, a system call.)
pub(super) async fn yield_to_queued() {
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
pub(super) fn release(spare: &mut BytesMut) {
    spare.clear();
    if spare.capacity() > KEEP_BUFFER {
        *spare = BytesMut::new();
    }
}
