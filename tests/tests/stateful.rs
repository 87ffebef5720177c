//! End-to-end: transactions and blocking commands through the proxy, on connections of their
//! own, in front of a real redis-server and a real Redis Cluster.
#![expect(clippy::unwrap_used, reason = "tests panic on failure")]

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use redis_intercept::cluster::{Slot, SlotMap};
use redis_intercept::resp::Frame;
use redis_intercept_e2e::{
    RedisCluster, RedisServer, RespReader, encode, start_cluster_proxy, start_proxy,
    start_proxy_config, wait_until,
};

fn bulk(s: &str) -> Frame {
    Frame::Bulk(s.as_bytes().to_vec().into())
}

fn simple(s: &str) -> Frame {
    Frame::Simple(s.as_bytes().to_vec().into())
}

/// A pub/sub push or confirmation: `[kind, channel, count]`.
fn push3(kind: &str, channel: &str, count: i64) -> Frame {
    Frame::Array(vec![bulk(kind), bulk(channel), Frame::Integer(count)])
}

fn is_error(f: &Frame, text: &str) -> bool {
    matches!(f, Frame::Error(e) if String::from_utf8_lossy(e).contains(text))
}

/// A field of the server's INFO (e.g. `total_connections_received`).
fn info_field(server: &RedisServer, field: &str) -> i64 {
    let Frame::Bulk(info) = server.cmd(&["INFO", "all"]) else {
        panic!("INFO is not a bulk string");
    };
    String::from_utf8_lossy(&info)
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in INFO"))
}

/// A cluster of 3 masters and a proxy in front of it (`upstream_extra` in its upstream), with
/// the cluster's slot map as the test sees it.
fn cluster_and_proxy(upstream_extra: &str) -> (RedisCluster, redis_intercept::app::Proxy, SlotMap) {
    let cluster = RedisCluster::start(3, 0);
    let seeds: Vec<String> = cluster.addrs().iter().map(ToString::to_string).collect();
    let proxy = start_cluster_proxy(&seeds, upstream_extra, "");
    let map =
        SlotMap::from_cluster_slots(&cluster.nodes[0].cmd(&["CLUSTER", "SLOTS"]), "127.0.0.1")
            .unwrap();
    (cluster, proxy, map)
}

/// A gauge's value in the proxy's `/metrics` (the first series whose line starts with `name`).
fn gauge(proxy: &redis_intercept::app::Proxy, name: &str) -> f64 {
    let (_, metrics) = redis_intercept_e2e::http_get(proxy.admin_addr().unwrap(), "/metrics");
    metrics
        .lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no {name} in:\n{metrics}"))
}

#[test]
fn idle_transaction_connections_are_capped_by_max_idle_dedicated() {
    let server = RedisServer::start();
    let proxy = start_proxy_config(&format!(
        "[proxy]\nworkers = 1\ndrain_timeout = \"1s\"\n\n\
         [[upstream]]\nname = \"main\"\nmode = \"standalone\"\nnodes = [\"{}\"]\n\
         max_idle_dedicated = 1\n\n\
         [[service]]\nname = \"svc\"\nlisten = \"127.0.0.1:0\"\nupstream = \"main\"\n",
        server.addr
    ));
    let addr = proxy.addr("svc").unwrap();
    // The shared connection is up once a request went through; `server.cmd` itself is one
    // connection while it asks.
    assert_eq!(
        RespReader::connect(addr).call(&["GET", "x"]),
        Frame::NullBulk
    );
    let base = info_field(&server, "connected_clients");
    // Three transactions open at once: three connections of their own.
    let mut clients: Vec<RespReader> = (0..3).map(|_| RespReader::connect(addr)).collect();
    for (i, c) in clients.iter_mut().enumerate() {
        assert_eq!(c.call(&["MULTI"]), simple("OK"));
        assert_eq!(c.call(&["INCR", &format!("t{i}")]), simple("QUEUED"));
    }
    wait_until(Duration::from_secs(5), || {
        info_field(&server, "connected_clients") == base + 3
    });
    for c in &mut clients {
        assert_eq!(c.call(&["EXEC"]), Frame::Array(vec![Frame::Integer(1)]));
    }
    // Given back clean: one is kept for the next client, the other two are closed.
    wait_until(Duration::from_secs(5), || {
        info_field(&server, "connected_clients") == base + 1
    });
    proxy.shutdown();
}

