//! End-to-end: traffic mirroring to a second upstream, which must never slow or fail the
//! primary path.

use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use redis_intercept::resp::Frame;
use redis_intercept_e2e::{RedisServer, RespReader, free_port, start_proxy_config, wait_until};

fn config(primary: SocketAddr, mirror: SocketAddr, mirror_extra: &str) -> String {
    format!(
        "[proxy]\nworkers = 2\ndrain_timeout = \"1s\"\n\n\
         [[upstream]]\nname = \"main\"\nmode = \"standalone\"\nnodes = [\"{primary}\"]\n\n\
         [[upstream]]\nname = \"staging\"\nmode = \"standalone\"\nnodes = [\"{mirror}\"]\n\
         connect_timeout = \"300ms\"\nreconnect_backoff_max = \"200ms\"\n\n\
         [[service]]\nname = \"svc\"\nlisten = \"127.0.0.1:0\"\nupstream = \"main\"\nop_timeout = \"300ms\"\n\n\
         [[service.mirror]]\nupstream = \"staging\"\n{mirror_extra}\n"
    )
}

fn dbsize(server: &RedisServer) -> i64 {
    match server.cmd(&["DBSIZE"]) {
        Frame::Integer(n) => n,
        other => panic!("{other:?}"),
    }
}

/// Sends `n` pipelined SETs in batches of 100; returns the slowest batch. Values are
/// `value-<i>`, padded with `pad` extra bytes.
fn set_many(c: &mut RespReader, prefix: &str, n: usize, pad: usize) -> Duration {
    let pad = "x".repeat(pad);
    let mut slowest = Duration::ZERO;
    for batch in 0..n / 100 {
        let start = Instant::now();
        let mut req = String::new();
        for i in 0..100 {
            req.push_str(&format!(
                "SET {prefix}{} value-{i}{pad}\r\n",
                batch * 100 + i
            ));
        }
        c.send(req.as_bytes());
        for _ in 0..100 {
            assert_eq!(c.read(), Frame::Simple("OK".into()));
        }
        slowest = slowest.max(start.elapsed());
    }
    slowest
}

#[test]
fn write_mirror_copies_writes_and_not_reads() {
    let primary = RedisServer::start();
    let staging = RedisServer::start();
    let proxy = start_proxy_config(&config(
        primary.addr,
        staging.addr,
        "percentage = 100.0\nexclude_reads = true",
    ));
    let mut c = RespReader::connect(proxy.addr("svc").unwrap());
    set_many(&mut c, "m:", 1000, 0);
    c.send(b"GET m:1\r\n");
    assert_eq!(c.read(), Frame::Bulk("value-1".into()));
    wait_until(Duration::from_secs(5), || dbsize(&staging) == 1000);
    let stats = match staging.cmd(&["INFO", "commandstats"]) {
        Frame::Bulk(b) => String::from_utf8_lossy(&b).into_owned(),
        other => panic!("{other:?}"),
    };
    assert!(
        !stats.contains("cmdstat_get:"),
        "reads were mirrored: {stats}"
    );
    // Checked after the stats: this GET goes to the mirror directly.
    assert_eq!(
        staging.cmd(&["GET", "m:999"]),
        Frame::Bulk("value-99".into())
    );
    let metrics = proxy.metrics.encode();
    assert!(
        metrics.contains("redis_intercept_mirror_requests_total{service=\"svc\",upstream=\"staging\",result=\"sent\"} 1000"),
        "{metrics}"
    );
    proxy.shutdown();
}

#[test]
fn mirror_percentage_samples_requests() {
    let primary = RedisServer::start();
    let staging = RedisServer::start();
    let proxy = start_proxy_config(&config(primary.addr, staging.addr, "percentage = 50.0"));
    let mut c = RespReader::connect(proxy.addr("svc").unwrap());
    set_many(&mut c, "p:", 4000, 0);
    assert_eq!(dbsize(&primary), 4000);
    // Give the last copies a moment to land, then the sample must be about half.
    std::thread::sleep(Duration::from_millis(500));
    let copied = dbsize(&staging);
    assert!(
        (1800..=2200).contains(&copied),
        "{copied} of 4000 mirrored at 50%"
    );
    proxy.shutdown();
}

