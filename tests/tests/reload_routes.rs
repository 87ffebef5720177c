//! A reload that changes a service's upstream, routes or mirrors, or an upstream's settings,
//! builds new routes on every worker: connected clients move to them between commands
//! (transactions, WATCH and blocked commands finish where they began), and the connections
//! nobody uses any more are closed.

use std::time::Duration;

use redis_intercept::resp::Frame;
use redis_intercept_e2e::{
    RedisCluster, RedisServer, RespReader, bulk, http_get, ok, reload, send_backlog,
    start_proxy_config, wait_until,
};

/// Connections to `server` other than the one asking: the proxy's.
fn proxy_conns(server: &RedisServer) -> usize {
    match server.cmd(&["CLIENT", "LIST"]) {
        Frame::Bulk(text) => String::from_utf8_lossy(&text)
            .lines()
            .filter(|l| !l.contains("cmd=client"))
            .count(),
        other => panic!("{other:?}"),
    }
}

/// `key` in database `db` of `server`.
fn get_in(server: &RedisServer, db: &str, key: &str) -> Frame {
    let mut c = RespReader::connect(server.addr);
    assert_eq!(c.call(&["SELECT", db]), ok());
    c.call(&["GET", key])
}

/// Three standalone servers, for upstreams `a`, `b` and `c`.
fn servers() -> [RedisServer; 3] {
    [
        RedisServer::start(),
        RedisServer::start(),
        RedisServer::start(),
    ]
}

/// Two workers and an admin endpoint; upstreams `a`, `b` and `c` (standalone); the service
/// `svc` with `service` (its upstream and what follows) appended.
fn config([a, b, c]: &[RedisServer; 3], service: &str) -> String {
    format!(
        "[proxy]\nworkers = 2\ndrain_timeout = \"1s\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [[upstream]]\nname = \"a\"\nmode = \"standalone\"\nnodes = [\"{}\"]\n\n\
         [[upstream]]\nname = \"b\"\nmode = \"standalone\"\nnodes = [\"{}\"]\n\n\
         [[upstream]]\nname = \"c\"\nmode = \"standalone\"\nnodes = [\"{}\"]\n\n\
         [[service]]\nname = \"svc\"\nlisten = \"127.0.0.1:0\"\n{service}\n",
        a.addr, b.addr, c.addr
    )
}

