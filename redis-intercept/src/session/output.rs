//! A session's reply bytes that the client socket hasn't taken yet: small replies copied
//! together into one buffer, big ones kept as the upstream read them, so that a backlog of
//! megabyte replies (a client that reads slowly, or not at all) costs no copying.

use std::collections::VecDeque;
use std::io::IoSlice;

use bytes::{Buf, Bytes, BytesMut};
use tokio::net::TcpStream;

use super::input::KEEP_BUFFER;

/// Replies at least this big are queued as they are instead of copied.
pub(super) const OWN_CHUNK: usize = 16 * 1024;

/// Most pieces handed to one vectored write.
const MAX_IOVECS: usize = 64;

/// The bytes owed to the client socket, in order: `chunks`, then `tail`.
#[derive(Default)]
pub(super) struct Output {
    /// Sealed pieces: big replies, and the small ones gathered before each of them.
    chunks: VecDeque<Bytes>,
    /// Small replies gathered since the last sealed piece.
    tail: BytesMut,
    /// Bytes in `chunks` and `tail`.
    len: usize,
}

impl Output {
    /// Bytes waiting.
    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing waits.
    pub(super) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends a reply by copying it.
    pub(super) fn push_slice(&mut self, reply: &[u8]) {
        self.tail.extend_from_slice(reply);
        self.len += reply.len();
    }

    /// Appends a reply: a big one is queued as it is, a small one copied.
    pub(super) fn push(&mut self, reply: Bytes) {
        if reply.len() < OWN_CHUNK {
            return self.push_slice(&reply);
        }
        if !self.tail.is_empty() {
            let gathered = self.tail.split().freeze();
            self.chunks.push_back(gathered);
        }
        self.len += reply.len();
        self.chunks.push_back(reply);
    }

    /// Writes as much as the socket takes without waiting.
    ///
    /// # Errors
    /// The socket failed (`WouldBlock` is not an error: the rest waits).
    pub(super) fn write_to(&mut self, stream: &TcpStream) -> std::io::Result<()> {
        while self.len > 0 {
            let written = if self.chunks.is_empty() {
                stream.try_write(&self.tail)
            } else {
                let mut slices: Vec<IoSlice<'_>> = self
                    .chunks
                    .iter()
                    .take(MAX_IOVECS - 1)
                    .map(|c| IoSlice::new(c))
                    .collect();
                if slices.len() < MAX_IOVECS - 1 {
                    slices.push(IoSlice::new(&self.tail));
                }
                stream.try_write_vectored(&slices)
            };
            match written {
                Ok(n) => self.advance(n),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        if self.tail.is_empty() && self.tail.capacity() > KEEP_BUFFER {
            self.tail = BytesMut::new();
        }
        Ok(())
    }

    /// Drops `n` written bytes from the front.
    fn advance(&mut self, mut n: usize) {
        self.len -= n;
        while n > 0 {
            match self.chunks.front_mut() {
                Some(c) if c.len() <= n => {
                    n -= c.len();
                    self.chunks.pop_front();
                }
                Some(c) => {
                    c.advance(n);
                    return;
                }
                None => {
                    self.tail.advance(n);
                    return;
                }
            }
        }
    }

    /// Moves everything waiting to the end of `to` (whole replies: a subscribed client's
    /// pipe writes them between pushes).
    pub(super) fn drain_into(&mut self, to: &mut BytesMut) {
        for chunk in self.chunks.drain(..) {
            to.extend_from_slice(&chunk);
        }
        to.extend_from_slice(&self.tail);
        self.tail.clear();
        self.len = 0;
    }

    /// Drops everything, buffers included.
    pub(super) fn clear(&mut self) {
        *self = Output::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_keep_their_order_through_partial_writes() {
        let mut out = Output::default();
        out.push_slice(b"+a\r\n");
        out.push(Bytes::from(vec![b'x'; OWN_CHUNK]));
        out.push(Bytes::from_static(b"+b\r\n"));
        assert_eq!(out.len(), 8 + OWN_CHUNK);
        assert_eq!(
            out.chunks.len(),
            2,
            "the small reply before the big one is sealed"
        );
        out.advance(2);
        out.advance(2 + OWN_CHUNK - 1);
        assert_eq!(out.chunks.len(), 1);
        assert_eq!(&out.chunks[0][..], b"x");
        out.advance(1);
        assert_eq!(&out.tail[..], b"+b\r\n");
        assert_eq!(out.len(), 4);
        out.advance(3);
        assert_eq!(&out.tail[..], b"\n");
    }
}
