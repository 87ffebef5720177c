//! `cargo xtask demo`: a local redis-server, the proxy in front of it, and a scripted
//! redis-cli session through the proxy. Everything it starts, it stops.

use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use redis_intercept_e2e::{RedisServer, free_port};

use crate::setup::{run, say};

/// The proxy binary, built in release mode.
pub fn build_proxy(root: &Path) -> Result<std::path::PathBuf> {
    say("building redis-intercept (release)");
    run(
        Command::new("cargo").current_dir(root).args([
            "build",
            "--release",
            "--quiet",
            "-p",
            "redis-intercept",
        ]),
        "cargo build --release",
    )?;
    Ok(root.join("target/release/redis-intercept"))
}

/// A proxy process, stopped with SIGTERM (a graceful drain) when dropped.
pub struct ProxyProcess {
    /// The child process.
    pub child: Child,
    /// Where it listens.
    pub addr: SocketAddr,
}

impl ProxyProcess {
    /// Starts `bin run --listen <free port> --upstream <upstream>` with `extra` arguments and
    /// waits until it accepts connections.
    pub fn start(bin: &Path, upstream: SocketAddr, extra: &[&str]) -> Result<ProxyProcess> {
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let mut args = vec![
            "run".to_owned(),
            "--listen".to_owned(),
            addr.to_string(),
            "--upstream".to_owned(),
            upstream.to_string(),
        ];
        args.extend(extra.iter().map(|a| (*a).to_owned()));
        Self::spawn(bin, addr, &args)
    }

    /// Starts `bin run --config FILE` for config text whose only service listens on `addr`.
    /// The file lives in `dir`, which must outlive the proxy.
    pub fn start_config(
        bin: &Path,
        dir: &Path,
        addr: SocketAddr,
        toml: &str,
    ) -> Result<ProxyProcess> {
        let file = dir.join(format!("proxy-{}.toml", addr.port()));
        std::fs::write(&file, toml).with_context(|| format!("write {}", file.display()))?;
        Self::spawn(
            bin,
            addr,
            &[
                "run".to_owned(),
                "--config".to_owned(),
                file.display().to_string(),
            ],
        )
    }

    fn spawn(bin: &Path, addr: SocketAddr, args: &[String]) -> Result<ProxyProcess> {
        let child = Command::new(bin)
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("start {}", bin.display()))?;
        let proxy = ProxyProcess { child, addr };
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(addr).is_err() {
            if Instant::now() > deadline {
                bail!("the proxy did not listen on {addr} within 10s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(proxy)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn cli(addr: SocketAddr, args: &[&str]) -> Result<String> {
    let out = Command::new("redis-cli")
        .args(["-h", &addr.ip().to_string(), "-p", &addr.port().to_string()])
        .args(args)
        .output()
        .context("run redis-cli")?;
    Ok(String::from_utf8_lossy(&out.stdout).trim_end().to_owned())
}

fn show(label: &str, addr: SocketAddr, args: &[&str]) -> Result<String> {
    let out = cli(addr, args)?;
    println!("{label}$ redis-cli -p {} {}", addr.port(), args.join(" "));
    for line in out.lines() {
        println!("    {line}");
    }
    Ok(out)
}

/// Runs the demo.
pub fn demo(root: &Path) -> Result<()> {
    let bin = build_proxy(root)?;
    say("starting a local redis-server");
    let server = RedisServer::start();
    let proxy = ProxyProcess::start(&bin, server.addr, &["--workers", "1"])?;
    say(&format!(
        "redis-server on {}, redis-intercept on {} in front of it",
        server.addr, proxy.addr
    ));
    println!();
    println!("Through the proxy:");
    let p = proxy.addr;
    show("proxy ", p, &["PING"])?;
    show("proxy ", p, &["SET", "user:1", "alice"])?;
    show("proxy ", p, &["GET", "user:1"])?;
    show("proxy ", p, &["INCRBY", "visits", "3"])?;
    show("proxy ", p, &["MSET", "a", "1", "b", "2"])?;
    show("proxy ", p, &["MGET", "a", "b", "user:1"])?;
    show("proxy ", p, &["CLIENT", "ID"])?;
    show("proxy ", p, &["SELECT", "1"])?;
    show("proxy ", p, &["MULTI"])?;
    println!();
    println!("Straight to Redis, to show where the data went:");
    let direct = show("redis ", server.addr, &["GET", "user:1"])?;
    show("redis ", server.addr, &["DBSIZE"])?;
    if direct != "alice" {
        bail!("the value written through the proxy is not in Redis (got {direct:?})");
    }
    println!();
    say("stopping the proxy (SIGTERM, graceful drain) and redis-server");
    drop(proxy);
    drop(server);
    say("demo finished");
    Ok(())
}
