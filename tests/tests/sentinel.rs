//! End-to-end: a sentinel upstream follows its master through a forced failover and through
//! the master being killed, with clients that stay connected to the proxy.
#![expect(clippy::expect_used, reason = "tests panic on failure")]

use std::net::SocketAddr;
use std::time::Duration;

use redis_intercept::resp::Frame;
use redis_intercept_e2e::{
    RedisSentinel, RedisServer, RespReader, bulk, free_port, http_get, is_err, ok, reload,
    start_proxy_config, wait_until,
};

/// A proxy whose service `svc` uses the master of `m` as the sentinels at `sentinels` say.
fn config(sentinels: &[SocketAddr], port: u16, refresh: &str) -> String {
    let nodes: Vec<String> = sentinels.iter().map(|s| format!("\"{s}\"")).collect();
    format!(
        "[proxy]\nworkers = 2\ndrain_timeout = \"1s\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [[upstream]]\nname = \"main\"\nmode = \"sentinel\"\nmaster_name = \"m\"\n\
         nodes = [{}]\nrefresh_interval = \"{refresh}\"\nconnect_timeout = \"500ms\"\n\
         reconnect_backoff_max = \"200ms\"\n\n\
         [[service]]\nname = \"svc\"\nlisten = \"127.0.0.1:{port}\"\nupstream = \"main\"\n",
        nodes.join(", ")
    )
}

fn role(server: &RedisServer) -> String {
    match server.cmd(&["ROLE"]) {
        Frame::Array(parts) => match parts.first() {
            Some(Frame::Bulk(r)) => String::from_utf8_lossy(r).into_owned(),
            other => panic!("ROLE: {other:?}"),
        },
        other => panic!("ROLE: {other:?}"),
    }
}

/// Writes `key` through `client` until the write succeeds (each attempt waits for its
/// reply), and returns how many attempts failed.
fn write_until_ok(client: &mut RespReader, key: &str) -> usize {
    let mut failed = 0;
    wait_until(Duration::from_secs(30), || {
        if client.call(&["SET", key, "v"]) == ok() {
            true
        } else {
            failed += 1;
            std::thread::sleep(Duration::from_millis(50));
            false
        }
    });
    failed
}

#[test]
fn a_sentinel_upstream_follows_failovers_and_clients_stay_connected() {
    let a = RedisServer::start();
    let b = RedisServer::start_with(&["--replicaof", "127.0.0.1", &a.addr.port().to_string()]);
    let sentinel = RedisSentinel::start(a.addr, 1000);
    // The sentinel learns the replica from the master's INFO.
    wait_until(
        Duration::from_secs(20),
        || matches!(sentinel.cmd(&["SENTINEL", "replicas", "m"]), Frame::Array(r) if r.len() == 1),
    );
    let port = free_port();
    // A sentinel that isn't there comes first: the next one answers.
    let dead = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let proxy = start_proxy_config(&config(&[dead, sentinel.addr], port, "500ms"));
    let admin = proxy.admin_addr().unwrap();
    wait_until(Duration::from_secs(5), || {
        http_get(admin, "/ready").0 == 200
    });
    let shown = http_get(admin, "/config").1;
    assert!(
        shown.contains(&format!("master = \"{}\"", a.addr)),
        "{shown}"
    );

    let mut client = RespReader::connect(proxy.addr("svc").unwrap());
    assert_eq!(client.call(&["SET", "before", "1"]), ok());
    assert_eq!(a.cmd(&["GET", "before"]), bulk("1"));

    // A forced failover: the old master stays up, as a replica. The proxy learns the new
    // master from the sentinel within its refresh_interval; until then writes may fail
    // (READONLY), never land anywhere else.
    wait_until(Duration::from_secs(10), || {
        matches!(b.cmd(&["GET", "before"]), Frame::Bulk(_))
    });
    assert_eq!(sentinel.cmd(&["SENTINEL", "FAILOVER", "m"]), ok());
    wait_until(Duration::from_secs(20), || {
        sentinel.master() == Some(b.addr)
    });
    // Within refresh_interval (500 ms) the proxy runs on the new master. (Writes in the
    // meantime may still reach the old one before the sentinel demotes it, as they would
    // from any client: Sentinel's own window.)
    wait_until(Duration::from_secs(3), || {
        http_get(admin, "/config")
            .1
            .contains(&format!("master = \"{}\"", b.addr))
    });
    // The same client connection: its next writes go to the new master.
    assert_eq!(role(&b), "master");
    for i in 0..20 {
        assert_eq!(client.call(&["SET", &format!("k{i}"), "x"]), ok());
    }
    for i in 0..20 {
        assert_eq!(b.cmd(&["GET", &format!("k{i}")]), bulk("x"));
    }
    wait_until(Duration::from_secs(5), || {
        http_get(admin, "/ready").0 == 200
    });
    // The connections to the old master, now a replica, are closed.
    let up = |node: SocketAddr| {
        let line = format!(
            "redis_intercept_upstream_connections_up{{upstream=\"main\",node=\"{node}\"}} "
        );
        http_get(admin, "/metrics")
            .1
            .lines()
            .find_map(|l| l.strip_prefix(&line).map(|v| v.trim().to_owned()))
            .unwrap_or_default()
    };
    wait_until(Duration::from_secs(5), || up(a.addr) == "0");
    assert_eq!(up(b.addr), "2");

    // The master is killed: the sentinel fails over to the old one, and the proxy follows.
    let mut b = b;
    // (The demoted master resyncs from the new one first: a full sync waits out Redis's
    // 5 s repl-diskless-sync-delay.)
    wait_until(Duration::from_secs(30), || {
        matches!(a.cmd(&["GET", "k19"]), Frame::Bulk(_))
    });
    // With no periodic asking left, only the failed connections to the dead master make
    // the proxy ask (at most once per redirect_refresh_interval, 1 s).
    reload(&proxy, &config(&[dead, sentinel.addr], port, "1h"));
    b.kill();
    wait_until(Duration::from_secs(30), || {
        sentinel.master() == Some(a.addr)
    });
    // Writes work again, on the same client connection.
    let failed = write_until_ok(&mut client, "after-kill");
    assert_eq!(role(&a), "master");
    assert_eq!(a.cmd(&["GET", "after-kill"]), bulk("v"));
    eprintln!("writes refused while the proxy caught up: {failed}");
    assert_eq!(client.call(&["GET", "k7"]), bulk("x"));
    proxy.shutdown();
}

