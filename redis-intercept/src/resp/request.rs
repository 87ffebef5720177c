//! Client requests: RESP arrays of bulk strings, or inline commands, parsed without copying.

use bytes::BytesMut;

use super::{Limits, ProtocolError, find_line_end, parse_i64};

/// Turns a client's byte stream into commands, one at a time.
///
/// Multibulk arguments are recorded as spans into the caller's buffer, so no argument is
/// copied. Parsing is resumable: a command whose arguments arrive over many reads is walked
/// once. Inline commands are rare (telnet, `redis-cli` typed by hand) and are unescaped into a
/// scratch buffer.
#[derive(Debug)]
pub struct RequestParser {
    /// Limits enforced on every command.
    limits: Limits,
    /// Offset of the next unparsed byte of the command in progress.
    pos: usize,
    /// Arguments still expected by the multibulk in progress; `None` between commands.
    remaining: Option<usize>,
    /// Argument spans (start, end) of the command in progress: into the caller's buffer for
    /// multibulk, into `scratch` for inline.
    spans: Vec<(usize, usize)>,
    /// Unescaped bytes of an inline command's arguments.
    scratch: Vec<u8>,
    /// Whether the last parsed command was inline (its spans point into `scratch`).
    inline: bool,
}

/// One parsed command, borrowed from the buffer it was parsed from.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// Bytes the spans index into.
    src: &'a [u8],
    /// (start, end) of each argument in `src`.
    spans: &'a [(usize, usize)],
    /// The command exactly as the client sent it, when it was RESP (not inline).
    raw: Option<&'a [u8]>,
}

impl RequestParser {
    /// A parser that enforces `limits`.
    pub fn new(limits: Limits) -> Self {
        RequestParser {
            limits,
            pos: 0,
            remaining: None,
            spans: Vec::new(),
            scratch: Vec::new(),
            inline: false,
        }
    }

    /// Parses the first command in `buf`. Returns how many bytes it took, or `Ok(None)` when
    /// more bytes are needed. After `Some(n)`, [`RequestParser::request`] with `&buf[..n]`
    /// describes the command (possibly with no arguments: Redis ignores `*0` and blank lines),
    /// and the caller must drop those `n` bytes before the next call.
    ///
    /// # Errors
    /// A [`ProtocolError`] with the text Redis would send; the client must then be closed.
    pub fn parse(&mut self, buf: &[u8]) -> Result<Option<usize>, ProtocolError> {
        if self.remaining.is_none() {
            let Some(&first) = buf.first() else {
                return Ok(None);
            };
            if first != b'*' {
                return self.parse_inline(buf);
            }
            let Some(cr) = find_line_end(
                buf,
                1,
                self.limits.max_inline_len,
                ProtocolError::MultibulkHeaderTooBig,
            )?
            else {
                return Ok(None);
            };
            let count = parse_i64(&buf[1..cr]).ok_or(ProtocolError::InvalidMultibulkLength)?;
            if count > self.limits.max_array_len as i64 {
                return Err(ProtocolError::InvalidMultibulkLength);
            }
            self.inline = false;
            self.spans.clear();
            self.pos = cr + 2;
            // Redis treats `*0` and negative counts as an empty command and skips it.
            self.remaining = Some(usize::try_from(count).unwrap_or(0));
        }
        while let Some(left) = self.remaining.filter(|&n| n > 0) {
            let Some(&kind) = buf.get(self.pos) else {
                return Ok(None);
            };
            if kind != b'$' {
                return Err(ProtocolError::ExpectedBulk(char::from(kind)));
            }
            let Some(cr) = find_line_end(
                buf,
                self.pos + 1,
                self.limits.max_inline_len,
                ProtocolError::BulkHeaderTooBig,
            )?
            else {
                return Ok(None);
            };
            let len = parse_i64(&buf[self.pos + 1..cr])
                .and_then(|l| usize::try_from(l).ok())
                .filter(|&l| l <= self.limits.max_bulk_len)
                .ok_or(ProtocolError::InvalidBulkLength)?;
            let start = cr + 2;
            let end = start + len;
            if buf.len() < end + 2 {
                return Ok(None);
            }
            if &buf[end..end + 2] != b"\r\n" {
                return Err(ProtocolError::MissingCrlf);
            }
            self.spans.push((start, end));
            self.pos = end + 2;
            self.remaining = Some(left - 1);
        }
        self.remaining = None;
        let consumed = self.pos;
        self.pos = 0;
        Ok(Some(consumed))
    }

    /// The command last returned by [`RequestParser::parse`]; `buf` must be the bytes it
    /// reported as consumed.
    pub fn request<'a>(&'a self, buf: &'a [u8]) -> Request<'a> {
        if self.inline {
            Request {
                src: &self.scratch,
                spans: &self.spans,
                raw: None,
            }
        } else {
            Request {
                src: buf,
                spans: &self.spans,
                raw: Some(buf),
            }
        }
    }

