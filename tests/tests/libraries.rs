//! End-to-end with real client libraries, as an app would use them with their default
//! options: node-redis 6 (RESP3 only: it sends `HELLO 3` and never falls back) and redis-py
//! 8 (its default, `protocol=3`, and its client-side cache), each running
//! `tests/clients/app.*` (connect, a pipeline, a transaction, pub/sub, a blocking pop, SCAN,
//! cached reads invalidated by another connection's write) through the proxy with a
//! standalone server behind and with a cluster behind. `cargo xtask test` installs the libraries
//! (`cargo xtask setup` installs node and python).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;

use redis_intercept_e2e::{RedisCluster, RedisServer, start_cluster_proxy, start_proxy};

fn clients_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("clients")
}

/// Runs one app script; panics with its output unless it printed "ok".
fn run_app(what: &str, cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.trim_end().ends_with("ok"),
        "{what} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every library and mode against `addr`; `tag` keeps the runs' keys apart.
fn apps(addr: SocketAddr, tag: &str) {
    let dir = clients_dir();
    assert!(
        dir.join("node_modules/redis").exists(),
        "node-redis is not installed: run `cargo xtask test` (or `cargo xtask setup` and `npm install` in tests/clients)"
    );
    run_app(
        &format!("node-redis ({tag})"),
        Command::new("node")
            .arg(dir.join("app.mjs"))
            .arg(format!("redis://{addr}"))
            .arg(format!("{tag}-node")),
    );
    let py = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/clients/py");
    for mode in ["default", "resp3", "cache"] {
        run_app(
            &format!("redis-py {mode} ({tag})"),
            Command::new("python3")
                .arg(dir.join("app.py"))
                .arg(addr.ip().to_string())
                .arg(addr.port().to_string())
                .arg(format!("{tag}-py-{mode}"))
                .arg(mode)
                .env("PYTHONPATH", &py),
        );
    }
}

#[test]
fn node_redis_and_redis_py_work_through_a_standalone_proxy() {
    let server = RedisServer::start();
    // Straight at Redis first: the scripts themselves are right.
    apps(server.addr, "direct");
    let proxy = start_proxy(server.addr, "");
    apps(proxy.addr("svc").unwrap(), "standalone");
    proxy.shutdown();
}

#[test]
fn node_redis_and_redis_py_work_through_a_cluster_proxy() {
    let cluster = RedisCluster::start(3, 0);
    let seeds: Vec<String> = cluster.addrs().iter().map(ToString::to_string).collect();
    let proxy = start_cluster_proxy(&seeds, "", "");
    apps(proxy.addr("svc").unwrap(), "cluster");
    proxy.shutdown();
}
