//! End-to-end: `CLIENT REPLY`, `CLIENT PAUSE`/`UNPAUSE` and `CLIENT NO-EVICT` answered by
//! the proxy as Redis answers them for one server: the same bytes for a script (against a
//! plain Redis, standalone and cluster behind), a paused writer held while a reader goes on,
//! and `ALL` holding both until it ends.

#![expect(clippy::unwrap_used, reason = "tests panic on failure")]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use redis_intercept::resp::Frame;
use redis_intercept_e2e::{
    RedisCluster, RedisServer, RespReader, encode, start_cluster_proxy, start_proxy,
};

/// Sent in one pipeline; everything that comes back is compared.
const SCRIPT: &[&[&str]] = &[
    &["CLIENT", "REPLY", "OFF"],
    &["SET", "a", "1"],
    &["GET", "a"],
    &["CLIENT", "REPLY", "maybe"],
    &["MULTI"],
    &["INCR", "a"],
    &["EXEC"],
    &["CLIENT", "REPLY", "ON"],
    &["GET", "a"],
    &["CLIENT", "REPLY", "SKIP"],
    &["GET", "a"],
    &["PING", "after-skip"],
    &["CLIENT", "REPLY", "SKIP"],
    &["CLIENT", "REPLY", "maybe"],
    &["CLIENT", "REPLY", "SKIP"],
    &["CLIENT", "REPLY", "OFF"],
    &["PING", "off"],
    &["CLIENT", "REPLY", "SKIP"],
    &["PING", "still-off"],
    &["CLIENT", "REPLY", "ON"],
    &["CLIENT", "NO-EVICT", "on"],
    &["CLIENT", "NO-EVICT", "maybe"],
    &["CLIENT", "NO-EVICT", "off"],
    &["CLIENT", "PAUSE", "abc"],
    &["CLIENT", "PAUSE", "-1"],
    &["CLIENT", "PAUSE", "10", "FOO"],
    &["CLIENT", "UNPAUSE", "x"],
    &["CLIENT", "PAUSE", "10", "WRITE"],
    &["CLIENT", "UNPAUSE"],
    &["DEL", "a"],
];

fn script(addr: SocketAddr) -> String {
    let mut c = RespReader::connect(addr);
    let mut all = Vec::new();
    for cmd in SCRIPT {
        all.extend(encode(cmd));
    }
    c.send(&all);
    c.drain_raw(Duration::from_millis(300))
        .iter()
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .collect()
}

#[test]
fn client_reply_pause_and_no_evict_are_redis_byte_for_byte() {
    let direct = RedisServer::start();
    let want = script(direct.addr);
    let server = RedisServer::start();
    let proxy = start_proxy(server.addr, "");
    assert_eq!(want, script(proxy.addr("svc").unwrap()), "standalone");
    proxy.shutdown();
    let cluster = RedisCluster::start(3, 0);
    let seeds: Vec<String> = cluster.addrs().iter().map(ToString::to_string).collect();
    let proxy = start_cluster_proxy(&seeds, "", "");
    assert_eq!(want, script(proxy.addr("svc").unwrap()), "cluster");
    proxy.shutdown();
}

/// How long `cmd` takes on `c`.
fn timed(c: &mut RespReader, cmd: &[&str]) -> (Frame, Duration) {
    let at = Instant::now();
    let reply = c.call(cmd);
    (reply, at.elapsed())
}

#[test]
fn client_pause_holds_the_services_writers_and_then_everyone() {
    let server = RedisServer::start();
    let proxy = start_proxy(server.addr, "");
    let addr = proxy.addr("svc").unwrap();
    let mut admin = RespReader::connect(addr);
    let mut app = RespReader::connect(addr);
    app.call(&["SET", "k", "v"]);
    // WRITE: reads go on, a write waits for UNPAUSE (sent 400 ms later by another client).
    assert_eq!(
        admin.call(&["CLIENT", "PAUSE", "10000", "WRITE"]),
        Frame::Simple("OK".into())
    );
    let (r, took) = timed(&mut app, &["GET", "k"]);
    assert_eq!(r, Frame::Bulk("v".into()));
    assert!(took < Duration::from_millis(200), "a read waited {took:?}");
    let unpause = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(400));
        admin.call(&["CLIENT", "UNPAUSE"]);
        admin
    });
    let (r, took) = timed(&mut app, &["SET", "k", "w"]);
    assert_eq!(r, Frame::Simple("OK".into()));
    assert!(
        took >= Duration::from_millis(350) && took < Duration::from_secs(3),
        "a write waited {took:?}"
    );
    let mut admin = unpause.join().unwrap();
    // ALL (the default): reads wait too, until the pause ends by itself.
    assert_eq!(
        admin.call(&["CLIENT", "PAUSE", "500"]),
        Frame::Simple("OK".into())
    );
    let (r, took) = timed(&mut app, &["GET", "k"]);
    assert_eq!(r, Frame::Bulk("w".into()));
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_secs(3),
        "a read waited {took:?}"
    );
    // NO-EVICT shows in CLIENT INFO's flags.
    app.call(&["CLIENT", "NO-EVICT", "on"]);
    let Frame::Bulk(info) = app.call(&["CLIENT", "INFO"]) else {
        panic!("CLIENT INFO")
    };
    assert!(
        String::from_utf8_lossy(&info).contains(" flags=e "),
        "{info:?}"
    );
    proxy.shutdown();
}

