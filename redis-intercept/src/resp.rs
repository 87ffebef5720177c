//! RESP wire format: bytes ⇄ frames, checked before parsed, with limits on every dimension.
//!
//! Three pieces, each for one side of the proxy:
//! - [`RequestParser`] turns client bytes into commands (RESP arrays of bulk strings, or inline
//!   commands as `redis-cli`/telnet users type them) without copying multibulk arguments.
//! - [`ReplyScanner`] finds where one reply ends in an upstream's byte stream, so the proxy can
//!   forward the bytes Redis sent untouched. It is resumable: a large reply arriving in many reads
//!   is scanned once, not once per read.
//! - [`Frame`] is a full RESP2/RESP3 value, for replies the proxy builds or merges itself.
//!
//! Nothing here knows about sockets or command names.

mod frame;
mod request;
mod scan;

pub use frame::Frame;
pub use request::{Request, RequestParser, encode_command};
pub use scan::ReplyScanner;

/// Largest bulk string Redis accepts by default (`proto-max-bulk-len`, 512 MB).
pub const MAX_BULK_LEN: usize = 512 * 1024 * 1024;

/// Longest inline command or header line Redis accepts (`PROTO_INLINE_MAX_SIZE`).
pub const MAX_INLINE_LEN: usize = 64 * 1024;

/// Bounds applied while scanning or parsing, so one peer can't make the proxy allocate or
/// recurse without limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Deepest nesting of aggregates accepted in a reply (requests are always flat).
    pub max_depth: usize,
    /// Longest bulk string accepted, in bytes.
    pub max_bulk_len: usize,
    /// Most elements accepted in one array, set, map or push.
    pub max_array_len: usize,
    /// Longest inline command, or header line without its CRLF.
    pub max_inline_len: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_depth: 128,
            max_bulk_len: MAX_BULK_LEN,
            // Redis itself allows up to INT_MAX arguments; a million keeps argument bookkeeping
            // for one command under 16 MiB.
            max_array_len: 1024 * 1024,
            max_inline_len: MAX_INLINE_LEN,
        }
    }
}

/// A violation of the protocol. The connection it came from can't be trusted to stay in sync,
/// so the caller replies with [`ProtocolError::to_reply`] (for a client) and closes it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// Multibulk count that isn't a number, or is out of range.
    #[error("invalid multibulk length")]
    InvalidMultibulkLength,
    /// Bulk length that isn't a number, or is over the bulk limit.
    #[error("invalid bulk length")]
    InvalidBulkLength,
    /// An element of a request array that isn't a bulk string.
    #[error("expected '$', got '{0}'")]
    ExpectedBulk(char),
    /// An inline command longer than the inline limit.
    #[error("too big inline request")]
    InlineTooBig,
    /// A `*<count>` header line longer than the inline limit.
    #[error("too big mbulk count string")]
    MultibulkHeaderTooBig,
    /// A `$<len>` header line longer than the inline limit.
    #[error("too big bulk count string")]
    BulkHeaderTooBig,
    /// Quotes in an inline command that don't close.
    #[error("unbalanced quotes in request")]
    UnbalancedQuotes,
    /// A reply with a type byte RESP doesn't define.
    #[error("invalid reply type byte {0:#04x}")]
    InvalidType(u8),
    /// A reply nested deeper than allowed.
    #[error("reply nested deeper than {0} levels")]
    TooDeep(usize),
    /// A bulk string or line not followed by CRLF.
    #[error("missing CRLF")]
    MissingCrlf,
    /// An integer, double or boolean that doesn't parse.
    #[error("invalid number or boolean")]
    InvalidNumber,
}

impl ProtocolError {
    /// The error reply Redis sends for the same violation, e.g.
    /// `-ERR Protocol error: invalid bulk length\r\n`.
    pub fn to_reply(&self) -> bytes::Bytes {
        bytes::Bytes::from(format!("-ERR Protocol error: {self}\r\n"))
    }
}

/// Appends `<kind><n>\r\n`, the header of a bulk string or aggregate, without allocating.
pub(crate) fn write_header(out: &mut bytes::BytesMut, kind: u8, n: i64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    let mut v = n.unsigned_abs();
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    out.reserve(23);
    out.extend_from_slice(&[kind]);
    if n < 0 {
        out.extend_from_slice(b"-");
    }
    out.extend_from_slice(&digits[i..]);
    out.extend_from_slice(b"\r\n");
}

/// Finds the `\r\n` that ends the line starting at `start`; returns the index of `\r`.
///
/// `Ok(None)` means "not yet" (no `\n` in the buffer). A line longer than `max` without one is
/// `Err(too_long)`.
fn find_line_end(
    buf: &[u8],
    start: usize,
    max: usize,
    too_long: ProtocolError,
) -> Result<Option<usize>, ProtocolError> {
    let window = &buf[start..];
    match window.iter().position(|&b| b == b'\n') {
        Some(nl) => {
            if nl == 0 || window[nl - 1] != b'\r' {
                return Err(ProtocolError::MissingCrlf);
            }
            if nl - 1 > max {
                return Err(too_long);
            }
            Ok(Some(start + nl - 1))
        }
        None if window.len() > max + 1 => Err(too_long),
        None => Ok(None),
    }
}

/// Parses a signed decimal integer the way Redis's `string2ll` does: no sign-only, no leading
/// `+`, no spaces, no overflow.
fn parse_i64(digits: &[u8]) -> Option<i64> {
    let (neg, rest) = match digits.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, digits),
    };
    if rest.is_empty() || rest.len() > 19 {
        return None;
    }
    // Like string2ll: "0" alone, otherwise no leading zero (and so no "-0").
    if rest[0] == b'0' && (rest.len() > 1 || neg) {
        return None;
    }
    let mut v: i64 = 0;
    for &d in rest {
        if !d.is_ascii_digit() {
            return None;
        }
        let digit = i64::from(d - b'0');
        v = if neg {
            v.checked_mul(10)?.checked_sub(digit)?
        } else {
            v.checked_mul(10)?.checked_add(digit)?
        };
    }
    Some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_i64_matches_redis_rules() {
        assert_eq!(parse_i64(b"0"), Some(0));
        assert_eq!(parse_i64(b"-1"), Some(-1));
        assert_eq!(parse_i64(b"9223372036854775807"), Some(i64::MAX));
        assert_eq!(parse_i64(b"-9223372036854775808"), Some(i64::MIN));
        assert_eq!(parse_i64(b"9223372036854775808"), None);
        assert_eq!(parse_i64(b""), None);
        assert_eq!(parse_i64(b"-"), None);
        assert_eq!(parse_i64(b"+1"), None);
        assert_eq!(parse_i64(b"1 "), None);
        assert_eq!(parse_i64(b"007"), None);
        assert_eq!(parse_i64(b"-0"), None);
    }

    #[test]
    fn protocol_error_replies_use_redis_text() {
        assert_eq!(
            &ProtocolError::ExpectedBulk('x').to_reply()[..],
            b"-ERR Protocol error: expected '$', got 'x'\r\n"
        );
        assert_eq!(
            &ProtocolError::InvalidBulkLength.to_reply()[..],
            b"-ERR Protocol error: invalid bulk length\r\n"
        );
    }
}
