//! End-to-end, differential: client-side caching (`CLIENT TRACKING`) through the proxy gives
//! the same bytes as Redis: the replies of the tracking subcommands, the errors of bad
//! options, and the invalidation messages (RESP3 pushes, and RESP2 `__redis__:invalidate`
//! messages to a redirect target) that another client's writes cause, with a standalone
//! server and a cluster behind.

#![expect(clippy::unwrap_used, reason = "tests panic on failure")]

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use redis_intercept::resp::Frame;
use redis_intercept_e2e::{
    RedisCluster, RedisServer, RespReader, http_get, redis_cli, start_cluster_proxy, start_proxy,
    start_proxy_config,
};

/// How long a client waits for invalidations that a write may cause.
const SETTLE: Duration = Duration::from_millis(250);

/// How long a client waits after a reply of its own for what may follow it.
const AFTER_REPLY: Duration = Duration::from_millis(100);

/// One step of a script: a command of the tracking client, or another client's write
/// after which the tracking client's pushes are collected.
enum Step {
    /// The tracking client runs it; its reply is kept.
    Mine(&'static [&'static str]),
    /// The writer runs it; what reaches the tracking client meanwhile is kept.
    Write(&'static [&'static str]),
}

use Step::{Mine, Write};

/// Tracking subcommands, their errors, and invalidations, in RESP3 (pushes on the same
/// connection). Keys sit on different cluster slots.
const RESP3_SCRIPT: &[Step] = &[
    Mine(&["CLIENT", "TRACKINGINFO"]),
    Mine(&["CLIENT", "GETREDIR"]),
    Mine(&["CLIENT", "CACHING", "yes"]),
    Mine(&["CLIENT", "TRACKING", "ON"]),
    Mine(&["CLIENT", "TRACKINGINFO"]),
    Mine(&["CLIENT", "GETREDIR"]),
    Mine(&["CLIENT", "CACHING", "yes"]),
    Mine(&["GET", "a"]),
    Mine(&["MGET", "a", "{t}b"]),
    Write(&["SET", "a", "1"]),
    Write(&["SET", "a", "2"]),
    Mine(&["HGETALL", "h"]),
    // Deleting a key that isn't there changes nothing: no invalidation.
    Write(&["DEL", "{t}b"]),
    Write(&["SET", "{t}b", "x"]),
    Write(&["HSET", "h", "f", "v"]),
    // The client's own write: the reply, then the invalidation.
    Mine(&["GET", "a"]),
    Mine(&["SET", "a", "3"]),
    Write(&["PING"]),
    Mine(&["CLIENT", "TRACKING", "ON", "OPTIN"]),
    Mine(&["GET", "c"]),
    Write(&["SET", "c", "1"]),
    Mine(&["CLIENT", "CACHING", "yes"]),
    Mine(&["CLIENT", "TRACKINGINFO"]),
    Mine(&["GET", "c"]),
    Write(&["SET", "c", "2"]),
    Mine(&["CLIENT", "CACHING", "no"]),
    Mine(&["CLIENT", "TRACKING", "ON", "OPTOUT"]),
    Mine(&["CLIENT", "TRACKING", "OFF"]),
    Mine(&["CLIENT", "TRACKING", "ON", "OPTOUT"]),
    Mine(&["CLIENT", "CACHING", "no"]),
    Mine(&["GET", "d"]),
    Write(&["SET", "d", "1"]),
    Mine(&["GET", "d"]),
    Write(&["SET", "d", "2"]),
    Mine(&["CLIENT", "TRACKING", "OFF"]),
    Mine(&[
        "CLIENT", "TRACKING", "ON", "BCAST", "PREFIX", "p:", "PREFIX", "q:",
    ]),
    Mine(&["CLIENT", "TRACKINGINFO"]),
    Write(&["SET", "p:1", "x"]),
    Write(&["SET", "z", "1"]),
    Write(&["SET", "q:3", "b"]),
    Mine(&["CLIENT", "TRACKING", "ON", "BCAST", "PREFIX", "p"]),
    Mine(&["CLIENT", "TRACKING", "ON"]),
    Mine(&["CLIENT", "TRACKING", "OFF"]),
    Mine(&["CLIENT", "TRACKING", "ON", "BCAST"]),
    Mine(&["CLIENT", "TRACKINGINFO"]),
    Write(&["SET", "zz", "1"]),
    Mine(&["CLIENT", "TRACKING", "OFF"]),
    Mine(&["CLIENT", "TRACKING", "ON", "PREFIX", "x"]),
    Mine(&["CLIENT", "TRACKING", "ON", "OPTIN", "OPTOUT"]),
    Mine(&["CLIENT", "TRACKING", "ON", "BCAST", "OPTIN"]),
    Mine(&["CLIENT", "TRACKING", "ON", "REDIRECT", "999999"]),
    Mine(&["CLIENT", "TRACKING", "ON", "REDIRECT", "x"]),
    Mine(&["CLIENT", "TRACKING", "ON", "FOO"]),
    Mine(&["CLIENT", "TRACKING", "MAYBE"]),
    Mine(&[
        "CLIENT", "TRACKING", "ON", "BCAST", "PREFIX", "a", "PREFIX", "ab",
    ]),
    Mine(&["CLIENT", "TRACKINGINFO"]),
    Mine(&["CLIENT", "TRACKING", "ON"]),
    Mine(&["GET", "a"]),
    Mine(&["MULTI"]),
    Mine(&["GET", "{t}b"]),
    Mine(&["EXEC"]),
    Write(&["SET", "{t}b", "y"]),
    Mine(&["GET", "a"]),
    Write(&["FLUSHALL"]),
    Mine(&["CLIENT", "TRACKING", "OFF"]),
    Write(&["SET", "a", "1"]),
    Mine(&["CLIENT", "TRACKINGINFO"]),
    Write(&["FLUSHALL"]),
    // RESET turns tracking off (and the protocol back to RESP2).
    Mine(&["CLIENT", "TRACKING", "ON", "OPTOUT", "NOLOOP"]),
    Mine(&["GET", "a"]),
    Mine(&["RESET"]),
    Write(&["SET", "a", "2"]),
    Mine(&["CLIENT", "TRACKINGINFO"]),
    Mine(&["CLIENT", "GETREDIR"]),
];