#[test]
fn transactions_run_on_a_connection_of_their_own_that_is_reused() {
    let server = RedisServer::start();
    let proxy = redis_intercept_e2e::start_proxy_with(
        server.addr,
        "[admin]\nlisten = \"127.0.0.1:0\"\n",
        "",
    );
    let addr = proxy.addr("svc").unwrap();
    let mut c = RespReader::connect(addr);
    // One command at a time, as a client that waits for each reply does.
    assert_eq!(c.call(&["MULTI"]), simple("OK"));
    assert_eq!(c.call(&["SET", "t", "1"]), simple("QUEUED"));
    assert_eq!(c.call(&["INCR", "t"]), simple("QUEUED"));
    assert_eq!(c.call(&["PING"]), simple("QUEUED"));
    assert_eq!(
        c.call(&["EXEC"]),
        Frame::Array(vec![simple("OK"), Frame::Integer(2), simple("PONG")])
    );
    assert_eq!(server.cmd(&["GET", "t"]), bulk("2"));
    // Redis's own answers without a transaction.
    assert!(is_error(&c.call(&["EXEC"]), "EXEC without MULTI"));
    assert!(is_error(&c.call(&["DISCARD"]), "DISCARD without MULTI"));
    assert_eq!(c.call(&["UNWATCH"]), simple("OK"));
    // DISCARD and RESET end a transaction without running it.
    assert_eq!(c.call(&["MULTI"]), simple("OK"));
    assert_eq!(c.call(&["SET", "gone", "1"]), simple("QUEUED"));
    assert_eq!(c.call(&["DISCARD"]), simple("OK"));
    assert_eq!(c.call(&["MULTI"]), simple("OK"));
    assert_eq!(c.call(&["SET", "gone", "1"]), simple("QUEUED"));
    assert_eq!(c.call(&["RESET"]), simple("RESET"));
    assert!(is_error(&c.call(&["EXEC"]), "EXEC without MULTI"));
    assert_eq!(server.cmd(&["EXISTS", "gone"]), Frame::Integer(0));
    // A command the proxy refuses inside MULTI fails EXEC, as a queueing error does in Redis.
    assert_eq!(c.call(&["MULTI"]), simple("OK"));
    assert_eq!(c.call(&["SET", "gone", "1"]), simple("QUEUED"));
    assert!(is_error(&c.call(&["CLIENT", "LIST"]), "inside MULTI"));
    assert!(is_error(&c.call(&["EXEC"]), "EXECABORT"));
    assert_eq!(server.cmd(&["EXISTS", "gone"]), Frame::Integer(0));

    // A real client library's transaction (one write: MULTI … EXEC).
    let mut lib = redis::Client::open(format!("redis://{addr}/"))
        .unwrap()
        .get_connection_with_timeout(Duration::from_secs(5))
        .unwrap();
    let (v, n): (String, i64) = redis::pipe()
        .atomic()
        .set("lib", "x")
        .ignore()
        .get("lib")
        .incr("libn", 5)
        .query(&mut lib)
        .unwrap();
    assert_eq!((v.as_str(), n), ("x", 5));

    // Many short transactions, each from a new client, share a few pooled connections
    // instead of opening one each (the known Envoy failure).
    let before = info_field(&server, "total_connections_received");
    for _ in 0..200 {
        let mut c = RespReader::connect(addr);
        c.send(
            &[
                encode(&["MULTI"]),
                encode(&["INCR", "many"]),
                encode(&["EXEC"]),
            ]
            .concat(),
        );
        assert_eq!(c.read(), simple("OK"));
        assert_eq!(c.read(), simple("QUEUED"));
        assert!(matches!(c.read(), Frame::Array(v) if v.len() == 1));
    }
    let opened = info_field(&server, "total_connections_received") - before;
    assert_eq!(server.cmd(&["GET", "many"]), bulk("200"));
    // Two workers, one pooled connection each at most, plus the INFO connection itself.
    assert!(opened <= 4, "200 transactions opened {opened} connections");
    // Pooled connections have their own gauge: readiness counts shared connections only.
    assert_eq!(
        gauge(&proxy, "redis_intercept_upstream_connections_up{"),
        2.0
    );
    let dedicated = gauge(&proxy, "redis_intercept_upstream_dedicated_connections_up{");
    assert!((1.0..=2.0).contains(&dedicated), "{dedicated}");
    proxy.shutdown();
}

