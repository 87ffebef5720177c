//! End-to-end: the proxy in front of a real standalone redis-server, driven by real clients.
#![expect(clippy::unwrap_used, reason = "tests panic on failure")]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use redis::Commands;
use redis_intercept::resp::Frame;
use redis_intercept_e2e::{
    ProxyChild, RedisServer, RespReader, redis_cli, start_proxy, wait_until,
};

fn client(addr: std::net::SocketAddr) -> redis::Connection {
    redis::Client::open(format!("redis://{addr}/"))
        .unwrap()
        .get_connection_with_timeout(Duration::from_secs(5))
        .unwrap()
}

fn bulk(s: &str) -> Frame {
    Frame::Bulk(bytes::Bytes::copy_from_slice(s.as_bytes()))
}

#[test]
fn redis_cli_session_through_the_proxy() {
    let server = RedisServer::start();
    let proxy = start_proxy(server.addr, "");
    let addr = proxy.addr("svc").unwrap();
    assert_eq!(redis_cli(addr, &["PING"]), "PONG\n");
    assert_eq!(redis_cli(addr, &["SET", "greeting", "hello world"]), "OK\n");
    assert_eq!(redis_cli(addr, &["GET", "greeting"]), "hello world\n");
    // The value really is on the server, not in the proxy.
    assert_eq!(server.cmd(&["GET", "greeting"]), bulk("hello world"));
    assert_eq!(redis_cli(addr, &["ECHO", "hi"]), "hi\n");
    assert_eq!(redis_cli(addr, &["SELECT", "0"]), "OK\n");
    assert!(redis_cli(addr, &["SELECT", "99"]).contains("DB index is out of range"));
    assert_eq!(redis_cli(addr, &["WAIT", "0", "0"]), "0\n");
    assert_eq!(
        redis_cli(addr, &["CONFIG", "SET", "maxmemory", "0"]),
        "OK\n"
    );
    assert!(redis_cli(addr, &["DEBUG", "SLEEP", "0"]).contains("'DEBUG SLEEP' is not supported"));
    assert!(redis_cli(addr, &["NOSUCHCMD"]).contains("unknown command"));
    proxy.shutdown();
}

#[test]
fn local_commands_answer_like_redis() {
    let server = RedisServer::start();
    let proxy = start_proxy(server.addr, "");
    let mut c = client(proxy.addr("svc").unwrap());
    let id: i64 = redis::cmd("CLIENT").arg("ID").query(&mut c).unwrap();
    assert!(id > 0);
    let name: Option<String> = redis::cmd("CLIENT").arg("GETNAME").query(&mut c).unwrap();
    assert_eq!(name, None);
    let _: () = redis::cmd("CLIENT")
        .arg("SETNAME")
        .arg("app-1")
        .query(&mut c)
        .unwrap();
    let name: Option<String> = redis::cmd("CLIENT").arg("GETNAME").query(&mut c).unwrap();
    assert_eq!(name.as_deref(), Some("app-1"));
    let err = redis::cmd("CLIENT")
        .arg("SETNAME")
        .arg("has space")
        .query::<()>(&mut c)
        .unwrap_err();
    assert!(err.to_string().contains("cannot contain spaces"), "{err}");
    let hello: Vec<redis::Value> = redis::cmd("HELLO").arg("2").query(&mut c).unwrap();
    assert_eq!(hello.len(), 16);
    // HELLO 3 works (tests/resp3.rs); a protocol Redis doesn't know is refused as Redis does.
    let err = redis::cmd("HELLO")
        .arg("4")
        .query::<()>(&mut c)
        .unwrap_err();
    assert!(err.to_string().contains("NOPROTO"), "{err}");
    let pong: String = redis::cmd("PING").arg("x").query(&mut c).unwrap();
    assert_eq!(pong, "x");
    let err = redis::cmd("PING")
        .arg("a")
        .arg("b")
        .query::<()>(&mut c)
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("wrong number of arguments for 'ping'"),
        "{err}"
    );

    // QUIT answers OK and closes after earlier replies.
    let mut raw = TcpStream::connect(proxy.addr("svc").unwrap()).unwrap();
    raw.write_all(b"*1\r\n$4\r\nPING\r\n*1\r\n$4\r\nQUIT\r\n*1\r\n$4\r\nPING\r\n")
        .unwrap();
    let mut all = Vec::new();
    raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    raw.read_to_end(&mut all).unwrap();
    assert_eq!(all, b"+PONG\r\n+OK\r\n");
    proxy.shutdown();
}

