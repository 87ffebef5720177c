//! `cargo xtask demo`: a local Redis Cluster (3 masters, 3 replicas), the proxy in front of it,
//! and the seed articles' redis-cli session: a plain client writes `a`..`h` through the proxy,
//! and each key is read back from the node that owns its slot. Everything it starts, it stops.

use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use redis_intercept::cluster::{Slot, SlotMap};
use redis_intercept_e2e::{RedisCluster, free_port};

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
    /// Starts `bin run --listen <free port> --upstream <upstream>` (an address, or cluster seeds
    /// separated by commas) with `extra` arguments and waits until it accepts connections.
    pub fn start(bin: &Path, upstream: &str, extra: &[&str]) -> Result<ProxyProcess> {
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let mut args = vec![
            "run".to_owned(),
            "--listen".to_owned(),
            addr.to_string(),
            "--upstream".to_owned(),
            upstream.to_owned(),
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
        let mut command = Command::new(bin);
        command.args(args);
        Self::spawn_command(&mut command, addr)
    }

    /// Starts `command` (a proxy, or `sh -c "… exec proxy …"` so that the pid stays the
    /// proxy's) that listens on `addr`, and waits until it accepts connections.
    pub fn spawn_command(command: &mut Command, addr: SocketAddr) -> Result<ProxyProcess> {
        let child = command
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("start {command:?}"))?;
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

/// Runs `commands` (one per line) through one redis-cli connection, as a user typing them,
/// and prints the session.
fn show_session(label: &str, addr: SocketAddr, commands: &[&str]) -> Result<String> {
    use std::io::Write;
    let mut child = Command::new("redis-cli")
        .args(["-h", &addr.ip().to_string(), "-p", &addr.port().to_string()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("run redis-cli")?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(format!("{}\n", commands.join("\n")).as_bytes())
            .context("write to redis-cli")?;
    }
    let out = child.wait_with_output().context("run redis-cli")?;
    let out = String::from_utf8_lossy(&out.stdout).trim_end().to_owned();
    println!(
        "{label}$ redis-cli -p {}   (typing: {})",
        addr.port(),
        commands.join("; ")
    );
    for line in out.lines() {
        println!("    {line}");
    }
    Ok(out)
}

/// A directory removed (if empty) when dropped, even when the demo fails half-way.
struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// Whether this process runs as root.
fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// Runs `redis-cli -h VIP …` from a shell that first moves itself into `cgroup`.
fn in_cgroup(cgroup: &Path, vip: SocketAddr, args: &[&str]) -> Result<String> {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo $$ > {}/cgroup.procs && exec redis-cli -h {} -p {} {}",
            cgroup.display(),
            vip.ip(),
            vip.port(),
            args.join(" ")
        ))
        .output()
        .context("run redis-cli in the demo cgroup")?;
    Ok(String::from_utf8_lossy(&out.stdout).trim_end().to_owned())
}