#[test]
fn watch_aborts_exec_when_another_client_changes_the_key_and_keeps_pipeline_order() {
    let server = RedisServer::start();
    let proxy = start_proxy(server.addr, "");
    let addr = proxy.addr("svc").unwrap();
    let mut a = RespReader::connect(addr);
    let mut b = RespReader::connect(addr);
    assert_eq!(a.call(&["SET", "w", "start"]), simple("OK"));
    assert_eq!(a.call(&["WATCH", "w"]), simple("OK"));
    assert_eq!(a.call(&["GET", "w"]), bulk("start"));
    assert_eq!(b.call(&["SET", "w", "theirs"]), simple("OK"));
    assert_eq!(a.call(&["MULTI"]), simple("OK"));
    assert_eq!(a.call(&["SET", "w", "mine"]), simple("QUEUED"));
    assert_eq!(a.call(&["EXEC"]), Frame::NullArray);
    assert_eq!(server.cmd(&["GET", "w"]), bulk("theirs"));
    // Untouched, the same transaction goes through.
    assert_eq!(a.call(&["WATCH", "w"]), simple("OK"));
    assert_eq!(a.call(&["MULTI"]), simple("OK"));
    assert_eq!(a.call(&["SET", "w", "mine"]), simple("QUEUED"));
    assert_eq!(a.call(&["EXEC"]), Frame::Array(vec![simple("OK")]));
    assert_eq!(server.cmd(&["GET", "w"]), bulk("mine"));

    // A write sent on the shared connection just before WATCH in the same pipeline has run
    // before the WATCH (the session waits for it before switching connections), so it
    // doesn't abort the transaction; and commands after EXEC see its result.
    for i in 0..50 {
        let key = format!("p{i}");
        a.send(
            &[
                encode(&["SET", &key, "1"]),
                encode(&["WATCH", &key]),
                encode(&["MULTI"]),
                encode(&["INCR", &key]),
                encode(&["EXEC"]),
                encode(&["GET", &key]),
            ]
            .concat(),
        );
        for expected in ["OK", "OK", "OK", "QUEUED"] {
            assert_eq!(a.read(), simple(expected), "round {i}");
        }
        assert_eq!(a.read(), Frame::Array(vec![Frame::Integer(2)]), "round {i}");
        assert_eq!(a.read(), bulk("2"), "round {i}");
    }
    // The same while Redis holds back writes: the SET waits on the shared connection, and
    // a WATCH sent at once on the other connection would run first and see the client's own
    // SET abort the transaction.
    for i in 0..3 {
        assert_eq!(
            server.cmd(&["CLIENT", "PAUSE", "300", "WRITE"]),
            simple("OK")
        );
        a.send(
            &[
                encode(&["SET", "held", &i.to_string()]),
                encode(&["WATCH", "held"]),
                encode(&["MULTI"]),
                encode(&["SET", "held", "tx"]),
                encode(&["EXEC"]),
            ]
            .concat(),
        );
        for expected in ["OK", "OK", "OK", "QUEUED"] {
            assert_eq!(a.read(), simple(expected), "paused round {i}");
        }
        assert_eq!(
            a.read(),
            Frame::Array(vec![simple("OK")]),
            "paused round {i}"
        );
        assert_eq!(server.cmd(&["GET", "held"]), bulk("tx"));
    }
    proxy.shutdown();
}

#[test]
fn blocking_pops_wait_on_their_own_connection_without_holding_anyone_else() {
    let server = RedisServer::start();
    // A short op_timeout: a blocking command waits as long as it asked regardless.
    let proxy = start_proxy(server.addr, "op_timeout = \"300ms\"");
    let addr = proxy.addr("svc").unwrap();
    let mut waiter = RespReader::connect(addr);
    waiter.send(&encode(&["BLPOP", "queue", "5"]));
    wait_until(Duration::from_secs(5), || {
        info_field(&server, "blocked_clients") == 1
    });
    // Other clients' commands are not stuck behind the blocked one.
    let mut other = RespReader::connect(addr);
    let started = Instant::now();
    for i in 0..100 {
        assert_eq!(other.call(&["SET", "k", &i.to_string()]), simple("OK"));
    }
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "100 commands took {:?} while a BLPOP waited",
        started.elapsed()
    );
    assert_eq!(other.call(&["RPUSH", "queue", "job"]), Frame::Integer(1));
    assert_eq!(
        waiter.read(),
        Frame::Array(vec![bulk("queue"), bulk("job")])
    );
    // A timeout longer than op_timeout ends with Redis's nil, not a proxy timeout.
    let started = Instant::now();
    assert_eq!(waiter.call(&["BRPOP", "empty", "1"]), Frame::NullArray);
    assert!(started.elapsed() >= Duration::from_millis(900));
    // The connection is usable for ordinary commands after each blocking one.
    assert_eq!(waiter.call(&["GET", "k"]), bulk("99"));
    // A client that leaves while blocked takes its connection with it: Redis stops
    // blocking for it.
    waiter.send(&encode(&["BLPOP", "never", "0"]));
    wait_until(Duration::from_secs(5), || {
        info_field(&server, "blocked_clients") == 1
    });
    drop(waiter);
    wait_until(Duration::from_secs(5), || {
        info_field(&server, "blocked_clients") == 0
    });
    proxy.shutdown();
}