#[test]
fn inline_commands_are_served() {
    let server = RedisServer::start();
    let proxy = start_proxy(server.addr, "");
    let addr = proxy.addr("svc").unwrap();
    let mut c = RespReader::connect(addr);
    c.send(b"SET \"two words\" v\r\nSET k \"a\\x41\"\r\nGET k\r\nPING\n");
    assert_eq!(c.read(), Frame::Simple("OK".into()));
    assert_eq!(c.read(), Frame::Simple("OK".into()));
    assert_eq!(c.read(), bulk("aA"));
    assert_eq!(c.read(), Frame::Simple("PONG".into()));
    assert_eq!(server.cmd(&["GET", "two words"]), bulk("v"));
    // Unbalanced quotes are a protocol error, as in Redis: error reply, then close.
    let mut bad = TcpStream::connect(addr).unwrap();
    bad.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    bad.write_all(b"SET 'it''s' v\r\n").unwrap();
    let mut all = Vec::new();
    bad.read_to_end(&mut all).unwrap();
    assert_eq!(
        all,
        b"-ERR Protocol error: unbalanced quotes in request\r\n"
    );
    proxy.shutdown();
}

#[test]
fn pipeline_of_10000_commands_keeps_order() {
    let server = RedisServer::start();
    let proxy = start_proxy(server.addr, "max_pipeline = 256");
    let mut c = client(proxy.addr("svc").unwrap());
    let mut pipe = redis::pipe();
    for i in 0..10_000 {
        if i % 2 == 0 {
            pipe.cmd("SET").arg(format!("k{i}")).arg(i);
        } else {
            // INCR of the key set just before: only correct if order is kept.
            pipe.cmd("INCR").arg(format!("k{}", i - 1));
        }
    }
    let replies: Vec<redis::Value> = pipe.query(&mut c).unwrap();
    assert_eq!(replies.len(), 10_000);
    for (i, r) in replies.iter().enumerate() {
        if i % 2 == 0 {
            assert_eq!(*r, redis::Value::Okay, "reply {i}");
        } else {
            assert_eq!(*r, redis::Value::Int(i as i64), "reply {i}");
        }
    }
    proxy.shutdown();
}

#[test]
fn local_and_forwarded_replies_interleave_in_request_order() {
    let server = RedisServer::start();
    let proxy = start_proxy(server.addr, "");
    let mut c = RespReader::connect(proxy.addr("svc").unwrap());
    // Local replies are ready at once while earlier forwarded ones are still in flight.
    let mut batch = Vec::new();
    for i in 0..300 {
        batch.extend_from_slice(
            format!("SET k{i} {i}\r\nPING\r\nGET k{i}\r\nECHO e{i}\r\nSELECT 99\r\n").as_bytes(),
        );
    }
    c.send(&batch);
    for i in 0..300 {
        assert_eq!(c.read(), Frame::Simple("OK".into()), "SET {i}");
        assert_eq!(c.read(), Frame::Simple("PONG".into()), "PING {i}");
        assert_eq!(c.read(), bulk(&i.to_string()), "GET {i}");
        assert_eq!(c.read(), bulk(&format!("e{i}")), "ECHO {i}");
        assert!(matches!(c.read(), Frame::Error(_)), "SELECT {i}");
    }
    proxy.shutdown();
}