/// Runs the demo.
pub fn demo(root: &Path) -> Result<()> {
    let bin = build_proxy(root)?;
    say("starting a local Redis Cluster: 3 masters + 3 replicas (redis-cli --cluster create)");
    let cluster = RedisCluster::start(3, 1);
    let seeds: Vec<String> = cluster.addrs().iter().map(ToString::to_string).collect();
    let seed_list = seeds.join(",");
    // Interception needs root (CAP_BPF, CAP_SYS_ADMIN); without it the demo shows the proxy
    // alone.
    let demo_cgroup = if is_root() {
        let mount = redis_intercept::intercept::cgroup2_mount()?;
        let dir = mount.join(format!("ri-demo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
        Some(RemoveOnDrop(dir))
    } else {
        say("not root: skipping the eBPF interception part of the demo");
        None
    };
    let vip = SocketAddr::from(([127, 0, 100, 1], free_port()));
    let mut extra = vec!["--mode", "cluster", "--workers", "1"];
    let vip_arg = vip.to_string();
    let cgroup_arg = demo_cgroup
        .as_ref()
        .map(|d| d.0.display().to_string())
        .unwrap_or_default();
    if demo_cgroup.is_some() {
        extra.extend(["--vip", &vip_arg, "--cgroup", &cgroup_arg]);
    }
    let proxy = ProxyProcess::start(&bin, &seed_list, &extra)?;
    say(&format!(
        "cluster nodes {}; redis-intercept on {} (seeds: {seed_list})",
        seeds.join(" "),
        proxy.addr
    ));
    let node0 = cluster.nodes[0].addr;
    println!();
    println!("A plain client straight at one cluster node gets redirected:");
    show("node  ", node0, &["SET", "h", "h"])?;
    println!();
    println!("The same client through the proxy needs nothing cluster-aware:");
    let p = proxy.addr;
    let keys = ["a", "b", "c", "d", "e", "f", "g", "h"];
    for k in keys {
        let out = show("proxy ", p, &["SET", k, k])?;
        if out != "OK" {
            bail!("SET {k} through the proxy answered {out:?}");
        }
    }
    show(
        "proxy ",
        p,
        &["MGET", "a", "b", "c", "d", "e", "f", "g", "h"],
    )?;
    show("proxy ", p, &["DBSIZE"])?;
    println!();
    println!("Each key, read straight from the master that owns its slot:");
    let map =
        SlotMap::from_cluster_slots(&cluster.nodes[0].cmd(&["CLUSTER", "SLOTS"]), "127.0.0.1")
            .context("read the cluster's slot map")?;
    for k in keys {
        let slot = Slot::for_key(k.as_bytes());
        let owner: SocketAddr = map
            .master(slot)
            .context("slot without a master")?
            .parse()
            .context("master address")?;
        println!("key {k} -> slot {} -> master {owner}", slot.get());
        let direct = show("master", owner, &["GET", k])?;
        if direct != k {
            bail!("{k} is not on the master that owns its slot (got {direct:?})");
        }
    }
    println!();
    println!("Commands the proxy splits or refuses:");
    show("proxy ", p, &["DEL", "a", "b", "c"])?;
    show("proxy ", p, &["RENAME", "d", "e"])?;
    show("proxy ", p, &["SCAN", "0", "COUNT", "100"])?;
    println!();
    println!("A transaction runs on a connection of its own, on the master of its keys' slot:");
    let tx = show_session(
        "proxy ",
        p,
        &[
            "MULTI",
            "SET {user1}:name ann",
            "INCR {user1}:visits",
            "EXEC",
        ],
    )?;
    if !tx.ends_with("OK\n1") {
        bail!("the transaction through the proxy answered {tx:?}");
    }
    if let Some(RemoveOnDrop(dir)) = &demo_cgroup {
        println!();
        println!(
            "eBPF interception: a plain redis-cli dials the VIP {vip} (nothing listens there);"
        );
        println!(
            "inside the cgroup {} it is sent to the proxy:",
            dir.display()
        );
        // Wait until the programs are attached (once the upstream answers).
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let out = in_cgroup(dir, vip, &["PING"])?;
            if out == "PONG" || Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        for args in [&["GET", "f"][..], &["MGET", "f", "g", "h"], &["DBSIZE"]] {
            let out = in_cgroup(dir, vip, args)?;
            println!(
                "cgroup$ redis-cli -h {} -p {} {}",
                vip.ip(),
                vip.port(),
                args.join(" ")
            );
            for line in out.lines() {
                println!("    {line}");
            }
        }
        if in_cgroup(dir, vip, &["GET", "f"])? != "f" {
            bail!("the intercepted redis-cli did not reach the cluster");
        }
        println!("outside the cgroup the same command is not intercepted:");
        let out = Command::new("redis-cli")
            .args([
                "-h",
                &vip.ip().to_string(),
                "-p",
                &vip.port().to_string(),
                "GET",
                "a",
            ])
            .output()
            .context("run redis-cli")?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        println!("host  $ redis-cli -h {} -p {} GET f", vip.ip(), vip.port());
        for line in text.trim_end().lines() {
            println!("    {line}");
        }
    }
    println!();
    say("stopping the proxy (SIGTERM: detach, then drain) and the cluster");
    drop(proxy);
    drop(cluster);
    drop(demo_cgroup);
    say("demo finished");
    Ok(())
}