#[test]
fn mirror_down_never_fails_the_primary() {
    let primary = RedisServer::start();
    let nowhere = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let proxy = start_proxy_config(&config(primary.addr, nowhere, "percentage = 100.0"));
    let mut c = RespReader::connect(proxy.addr("svc").unwrap());
    let slowest = set_many(&mut c, "d:", 5000, 0);
    assert_eq!(dbsize(&primary), 5000);
    assert!(
        slowest < Duration::from_millis(250),
        "a batch took {slowest:?}"
    );
    let metrics = proxy.metrics.encode();
    assert!(
        metrics.contains("result=\"dropped\"} ") && !metrics.contains("result=\"dropped\"} 0\n"),
        "{metrics}"
    );
    proxy.shutdown();
}

#[test]
fn blackholed_mirror_never_slows_the_primary() {
    let primary = RedisServer::start();
    // Accepts connections and never reads from them: writes stall once the socket buffers fill.
    let hole = TcpListener::bind("127.0.0.1:0").unwrap();
    let hole_addr = hole.local_addr().unwrap();
    let keeper = std::thread::spawn(move || {
        let mut held = Vec::new();
        hole.set_nonblocking(true).unwrap();
        let until = Instant::now() + Duration::from_secs(60);
        while Instant::now() < until && held.len() < 64 {
            match hole.accept() {
                Ok((s, _)) => held.push(s),
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
        held
    });
    let proxy = start_proxy_config(&config(
        primary.addr,
        hole_addr,
        "percentage = 100.0\nmax_queue = \"64KiB\"",
    ));
    let mut c = RespReader::connect(proxy.addr("svc").unwrap());
    // Values big enough to fill the blackhole's socket buffers quickly.
    let slowest = set_many(&mut c, "b:", 5000, 2000);
    assert_eq!(dbsize(&primary), 5000);
    // The mirror's op_timeout is 300ms: a primary batch that waited on the mirror would show it.
    assert!(
        slowest < Duration::from_millis(250),
        "a batch took {slowest:?}"
    );
    let metrics = proxy.metrics.encode();
    assert!(
        !metrics.contains("result=\"dropped\"} 0\n"),
        "nothing was dropped:\n{metrics}"
    );
    proxy.shutdown();
    drop(keeper);
}

#[test]
fn batch_delay_holds_small_batches_and_a_full_batch_goes_at_once() {
    let primary = RedisServer::start();
    let staging = RedisServer::start();
    let proxy = start_proxy_config(&config(
        primary.addr,
        staging.addr,
        "percentage = 100.0\nbatch_delay = \"3s\"",
    ));
    let mut c = RespReader::connect(proxy.addr("svc").unwrap());
    // 100 small copies: far below a batch, so they wait out the delay.
    let start = Instant::now();
    set_many(&mut c, "small:", 100, 0);
    std::thread::sleep(Duration::from_millis(500));
    if start.elapsed() < Duration::from_secs(2) {
        assert_eq!(dbsize(&staging), 0, "copies went out before batch_delay");
    }
    wait_until(Duration::from_secs(10), || dbsize(&staging) == 100);
    assert!(
        start.elapsed() >= Duration::from_secs(3),
        "copies went out early"
    );
    // 800 copies of ~1 KiB: past 64 KiB, so they go without waiting out the delay (some of
    // the tail may stay queued until it ends).
    let start = Instant::now();
    set_many(&mut c, "big:", 800, 1000);
    wait_until(Duration::from_secs(10), || dbsize(&staging) >= 100 + 700);
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "a full batch waited for the delay: {:?}",
        start.elapsed()
    );
    wait_until(Duration::from_secs(10), || dbsize(&staging) == 900);
}