#[test]
fn a_sentinel_upstream_waits_for_its_sentinels_and_a_reload_can_add_one() {
    let a = RedisServer::start();
    let other = RedisServer::start();
    // No sentinel yet: the proxy starts, says why it isn't ready, and refuses requests.
    let sentinel_port = free_port();
    let sentinel_addr = SocketAddr::from(([127, 0, 0, 1], sentinel_port));
    let port = free_port();
    // A long refresh_interval: while no master is known, the sentinels are asked each second.
    let proxy = start_proxy_config(&config(&[sentinel_addr], port, "1h"));
    let admin = proxy.admin_addr().unwrap();
    let (status, why) = http_get(admin, "/ready");
    assert_eq!(status, 503, "{why}");
    assert!(why.contains("(master not known yet)"), "{why}");
    let mut client = RespReader::connect(proxy.addr("svc").unwrap());
    assert!(matches!(client.call(&["SET", "k", "v"]), Frame::Error(_)));
    // The sentinel comes up: within a second the proxy has the master, for the same client.
    let sentinel = RedisSentinel::start_on(sentinel_port, a.addr, 5000);
    wait_until(Duration::from_secs(5), || {
        http_get(admin, "/ready").0 == 200
    });
    assert_eq!(client.call(&["SET", "k", "v"]), ok());
    assert_eq!(a.cmd(&["GET", "k"]), bulk("v"));
    proxy.shutdown();

    // A proxy on a plain standalone upstream; a reload turns the service to a sentinel
    // upstream. Its master is asked during the reload, so the next command goes there.
    let port = free_port();
    let plain = format!(
        "[proxy]\nworkers = 2\n\n[[upstream]]\nname = \"main\"\nmode = \"standalone\"\n\
         nodes = [\"{}\"]\n\n[[service]]\nname = \"svc\"\nlisten = \"127.0.0.1:{port}\"\n\
         upstream = \"main\"\n",
        other.addr
    );
    let proxy = start_proxy_config(&plain);
    let mut client = RespReader::connect(proxy.addr("svc").unwrap());
    assert_eq!(client.call(&["SET", "where", "other"]), ok());
    let with_sentinel =
        config(&[sentinel.addr], port, "1h").replace("[admin]\nlisten = \"127.0.0.1:0\"\n\n", "");
    reload(&proxy, &with_sentinel);
    assert_eq!(client.call(&["SET", "where", "sentinel"]), ok());
    assert_eq!(a.cmd(&["GET", "where"]), bulk("sentinel"));
    assert_eq!(other.cmd(&["GET", "where"]), bulk("other"));
    proxy.shutdown();
}

