//! End-to-end: clients that send huge requests can't take the proxy's memory or stall
//! everyone else: `query_buffer_budget` bounds what all clients' unparsed input holds, and
//! `client_query_buffer_limit` closes a client past it, as Redis does.

#![expect(clippy::unwrap_used, reason = "tests panic on failure")]

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use redis_intercept::resp::Frame;
use redis_intercept_e2e::{ProxyChild, RedisServer, RespReader, free_port, ok};

/// The proxy as a process of its own (its memory is measured) in front of `server`.
fn proxy(server: &RedisServer, proxy_extra: &str) -> (ProxyChild, SocketAddr) {
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let text = format!(
        "[proxy]\nworkers = 1\n{proxy_extra}\n\n[[upstream]]\nname = \"main\"\n\
         mode = \"standalone\"\nnodes = [\"{}\"]\n\n[[service]]\nname = \"svc\"\n\
         listen = \"{addr}\"\nupstream = \"main\"\nop_timeout = \"60s\"\n",
        server.addr
    );
    (ProxyChild::start(&text, addr), addr)
}

/// `SET key <size bytes>` as RESP, built without a second copy of the value.
fn big_set(key: &str, size: usize) -> Vec<u8> {
    let mut out = format!("*3\r\n$3\r\nSET\r\n${}\r\n{key}\r\n${size}\r\n", key.len()).into_bytes();
    out.resize(out.len() + size, b'v');
    out.extend_from_slice(b"\r\n");
    out
}

/// Ten clients each send a 32 MiB SET as fast as they can while a small client reads.
/// Returns the proxy's peak RSS growth in MiB and the small client's slowest GET.
fn ten_big_writers(proxy_extra: &str) -> (u64, Duration) {
    const SIZE: usize = 32 << 20;
    let server = RedisServer::start();
    let (proxy, addr) = proxy(&server, proxy_extra);
    let before = proxy.status_kib("VmRSS");
    let mut small = RespReader::connect(addr);
    assert_eq!(small.call(&["SET", "k", "v"]), ok());
    let writers: Vec<_> = (0..10)
        .map(|i| {
            std::thread::spawn(move || {
                let request = big_set(&format!("big{i}"), SIZE);
                let mut s = TcpStream::connect(addr).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
                s.write_all(&request).unwrap();
                RespReader::new(s).read()
            })
        })
        .collect();
    let mut slowest = Duration::ZERO;
    while writers.iter().any(|w| !w.is_finished()) {
        let t = Instant::now();
        assert_eq!(small.call(&["GET", "k"]), Frame::Bulk("v".into()));
        slowest = slowest.max(t.elapsed());
        std::thread::sleep(Duration::from_millis(5));
    }
    for w in writers {
        assert_eq!(
            w.join().unwrap(),
            ok(),
            "every big SET is served in the end"
        );
    }
    for i in 0..10 {
        let Frame::Integer(len) = server.cmd(&["STRLEN", &format!("big{i}")]) else {
            panic!("STRLEN big{i}");
        };
        assert_eq!(len as usize, SIZE);
    }
    let peak = proxy.status_kib("VmHWM");
    ((peak.saturating_sub(before)) / 1024, slowest)
}

#[test]
fn chaos_the_input_budget_bounds_memory_under_ten_huge_requests() {
    let (growth, slowest) = ten_big_writers("query_buffer_budget = \"16MiB\"");
    // Inputs and queued requests within about twice the budget, one request finishing past
    // it, and the batch a writer holds: far below the 320 MiB ten clients send at once
    // (without a budget the proxy took 344 MiB here, until the upstream queue's
    // max_pending_bytes refused requests).
    assert!(
        growth < 160,
        "the proxy grew by {growth} MiB with a 16 MiB input budget"
    );
    assert!(
        slowest < Duration::from_secs(2),
        "a small client's GET took {slowest:?} during the attack"
    );
    eprintln!("budget 16 MiB: peak growth {growth} MiB, slowest small GET {slowest:?}");
}

#[test]
fn chaos_a_client_past_its_query_buffer_limit_is_closed_and_others_go_on() {
    let server = RedisServer::start();
    let (_proxy, addr) = proxy(&server, "client_query_buffer_limit = \"1MiB\"");
    let mut other = RespReader::connect(addr);
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // A 4 MiB value: the proxy closes the connection before the request is complete.
    let request = big_set("big", 4 << 20);
    let _ = s.write_all(&request);
    let mut buf = [0u8; 64];
    let n = std::io::Read::read(&mut s, &mut buf).unwrap_or(0);
    assert_eq!(n, 0, "closed without a reply, as Redis closes it");
    assert_eq!(server.cmd(&["EXISTS", "big"]), Frame::Integer(0));
    assert_eq!(other.call(&["SET", "k", "v"]), ok());
}
