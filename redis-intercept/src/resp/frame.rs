//! A complete RESP2/RESP3 value, for replies the proxy builds or merges itself.

use bytes::{Bytes, BytesMut};

use super::{Limits, ProtocolError, ReplyScanner, parse_i64, write_header};

/// One RESP value. Text-like payloads stay `Bytes` (Redis doesn't promise UTF-8), and doubles
/// and big numbers keep their text so that re-encoding gives back the same bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// `+OK`
    Simple(Bytes),
    /// `-ERR message`
    Error(Bytes),
    /// `:42`
    Integer(i64),
    /// `$3\r\nfoo`
    Bulk(Bytes),
    /// RESP2 null bulk, `$-1`.
    NullBulk,
    /// RESP2 null array, `*-1`.
    NullArray,
    /// `*N` followed by N values.
    Array(Vec<Frame>),
    /// RESP3 null, `_`.
    Null,
    /// RESP3 `#t` / `#f`.
    Boolean(bool),
    /// RESP3 `,1.5` (the text after the comma).
    Double(Bytes),
    /// RESP3 `(123…` (the digits).
    BigNumber(Bytes),
    /// RESP3 `!N` bulk error.
    BulkError(Bytes),
    /// RESP3 `=N` verbatim string, including its `txt:` prefix.
    Verbatim(Bytes),
    /// RESP3 `%N` map of key/value pairs.
    Map(Vec<(Frame, Frame)>),
    /// RESP3 `~N` set.
    Set(Vec<Frame>),
    /// RESP3 `>N` push.
    Push(Vec<Frame>),
    /// RESP3 `|N` attribute map and the value it decorates.
    Attribute(Vec<(Frame, Frame)>, Box<Frame>),
}

impl Frame {
    /// Parses the first frame in `buf`: `Ok(Some((frame, len)))`, or `Ok(None)` if incomplete.
    /// The bytes are checked with a [`ReplyScanner`] first, so parsing itself can't fail
    /// halfway or go deeper than `limits` allow.
    ///
    /// # Errors
    /// Any [`ProtocolError`] the scanner finds.
    pub fn parse(buf: &Bytes, limits: &Limits) -> Result<Option<(Frame, usize)>, ProtocolError> {
        let Some(len) = ReplyScanner::default().scan(buf, limits)? else {
            return Ok(None);
        };
        let mut pos = 0;
        let frame = parse_at(buf, &mut pos)?;
        debug_assert_eq!(pos, len);
        Ok(Some((frame, len)))
    }

    /// Appends the wire encoding of this frame to `out`.
    pub fn encode(&self, out: &mut BytesMut) {
        match self {
            Frame::Simple(s) => line(out, b'+', s),
            Frame::Error(s) => line(out, b'-', s),
            Frame::Integer(i) => write_header(out, b':', *i),
            Frame::Bulk(b) => bulk(out, b'$', b),
            Frame::NullBulk => out.extend_from_slice(b"$-1\r\n"),
            Frame::NullArray => out.extend_from_slice(b"*-1\r\n"),
            Frame::Array(items) => aggregate(out, b'*', items),
            Frame::Null => out.extend_from_slice(b"_\r\n"),
            Frame::Boolean(b) => out.extend_from_slice(if *b { b"#t\r\n" } else { b"#f\r\n" }),
            Frame::Double(d) => line(out, b',', d),
            Frame::BigNumber(n) => line(out, b'(', n),
            Frame::BulkError(b) => bulk(out, b'!', b),
            Frame::Verbatim(b) => bulk(out, b'=', b),
            Frame::Map(pairs) => pairs_aggregate(out, b'%', pairs),
            Frame::Set(items) => aggregate(out, b'~', items),
            Frame::Push(items) => aggregate(out, b'>', items),
            Frame::Attribute(pairs, value) => {
                pairs_aggregate(out, b'|', pairs);
                value.encode(out);
            }
        }
    }

    /// The encoding as `Bytes`.
    pub fn to_bytes(&self) -> Bytes {
        let mut out = BytesMut::new();
        self.encode(&mut out);
        out.freeze()
    }

