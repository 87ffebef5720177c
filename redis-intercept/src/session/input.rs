//! A client's unparsed input: a buffer that grows while reads fill it, up to the query buffer
//! limit, and shrinks again when the client goes idle.

use std::io::Read;

use std::sync::Arc;
use tokio::io::Interest;
use tokio::net::TcpStream;

use crate::budget::QueryBudget;

/// Initial read buffer of a client; grows while reads fill it.
pub(super) const READ_START: usize = 4 * 1024;

/// Largest read buffer growth step.
pub(super) const READ_MAX_STEP: usize = 256 * 1024;

/// Buffers larger than this are released when empty, so an idle client costs little.
pub(super) const KEEP_BUFFER: usize = 16 * 1024;

/// A client's unparsed input. The buffer stays initialized, so reads go straight into it
/// without unsafe code; `start..end` are the bytes not yet consumed.
#[derive(Default)]
pub(super) struct InputBuf {
    /// The process-wide budget its allocation is charged to (`None` in tests).
    pub(super) budget: Option<Arc<QueryBudget>>,
    /// The client, for the budget's permit.
    pub(super) client: u64,
    /// Bytes charged to the budget: the buffer's size.
    pub(super) charged: usize,
    /// Storage; allocated on the first read.
    pub(super) buf: Vec<u8>,
    /// First unconsumed byte.
    pub(super) start: usize,
    /// One past the last byte read.
    pub(super) end: usize,
}

impl InputBuf {
    /// An empty buffer for client `client`, charged to `budget` as it grows.
    pub(super) fn new(budget: Arc<QueryBudget>, client: u64) -> InputBuf {
        InputBuf {
            budget: Some(budget),
            client,
            charged: 0,
            buf: Vec::new(),
            start: 0,
            end: 0,
        }
    }

    /// Whether the client may be read now: under its own limit (else `Err`: it is to be
    /// closed, as Redis closes a client past `client-query-buffer-limit`), and `Ok(false)`
    /// while the budget is spent and the client holds much.
    pub(super) fn may_read(&self) -> Result<bool, ()> {
        let Some(b) = &self.budget else {
            return Ok(true);
        };
        if self.len() >= b.client_limit {
            return Err(());
        }
        Ok(b.may_read(self.client, self.buf.len()))
    }

    /// Keeps the budget's count equal to the buffer's size.
    fn recharge(&mut self) {
        let Some(b) = &self.budget else { return };
        let size = self.buf.len();
        if size > self.charged {
            b.charge(size - self.charged);
        } else if size < self.charged {
            b.refund(self.charged - size);
        }
        self.charged = size;
        if size == 0 {
            b.done(self.client);
        }
    }

    pub(super) fn data(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    pub(super) fn len(&self) -> usize {
        self.end - self.start
    }

    pub(super) fn is_empty(&self) -> bool {
        self.start == self.end
    }

    pub(super) fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start >= self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    pub(super) fn clear(&mut self) {
        self.start = 0;
        self.end = 0;
    }

    /// Drops a large buffer once it is empty.
    pub(super) fn release_if_empty(&mut self) {
        if self.is_empty() && self.buf.len() > KEEP_BUFFER {
            self.buf = Vec::new();
            self.recharge();
        }
        if self.is_empty()
            && let Some(b) = &self.budget
        {
            // Nothing pending: a permit it held goes to the next big holder.
            b.done(self.client);
        }
    }

    /// Room for the next read: compacts, then grows while reads fill the buffer.
    pub(super) fn spare(&mut self) -> &mut [u8] {
        if self.start > 0 && self.buf.len() - self.end < READ_START / 2 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.buf.len() - self.end < READ_START / 2 {
            let grow = self.buf.len().clamp(READ_START, READ_MAX_STEP);
            self.buf.resize(self.buf.len() + grow, 0);
            self.recharge();
        }
        &mut self.buf[self.end..]
    }
}

/// Reads what the socket has without waiting. `Ok(None)`: nothing yet. `Ok(Some(0))`: the
/// client closed its side.
///
/// A read that returns less than asked has emptied the socket; reporting "would block" to
/// tokio then clears its readiness, which saves the `read` that would only say EAGAIN.
pub(super) fn read_input(
    stream: &TcpStream,
    input: &mut InputBuf,
) -> std::io::Result<Option<usize>> {
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

impl Drop for InputBuf {
    fn drop(&mut self) {
        self.buf = Vec::new();
        self.recharge();
    }
}
