//! End-to-end: key-prefix routes (the seed's `cluster` prefix to a cluster, everything else
//! to a single server), prefix removal, multi-key commands across routes, per-route read
//! policy and mirrors, and mirroring to a cluster.

use std::time::Duration;

use redis_intercept::resp::Frame;
use redis_intercept_e2e::{RedisCluster, RedisServer, RespReader, start_proxy_config, wait_until};

fn ok() -> Frame {
    Frame::Simple("OK".into())
}

fn bulk(s: &str) -> Frame {
    Frame::Bulk(s.as_bytes().to_vec().into())
}

fn config(single: &RedisServer, cluster: &RedisCluster, service_extra: &str) -> String {
    let seeds: Vec<String> = cluster.addrs().iter().map(|a| format!("\"{a}\"")).collect();
    format!(
        "[proxy]\nworkers = 2\n\n\
         [[upstream]]\nname = \"single\"\nmode = \"standalone\"\nnodes = [\"{}\"]\n\n\
         [[upstream]]\nname = \"cluster\"\nmode = \"cluster\"\nnodes = [{}]\n\n\
         [[service]]\nname = \"svc\"\nlisten = \"127.0.0.1:0\"\nupstream = \"single\"\n{service_extra}\n",
        single.addr,
        seeds.join(", ")
    )
}

#[test]
fn prefixes_pick_the_upstream_and_multi_key_commands_span_routes() {
    let single = RedisServer::start();
    let cluster = RedisCluster::start(3, 0);
    let proxy = start_proxy_config(&config(
        &single,
        &cluster,
        "[[service.route]]\nprefix = \"cluster\"\nupstream = \"cluster\"\n\n\
         [[service.route]]\nprefix = \"cluster:raw:\"\nupstream = \"single\"\n\n\
         [[service.route]]\nprefix = \"Strip:\"\nupstream = \"cluster\"\nremove_prefix = true\ncase_insensitive = true\n",
    ));
    let mut c = RespReader::connect(proxy.addr("svc").unwrap());
    // The seed: "cluster…" keys go to the cluster, anything else to the single server.
    assert_eq!(c.call(&["SET", "cluster:a", "1"]), ok());
    assert_eq!(c.call(&["SET", "plain", "2"]), ok());
    assert_eq!(cluster.get_from_owner("cluster:a"), bulk("1"));
    assert_eq!(single.cmd(&["GET", "cluster:a"]), Frame::NullBulk);
    assert_eq!(single.cmd(&["GET", "plain"]), bulk("2"));
    // The longest prefix wins.
    assert_eq!(c.call(&["SET", "cluster:raw:x", "3"]), ok());
    assert_eq!(single.cmd(&["GET", "cluster:raw:x"]), bulk("3"));
    // remove_prefix and case_insensitive: STRIP:k is stored as k on the cluster.
    assert_eq!(c.call(&["SET", "STRIP:k", "4"]), ok());
    assert_eq!(cluster.get_from_owner("k"), bulk("4"));
    assert_eq!(c.call(&["GET", "strip:k"]), bulk("4"));
    // Multi-key commands split by route (then by slot on the cluster) and merge in order.
    assert_eq!(
        c.call(&[
            "MSET",
            "cluster:m1",
            "a",
            "m2",
            "b",
            "cluster:m3",
            "c",
            "strip:m4",
            "d"
        ]),
        ok()
    );
    assert_eq!(single.cmd(&["GET", "m2"]), bulk("b"));
    assert_eq!(cluster.get_from_owner("m4"), bulk("d"));
    assert_eq!(
        c.call(&["MGET", "m2", "cluster:m3", "nope", "strip:m4", "cluster:m1"]),
        Frame::Array(vec![
            bulk("b"),
            bulk("c"),
            Frame::NullBulk,
            bulk("d"),
            bulk("a")
        ])
    );
    assert_eq!(
        c.call(&["DEL", "cluster:m1", "m2", "strip:m4", "nope"]),
        Frame::Integer(3)
    );
    // Keys that must stay together but span routes get a clear error.
    let Frame::Error(e) = c.call(&["RENAME", "plain", "cluster:b"]) else {
        panic!("RENAME across routes must fail");
    };
    let e = String::from_utf8_lossy(&e).into_owned();
    assert!(
        e.contains("different routes") && e.contains("RENAME"),
        "{e}"
    );
    // Keyless commands go to the catch-all.
    assert_eq!(c.call(&["DBSIZE"]), single.cmd(&["DBSIZE"]));
    // SELECT moves the standalone route; a key routed to the cluster (database 0 only) is
    // refused meanwhile, in a transaction too, rather than landing in the wrong keyspace.
    assert_eq!(c.call(&["SELECT", "1"]), ok());
    assert_eq!(c.call(&["SET", "one", "1"]), ok());
    let mut direct = RespReader::connect(single.addr);
    assert_eq!(direct.call(&["SELECT", "1"]), ok());
    assert_eq!(direct.call(&["GET", "one"]), bulk("1"));
    for cmd in [&["GET", "cluster:a"][..], &["BLPOP", "cluster:q", "1"]] {
        let reply = c.call(cmd);
        assert!(
            matches!(&reply, Frame::Error(e) if String::from_utf8_lossy(e).contains("database 1 is selected")),
            "{cmd:?}: {reply:?}"
        );
    }
    assert_eq!(c.call(&["SELECT", "0"]), ok());
    assert_eq!(c.call(&["GET", "cluster:a"]), bulk("1"));
    proxy.shutdown();
}

