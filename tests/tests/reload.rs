//! A reload changes faults, mirror rates, timeouts, client limits and routes for clients that are
//! already connected, on every worker, and names what only a restart applies.

use std::time::{Duration, Instant};

use redis_intercept::resp::Frame;
use redis_intercept_e2e::{
    RedisServer, RespReader, http_get, is_err, ok, reload, start_proxy_config, wait_until,
};

fn dbsize(server: &RedisServer) -> i64 {
    match server.cmd(&["DBSIZE"]) {
        Frame::Integer(n) => n,
        other => panic!("{other:?}"),
    }
}

/// A proxy with two workers in front of `main`, with a write mirror to `copy`, an admin
/// endpoint, and `service_extra` in the service.
fn config(main: &RedisServer, copy: &RedisServer, service_extra: &str, mirror: &str) -> String {
    format!(
        "[proxy]\nworkers = 2\ndrain_timeout = \"1s\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [[upstream]]\nname = \"main\"\nmode = \"standalone\"\nnodes = [\"{}\"]\n\n\
         [[upstream]]\nname = \"copy\"\nmode = \"standalone\"\nnodes = [\"{}\"]\n\n\
         [[service]]\nname = \"svc\"\nlisten = \"127.0.0.1:0\"\nupstream = \"main\"\n{service_extra}\n\
         [[service.mirror]]\nupstream = \"copy\"\nexclude_reads = true\nbatch_delay = \"0s\"\n{mirror}\n",
        main.addr, copy.addr
    )
}

#[test]
fn reload_reaches_connected_clients_on_every_worker() {
    let main = RedisServer::start();
    let copy = RedisServer::start();
    let base = config(&main, &copy, "", "percentage = 100.0\n");
    let proxy = start_proxy_config(&base);
    let addr = proxy.addr("svc").unwrap();
    // Enough connections that both workers hold some (the kernel spreads them by port).
    let mut clients: Vec<RespReader> = (0..12).map(|_| RespReader::connect(addr)).collect();
    for (i, c) in clients.iter_mut().enumerate() {
        assert_eq!(c.call(&["SET", &format!("k{i}"), "v"]), ok());
    }
    wait_until(Duration::from_secs(5), || dbsize(&copy) == 12);

    // Faults on, mirror off, a short op_timeout: no notes, and every open client sees it.
    let chaos = config(
        &main,
        &copy,
        "op_timeout = \"300ms\"\n\n[[service.fault]]\nkind = \"error\"\npercentage = 100.0\n\
         commands = [\"GET\"]\nmessage = \"ERR chaos\"\n",
        "percentage = 0.0\n",
    );
    assert_eq!(reload(&proxy, &chaos), Vec::<String>::new());
    for c in &mut clients {
        wait_until(Duration::from_secs(5), || {
            is_err(&c.call(&["GET", "k0"]), "ERR chaos")
        });
        assert_eq!(c.call(&["SET", "after", "x"]), ok(), "only GET is faulted");
    }
    assert_eq!(main.cmd(&["GET", "after"]), Frame::Bulk("x".into()));
    // The writes since the reload were not copied (percentage 0); give stray copies time.
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(dbsize(&copy), 12, "no copy after the mirror went to 0%");
    // op_timeout: with Redis paused, the open client's request fails after 300 ms, not 5 s.
    assert_eq!(
        main.cmd(&["CLIENT", "PAUSE", "2000", "ALL"]),
        ok(),
        "pause the upstream"
    );
    let started = Instant::now();
    let reply = clients[0].call(&["SET", "paused", "x"]);
    assert!(is_err(&reply, "ERR operation timed out"), "{reply:?}");
    assert!(started.elapsed() < Duration::from_millis(1500));
    assert_eq!(main.cmd(&["CLIENT", "UNPAUSE"]), ok());
    // /config shows what runs now.
    let admin = proxy.admin_addr().unwrap();
    let (status, body) = http_get(admin, "/config");
    assert_eq!(status, 200);
    assert!(body.contains("op_timeout = \"300ms\""), "{body}");
    assert!(body.contains("ERR chaos"), "{body}");

    // Back to the first file: reads and copies are back for the same clients.
    assert_eq!(reload(&proxy, &base), Vec::<String>::new());
    for (i, c) in clients.iter_mut().enumerate() {
        wait_until(Duration::from_secs(5), || {
            c.call(&["GET", "k0"]) == Frame::Bulk("v".into())
        });
        assert_eq!(c.call(&["SET", &format!("back{i}"), "v"]), ok());
    }
    wait_until(Duration::from_secs(5), || dbsize(&copy) == 24);
    proxy.shutdown();
}