#[test]
fn a_lost_dedicated_connection_fails_the_transaction_and_nothing_runs_outside_it() {
    let server = RedisServer::start();
    let proxy = start_proxy(server.addr, "");
    let mut c = RespReader::connect(proxy.addr("svc").unwrap());
    assert_eq!(c.call(&["MULTI"]), simple("OK"));
    assert_eq!(c.call(&["SET", "lost", "1"]), simple("QUEUED"));
    // The transaction's connection is the one in MULTI (flag `x`); kill it on the server.
    let Frame::Bulk(list) = server.cmd(&["CLIENT", "LIST"]) else {
        panic!("CLIENT LIST is not a bulk string");
    };
    let list = String::from_utf8_lossy(&list).into_owned();
    let id = list
        .lines()
        .find(|l| l.contains(" flags=x "))
        .and_then(|l| l.strip_prefix("id="))
        .and_then(|l| l.split(' ').next())
        .unwrap_or_else(|| panic!("no client in MULTI:\n{list}"))
        .to_owned();
    assert_eq!(
        server.cmd(&["CLIENT", "KILL", "ID", &id]),
        Frame::Integer(1)
    );
    // Queued commands and EXEC fail; none of them runs on another connection.
    let incr = c.call(&["INCR", "lost"]);
    assert!(matches!(incr, Frame::Error(_)), "{incr:?}");
    let exec = c.call(&["EXEC"]);
    assert!(matches!(exec, Frame::Error(_)), "{exec:?}");
    assert_eq!(server.cmd(&["EXISTS", "lost"]), Frame::Integer(0));
    // The client goes on normally.
    assert_eq!(c.call(&["SET", "after", "1"]), simple("OK"));
    assert_eq!(c.call(&["MULTI"]), simple("OK"));
    assert_eq!(c.call(&["INCR", "after"]), simple("QUEUED"));
    assert_eq!(c.call(&["EXEC"]), Frame::Array(vec![Frame::Integer(2)]));
    proxy.shutdown();
}

#[test]
fn cluster_transactions_stay_in_one_slot_and_blocking_pops_reach_any_master() {
    let (cluster, proxy, map) = cluster_and_proxy("");
    let addr = proxy.addr("svc").unwrap();
    let owner = |key: &str| {
        let master = map
            .master(Slot::for_key(key.as_bytes()))
            .unwrap()
            .to_owned();
        cluster
            .nodes
            .iter()
            .find(|n| n.addr.to_string() == master)
            .unwrap()
    };
    let mut c = RespReader::connect(addr);
    // MULTI is answered before any key says where the transaction runs.
    assert_eq!(c.call(&["MULTI"]), simple("OK"));
    assert_eq!(c.call(&["PING"]), simple("QUEUED"));
    assert!(is_error(
        &c.call(&["MULTI"]),
        "MULTI calls can not be nested"
    ));
    assert_eq!(c.call(&["SET", "{acct}from", "10"]), simple("QUEUED"));
    assert_eq!(c.call(&["INCRBY", "{acct}to", "5"]), simple("QUEUED"));
    assert_eq!(
        c.call(&["EXEC"]),
        Frame::Array(vec![simple("PONG"), simple("OK"), Frame::Integer(5)])
    );
    assert_eq!(owner("{acct}to").cmd(&["GET", "{acct}to"]), bulk("5"));
    // Keys in two slots: Redis Cluster's error, and nothing runs.
    assert_ne!(Slot::for_key(b"a"), Slot::for_key(b"b"));
    assert_eq!(c.call(&["MULTI"]), simple("OK"));
    assert_eq!(c.call(&["SET", "a", "1"]), simple("QUEUED"));
    assert!(is_error(&c.call(&["SET", "b", "1"]), "CROSSSLOT"));
    assert!(is_error(&c.call(&["EXEC"]), "EXECABORT"));
    assert_eq!(owner("a").cmd(&["EXISTS", "a"]), Frame::Integer(0));
    // WATCH on a cluster.
    assert_eq!(c.call(&["WATCH", "{acct}to"]), simple("OK"));
    assert_eq!(c.call(&["MULTI"]), simple("OK"));
    assert_eq!(c.call(&["INCR", "{acct}to"]), simple("QUEUED"));
    assert_eq!(c.call(&["EXEC"]), Frame::Array(vec![Frame::Integer(6)]));
    // An empty transaction.
    assert_eq!(c.call(&["MULTI"]), simple("OK"));
    assert_eq!(c.call(&["EXEC"]), Frame::Array(vec![]));
    // Blocking pops on keys of every master.
    for key in ["a", "b", "c", "d", "e", "f"] {
        let mut waiter = RespReader::connect(addr);
        waiter.send(&encode(&["BLPOP", key, "5"]));
        wait_until(Duration::from_secs(5), || {
            info_field(owner(key), "blocked_clients") == 1
        });
        assert_eq!(c.call(&["RPUSH", key, "v"]), Frame::Integer(1));
        assert_eq!(waiter.read(), Frame::Array(vec![bulk(key), bulk("v")]));
    }
    proxy.shutdown();
}

