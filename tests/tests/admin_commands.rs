//! End-to-end: the server's logs, memory report and persistence through the proxy:
//! `SLOWLOG`, `LATENCY`, `MEMORY`, `LASTSAVE`, `BGSAVE` and `DEBUG OBJECT`, forwarded to a
//! standalone server (replies equal to Redis's where they don't name times or addresses),
//! and given their cluster-wide meaning with a cluster behind (sums, every master, the
//! oldest save; `DEBUG OBJECT`'s routing to the key's master is unit-tested in `route.rs`,
//! since a cluster node refuses DEBUG unless started with `enable-debug-command`).

use std::time::Duration;

use redis_intercept::resp::Frame;
use redis_intercept_e2e::{
    RedisCluster, RedisServer, RespReader, is_err, start_cluster_proxy, start_proxy, wait_until,
};

fn int(f: &Frame) -> i64 {
    match f {
        Frame::Integer(n) => *n,
        other => panic!("not an integer: {other:?}"),
    }
}

fn text(f: &Frame) -> String {
    match f {
        Frame::Bulk(b) | Frame::Simple(b) | Frame::Error(b) | Frame::Verbatim(b) => {
            String::from_utf8_lossy(b).into_owned()
        }
        other => format!("{other:?}"),
    }
}

#[test]
fn admin_commands_reach_a_standalone_server() {
    let direct = RedisServer::start_with(&["--enable-debug-command", "yes"]);
    let server = RedisServer::start_with(&["--enable-debug-command", "yes"]);
    let proxy = start_proxy(server.addr, "");
    let mut p = RespReader::connect(proxy.addr("svc").unwrap());
    let mut d = RespReader::connect(direct.addr);
    // Replies that don't depend on time, addresses or allocator state: byte for byte.
    for c in [&mut p, &mut d] {
        c.call(&["SET", "a", "1"]);
    }
    for cmd in [
        &["SLOWLOG", "RESET"][..],
        &["SLOWLOG", "LEN"],
        &["LATENCY", "RESET"],
        &["LATENCY", "LATEST"],
        &["MEMORY", "USAGE", "a"],
        &["MEMORY", "PURGE"],
        &["SLOWLOG", "HELP"],
        &["DEBUG", "OBJECT", "missing"],
        &["SLOWLOG"],
    ] {
        assert_eq!(p.call_raw(cmd), d.call_raw(cmd), "{cmd:?}");
    }
    p.call(&["CONFIG", "SET", "slowlog-log-slower-than", "0"]);
    p.call(&["GET", "a"]);
    assert!(int(&p.call(&["SLOWLOG", "LEN"])) >= 1);
    let Frame::Array(entries) = p.call(&["SLOWLOG", "GET", "5"]) else {
        panic!("SLOWLOG GET")
    };
    assert!(format!("{entries:?}").contains("\"a\""), "{entries:?}");
    let stats = format!("{:?}", p.call(&["MEMORY", "STATS"]));
    assert!(stats.contains("peak.allocated"), "{stats}");
    assert!(!text(&p.call(&["MEMORY", "DOCTOR"])).is_empty());
    let before = int(&p.call(&["LASTSAVE"]));
    // LASTSAVE counts seconds.
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(text(&p.call(&["BGSAVE"])), "Background saving started");
    wait_until(Duration::from_secs(10), || {
        int(&p.call(&["LASTSAVE"])) > before
    });
    assert!(text(&p.call(&["DEBUG", "OBJECT", "a"])).starts_with("Value at:"));
    let refused = p.call(&["DEBUG", "SLEEP", "0"]);
    assert!(
        is_err(
            &refused,
            "'DEBUG SLEEP' is not supported by redis-intercept"
        ),
        "{refused:?}"
    );
    proxy.shutdown();
}

