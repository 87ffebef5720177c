//! The client-side caching rows of `cargo xtask bench`: the same RESP3 GET load through the
//! proxy from clients with `CLIENT TRACKING ON` and from clients without, alternating, and
//! the proxy's CPU per request of each. (redis-benchmark can't turn tracking on, so a small
//! load generator here sends the GETs, one at a time per connection.)

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};

use anyhow::{Context, Result, bail};

use crate::bench::{measured, median};

/// Connections of the generator, each on its own thread.
const CONNECTIONS: usize = 8;

/// Keyspaces the GETs pick from (missing keys: the replies are small, as in the GET rows):
/// a hot set whose table stays in the CPU's caches, and redis-benchmark's `-r 100000`.
const KEYSPACES: [usize; 2] = [1_000, 100_000];

/// Runs `rounds` pairs of `requests` GETs through the proxy at `addr` for each keyspace
/// and prints the proxy's CPU per million requests with tracking off and on, and their ratio.
pub fn tracked_reads(
    proxy_pid: u32,
    addr: SocketAddr,
    rounds: usize,
    requests: usize,
) -> Result<()> {
    println!();
    println!(
        "{:<30} {:>14} {:>14} {:>7}",
        "client-side caching, GET RESP3", "untracked CPU", "tracked CPU", "ratio"
    );
    for keys in KEYSPACES {
        keyspace(proxy_pid, addr, rounds, requests, keys)?;
    }
    println!(
        "(proxy CPU s per million requests, medians; ratio: median over rounds of tracked / untracked, target ≤ 1.10)"
    );
    Ok(())
}

/// One keyspace's row.
fn keyspace(
    proxy_pid: u32,
    addr: SocketAddr,
    rounds: usize,
    requests: usize,
    keys: usize,
) -> Result<()> {
    let mut plain = Vec::new();
    let mut tracked = Vec::new();
    let mut ratios = Vec::new();
    for round in 0..rounds {
        let mut pair = [0.0; 2];
        // Alternate which goes first, so drift on a shared machine hits both.
        let order = if round % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for tracking in order {
            let (_, cpu) = measured(requests, Some(proxy_pid), &[], || {
                generate(addr, tracking, requests, keys)
            })?;
            pair[usize::from(tracking)] = cpu.proxy;
        }
        plain.push(pair[0]);
        tracked.push(pair[1]);
        ratios.push(pair[1] / pair[0]);
    }
    let ratio = median(&mut ratios);
    println!(
        "{:<30} {:>14.2} {:>14.2} {:>7.2}{}",
        format!("{keys} keys"),
        median(&mut plain),
        median(&mut tracked),
        ratio,
        if ratio <= 1.10 { "" } else { " !" }
    );
    Ok(())
}

/// Sends `requests` GETs of `keys` keys over [`CONNECTIONS`] RESP3 connections (with
/// tracking on if `tracking`); returns requests per second.
fn generate(addr: SocketAddr, tracking: bool, requests: usize, keys: usize) -> Result<f64> {
    let started = std::time::Instant::now();
    let per = requests / CONNECTIONS;
    let threads: Vec<_> = (0..CONNECTIONS)
        .map(|c| std::thread::spawn(move || client(addr, tracking, c, per, keys)))
        .collect();
    for t in threads {
        t.join()
            .map_err(|_| anyhow::anyhow!("a generator thread panicked"))??;
    }
    Ok((per * CONNECTIONS) as f64 / started.elapsed().as_secs_f64())
}

/// One connection's GETs.
fn client(addr: SocketAddr, tracking: bool, seed: usize, n: usize, keys: usize) -> Result<()> {
    let mut s = TcpStream::connect(addr).context("connect to the proxy")?;
    s.set_nodelay(true)?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut call = |s: &mut TcpStream, cmd: &[u8]| -> Result<()> {
        s.write_all(cmd)?;
        // Every reply here (a map, +OK, a null) ends its last line within one read, and no
        // pushes come (nothing writes).
        let n = s.read(&mut buf)?;
        if n == 0 {
            bail!("the proxy closed the connection");
        }
        if buf[0] == b'-' {
            bail!("error: {}", String::from_utf8_lossy(&buf[..n]));
        }
        Ok(())
    };
    call(&mut s, b"*2\r\n$5\r\nHELLO\r\n$1\r\n3\r\n")?;
    if tracking {
        call(
            &mut s,
            b"*3\r\n$6\r\nCLIENT\r\n$8\r\nTRACKING\r\n$2\r\nON\r\n",
        )?;
    }
    let mut x = (seed as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    for _ in 0..n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let key = format!("key:{:06}", x % keys as u64);
        let cmd = format!("*2\r\n$3\r\nGET\r\n${}\r\n{key}\r\n", key.len());
        call(&mut s, cmd.as_bytes())?;
    }
    Ok(())
}
