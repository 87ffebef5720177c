//! SELECT on a standalone upstream: each client works in its own database, through shared,
//! dedicated and mirror connections of that database, without moving anyone else.

use std::time::Duration;

use redis_intercept::resp::Frame;
use redis_intercept_e2e::{
    RedisServer, RespReader, bulk, encode, is_err, ok, send_backlog, start_proxy_config, wait_until,
};

/// `GET key` in database `db`, asked of `server` directly.
fn get_in(server: &RedisServer, db: &str, key: &str) -> Frame {
    let mut c = RespReader::connect(server.addr);
    assert_eq!(c.call(&["SELECT", db]), ok());
    c.call(&["GET", key])
}

fn proxy(
    main: &RedisServer,
    copy: &RedisServer,
    upstream_extra: &str,
) -> redis_intercept::app::Proxy {
    start_proxy_config(&format!(
        "[proxy]\nworkers = 2\ndrain_timeout = \"1s\"\n\n\
         [[upstream]]\nname = \"main\"\nmode = \"standalone\"\nnodes = [\"{}\"]\n{upstream_extra}\n\n\
         [[upstream]]\nname = \"copy\"\nmode = \"standalone\"\nnodes = [\"{}\"]\n\n\
         [[service]]\nname = \"svc\"\nlisten = \"127.0.0.1:0\"\nupstream = \"main\"\n\n\
         [[service.mirror]]\nupstream = \"copy\"\nexclude_reads = true\nbatch_delay = \"0s\"\n",
        main.addr, copy.addr
    ))
}

#[test]
fn select_moves_one_client_to_its_database() {
    let main = RedisServer::start();
    let copy = RedisServer::start();
    let proxy = proxy(&main, &copy, "");
    let addr = proxy.addr("svc").unwrap();
    let mut a = RespReader::connect(addr);
    let mut b = RespReader::connect(addr);
    assert_eq!(a.call(&["SET", "k", "zero"]), ok());
    assert_eq!(a.call(&["SELECT", "2"]), ok());
    assert_eq!(a.call(&["GET", "k"]), Frame::NullBulk);
    assert_eq!(a.call(&["SET", "k", "two"]), ok());
    // The other client (maybe on the same worker and shared connection) stays in 0.
    assert_eq!(b.call(&["GET", "k"]), bulk("zero"));
    assert_eq!(get_in(&main, "2", "k"), bulk("two"));
    assert_eq!(get_in(&main, "0", "k"), bulk("zero"));
    // The mirror's copy went to the same database.
    wait_until(Duration::from_secs(5), || {
        get_in(&copy, "2", "k") == bulk("two")
    });
    assert_eq!(get_in(&copy, "0", "k"), bulk("zero"));
    // Pipelined across SELECTs: each command runs in the database selected before it.
    a.send(
        &[
            encode(&["SELECT", "3"]),
            encode(&["SET", "x", "three"]),
            encode(&["SELECT", "0"]),
            encode(&["GET", "x"]),
            encode(&["GET", "k"]),
        ]
        .concat(),
    );
    for _ in 0..3 {
        assert_eq!(a.read(), ok());
    }
    assert_eq!(a.read(), Frame::NullBulk);
    assert_eq!(a.read(), bulk("zero"));
    assert_eq!(get_in(&main, "3", "x"), bulk("three"));
    // Transactions and blocking commands run in the client's database too.
    assert_eq!(a.call(&["SELECT", "2"]), ok());
    assert_eq!(a.call(&["MULTI"]), ok());
    assert_eq!(a.call(&["INCR", "n"]), Frame::Simple("QUEUED".into()));
    assert_eq!(a.call(&["EXEC"]), Frame::Array(vec![Frame::Integer(1)]));
    assert_eq!(get_in(&main, "2", "n"), bulk("1"));
    a.send(&encode(&["BLPOP", "q", "5"]));
    assert_eq!(b.call(&["SELECT", "2"]), ok());
    wait_until(
        Duration::from_secs(5),
        || matches!(main.cmd(&["INFO", "clients"]), Frame::Bulk(s) if String::from_utf8_lossy(&s).contains("blocked_clients:1")),
    );
    assert_eq!(b.call(&["LPUSH", "q", "item"]), Frame::Integer(1));
    assert_eq!(a.read(), Frame::Array(vec![bulk("q"), bulk("item")]));
    // SELECT during WATCH would change the watched connection's database: refused.
    assert_eq!(a.call(&["WATCH", "k"]), ok());
    assert!(is_err(&a.call(&["SELECT", "1"]), "SELECT while a WATCH"));
    assert_eq!(a.call(&["UNWATCH"]), ok());
    // RESET goes back to database 0, as in Redis.
    assert_eq!(a.call(&["RESET"]), Frame::Simple("RESET".into()));
    assert_eq!(a.call(&["GET", "k"]), bulk("zero"));
    proxy.shutdown();
}