#[test]
fn new_routes_reach_connected_clients_and_unused_connections_close() {
    let s = servers();
    let [a, b, c] = &s;
    let base = config(&s, "upstream = \"a\"\n");
    let proxy = start_proxy_config(&base);
    let addr = proxy.addr("svc").unwrap();
    // Enough clients that both workers hold some; the first one works in database 2.
    let mut clients: Vec<RespReader> = (0..10).map(|_| RespReader::connect(addr)).collect();
    assert_eq!(clients[0].call(&["SELECT", "2"]), ok());
    for (i, cl) in clients.iter_mut().enumerate() {
        assert_eq!(cl.call(&["SET", &format!("before{i}"), "v"]), ok());
    }
    assert_eq!(get_in(a, "2", "before0"), bulk("v"));
    assert_eq!(a.cmd(&["GET", "before1"]), bulk("v"));
    wait_until(Duration::from_secs(5), || proxy_conns(b) == 0);

    // Everything to b now, keys under "a:" to a without the prefix, and writes copied to c.
    let moved = config(
        &s,
        "upstream = \"b\"\n\n[[service.route]]\nprefix = \"a:\"\nupstream = \"a\"\nremove_prefix = true\n\n\
         [[service.mirror]]\nupstream = \"c\"\npercentage = 100.0\nexclude_reads = true\nbatch_delay = \"0s\"\n",
    );
    assert_eq!(reload(&proxy, &moved), Vec::<String>::new());
    for (i, cl) in clients.iter_mut().enumerate() {
        assert_eq!(cl.call(&["SET", &format!("after{i}"), "v"]), ok());
        assert_eq!(cl.call(&["SET", &format!("a:routed{i}"), "r"]), ok());
        // Reads of what it wrote before the reload go to a through the route.
        assert_eq!(cl.call(&["GET", &format!("a:before{i}")]), bulk("v"));
    }
    // The client in database 2 is still in database 2, on every upstream and the mirror.
    assert_eq!(get_in(b, "2", "after0"), bulk("v"));
    assert_eq!(get_in(a, "2", "routed0"), bulk("r"));
    wait_until(Duration::from_secs(5), || {
        get_in(c, "2", "after0") == bulk("v")
    });
    for i in 1..10 {
        assert_eq!(
            b.cmd(&["GET", &format!("after{i}")]),
            bulk("v"),
            "client {i}"
        );
        assert_eq!(
            a.cmd(&["GET", &format!("routed{i}")]),
            bulk("r"),
            "client {i}"
        );
        assert_eq!(a.cmd(&["GET", &format!("after{i}")]), Frame::NullBulk);
    }
    // (The route has no mirror of its own: its keys aren't copied.)
    wait_until(Duration::from_secs(5), || {
        c.cmd(&["GET", "after9"]) == bulk("v")
    });
    assert_eq!(c.cmd(&["GET", "routed9"]), Frame::NullBulk);
    // A new client starts on the new routes.
    let mut fresh = RespReader::connect(addr);
    assert_eq!(fresh.call(&["SET", "fresh", "1"]), ok());
    assert_eq!(b.cmd(&["GET", "fresh"]), bulk("1"));
    let (_, body) = http_get(proxy.admin_addr().unwrap(), "/config");
    assert!(body.contains("prefix = \"a:\""), "{body}");

    // Back to the first file: once every client has moved back (idle ones too: a reload
    // wakes them), nothing uses b or c, and their connections close.
    assert_eq!(reload(&proxy, &base), Vec::<String>::new());
    wait_until(Duration::from_secs(10), || {
        proxy_conns(b) == 0 && proxy_conns(c) == 0
    });
    for cl in &mut clients {
        assert_eq!(
            cl.call(&["GET", "after1"]),
            Frame::NullBulk,
            "a has no after1"
        );
    }
    assert_eq!(
        clients[0].call(&["GET", "before0"]),
        bulk("v"),
        "still database 2"
    );
    assert_eq!(proxy_conns(b), 0);
    proxy.shutdown();
}

#[test]
fn transactions_watches_and_blocked_commands_finish_where_they_began() {
    let s = servers();
    let [a, b, _] = &s;
    let base = config(&s, "upstream = \"a\"\n");
    let proxy = start_proxy_config(&base);
    let addr = proxy.addr("svc").unwrap();
    let mut multi = RespReader::connect(addr);
    let mut watch = RespReader::connect(addr);
    let mut blocked = RespReader::connect(addr);
    assert_eq!(multi.call(&["MULTI"]), ok());
    assert_eq!(
        multi.call(&["SET", "t", "1"]),
        Frame::Simple("QUEUED".into())
    );
    assert_eq!(watch.call(&["WATCH", "w"]), ok());
    blocked.send(b"BLPOP q 0\r\n");
    wait_until(Duration::from_secs(5), || {
        match a.cmd(&["INFO", "clients"]) {
            Frame::Bulk(t) => String::from_utf8_lossy(&t).contains("blocked_clients:1"),
            _ => false,
        }
    });

    assert_eq!(
        reload(&proxy, &config(&s, "upstream = \"b\"\n")),
        Vec::<String>::new()
    );
    // The transaction runs on a, where it was queued; the client's next command goes to b.
    assert_eq!(multi.call(&["EXEC"]), Frame::Array(vec![ok()]));
    assert_eq!(a.cmd(&["GET", "t"]), bulk("1"));
    assert_eq!(multi.call(&["SET", "t2", "x"]), ok());
    assert_eq!(b.cmd(&["GET", "t2"]), bulk("x"));
    // WATCH still guards the key on a: a write there aborts the transaction.
    assert_eq!(a.cmd(&["SET", "w", "other"]), ok());
    assert_eq!(watch.call(&["MULTI"]), ok());
    assert_eq!(
        watch.call(&["SET", "w", "mine"]),
        Frame::Simple("QUEUED".into())
    );
    assert_eq!(watch.call(&["EXEC"]), Frame::NullArray);
    assert_eq!(watch.call(&["SET", "w2", "y"]), ok());
    assert_eq!(b.cmd(&["GET", "w2"]), bulk("y"));
    // The blocked BLPOP is still waiting on a, and a push there wakes it.
    assert_eq!(a.cmd(&["LPUSH", "q", "job"]), Frame::Integer(1));
    assert_eq!(blocked.read(), Frame::Array(vec![bulk("q"), bulk("job")]));
    assert_eq!(blocked.call(&["SET", "b3", "z"]), ok());
    assert_eq!(b.cmd(&["GET", "b3"]), bulk("z"));
    // Nothing holds a any more.
    wait_until(Duration::from_secs(10), || proxy_conns(a) == 0);
    proxy.shutdown();
}