/// Connections the sentinel has accepted, this one included (the proxy opens one per
/// question; Sentinel has no per-command stats).
fn connections(sentinel: &RedisSentinel) -> u64 {
    let Frame::Bulk(info) = sentinel.cmd(&["INFO", "stats"]) else {
        panic!("INFO stats")
    };
    String::from_utf8_lossy(&info)
        .lines()
        .find_map(|l| l.strip_prefix("total_connections_received:"))
        .and_then(|n| n.trim().parse().ok())
        .expect("total_connections_received")
}

#[test]
fn a_readonly_reply_makes_the_proxy_ask_the_sentinels_at_once() {
    let a = RedisServer::start();
    let b = RedisServer::start();
    let sentinel = RedisSentinel::start(a.addr, 5000);
    let port = free_port();
    // No periodic asking: only the READONLY reply can make the proxy ask.
    let proxy = start_proxy_config(&config(&[sentinel.addr], port, "1h"));
    let mut client = RespReader::connect(proxy.addr("svc").unwrap());
    assert_eq!(client.call(&["SET", "k", "v"]), ok());
    let before = connections(&sentinel);
    // Demoted behind the sentinel's back: the proxy's connections stay open.
    assert_eq!(
        a.cmd(&["REPLICAOF", "127.0.0.1", &b.addr.port().to_string()]),
        ok()
    );
    let reply = client.call(&["SET", "k2", "v"]);
    assert!(is_err(&reply, "READONLY"), "{reply:?}");
    // Each look adds its own connection: more than that is the proxy asking.
    let mut looks = 0;
    wait_until(Duration::from_secs(5), || {
        looks += 1;
        connections(&sentinel) > before + looks
    });
    proxy.shutdown();
}

#[test]
fn sentinels_with_a_password_are_asked_with_it() {
    let a = RedisServer::start();
    let sentinel = RedisSentinel::start_with_password(a.addr, "sentinel-secret");
    let dir = redis_intercept_e2e::tempfile_dir();
    let file = dir.path().join("sentinel-password");
    std::fs::write(&file, "sentinel-secret\n").unwrap();
    let port = free_port();
    let text = config(&[sentinel.addr], port, "1h").replace(
        "master_name = \"m\"\n",
        &format!(
            "master_name = \"m\"\nsentinel_password_file = \"{}\"\n",
            file.display()
        ),
    );
    let proxy = start_proxy_config(&text);
    let admin = proxy.admin_addr().unwrap();
    wait_until(Duration::from_secs(5), || {
        http_get(admin, "/ready").0 == 200
    });
    let mut client = RespReader::connect(proxy.addr("svc").unwrap());
    assert_eq!(client.call(&["SET", "k", "v"]), ok());
    assert_eq!(a.cmd(&["GET", "k"]), bulk("v"));
    // The file's path is shown, never its contents.
    let shown = http_get(admin, "/config").1;
    assert!(shown.contains("sentinel_password_file"), "{shown}");
    assert!(!shown.contains("sentinel-secret"), "{shown}");
    proxy.shutdown();

    // Without the password the sentinel refuses, and the proxy says why it isn't ready.
    let proxy = start_proxy_config(&config(&[sentinel.addr], free_port(), "1h"));
    let (status, why) = http_get(proxy.admin_addr().unwrap(), "/ready");
    assert_eq!(status, 503, "{why}");
    assert!(why.contains("(master not known yet)"), "{why}");
    proxy.shutdown();
}

#[test]
fn a_new_master_that_cannot_be_applied_yet_is_applied_once_it_can() {
    let a = RedisServer::start();
    let dir = redis_intercept_e2e::tempfile_dir();
    let file = dir.path().join("client-passwords");
    std::fs::write(&file, "pw\n").unwrap();
    let sentinel_port = free_port();
    let sentinel_addr = SocketAddr::from(([127, 0, 0, 1], sentinel_port));
    let text = format!(
        "{}\n[service.auth]\npassword_file = \"{}\"\n",
        config(&[sentinel_addr], free_port(), "300ms"),
        file.display()
    );
    let proxy = start_proxy_config(&text);
    let admin = proxy.admin_addr().unwrap();
    // Applying a master reads the client password file again: while it is missing, the
    // master found is kept aside, not lost.
    std::fs::remove_file(&file).unwrap();
    let _sentinel = RedisSentinel::start_on(sentinel_port, a.addr, 5000);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(http_get(admin, "/ready").0, 503);
    std::fs::write(&file, "pw\n").unwrap();
    wait_until(Duration::from_secs(5), || {
        http_get(admin, "/ready").0 == 200
    });
    let mut client = RespReader::connect(proxy.addr("svc").unwrap());
    assert_eq!(client.call(&["AUTH", "pw"]), ok());
    assert_eq!(client.call(&["SET", "k", "v"]), ok());
    assert_eq!(a.cmd(&["GET", "k"]), bulk("v"));
    proxy.shutdown();
}

