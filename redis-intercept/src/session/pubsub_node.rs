//! A subscribed client's connection to one node: opening it, reading its pushes and replies,
//! and the subscription counts in its confirmations.

use std::pin::Pin;
use std::task::Poll;

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncWrite;

use super::pubsub::PipeEvent;
use crate::config::NodeAddr;
use crate::resp::ReplyScanner;
use crate::upstream::tls::Stream;
use crate::upstream::{ConnSettings, UpstreamError, error_reply};

/// How much room a read from a node gets.
const READ_CHUNK: usize = 16 * 1024;

/// One of a subscribed client's node connections.
pub(super) struct Node {
    /// `host:port`.
    pub(super) addr: String,
    /// The connection.
    pub(super) stream: Stream,
    /// Client commands not yet written.
    pub(super) to_node: BytesMut,
    /// A write may still sit in a TLS buffer.
    pub(super) unflushed: bool,
    /// Bytes not yet cut into frames.
    pub(super) from_node: BytesMut,
    /// Where the next frame ends.
    pub(super) scanner: ReplyScanner,
    /// The client's shard channels on this node (the node's last count).
    pub(super) shards: i64,
    /// The client's channels and patterns on this node (the node's last count).
    pub(super) channels: i64,
}

impl Node {
    pub(super) fn new(addr: String, stream: Stream) -> Node {
        Node {
            addr,
            stream,
            to_node: BytesMut::new(),
            unflushed: false,
            from_node: BytesMut::new(),
            scanner: ReplyScanner::default(),
            shards: 0,
            channels: 0,
        }
    }
}

/// Opens a pub/sub connection to `addr`; the error reply if it fails.
pub(super) async fn open_node(addr: &str, settings: &ConnSettings) -> Result<Stream, Bytes> {
    let node = NodeAddr::parse(addr).map_err(|e| error_reply(&e))?;
    let e = match tokio::time::timeout(
        settings.connect_timeout,
        crate::upstream::open(&node, settings),
    )
    .await
    {
        Ok(Ok(stream)) => return Ok(stream),
        Ok(Err(UpstreamError::Connect { reason, .. } | UpstreamError::Auth { reason, .. })) => {
            UpstreamError::Connect {
                addr: addr.to_owned(),
                reason,
            }
        }
        Ok(Err(other)) => other,
        Err(_) => UpstreamError::Connect {
            addr: addr.to_owned(),
            reason: "connect timed out".to_owned(),
        },
    };
    Err(e.reply())
}

/// Which count a subscription confirmation carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Counts {
    /// Channels and patterns (`subscribe`, `unsubscribe`, `psubscribe`, `punsubscribe`).
    Channels,
    /// Shard channels (`ssubscribe`, `sunsubscribe`).
    Shards,
}

/// What a (un)subscribe confirmation (`*3 <kind> <channel> :n`, or a RESP3 push
/// `>3 <kind> <channel> :n`) counts, the count, and where that integer starts; `None` for
/// any other frame.
pub(super) fn confirmation(frame: &[u8]) -> Option<(Counts, usize, i64)> {
    pub(super) const KINDS: [(&[u8], Counts); 6] = [
        (b"3\r\n$9\r\nsubscribe\r\n", Counts::Channels),
        (b"3\r\n$11\r\nunsubscribe\r\n", Counts::Channels),
        (b"3\r\n$10\r\npsubscribe\r\n", Counts::Channels),
        (b"3\r\n$12\r\npunsubscribe\r\n", Counts::Channels),
        (b"3\r\n$10\r\nssubscribe\r\n", Counts::Shards),
        (b"3\r\n$12\r\nsunsubscribe\r\n", Counts::Shards),
    ];
    let rest = frame
        .strip_prefix(b"*")
        .or_else(|| frame.strip_prefix(b">"))?;
    let kind = KINDS
        .iter()
        .find(|(head, _)| rest.starts_with(head))
        .map(|&(_, kind)| kind)?;
    let body = frame.strip_suffix(b"\r\n")?;
    // The count is the last element; the channel before it ends with CRLF.
    let colon = body.windows(3).rposition(|w| w == b"\r\n:")? + 2;
    let n = std::str::from_utf8(&body[colon + 1..]).ok()?.parse().ok()?;
    Some((kind, colon, n))
}

