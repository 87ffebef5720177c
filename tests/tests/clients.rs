//! End-to-end: CLIENT LIST, CLIENT INFO, CLIENT SETINFO and CLIENT KILL through the proxy
//! describe and act on the proxy's own clients (across its workers), in Redis's line format,
//! and never on the proxy's connections to Redis.

use std::io::Read;
use std::time::Duration;

use redis_intercept::resp::Frame;
use redis_intercept_e2e::{RedisServer, RespReader, is_err, ok, start_proxy};

fn text(f: Frame) -> String {
    match f {
        Frame::Bulk(b) => String::from_utf8_lossy(&b).into_owned(),
        // RESP3: `txt:` first.
        Frame::Verbatim(b) => String::from_utf8_lossy(&b[4..]).into_owned(),
        other => panic!("{other:?}"),
    }
}

/// The `name=value` fields of a CLIENT LIST line.
fn fields(line: &str) -> Vec<(String, String)> {
    line.split_whitespace()
        .filter_map(|f| f.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn field(line: &str, name: &str) -> String {
    fields(line)
        .into_iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v)
        .unwrap_or_else(|| panic!("no {name} in {line}"))
}

#[test]
fn client_list_info_and_kill_act_on_the_proxys_clients() {
    let server = RedisServer::start();
    // Two workers (the helper's): the clients may land on either.
    let proxy = start_proxy(server.addr, "");
    let addr = proxy.addr("svc").unwrap();
    let mut a = RespReader::connect(addr);
    let mut b = RespReader::connect(addr);
    assert_eq!(a.call(&["CLIENT", "SETNAME", "app-a"]), ok());
    assert_eq!(a.call(&["CLIENT", "SETINFO", "LIB-NAME", "redis-py"]), ok());
    assert_eq!(a.call(&["CLIENT", "SETINFO", "LIB-VER", "8.2.0"]), ok());
    assert_eq!(a.call(&["SELECT", "3"]), ok());
    b.call(&["HELLO", "3"]);
    assert_eq!(b.call(&["GET", "k"]), Frame::Null);
    let Frame::Integer(a_id) = a.call(&["CLIENT", "ID"]) else {
        panic!("CLIENT ID");
    };
    let Frame::Integer(b_id) = b.call(&["CLIENT", "ID"]) else {
        panic!("CLIENT ID");
    };

    // CLIENT INFO: the caller, in the same fields, in the same order, as Redis's own line.
    let info = text(a.call(&["CLIENT", "INFO"]));
    let direct = text(RespReader::connect(server.addr).call(&["CLIENT", "INFO"]));
    let names = |l: &str| fields(l).into_iter().map(|(k, _)| k).collect::<Vec<_>>();
    let ours = names(&info);
    for name in names(&direct) {
        assert!(ours.contains(&name), "{name} missing from {info}");
    }
    assert_eq!(field(&info, "id"), a_id.to_string());
    assert_eq!(field(&info, "name"), "app-a");
    assert_eq!(field(&info, "db"), "3");
    assert_eq!(field(&info, "lib-name"), "redis-py");
    assert_eq!(field(&info, "lib-ver"), "8.2.0");
    assert_eq!(field(&info, "cmd"), "client|info");
    assert_eq!(
        field(&info, "addr"),
        a.stream.local_addr().unwrap().to_string(),
        "the client's own address, not the proxy's upstream one"
    );

    // CLIENT LIST: both clients, whichever worker serves them, and no upstream connection.
    let list = text(b.call(&["CLIENT", "LIST"]));
    let lines: Vec<&str> = list.lines().collect();
    assert!(lines.len() >= 2, "{list}");
    let line_of = |id: i64| {
        lines
            .iter()
            .find(|l| field(l, "id") == id.to_string())
            .unwrap_or_else(|| panic!("no client {id} in {list}"))
            .to_string()
    };
    assert_eq!(field(&line_of(b_id), "resp"), "3");
    assert_eq!(field(&line_of(b_id), "cmd"), "client|list");
    assert_eq!(field(&line_of(a_id), "name"), "app-a");
    assert_eq!(
        text(a.call(&["CLIENT", "LIST", "ID", &b_id.to_string()]))
            .lines()
            .count(),
        1
    );

    // CLIENT KILL: the proxy's upstream connection can't be named.
    let upstream = text(RespReader::connect(server.addr).call(&["CLIENT", "LIST"]));
    let proxy_conn = upstream.lines().map(|l| field(l, "addr")).next().unwrap();
    assert_eq!(
        a.call(&["CLIENT", "KILL", "ADDR", &proxy_conn]),
        Frame::Integer(0)
    );
    assert!(is_err(
        &a.call(&["CLIENT", "KILL", &proxy_conn]),
        "No such client"
    ));
    // By id: the other client's connection ends, this one goes on.
    assert_eq!(
        a.call(&["CLIENT", "KILL", "ID", &b_id.to_string()]),
        Frame::Integer(1)
    );
    b.stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut buf = [0u8; 64];
    assert_eq!(b.stream.read(&mut buf).unwrap_or(0), 0, "killed: closed");
    assert_eq!(a.call(&["PING"]), Frame::Simple("PONG".into()));
    // SKIPME (default yes) spares the caller; the old form by address.
    let mut c = RespReader::connect(addr);
    c.call(&["PING"]);
    let c_addr = c.stream.local_addr().unwrap().to_string();
    assert_eq!(a.call(&["CLIENT", "KILL", &c_addr]), ok());
    let mut buf = [0u8; 64];
    c.stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    assert_eq!(c.stream.read(&mut buf).unwrap_or(0), 0);
    assert_eq!(
        a.call(&["CLIENT", "KILL", "ID", &a_id.to_string()]),
        Frame::Integer(0)
    );
    // Malformed ones get Redis's own errors (those Redis 7.0 and Valkey 8 word alike).
    let mut d = RespReader::connect(server.addr);
    for cmd in [
        &["CLIENT", "KILL", "ID"][..],
        &["CLIENT", "KILL", "ID", "1", "SKIPME"],
        &["CLIENT", "KILL", "TYPE", "foo"],
        &["CLIENT", "KILL", "SKIPME", "maybe"],
        &["CLIENT", "KILL", "NOSUCH", "x"],
        &["CLIENT", "LIST", "TYPE", "foo"],
        &["CLIENT", "LIST", "foo"],
        &["CLIENT", "LIST", "TYPE", "master"],
    ] {
        assert_eq!(
            String::from_utf8_lossy(&a.call_raw(cmd)),
            String::from_utf8_lossy(&d.call_raw(cmd)),
            "{cmd:?}"
        );
    }
    proxy.shutdown();
}
