//! End-to-end: CONFIG through the proxy. On a standalone server it is forwarded (replies
//! byte for byte as Redis's); on a cluster, SET, RESETSTAT and REWRITE reach every node,
//! masters and replicas, GET reads one master, and a SET some nodes refuse names them.
//! Keyspace notifications turned on this way reach a subscriber of the proxy.

#![expect(clippy::unwrap_used, reason = "tests panic on failure")]

use std::time::Duration;

use redis_intercept::resp::Frame;
use redis_intercept_e2e::{
    RedisCluster, RedisServer, RespReader, bulk, is_err, ok, start_cluster_proxy, start_proxy,
};

#[test]
fn config_is_forwarded_to_a_standalone_server() {
    let behind = RedisServer::start();
    let direct = RedisServer::start();
    let proxy = start_proxy(behind.addr, "");
    let mut p = RespReader::connect(proxy.addr("svc").unwrap());
    let mut d = RespReader::connect(direct.addr);
    for cmd in [
        &["CONFIG", "SET", "maxmemory-policy", "allkeys-lru"][..],
        &["CONFIG", "GET", "maxmemory-policy"],
        &["CONFIG", "GET", "maxmemory-p*"],
        &["CONFIG", "SET", "maxmemory-policy", "bogus"],
        &["CONFIG", "RESETSTAT"],
        &["CONFIG", "NOSUCH"],
        &["CONFIG"],
    ] {
        assert_eq!(
            String::from_utf8_lossy(&p.call_raw(cmd)),
            String::from_utf8_lossy(&d.call_raw(cmd)),
            "{cmd:?}"
        );
    }
    proxy.shutdown();
}

#[test]
fn config_set_reaches_every_node_of_a_cluster_and_notifications_work() {
    let cluster = RedisCluster::start(3, 1);
    let seeds: Vec<String> = cluster.addrs().iter().map(ToString::to_string).collect();
    let proxy = start_cluster_proxy(&seeds, "", "");
    let addr = proxy.addr("svc").unwrap();
    let mut c = RespReader::connect(addr);
    assert_eq!(
        c.call(&["CONFIG", "SET", "notify-keyspace-events", "KEA"]),
        ok()
    );
    for node in &cluster.nodes {
        assert_eq!(
            node.cmd(&["CONFIG", "GET", "notify-keyspace-events"]),
            Frame::Array(vec![bulk("notify-keyspace-events"), bulk("AKE")]),
            "{}",
            node.addr
        );
    }
    assert_eq!(
        c.call(&["CONFIG", "GET", "notify-keyspace-events"]),
        Frame::Array(vec![bulk("notify-keyspace-events"), bulk("AKE")])
    );
    // A value every node refuses: one error naming each.
    let err = c.call(&["CONFIG", "SET", "maxmemory-policy", "bogus"]);
    assert!(is_err(&err, "failed on 6 of 6 nodes"), "{err:?}");
    for node in &cluster.nodes {
        assert!(is_err(&err, &node.addr.to_string()), "{err:?}");
    }
    assert_eq!(c.call(&["CONFIG", "RESETSTAT"]), ok());

    // A keyspace notification, on the node that holds the key, reaches a subscriber of the
    // proxy, whichever master that is.
    for key in ["user:1", "user:2", "other"] {
        let mut sub = RespReader::connect(addr);
        let channel = format!("__keyspace@0__:{key}");
        sub.call(&["SUBSCRIBE", &channel]);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(c.call(&["SET", key, "v"]), ok());
        assert_eq!(
            sub.read(),
            Frame::Array(vec![bulk("message"), bulk(&channel), bulk("set")]),
            "{key}"
        );
    }
    proxy.shutdown();
}

/// INFO of every section through a cluster proxy: the masters' sections combined, the
/// proxy's own server identity, cluster view and client count.
#[test]
fn info_on_a_cluster_has_every_section_combined() {
    let cluster = RedisCluster::start(3, 0);
    let seeds: Vec<String> = cluster.addrs().iter().map(ToString::to_string).collect();
    let proxy = start_cluster_proxy(&seeds, "", "");
    let mut c = RespReader::connect(proxy.addr("svc").unwrap());
    for i in 0..30 {
        assert_eq!(c.call(&["SET", &format!("k{i}"), "v"]), ok());
    }
    let text = match c.call(&["INFO", "everything"]) {
        Frame::Bulk(b) => String::from_utf8_lossy(&b).into_owned(),
        other => panic!("{other:?}"),
    };
    for section in [
        "# Server",
        "# Clients",
        "# Memory",
        "# Persistence",
        "# Stats",
        "# Replication",
        "# CPU",
        "# Commandstats",
        "# Cluster",
        "# Keyspace",
    ] {
        assert!(text.contains(section), "{section} in {text}");
    }
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:")))
            .unwrap_or_else(|| panic!("no {name} in {text}"))
            .to_owned()
    };
    let version = match cluster.nodes[0].cmd(&["INFO", "server"]) {
        Frame::Bulk(b) => String::from_utf8_lossy(&b)
            .lines()
            .find_map(|l| l.strip_prefix("redis_version:").map(str::to_owned))
            .unwrap(),
        other => panic!("{other:?}"),
    };
    assert_eq!(field("redis_version"), version);
    // Valkey calls it server_mode.
    let mode = text.lines().find_map(|l| {
        l.strip_prefix("redis_mode:")
            .or_else(|| l.strip_prefix("server_mode:"))
    });
    assert_eq!(mode, Some("standalone"));
    assert_eq!(field("cluster_enabled"), "0");
    assert_eq!(field("maxclients"), "10000");
    assert_eq!(field("db0"), "keys=30,expires=0,avg_ttl=0");
    // The proxy's clients (this one, perhaps the start-up probe), not its connections to
    // the masters.
    let clients: usize = field("connected_clients").parse().unwrap();
    assert!((1..=2).contains(&clients), "connected_clients:{clients}");
    // Counters add up: every master ran some of the 30 SETs.
    let sets = field("cmdstat_set");
    assert!(sets.starts_with("calls=30,"), "cmdstat_set:{sets}");
    let used: u64 = field("used_memory").parse().unwrap();
    let each: u64 = match cluster.nodes[0].cmd(&["INFO", "memory"]) {
        Frame::Bulk(b) => String::from_utf8_lossy(&b)
            .lines()
            .find_map(|l| l.strip_prefix("used_memory:").and_then(|v| v.parse().ok()))
            .unwrap(),
        other => panic!("{other:?}"),
    };
    assert!(
        used > each * 2,
        "used_memory {used} is about three masters' ({each} each)"
    );
    proxy.shutdown();
}

