//! End-to-end: commands the server knows and the proxy's built-in table (Redis 7.0's)
//! doesn't are learned from the server's `COMMAND` when the proxy first connects; those
//! whose flags don't show them safe on a shared connection are refused and never reach the
//! server. (Redis 7.0 has no such command; the Valkey 8.1 pass has several: `CLIENT CAPA`,
//! `COMMANDLOG`, `SCRIPT SHOW`, `WAITAOF`, … `command/learned.rs` unit-tests routing a newer
//! keyed command by its key specs.)

use std::time::Duration;

use redis_intercept::command::{Handling, by_name, learned};
use redis_intercept::resp::Frame;
use redis_intercept_e2e::{RedisServer, RespReader, start_proxy, wait_until};

fn text(f: &Frame) -> String {
    match f {
        Frame::Bulk(b) | Frame::Simple(b) | Frame::Error(b) => {
            String::from_utf8_lossy(b).into_owned()
        }
        other => format!("{other:?}"),
    }
}

#[test]
fn commands_newer_than_the_table_are_learned_and_unsafe_ones_refused() {
    let server = RedisServer::start();
    let Frame::Array(names) = server.cmd(&["COMMAND", "LIST"]) else {
        panic!("COMMAND LIST")
    };
    let unknown: Vec<String> = names
        .iter()
        .map(text)
        .filter(|n| by_name(n).is_none())
        .collect();
    let proxy = start_proxy(server.addr, "");
    let mut c = RespReader::connect(proxy.addr("svc").unwrap());
    assert_eq!(c.call(&["PING"]), Frame::Simple("PONG".into()));
    wait_until(Duration::from_secs(5), || {
        unknown.iter().all(|n| learned::get(n).is_some())
    });
    let mut refused = Vec::new();
    for name in &unknown {
        let cmd = learned::get(name).unwrap();
        if cmd.handling != Handling::Unsupported {
            continue;
        }
        // Enough arguments for its arity, so that only the proxy's refusal can answer.
        let mut args: Vec<&str> = name.split('|').collect();
        while args.len() < usize::from(cmd.info.arity.unsigned_abs()) {
            args.push("x");
        }
        let reply = c.call(&args);
        assert!(
            text(&reply).contains("is not supported by redis-intercept"),
            "{name}: {reply:?}"
        );
        refused.push(name.clone());
    }
    let Frame::Bulk(stats) = server.cmd(&["INFO", "commandstats"]) else {
        panic!("INFO commandstats")
    };
    let stats = String::from_utf8_lossy(&stats);
    for name in &refused {
        assert!(
            !stats.contains(&format!("cmdstat_{name}:")),
            "{name} reached the server:\n{stats}"
        );
    }
    eprintln!("learned {} commands; refused {refused:?}", unknown.len());
    proxy.shutdown();
}
