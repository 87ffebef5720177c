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
    proxy_with(server, proxy_extra, "op_timeout = \"60s\"")
}

/// [`proxy`] with `service_extra` in the service's section.
fn proxy_with(
    server: &RedisServer,
    proxy_extra: &str,
    service_extra: &str,
) -> (ProxyChild, SocketAddr) {
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let text = format!(
        "[proxy]\nworkers = 1\n{proxy_extra}\n\n[[upstream]]\nname = \"main\"\n\
         mode = \"standalone\"\nnodes = [\"{}\"]\n\n[[service]]\nname = \"svc\"\n\
         listen = \"{addr}\"\nupstream = \"main\"\n{service_extra}\n",
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

/// Redis's `omem` (bytes of output it holds) for each client connection it has, read with
/// `CLIENT LIST` on a connection of the test's own (which is left out).
fn omem_of_connections(server: &RedisServer) -> Vec<u64> {
    let Frame::Bulk(list) = server.cmd(&["CLIENT", "LIST"]) else {
        panic!("CLIENT LIST");
    };
    String::from_utf8_lossy(&list)
        .lines()
        .filter(|l| !l.contains("cmd=client|list"))
        .filter_map(|l| {
            l.split(' ')
                .find_map(|f| f.strip_prefix("omem="))
                .and_then(|v| v.parse().ok())
        })
        .collect()
}

/// The 99th percentile of `samples`.
fn p99(samples: &mut [Duration]) -> Duration {
    samples.sort();
    samples[(samples.len() * 99 / 100).min(samples.len() - 1)]
}

/// A well-behaved client's GETs of a small key for `for_how_long`: their latencies, and how
/// many failed.
fn small_gets(addr: SocketAddr, for_how_long: Duration) -> (Vec<Duration>, usize) {
    let mut c = RespReader::connect(addr);
    let mut samples = Vec::new();
    let mut errors = 0;
    let end = Instant::now() + for_how_long;
    while Instant::now() < end {
        let t = Instant::now();
        if c.call(&["GET", "small"]) != Frame::Bulk("v".into()) {
            errors += 1;
        }
        samples.push(t.elapsed());
        std::thread::sleep(Duration::from_millis(2));
    }
    (samples, errors)
}

/// `clients` connections each pipeline 10,000 `GET big` (a 1 MiB value) and never read,
/// while a well-behaved client GETs a small key on the same server. Returns the well-behaved
/// client's p99 with and without the attack, its errors during it, how many attackers the
/// proxy had closed at the end, and the largest `omem` Redis held for a proxy connection.
fn big_reply_attack(clients: usize) -> (Duration, Duration, usize, usize, u64) {
    let server = RedisServer::start();
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let (_proxy, addr) = proxy_with(
        &server,
        &format!("\n[admin]\nlisten = \"{admin}\"\n"),
        &std::env::var("HOSTILE_SERVICE").unwrap_or_default(),
    );
    let mut setup = RespReader::connect(addr);
    assert_eq!(setup.call(&["SET", "small", "v"]), ok());
    let value = "x".repeat(1 << 20);
    assert_eq!(setup.call(&["SET", "big", &value]), ok());
    let (mut quiet, _) = small_gets(addr, Duration::from_secs(2));
    let pipeline = redis_intercept_e2e::encode(&["GET", "big"]).repeat(10_000);
    let attackers: Vec<TcpStream> = (0..clients)
        .map(|_| {
            let mut s = TcpStream::connect(addr).unwrap();
            s.set_nonblocking(true).unwrap();
            // As much of the pipeline as the socket takes: the attacker never reads, so
            // the rest would never go.
            let _ = s.write(&pipeline);
            s
        })
        .collect();
    let measuring = std::thread::spawn(move || small_gets(addr, Duration::from_secs(8)));
    let mut omem = 0;
    while !measuring.is_finished() {
        omem = omem.max(omem_of_connections(&server).into_iter().max().unwrap_or(0));
        std::thread::sleep(Duration::from_millis(100));
    }
    let (mut busy, errors) = measuring.join().unwrap();
    // Closed by the proxy as slow readers (reading them here would make them readers).
    let slow = || {
        let (_, text) = redis_intercept_e2e::http_get(admin, "/metrics");
        text.lines()
            .find(|l| l.contains("clients_closed_total") && l.contains("slow_reader"))
            .and_then(|l| l.rsplit(' ').next()?.parse::<usize>().ok())
            .unwrap_or(0)
    };
    let give_up = Instant::now() + Duration::from_secs(60);
    while slow() < clients && Instant::now() < give_up {
        std::thread::sleep(Duration::from_millis(200));
    }
    let closed = slow();
    drop(attackers);
    (p99(&mut quiet), p99(&mut busy), errors, closed, omem)
}

fn check_big_reply_attack(clients: usize) {
    let (quiet, busy, errors, closed, omem) = big_reply_attack(clients);
    eprintln!(
        "{clients} non-reading big-reply clients: well-behaved p99 {busy:?} (alone {quiet:?}), \
         {errors} errors, {closed} attackers closed, largest omem {} KiB",
        omem / 1024
    );
    assert_eq!(errors, 0, "the well-behaved client saw errors");
    assert_eq!(closed, clients, "every non-reading client is disconnected");
    // big_reply_budget (4 MiB), plus the first replies of new connections (at most sixteen
    // of 1 MiB: a 256 KiB share each), plus one reply beyond.
    assert!(
        omem <= 21 << 20,
        "Redis held {omem} bytes of output for a proxy connection"
    );
    // A timing: checked where the scenarios run one at a time on a quiet machine
    // (`cargo xtask chaos` sets this), only reported in the full test run.
    if std::env::var_os("REDIS_INTERCEPT_CHAOS_TIMING").is_some() {
        assert!(
            busy < quiet * 10,
            "the well-behaved client's p99 went from {quiet:?} to {busy:?}"
        );
    }
}

#[test]
fn chaos_twenty_clients_that_never_read_big_replies_stall_nobody() {
    check_big_reply_attack(20);
}

#[test]
#[ignore = "200 clients of 1 MiB replies: run by cargo xtask chaos --all"]
fn chaos_two_hundred_clients_that_never_read_big_replies_stall_nobody() {
    check_big_reply_attack(200);
}