/// A script that loops until killed, on `addr` (through the proxy), and SCRIPT KILL from
/// another client: the kill reaches the server that runs it, though the script holds the
/// shared connection it came on.
fn kill_a_running_script(addr: std::net::SocketAddr, busy_check: bool) {
    let mut setup = RespReader::connect(addr);
    assert_eq!(
        setup.call(&["CONFIG", "SET", "busy-reply-threshold", "100"]),
        ok()
    );
    let looping = std::thread::spawn(move || {
        let mut a = RespReader::connect(addr);
        a.call(&["EVAL", "local i = 0 while true do i = i + 1 end", "0"])
    });
    std::thread::sleep(Duration::from_millis(400));
    // A RESP3 client's requests go over another shared connection: while the script runs,
    // the server answers them -BUSY, and that reply reaches that request only.
    let mut other = RespReader::connect(addr);
    other.call(&["HELLO", "3"]);
    if busy_check {
        let busy = other.call(&["GET", "k"]);
        assert!(is_err(&busy, "BUSY"), "{busy:?}");
    }
    let mut b = RespReader::connect(addr);
    assert_eq!(b.call(&["SCRIPT", "KILL"]), ok());
    let killed = looping.join().unwrap();
    assert!(is_err(&killed, "killed"), "{killed:?}");
    let none = b.call(&["SCRIPT", "KILL"]);
    assert!(is_err(&none, "NOTBUSY"), "{none:?}");
    assert_eq!(other.call(&["SET", "k", "v"]), ok());
    assert_eq!(other.call(&["GET", "k"]), Frame::Bulk("v".into()));
}

#[test]
fn script_kill_reaches_a_busy_standalone_server() {
    let server = RedisServer::start();
    let proxy = start_proxy(server.addr, "");
    kill_a_running_script(proxy.addr("svc").unwrap(), true);
    proxy.shutdown();
}

#[test]
fn scripts_on_a_cluster_exist_everywhere_and_are_killed_where_they_run() {
    let cluster = RedisCluster::start(3, 0);
    let seeds: Vec<String> = cluster.addrs().iter().map(ToString::to_string).collect();
    let proxy = start_cluster_proxy(&seeds, "", "");
    let addr = proxy.addr("svc").unwrap();
    let mut c = RespReader::connect(addr);
    let Frame::Bulk(sha) = c.call(&["SCRIPT", "LOAD", "return 1"]) else {
        panic!("SCRIPT LOAD");
    };
    let sha = String::from_utf8_lossy(&sha).into_owned();
    let exists = |c: &mut RespReader| c.call(&["SCRIPT", "EXISTS", &sha, "0000"]);
    assert_eq!(
        exists(&mut c),
        Frame::Array(vec![Frame::Integer(1), Frame::Integer(0)])
    );
    // One master loses it: EVALSHA could land there, so it doesn't exist for the client.
    assert_eq!(cluster.nodes[1].cmd(&["SCRIPT", "FLUSH"]), ok());
    assert_eq!(
        exists(&mut c),
        Frame::Array(vec![Frame::Integer(0), Frame::Integer(0)])
    );
    // (On a cluster the script runs on a master the GET's key may not be on.)
    kill_a_running_script(addr, false);
    proxy.shutdown();
}

/// INFO of a standalone server through the proxy: the server's own sections, with the
/// proxy's identity in `Server` and its own client count in `Clients`.
#[test]
fn info_of_a_standalone_server_counts_the_proxys_clients() {
    let server = RedisServer::start();
    let proxy = start_proxy(server.addr, "");
    let addr = proxy.addr("svc").unwrap();
    // Each served once, so the proxy has surely accepted it.
    let clients: Vec<RespReader> = (0..5)
        .map(|_| {
            let mut c = RespReader::connect(addr);
            c.call(&["PING"]);
            c
        })
        .collect();
    let mut c = RespReader::connect(addr);
    let text = match c.call(&["INFO"]) {
        Frame::Bulk(b) => String::from_utf8_lossy(&b).into_owned(),
        other => panic!("{other:?}"),
    };
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:")))
            .unwrap_or_else(|| panic!("no {name} in {text}"))
            .to_owned()
    };
    let connected: usize = field("connected_clients").parse().unwrap();
    assert!(
        (6..=7).contains(&connected),
        "connected_clients:{connected}"
    );
    assert!(field("proxy").starts_with("redis-intercept "));
    assert_eq!(field("process_id"), proxy_pid().to_string());
    assert!(
        text.contains("# Memory\r\n") && text.contains("# Stats\r\n"),
        "{text}"
    );
    drop(clients);
    proxy.shutdown();
}

/// The proxy runs in this test process.
fn proxy_pid() -> u32 {
    std::process::id()
}