#[test]
fn a_reload_adds_a_cluster_and_ready_follows_it() {
    let s = servers();
    let [a, _, _] = &s;
    let cluster = RedisCluster::start(3, 0);
    let seeds: Vec<String> = cluster.addrs().iter().map(|s| format!("\"{s}\"")).collect();
    let base = config(&s, "upstream = \"a\"\n");
    let proxy = start_proxy_config(&base);
    let admin = proxy.admin_addr().unwrap();
    let mut cl = RespReader::connect(proxy.addr("svc").unwrap());
    assert_eq!(cl.call(&["SET", "k", "v"]), ok());
    // A cluster upstream the first file didn't have, behind a route.
    let cluster_upstream = format!(
        "[[upstream]]\nname = \"cl\"\nmode = \"cluster\"\nnodes = [{}]\n\n",
        seeds.join(", ")
    );
    let routed = config(
        &s,
        "upstream = \"a\"\n\n[[service.route]]\nprefix = \"c:\"\nupstream = \"cl\"\n",
    )
    .replace("[[service]]", &format!("{cluster_upstream}[[service]]"));
    assert_eq!(reload(&proxy, &routed), Vec::<String>::new());
    for i in 0..30 {
        let key = format!("c:{i}");
        assert_eq!(cl.call(&["SET", &key, &i.to_string()]), ok());
        assert_eq!(cluster.get_from_owner(&key), bulk(&i.to_string()), "{key}");
    }
    assert_eq!(cl.call(&["GET", "k"]), bulk("v"));
    // The cluster as the catch-all: /ready and /topology follow it.
    let whole = config(&s, "upstream = \"cl\"\n")
        .replace("[[service]]", &format!("{cluster_upstream}[[service]]"));
    assert_eq!(reload(&proxy, &whole), Vec::<String>::new());
    assert_eq!(cl.call(&["GET", "c:7"]), bulk("7"));
    wait_until(Duration::from_secs(10), || {
        http_get(admin, "/ready").0 == 200
    });
    let (_, topology) = http_get(admin, "/topology");
    assert!(
        topology.contains("cl worker 0") && topology.contains("cl worker 1"),
        "{topology}"
    );
    // And a's connections close once no route sends there.
    wait_until(Duration::from_secs(10), || proxy_conns(a) == 0);
    proxy.shutdown();
}

