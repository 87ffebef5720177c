//! End-to-end: `redis-cli`'s operator modes through the proxy, as against Redis: `--scan`,
//! `--bigkeys`, `--memkeys`, `--stat` and `--latency`, with a standalone server and a
//! cluster behind.

#![expect(clippy::expect_used, reason = "tests panic on failure")]

use std::net::SocketAddr;
use std::process::Command;

use redis_intercept_e2e::{
    RedisCluster, RedisServer, RespReader, redis_cli, start_cluster_proxy, start_proxy,
};

/// Fills the service at `addr`: 40 strings, a list and a hash.
fn fill(addr: SocketAddr) {
    let mut c = RespReader::connect(addr);
    for i in 0..40 {
        c.call(&["SET", &format!("s:{i}"), "value"]);
    }
    c.call(&["RPUSH", "l", "a", "b", "c"]);
    c.call(&["HSET", "h", "f", "v"]);
}

/// `redis-cli` for `secs` seconds at most, its output unbuffered (`--stat` prints a line a
/// second and never ends).
fn cli_for(addr: SocketAddr, secs: u32, args: &[&str]) -> String {
    let out = Command::new("timeout")
        .arg(secs.to_string())
        .args(["stdbuf", "-o0", "redis-cli", "-h", &addr.ip().to_string()])
        .args(["-p", &addr.port().to_string()])
        .args(args)
        .output()
        .expect("run redis-cli");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn modes(addr: SocketAddr, what: &str) {
    fill(addr);
    let scanned = redis_cli(addr, &["--scan"]);
    assert_eq!(scanned.lines().count(), 42, "{what} --scan:\n{scanned}");
    let big = redis_cli(addr, &["--bigkeys"]);
    assert!(
        big.contains("40 strings with 200 bytes"),
        "{what} --bigkeys:\n{big}"
    );
    assert!(
        big.contains("1 lists with 3 items"),
        "{what} --bigkeys:\n{big}"
    );
    assert!(
        big.contains("1 hashs with 1 fields"),
        "{what} --bigkeys:\n{big}"
    );
    let mem = redis_cli(addr, &["--memkeys"]);
    assert!(mem.contains("40 strings with "), "{what} --memkeys:\n{mem}");
    assert!(mem.contains("1 lists with "), "{what} --memkeys:\n{mem}");
    let stat = cli_for(addr, 3, &["--stat", "-i", "0.5"]);
    let rows: Vec<&str> = stat.lines().filter(|l| l.starts_with("42 ")).collect();
    assert!(
        rows.len() >= 2,
        "{what} --stat (a row per interval, 42 keys):\n{stat}"
    );
    let latency = cli_for(addr, 10, &["--latency", "--raw"]);
    let numbers: Vec<f64> = latency
        .split_whitespace()
        .filter_map(|n| n.parse().ok())
        .collect();
    assert_eq!(
        numbers.len(),
        4,
        "{what} --latency: min max avg samples:\n{latency}"
    );
    assert!(numbers[3] > 10.0, "{what} --latency samples: {latency}");
}

#[test]
fn redis_cli_modes_work_as_against_redis() {
    let direct = RedisServer::start();
    modes(direct.addr, "direct");
    let server = RedisServer::start();
    let proxy = start_proxy(server.addr, "");
    modes(proxy.addr("svc").unwrap(), "standalone");
    proxy.shutdown();
    let cluster = RedisCluster::start(3, 0);
    let seeds: Vec<String> = cluster.addrs().iter().map(ToString::to_string).collect();
    let proxy = start_cluster_proxy(&seeds, "", "");
    modes(proxy.addr("svc").unwrap(), "cluster");
    proxy.shutdown();
}
