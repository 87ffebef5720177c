//! Resumable scanner that finds where one RESP2/RESP3 reply ends, without building it.

use super::{Limits, ProtocolError, find_line_end, parse_i64};

/// One open aggregate: how many more elements complete it, and whether it is an attribute
/// (`|`), which is not itself an element of its parent but a prefix of the next one.
#[derive(Debug, Clone, Copy)]
struct Open {
    remaining: u64,
    attribute: bool,
}

/// Finds frame boundaries in a byte stream of replies.
///
/// The scanner remembers how far it got, so calling [`ReplyScanner::scan`] again after more
/// bytes arrived resumes there: a 100 MB reply costs one pass, not one per read. The caller
/// must only append to the buffer between calls until a frame is reported, then remove exactly
/// that frame's bytes from the front.
#[derive(Debug, Default)]
pub struct ReplyScanner {
    /// Offset of the next element header not yet scanned.
    pos: usize,
    /// Aggregates opened and not yet complete, outermost first.
    stack: Vec<Open>,
}

impl ReplyScanner {
    /// Returns the length of the first complete frame in `buf`, `Ok(None)` if more bytes are
    /// needed, or the protocol violation found.
    ///
    /// # Errors
    /// Any [`ProtocolError`]; the stream is then out of sync and must be closed.
    pub fn scan(&mut self, buf: &[u8], limits: &Limits) -> Result<Option<usize>, ProtocolError> {
        loop {
            let Some(&kind) = buf.get(self.pos) else {
                return Ok(None);
            };
            let Some(cr) = find_line_end(
                buf,
                self.pos + 1,
                limits.max_inline_len,
                ProtocolError::BulkHeaderTooBig,
            )?
            else {
                return Ok(None);
            };
            let line = &buf[self.pos + 1..cr];
            let after_line = cr + 2;
            match kind {
                // Simple string, error, integer, null, double, boolean, big number.
                b'+' | b'-' | b':' | b'_' | b',' | b'#' | b'(' => {
                    let valid = match kind {
                        b':' => parse_i64(line).is_some(),
                        b'_' => line.is_empty(),
                        b'#' => line == b"t" || line == b"f",
                        _ => true,
                    };
                    if !valid {
                        return Err(ProtocolError::InvalidNumber);
                    }
                    self.pos = after_line;
                }
                // Bulk string, bulk error, verbatim string.
                b'$' | b'!' | b'=' => {
                    let len = parse_i64(line).ok_or(ProtocolError::InvalidBulkLength)?;
                    if len == -1 && kind == b'$' {
                        self.pos = after_line;
                    } else {
                        let len = usize::try_from(len)
                            .ok()
                            .filter(|&l| l <= limits.max_bulk_len)
                            .ok_or(ProtocolError::InvalidBulkLength)?;
                        let end = after_line + len;
                        if buf.len() < end + 2 {
                            return Ok(None);
                        }
                        if &buf[end..end + 2] != b"\r\n" {
                            return Err(ProtocolError::MissingCrlf);
                        }
                        self.pos = end + 2;
                    }
                }
                // Array, set, push, map, attribute.
                b'*' | b'~' | b'>' | b'%' | b'|' => {
                    let count = parse_i64(line).ok_or(ProtocolError::InvalidMultibulkLength)?;
                    self.pos = after_line;
                    if count == -1 && kind == b'*' {
                        // Null array: a complete element.
                    } else {
                        let count = usize::try_from(count)
                            .ok()
                            .filter(|&c| c <= limits.max_array_len)
                            .ok_or(ProtocolError::InvalidMultibulkLength)?;
                        let pairs = matches!(kind, b'%' | b'|');
                        let elements = if pairs { count * 2 } else { count } as u64;
                        let attribute = kind == b'|';
                        if elements > 0 || attribute {
                            if self.stack.len() >= limits.max_depth {
                                return Err(ProtocolError::TooDeep(limits.max_depth));
                            }
                            self.stack.push(Open {
                                remaining: elements,
                                attribute,
                            });
                            if elements > 0 {
                                continue;
                            }
                        }
                    }
                }
                other => return Err(ProtocolError::InvalidType(other)),
            }
            if self.complete_element() {
                let len = self.pos;
                self.pos = 0;
                return Ok(Some(len));
            }
        }
    }

