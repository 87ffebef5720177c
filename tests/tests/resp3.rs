//! End-to-end, differential: one script of commands sent to Redis directly and through the
//! proxy (a standalone server behind, and a cluster behind), in RESP2 and in RESP3, gives the
//! same reply bytes. RESP3 changes how Redis encodes replies (maps, sets, doubles, nulls), and
//! the proxy both passes Redis's replies through and makes some itself (HELLO, CLIENT
//! GETNAME, merged MGET/EXISTS/DBSIZE/KEYS across slots, errors).

#![expect(clippy::unwrap_used, reason = "tests panic on failure")]

use std::net::SocketAddr;

use bytes::Bytes;
use redis_intercept::resp::Frame;
use redis_intercept_e2e::{
    RedisCluster, RedisServer, RespReader, start_cluster_proxy, start_proxy,
};

/// The script: keys on several slots (`a`, `b`, `{t}x`), replies of every RESP3 type.
const SCRIPT: &[&[&str]] = &[
    &["PING"],
    &["PING", "hi"],
    &["ECHO", "e"],
    &["CLIENT", "GETNAME"],
    &["SET", "a", "1"],
    &["SET", "{t}x", "2"],
    &["GET", "a"],
    &["GET", "missing"],
    &["MGET", "a", "missing", "{t}x", "b"],
    &["EXISTS", "a", "b", "{t}x"],
    &["HSET", "h", "f", "v", "g", "w"],
    &["HGETALL", "h"],
    &["HGETALL", "missing"],
    &["SADD", "s", "m"],
    &["SMEMBERS", "s"],
    &["ZADD", "z", "1.5", "m"],
    &["ZSCORE", "z", "m"],
    &["ZRANGE", "z", "0", "-1", "WITHSCORES"],
    &["INCRBYFLOAT", "f", "1.5"],
    &["LPUSH", "l", "x"],
    &["LPOP", "l"],
    &["LPOP", "l"],
    &["LPOP", "l", "2"],
    &["LPUSH", "h", "x"],
    &["GET"],
    &["EVAL", "return {1, 'two', false}", "0"],
    &["EVAL", "return redis.call('hgetall', KEYS[1])", "1", "h"],
    &["TYPE", "h"],
    &["TTL", "a"],
    &["DBSIZE"],
    &["INFO", "keyspace"],
    &["KEYS", "*"],
    // One slot: a cluster runs a transaction on one master.
    &["HSET", "{t}h", "f", "v"],
    &["SADD", "{t}s", "m"],
    &["MULTI"],
    &["HGETALL", "{t}h"],
    &["GET", "{t}m"],
    &["SMEMBERS", "{t}s"],
    &["EXEC"],
    // Subcommands newer servers have (some change the connection): Redis 7.0's answer,
    // never sent on a shared connection.
    &["CLIENT", "MAINT_NOTIFICATIONS", "ON"],
    &["OBJECT", "Bar", "x"],
    &["MULTI"],
    &["CLIENT", "MAINT_NOTIFICATIONS", "ON"],
    &["GET", "{t}m"],
    &["EXEC"],
    &["CLIENT", "SETNAME", "n"],
    &["CLIENT", "GETNAME"],
    &[
        "DEL", "a", "b", "{t}x", "h", "s", "z", "f", "l", "{t}h", "{t}s",
    ],
    &["DBSIZE"],
];

/// Runs HELLO `protocol` and then the script on `addr`; returns HELLO's reply and the
/// script's replies as bytes (KEYS sorted: a cluster's keys come from several masters).
fn run(addr: SocketAddr, protocol: &str) -> (Frame, Vec<Bytes>) {
    let mut c = RespReader::connect(addr);
    let hello = c.call(&["HELLO", protocol]);
    let replies = SCRIPT
        .iter()
        .map(|cmd| {
            let raw = c.call_raw(cmd);
            if cmd[0] == "KEYS" { sorted(&raw) } else { raw }
        })
        .collect();
    (hello, replies)
}