#[test]
fn a_client_moves_only_after_the_replies_owed_on_its_old_routes() {
    let s = servers();
    let [_, b, _] = &s;
    // One worker with one shared connection: a busy client's backlog sits in front of SET.
    let base = config(&s, "upstream = \"a\"\n").replace("workers = 2", "workers = 1");
    let proxy = start_proxy_config(&base);
    let addr = proxy.addr("svc").unwrap();
    let mut cl = RespReader::connect(addr);
    assert_eq!(cl.call(&["PING"]), Frame::Simple("PONG".into()));
    let mut busy = RespReader::connect(addr);
    send_backlog(&mut busy);
    cl.send(b"SET m v\r\n");
    std::thread::sleep(Duration::from_millis(20));
    // New routes (and so new connections to a) while SET waits behind 64 MB on the old one.
    let routed = config(
        &s,
        "upstream = \"a\"\n\n[[service.route]]\nprefix = \"r:\"\nupstream = \"b\"\n",
    )
    .replace("workers = 2", "workers = 1");
    assert_eq!(reload(&proxy, &routed), Vec::<String>::new());
    // GET goes out on the new connection only once SET is answered, so it sees the value.
    cl.send(b"GET m\r\n");
    assert_eq!(cl.read(), ok());
    assert_eq!(cl.read(), bulk("v"));
    for _ in 0..1000 {
        assert_eq!(busy.read(), ok());
    }
    assert_eq!(cl.call(&["SET", "r:k", "1"]), ok());
    assert_eq!(b.cmd(&["GET", "r:k"]), bulk("1"));
    proxy.shutdown();
}

#[test]
fn a_subscriber_keeps_only_its_own_routes_open() {
    let s = servers();
    let [a, b, c] = &s;
    let proxy = start_proxy_config(&config(&s, "upstream = \"a\"\n"));
    let addr = proxy.addr("svc").unwrap();
    let mut sub = RespReader::connect(addr);
    assert_eq!(
        sub.call(&["SUBSCRIBE", "news"]),
        Frame::Array(vec![bulk("subscribe"), bulk("news"), Frame::Integer(1)])
    );
    // Two reloads while it stays subscribed (on a): b is used in between, then c.
    assert_eq!(
        reload(&proxy, &config(&s, "upstream = \"b\"\n")),
        Vec::<String>::new()
    );
    let mut other = RespReader::connect(addr);
    assert_eq!(other.call(&["SET", "k", "1"]), ok());
    assert_eq!(b.cmd(&["GET", "k"]), bulk("1"));
    assert_eq!(
        reload(&proxy, &config(&s, "upstream = \"c\"\n")),
        Vec::<String>::new()
    );
    assert_eq!(other.call(&["SET", "k", "2"]), ok());
    assert_eq!(c.cmd(&["GET", "k"]), bulk("2"));
    // The generation in between has no client left, so b's connections close, while the
    // subscriber's first generation (a) is still there for it.
    wait_until(Duration::from_secs(10), || proxy_conns(b) == 0);
    // Each of the two workers runs the newest generation; the subscriber holds one more.
    let admin = proxy.admin_addr().unwrap();
    let generations = || {
        let (_, body) = http_get(admin, "/metrics");
        body.lines()
            .find_map(|l| l.strip_prefix("redis_intercept_route_generations{service=\"svc\"} "))
            .map(str::to_owned)
    };
    assert_eq!(generations().as_deref(), Some("3"));
    assert_eq!(a.cmd(&["PUBLISH", "news", "hi"]), Frame::Integer(1));
    assert_eq!(
        sub.read(),
        Frame::Array(vec![bulk("message"), bulk("news"), bulk("hi")])
    );
    // Once it unsubscribes, it moves to the newest routes.
    assert_eq!(
        sub.call(&["UNSUBSCRIBE"]),
        Frame::Array(vec![bulk("unsubscribe"), bulk("news"), Frame::Integer(0)])
    );
    assert_eq!(sub.call(&["GET", "k"]), bulk("2"));
    wait_until(Duration::from_secs(10), || proxy_conns(a) == 0);
    assert_eq!(generations().as_deref(), Some("2"));
    proxy.shutdown();
}