#[test]
fn routes_have_their_own_read_policy_and_mirrors_and_mirrors_reach_clusters() {
    let single = RedisServer::start();
    let staging = RedisServer::start();
    let cluster = RedisCluster::start(3, 1);
    let staging_cfg = format!(
        "\n[[upstream]]\nname = \"staging\"\nmode = \"standalone\"\nnodes = [\"{}\"]\n",
        staging.addr
    );
    let mut text = config(
        &single,
        &cluster,
        "[[service.mirror]]\nupstream = \"cluster\"\n\n\
         [[service.route]]\nprefix = \"c:\"\nupstream = \"cluster\"\nread_policy = \"replica\"\n\
         [[service.route.mirror]]\nupstream = \"staging\"\nexclude_reads = true\n",
    );
    text.push_str(&staging_cfg);
    let proxy = start_proxy_config(&text);
    let mut c = RespReader::connect(proxy.addr("svc").unwrap());
    // The route's mirror gets the route's writes (not its reads), and nothing else.
    assert_eq!(c.call(&["SET", "c:1", "v"]), ok());
    assert_eq!(c.call(&["STRLEN", "c:1"]), Frame::Integer(1));
    assert_eq!(c.call(&["SET", "other", "w"]), ok());
    wait_until(Duration::from_secs(5), || {
        staging.cmd(&["GET", "c:1"]) == bulk("v")
    });
    assert_eq!(staging.cmd(&["GET", "other"]), Frame::NullBulk);
    let Frame::Bulk(stats) = staging.cmd(&["INFO", "commandstats"]) else {
        panic!("INFO");
    };
    assert!(
        !String::from_utf8_lossy(&stats).contains("cmdstat_strlen"),
        "reads are not mirrored"
    );
    // The catch-all's mirror is a cluster: a multi-key write is split by slot there.
    assert_eq!(
        c.call(&["MSET", "x1", "1", "x2", "2", "x3", "3", "x4", "4"]),
        ok()
    );
    for (k, v) in [("x1", "1"), ("x2", "2"), ("x3", "3"), ("x4", "4")] {
        assert_eq!(single.cmd(&["GET", k]), bulk(v));
        wait_until(Duration::from_secs(5), || {
            cluster.get_from_owner(k) == bulk(v)
        });
    }
    // The route reads from replicas.
    let replicas: Vec<&RedisServer> = cluster.nodes[3..].iter().collect();
    let gets = |n: &RedisServer| {
        let Frame::Bulk(b) = n.cmd(&["INFO", "commandstats"]) else {
            return 0;
        };
        String::from_utf8_lossy(&b)
            .lines()
            .find_map(|l| l.strip_prefix("cmdstat_get:calls="))
            .and_then(|r| r.split(',').next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    wait_until(Duration::from_secs(30), || {
        c.call(&["GET", "c:1"]) == bulk("v") && replicas.iter().map(|r| gets(r)).sum::<u64>() > 0
    });
    proxy.shutdown();
}

#[test]
fn transactions_and_blocking_pops_follow_the_route_of_their_keys() {
    let single = RedisServer::start();
    let cluster = RedisCluster::start(3, 0);
    let proxy = start_proxy_config(&config(
        &single,
        &cluster,
        "[[service.route]]\nprefix = \"c:\"\nupstream = \"cluster\"\nremove_prefix = true\n",
    ));
    let addr = proxy.addr("svc").unwrap();
    let mut c = RespReader::connect(addr);
    let queued = || Frame::Simple("QUEUED".into());
    // Under the cluster route, prefix cut: the transaction runs on the slot owner of the
    // keys as stored.
    assert_eq!(c.call(&["MULTI"]), ok());
    assert_eq!(c.call(&["SET", "c:{t}x", "1"]), queued());
    assert_eq!(c.call(&["INCR", "c:{t}x"]), queued());
    assert_eq!(
        c.call(&["EXEC"]),
        Frame::Array(vec![ok(), Frame::Integer(2)])
    );
    assert_eq!(cluster.get_from_owner("{t}x"), bulk("2"));
    assert_eq!(single.cmd(&["EXISTS", "c:{t}x"]), Frame::Integer(0));
    // The catch-all route: the single server.
    assert_eq!(c.call(&["MULTI"]), ok());
    assert_eq!(c.call(&["SET", "plain", "p"]), queued());
    assert_eq!(c.call(&["EXEC"]), Frame::Array(vec![ok()]));
    assert_eq!(single.cmd(&["GET", "plain"]), bulk("p"));
    // A transaction can't span routes: the command is refused and EXEC fails.
    assert_eq!(c.call(&["MULTI"]), ok());
    assert_eq!(c.call(&["SET", "plain", "q"]), queued());
    let refused = c.call(&["SET", "c:{t}x", "9"]);
    assert!(matches!(refused, Frame::Error(_)), "{refused:?}");
    let exec = c.call(&["EXEC"]);
    assert!(
        matches!(&exec, Frame::Error(e) if e.starts_with(b"EXECABORT")),
        "{exec:?}"
    );
    assert_eq!(single.cmd(&["GET", "plain"]), bulk("p"));
    // A blocking pop under the cluster route waits on the key's owner, prefix cut.
    let mut waiter = RespReader::connect(addr);
    waiter.send(&redis_intercept_e2e::encode(&["BLPOP", "c:jobs", "5"]));
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(c.call(&["RPUSH", "c:jobs", "j1"]), Frame::Integer(1));
    assert_eq!(waiter.read(), Frame::Array(vec![bulk("jobs"), bulk("j1")]));
    proxy.shutdown();
}