/// Runs `script` with a RESP3 tracking client on `addr`; returns what it saw, step by step.
fn run_resp3(addr: SocketAddr) -> Vec<Vec<Bytes>> {
    let mut me = RespReader::connect(addr);
    let mut writer = RespReader::connect(addr);
    writer.call(&["FLUSHALL"]);
    me.call(&["HELLO", "3"]);
    run(&mut me, &mut writer, RESP3_SCRIPT)
}

fn run(me: &mut RespReader, writer: &mut RespReader, script: &[Step]) -> Vec<Vec<Bytes>> {
    script
        .iter()
        .map(|step| match step {
            Mine(cmd) => {
                let mut seen = vec![me.call_raw(cmd)];
                // Anything that follows the reply (the client's own invalidations).
                seen.extend(me.drain_raw(AFTER_REPLY));
                seen
            }
            Write(cmd) => {
                writer.call(cmd);
                me.drain_raw(SETTLE)
            }
        })
        .collect()
}

fn text(steps: &[Vec<Bytes>]) -> Vec<String> {
    steps
        .iter()
        .map(|s| {
            s.iter()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .collect::<Vec<_>>()
                .join("")
        })
        .collect()
}

fn compare(want: &[Vec<Bytes>], got: &[Vec<Bytes>], script: &[Step], what: &str) {
    let (want, got) = (text(want), text(got));
    for (i, step) in script.iter().enumerate() {
        let name = match step {
            Mine(c) => format!("mine {c:?}"),
            Write(c) => format!("write {c:?}"),
        };
        assert_eq!(want[i], got[i], "{what}: step {i} ({name})");
    }
}

#[test]
fn tracking_in_resp3_through_a_standalone_proxy_is_redis_byte_for_byte() {
    let direct = RedisServer::start();
    let want = run_resp3(direct.addr);
    let server = RedisServer::start();
    let proxy = start_proxy(server.addr, "");
    let got = run_resp3(proxy.addr("svc").unwrap());
    compare(&want, &got, RESP3_SCRIPT, "standalone");
    proxy.shutdown();
}

