//! End-to-end: the admin endpoint reports readiness, metrics and the config of a running proxy.

use std::time::Duration;

use redis_intercept::resp::Frame;
use redis_intercept_e2e::{
    RedisServer, RespReader, free_port, http_get, http_request, reload, start_proxy_config,
    start_proxy_with, tempfile_dir, wait_until,
};

fn metric(body: &str, line_start: &str) -> Option<f64> {
    body.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn admin_reports_ready_metrics_and_config() {
    let mut server = RedisServer::start();
    let proxy = start_proxy_with(server.addr, "[admin]\nlisten = \"127.0.0.1:0\"\n", "");
    let admin = proxy.admin_addr().unwrap();
    wait_until(Duration::from_secs(5), || {
        http_get(admin, "/ready").0 == 200
    });
    let closed = "redis_intercept_clients_closed_total{service=\"svc\",reason=\"client_closed\"}";
    // start_proxy_with probes the listener once; let that close settle to get a baseline.
    std::thread::sleep(Duration::from_millis(200));
    let baseline = metric(&http_get(admin, "/metrics").1, closed).unwrap_or(0.0);

    let mut c = RespReader::connect(proxy.addr("svc").unwrap());
    c.send(b"PING\r\nSET k v\r\nGET k\r\nECHO x\r\nINCR n\r\n");
    for _ in 0..5 {
        c.read();
    }
    let (status, body) = http_get(admin, "/metrics");
    assert_eq!(status, 200);
    assert_eq!(
        metric(&body, "redis_intercept_commands_total{service=\"svc\"}"),
        Some(5.0),
        "{body}"
    );
    assert_eq!(
        metric(&body, "redis_intercept_clients_connected{service=\"svc\"}"),
        Some(1.0),
        "{body}"
    );
    let up = format!(
        "redis_intercept_upstream_connections_up{{upstream=\"main\",node=\"{}\"}}",
        server.addr
    );
    // One shared connection per worker (the test proxy has 2).
    assert_eq!(metric(&body, &up), Some(2.0), "{body}");
    // Reply latency of the three forwarded commands (PING and ECHO are answered locally),
    // then of one that waits for a paused server.
    let latency = |what: &str| {
        format!(
            "redis_intercept_upstream_request_duration_seconds_{what}{{upstream=\"main\",node=\"{}\"",
            server.addr
        )
    };
    assert_eq!(metric(&body, &latency("count")), Some(3.0), "{body}");
    assert_eq!(
        server.cmd(&["CLIENT", "PAUSE", "300", "ALL"]),
        redis_intercept::resp::Frame::Simple("OK".into())
    );
    c.call(&["GET", "k"]);
    let body = http_get(admin, "/metrics").1;
    assert_eq!(metric(&body, &latency("count")), Some(4.0), "{body}");
    let bucket = |le: &str| {
        metric(
            &body,
            &format!(
                "redis_intercept_upstream_request_duration_seconds_bucket{{le=\"{le}\",upstream=\"main\",node=\"{}\"}}",
                server.addr
            ),
        )
    };
    assert_eq!(bucket("0.25"), Some(3.0), "{body}");
    assert_eq!(bucket("0.5"), Some(4.0), "{body}");
    assert!(metric(&body, &latency("sum")).unwrap() >= 0.25, "{body}");
    // The client's view, sampled once per read batch: the batch above, then the slow GET.
    let client = |le: &str| {
        metric(
            &body,
            &format!(
                "redis_intercept_request_duration_seconds_bucket{{le=\"{le}\",service=\"svc\"}}"
            ),
        )
    };
    let samples = metric(
        &body,
        "redis_intercept_request_duration_seconds_count{service=\"svc\"}",
    )
    .unwrap();
    assert!(samples >= 2.0, "{body}");
    // The slow GET is above 250 ms and the first batch below (a loaded machine may slow
    // some other sample too, so no exact count).
    let fast = client("0.25").unwrap();
    assert!(fast >= 1.0 && fast <= samples - 1.0, "{body}");
    assert_eq!(client("+Inf"), Some(samples), "{body}");
    drop(c);
    let mut last = String::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while metric(&last, closed) != Some(baseline + 1.0) {
        assert!(
            std::time::Instant::now() < deadline,
            "no close counted:\n{last}"
        );
        std::thread::sleep(Duration::from_millis(20));
        last = http_get(admin, "/metrics").1;
    }

    let (status, config) = http_get(admin, "/config");
    assert_eq!(status, 200);
    assert!(config.contains(&server.addr.to_string()), "{config}");

    // Readiness follows the upstream.
    server.kill();
    // Each worker sees its connection go on its own: wait for both.
    wait_until(Duration::from_secs(5), || {
        let (status, why) = http_get(admin, "/ready");
        status == 503 && why.contains("0 of 2 connections up")
    });
    let (_, body) = http_get(admin, "/metrics");
    let failures = format!(
        "redis_intercept_upstream_failures_total{{upstream=\"main\",node=\"{}\"}}",
        server.addr
    );
    assert!(metric(&body, &failures).unwrap_or(0.0) >= 1.0, "{body}");
    server.restart();
    wait_until(Duration::from_secs(5), || {
        http_get(admin, "/ready").0 == 200
    });
    assert_eq!(http_get(admin, "/nope").0, 404);
    // Started in-process, without a config file: nothing to reload.
    let mut post = std::net::TcpStream::connect(admin).unwrap();
    use std::io::{Read, Write};
    post.write_all(
        b"POST /reload HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    let mut response = String::new();
    post.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 404"), "{response}");
    assert!(response.contains("started without --config"), "{response}");
    proxy.shutdown();
}

/// Clients per worker, from `/metrics`.
fn per_worker(admin: std::net::SocketAddr) -> Vec<f64> {
    let body = http_get(admin, "/metrics").1;
    (0..2)
        .map(|w| {
            let line = format!("redis_intercept_worker_clients{{service=\"svc\",worker=\"{w}\"}}");
            metric(&body, &line).unwrap_or(0.0)
        })
        .collect()
}

#[test]
fn connections_spread_over_workers_and_a_held_port_is_refused() {
    let server = RedisServer::start();
    let proxy = start_proxy_with(server.addr, "[admin]\nlisten = \"127.0.0.1:0\"\n", "");
    let admin = proxy.admin_addr().unwrap();
    // 40 clients opened back to back, as a connection pool does at start: each worker has
    // its own socket, so the kernel spreads them (all 40 on one worker: 2 in 2^40).
    let mut clients: Vec<RespReader> = (0..40)
        .map(|_| RespReader::connect(proxy.addr("svc").unwrap()))
        .collect();
    for c in &mut clients {
        c.send(b"PING\r\n");
        c.read();
    }
    wait_until(Duration::from_secs(5), || {
        per_worker(admin).iter().sum::<f64>() == 40.0
    });
    let counts = per_worker(admin);
    assert!(counts.iter().all(|&n| n >= 1.0), "{counts:?}");
    drop(clients);
    wait_until(Duration::from_secs(5), || {
        per_worker(admin).iter().sum::<f64>() == 0.0
    });

    // A port another socket listens on with SO_REUSEPORT (as a second proxy would) is
    // refused: our sockets must not silently join its group and split its traffic.
    let held = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    held.set_reuse_port(true).unwrap();
    held.bind(
        &"127.0.0.1:0"
            .parse::<std::net::SocketAddr>()
            .unwrap()
            .into(),
    )
    .unwrap();
    held.listen(16).unwrap();
    let port = held.local_addr().unwrap().as_socket().unwrap().port();
    let text = format!(
        "[proxy]\nworkers = 2\n\n[[upstream]]\nname = \"main\"\nmode = \"standalone\"\n\
         nodes = [\"{}\"]\n\n[[service]]\nname = \"svc\"\nlisten = \"127.0.0.1:{port}\"\n\
         upstream = \"main\"\n",
        server.addr
    );
    let config = redis_intercept::config::Config::parse(&text, "test.toml").unwrap();
    let err = redis_intercept::app::start(&config)
        .err()
        .expect("a held port is refused");
    assert!(format!("{err:#}").contains("cannot listen"), "{err:#}");
}

/// The service's config for the command statistics test, with `command_stats` set to `on`.
fn command_stats_config(server: std::net::SocketAddr, port: u16, on: bool) -> String {
    format!(
        "[proxy]\nworkers = 2\ndrain_timeout = \"1s\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [[upstream]]\nname = \"main\"\nmode = \"standalone\"\nnodes = [\"{server}\"]\n\n\
         [[service]]\nname = \"svc\"\nlisten = \"127.0.0.1:{port}\"\nupstream = \"main\"\n\
         command_stats = {on}\n\n\
         [[service.fault]]\nkind = \"error\"\npercentage = 100.0\ncommands = [\"HGET\"]\n\n\
         [[service.fault]]\nkind = \"delay\"\npercentage = 100.0\ncommands = [\"HLEN\"]\n\
         delay = \"300ms\"\n"
    )
}

#[test]
fn command_stats_count_calls_errors_and_latency_per_command() {
    let server = RedisServer::start();
    let port = free_port();
    let proxy = start_proxy_config(&command_stats_config(server.addr, port, false));
    let admin = proxy.admin_addr().unwrap();
    let mut c = RespReader::connect(proxy.addr("svc").unwrap());
    c.call(&["SET", "a", "1"]);
    c.call(&["GET", "a"]);
    let calls = |body: &str, command: &str, result: &str| {
        metric(
            body,
            &format!(
                "redis_intercept_command_calls_total{{service=\"svc\",command=\"{command}\",result=\"{result}\"}}"
            ),
        )
    };
    let body = http_get(admin, "/metrics").1;
    // Off: nothing per command.
    assert_eq!(calls(&body, "get", "ok"), None, "{body}");
    assert!(!body.contains("command_duration_seconds_count{"), "{body}");

    // On by a reload, for the client already connected.
    reload(&proxy, &command_stats_config(server.addr, port, true));
    assert_eq!(c.call(&["SET", "a", "1"]), Frame::Simple("OK".into()));
    c.call(&["GET", "a"]);
    c.call(&["GET", "missing"]);
    c.call(&["INCR", "a"]);
    // Errors: Redis's (a wrong type, an unknown command) and the proxy's (a fault).
    assert!(matches!(c.call(&["LPUSH", "a", "x"]), Frame::Error(_)));
    assert!(matches!(c.call(&["NOSUCHCOMMAND", "x"]), Frame::Error(_)));
    assert!(matches!(c.call(&["HGET", "h", "f"]), Frame::Error(_)));
    assert_eq!(c.call(&["HLEN", "h"]), Frame::Integer(0));
    assert_eq!(c.call(&["PING"]), Frame::Simple("PONG".into()));
    // A pipeline: each command is counted.
    c.send(b"GET a\r\nGET a\r\nGET a\r\nGET a\r\nGET a\r\n");
    for _ in 0..5 {
        c.read();
    }
    let body = http_get(admin, "/metrics").1;
    for (command, ok, error) in [
        ("set", 1.0, 0.0),
        ("get", 7.0, 0.0),
        ("incr", 1.0, 0.0),
        ("lpush", 0.0, 1.0),
        ("unknown", 0.0, 1.0),
        ("hget", 0.0, 1.0),
        ("hlen", 1.0, 0.0),
        ("ping", 1.0, 0.0),
    ] {
        assert_eq!(calls(&body, command, "ok"), Some(ok), "{command}: {body}");
        assert_eq!(
            calls(&body, command, "error"),
            Some(error),
            "{command}: {body}"
        );
    }
    let duration = |what: &str, command: &str| {
        metric(
            &body,
            &format!(
                "redis_intercept_command_duration_seconds_{what}service=\"svc\",command=\"{command}\"}}"
            ),
        )
    };
    assert_eq!(duration("count{", "get"), Some(7.0), "{body}");
    // The delayed HLEN took its 300 ms; the GETs didn't.
    assert_eq!(duration("bucket{le=\"0.25\",", "hlen"), Some(0.0), "{body}");
    assert_eq!(duration("bucket{le=\"0.5\",", "hlen"), Some(1.0), "{body}");
    assert_eq!(duration("bucket{le=\"0.25\",", "get"), Some(7.0), "{body}");
    assert!(duration("sum{", "hlen").unwrap() >= 0.3, "{body}");
    for (kind, n) in [("error", 1.0), ("delay", 1.0)] {
        let line = format!("redis_intercept_faults_total{{service=\"svc\",kind=\"{kind}\"}}");
        assert_eq!(metric(&body, &line), Some(n), "{body}");
    }

    // Off again: the counts stay where they were.
    reload(&proxy, &command_stats_config(server.addr, port, false));
    c.call(&["GET", "a"]);
    let body = http_get(admin, "/metrics").1;
    assert_eq!(calls(&body, "get", "ok"), Some(7.0), "{body}");
    proxy.shutdown();
}

#[test]
fn a_token_file_guards_every_endpoint_but_ready_and_metrics() {
    let server = RedisServer::start();
    let dir = tempfile_dir();
    let token = dir.path().join("admin-token");
    std::fs::write(&token, "t0ken-1\n").unwrap();
    let proxy = start_proxy_with(
        server.addr,
        &format!(
            "[admin]\nlisten = \"127.0.0.1:0\"\ntoken_file = \"{}\"\n",
            token.display()
        ),
        "",
    );
    let admin = proxy.admin_addr().unwrap();
    wait_until(Duration::from_secs(5), || {
        http_get(admin, "/ready").0 == 200
    });
    assert_eq!(http_get(admin, "/metrics").0, 200);
    for path in ["/config", "/topology", "/cgroups"] {
        assert_eq!(http_get(admin, path).0, 401, "{path} without a token");
        let wrong = http_request(admin, "GET", path, &["Authorization: Bearer nope"]);
        assert_eq!(wrong.0, 401, "{path} with a wrong token");
    }
    let bearer = "Authorization: Bearer t0ken-1";
    let (status, body) = http_request(admin, "GET", "/config", &[bearer]);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("[[service]]"), "{body}");
    // POST /reload and /cgroups are refused before anything is done.
    assert_eq!(http_request(admin, "POST", "/reload", &[]).0, 401);
    assert_eq!(http_request(admin, "POST", "/cgroups", &[]).0, 401);
    // A rotated token works at once; the old one no longer does.
    std::fs::write(&token, "t0ken-2\n").unwrap();
    assert_eq!(http_request(admin, "GET", "/config", &[bearer]).0, 401);
    let next = "Authorization: Bearer t0ken-2";
    assert_eq!(http_request(admin, "GET", "/config", &[next]).0, 200);
    proxy.shutdown();
}
