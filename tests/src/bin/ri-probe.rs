//! A test client for interception: joins a cgroup, then either sends one Redis command to an
//! address and prints the reply and the socket's peer address, or (with `--bench N`) times N
//! connect+close pairs.
//!
//! Usage: `ri-probe [--cgroup DIR] ADDR (COMMAND… | --bench N)`. ADDR may be
//! `[::ffff:127.0.100.1]:6379` for a v4-mapped connect from an IPv6 socket.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test tool: failing loudly is the point"
)]

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().is_some_and(|a| a == "--cgroup") {
        let dir = args.get(1).expect("--cgroup DIR").clone();
        std::fs::write(
            format!("{dir}/cgroup.procs"),
            std::process::id().to_string(),
        )
        .expect("join the cgroup");
        args.drain(..2);
    }
    let addr: SocketAddr = args
        .first()
        .expect("ADDR")
        .parse()
        .expect("ADDR is ip:port");
    if args.get(1).is_some_and(|a| a == "--bench") {
        let n: u32 = args.get(2).expect("--bench N").parse().expect("N");
        // Warm up, then time.
        for _ in 0..100 {
            drop(TcpStream::connect(addr).expect("connect"));
        }
        let start = Instant::now();
        for _ in 0..n {
            drop(TcpStream::connect(addr).expect("connect"));
        }
        let ns = start.elapsed().as_nanos() / u128::from(n.max(1));
        println!("ns_per_connect={ns}");
        return;
    }
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let peer = stream.peer_addr().expect("getpeername");
    println!("peer={peer}");
    let words = &args[1..];
    let mut req = format!("*{}\r\n", words.len());
    for w in words {
        req.push_str(&format!("${}\r\n{w}\r\n", w.len()));
    }
    (&stream).write_all(req.as_bytes()).unwrap();
    let mut reader = BufReader::new(&stream);
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    if line.starts_with('$') && !line.starts_with("$-1") {
        let mut value = String::new();
        reader.read_line(&mut value).unwrap();
        println!("reply={}", value.trim_end());
    } else {
        println!("reply={}", line.trim_end());
    }
}