#[test]
fn tracking_in_resp3_through_a_cluster_proxy_is_redis_byte_for_byte() {
    let direct = RedisServer::start();
    let want = run_resp3(direct.addr);
    let cluster = RedisCluster::start(3, 0);
    let seeds: Vec<String> = cluster.addrs().iter().map(ToString::to_string).collect();
    let proxy = start_cluster_proxy(&seeds, "", "");
    let got = run_resp3(proxy.addr("svc").unwrap());
    compare(&want, &got, RESP3_SCRIPT, "cluster");
    proxy.shutdown();
}

/// A RESP2 client redirecting its invalidations to a subscribed RESP2 client, and a RESP3
/// one redirecting to a RESP3 client; then the target leaves. Ids are masked.
fn run_redirect(addr: SocketAddr) -> Vec<String> {
    let mut writer = RespReader::connect(addr);
    writer.call(&["FLUSHALL"]);
    let mut seen = Vec::new();
    let mut note = |b: Vec<Bytes>, ids: &[i64]| {
        let mut t: String = b.iter().map(|b| String::from_utf8_lossy(b)).collect();
        for id in ids {
            t = t.replace(&format!(":{id}\r\n"), ":ID\r\n");
        }
        seen.push(t);
    };
    // RESP2, redirected to a subscriber of __redis__:invalidate.
    let mut target = RespReader::connect(addr);
    let Frame::Integer(tid) = target.call(&["CLIENT", "ID"]) else {
        panic!("CLIENT ID")
    };
    note(
        vec![target.call_raw(&["SUBSCRIBE", "__redis__:invalidate"])],
        &[tid],
    );
    let mut me = RespReader::connect(addr);
    let tid_s = tid.to_string();
    let on = ["CLIENT", "TRACKING", "ON", "REDIRECT", tid_s.as_str()];
    note(vec![me.call_raw(&on)], &[tid]);
    note(vec![me.call_raw(&["CLIENT", "GETREDIR"])], &[tid]);
    note(vec![me.call_raw(&["GET", "a"])], &[]);
    writer.call(&["SET", "a", "1"]);
    note(target.drain_raw(SETTLE), &[]);
    note(me.drain_raw(SETTLE), &[]);
    note(vec![me.call_raw(&["GET", "a"])], &[]);
    writer.call(&["FLUSHALL"]);
    note(target.drain_raw(SETTLE), &[]);
    note(vec![me.call_raw(&["GET", "a"])], &[]);
    drop(target);
    std::thread::sleep(SETTLE);
    writer.call(&["SET", "a", "2"]);
    note(me.drain_raw(SETTLE), &[]);
    note(vec![me.call_raw(&["CLIENT", "TRACKINGINFO"])], &[tid]);
    // RESP3, redirected to a RESP3 client; then the target leaves.
    let mut target = RespReader::connect(addr);
    target.call(&["HELLO", "3"]);
    let Frame::Integer(tid) = target.call(&["CLIENT", "ID"]) else {
        panic!("CLIENT ID")
    };
    let mut me = RespReader::connect(addr);
    me.call(&["HELLO", "3"]);
    let tid_s = tid.to_string();
    let on = ["CLIENT", "TRACKING", "ON", "REDIRECT", tid_s.as_str()];
    note(vec![me.call_raw(&on)], &[tid]);
    note(vec![me.call_raw(&["GET", "b"])], &[]);
    writer.call(&["SET", "b", "1"]);
    note(target.drain_raw(SETTLE), &[]);
    note(me.drain_raw(SETTLE), &[]);
    note(vec![me.call_raw(&["GET", "b"])], &[]);
    drop(target);
    std::thread::sleep(SETTLE);
    writer.call(&["SET", "b", "2"]);
    note(me.drain_raw(SETTLE), &[tid]);
    note(vec![me.call_raw(&["CLIENT", "TRACKINGINFO"])], &[tid]);
    seen
}