    /// The same value as Redis sends it to a RESP2 client: maps as flat arrays, sets and
    /// pushes as arrays, doubles and big numbers as bulk strings, booleans as 1 and 0,
    /// verbatim strings without their format, and null as the null bulk string (what Redis's
    /// `addReplyNull` gives; replies that use its null *array* in RESP2 can't be told apart
    /// in RESP3, so callers don't re-encode those).
    pub fn into_resp2(self) -> Frame {
        match self {
            Frame::Null => Frame::NullBulk,
            Frame::Boolean(b) => Frame::Integer(i64::from(b)),
            Frame::Double(t) | Frame::BigNumber(t) => Frame::Bulk(t),
            Frame::BulkError(e) => Frame::Error(e),
            Frame::Verbatim(t) => Frame::Bulk(if t.len() >= 4 { t.slice(4..) } else { t }),
            Frame::Array(items) | Frame::Set(items) | Frame::Push(items) => {
                Frame::Array(items.into_iter().map(Frame::into_resp2).collect())
            }
            Frame::Map(pairs) => Frame::Array(
                pairs
                    .into_iter()
                    .flat_map(|(k, v)| [k.into_resp2(), v.into_resp2()])
                    .collect(),
            ),
            Frame::Attribute(_, value) => value.into_resp2(),
            other => other,
        }
    }
}

fn line(out: &mut BytesMut, kind: u8, text: &[u8]) {
    out.extend_from_slice(&[kind]);
    out.extend_from_slice(text);
    out.extend_from_slice(b"\r\n");
}

