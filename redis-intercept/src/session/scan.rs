//! A cluster-wide SCAN step's reply: the master's own cursor is swapped for the cursor that
//! names the shard and where its scan stands.

use std::rc::Rc;

use bytes::Bytes;

use super::merge::frame;
use crate::cluster::SlotMap;
use crate::resp::Frame;
use crate::upstream::{Reply, ReplySink, error_reply};

/// Rewrites a master's SCAN reply with the cluster-wide cursor.
pub(super) struct ScanSink {
    /// Who gets the reply.
    pub(super) parent: Rc<dyn ReplySink>,
    /// The parent's token.
    pub(super) token: u64,
    /// The map the step was planned with.
    pub(super) map: Rc<SlotMap>,
    /// The shard scanned.
    pub(super) shard: usize,
}

impl ReplySink for ScanSink {
    fn deliver(&self, _token: u64, reply: Reply<'_>) -> bool {
        let reply = reply.into_bytes();
        let rewritten = with_cluster_cursor(reply, &self.map, self.shard).unwrap_or_else(|e| e);
        self.parent.deliver(self.token, rewritten.into())
    }

    fn flush(&self) {
        self.parent.flush();
    }

    fn expects_more(&self) -> bool {
        self.parent.expects_more()
    }
}

/// `shard`'s master's SCAN reply with its cursor replaced by the cluster-wide one; an error
/// reply as it is.
fn with_cluster_cursor(reply: Bytes, map: &SlotMap, shard: usize) -> Result<Bytes, Bytes> {
    if reply.first() == Some(&b'-') {
        return Ok(reply);
    }
    let Frame::Array(mut items) = frame(&reply)? else {
        return Err(error_reply("unexpected SCAN reply from a cluster node"));
    };
    let node_next = match items.first() {
        Some(Frame::Bulk(c)) => std::str::from_utf8(c)
            .ok()
            .and_then(|c| c.parse::<u64>().ok()),
        _ => None,
    }
    .ok_or_else(|| error_reply("unexpected SCAN reply from a cluster node"))?;
    let next = map
        .scan_next(shard, node_next)
        .ok_or_else(|| error_reply("a node's SCAN cursor is too large for the proxy"))?;
    if let Some(c) = items.first_mut() {
        *c = Frame::Bulk(Bytes::from(next.to_string()));
    }
    Ok(Frame::Array(items).to_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::{ScanCursor, Slot};

    fn two_shards() -> SlotMap {
        let mut map = SlotMap::empty();
        for s in 0..8192 {
            map.set_owner(Slot::new(s).unwrap(), "127.0.0.1:7000");
        }
        for s in 8192..16384 {
            map.set_owner(Slot::new(s).unwrap(), "127.0.0.1:7001");
        }
        map
    }

    fn cursor_of(reply: &Bytes) -> u64 {
        let Ok(Frame::Array(items)) = frame(reply) else {
            panic!("not an array: {reply:?}");
        };
        let Some(Frame::Bulk(c)) = items.first() else {
            panic!("no cursor");
        };
        std::str::from_utf8(c).unwrap().parse().unwrap()
    }

    #[test]
    fn a_shard_with_more_keeps_its_place_and_a_finished_one_moves_on() {
        let map = two_shards();
        let reply = |cursor: &str| {
            Bytes::from(format!(
                "*2\r\n${}\r\n{cursor}\r\n*1\r\n$1\r\nk\r\n",
                cursor.len()
            ))
        };
        let more = with_cluster_cursor(reply("17"), &map, 0).unwrap();
        let c = ScanCursor::decode(cursor_of(&more));
        assert_eq!((c.anchor.get(), c.node), (0, 17));
        assert_eq!(c.tag, ScanCursor::tag_of("127.0.0.1:7000"));
        let next = with_cluster_cursor(reply("0"), &map, 0).unwrap();
        let c = ScanCursor::decode(cursor_of(&next));
        assert_eq!((c.anchor.get(), c.node), (8192, 0));
        // The last shard done: the iteration is complete.
        let done = with_cluster_cursor(reply("0"), &map, 1).unwrap();
        assert_eq!(cursor_of(&done), 0);
    }

    #[test]
    fn errors_pass_and_odd_replies_are_refused() {
        let map = two_shards();
        let err = Bytes::from_static(b"-ERR invalid cursor\r\n");
        assert_eq!(with_cluster_cursor(err.clone(), &map, 0), Ok(err));
        assert!(with_cluster_cursor(Bytes::from_static(b":1\r\n"), &map, 0).is_err());
    }
}