    /// Records that one element ended at `self.pos`; returns true when that finished the
    /// top-level frame.
    fn complete_element(&mut self) -> bool {
        loop {
            let Some(top) = self.stack.last_mut() else {
                return true;
            };
            if top.remaining > 0 {
                top.remaining -= 1;
            }
            if top.remaining > 0 {
                return false;
            }
            let finished = self.stack.pop();
            if finished.is_some_and(|o| o.attribute) {
                // The attribute's contents are done; the element it decorates comes next and
                // is what counts toward the parent.
                return false;
            }
        }
    }

    /// Forgets any partial progress, for when the stream is reset (a new connection).
    pub fn reset(&mut self) {
        self.pos = 0;
        self.stack.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan_all(input: &[u8]) -> Result<Option<usize>, ProtocolError> {
        ReplyScanner::default().scan(input, &Limits::default())
    }

    #[test]
    fn finds_simple_frames() {
        assert_eq!(scan_all(b"+OK\r\n"), Ok(Some(5)));
        assert_eq!(scan_all(b"-ERR x\r\n+OK\r\n"), Ok(Some(8)));
        assert_eq!(scan_all(b":-12\r\n"), Ok(Some(6)));
        assert_eq!(scan_all(b"$-1\r\n"), Ok(Some(5)));
        assert_eq!(scan_all(b"*-1\r\n"), Ok(Some(5)));
        assert_eq!(scan_all(b"$3\r\nfoo\r\n"), Ok(Some(9)));
        assert_eq!(scan_all(b"*0\r\n"), Ok(Some(4)));
        assert_eq!(scan_all(b"_\r\n"), Ok(Some(3)));
    }

    #[test]
    fn nested_and_resp3_aggregates() {
        let map = b"%2\r\n+a\r\n:1\r\n+b\r\n*2\r\n$1\r\nx\r\n_\r\n";
        assert_eq!(scan_all(map), Ok(Some(map.len())));
        let attr = b"|1\r\n+ttl\r\n:3\r\n$2\r\nhi\r\n";
        assert_eq!(scan_all(attr), Ok(Some(attr.len())));
        let nested_attr = b"*2\r\n|1\r\n+k\r\n+v\r\n:1\r\n:2\r\n";
        assert_eq!(scan_all(nested_attr), Ok(Some(nested_attr.len())));
    }

    #[test]
    fn incomplete_input_resumes_where_it_stopped() {
        let whole = b"*3\r\n$3\r\nfoo\r\n:42\r\n*1\r\n+x\r\n+next\r\n";
        let mut scanner = ReplyScanner::default();
        let limits = Limits::default();
        for cut in 0..26 {
            assert_eq!(scanner.scan(&whole[..cut], &limits), Ok(None), "cut {cut}");
        }
        assert_eq!(scanner.scan(whole, &limits), Ok(Some(26)));
    }

    #[test]
    fn rejects_violations() {
        assert_eq!(scan_all(b"?x\r\n"), Err(ProtocolError::InvalidType(b'?')));
        assert_eq!(scan_all(b":abc\r\n"), Err(ProtocolError::InvalidNumber));
        assert_eq!(scan_all(b"$3\r\nfooXY"), Err(ProtocolError::MissingCrlf));
        assert_eq!(scan_all(b"+OK\n"), Err(ProtocolError::MissingCrlf));
        assert_eq!(scan_all(b"$-2\r\n"), Err(ProtocolError::InvalidBulkLength));
        let limits = Limits {
            max_depth: 2,
            ..Limits::default()
        };
        assert_eq!(
            ReplyScanner::default().scan(b"*1\r\n*1\r\n*1\r\n:1\r\n", &limits),
            Err(ProtocolError::TooDeep(2))
        );
        let limits = Limits {
            max_bulk_len: 4,
            ..Limits::default()
        };
        assert_eq!(
            ReplyScanner::default().scan(b"$5\r\n", &limits),
            Err(ProtocolError::InvalidBulkLength)
        );
        let long = [b'+'; 70 * 1024];
        assert_eq!(scan_all(&long), Err(ProtocolError::BulkHeaderTooBig));
    }
}
