//! Fuzz target: the request parser, the reply scanner and the frame parser must never panic,
//! and every frame they accept must re-encode to the bytes it came from.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use redis_intercept::resp::{Frame, Limits, ReplyScanner, RequestParser};

fuzz_target!(|data: &[u8]| {
    let limits = Limits {
        max_depth: 16,
        max_bulk_len: 1 << 16,
        max_array_len: 1 << 12,
        max_inline_len: 1 << 12,
    };
    let mut parser = RequestParser::new(limits);
    let mut rest = data;
    while let Ok(Some(n)) = parser.parse(rest) {
        let req = parser.request(&rest[..n]);
        for arg in req.args() {
            std::hint::black_box(arg);
        }
        rest = &rest[n..];
    }
    let mut scanner = ReplyScanner::default();
    let scanned = scanner.scan(data, &limits);
    let bytes = Bytes::copy_from_slice(data);
    if let Ok(Some((frame, len))) = Frame::parse(&bytes, &limits) {
        assert_eq!(scanned, Ok(Some(len)));
        assert_eq!(&frame.to_bytes()[..], &data[..len]);
    }
});