#[test]
fn admin_commands_have_their_cluster_wide_meaning() {
    let cluster = RedisCluster::start(3, 0);
    let seeds: Vec<String> = cluster.addrs().iter().map(ToString::to_string).collect();
    let proxy = start_cluster_proxy(&seeds, "", "");
    let mut p = RespReader::connect(proxy.addr("svc").unwrap());
    let masters: Vec<&RedisServer> = cluster.nodes.iter().collect();
    // Entries on every master, then one RESET clears them all.
    p.call(&["CONFIG", "SET", "slowlog-log-slower-than", "0"]);
    for k in ["{a}", "{b}", "{c}", "{d}", "{e}", "{f}"] {
        p.call(&["SET", k, "v"]);
    }
    let total = int(&p.call(&["SLOWLOG", "LEN"]));
    assert!(total >= 6, "SLOWLOG LEN is the masters' sum: {total}");
    let Frame::Array(all) = p.call(&["SLOWLOG", "GET", "100"]) else {
        panic!("SLOWLOG GET")
    };
    assert!(all.len() >= 6, "every master's entries: {}", all.len());
    assert_eq!(p.call(&["SLOWLOG", "RESET"]), Frame::Simple("OK".into()));
    for m in &masters {
        // Only the LEN itself can be logged since.
        assert!(
            int(&m.cmd(&["SLOWLOG", "LEN"])) <= 1,
            "{} was reset",
            m.addr
        );
    }
    // LASTSAVE: the oldest save of the masters; BGSAVE: every master saves.
    let oldest = masters
        .iter()
        .map(|m| int(&m.cmd(&["LASTSAVE"])))
        .min()
        .unwrap();
    assert_eq!(int(&p.call(&["LASTSAVE"])), oldest);
    let before: Vec<i64> = masters.iter().map(|m| int(&m.cmd(&["LASTSAVE"]))).collect();
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(text(&p.call(&["BGSAVE"])), "Background saving started");
    wait_until(Duration::from_secs(10), || {
        masters
            .iter()
            .zip(&before)
            .all(|(m, b)| int(&m.cmd(&["LASTSAVE"])) > *b)
    });
    assert!(int(&p.call(&["LATENCY", "RESET"])) >= 0);
    proxy.shutdown();
}

/// WAIT counts the replicas that have the client's writes, on a connection of the client's
/// own: a WAIT that can't be satisfied blocks only its client.
#[test]
fn wait_counts_the_replicas_of_the_clients_writes_and_blocks_nobody_else() {
    let master = RedisServer::start();
    let replica =
        RedisServer::start_with(&["--replicaof", "127.0.0.1", &master.addr.port().to_string()]);
    wait_until(Duration::from_secs(10), || {
        text(&replica.cmd(&["INFO", "replication"])).contains("master_link_status:up")
    });
    let proxy = start_proxy(master.addr, "");
    let addr = proxy.addr("svc").unwrap();
    let mut c = RespReader::connect(addr);
    for i in 0..50 {
        c.call(&["SET", &format!("w{i}"), "v"]);
    }
    assert_eq!(c.call(&["WAIT", "1", "2000"]), Frame::Integer(1));
    // The replica has every write once WAIT says so.
    assert_eq!(replica.cmd(&["GET", "w49"]), Frame::Bulk("v".into()));
    // Two replicas never come: WAIT times out after 600 ms with 1, and meanwhile another
    // client's commands go on at once.
    let waiter = std::thread::spawn(move || {
        let at = std::time::Instant::now();
        let r = c.call(&["WAIT", "2", "600"]);
        (r, at.elapsed())
    });
    std::thread::sleep(Duration::from_millis(100));
    let mut other = RespReader::connect(addr);
    let at = std::time::Instant::now();
    assert_eq!(other.call(&["SET", "o", "1"]), Frame::Simple("OK".into()));
    assert!(
        at.elapsed() < Duration::from_millis(200),
        "{:?}",
        at.elapsed()
    );
    let (r, took) = waiter.join().unwrap();
    assert_eq!(r, Frame::Integer(1));
    assert!(took >= Duration::from_millis(550), "{took:?}");
    proxy.shutdown();
    // A cluster's keys are on several masters: WAIT is refused, saying why.
    let cluster = RedisCluster::start(3, 0);
    let seeds: Vec<String> = cluster.addrs().iter().map(ToString::to_string).collect();
    let proxy = start_cluster_proxy(&seeds, "", "");
    let mut c = RespReader::connect(proxy.addr("svc").unwrap());
    let refused = c.call(&["WAIT", "0", "0"]);
    assert!(
        is_err(&refused, "counts one server's replicas"),
        "{refused:?}"
    );
    let refused = c.call(&["WAITAOF", "0", "0", "0"]);
    assert!(
        is_err(&refused, "'WAITAOF' is not supported"),
        "{refused:?}"
    );
    proxy.shutdown();
}