/// What a monitor saw of `who`'s `SET`, `GET` and `AUTH`-free commands at `addr`, with the
/// timestamps cut: `[db address] "args"…`. Checks the address is `who`'s own.
fn monitored(addr: SocketAddr) -> Vec<String> {
    let mut monitor = RespReader::connect(addr);
    assert_eq!(monitor.call(&["MONITOR"]), Frame::Simple("OK".into()));
    let mut who = RespReader::connect(addr);
    let me = who.stream.local_addr().unwrap().to_string();
    who.call(&["SET", "k", "v\n\"x\""]);
    who.call(&["GET", "k"]);
    who.call(&["SELECT", "0"]);
    who.call(&["HSET", "h", "f", "\x01"]);
    who.call(&["DEL", "k", "h"]);
    let lines: Vec<String> = monitor
        .drain_raw(Duration::from_millis(300))
        .iter()
        .map(|l| String::from_utf8_lossy(l).into_owned())
        .collect();
    lines
        .iter()
        .map(|l| {
            let (stamp, rest) = l.split_once(' ').unwrap();
            assert!(stamp.starts_with('+') && stamp.contains('.'), "{l}");
            assert!(rest.contains(&format!(" {me}]")), "{l} is not from {me}");
            rest.replace(&me, "ADDR")
        })
        .collect()
}

#[test]
fn monitor_shows_another_clients_commands_with_its_address() {
    let direct = RedisServer::start();
    let want = monitored(direct.addr);
    assert_eq!(want.len(), 5, "{want:?}");
    let server = RedisServer::start();
    let proxy = start_proxy(server.addr, "");
    assert_eq!(want, monitored(proxy.addr("svc").unwrap()), "standalone");
    proxy.shutdown();
    let cluster = RedisCluster::start(3, 0);
    let seeds: Vec<String> = cluster.addrs().iter().map(ToString::to_string).collect();
    let proxy = start_cluster_proxy(&seeds, "", "");
    assert_eq!(want, monitored(proxy.addr("svc").unwrap()), "cluster");
    proxy.shutdown();
}

/// CLIENT UNBLOCK of another client's BLPOP, with TIMEOUT and with ERROR; 0 for a client
/// that isn't blocked; Redis's errors. What both clients see, as against Redis.
fn unblocking(addr: SocketAddr) -> Vec<String> {
    let mut seen = Vec::new();
    let mut blocked = RespReader::connect(addr);
    let Frame::Integer(id) = blocked.call(&["CLIENT", "ID"]) else {
        panic!("CLIENT ID")
    };
    let id = id.to_string();
    let mut admin = RespReader::connect(addr);
    let raw = |b: bytes::Bytes| String::from_utf8_lossy(&b).into_owned();
    seen.push(raw(admin.call_raw(&["CLIENT", "UNBLOCK", &id])));
    for mode in ["TIMEOUT", "ERROR"] {
        blocked.send(&encode(&["BLPOP", "q", "0"]));
        std::thread::sleep(Duration::from_millis(200));
        seen.push(raw(admin.call_raw(&["CLIENT", "UNBLOCK", &id, mode])));
        seen.push(raw(blocked.read_raw()));
    }
    seen.push(raw(admin.call_raw(&["CLIENT", "UNBLOCK", "x"])));
    seen.push(raw(admin.call_raw(&["CLIENT", "UNBLOCK", &id, "FOO"])));
    // The unblocked client goes on.
    seen.push(raw(blocked.call_raw(&["RPUSH", "q", "1"])));
    seen.push(raw(blocked.call_raw(&["BLPOP", "q", "0"])));
    seen
}

#[test]
fn client_unblock_reaches_a_blocked_command() {
    let direct = RedisServer::start();
    let want = unblocking(direct.addr);
    let server = RedisServer::start();
    let proxy = start_proxy(server.addr, "");
    assert_eq!(want, unblocking(proxy.addr("svc").unwrap()), "standalone");
    proxy.shutdown();
    let cluster = RedisCluster::start(3, 0);
    let seeds: Vec<String> = cluster.addrs().iter().map(ToString::to_string).collect();
    let proxy = start_cluster_proxy(&seeds, "", "");
    assert_eq!(want, unblocking(proxy.addr("svc").unwrap()), "cluster");
    proxy.shutdown();
}