/// What places a channel on a cluster: its name, except for a keyspace notification channel
/// (`__keyspace@<db>__:<key>`), which only the node holding the key publishes to.
pub(super) fn placed_by(channel: &[u8]) -> &[u8] {
    channel
        .strip_prefix(b"__keyspace@")
        .and_then(|rest| {
            let at = rest.windows(3).position(|w| w == b"__:")?;
            rest.get(at + 3..)
        })
        .unwrap_or(channel)
}

/// Polls one node: its pending write (or flush), then a read.
pub(super) fn poll_node(
    i: usize,
    node: &mut Node,
    cx: &mut std::task::Context<'_>,
) -> Option<PipeEvent> {
    if !node.to_node.is_empty() {
        match Pin::new(&mut node.stream).poll_write(cx, &node.to_node) {
            Poll::Ready(Ok(n)) => return Some(PipeEvent::NodeWrote(i, n)),
            Poll::Ready(Err(e)) => return Some(PipeEvent::NodeFailed(i, e)),
            Poll::Pending => {}
        }
    } else if node.unflushed {
        match Pin::new(&mut node.stream).poll_flush(cx) {
            Poll::Ready(Ok(())) => return Some(PipeEvent::NodeFlushed(i)),
            Poll::Ready(Err(e)) => return Some(PipeEvent::NodeFailed(i, e)),
            Poll::Pending => {}
        }
    }
    node.from_node.reserve(READ_CHUNK);
    match tokio_util::io::poll_read_buf(Pin::new(&mut node.stream), cx, &mut node.from_node) {
        Poll::Ready(Ok(n)) => Some(PipeEvent::NodeRead(i, n)),
        Poll::Ready(Err(e)) => Some(PipeEvent::NodeFailed(i, e)),
        Poll::Pending => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_found_at_the_end_of_confirmations() {
        let f = b"*3\r\n$10\r\nssubscribe\r\n$3\r\na:b\r\n:12\r\n";
        let (kind, at, n) = confirmation(f).unwrap_or((Counts::Channels, 0, 0));
        assert_eq!((kind, n), (Counts::Shards, 12));
        assert_eq!(&f[at..], b":12\r\n");
        // A channel name that looks like the count doesn't fool it.
        let f = b"*3\r\n$12\r\nsunsubscribe\r\n$5\r\nx\r\n:7\r\n:0\r\n";
        assert_eq!(
            confirmation(f).map(|(k, _, n)| (k, n)),
            Some((Counts::Shards, 0))
        );
        assert_eq!(
            confirmation(b"*3\r\n$9\r\nsubscribe\r\n$1\r\na\r\n:1\r\n").map(|(k, _, n)| (k, n)),
            Some((Counts::Channels, 1))
        );
        // UNSUBSCRIBE with nothing subscribed names no channel.
        assert_eq!(
            confirmation(b"*3\r\n$11\r\nunsubscribe\r\n$-1\r\n:0\r\n").map(|(k, _, n)| (k, n)),
            Some((Counts::Channels, 0))
        );
        assert_eq!(
            confirmation(b">3\r\n$9\r\nsubscribe\r\n$1\r\na\r\n:2\r\n").map(|(k, _, n)| (k, n)),
            Some((Counts::Channels, 2))
        );
        assert_eq!(
            confirmation(b"*3\r\n$12\r\npunsubscribe\r\n$2\r\np*\r\n:3\r\n").map(|(_, _, n)| n),
            Some(3)
        );
        assert_eq!(
            confirmation(b"*3\r\n$7\r\nmessage\r\n$1\r\na\r\n:1\r\n"),
            None
        );
        assert_eq!(
            confirmation(b"*3\r\n$8\r\nsmessage\r\n$1\r\na\r\n$1\r\nb\r\n"),
            None
        );
    }

    #[test]
    fn keyspace_channels_are_placed_by_their_key() {
        assert_eq!(placed_by(b"__keyspace@0__:user:1"), b"user:1");
        assert_eq!(placed_by(b"__keyspace@12__:a__:b"), b"a__:b");
        assert_eq!(placed_by(b"news"), b"news");
        assert_eq!(placed_by(b"__keyevent@0__:set"), b"__keyevent@0__:set");
    }
}