#[test]
fn hello_with_auth_and_setname() {
    let server = RedisServer::start();
    let proxy = start_proxy(server.addr, "");
    let mut c = RespReader::connect(proxy.addr("svc").unwrap());
    c.send(b"HELLO 2 AUTH default whatever SETNAME app-7\r\nCLIENT GETNAME\r\nHELLO 2 BOGUS\r\n");
    match c.read() {
        Frame::Array(items) => {
            assert!(items.contains(&bulk("proto")) && items.contains(&Frame::Integer(2)))
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(c.read(), bulk("app-7"));
    assert!(matches!(c.read(), Frame::Error(e) if e.starts_with(b"ERR Syntax error in HELLO")));
    proxy.shutdown();
}

#[test]
fn redis_cli_pipe_mode_loads_data() {
    let server = RedisServer::start();
    let proxy = start_proxy(server.addr, "");
    let addr = proxy.addr("svc").unwrap();
    let mut input = String::new();
    for i in 0..20_000 {
        input.push_str(&format!(
            "*3\r\n$3\r\nSET\r\n${}\r\npipe:{i}\r\n$1\r\nv\r\n",
            5 + i.to_string().len()
        ));
    }
    let mut child = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &addr.port().to_string(), "--pipe"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("errors: 0, replies: 20000"), "{text}");
    assert_eq!(server.cmd(&["DBSIZE"]), Frame::Integer(20_000));
    proxy.shutdown();
}

#[test]
fn large_values_pass_intact() {
    let server = RedisServer::start();
    let proxy = start_proxy(server.addr, "");
    let mut c = client(proxy.addr("svc").unwrap());
    let value: Vec<u8> = (0..12 * 1024 * 1024)
        .map(|i: u32| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let _: () = c.set("big", &value).unwrap();
    let back: Vec<u8> = c.get("big").unwrap();
    assert!(back == value, "12 MiB value came back different");
    let len: usize = redis::cmd("STRLEN").arg("big").query(&mut c).unwrap();
    assert_eq!(len, value.len());
    proxy.shutdown();
}

#[test]
fn hundred_concurrent_clients_get_their_own_replies() {
    let server = RedisServer::start();
    let proxy = start_proxy(server.addr, "");
    let addr = proxy.addr("svc").unwrap();
    let threads: Vec<_> = (0..100)
        .map(|t| {
            std::thread::spawn(move || {
                let mut c = client(addr);
                for i in 0..200 {
                    let key = format!("c{t}:{i}");
                    let val = format!("v{t}-{i}");
                    let _: () = c.set(&key, &val).unwrap();
                    let got: String = c.get(&key).unwrap();
                    assert_eq!(got, val);
                    let echoed: String = redis::cmd("ECHO").arg(&val).query(&mut c).unwrap();
                    assert_eq!(echoed, val);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(server.cmd(&["DBSIZE"]), Frame::Integer(20_000));
    proxy.shutdown();
}

#[test]
fn clients_share_a_few_upstream_connections() {
    let server = RedisServer::start();
    let proxy = start_proxy(server.addr, "");
    let addr = proxy.addr("svc").unwrap();
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(101));
    let threads: Vec<_> = (0..100)
        .map(|t| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let mut c = client(addr);
                let _: () = c.set(format!("s{t}"), t).unwrap();
                // Everyone is connected at once while the server is asked.
                barrier.wait();
                barrier.wait();
                let v: i64 = c.get(format!("s{t}")).unwrap();
                assert_eq!(v, t);
            })
        })
        .collect();
    barrier.wait();
    let info = match server.cmd(&["INFO", "clients"]) {
        Frame::Bulk(b) => String::from_utf8_lossy(&b).into_owned(),
        other => panic!("{other:?}"),
    };
    let connected: usize = info
        .lines()
        .find_map(|l| l.strip_prefix("connected_clients:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap();
    barrier.wait();
    for t in threads {
        t.join().unwrap();
    }
    // 2 workers × 1 connection per node, plus the INFO connection itself.
    assert!(
        connected <= 3,
        "{connected} upstream connections for 100 clients"
    );
    proxy.shutdown();
}

#[test]
fn upstream_restart_gives_errors_then_recovers() {
    let mut server = RedisServer::start();
    let proxy = start_proxy(server.addr, "op_timeout = \"1s\"");
    let mut c = client(proxy.addr("svc").unwrap());
    let _: () = c.set("a", "1").unwrap();
    server.kill();
    let start = Instant::now();
    let err = c.get::<_, String>("a").unwrap_err();
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "error took {:?}",
        start.elapsed()
    );
    assert!(err.to_string().contains("unavailable"), "{err}");
    server.restart();
    // The same client connection recovers once the proxy reconnects.
    wait_until(Duration::from_secs(5), || {
        c.set::<_, _, ()>("a", "2").is_ok()
    });
    let v: String = c.get("a").unwrap();
    assert_eq!(v, "2");
    proxy.shutdown();
}

#[test]
fn upstream_down_at_start_answers_with_an_error_not_a_hang() {
    let port = redis_intercept_e2e::free_port();
    let proxy = start_proxy(std::net::SocketAddr::from(([127, 0, 0, 1], port)), "");
    let mut c = client(proxy.addr("svc").unwrap());
    let start = Instant::now();
    let err = c.get::<_, String>("a").unwrap_err();
    assert!(start.elapsed() < Duration::from_secs(2));
    assert!(
        err.to_string().contains("unavailable") || err.to_string().contains("not connected"),
        "{err}"
    );
    proxy.shutdown();
}

#[test]
fn op_timeout_answers_when_the_server_hangs() {
    let server = RedisServer::start();
    let proxy = start_proxy(server.addr, "op_timeout = \"300ms\"");
    let mut c = client(proxy.addr("svc").unwrap());
    let _: () = c.set("a", "1").unwrap();
    let pid = server.pid().unwrap().to_string();
    assert!(
        Command::new("kill")
            .args(["-STOP", &pid])
            .status()
            .unwrap()
            .success()
    );
    let start = Instant::now();
    let err = c.get::<_, String>("a").unwrap_err();
    let waited = start.elapsed();
    assert!(
        Command::new("kill")
            .args(["-CONT", &pid])
            .status()
            .unwrap()
            .success()
    );
    assert!(err.to_string().contains("timed out"), "{err}");
    assert!(
        waited >= Duration::from_millis(250) && waited < Duration::from_secs(2),
        "{waited:?}"
    );
    wait_until(Duration::from_secs(5), || {
        c.get::<_, String>("a").is_ok_and(|v| v == "1")
    });
    proxy.shutdown();
}

#[test]
fn malformed_input_closes_only_that_client() {
    let server = RedisServer::start();
    let proxy = start_proxy(server.addr, "");
    let addr = proxy.addr("svc").unwrap();
    let mut good = client(addr);
    let _: () = good.set("k", "v").unwrap();
    for garbage in [&b"*2\r\n:1\r\n"[..], b"*1\r\n$-5\r\n", b"*x\r\n"] {
        let mut bad = TcpStream::connect(addr).unwrap();
        bad.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        bad.write_all(garbage).unwrap();
        let mut reply = Vec::new();
        bad.read_to_end(&mut reply).unwrap();
        let text = String::from_utf8_lossy(&reply);
        assert!(text.starts_with("-ERR Protocol error: "), "{text}");
    }
    let v: String = good.get("k").unwrap();
    assert_eq!(v, "v");
    proxy.shutdown();
}

/// Reads what the proxy sends until it closes the connection; returns the byte count.
/// Panics if it is still open after 30 s without data.
fn read_until_disconnected(slow: &mut TcpStream) -> usize {
    slow.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut sink = vec![0u8; 1 << 20];
    let mut received = 0usize;
    loop {
        match slow.read(&mut sink) {
            Ok(0) => return received,
            Ok(n) => received += n,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return received,
            Err(e) => panic!("the slow client was not disconnected: {e} after {received} bytes"),
        }
    }
}

#[test]
fn slow_reader_is_disconnected_and_others_are_not_affected() {
    let server = RedisServer::start();
    let proxy = start_proxy(server.addr, "max_client_buffer = \"1MiB\"");
    let addr = proxy.addr("svc").unwrap();
    let mut good = client(addr);
    let _: () = good.set("blob", vec![b'x'; 100 * 1024]).unwrap();
    let mut slow = TcpStream::connect(addr).unwrap();
    let mut req = Vec::new();
    for _ in 0..500 {
        req.extend_from_slice(b"*2\r\n$3\r\nGET\r\n$4\r\nblob\r\n");
    }
    // Don't read for a while: 500 × 100 KiB of replies can't fit in the socket buffers plus
    // the 1 MiB limit, so the proxy must give up on this client.
    let _ = slow.write_all(&req);
    std::thread::sleep(Duration::from_secs(2));
    let received = read_until_disconnected(&mut slow);
    assert!(
        received < 500 * 100 * 1024,
        "the slow client got every reply ({received} bytes)"
    );
    let v: Vec<u8> = good.get("blob").unwrap();
    assert_eq!(v.len(), 100 * 1024);
    proxy.shutdown();
}

/// Sends `n` pipelined `GET blob` and doesn't read.
fn pipeline_gets(addr: std::net::SocketAddr, n: usize) -> TcpStream {
    let mut c = TcpStream::connect(addr).unwrap();
    c.write_all(&b"*2\r\n$3\r\nGET\r\n$4\r\nblob\r\n".repeat(n))
        .unwrap();
    c
}

#[test]
fn replies_for_a_slow_or_departed_client_stay_within_max_client_buffer() {
    // The proxy as a process of its own, so that its peak memory is its alone.
    let server = RedisServer::start();
    let mut blob = RespReader::connect(server.addr);
    let value = "x".repeat(256 << 10);
    assert_eq!(
        blob.call(&["SET", "blob", &value]),
        redis_intercept_e2e::ok()
    );
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], redis_intercept_e2e::free_port()));
    let proxy = ProxyChild::start(
        &format!(
            "[proxy]\nworkers = 1\n\n[[upstream]]\nname = \"main\"\nmode = \"standalone\"\n\
             nodes = [\"{}\"]\n\n[[service]]\nname = \"svc\"\nlisten = \"{addr}\"\n\
             upstream = \"main\"\nmax_client_buffer = \"1MiB\"\nop_timeout = \"60s\"\n",
            server.addr
        ),
        addr,
    );
    let base = proxy.status_kib("VmRSS");
    // 1000 replies of 256 KiB are owed to each of these clients (max_pipeline is 1024). The
    // first never reads and is disconnected at 1 MiB; the second leaves at once. Redis sends
    // every reply all the same, and the proxy must drop what nobody will read as it arrives.
    let mut slow = pipeline_gets(addr, 1000);
    std::thread::sleep(Duration::from_secs(1));
    let received = read_until_disconnected(&mut slow);
    assert!(received < 1000 << 18, "the slow client got every reply");
    drop(pipeline_gets(addr, 1000));
    // Both backlogs are through once a request behind them on a new connection is answered
    // (one shared upstream connection, in order).
    let mut after = RespReader::connect(addr);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(after.call(&["STRLEN", "blob"]), Frame::Integer(256 << 10));
    let peak = proxy.status_kib("VmHWM");
    let grown = peak.saturating_sub(base);
    // 1 MiB of limit, a reply being read and a 64 KiB read chunk, plus allocator slack;
    // keeping the replies would take 250 MiB per client.
    assert!(
        grown < 32 << 10,
        "peak RSS grew by {} MiB (from {} MiB)",
        grown >> 10,
        base >> 10
    );
    // And it still serves big replies.
    let mut good = client(addr);
    let v: Vec<u8> = good.get("blob").unwrap();
    assert_eq!(v.len(), 256 << 10);
}

#[test]
fn max_clients_refuses_with_redis_error() {
    let server = RedisServer::start();
    let proxy = start_proxy(server.addr, "max_clients = 2");
    let addr = proxy.addr("svc").unwrap();
    // The start-up probe's connection may hold a place for a moment after it closed.
    let connect = || {
        let mut slot = None;
        wait_until(Duration::from_secs(5), || {
            slot = redis::Client::open(format!("redis://{addr}/"))
                .unwrap()
                .get_connection_with_timeout(Duration::from_secs(5))
                .ok();
            slot.is_some()
        });
        slot.unwrap()
    };
    let mut a = connect();
    let mut b = connect();
    let _: () = a.set("x", "1").unwrap();
    let _: () = b.set("y", "1").unwrap();
    let mut third = TcpStream::connect(addr).unwrap();
    third
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut reply = Vec::new();
    let _ = third.read_to_end(&mut reply);
    assert_eq!(reply, b"-ERR max number of clients reached\r\n");
    drop(a);
    // The freed place is taken back.
    wait_until(Duration::from_secs(5), || {
        redis::Client::open(format!("redis://{addr}/"))
            .unwrap()
            .get_connection()
            .is_ok_and(|mut c| c.get::<_, String>("x").is_ok())
    });
    proxy.shutdown();
}

#[test]
fn idle_clients_are_closed_when_configured() {
    let server = RedisServer::start();
    let proxy = start_proxy(server.addr, "idle_timeout = \"300ms\"");
    let mut raw = TcpStream::connect(proxy.addr("svc").unwrap()).unwrap();
    raw.write_all(b"PING\r\n").unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let start = Instant::now();
    let mut all = Vec::new();
    raw.read_to_end(&mut all).unwrap();
    assert_eq!(all, b"+PONG\r\n");
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(250) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
    proxy.shutdown();
}

#[test]
fn redis_benchmark_runs_clean_through_the_proxy() {
    let server = RedisServer::start();
    let proxy = start_proxy(server.addr, "");
    let addr = proxy.addr("svc").unwrap();
    for pipeline in ["1", "16"] {
        let out = Command::new("redis-benchmark")
            .args(["-h", "127.0.0.1", "-p", &addr.port().to_string()])
            .args([
                "-t", "set,get", "-n", "20000", "-c", "20", "-r", "1000", "-d", "64", "-P",
                pipeline, "-q",
            ])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{text}");
        assert!(text.contains("SET:") && text.contains("GET:"), "{text}");
    }
    match server.cmd(&["DBSIZE"]) {
        Frame::Integer(n) => assert!(n > 500, "only {n} keys written"),
        other => panic!("{other:?}"),
    }
    proxy.shutdown();
}

#[test]
fn shutdown_delivers_owed_replies() {
    let server = RedisServer::start();
    let proxy = start_proxy(server.addr, "");
    let addr = proxy.addr("svc").unwrap();
    let mut c = client(addr);
    let _: () = c.set("k", "v").unwrap();
    proxy.shutdown();
    // The listener is gone after shutdown.
    assert!(TcpStream::connect(addr).is_err());
}

#[test]
fn reads_go_to_the_configured_replicas_in_the_selected_database() {
    let a = RedisServer::start();
    let b = RedisServer::start_with(&["--replicaof", "127.0.0.1", &a.addr.port().to_string()]);
    let proxy = redis_intercept_e2e::start_proxy_full(
        a.addr,
        "",
        &format!("replicas = [\"{}\"]", b.addr),
        "read_policy = \"replica\"",
    );
    let mut c = RespReader::connect(proxy.addr("svc").unwrap());
    assert_eq!(c.call(&["SET", "k0", "v0"]), Frame::Simple("OK".into()));
    wait_until(Duration::from_secs(10), || {
        b.cmd(&["GET", "k0"]) == bulk("v0")
    });
    let (on_a, on_b) = (a.calls("get"), b.calls("get"));
    for _ in 0..5 {
        assert_eq!(c.call(&["GET", "k0"]), bulk("v0"));
    }
    assert_eq!((a.calls("get"), b.calls("get")), (on_a, on_b + 5));
    // Another database: its writes go to the master, its reads to the replica's same
    // database (the replica's connections select it too).
    assert_eq!(c.call(&["SELECT", "2"]), Frame::Simple("OK".into()));
    assert_eq!(c.call(&["SET", "k", "v2"]), Frame::Simple("OK".into()));
    wait_until(Duration::from_secs(5), || {
        c.call(&["GET", "k"]) == bulk("v2")
    });
    assert_eq!(c.call(&["GET", "k0"]), Frame::NullBulk);
    assert_eq!(a.calls("get"), on_a);
    proxy.shutdown();
}