#[test]
fn reload_changes_client_limits_and_the_idle_timeout() {
    let main = RedisServer::start();
    let copy = RedisServer::start();
    let base = config(&main, &copy, "", "");
    let proxy = start_proxy_config(&base);
    let addr = proxy.addr("svc").unwrap();
    let mut first = RespReader::connect(addr);
    assert_eq!(first.call(&["PING"]), Frame::Simple("PONG".into()));
    // One client is connected; max_clients = 1 turns the next one away.
    let limited = config(&main, &copy, "max_clients = 1\n", "");
    assert_eq!(reload(&proxy, &limited), Vec::<String>::new());
    // (Connections the start-up check opened may take a moment to be counted out.)
    wait_until(Duration::from_secs(5), || {
        let reply = RespReader::connect(addr).call(&["PING"]);
        is_err(&reply, "ERR max number of clients reached")
    });
    assert_eq!(first.call(&["PING"]), Frame::Simple("PONG".into()));
    // max_pipeline = 1 while a client is connected doesn't stall its pipeline.
    let narrow = config(&main, &copy, "max_pipeline = 1\n", "");
    reload(&proxy, &narrow);
    first.send(b"SET a 1\r\nINCR a\r\nINCR a\r\nGET a\r\n");
    assert_eq!(first.read(), ok());
    assert_eq!(first.read(), Frame::Integer(2));
    assert_eq!(first.read(), Frame::Integer(3));
    assert_eq!(first.read(), Frame::Bulk("3".into()));
    // An idle timeout set by a reload closes the client that was idle all along.
    let idle = config(&main, &copy, "idle_timeout = \"400ms\"\n", "");
    reload(&proxy, &idle);
    let started = Instant::now();
    let mut buf = [0u8; 16];
    let n = std::io::Read::read(&mut first.stream, &mut buf).unwrap();
    assert_eq!(n, 0, "closed by the proxy");
    assert!(started.elapsed() < Duration::from_secs(3));
    proxy.shutdown();
}

#[test]
fn reload_names_the_settings_that_need_a_restart_and_applies_the_rest() {
    let main = RedisServer::start();
    let copy = RedisServer::start();
    let base = config(&main, &copy, "", "");
    let proxy = start_proxy_config(&base);
    let mut c = RespReader::connect(proxy.addr("svc").unwrap());
    assert_eq!(c.call(&["SET", "k", "v"]), ok());
    // A fault, a route and a mirror setting (all applied) with a new listen address and
    // drain timeout (not applied).
    let next = config(
        &main,
        &copy,
        "[[service.fault]]\nkind = \"error\"\npercentage = 100.0\ncommands = [\"GET\"]\n\n\
         [[service.route]]\nprefix = \"r:\"\nupstream = \"copy\"\n",
        "max_queue = \"1MiB\"\n",
    )
    .replace("[admin]", "[admin]\n# a comment changes nothing\n")
    .replace("drain_timeout = \"1s\"", "drain_timeout = \"2s\"")
    .replace(
        "name = \"svc\"\nlisten = \"127.0.0.1:0\"",
        "name = \"svc\"\nlisten = \"127.0.0.1:1\"",
    );
    let notes = reload(&proxy, &next);
    assert_eq!(notes.len(), 1, "{notes:?}");
    assert!(
        notes[0].ends_with("take effect after a restart: proxy.drain_timeout, service[0].listen"),
        "{notes:?}"
    );
    // The fault and the route are live for the client that was connected.
    assert!(is_err(&c.call(&["GET", "k"]), "ERR Fault Injected: Error"));
    assert_eq!(c.call(&["SET", "r:x", "1"]), ok());
    assert_eq!(copy.cmd(&["GET", "r:x"]), Frame::Bulk("1".into()));
    let (_, body) = http_get(proxy.admin_addr().unwrap(), "/config");
    assert!(body.contains("prefix = \"r:\""), "{body}");
    assert!(body.contains("max_queue"), "{body}");
    assert!(
        body.contains("drain_timeout = \"1000ms\"") && !body.contains("127.0.0.1:1\""),
        "what runs, not the file: {body}"
    );
    proxy.shutdown();
}