#[test]
fn subscribers_get_a_pipe_of_their_own_and_publishers_reach_them() {
    let server = RedisServer::start();
    let proxy = start_proxy(server.addr, "");
    let addr = proxy.addr("svc").unwrap();
    let mut sub = RespReader::connect(addr);
    let mut publisher = RespReader::connect(addr);
    // Replies owed before the SUBSCRIBE in the same write come first, in order.
    sub.send(
        &[
            encode(&["SET", "before", "1"]),
            encode(&["GET", "before"]),
            encode(&["SUBSCRIBE", "news", "sport"]),
        ]
        .concat(),
    );
    assert_eq!(sub.read(), simple("OK"));
    assert_eq!(sub.read(), bulk("1"));
    for (i, ch) in ["news", "sport"].iter().enumerate() {
        assert_eq!(sub.read(), push3("subscribe", ch, i as i64 + 1));
    }
    assert_eq!(
        publisher.call(&["PUBLISH", "news", "hello"]),
        Frame::Integer(1)
    );
    assert_eq!(
        sub.read(),
        Frame::Array(vec![bulk("message"), bulk("news"), bulk("hello")])
    );
    // Patterns, and the subscribed-mode PING, answered by Redis itself.
    assert_eq!(
        sub.call(&["PSUBSCRIBE", "al*"]),
        push3("psubscribe", "al*", 3)
    );
    assert_eq!(
        publisher.call(&["PUBLISH", "alerts", "fire"]),
        Frame::Integer(1)
    );
    assert_eq!(
        sub.read(),
        Frame::Array(vec![
            bulk("pmessage"),
            bulk("al*"),
            bulk("alerts"),
            bulk("fire")
        ])
    );
    assert_eq!(
        sub.call(&["PING"]),
        Frame::Array(vec![bulk("pong"), bulk("")])
    );
    // Shard channels on a standalone server: counted on their own, as Redis does.
    sub.send(&encode(&["SSUBSCRIBE", "s1", "s2"]));
    for (i, ch) in ["s1", "s2"].iter().enumerate() {
        assert_eq!(sub.read(), push3("ssubscribe", ch, i as i64 + 1));
    }
    assert_eq!(publisher.call(&["SPUBLISH", "s2", "x"]), Frame::Integer(1));
    assert_eq!(
        sub.read(),
        Frame::Array(vec![bulk("smessage"), bulk("s2"), bulk("x")])
    );
    // The publisher's connection is an ordinary one still.
    assert_eq!(publisher.call(&["GET", "before"]), bulk("1"));
    // A subscriber that leaves takes its subscriptions with it.
    drop(sub);
    wait_until(Duration::from_secs(5), || {
        server.cmd(&["PUBSUB", "NUMSUB", "news"])
            == Frame::Array(vec![bulk("news"), Frame::Integer(0)])
    });
    // Shutdown doesn't wait for a subscriber to leave.
    let mut idle_sub = RespReader::connect(addr);
    idle_sub.call(&["SUBSCRIBE", "quiet"]);
    let started = Instant::now();
    proxy.shutdown();
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[test]
fn cluster_transactions_and_blocking_pops_follow_a_slot_that_moved() {
    // No periodic refresh: only the MOVED tells the proxy where the slots went.
    let (cluster, proxy, map) = cluster_and_proxy("refresh_interval = \"1h\"");
    let addr = proxy.addr("svc").unwrap();
    let by_addr = |a: &str| {
        cluster
            .nodes
            .iter()
            .find(|n| n.addr.to_string() == a)
            .unwrap()
    };
    // Moves the (empty) slot of `key` to another master, on every node; returns the new owner.
    let move_slot = |key: &str| {
        let slot = Slot::for_key(key.as_bytes());
        let from = map.master(slot).unwrap();
        let to = cluster
            .nodes
            .iter()
            .find(|n| n.addr.to_string() != from)
            .unwrap();
        let Frame::Bulk(id) = to.cmd(&["CLUSTER", "MYID"]) else {
            panic!("MYID");
        };
        let id = String::from_utf8_lossy(&id).into_owned();
        for n in &cluster.nodes {
            assert_eq!(
                n.cmd(&["CLUSTER", "SETSLOT", &slot.get().to_string(), "NODE", &id]),
                simple("OK")
            );
        }
        assert_eq!(
            by_addr(from).cmd(&["GET", key]),
            Frame::Error(
                format!("MOVED {} {}", slot.get(), to.addr)
                    .into_bytes()
                    .into()
            )
        );
        to
    };
    let mut c = RespReader::connect(addr);
    // A transaction, one command at a time: held until the key, whose MOVED is followed.
    let to = move_slot("{t1}a");
    assert_eq!(c.call(&["MULTI"]), simple("OK"));
    assert_eq!(c.call(&["PING"]), simple("QUEUED"));
    assert_eq!(c.call(&["SET", "{t1}a", "1"]), simple("QUEUED"));
    assert_eq!(c.call(&["INCR", "{t1}a"]), simple("QUEUED"));
    assert_eq!(
        c.call(&["EXEC"]),
        Frame::Array(vec![simple("PONG"), simple("OK"), Frame::Integer(2)])
    );
    assert_eq!(to.cmd(&["GET", "{t1}a"]), bulk("2"));
    // The same, pipelined in one write.
    let to = move_slot("{t2}b");
    c.send(
        &[
            encode(&["MULTI"]),
            encode(&["SET", "{t2}b", "x"]),
            encode(&["EXEC"]),
        ]
        .concat(),
    );
    assert_eq!(c.read(), simple("OK"));
    assert_eq!(c.read(), simple("QUEUED"));
    assert_eq!(c.read(), Frame::Array(vec![simple("OK")]));
    assert_eq!(to.cmd(&["GET", "{t2}b"]), bulk("x"));
    // WATCH first.
    let to = move_slot("{t3}w");
    assert_eq!(c.call(&["WATCH", "{t3}w"]), simple("OK"));
    assert_eq!(c.call(&["MULTI"]), simple("OK"));
    assert_eq!(c.call(&["SET", "{t3}w", "y"]), simple("QUEUED"));
    assert_eq!(c.call(&["EXEC"]), Frame::Array(vec![simple("OK")]));
    assert_eq!(to.cmd(&["GET", "{t3}w"]), bulk("y"));
    // A blocking pop waits on the slot's new owner.
    let to = move_slot("{t4}q");
    let mut waiter = RespReader::connect(addr);
    waiter.send(&encode(&["BLPOP", "{t4}q", "10"]));
    wait_until(Duration::from_secs(5), || {
        info_field(to, "blocked_clients") == 1
    });
    assert_eq!(c.call(&["RPUSH", "{t4}q", "v"]), Frame::Integer(1));
    assert_eq!(waiter.read(), Frame::Array(vec![bulk("{t4}q"), bulk("v")]));
    proxy.shutdown();
}

#[test]
fn a_subscriber_that_unsubscribes_or_resets_is_an_ordinary_client_again() {
    // The proxy authenticates upstream: a RESET that reached Redis would log the
    // connection out.
    let server = RedisServer::start_with(&["--requirepass", "upstream-pw"]);
    let dir = redis_intercept_e2e::tempfile_dir();
    let file = dir.path().join("pw");
    std::fs::write(&file, "upstream-pw\n").unwrap();
    let proxy = redis_intercept_e2e::start_proxy_full(
        server.addr,
        "[admin]\nlisten = \"127.0.0.1:0\"\n",
        &format!("password_file = {:?}", file.display().to_string()),
        "",
    );
    let addr = proxy.addr("svc").unwrap();
    let subscribed = || gauge(&proxy, "redis_intercept_clients_subscribed{");
    let mut c = RespReader::connect(addr);
    assert_eq!(c.call(&["SET", "k", "v"]), simple("OK"));
    assert_eq!(
        c.call(&["SUBSCRIBE", "news"]),
        push3("subscribe", "news", 1)
    );
    assert_eq!(subscribed(), 1.0);
    // Subscribed mode allows what Redis allows; the rest gets Redis's refusal, from the
    // proxy (AUTH and SELECT never reach Redis).
    for (cmd, name) in [
        (vec!["GET", "k"], "get"),
        (vec!["AUTH", "x"], "auth"),
        (vec!["SELECT", "1"], "select"),
    ] {
        let reply = c.call(&cmd);
        assert!(
            is_error(
                &reply,
                &format!("Can't execute '{name}': only (P|S)SUBSCRIBE")
            ),
            "{reply:?}"
        );
    }
    assert_eq!(
        c.call(&["PING", "x"]),
        Frame::Array(vec![bulk("pong"), bulk("x")])
    );
    // The gauge follows the confirmations' counts: a client with nothing left stops counting
    // at once, without sending another command.
    assert_eq!(c.call(&["PSUBSCRIBE", "n*"]), push3("psubscribe", "n*", 2));
    assert_eq!(
        c.call(&["UNSUBSCRIBE", "news"]),
        push3("unsubscribe", "news", 1)
    );
    assert_eq!(subscribed(), 1.0);
    assert_eq!(c.call(&["PUNSUBSCRIBE"]), push3("punsubscribe", "n*", 0));
    assert_eq!(subscribed(), 0.0);
    assert_eq!(
        c.call(&["SUBSCRIBE", "news"]),
        push3("subscribe", "news", 1)
    );
    assert_eq!(subscribed(), 1.0);
    // Unsubscribing from everything ends subscribed mode; commands pipelined behind it are
    // served by the proxy as any client's: DEBUG SLEEP is the proxy's refusal, which Redis
    // would have answered.
    c.send(
        &[
            encode(&["UNSUBSCRIBE"]),
            encode(&["GET", "k"]),
            encode(&["DEBUG", "SLEEP", "0"]),
        ]
        .concat(),
    );
    assert_eq!(c.read(), push3("unsubscribe", "news", 0));
    assert_eq!(c.read(), bulk("v"));
    let refused = c.read();
    assert!(
        is_error(&refused, "not supported by redis-intercept"),
        "{refused:?}"
    );
    assert_eq!(subscribed(), 0.0);
    // RESET in subscribed mode is answered by the proxy and closes the node connection;
    // the client goes on, still authenticated upstream.
    c.call(&["SUBSCRIBE", "sport"]);
    assert_eq!(c.call(&["RESET"]), simple("RESET"));
    assert_eq!(c.call(&["GET", "k"]), bulk("v"));
    let mut direct = RespReader::connect(server.addr);
    assert_eq!(direct.call(&["AUTH", "upstream-pw"]), simple("OK"));
    wait_until(Duration::from_secs(5), || {
        direct.call(&["PUBSUB", "NUMSUB", "sport"])
            == Frame::Array(vec![bulk("sport"), Frame::Integer(0)])
    });
    // RESET and SELECT never reached Redis.
    let stats = match direct.call(&["INFO", "commandstats"]) {
        Frame::Bulk(b) => String::from_utf8_lossy(&b).into_owned(),
        other => panic!("{other:?}"),
    };
    assert!(!stats.contains("cmdstat_reset"), "{stats}");
    assert!(!stats.contains("cmdstat_select"), "{stats}");
    // QUIT in subscribed mode: +OK and the connection closes.
    c.call(&["PSUBSCRIBE", "x*"]);
    assert_eq!(c.call(&["QUIT"]), simple("OK"));
    let mut rest = Vec::new();
    let mut raw = std::net::TcpStream::connect(addr).unwrap();
    raw.write_all(b"SUBSCRIBE q\r\nQUIT\r\n").unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    raw.read_to_end(&mut rest).unwrap();
    assert!(
        rest.ends_with(b"+OK\r\n"),
        "{}",
        String::from_utf8_lossy(&rest)
    );
    assert_eq!(subscribed(), 0.0);
    proxy.shutdown();
}

#[test]
fn a_subscribe_that_cannot_reach_redis_gets_an_error_and_the_client_goes_on() {
    let mut server = RedisServer::start();
    let proxy = start_proxy(server.addr, "");
    let addr = proxy.addr("svc").unwrap();
    server.kill();
    let mut c = RespReader::connect(addr);
    let reply = c.call(&["SUBSCRIBE", "news"]);
    assert!(is_error(&reply, "unavailable"), "{reply:?}");
    // Not subscribed: the proxy answers as for any client.
    assert_eq!(c.call(&["PING"]), simple("PONG"));
    proxy.shutdown();
}

#[test]
fn a_subscriber_whose_node_stops_answering_gets_an_error_within_op_timeout() {
    let server = RedisServer::start();
    let proxy = start_proxy(server.addr, "op_timeout = \"300ms\"");
    let addr = proxy.addr("svc").unwrap();
    let mut sub = RespReader::connect(addr);
    sub.call(&["SUBSCRIBE", "news"]);
    // The node stops serving commands (the proxy's check included) for 3 s.
    assert_eq!(
        server.cmd(&["CLIENT", "PAUSE", "3000", "ALL"]),
        simple("OK")
    );
    let started = Instant::now();
    let reply = sub.call(&["GET", "k"]);
    assert!(is_error(&reply, "timed out"), "{reply:?}");
    assert!(started.elapsed() < Duration::from_secs(2));
    // The connection closes: its state on the node is unknown.
    let mut rest = Vec::new();
    sub.stream.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
    proxy.shutdown();
}

#[test]
fn cluster_pubsub_and_sharded_pubsub_reach_subscribers() {
    let (_cluster, proxy, map) = cluster_and_proxy("");
    let addr = proxy.addr("svc").unwrap();
    let mut publisher = RespReader::connect(addr);
    let mut sub = RespReader::connect(addr);
    assert_eq!(
        sub.call(&["SUBSCRIBE", "everywhere"]),
        Frame::Array(vec![
            bulk("subscribe"),
            bulk("everywhere"),
            Frame::Integer(1)
        ])
    );
    // Cluster pub/sub reaches a subscriber whatever node either side is on.
    publisher.call(&["PUBLISH", "everywhere", "m1"]);
    assert_eq!(
        sub.read(),
        Frame::Array(vec![bulk("message"), bulk("everywhere"), bulk("m1")])
    );
    // Sharded channels live on their slot's master; channels on every master work.
    for ch in ["a", "b", "c", "d", "e", "f"] {
        let mut ssub = RespReader::connect(addr);
        assert_eq!(ssub.call(&["SSUBSCRIBE", ch]), push3("ssubscribe", ch, 1));
        assert_eq!(publisher.call(&["SPUBLISH", ch, "s"]), Frame::Integer(1));
        assert_eq!(
            ssub.read(),
            Frame::Array(vec![bulk("smessage"), bulk(ch), bulk("s")])
        );
    }
    // One client's shard channels may span masters, as on one Redis: the proxy subscribes
    // on each channel's master and counts them together.
    let owners: std::collections::HashSet<&str> = ["a", "b", "c", "d", "e", "f"]
        .iter()
        .map(|ch| map.master(Slot::for_key(ch.as_bytes())).unwrap())
        .collect();
    assert_eq!(owners.len(), 3, "channels a..f cover every master");
    let mut ssub = RespReader::connect(addr);
    for (i, ch) in ["a", "b", "c", "d", "e", "f"].iter().enumerate() {
        assert_eq!(
            ssub.call(&["SSUBSCRIBE", ch]),
            push3("ssubscribe", ch, i as i64 + 1)
        );
    }
    // Several channels in one command, split by slot and master.
    ssub.send(&encode(&["SSUBSCRIBE", "g", "h", "i"]));
    let mut seen = Vec::new();
    for count in 7..=9 {
        let Frame::Array(reply) = ssub.read() else {
            panic!("not a confirmation");
        };
        assert_eq!(reply[0], bulk("ssubscribe"));
        assert_eq!(reply[2], Frame::Integer(count));
        seen.push(reply[1].clone());
    }
    seen.sort_by_key(|f| format!("{f:?}"));
    assert_eq!(seen, vec![bulk("g"), bulk("h"), bulk("i")]);
    for ch in ["a", "b", "c", "d", "e", "f", "g", "h", "i"] {
        assert_eq!(publisher.call(&["SPUBLISH", ch, "m"]), Frame::Integer(1));
        assert_eq!(
            ssub.read(),
            Frame::Array(vec![bulk("smessage"), bulk(ch), bulk("m")])
        );
    }
    // Unsubscribing from all of them counts down to 0 across the masters; then the client is
    // an ordinary one (its GET goes to the key's master).
    ssub.send(&encode(&["SUNSUBSCRIBE"]));
    for count in (0..=8).rev() {
        let Frame::Array(reply) = ssub.read() else {
            panic!("not a confirmation");
        };
        assert_eq!(reply[0], bulk("sunsubscribe"));
        assert_eq!(reply[2], Frame::Integer(count));
    }
    assert_eq!(publisher.call(&["SET", "after", "1"]), simple("OK"));
    assert_eq!(ssub.call(&["GET", "after"]), bulk("1"));
    // Pipelined: a GET right behind the SUNSUBSCRIBE waits until every master has confirmed.
    for ch in ["a", "b", "c", "d", "e", "f"] {
        ssub.call(&["SSUBSCRIBE", ch]);
    }
    ssub.send(&[encode(&["SUNSUBSCRIBE"]), encode(&["GET", "after"])].concat());
    for count in (0..=5).rev() {
        let Frame::Array(reply) = ssub.read() else {
            panic!("not a confirmation");
        };
        assert_eq!(reply[2], Frame::Integer(count));
    }
    assert_eq!(ssub.read(), bulk("1"));
    proxy.shutdown();
}

#[test]
fn shutdown_does_not_wait_for_a_blocked_client() {
    let server = RedisServer::start();
    let proxy = redis_intercept_e2e::start_proxy_config(&format!(
        "[proxy]\nworkers = 1\ndrain_timeout = \"30s\"\n\n\
         [[upstream]]\nname = \"main\"\nmode = \"standalone\"\nnodes = [\"{}\"]\n\n\
         [[service]]\nname = \"svc\"\nlisten = \"127.0.0.1:0\"\nupstream = \"main\"\n",
        server.addr
    ));
    let mut waiter = RespReader::connect(proxy.addr("svc").unwrap());
    waiter.send(&encode(&["BLPOP", "forever", "0"]));
    wait_until(Duration::from_secs(5), || {
        info_field(&server, "blocked_clients") == 1
    });
    let started = Instant::now();
    proxy.shutdown();
    // Well inside the 30 s drain: the blocked client is closed, not waited for.
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    wait_until(Duration::from_secs(5), || {
        info_field(&server, "blocked_clients") == 0
    });
}