/// An array or set reply with its elements in order, re-encoded as it came.
fn sorted(raw: &Bytes) -> Bytes {
    let (frame, _) = Frame::parse(raw, &Default::default()).unwrap().unwrap();
    let (mut items, set) = match frame {
        Frame::Array(items) => (items, false),
        Frame::Set(items) => (items, true),
        other => return other.to_bytes(),
    };
    items.sort_by_key(Frame::to_bytes);
    if set {
        Frame::Set(items)
    } else {
        Frame::Array(items)
    }
    .to_bytes()
}

/// The fields of a HELLO reply (a map in RESP3, a flat array in RESP2).
fn hello_fields(f: &Frame) -> Vec<(String, Frame)> {
    let text = |f: &Frame| match f {
        Frame::Bulk(b) => String::from_utf8_lossy(b).into_owned(),
        other => format!("{other:?}"),
    };
    match f {
        Frame::Map(pairs) => pairs.iter().map(|(k, v)| (text(k), v.clone())).collect(),
        Frame::Array(items) => items
            .chunks(2)
            .map(|kv| (text(&kv[0]), kv[1].clone()))
            .collect(),
        other => panic!("HELLO replied {other:?}"),
    }
}

/// Compares the script through `proxy` with the script on a plain Redis, in both protocols.
/// With `backend` (a standalone server behind the proxy), also checks that no subcommand the
/// proxy doesn't know reached it: Redis counts the `ERR` it answers them with in its
/// `errorstats` (it doesn't show rejected commands to MONITOR), and the script gives no other.
fn compare(proxy: SocketAddr, what: &str, backend: Option<SocketAddr>) {
    for protocol in ["2", "3"] {
        let direct = RedisServer::start();
        let (hello_direct, want) = run(direct.addr, protocol);
        let (hello_proxy, got) = run(proxy, protocol);
        assert_eq!(
            std::mem::discriminant(&hello_direct),
            std::mem::discriminant(&hello_proxy),
            "{what} RESP{protocol}: HELLO's shape"
        );
        let (d, p) = (hello_fields(&hello_direct), hello_fields(&hello_proxy));
        for field in ["server", "version", "proto", "mode", "role"] {
            let of =
                |v: &[(String, Frame)]| v.iter().find(|(k, _)| k == field).map(|(_, v)| v.clone());
            assert_eq!(of(&d), of(&p), "{what} RESP{protocol}: HELLO's {field}");
        }
        // INFO server names the upstream's version, as HELLO does.
        let version = |addr| {
            let mut c = RespReader::connect(addr);
            c.call(&["HELLO", protocol]);
            let text = match c.call(&["INFO", "server"]) {
                Frame::Bulk(b) | Frame::Verbatim(b) => String::from_utf8_lossy(&b).into_owned(),
                other => panic!("INFO: {other:?}"),
            };
            text.lines()
                .find_map(|l| l.strip_prefix("redis_version:"))
                .map(str::to_owned)
        };
        assert_eq!(
            version(direct.addr),
            version(proxy),
            "{what} RESP{protocol}: INFO's version"
        );
        for ((cmd, want), got) in SCRIPT.iter().zip(&want).zip(&got) {
            assert_eq!(
                String::from_utf8_lossy(want),
                String::from_utf8_lossy(got),
                "{what} RESP{protocol}: {cmd:?}"
            );
        }
    }
    // A subcommand newer servers know (Valkey 8 and Redis 7.2 answer OK) but the built-in
    // table doesn't: refused, since it would change a shared connection; as Redis 7.0
    // refuses it, or (once learned from a newer server's COMMAND) as not supported.
    let mut c = RespReader::connect(proxy);
    let reply = String::from_utf8_lossy(&c.call_raw(&["CLIENT", "NO-TOUCH", "ON"])).into_owned();
    assert!(
        reply == "-ERR unknown subcommand 'NO-TOUCH'. Try CLIENT HELP.\r\n"
            || reply.starts_with("-ERR 'CLIENT NO-TOUCH' is not supported by redis-intercept"),
        "{reply}"
    );
    if let Some(addr) = backend {
        let stats = match RespReader::connect(addr).call(&["INFO", "errorstats"]) {
            Frame::Bulk(b) => String::from_utf8_lossy(&b).into_owned(),
            other => panic!("INFO errorstats: {other:?}"),
        };
        assert!(
            !stats.contains("errorstat_ERR:"),
            "{what}: a request reached the server and got ERR: {stats}"
        );
    }
}