#[test]
fn a_reload_that_points_an_upstream_at_other_sentinels_asks_them_at_once() {
    let a1 = RedisServer::start();
    let a2 = RedisServer::start();
    let s1 = RedisSentinel::start(a1.addr, 5000);
    let s2 = RedisSentinel::start(a2.addr, 5000);
    let port = free_port();
    let proxy = start_proxy_config(&config(&[s1.addr], port, "1h"));
    let mut client = RespReader::connect(proxy.addr("svc").unwrap());
    assert_eq!(client.call(&["SET", "k", "one"]), ok());
    assert_eq!(a1.cmd(&["GET", "k"]), bulk("one"));
    // Same upstream name and master_name, other sentinels (another deployment's): the
    // master known from the first ones is not kept.
    reload(&proxy, &config(&[s2.addr], port, "1h"));
    assert_eq!(client.call(&["SET", "k", "two"]), ok());
    assert_eq!(a2.cmd(&["GET", "k"]), bulk("two"));
    assert_eq!(a1.cmd(&["GET", "k"]), bulk("one"));
    proxy.shutdown();
}

#[test]
fn reads_go_to_the_replicas_the_sentinels_list() {
    let a = RedisServer::start();
    let mut b = RedisServer::start_with(&["--replicaof", "127.0.0.1", &a.addr.port().to_string()]);
    let sentinel = RedisSentinel::start(a.addr, 5000);
    // Listed once the sentinel has seen the replica up and in sync.
    wait_until(Duration::from_secs(20), || {
        let Frame::Array(replicas) = sentinel.cmd(&["SENTINEL", "replicas", "m"]) else {
            return false;
        };
        let text = format!("{replicas:?}");
        replicas.len() == 1 && text.contains("\"ok\"") && !text.contains("disconnected")
    });
    let port = free_port();
    let text = format!(
        "{}read_policy = \"prefer_replica\"\n",
        config(&[sentinel.addr], port, "300ms")
    );
    let proxy = start_proxy_config(&text);
    let admin = proxy.admin_addr().unwrap();
    let shown = http_get(admin, "/config").1;
    assert!(
        shown.contains(&format!("replicas = [\"{}\"]", b.addr)),
        "{shown}"
    );
    let mut client = RespReader::connect(proxy.addr("svc").unwrap());
    // Writes go to the master, reads to the replica.
    assert_eq!(client.call(&["SET", "k", "v"]), ok());
    wait_until(Duration::from_secs(5), || b.cmd(&["GET", "k"]) == bulk("v"));
    let (on_a, on_b) = (a.calls("get"), b.calls("get"));
    for _ in 0..10 {
        assert_eq!(client.call(&["GET", "k"]), bulk("v"));
    }
    // (`gets` itself isn't a GET; the wait above sent GETs to b directly before counting.)
    assert_eq!(b.calls("get"), on_b + 10);
    assert_eq!(a.calls("get"), on_a);
    // Writes still reach the master only.
    assert_eq!(client.call(&["SET", "k", "w"]), ok());
    assert_eq!(a.cmd(&["GET", "k"]), bulk("w"));
    // `any` spreads reads over both (a reload changes the policy for the same client).
    wait_until(Duration::from_secs(5), || b.cmd(&["GET", "k"]) == bulk("w"));
    reload(&proxy, &text.replace("prefer_replica", "any"));
    let (on_a, on_b) = (a.calls("get"), b.calls("get"));
    for _ in 0..20 {
        assert_eq!(client.call(&["GET", "k"]), bulk("w"));
    }
    let (more_a, more_b) = (a.calls("get") - on_a, b.calls("get") - on_b);
    assert_eq!(more_a + more_b, 20);
    assert!(
        more_a >= 5 && more_b >= 5,
        "{more_a} on the master, {more_b} on the replica"
    );
    reload(&proxy, &text);
    // The replica dies: prefer_replica falls back to the master.
    b.kill();
    wait_until(Duration::from_secs(10), || {
        client.call(&["GET", "k"]) == bulk("w")
    });
    let on_a = a.calls("get");
    for _ in 0..5 {
        assert_eq!(client.call(&["GET", "k"]), bulk("w"));
    }
    assert_eq!(a.calls("get"), on_a + 5);
    proxy.shutdown();
}