#[test]
fn a_client_in_a_database_the_new_routes_lack_stays_until_it_leaves_it() {
    let s = servers();
    let [a, b, _] = &s;
    let proxy = start_proxy_config(&config(&s, "upstream = \"a\"\n"));
    let addr = proxy.addr("svc").unwrap();
    let mut deep = RespReader::connect(addr);
    let mut plain = RespReader::connect(addr);
    assert_eq!(deep.call(&["SELECT", "5"]), ok());
    assert_eq!(plain.call(&["PING"]), Frame::Simple("PONG".into()));
    // The new catch-all has databases 0 to 3 only.
    let fewer = config(&s, "upstream = \"b\"\n").replace(
        "name = \"b\"\nmode = \"standalone\"\n",
        "name = \"b\"\nmode = \"standalone\"\ndatabases = 4\n",
    );
    assert_eq!(reload(&proxy, &fewer), Vec::<String>::new());
    assert_eq!(plain.call(&["SET", "p", "1"]), ok());
    assert_eq!(b.cmd(&["GET", "p"]), bulk("1"));
    // The client in database 5 keeps writing there, on a.
    assert_eq!(deep.call(&["SET", "d", "5"]), ok());
    assert_eq!(get_in(a, "5", "d"), bulk("5"));
    // Back in database 0, it moves.
    assert_eq!(deep.call(&["SELECT", "0"]), ok());
    assert_eq!(deep.call(&["SET", "d", "0"]), ok());
    assert_eq!(b.cmd(&["GET", "d"]), bulk("0"));
    assert_eq!(a.cmd(&["GET", "d"]), Frame::NullBulk);
    proxy.shutdown();
}

#[test]
fn clients_under_load_see_no_error_and_read_their_writes_across_reloads() {
    let s = servers();
    let [a, _, _] = &s;
    // Two files that route differently but to the same server: every reload builds new
    // routes and connections, and every client moves between its commands.
    let one = config(&s, "upstream = \"a\"\n");
    let two = config(
        &s,
        "upstream = \"a\"\n\n[[service.route]]\nprefix = \"x:\"\nupstream = \"a\"\n",
    );
    let proxy = start_proxy_config(&one);
    let addr = proxy.addr("svc").unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let workers: Vec<_> = (0..6)
        .map(|id| {
            let stop = std::sync::Arc::clone(&stop);
            std::thread::spawn(move || {
                let mut c = RespReader::connect(addr);
                let mut rounds = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    // Half the clients pipeline a write and its read, half wait for each.
                    let key = format!("{}k{id}", if id % 2 == 0 { "x:" } else { "" });
                    let value = rounds.to_string();
                    if id < 3 {
                        c.send(
                            format!("SET {key} {value}\r\nGET {key}\r\nINCR n{id}\r\n").as_bytes(),
                        );
                        assert_eq!(c.read(), ok(), "client {id}");
                        assert_eq!(c.read(), bulk(&value), "client {id}");
                    } else {
                        assert_eq!(c.call(&["SET", &key, &value]), ok(), "client {id}");
                        assert_eq!(c.call(&["GET", &key]), bulk(&value), "client {id}");
                        c.send(format!("INCR n{id}\r\n").as_bytes());
                    }
                    rounds += 1;
                    assert_eq!(c.read(), Frame::Integer(rounds as i64), "client {id}");
                }
                rounds
            })
        })
        .collect();
    for i in 0..20 {
        std::thread::sleep(Duration::from_millis(50));
        let text = if i % 2 == 0 { &two } else { &one };
        assert_eq!(reload(&proxy, text), Vec::<String>::new());
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for (id, w) in workers.into_iter().enumerate() {
        let rounds = w.join().expect("a client saw a wrong reply");
        assert!(rounds > 20, "client {id} made {rounds} rounds");
        assert_eq!(
            a.cmd(&["GET", &format!("n{id}")]),
            bulk(&rounds.to_string())
        );
    }
    // Nothing is left of the old routes: one generation per worker, and a's connections are
    // those of the newest (two workers × one connection each).
    let admin = proxy.admin_addr().unwrap();
    wait_until(Duration::from_secs(10), || {
        http_get(admin, "/metrics")
            .1
            .contains("redis_intercept_route_generations{service=\"svc\"} 2\n")
    });
    wait_until(Duration::from_secs(10), || proxy_conns(a) == 2);
    proxy.shutdown();
}

