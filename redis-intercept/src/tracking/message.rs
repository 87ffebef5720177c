//! Invalidation messages: what the tracker sends, and how each is encoded for its receiver,
//! as Redis sends it (a RESP3 push, or a RESP2 `__redis__:invalidate` message to a
//! subscribed redirect target).

use bytes::Bytes;

/// An invalidation message, before it is encoded for its receiver's protocol.
pub enum Message<'a> {
    /// These keys changed.
    Keys(&'a [Bytes]),
    /// Everything (a flush, a listener restart).
    All,
    /// The client this one redirects to is gone (RESP3 only).
    RedirBroken(u64),
}

/// Hands a message to client `target` (the tracking client itself, or the one it
/// redirects to, `redirected`); false when no such client is connected.
pub type Deliver = dyn Fn(u64, bool, &Message<'_>) -> bool;

/// Encodes `msg` for a receiver in RESP3 (`resp3`), or in RESP2 subscribed and redirected
/// to (`pubsub`); `None` when Redis would send that receiver nothing.
pub fn encode(msg: &Message<'_>, resp3: bool, redirected_pubsub: bool) -> Option<Bytes> {
    use crate::resp::Frame;
    let value = match msg {
        Message::Keys(keys) => Frame::Array(keys.iter().cloned().map(Frame::Bulk).collect()),
        Message::All if resp3 => Frame::Null,
        Message::All => Frame::NullBulk,
        Message::RedirBroken(id) if resp3 => {
            return Some(
                Frame::Push(vec![
                    Frame::Bulk(Bytes::from_static(b"tracking-redir-broken")),
                    Frame::Integer(*id as i64),
                ])
                .to_bytes(),
            );
        }
        Message::RedirBroken(_) => return None,
    };
    if resp3 {
        Some(Frame::Push(vec![Frame::Bulk(Bytes::from_static(b"invalidate")), value]).to_bytes())
    } else if redirected_pubsub {
        Some(
            Frame::Array(vec![
                Frame::Bulk(Bytes::from_static(b"message")),
                Frame::Bulk(Bytes::from_static(b"__redis__:invalidate")),
                value,
            ])
            .to_bytes(),
        )
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_encoded_as_redis_sends_them() {
        let keys = [Bytes::from_static(b"k")];
        let msg = Message::Keys(&keys);
        assert_eq!(
            encode(&msg, true, false).as_deref(),
            Some(&b">2\r\n$10\r\ninvalidate\r\n*1\r\n$1\r\nk\r\n"[..])
        );
        assert_eq!(
            encode(&msg, false, true).as_deref(),
            Some(&b"*3\r\n$7\r\nmessage\r\n$20\r\n__redis__:invalidate\r\n*1\r\n$1\r\nk\r\n"[..])
        );
        assert_eq!(encode(&msg, false, false), None);
        assert_eq!(
            encode(&Message::All, true, false).as_deref(),
            Some(&b">2\r\n$10\r\ninvalidate\r\n_\r\n"[..])
        );
        assert_eq!(
            encode(&Message::All, false, true).as_deref(),
            Some(&b"*3\r\n$7\r\nmessage\r\n$20\r\n__redis__:invalidate\r\n$-1\r\n"[..])
        );
    }
}
