//! A test client for interception: joins a cgroup, then either sends one Redis command to an
//! address and prints the reply and the socket's peer address, (with `--bench N`) times N
//! connect+close pairs, or (with `--check N`) pipelines N SETs of values from 1 byte to 70 KB
//! and N GETs of them while reading, and checks every reply in order, or (with `--backlog N`)
//! pipelines N GETs of a 1 MiB value, reads nothing for two seconds while it watches how much
//! its socket holds unread, then reads and checks every reply, or (with `--flood`) sends a
//! `BLPOP` that blocks for three seconds and then 1 MiB SETs for two, without waiting, and
//! prints how much the kernel took.
//!
//! Usage: `ri-probe [--cgroup DIR] ADDR (COMMAND… | --bench N | --check N [--slow] |
//! --backlog N | --flood)`. ADDR may be
//! `[::ffff:127.0.100.1]:6379` for a v4-mapped connect from an IPv6 socket.
#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test tool: failing loudly is the point"
)]

use std::io::{BufRead, BufReader, BufWriter, Read, Write};
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
    if args.get(1).is_some_and(|a| a == "--check") {
        let n: usize = args.get(2).expect("--check N").parse().expect("N");
        check(addr, n, args.get(3).is_some_and(|a| a == "--slow"));
        return;
    }
    if args.get(1).is_some_and(|a| a == "--flood") {
        flood(addr);
        return;
    }
    if args.get(1).is_some_and(|a| a == "--backlog") {
        let n: usize = args.get(2).expect("--backlog N").parse().expect("N");
        backlog(addr, n);
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

/// The value of key `i` in `--check`: sizes from 1 byte to 70 KB, contents that differ by key.
fn value(i: usize) -> Vec<u8> {
    let len = [1, 100, 5000, 70_000][i % 4] + i % 7;
    (0..len).map(|j| b'a' + ((i + j) % 26) as u8).collect()
}

/// `--check N`: one connection; a thread writes N SETs then N GETs through a 64 KiB buffer
/// (so commands straddle writes) while this one reads and checks each reply in order; `slow`
/// pauses a millisecond every 50 replies, so that replies queue up on the socket.
fn check(addr: SocketAddr, n: usize, slow: bool) {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let tag = std::process::id();
    let writer = stream.try_clone().unwrap();
    // A write error (the proxy closed) ends the writing; the reader reports where it ended.
    let sender = std::thread::spawn(move || -> std::io::Result<()> {
        let mut out = BufWriter::with_capacity(64 * 1024, writer);
        for i in 0..n {
            let key = format!("ri-check:{tag}:{i}");
            let v = value(i);
            write!(
                out,
                "*3\r\n$3\r\nSET\r\n${}\r\n{key}\r\n${}\r\n",
                key.len(),
                v.len()
            )?;
            out.write_all(&v)?;
            out.write_all(b"\r\n")?;
        }
        for i in 0..n {
            let key = format!("ri-check:{tag}:{i}");
            write!(out, "*2\r\n$3\r\nGET\r\n${}\r\n{key}\r\n", key.len())?;
        }
        out.flush()
    });
    let mut reader = BufReader::with_capacity(64 * 1024, &stream);
    let mut line = String::new();
    // A connection closed early prints how many replies came, all of them right; a wrong
    // reply panics.
    for i in 0..2 * n {
        if slow && i % 50 == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
        line.clear();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            println!("eof_after={i}");
            return;
        }
        if i < n {
            assert_eq!(line, "+OK\r\n", "reply {i} to SET");
            continue;
        }
        let want = value(i - n);
        assert_eq!(
            line,
            format!("${}\r\n", want.len()),
            "header of GET {}",
            i - n
        );
        let mut got = vec![0; want.len() + 2];
        if reader.read_exact(&mut got).is_err() {
            println!("eof_after={i}");
            return;
        }
        assert!(
            got[..want.len()] == want[..] && &got[want.len()..] == b"\r\n",
            "value of GET {}",
            i - n
        );
    }
    let _ = sender.join();
    println!("checked={n}");
}

/// Bytes `stream`'s socket holds unread as the kernel counts them (`ss`'s `skmem` `r`), which
/// includes what a paired writer queued on it directly.
fn unread(stream: &TcpStream) -> u64 {
    let port = stream.local_addr().unwrap().port();
    let out = std::process::Command::new("ss")
        .args(["-tmnH", &format!("sport = :{port}")])
        .output()
        .expect("run ss");
    let text = String::from_utf8_lossy(&out.stdout);
    let at = text
        .find("skmem:(r")
        .unwrap_or_else(|| panic!("no skmem in ss output: {text}"));
    text[at + 8..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("bad skmem in ss output: {text}"))
}

/// `--backlog N`: sets one 1 MiB value, pipelines N GETs of it and reads nothing for two
/// seconds, printing the most its socket held unread meanwhile (`unread_peak=`), then reads
/// and checks every reply (`checked=N`).
fn backlog(addr: SocketAddr, n: usize) {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let key = format!("ri-backlog:{}", std::process::id());
    let value: Vec<u8> = (0..1usize << 20).map(|j| b'a' + (j % 23) as u8).collect();
    let mut set = format!(
        "*3\r\n$3\r\nSET\r\n${}\r\n{key}\r\n${}\r\n",
        key.len(),
        value.len()
    )
    .into_bytes();
    set.extend_from_slice(&value);
    set.extend_from_slice(b"\r\n");
    (&stream).write_all(&set).unwrap();
    let mut reader = BufReader::with_capacity(1 << 20, &stream);
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert_eq!(line, "+OK\r\n");
    let get = format!("*2\r\n$3\r\nGET\r\n${}\r\n{key}\r\n", key.len());
    (&stream).write_all(get.repeat(n).as_bytes()).unwrap();
    let mut peak = 0;
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(100));
        peak = peak.max(unread(&stream));
    }
    println!("unread_peak={peak}");
    let header = format!("${}\r\n", value.len());
    let mut got = vec![0; value.len() + 2];
    for i in 0..n {
        line.clear();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            println!("eof_after={i}");
            return;
        }
        assert_eq!(line, header, "header of GET {i}");
        reader.read_exact(&mut got).unwrap();
        assert!(
            got[..value.len()] == value[..] && &got[value.len()..] == b"\r\n",
            "value of GET {i}"
        );
    }
    println!("checked={n}");
}

/// `--flood`: a `BLPOP` that blocks for three seconds (the proxy holds the client's later
/// commands behind it), then 1 MiB SETs written without blocking for two seconds; prints the
/// bytes the kernel accepted (`accepted=`), which only back pressure from the proxy's socket
/// bounds.
fn flood(addr: SocketAddr) {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    stream
        .write_all(b"*3\r\n$5\r\nBLPOP\r\n$11\r\nri-no-such-\r\n$1\r\n3\r\n")
        .unwrap();
    let value = vec![b'f'; 1 << 20];
    let mut set = format!("*3\r\n$3\r\nSET\r\n$8\r\nri-flood\r\n${}\r\n", value.len()).into_bytes();
    set.extend_from_slice(&value);
    set.extend_from_slice(b"\r\n");
    stream.set_nonblocking(true).unwrap();
    let (mut accepted, mut at) = (0usize, 0usize);
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(2) {
        match stream.write(&set[at..]) {
            Ok(n) => {
                accepted += n;
                at = (at + n) % set.len();
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("write: {e}"),
        }
    }
    println!("accepted={accepted}");
}