#[test]
fn a_reload_adds_a_service_on_every_worker_and_removes_it() {
    let s = servers();
    let [a, b, c] = &s;
    let base = config(&s, "upstream = \"a\"\n");
    let proxy = start_proxy_config(&base);
    let mut old = RespReader::connect(proxy.addr("svc").unwrap());
    assert_eq!(old.call(&["SET", "k", "a"]), ok());
    assert_eq!(proxy.addr("two"), None);
    let listen = format!("127.0.0.1:{}", redis_intercept_e2e::free_port());
    let two = |upstream: &str| {
        format!(
            "{base}\n[[service]]\nname = \"two\"\nlisten = \"{listen}\"\nupstream = \"{upstream}\"\n"
        )
    };
    assert_eq!(reload(&proxy, &two("b")), Vec::<String>::new());
    let addr = proxy.addr("two").expect("the new service listens");
    // Enough clients that both workers serve some.
    let mut clients: Vec<RespReader> = (0..8).map(|_| RespReader::connect(addr)).collect();
    for (i, cl) in clients.iter_mut().enumerate() {
        assert_eq!(cl.call(&["SET", &format!("two{i}"), "b"]), ok());
        assert_eq!(b.cmd(&["GET", &format!("two{i}")]), bulk("b"), "client {i}");
    }
    assert_eq!(old.call(&["GET", "k"]), bulk("a"));
    let admin = proxy.admin_addr().unwrap();
    let (_, metrics) = http_get(admin, "/metrics");
    assert!(
        metrics.contains("redis_intercept_clients_connected{service=\"two\"} 8\n"),
        "{metrics}"
    );
    assert!(http_get(admin, "/config").1.contains("name = \"two\""));
    // The same file again changes nothing; another upstream for it moves its clients.
    assert_eq!(reload(&proxy, &two("b")), Vec::<String>::new());
    assert_eq!(proxy.addr("two"), Some(addr));
    assert_eq!(reload(&proxy, &two("c")), Vec::<String>::new());
    for (i, cl) in clients.iter_mut().enumerate() {
        assert_eq!(cl.call(&["SET", &format!("moved{i}"), "c"]), ok());
        assert_eq!(
            c.cmd(&["GET", &format!("moved{i}")]),
            bulk("c"),
            "client {i}"
        );
    }
    assert_eq!(a.cmd(&["GET", "two0"]), Frame::NullBulk);
    // A service whose port is taken fails the whole reload: nothing changes.
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let three = format!(
        "{}\n[[service]]\nname = \"three\"\nlisten = \"{}\"\nupstream = \"a\"\n",
        two("a"),
        held.local_addr().unwrap()
    );
    let err = proxy
        .reload(&redis_intercept::config::Config::parse(&three, "reload").unwrap())
        .unwrap_err();
    assert!(format!("{err:#}").contains("cannot listen"), "{err:#}");
    assert_eq!(proxy.addr("three"), None);
    assert_eq!(clients[0].call(&["SET", "still", "c"]), ok());
    assert_eq!(c.cmd(&["GET", "still"]), bulk("c"));
    // Removed again: its clients are closed, its port stops accepting, and the other
    // service carries on.
    assert_eq!(reload(&proxy, &base), Vec::<String>::new());
    assert_eq!(proxy.addr("two"), None);
    for (i, cl) in clients.iter_mut().enumerate() {
        cl.stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut buf = [0u8; 16];
        let read = std::io::Read::read(&mut cl.stream, &mut buf);
        assert!(matches!(read, Ok(0)), "client {i} was not closed: {read:?}");
    }
    wait_until(Duration::from_secs(5), || {
        std::net::TcpStream::connect(addr).is_err()
    });
    assert_eq!(old.call(&["GET", "k"]), bulk("a"));
    let (_, metrics) = http_get(admin, "/metrics");
    assert!(
        metrics.contains("redis_intercept_clients_connected{service=\"two\"} 0\n"),
        "{metrics}"
    );
    assert!(!http_get(admin, "/config").1.contains("name = \"two\""));
    // And back, on the same port.
    assert_eq!(reload(&proxy, &two("b")), Vec::<String>::new());
    let mut back = RespReader::connect(proxy.addr("two").unwrap());
    assert_eq!(back.call(&["GET", "two0"]), bulk("b"));
    proxy.shutdown();
}