/// Runs `script` on a plain Redis, and through the proxy with a standalone server and then a
/// cluster behind: all three must see the same.
fn agree(script: fn(SocketAddr) -> Vec<String>) {
    let direct = RedisServer::start();
    let want = script(direct.addr);
    let server = RedisServer::start();
    let proxy = start_proxy(server.addr, "");
    let got = script(proxy.addr("svc").unwrap());
    assert_eq!(want, got, "standalone");
    proxy.shutdown();
    let cluster = RedisCluster::start(3, 0);
    let seeds: Vec<String> = cluster.addrs().iter().map(ToString::to_string).collect();
    let proxy = start_cluster_proxy(&seeds, "", "");
    let got = script(proxy.addr("svc").unwrap());
    assert_eq!(want, got, "cluster");
    proxy.shutdown();
}

#[test]
fn redirected_invalidations_through_the_proxy_are_redis_byte_for_byte() {
    agree(run_redirect);
}

/// The proxy's table is bounded: past `tracking_table_max_keys`, the oldest keys are
/// invalidated (as Redis's `tracking-table-max-keys` does), and the metrics count keys and
/// invalidations.
#[test]
fn the_tracking_table_is_bounded_by_invalidating() {
    let server = RedisServer::start();
    let admin = redis_intercept_e2e::free_port();
    let proxy = start_proxy_config(&format!(
        r#"
[proxy]
workers = 1
tracking_table_max_keys = 10

[admin]
listen = "127.0.0.1:{admin}"

[[upstream]]
name = "r"
mode = "standalone"
nodes = ["{}"]

[[service]]
name = "svc"
listen = "127.0.0.1:0"
upstream = "r"
"#,
        server.addr
    ));
    let addr = proxy.addr("svc").unwrap();
    let mut me = RespReader::connect(addr);
    me.call(&["HELLO", "3"]);
    assert_eq!(
        me.call(&["CLIENT", "TRACKING", "ON"]),
        Frame::Simple("OK".into())
    );
    for i in 0..15 {
        me.call(&["GET", &format!("k{i}")]);
    }
    // Five keys over the limit: five invalidations, each of a key read earlier.
    let pushes = me.drain_raw(SETTLE);
    assert_eq!(pushes.len(), 5, "{pushes:?}");
    let (_, metrics) = http_get(format!("127.0.0.1:{admin}").parse().unwrap(), "/metrics");
    assert!(
        metrics.contains("redis_intercept_tracking_keys 10"),
        "{metrics}"
    );
    assert!(
        metrics.contains("redis_intercept_tracking_invalidations_total 5"),
        "{metrics}"
    );
    proxy.shutdown();
}