#[test]
fn a_script_gives_the_same_bytes_in_resp2_and_resp3_through_a_standalone_proxy() {
    let server = RedisServer::start();
    let proxy = start_proxy(server.addr, "");
    compare(proxy.addr("svc").unwrap(), "standalone", Some(server.addr));
    proxy.shutdown();
}

#[test]
fn a_script_gives_the_same_bytes_in_resp2_and_resp3_through_a_cluster_proxy() {
    let cluster = RedisCluster::start(3, 0);
    let seeds: Vec<String> = cluster.addrs().iter().map(ToString::to_string).collect();
    let proxy = start_cluster_proxy(&seeds, "", "");
    compare(proxy.addr("svc").unwrap(), "cluster", None);
    proxy.shutdown();
}

/// A RESP3 subscriber: its confirmations and messages are pushes, it runs other commands
/// while subscribed (their replies in order among the pushes), and after unsubscribing it is
/// an ordinary client again. Returns every frame it read, as bytes, and PUBLISH's replies.
fn subscriber_script(addr: SocketAddr) -> (Vec<Bytes>, Vec<Frame>) {
    let mut setup = RespReader::connect(addr);
    setup.call(&["SET", "k", "v"]);
    setup.call(&["HSET", "h", "f", "v"]);
    let mut sub = RespReader::connect(addr);
    sub.call(&["HELLO", "3"]);
    let mut seen = vec![sub.call_raw(&["SUBSCRIBE", "ch", "other"]), sub.read_raw()];
    let mut published = vec![setup.call(&["PUBLISH", "ch", "hi"])];
    seen.push(sub.read_raw());
    seen.push(sub.call_raw(&["GET", "k"]));
    seen.push(sub.call_raw(&["HGETALL", "h"]));
    seen.push(sub.call_raw(&["PING"]));
    published.push(setup.call(&["PUBLISH", "other", "there"]));
    seen.push(sub.read_raw());
    // Named, in order: with none, Redis lists the channels in its hash order, which differs
    // between processes.
    seen.push(sub.call_raw(&["UNSUBSCRIBE", "other", "ch"]));
    seen.push(sub.read_raw());
    seen.push(sub.call_raw(&["GET", "k"]));
    published.push(setup.call(&["PUBLISH", "ch", "gone"]));
    seen.push(sub.call_raw(&["PING"]));
    setup.call(&["DEL", "k", "h"]);
    (seen, published)
}

fn compare_subscriber(proxy: SocketAddr, what: &str) {
    let direct = RedisServer::start();
    let (want, published_direct) = subscriber_script(direct.addr);
    let (got, published) = subscriber_script(proxy);
    let text = |v: &[Bytes]| {
        v.iter()
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(text(&want), text(&got), "{what}");
    assert_eq!(published_direct, published, "{what}: PUBLISH's counts");
}

#[test]
fn a_resp3_subscriber_gets_pushes_and_runs_commands_while_subscribed() {
    let server = RedisServer::start();
    let proxy = start_proxy(server.addr, "");
    compare_subscriber(proxy.addr("svc").unwrap(), "standalone");
    proxy.shutdown();
}

#[test]
fn a_resp3_subscriber_through_a_cluster_proxy() {
    let cluster = RedisCluster::start(3, 0);
    let seeds: Vec<String> = cluster.addrs().iter().map(ToString::to_string).collect();
    let proxy = start_cluster_proxy(&seeds, "", "");
    compare_subscriber(proxy.addr("svc").unwrap(), "cluster");
    proxy.shutdown();
}
