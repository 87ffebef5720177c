//! End-to-end: fault injection (`[[service.fault]]`) against a real redis-server.

use std::time::{Duration, Instant};

use redis_intercept::resp::Frame;
use redis_intercept_e2e::{RedisServer, RespReader, start_proxy_with};

fn fault_count(c: &mut RespReader, command: &str, n: usize) -> usize {
    let mut batch = String::new();
    for i in 0..n {
        batch.push_str(&format!("{command} k{i}\r\n"));
    }
    c.send(batch.as_bytes());
    (0..n)
        .filter(|_| match c.read() {
            Frame::Error(e) => {
                assert_eq!(&e[..], b"ERR Fault Injected: Error");
                true
            }
            _ => false,
        })
        .count()
}

#[test]
fn half_of_gets_fail_with_the_seed_message() {
    let server = RedisServer::start();
    let proxy = start_proxy_with(
        server.addr,
        "",
        "[[service.fault]]\nkind = \"error\"\npercentage = 50.0\ncommands = [\"get\"]\n",
    );
    let mut c = RespReader::connect(proxy.addr("svc").unwrap());
    let failed = fault_count(&mut c, "GET", 10_000);
    let rate = failed as f64 / 100.0;
    assert!(
        (47.0..=53.0).contains(&rate),
        "observed {rate}% faults for 50%"
    );
    // Other commands are not covered by the filter.
    assert_eq!(fault_count(&mut c, "EXISTS", 1000), 0);
    // AUTH and PING are never faulted.
    c.send(b"PING\r\nAUTH x\r\n");
    assert_eq!(c.read(), Frame::Simple("PONG".into()));
    assert_eq!(c.read(), Frame::Simple("OK".into()));
    proxy.shutdown();
}

#[test]
fn fault_percentages_are_within_three_points() {
    let server = RedisServer::start();
    for pct in [0.0, 10.0, 90.0, 100.0] {
        let proxy = start_proxy_with(
            server.addr,
            "",
            &format!("[[service.fault]]\nkind = \"error\"\npercentage = {pct:.1}\n"),
        );
        let mut c = RespReader::connect(proxy.addr("svc").unwrap());
        let rate = fault_count(&mut c, "GET", 10_000) as f64 / 100.0;
        assert!(
            (rate - pct).abs() <= 3.0,
            "observed {rate}% faults for {pct}%"
        );
        proxy.shutdown();
    }
}

#[test]
fn custom_message_and_key_prefix_filter() {
    let server = RedisServer::start();
    let proxy = start_proxy_with(
        server.addr,
        "",
        "[[service.fault]]\nkind = \"error\"\npercentage = 100.0\nkey_prefix = \"flaky:\"\nmessage = \"ERR chaos\"\n",
    );
    let mut c = RespReader::connect(proxy.addr("svc").unwrap());
    c.send(b"SET flaky:1 v\r\nSET solid:1 v\r\nGET flaky:1\r\nDBSIZE\r\n");
    assert_eq!(c.read(), Frame::Error("ERR chaos".into()));
    assert_eq!(c.read(), Frame::Simple("OK".into()));
    assert_eq!(c.read(), Frame::Error("ERR chaos".into()));
    // A keyless command doesn't match a key_prefix rule.
    assert_eq!(c.read(), Frame::Integer(1));
    proxy.shutdown();
}

#[test]
fn delay_holds_only_its_client_and_keeps_order() {
    let server = RedisServer::start();
    assert_eq!(
        server.cmd(&["SET", "slow:a", "1"]),
        Frame::Simple("OK".into())
    );
    let proxy = start_proxy_with(
        server.addr,
        "",
        "[[service.fault]]\nkind = \"delay\"\npercentage = 100.0\ndelay = \"400ms\"\ncommands = [\"GET\"]\nkey_prefix = \"slow:\"\n",
    );
    let addr = proxy.addr("svc").unwrap();
    let mut slow = RespReader::connect(addr);
    let mut fast = RespReader::connect(addr);
    let start = Instant::now();
    // The SET after the delayed GET must not overtake it.
    slow.send(b"GET slow:a\r\nSET slow:a 2\r\nGET fast:b\r\n");
    // Meanwhile another client is served at once.
    fast.send(b"SET fast:b x\r\nGET fast:b\r\n");
    assert_eq!(fast.read(), Frame::Simple("OK".into()));
    assert_eq!(fast.read(), Frame::Bulk("x".into()));
    let fast_took = start.elapsed();
    assert_eq!(slow.read(), Frame::Bulk("1".into()));
    let slow_took = start.elapsed();
    assert_eq!(slow.read(), Frame::Simple("OK".into()));
    assert_eq!(slow.read(), Frame::Bulk("x".into()));
    assert!(
        fast_took < Duration::from_millis(200),
        "the other client waited {fast_took:?}"
    );
    assert!(
        slow_took >= Duration::from_millis(400),
        "the delay was {slow_took:?}"
    );
    proxy.shutdown();
}