    /// Parses one inline command line, splitting it like Redis's `sdssplitargs`.
    fn parse_inline(&mut self, buf: &[u8]) -> Result<Option<usize>, ProtocolError> {
        let Some(nl) = buf.iter().position(|&b| b == b'\n') else {
            if buf.len() > self.limits.max_inline_len {
                return Err(ProtocolError::InlineTooBig);
            }
            return Ok(None);
        };
        if nl > self.limits.max_inline_len {
            return Err(ProtocolError::InlineTooBig);
        }
        let mut line = &buf[..nl];
        if let Some(stripped) = line.strip_suffix(b"\r") {
            line = stripped;
        }
        self.inline = true;
        self.spans.clear();
        self.scratch.clear();
        split_inline(line, &mut self.scratch, &mut self.spans)?;
        Ok(Some(nl + 1))
    }
}

/// Whitespace as C's `isspace`, which `sdssplitargs` uses.
fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c)
}

/// Position after the closing quote at `p`, which Redis requires to be followed by a space or
/// the end of the line.
fn after_closing_quote(line: &[u8], p: usize) -> Result<usize, ProtocolError> {
    if line.get(p + 1).is_some_and(|&n| !is_space(n)) {
        return Err(ProtocolError::UnbalancedQuotes);
    }
    Ok(p + 1)
}

/// Splits an inline command line into arguments with Redis's quoting rules: `"…"` with `\n`,
/// `\r`, `\t`, `\b`, `\a`, `\\`, `\"` and `\xHH` escapes, `'…'` with `\'`, and a closing quote
/// that must be followed by a space or the end.
fn split_inline(
    line: &[u8],
    out: &mut Vec<u8>,
    spans: &mut Vec<(usize, usize)>,
) -> Result<(), ProtocolError> {
    // sdssplitargs works on a C string: a NUL ends the line.
    let line = &line[..line.iter().position(|&b| b == 0).unwrap_or(line.len())];
    let mut p = 0;
    loop {
        while p < line.len() && is_space(line[p]) {
            p += 1;
        }
        if p == line.len() {
            return Ok(());
        }
        let start = out.len();
        let (mut in_dq, mut in_sq) = (false, false);
        loop {
            let c = line.get(p).copied();
            if in_dq {
                let Some(c) = c else {
                    return Err(ProtocolError::UnbalancedQuotes);
                };
                let hex = |i: usize| line.get(i).and_then(|&h| (h as char).to_digit(16));
                if c == b'\\'
                    && line.get(p + 1) == Some(&b'x')
                    && let (Some(hi), Some(lo)) = (hex(p + 2), hex(p + 3))
                {
                    out.push((hi * 16 + lo) as u8);
                    p += 4;
                    continue;
                }
                if c == b'\\' && p + 1 < line.len() {
                    p += 1;
                    out.push(match line[p] {
                        b'n' => b'\n',
                        b'r' => b'\r',
                        b't' => b'\t',
                        b'b' => 0x08,
                        b'a' => 0x07,
                        other => other,
                    });
                } else if c == b'"' {
                    p = after_closing_quote(line, p)?;
                    break;
                } else {
                    out.push(c);
                }
            } else if in_sq {
                let Some(c) = c else {
                    return Err(ProtocolError::UnbalancedQuotes);
                };
                if c == b'\\' && line.get(p + 1) == Some(&b'\'') {
                    p += 1;
                    out.push(b'\'');
                } else if c == b'\'' {
                    p = after_closing_quote(line, p)?;
                    break;
                } else {
                    out.push(c);
                }
            } else {
                match c {
                    None | Some(b' ' | b'\n' | b'\r' | b'\t') => break,
                    Some(b'"') => in_dq = true,
                    Some(b'\'') => in_sq = true,
                    Some(c) => out.push(c),
                }
            }
            p += 1;
        }
        spans.push((start, out.len()));
    }
}

impl<'a> Request<'a> {
    /// Number of arguments, the command name included.
    pub fn len(&self) -> usize {
        self.spans.len()
    }

    /// True for an empty command (`*0`, a blank inline line), which Redis silently skips.
    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    /// Argument `i` (0 is the command name), if present.
    pub fn arg(&self, i: usize) -> Option<&'a [u8]> {
        self.spans.get(i).map(|&(s, e)| &self.src[s..e])
    }

    /// All arguments in order.
    pub fn args(&self) -> impl ExactSizeIterator<Item = &'a [u8]> + 'a {
        let src = self.src;
        self.spans.iter().map(move |&(s, e)| &src[s..e])
    }

    /// The command exactly as received, when the client sent RESP.
    pub fn raw(&self) -> Option<&'a [u8]> {
        self.raw
    }

    /// Appends the command as a RESP array to `out`: the received bytes when they were RESP,
    /// a fresh encoding for inline commands (upstreams always get RESP).
    pub fn write_resp(&self, out: &mut BytesMut) {
        if let Some(raw) = self.raw {
            out.extend_from_slice(raw);
            return;
        }
        encode_command(self.args(), out);
    }
}