/// NOLOOP: a client isn't told of its own writes, while another tracking client is; in
/// RESP3, in BCAST mode, and in RESP2 redirected to a subscriber.
fn run_noloop(addr: SocketAddr) -> Vec<String> {
    let mut writer = RespReader::connect(addr);
    writer.call(&["FLUSHALL"]);
    let mut seen = Vec::new();
    let mut note = |b: Vec<Bytes>| {
        seen.push(
            b.iter()
                .map(|b| String::from_utf8_lossy(b))
                .collect::<String>(),
        )
    };
    let mut me = RespReader::connect(addr);
    me.call(&["HELLO", "3"]);
    let mut other = RespReader::connect(addr);
    other.call(&["HELLO", "3"]);
    note(vec![me.call_raw(&["CLIENT", "TRACKING", "ON", "NOLOOP"])]);
    note(vec![other.call_raw(&["CLIENT", "TRACKING", "ON"])]);
    note(vec![me.call_raw(&["CLIENT", "TRACKINGINFO"])]);
    for c in [&mut me, &mut other] {
        c.call(&["GET", "n1"]);
        c.call(&["GET", "{n1}b"]);
    }
    note(vec![me.call_raw(&["SET", "n1", "x"])]);
    note(vec![me.call_raw(&["MSET", "n1", "y", "{n1}b", "z"])]);
    note(vec![me.call_raw(&["INCR", "{n1}c"])]);
    note(me.drain_raw(SETTLE));
    note(other.drain_raw(SETTLE));
    // Its own write dropped its tracking of n1, as in Redis: another's write tells nothing.
    writer.call(&["SET", "n1", "w"]);
    note(me.drain_raw(SETTLE));
    note(vec![me.call_raw(&["GET", "n1"])]);
    writer.call(&["SET", "n1", "v"]);
    note(me.drain_raw(SETTLE));
    note(vec![me.call_raw(&["CLIENT", "TRACKING", "OFF"])]);
    // BCAST with NOLOOP.
    note(vec![me.call_raw(&[
        "CLIENT", "TRACKING", "ON", "BCAST", "NOLOOP", "PREFIX", "nl:",
    ])]);
    note(vec![me.call_raw(&["SET", "nl:1", "a"])]);
    note(me.drain_raw(SETTLE));
    writer.call(&["SET", "nl:1", "b"]);
    note(me.drain_raw(SETTLE));
    // RESP2, redirected to a subscriber.
    let mut target = RespReader::connect(addr);
    let Frame::Integer(tid) = target.call(&["CLIENT", "ID"]) else {
        panic!("CLIENT ID")
    };
    target.call(&["SUBSCRIBE", "__redis__:invalidate"]);
    let mut old = RespReader::connect(addr);
    let tid = tid.to_string();
    old.call(&["CLIENT", "TRACKING", "ON", "NOLOOP", "REDIRECT", &tid]);
    old.call(&["GET", "r2"]);
    note(vec![old.call_raw(&["SET", "r2", "1", "GET"])]);
    note(vec![old.call_raw(&["SET", "r2", "2", "NX"])]);
    note(target.drain_raw(SETTLE));
    old.call(&["GET", "r2"]);
    writer.call(&["SET", "r2", "3"]);
    note(target.drain_raw(SETTLE));
    seen
}

#[test]
fn noloop_through_the_proxy_is_redis_byte_for_byte() {
    agree(run_noloop);
}

/// The `redis` crate in RESP3, as a Rust app uses it: its push channel gets the
/// invalidations; and `redis-cli -3` shows RESP3 replies as it shows Redis's.
fn rust_and_cli(addr: SocketAddr) -> Vec<String> {
    let client = redis::Client::open(format!("redis://{addr}/?protocol=resp3")).unwrap();
    let mut c = client.get_connection().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    c.set_push_sender(tx);
    let mut seen = Vec::new();
    let _: () = redis::cmd("FLUSHALL").query(&mut c).unwrap();
    let _: () = redis::cmd("CLIENT")
        .arg("TRACKING")
        .arg("ON")
        .query(&mut c)
        .unwrap();
    let _: () = redis::cmd("HSET")
        .arg("h")
        .arg("f")
        .arg("1")
        .query(&mut c)
        .unwrap();
    let v: Option<String> = redis::cmd("GET").arg("k").query(&mut c).unwrap();
    seen.push(format!("{v:?}"));
    let h: redis::Value = redis::cmd("HGETALL").arg("h").query(&mut c).unwrap();
    seen.push(format!("{h:?}"));
    let mut writer = RespReader::connect(addr);
    writer.call(&["SET", "k", "1"]);
    writer.call(&["HSET", "h", "f", "2"]);
    std::thread::sleep(SETTLE);
    // Replies to later commands carry the pushes that came first to the channel.
    let _: String = redis::cmd("PING").query(&mut c).unwrap();
    let mut pushes: Vec<String> = rx.try_iter().map(|p| format!("{p:?}")).collect();
    pushes.sort();
    assert_eq!(pushes.len(), 2, "an invalidation per key read: {pushes:?}");
    seen.extend(pushes);
    for cmd in [
        &["HGETALL", "h"][..],
        &["CLIENT", "TRACKINGINFO"],
        &["ZADD", "z", "1.5", "m"],
        &["ZSCORE", "z", "m"],
        &["SMEMBERS", "missing"],
        &["GET", "missing"],
    ] {
        let mut args = vec!["-3"];
        args.extend_from_slice(cmd);
        seen.push(redis_cli(addr, &args));
    }
    seen
}

#[test]
fn the_redis_crate_and_redis_cli_in_resp3_through_the_proxy() {
    agree(rust_and_cli);
}