#[test]
fn select_outside_the_configured_databases_gets_redis_error() {
    let main = RedisServer::start();
    let copy = RedisServer::start();
    let proxy = proxy(&main, &copy, "databases = 4");
    let mut c = RespReader::connect(proxy.addr("svc").unwrap());
    assert_eq!(c.call(&["SELECT", "3"]), ok());
    for db in ["4", "-1", "99999999999"] {
        let reply = c.call(&["SELECT", db]);
        assert!(
            is_err(&reply, "DB index is out of range"),
            "{db}: {reply:?}"
        );
    }
    let reply = c.call(&["SELECT", "one"]);
    assert!(is_err(&reply, "value is not an integer"), "{reply:?}");
    // Still in 3.
    assert_eq!(c.call(&["SET", "w", "3"]), ok());
    assert_eq!(get_in(&main, "3", "w"), bulk("3"));
    proxy.shutdown();
}

#[test]
fn select_waits_for_the_commands_sent_before_it() {
    let main = RedisServer::start();
    // One worker with one shared connection: a busy client's backlog sits in front of MOVE.
    let proxy = start_proxy_config(&format!(
        "[proxy]\nworkers = 1\ndrain_timeout = \"1s\"\n\n\
         [[upstream]]\nname = \"main\"\nmode = \"standalone\"\nnodes = [\"{}\"]\n\n\
         [[service]]\nname = \"svc\"\nlisten = \"127.0.0.1:0\"\nupstream = \"main\"\n",
        main.addr
    ));
    let addr = proxy.addr("svc").unwrap();
    let mut c = RespReader::connect(addr);
    assert_eq!(c.call(&["SET", "m", "moved"]), ok());
    assert_eq!(c.call(&["SELECT", "5"]), ok());
    assert_eq!(c.call(&["SELECT", "0"]), ok());
    let mut busy = RespReader::connect(addr);
    send_backlog(&mut busy);
    // MOVE goes out behind 64 MB on database 0's connection, GET on database 5's: only the
    // wait at SELECT makes GET see the moved key.
    c.send(
        &[
            encode(&["MOVE", "m", "5"]),
            encode(&["SELECT", "5"]),
            encode(&["GET", "m"]),
        ]
        .concat(),
    );
    assert_eq!(c.read(), Frame::Integer(1));
    assert_eq!(c.read(), ok());
    assert_eq!(c.read(), bulk("moved"));
    for _ in 0..1000 {
        assert_eq!(busy.read(), ok());
    }
    assert_eq!(get_in(&main, "5", "m"), bulk("moved"));
    proxy.shutdown();
}

#[test]
fn swapdb_swaps_for_every_client_as_redis_does() {
    let main = RedisServer::start();
    let copy = RedisServer::start();
    let proxy = proxy(&main, &copy, "");
    let addr = proxy.addr("svc").unwrap();
    let mut two = RespReader::connect(addr);
    let mut zero = RespReader::connect(addr);
    assert_eq!(two.call(&["SELECT", "2"]), ok());
    assert_eq!(two.call(&["SET", "s", "in-two"]), ok());
    assert_eq!(zero.call(&["SET", "s", "in-zero"]), ok());
    assert_eq!(zero.call(&["SWAPDB", "0", "2"]), ok());
    // Both clients keep their database numbers and see the other's data now.
    assert_eq!(zero.call(&["GET", "s"]), bulk("in-two"));
    assert_eq!(two.call(&["GET", "s"]), bulk("in-zero"));
    assert_eq!(get_in(&main, "0", "s"), bulk("in-two"));
    // Redis checks the numbers itself.
    assert!(is_err(
        &zero.call(&["SWAPDB", "0", "99"]),
        "ERR DB index is out of range"
    ));
    proxy.shutdown();
}