/// Encodes `args` as a RESP array of bulk strings, as a command is sent to Redis.
pub fn encode_command<'a>(args: impl ExactSizeIterator<Item = &'a [u8]>, out: &mut BytesMut) {
    super::write_header(out, b'*', args.len() as i64);
    for arg in args {
        super::write_header(out, b'$', arg.len() as i64);
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes consumed and the arguments of one parsed command.
    type Parsed = Option<(usize, Vec<Vec<u8>>)>;

    fn parse_one(input: &[u8]) -> Result<Parsed, ProtocolError> {
        let mut p = RequestParser::new(Limits::default());
        Ok(p.parse(input)?.map(|n| {
            let args = p.request(&input[..n]).args().map(<[u8]>::to_vec).collect();
            (n, args)
        }))
    }

    fn args(list: &[&str]) -> Vec<Vec<u8>> {
        list.iter().map(|s| s.as_bytes().to_vec()).collect()
    }

    #[test]
    fn multibulk_commands() {
        let input = b"*2\r\n$3\r\nGET\r\n$3\r\nfoo\r\n*1\r\n$4\r\nPING\r\n";
        assert_eq!(parse_one(input), Ok(Some((22, args(&["GET", "foo"])))));
        assert_eq!(parse_one(b"*0\r\n"), Ok(Some((4, vec![]))));
        assert_eq!(
            parse_one(b"*1\r\n$0\r\n\r\n"),
            Ok(Some((10, vec![Vec::new()])))
        );
    }

    #[test]
    fn multibulk_resumes_across_reads() {
        let input = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$5\r\nhello\r\n";
        let mut p = RequestParser::new(Limits::default());
        for cut in 0..input.len() {
            assert_eq!(p.parse(&input[..cut]), Ok(None), "cut {cut}");
        }
        let n = p.parse(input).unwrap().unwrap();
        assert_eq!(n, input.len());
        let req = p.request(&input[..n]);
        assert_eq!(req.arg(2), Some(&b"hello"[..]));
        assert_eq!(req.raw(), Some(&input[..]));
    }

    #[test]
    fn inline_commands_split_like_redis() {
        assert_eq!(
            parse_one(b"set k \"a b\\x41\\n\" 'it\\'s'\r\n"),
            Ok(Some((27, args(&["set", "k", "a bA\n", "it's"]))))
        );
        assert_eq!(parse_one(b"PING\n"), Ok(Some((5, args(&["PING"])))));
        assert_eq!(parse_one(b"   \r\n"), Ok(Some((5, vec![]))));
        assert_eq!(parse_one(b"GET foo"), Ok(None));
        // Found by the fuzzer: a NUL ends the line, as in Redis (it used to loop forever).
        assert_eq!(parse_one(b"\0\0\nW"), Ok(Some((3, vec![]))));
        assert_eq!(
            parse_one(b"GET a\0b\r\n"),
            Ok(Some((9, args(&["GET", "a"]))))
        );
        assert_eq!(
            parse_one(b"set \"abc\r\n"),
            Err(ProtocolError::UnbalancedQuotes)
        );
        assert_eq!(
            parse_one(b"set \"a\"b\r\n"),
            Err(ProtocolError::UnbalancedQuotes)
        );
    }

    #[test]
    fn inline_is_reencoded_as_resp() {
        let mut p = RequestParser::new(Limits::default());
        let input = b"set k v\r\n";
        let n = p.parse(input).unwrap().unwrap();
        let mut out = BytesMut::new();
        p.request(&input[..n]).write_resp(&mut out);
        assert_eq!(&out[..], b"*3\r\n$3\r\nset\r\n$1\r\nk\r\n$1\r\nv\r\n");
    }

    #[test]
    fn violations_use_redis_errors() {
        assert_eq!(
            parse_one(b"*2\r\n:1\r\n"),
            Err(ProtocolError::ExpectedBulk(':'))
        );
        assert_eq!(
            parse_one(b"*x\r\n"),
            Err(ProtocolError::InvalidMultibulkLength)
        );
        assert_eq!(
            parse_one(b"*1\r\n$-1\r\n"),
            Err(ProtocolError::InvalidBulkLength)
        );
        assert_eq!(
            parse_one(b"*1\r\n$536870913\r\n"),
            Err(ProtocolError::InvalidBulkLength)
        );
        assert_eq!(parse_one(&[b'a'; 70_000]), Err(ProtocolError::InlineTooBig));
        let mut header = b"*1\r\n$".to_vec();
        header.extend(std::iter::repeat_n(b'1', 70_000));
        assert_eq!(parse_one(&header), Err(ProtocolError::BulkHeaderTooBig));
        assert_eq!(
            parse_one(b"*2000000\r\n"),
            Err(ProtocolError::InvalidMultibulkLength)
        );
    }
}