fn bulk(out: &mut BytesMut, kind: u8, data: &[u8]) {
    write_header(out, kind, data.len() as i64);
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

fn aggregate(out: &mut BytesMut, kind: u8, items: &[Frame]) {
    write_header(out, kind, items.len() as i64);
    for item in items {
        item.encode(out);
    }
}

fn pairs_aggregate(out: &mut BytesMut, kind: u8, pairs: &[(Frame, Frame)]) {
    write_header(out, kind, pairs.len() as i64);
    for (k, v) in pairs {
        k.encode(out);
        v.encode(out);
    }
}

/// Reads the line starting after the type byte at `*pos`; `*pos` moves past its CRLF.
/// Only called on bytes the scanner accepted, so the CRLF is there.
fn take_line(buf: &Bytes, pos: &mut usize) -> Result<Bytes, ProtocolError> {
    let start = *pos + 1;
    let cr = buf[start..]
        .windows(2)
        .position(|w| w == b"\r\n")
        .map(|i| start + i)
        .ok_or(ProtocolError::MissingCrlf)?;
    *pos = cr + 2;
    Ok(buf.slice(start..cr))
}

fn take_count(buf: &Bytes, pos: &mut usize) -> Result<i64, ProtocolError> {
    let text = take_line(buf, pos)?;
    parse_i64(&text).ok_or(ProtocolError::InvalidNumber)
}

fn take_bulk(buf: &Bytes, pos: &mut usize, len: i64) -> Result<Bytes, ProtocolError> {
    let len = usize::try_from(len).map_err(|_| ProtocolError::InvalidBulkLength)?;
    let data = buf.slice(*pos..*pos + len);
    *pos += len + 2;
    Ok(data)
}

fn take_items(buf: &Bytes, pos: &mut usize, n: i64) -> Result<Vec<Frame>, ProtocolError> {
    (0..n).map(|_| parse_at(buf, pos)).collect()
}

fn take_pairs(buf: &Bytes, pos: &mut usize, n: i64) -> Result<Vec<(Frame, Frame)>, ProtocolError> {
    (0..n)
        .map(|_| Ok((parse_at(buf, pos)?, parse_at(buf, pos)?)))
        .collect()
}

/// Parses the frame at `*pos` of scanner-checked bytes.
fn parse_at(buf: &Bytes, pos: &mut usize) -> Result<Frame, ProtocolError> {
    let kind = buf[*pos];
    Ok(match kind {
        b'+' => Frame::Simple(take_line(buf, pos)?),
        b'-' => Frame::Error(take_line(buf, pos)?),
        b':' => Frame::Integer(take_count(buf, pos)?),
        b'_' => {
            take_line(buf, pos)?;
            Frame::Null
        }
        b',' => Frame::Double(take_line(buf, pos)?),
        b'(' => Frame::BigNumber(take_line(buf, pos)?),
        b'#' => match &take_line(buf, pos)?[..] {
            b"t" => Frame::Boolean(true),
            b"f" => Frame::Boolean(false),
            _ => return Err(ProtocolError::InvalidNumber),
        },
        b'$' | b'!' | b'=' => {
            let len = take_count(buf, pos)?;
            if len == -1 {
                Frame::NullBulk
            } else {
                let data = take_bulk(buf, pos, len)?;
                match kind {
                    b'$' => Frame::Bulk(data),
                    b'!' => Frame::BulkError(data),
                    _ => Frame::Verbatim(data),
                }
            }
        }
        b'*' | b'~' | b'>' => {
            let n = take_count(buf, pos)?;
            if n == -1 {
                Frame::NullArray
            } else {
                let items = take_items(buf, pos, n)?;
                match kind {
                    b'*' => Frame::Array(items),
                    b'~' => Frame::Set(items),
                    _ => Frame::Push(items),
                }
            }
        }
        b'%' => {
            let n = take_count(buf, pos)?;
            Frame::Map(take_pairs(buf, pos, n)?)
        }
        b'|' => {
            let n = take_count(buf, pos)?;
            let pairs = take_pairs(buf, pos, n)?;
            Frame::Attribute(pairs, Box::new(parse_at(buf, pos)?))
        }
        other => return Err(ProtocolError::InvalidType(other)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Text for simple strings, errors, doubles: no CR or LF, as RESP requires.
    fn line_text() -> impl Strategy<Value = Bytes> {
        proptest::collection::vec(
            any::<u8>().prop_filter("no CR/LF", |b| *b != b'\r' && *b != b'\n'),
            0..16,
        )
        .prop_map(Bytes::from)
    }

    fn blob() -> impl Strategy<Value = Bytes> {
        proptest::collection::vec(any::<u8>(), 0..64).prop_map(Bytes::from)
    }

    fn frame() -> impl Strategy<Value = Frame> {
        let leaf = prop_oneof![
            line_text().prop_map(Frame::Simple),
            line_text().prop_map(Frame::Error),
            any::<i64>().prop_map(Frame::Integer),
            blob().prop_map(Frame::Bulk),
            Just(Frame::NullBulk),
            Just(Frame::NullArray),
            Just(Frame::Null),
            any::<bool>().prop_map(Frame::Boolean),
            line_text().prop_map(Frame::Double),
            line_text().prop_map(Frame::BigNumber),
            blob().prop_map(Frame::BulkError),
            blob().prop_map(Frame::Verbatim),
        ];
        leaf.prop_recursive(4, 64, 8, |inner| {
            let items = proptest::collection::vec(inner.clone(), 0..8);
            let pairs = proptest::collection::vec((inner.clone(), inner.clone()), 0..4);
            prop_oneof![
                items.clone().prop_map(Frame::Array),
                items.clone().prop_map(Frame::Set),
                items.prop_map(Frame::Push),
                pairs.clone().prop_map(Frame::Map),
                (pairs, inner).prop_map(|(p, v)| Frame::Attribute(p, Box::new(v))),
            ]
        })
    }

    proptest! {
        #[test]
        fn encode_then_parse_round_trips(f in frame(), tail in blob()) {
            let encoded = f.to_bytes();
            let mut stream = BytesMut::from(&encoded[..]);
            stream.extend_from_slice(&tail);
            let stream = stream.freeze();
            let (parsed, len) = Frame::parse(&stream, &Limits::default()).unwrap().unwrap();
            prop_assert_eq!(len, encoded.len());
            prop_assert_eq!(&parsed, &f);
            prop_assert_eq!(parsed.to_bytes(), encoded.clone());
            // Every strict prefix is incomplete, never an error.
            for cut in 0..encoded.len() {
                prop_assert_eq!(
                    ReplyScanner::default().scan(&encoded[..cut], &Limits::default()),
                    Ok(None)
                );
            }
        }

        #[test]
        fn scanner_never_panics_on_garbage(data in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = ReplyScanner::default().scan(&data, &Limits::default());
            let _ = Frame::parse(&Bytes::from(data), &Limits::default());
        }
    }

    #[test]
    fn null_bulk_and_integers_encode_like_redis() {
        assert_eq!(&Frame::Integer(-7).to_bytes()[..], b":-7\r\n");
        assert_eq!(
            &Frame::Integer(i64::MIN).to_bytes()[..],
            b":-9223372036854775808\r\n"
        );
        assert_eq!(&Frame::NullBulk.to_bytes()[..], b"$-1\r\n");
        assert_eq!(
            &Frame::Array(vec![Frame::Bulk(Bytes::from_static(b"a")), Frame::NullBulk]).to_bytes()
                [..],
            b"*2\r\n$1\r\na\r\n$-1\r\n"
        );
    }
}
