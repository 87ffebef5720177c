//! `cargo xtask bench`: redis-benchmark against Redis directly and through the proxy, in the
//! same run, alternating targets; prints medians and proxy/direct ratios, the proxy's CPU cost
//! per million requests, its RSS, and the memory of idle client connections.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use redis_intercept_e2e::RedisServer;

use crate::demo::{ProxyProcess, build_proxy};
use crate::setup::say;

/// Options of `cargo xtask bench`.
#[derive(clap::Args)]
pub struct BenchArgs {
    /// Rounds; each runs every workload against both targets.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Requests per redis-benchmark run (pipelined runs: this times the pipeline depth).
    #[arg(long, default_value_t = 200_000)]
    requests: usize,
    /// Proxy worker threads (0: one per CPU). One by default: on a 2-core machine the
    /// benchmark client and Redis need the other core, and a second worker only adds context
    /// switches (measured: balanced over two workers, non-pipelined ratios drop by ~0.1).
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Idle client connections opened to measure per-client memory.
    #[arg(long, default_value_t = 5000)]
    idle_clients: usize,
    /// Instead: the cost of traffic policy. Non-pipelined SET through a proxy with a 100%
    /// write mirror, one with client auth and one with per-command stats, each against a
    /// plain proxy.
    #[arg(long)]
    policy: bool,
    /// Instead: only the client-side caching rows (RESP3 GETs from clients with and without
    /// `CLIENT TRACKING ON`, the proxy's CPU per request of each).
    #[arg(long)]
    tracking: bool,
    /// Instead: a local 3-master Redis Cluster, directly (`redis-benchmark --cluster
    /// --threads 1`) against through the proxy; SET and GET `-P 16` once more with one
    /// redis-benchmark per master (keys tagged for it) on both sides; and MSET of 10 keys
    /// spread over every shard through the proxy against direct MSET of 10 keys in one slot.
    #[arg(long)]
    cluster: bool,
    /// Instead: connect()+close() latency from a process in a cgroup, without the eBPF
    /// programs, with them (to a non-VIP address and to a VIP), in one run. Needs root.
    #[arg(long)]
    intercept: bool,
    /// With `--cluster`: don't measure the proxy with `[intercept] accelerate` (which needs
    /// root and the eBPF programs).
    #[arg(long)]
    no_accelerate: bool,
    /// With `--cluster`: also run this proxy binary (an older build, say) as a third target in
    /// the same rounds, to compare two builds on a noisy machine.
    #[arg(long, value_name = "PATH")]
    baseline_bin: Option<std::path::PathBuf>,
}

/// One redis-benchmark configuration.
#[derive(Clone, Copy)]
struct Workload {
    /// Label in the report.
    name: &'static str,
    /// redis-benchmark test (`set` or `get`).
    test: &'static str,
    /// Pipeline depth.
    pipeline: usize,
    /// Target ratio proxy/direct from the issue.
    target: f64,
    /// Cluster only: one redis-benchmark per master, each with keys under a hash tag that
    /// master owns, run at once, so every pipeline stays on one shard through the proxy as
    /// well as directly (direct `redis-benchmark --cluster` tags its keys per node; through
    /// the proxy plain random keys spread each batch over every shard).
    per_shard: bool,
    /// redis-benchmark speaks RESP3 (`-3`), directly and through the proxy.
    resp3: bool,
}

const WORKLOADS: &[Workload] = &[
    Workload {
        name: "SET",
        test: "set",
        pipeline: 1,
        target: 0.9,
        per_shard: false,
        resp3: false,
    },
    Workload {
        name: "GET",
        test: "get",
        pipeline: 1,
        target: 0.9,
        per_shard: false,
        resp3: false,
    },
    Workload {
        name: "SET -P 16",
        test: "set",
        pipeline: 16,
        target: 0.7,
        per_shard: false,
        resp3: false,
    },
    Workload {
        name: "GET -P 16",
        test: "get",
        pipeline: 16,
        target: 0.7,
        per_shard: false,
        resp3: false,
    },
    Workload {
        name: "GET RESP3",
        test: "get",
        pipeline: 1,
        target: 0.9,
        per_shard: false,
        resp3: true,
    },
    Workload {
        name: "GET -P16 RESP3",
        test: "get",
        pipeline: 16,
        target: 0.7,
        per_shard: false,
        resp3: true,
    },
];

impl Workload {
    /// Requests for one run: `base`, times the pipeline depth, so that a pipelined run lasts
    /// about as long as the others (at `base` alone it lasts a fifth of a second, which the
    /// clients' start-up and the 10 ms granularity of `/proc` CPU times blur).
    fn requests(&self, base: usize) -> usize {
        base * self.pipeline
    }
}

/// The median over rounds of `a[r] / b[r]`: the runs of one round are neighbours in time, so
/// a machine that speeds up or slows down between rounds moves both sides of a ratio.
fn round_ratio(a: &[f64], b: &[f64]) -> f64 {
    let mut r: Vec<f64> = a.iter().zip(b).map(|(x, y)| x / y).collect();
    median(&mut r)
}

/// `--workers` in words, for the report.
fn workers_text(workers: usize) -> String {
    match workers {
        0 => "one worker per CPU".to_owned(),
        1 => "1 worker".to_owned(),
        n => format!("{n} workers"),
    }
}

/// Runs redis-benchmark once; returns requests per second.
fn benchmark(addr: SocketAddr, w: &Workload, requests: usize) -> Result<f64> {
    benchmark_with(addr, w, requests, &[])
}

/// Like [`benchmark`] with extra redis-benchmark arguments (e.g. `-a password`).
fn benchmark_with(addr: SocketAddr, w: &Workload, requests: usize, extra: &[&str]) -> Result<f64> {
    benchmark_in(None, addr, w, requests, extra)
}

/// Like [`benchmark_with`], with redis-benchmark inside `cgroup` if given.
fn benchmark_in(
    cgroup: Option<&Path>,
    addr: SocketAddr,
    w: &Workload,
    requests: usize,
    extra: &[&str],
) -> Result<f64> {
    let mut command = match cgroup {
        Some(cg) => in_cgroup(cg, "redis-benchmark"),
        None => Command::new("redis-benchmark"),
    };
    let out = command
        .args(["-h", &addr.ip().to_string(), "-p", &addr.port().to_string()])
        .args(extra)
        .args([
            "-t",
            w.test,
            "-n",
            &requests.to_string(),
            "-c",
            "50",
            "-r",
            "100000",
            "-d",
            "64",
        ])
        .args(["-P", &w.pipeline.to_string(), "--csv"])
        .args(w.resp3.then_some("-3"))
        .output()
        .context("run redis-benchmark")?;
    let text = String::from_utf8_lossy(&out.stdout);
    // --csv: "test","rps","avg_latency_ms",…
    for line in text.lines() {
        let cols: Vec<&str> = line.split(',').map(|c| c.trim_matches('"')).collect();
        // MSET's line is "MSET (10 keys)".
        if cols
            .first()
            .is_some_and(|t| t.to_ascii_lowercase().starts_with(w.test))
        {
            return cols
                .get(1)
                .and_then(|r| r.parse().ok())
                .with_context(|| format!("bad redis-benchmark line {line:?}"));
        }
    }
    bail!("redis-benchmark printed no {} result:\n{text}", w.test)
}

/// One shard of a per-shard run: where its redis-benchmark connects, and a hash tag whose
/// slot the shard's master owns.
struct Shard {
    /// The master itself (direct) or the proxy (through it).
    dial: SocketAddr,
    /// Goes between braces in every key, so all of this client's keys land on one master.
    tag: String,
}

/// For each master of the cluster that `node` belongs to, the shortest decimal hash tag it
/// owns, as redis-benchmark's own cluster mode tags keys per node.
fn shard_tags(node: &RedisServer) -> Result<Vec<(SocketAddr, String)>> {
    use redis_intercept::cluster::{Slot, SlotMap};
    let map = SlotMap::from_cluster_slots(&node.cmd(&["CLUSTER", "SLOTS"]), "127.0.0.1")
        .map_err(|e| anyhow::anyhow!("CLUSTER SLOTS: {e}"))?;
    map.serving_masters()
        .into_iter()
        .map(|master| {
            let tag = (0..100_000u32)
                .map(|n| n.to_string())
                .find(|tag| map.master(Slot::for_key(tag.as_bytes())) == Some(master))
                .with_context(|| format!("no hash tag for {master}"))?;
            Ok((master.parse().context("a master's address")?, tag))
        })
        .collect()
}

/// Runs one redis-benchmark per shard at once (inside `cgroup` if given), 50 clients and
/// `requests` requests in all, each client's keys under its shard's tag; returns requests
/// per second over the wall time of the slowest.
fn benchmark_shards(
    cgroup: Option<&Path>,
    shards: &[Shard],
    w: &Workload,
    requests: usize,
) -> Result<f64> {
    const CLIENTS: usize = 50;
    let n = shards.len();
    let value = "v".repeat(64);
    let started = std::time::Instant::now();
    let mut children = Vec::with_capacity(n);
    for (i, shard) in shards.iter().enumerate() {
        let mut command = match cgroup {
            Some(cg) => in_cgroup(cg, "redis-benchmark"),
            None => Command::new("redis-benchmark"),
        };
        let key = format!("key:{{{}}}:__rand_int__", shard.tag);
        let mut custom = vec![w.test, key.as_str()];
        if w.test == "set" {
            custom.push(&value);
        }
        command
            .args(["-h", &shard.dial.ip().to_string()])
            .args(["-p", &shard.dial.port().to_string()])
            .args(["-n", &(requests / n).to_string()])
            .args([
                "-c",
                &(CLIENTS / n + usize::from(i < CLIENTS % n)).to_string(),
            ])
            .args(["-r", "100000", "-P", &w.pipeline.to_string(), "-q"])
            .args(&custom)
            .stdout(std::process::Stdio::null())
            // It warns that the proxy refuses CONFIG GET; kept for the error below.
            .stderr(std::process::Stdio::piped());
        children.push(command.spawn().context("run redis-benchmark")?);
    }
    for child in children {
        let out = child
            .wait_with_output()
            .context("wait for redis-benchmark")?;
        if !out.status.success() {
            bail!(
                "redis-benchmark failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    Ok((requests / n * n) as f64 / started.elapsed().as_secs_f64())
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: u32) -> Result<f64> {
    // /proc/PID/stat fields 14 and 15.
    stat_seconds(&pid.to_string(), 14)
}

/// CPU of this process's finished children, in seconds: every redis-benchmark run so far,
/// since `Command::output` waits for it.
fn children_cpu_seconds() -> Result<f64> {
    // cutime and cstime, fields 16 and 17.
    stat_seconds("self", 16)
}

/// The sum of `/proc/<pid>/stat` field `field` and the next one (clock ticks), in seconds.
fn stat_seconds(pid: &str, field: usize) -> Result<f64> {
    Ok((stat_ticks(pid, field)? + stat_ticks(pid, field + 1)?) / clock_hz())
}

/// Field `field` of `/proc/<pid>/stat`, in clock ticks.
fn stat_ticks(pid: &str, field: usize) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Count from the ")" that closes the command name (which may hold spaces): the next
    // field is number 3.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    Ok(rest
        .split_whitespace()
        .nth(field - 3)
        .and_then(|f| f.parse().ok())
        .unwrap_or(0.0))
}

/// Clock ticks per second (`/proc` times are in these).
fn clock_hz() -> f64 {
    static HZ: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *HZ.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// CPU microseconds per request of each process in one redis-benchmark run.
#[derive(Clone, Copy, Default)]
pub(crate) struct Cpu {
    /// redis-benchmark.
    client: f64,
    /// The proxy; zero in a direct run.
    pub(crate) proxy: f64,
    /// The proxy's system (kernel) part of `proxy`: what its socket calls and wake-ups cost,
    /// which no user-space work can save.
    proxy_sys: f64,
    /// Every redis-server.
    redis: f64,
    /// Every CPU of the machine that was not idle, from `/proc/stat`: includes what the
    /// per-process figures miss (interrupts, softirqs, kernel threads) and whatever else ran.
    machine: f64,
}

impl Cpu {
    /// Everything the run cost the client, the proxy and Redis.
    fn total(&self) -> f64 {
        self.client + self.proxy + self.redis
    }
}

/// Busy CPU time of the whole machine so far, in clock ticks, from the `cpu` line of
/// `/proc/stat`: user, nice, system, irq and softirq (idle and iowait are not busy; steal is
/// time the hypervisor took).
fn machine_ticks() -> Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .context("no cpu line in /proc/stat")?;
    let v: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    let at = |i: usize| v.get(i).copied().unwrap_or(0.0);
    Ok(at(0) + at(1) + at(2) + at(5) + at(6))
}

/// Runs `run` (one redis-benchmark of `requests` requests) and measures what it cost the
/// client, the proxy (if `proxy` is given), the Redis processes `redis` and the machine.
pub(crate) fn measured(
    requests: usize,
    proxy: Option<u32>,
    redis: &[u32],
    run: impl FnOnce() -> Result<f64>,
) -> Result<(f64, Cpu)> {
    let redis_seconds = || -> Result<f64> { redis.iter().map(|&p| cpu_seconds(p)).sum() };
    let proxy_seconds = || -> Result<f64> { proxy.map_or(Ok(0.0), cpu_seconds) };
    let proxy_sys = || -> Result<f64> {
        proxy.map_or(
            Ok(0.0),
            |p| Ok(stat_ticks(&p.to_string(), 15)? / clock_hz()),
        )
    };
    let (c0, p0, s0, r0) = (
        children_cpu_seconds()?,
        proxy_seconds()?,
        proxy_sys()?,
        redis_seconds()?,
    );
    let m0 = machine_ticks()?;
    let rps = run()?;
    let m1 = machine_ticks()?;
    let per_req = 1e6 / requests as f64;
    let cpu = Cpu {
        client: (children_cpu_seconds()? - c0) * per_req,
        proxy: (proxy_seconds()? - p0) * per_req,
        proxy_sys: (proxy_sys()? - s0) * per_req,
        redis: (redis_seconds()? - r0) * per_req,
        machine: (m1 - m0) / clock_hz() * per_req,
    };
    Ok((rps, cpu))
}

/// Per-component medians of `runs`.
fn median_cpu(runs: &[Cpu]) -> Cpu {
    let m = |f: fn(&Cpu) -> f64| median(&mut runs.iter().map(f).collect::<Vec<_>>());
    Cpu {
        client: m(|c| c.client),
        proxy: m(|c| c.proxy),
        proxy_sys: m(|c| c.proxy_sys),
        redis: m(|c| c.redis),
        machine: m(|c| c.machine),
    }
}

/// Prints where the CPU went, direct against through the proxy, per workload (name and
/// target ratio), and the ratio the proxy could reach if both runs kept every core busy: the
/// direct run's CPU per request over the proxied run's, from the processes' own times and
/// from the machine's. A measured ratio above that bound means the direct run left CPU idle
/// (a single-threaded stage, waiting); below it, the proxied run did. `allowed` is how much
/// more machine CPU per request than direct the target leaves a CPU-bound proxied run:
/// direct × (1 / target − 1); when the proxy's kernel time alone is over it, no saving in
/// user space reaches the target on this machine.
fn print_cpu_budget(workloads: &[(&str, f64)], direct: &[Vec<Cpu>], proxied: &[Vec<Cpu>]) {
    println!();
    println!(
        "CPU per request, µs (medians; client: redis-benchmark, Redis: every redis-server, \
         machine: all CPUs from /proc/stat)"
    );
    println!(
        "{:<14} {:>6} {:>6} {:>6} {:>7} | {:>6} {:>11} {:>6} {:>7} {:>7} | {:>7} {:>7} | {:>7}",
        "workload",
        "client",
        "Redis",
        "direct",
        "machine",
        "client",
        "proxy (sys)",
        "Redis",
        "proxied",
        "machine",
        "ceiling",
        "machine",
        "allowed"
    );
    for (i, (name, target)) in workloads.iter().enumerate() {
        let d = median_cpu(&direct[i]);
        let p = median_cpu(&proxied[i]);
        println!(
            "{:<14} {:>6.2} {:>6.2} {:>6.2} {:>7.2} | {:>6.2} {:>11} {:>6.2} {:>7.2} {:>7.2} | {:>7.2} {:>7.2} | {:>7.2}",
            name,
            d.client,
            d.redis,
            d.total(),
            d.machine,
            p.client,
            format!("{:.2} ({:.2})", p.proxy, p.proxy_sys),
            p.redis,
            p.total(),
            p.machine,
            d.total() / p.total(),
            d.machine / p.machine,
            d.machine * (1.0 / target - 1.0)
        );
    }
    println!(
        "(ceiling: direct CPU per request / proxied, the ratio if both runs were bound by the \
         machine's CPU alone; from the processes' times, then from the machine's; allowed: the \
         machine CPU per request a proxied run may add to direct's and still meet the target \
         if CPU-bound, to compare with the proxy's own, and its kernel part in brackets)"
    );
}

/// A `/proc/PID/status` memory field in KiB (VmRSS, VmHWM).
fn status_kib(pid: u32, field: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim_start_matches(':').split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

pub(crate) fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Runs the benchmark and prints the report.
pub fn bench(root: &Path, args: &BenchArgs) -> Result<()> {
    if args.policy {
        return policy(root, args);
    }
    if args.cluster {
        return cluster(root, args);
    }
    if args.intercept {
        return intercept(root, args);
    }
    let bin = build_proxy(root)?;
    let server = RedisServer::start_with(&["--maxclients", "20000"]);
    let workers = args.workers.to_string();
    let proxy = ProxyProcess::start(&bin, &server.addr.to_string(), &["--workers", &workers])?;
    std::thread::sleep(Duration::from_millis(500));
    if args.tracking {
        say(&format!(
            "redis-intercept {} with {}: {} rounds of {} GETs, tracked and not",
            proxy.addr,
            workers_text(args.workers),
            args.rounds,
            args.requests
        ));
        return crate::bench_tracking::tracked_reads(
            proxy.pid(),
            proxy.addr,
            args.rounds,
            args.requests,
        );
    }
    let idle_rss = status_kib(proxy.pid(), "VmRSS")?;
    say(&format!(
        "redis-server {} vs redis-intercept {} with {} ({} rounds of {} requests, × depth when pipelined, -c 50 -r 100000 -d 64)",
        server.addr,
        proxy.addr,
        workers_text(args.workers),
        args.rounds,
        args.requests
    ));
    let redis = [server.pid().context("redis-server is not running")?];
    let mut direct = vec![Vec::new(); WORKLOADS.len()];
    let mut proxied = vec![Vec::new(); WORKLOADS.len()];
    let mut direct_cpu = vec![Vec::new(); WORKLOADS.len()];
    let mut cpu = vec![Vec::new(); WORKLOADS.len()];
    for round in 1..=args.rounds {
        for (i, w) in WORKLOADS.iter().enumerate() {
            let requests = w.requests(args.requests);
            // Alternate which target goes first so drift on a shared machine hits both.
            let order = if round % 2 == 1 {
                [false, true]
            } else {
                [true, false]
            };
            for via_proxy in order {
                if via_proxy {
                    let (rps, used) = measured(requests, Some(proxy.pid()), &redis, || {
                        benchmark(proxy.addr, w, requests)
                    })?;
                    cpu[i].push(used);
                    proxied[i].push(rps);
                } else {
                    let (rps, used) = measured(requests, None, &redis, || {
                        benchmark(server.addr, w, requests)
                    })?;
                    direct_cpu[i].push(used);
                    direct[i].push(rps);
                }
            }
        }
        say(&format!("round {round}/{} done", args.rounds));
    }
    println!();
    println!(
        "{:<12} {:>12} {:>12} {:>7} {:>8}  {:>16}",
        "workload", "direct rps", "proxy rps", "ratio", "target", "proxy CPU s/Mreq"
    );
    for (i, w) in WORKLOADS.iter().enumerate() {
        let ratio = round_ratio(&proxied[i], &direct[i]);
        let d = median(&mut direct[i]);
        let p = median(&mut proxied[i]);
        println!(
            "{:<12} {:>12.0} {:>12.0} {:>7.2} {:>7}{} {:>16.2}",
            w.name,
            d,
            p,
            ratio,
            format!("≥{:.1}", w.target),
            if ratio >= w.target { " " } else { "!" },
            median_cpu(&cpu[i]).proxy
        );
    }
    println!("(ratio: median over rounds of proxy rps / direct rps in the same round)");
    let names: Vec<(&str, f64)> = WORKLOADS.iter().map(|w| (w.name, w.target)).collect();
    print_cpu_budget(&names, &direct_cpu, &cpu);
    let peak = status_kib(proxy.pid(), "VmHWM")?;
    println!();
    println!(
        "proxy RSS idle (upstream connected, no clients): {:.1} MiB (target ≤ 20 MiB)",
        idle_rss as f64 / 1024.0
    );
    println!(
        "proxy peak RSS during the runs: {:.1} MiB",
        peak as f64 / 1024.0
    );
    crate::bench_tracking::tracked_reads(proxy.pid(), proxy.addr, args.rounds, args.requests)?;
    idle_clients(&proxy, args.idle_clients)?;
    Ok(())
}

/// Cluster workloads: the foundation's, plus MSET.
const CLUSTER_WORKLOADS: &[Workload] = &[
    WORKLOADS[0],
    WORKLOADS[1],
    Workload {
        name: "SET -P 16",
        test: "set",
        pipeline: 16,
        target: 0.8,
        per_shard: false,
        resp3: false,
    },
    Workload {
        name: "GET -P 16",
        test: "get",
        pipeline: 16,
        target: 0.8,
        per_shard: false,
        resp3: false,
    },
    Workload {
        name: "SET -P16 shard",
        test: "set",
        pipeline: 16,
        target: 0.8,
        per_shard: true,
        resp3: false,
    },
    Workload {
        name: "GET -P16 shard",
        test: "get",
        pipeline: 16,
        target: 0.8,
        per_shard: true,
        resp3: false,
    },
    Workload {
        name: "MSET 10 keys",
        test: "mset",
        pipeline: 1,
        target: 0.5,
        per_shard: false,
        resp3: false,
    },
];

/// A proxy the cluster benchmark measures.
struct ProxyTarget {
    /// Column label.
    name: &'static str,
    /// The running proxy.
    proxy: ProxyProcess,
    /// Where redis-benchmark connects (the listener, or a VIP).
    dial: SocketAddr,
    /// The cgroup redis-benchmark runs in (to be intercepted), if any.
    client_cgroup: Option<std::path::PathBuf>,
}

/// A bench cgroup with `proxy` and `client` children, removed on drop (after the processes
/// in it are gone).
struct BenchCgroup {
    /// The attach point.
    path: std::path::PathBuf,
}

impl BenchCgroup {
    fn new() -> Result<BenchCgroup> {
        let mount = redis_intercept::intercept::cgroup2_mount()?;
        let path = mount.join(format!("ri-bench-{}", std::process::id()));
        for child in ["proxy", "client"] {
            std::fs::create_dir_all(path.join(child))
                .with_context(|| format!("mkdir {}", path.display()))?;
        }
        Ok(BenchCgroup { path })
    }
}

impl Drop for BenchCgroup {
    fn drop(&mut self) {
        for child in ["proxy", "client", ""] {
            let _ = std::fs::remove_dir(self.path.join(child));
        }
    }
}

/// Starts the proxy inside `cg/proxy`, intercepting `vip` for `cg` with `[intercept]
/// accelerate`, and waits until a client in `cg/client` is served through the VIP.
fn accelerated_proxy(
    bin: &Path,
    seeds: &str,
    workers: &str,
    cg: &BenchCgroup,
    vip: SocketAddr,
) -> Result<ProxyProcess> {
    let addr = SocketAddr::from(([127, 0, 0, 1], redis_intercept_e2e::free_port()));
    let script = format!(
        "echo $$ > {}/proxy/cgroup.procs && exec {} run --listen {addr} --upstream {seeds} \
         --mode cluster --workers {workers} --vip {vip} --cgroup {} --accelerate",
        cg.path.display(),
        bin.display(),
        cg.path.display()
    );
    let proxy = ProxyProcess::spawn_command(Command::new("sh").args(["-c", &script]), addr)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let out = in_cgroup(&cg.path.join("client"), "redis-cli")
            .args([
                "-h",
                &vip.ip().to_string(),
                "-p",
                &vip.port().to_string(),
                "ping",
            ])
            .output()
            .context("run redis-cli")?;
        if String::from_utf8_lossy(&out.stdout).trim() == "PONG" {
            return Ok(proxy);
        }
        if std::time::Instant::now() > deadline {
            bail!("the accelerated proxy did not serve {vip} within 15s");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A command that runs `program` inside `cgroup` (through `sh`, which joins it and execs).
fn in_cgroup(cgroup: &Path, program: &str) -> Command {
    let mut c = Command::new("sh");
    c.args([
        "-c",
        &format!("echo $$ > {}/cgroup.procs && exec \"$@\"", cgroup.display()),
        "sh",
        program,
    ]);
    c
}

/// The cluster benchmark: each workload against the cluster directly, through the proxy,
/// through the proxy intercepted and accelerated (as root, when the eBPF programs are built
/// in) and through a `--baseline-bin` proxy (if given), in a rotating order, with each
/// proxy's CPU per request. Ratios are medians of each round's ratio, so a machine that
/// speeds up or slows down between rounds moves both sides of a ratio together.
fn cluster(root: &Path, args: &BenchArgs) -> Result<()> {
    let bin = build_proxy(root)?;
    say("starting a local Redis Cluster: 3 masters");
    let cluster = redis_intercept_e2e::RedisCluster::start(3, 0);
    let seeds: Vec<String> = cluster.addrs().iter().map(ToString::to_string).collect();
    let seeds = seeds.join(",");
    let workers = args.workers.to_string();
    let proxy_args = ["--mode", "cluster", "--workers", &workers];
    let plain = ProxyProcess::start(&bin, &seeds, &proxy_args)?;
    let mut targets = vec![ProxyTarget {
        name: "proxy",
        dial: plain.addr,
        proxy: plain,
        client_cgroup: None,
    }];
    // Declared before the proxies in it, so it is removed after they stopped.
    let cg = if args.no_accelerate {
        None
    } else {
        match BenchCgroup::new() {
            Ok(cg) => Some(cg),
            Err(e) => {
                say(&format!("not measuring the accelerated proxy: {e:#}"));
                None
            }
        }
    };
    if let Some(cg) = &cg {
        let vip = SocketAddr::from(([127, 0, 100, 9], redis_intercept_e2e::free_port()));
        match accelerated_proxy(&bin, &seeds, &workers, cg, vip) {
            Ok(proxy) => targets.push(ProxyTarget {
                name: "accelerated",
                proxy,
                dial: vip,
                client_cgroup: Some(cg.path.join("client")),
            }),
            Err(e) => say(&format!(
                "not measuring the accelerated proxy (needs root and the eBPF programs): {e:#}"
            )),
        }
    }
    if let Some(baseline) = &args.baseline_bin {
        let proxy = ProxyProcess::start(baseline, &seeds, &proxy_args)?;
        targets.push(ProxyTarget {
            name: "baseline",
            dial: proxy.addr,
            proxy,
            client_cgroup: None,
        });
    }
    std::thread::sleep(Duration::from_millis(500));
    let node = cluster.nodes[0].addr;
    say(&format!(
        "cluster (seed {node}) vs {} with {} ({} rounds of {} requests, × depth when pipelined, -c 50 -r 100000 -d 64)",
        targets
            .iter()
            .map(|t| format!("{} at {}", t.name, t.dial))
            .collect::<Vec<_>>()
            .join(", "),
        workers_text(args.workers),
        args.rounds,
        args.requests
    ));
    // redis-benchmark 7.0 with --cluster and no --threads rounds elapsed time up to 250ms.
    let direct_args = ["--cluster", "--threads", "1"];
    let n = CLUSTER_WORKLOADS.len();
    let count = 1 + targets.len();
    // rps[target][workload][round]; target 0 is the cluster itself.
    let mut rps = vec![vec![Vec::new(); n]; count];
    // cpu[target][workload][round], like rps.
    let mut cpu = vec![vec![Vec::new(); n]; count];
    let redis: Vec<u32> = cluster.nodes.iter().filter_map(RedisServer::pid).collect();
    let tags = shard_tags(&cluster.nodes[0])?;
    // Per-shard runs: each master directly (target 0), or each target's proxy.
    let shards: Vec<Vec<Shard>> = std::iter::once(None)
        .chain(targets.iter().map(|t| Some(t.dial)))
        .map(|dial| {
            tags.iter()
                .map(|(master, tag)| Shard {
                    dial: dial.unwrap_or(*master),
                    tag: tag.clone(),
                })
                .collect()
        })
        .collect();
    for round in 1..=args.rounds {
        for (i, w) in CLUSTER_WORKLOADS.iter().enumerate() {
            let requests = w.requests(args.requests);
            // Rotate which target goes first so drift on a shared machine hits all of them.
            for k in 0..count {
                let t = (k + round + i) % count;
                let cgroup = t
                    .checked_sub(1)
                    .and_then(|p| targets[p].client_cgroup.as_deref());
                let proxy = t.checked_sub(1).map(|p| targets[p].proxy.pid());
                let (r, used) = if w.per_shard {
                    measured(requests, proxy, &redis, || {
                        benchmark_shards(cgroup, &shards[t], w, requests)
                    })?
                } else if t == 0 {
                    measured(requests, None, &redis, || {
                        benchmark_in(None, node, w, requests, &direct_args)
                    })?
                } else {
                    measured(requests, proxy, &redis, || {
                        benchmark_in(cgroup, targets[t - 1].dial, w, requests, &[])
                    })?
                };
                rps[t][i].push(r);
                cpu[t][i].push(used);
            }
        }
        say(&format!("round {round}/{} done", args.rounds));
    }
    println!();
    print!("{:<14} {:>12} {:>8}", "workload", "direct rps", "target");
    for t in &targets {
        print!("  {:>18} {:>10}", format!("{} ratio", t.name), "CPU s/Mreq");
    }
    println!();
    for (i, w) in CLUSTER_WORKLOADS.iter().enumerate() {
        print!(
            "{:<14} {:>12.0} {:>8}",
            w.name,
            median(&mut rps[0][i].clone()),
            format!("≥{:.1}", w.target)
        );
        for t in 1..count {
            let r = round_ratio(&rps[t][i], &rps[0][i]);
            print!(
                "  {:>17.2}{} {:>10.2}",
                r,
                if r >= w.target { " " } else { "!" },
                median_cpu(&cpu[t][i]).proxy
            );
        }
        println!();
    }
    println!(
        "(ratio: median over rounds of proxy rps / direct rps in the same round; ! marks a \
         ratio below target; direct redis-benchmark --cluster tags each client's keys for one \
         node, so a direct -P 16 batch stays on one shard while through the proxy it spreads \
         over all of them; shard: one redis-benchmark per master at once, each with keys \
         tagged for that master, directly and through the proxy, the same workload on both \
         sides; direct MSET puts its 10 keys in one slot with a hash tag; through the proxy \
         they spread over every shard and are split and merged; accelerated: redis-benchmark \
         in a cgroup dials a VIP, intercepted, with [intercept] accelerate)"
    );
    let names: Vec<(&str, f64)> = CLUSTER_WORKLOADS
        .iter()
        .map(|w| (w.name, w.target))
        .collect();
    for (t, target) in targets.iter().enumerate() {
        println!();
        println!("{}:", target.name);
        print_cpu_budget(&names, &cpu[0], &cpu[t + 1]);
    }
    drop(targets);
    drop(cg);
    Ok(())
}

/// Nanoseconds per connect+close from `ri-probe` in `cgroup` to `addr`.
fn connect_ns(probe: &Path, cgroup: &Path, addr: SocketAddr, n: usize) -> Result<f64> {
    let out = Command::new(probe)
        .arg("--cgroup")
        .arg(cgroup)
        .arg(addr.to_string())
        .args(["--bench", &n.to_string()])
        .output()
        .context("run ri-probe")?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("ns_per_connect="))
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("ri-probe printed no timing: {text}"))
}

/// The connect-latency benchmark of the eBPF hook.
fn intercept(root: &Path, args: &BenchArgs) -> Result<()> {
    let bin = build_proxy(root)?;
    say("building ri-probe (release)");
    crate::setup::run(
        Command::new("cargo").current_dir(root).args([
            "build",
            "--release",
            "--quiet",
            "-p",
            "redis-intercept-e2e",
            "--bin",
            "ri-probe",
        ]),
        "cargo build ri-probe",
    )?;
    let probe = root.join("target/release/ri-probe");
    let mount = redis_intercept::intercept::cgroup2_mount()?;
    let cgroup = mount.join(format!("ri-bench-{}", std::process::id()));
    std::fs::create_dir_all(&cgroup).with_context(|| format!("mkdir {}", cgroup.display()))?;
    let server = RedisServer::start();
    let n = (args.requests / 10).max(1000);
    let upstream = server.addr.to_string();
    // The non-VIP destination: a proxy without interception (its listener accepts quickly).
    let plain = ProxyProcess::start(&bin, &upstream, &["--workers", "1"])?;
    let result = (|| -> Result<()> {
        let (mut without, mut other, mut to_vip, mut to_proxy) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for round in 1..=args.rounds {
            without.push(connect_ns(&probe, &cgroup, plain.addr, n)?);
            let vip = SocketAddr::from(([127, 0, 100, 9], redis_intercept_e2e::free_port()));
            let intercepting = ProxyProcess::start(
                &bin,
                &upstream,
                &[
                    "--workers",
                    "1",
                    "--vip",
                    &vip.to_string(),
                    "--cgroup",
                    &cgroup.display().to_string(),
                ],
            )?;
            // Attached once the upstream answers.
            std::thread::sleep(Duration::from_millis(500));
            other.push(connect_ns(&probe, &cgroup, plain.addr, n)?);
            to_vip.push(connect_ns(&probe, &cgroup, vip, n)?);
            to_proxy.push(connect_ns(&probe, &cgroup, intercepting.addr, n)?);
            drop(intercepting);
            say(&format!("round {round}/{} done", args.rounds));
        }
        let (w, o, v, p) = (
            median(&mut without),
            median(&mut other),
            median(&mut to_vip),
            median(&mut to_proxy),
        );
        println!();
        println!(
            "connect()+close() from a process in a cgroup, medians of {} rounds of {n}:",
            args.rounds
        );
        println!(
            "  no programs attached, to a proxy listener       {:>8.2} µs",
            w / 1000.0
        );
        println!(
            "  programs attached, same listener (not a VIP)    {:>8.2} µs  ({:+.2} µs)",
            o / 1000.0,
            (o - w) / 1000.0
        );
        println!(
            "  programs attached, straight to the intercepting proxy {:>5.2} µs",
            p / 1000.0
        );
        println!(
            "  programs attached, VIP → that proxy (redirected) {:>7.2} µs  ({:+.2} µs)",
            v / 1000.0,
            (v - p) / 1000.0
        );
        println!("  target: ≤ 1 µs added per connect");
        Ok(())
    })();
    drop(plain);
    let _ = std::fs::remove_dir(&cgroup);
    result
}

/// One proxy of the policy benchmark.
struct Variant {
    /// Label in the report.
    name: &'static str,
    /// Extra TOML for the service table.
    service: &'static str,
    /// Extra redis-benchmark arguments.
    client: &'static [&'static str],
}

/// Non-pipelined SET through a plain proxy, one with a 100% write mirror, one with client
/// auth and one with per-command stats, alternating in one run; prints each against the
/// plain proxy.
fn policy(root: &Path, args: &BenchArgs) -> Result<()> {
    let bin = build_proxy(root)?;
    let primary = RedisServer::start();
    let staging = RedisServer::start();
    let dir = redis_intercept_e2e::tempfile_dir();
    let variants = [
        Variant {
            name: "plain",
            service: "",
            client: &[],
        },
        Variant {
            name: "100% write mirror",
            service: "[[service.mirror]]\nupstream = \"staging\"\npercentage = 100.0\nexclude_reads = true\n",
            client: &[],
        },
        Variant {
            name: "client auth",
            service: "[service.auth]\npasswords = [\"bench-secret\"]\n",
            client: &["-a", "bench-secret"],
        },
        Variant {
            name: "command stats",
            service: "command_stats = true\n",
            client: &[],
        },
    ];
    let mut proxies = Vec::new();
    for v in &variants {
        let addr = SocketAddr::from(([127, 0, 0, 1], redis_intercept_e2e::free_port()));
        let toml = format!(
            "[proxy]\nworkers = {}\n\n[[upstream]]\nname = \"main\"\nmode = \"standalone\"\nnodes = [\"{}\"]\n\n\
             [[upstream]]\nname = \"staging\"\nmode = \"standalone\"\nnodes = [\"{}\"]\n\n\
             [[service]]\nname = \"bench\"\nlisten = \"{addr}\"\nupstream = \"main\"\n{}",
            args.workers, primary.addr, staging.addr, v.service
        );
        proxies.push(ProxyProcess::start_config(&bin, dir.path(), addr, &toml)?);
    }
    let set = &WORKLOADS[0];
    let mut rps = vec![Vec::new(); variants.len()];
    let mut cpu = vec![Vec::new(); variants.len()];
    let primary_pid = [primary.pid().context("redis-server is not running")?];
    let staging_pid = staging.pid().context("redis-server is not running")?;
    // The mirror's redis-server per request, per variant and round, apart from the primary.
    let mut mirror_redis = vec![Vec::new(); variants.len()];
    for round in 0..args.rounds {
        for k in 0..variants.len() {
            // Rotate the order so drift on a shared machine hits every variant.
            let i = (k + round) % variants.len();
            let m0 = cpu_seconds(staging_pid)?;
            let (r, used) = measured(args.requests, Some(proxies[i].pid()), &primary_pid, || {
                benchmark_with(proxies[i].addr, set, args.requests, variants[i].client)
            })?;
            mirror_redis[i].push((cpu_seconds(staging_pid)? - m0) * 1e6 / args.requests as f64);
            cpu[i].push(used);
            rps[i].push(r);
        }
        say(&format!("round {}/{} done", round + 1, args.rounds));
    }
    println!();
    println!(
        "{:<20} {:>10} {:>6}  {:>7} {:>11} {:>7} {:>7} {:>7} {:>8}  {:>8} {:>8}  target",
        "SET, -c 50",
        "rps",
        "ratio",
        "client",
        "proxy (sys)",
        "Redis",
        "mirror",
        "total",
        "machine",
        "ceiling",
        "machine"
    );
    let plain = median_cpu(&cpu[0]);
    for (i, target) in [
        (0, ""),
        (1, "≥0.90"),
        (2, "≥0.98 (≤ 2% cost)"),
        (3, "(no target; its cost)"),
    ] {
        let c = median_cpu(&cpu[i]);
        let m = median(&mut mirror_redis[i].clone());
        println!(
            "{:<20} {:>10.0} {:>6.2}  {:>7.2} {:>11} {:>7.2} {:>7.2} {:>7.2} {:>8.2}  {:>8.2} {:>8.2}  {target}",
            variants[i].name,
            median(&mut rps[i].clone()),
            round_ratio(&rps[i], &rps[0]),
            c.client,
            format!("{:.2} ({:.2})", c.proxy, c.proxy_sys),
            c.redis,
            m,
            c.total() + m,
            c.machine,
            (plain.total() + median(&mut mirror_redis[0].clone())) / (c.total() + m),
            plain.machine / c.machine
        );
    }
    println!(
        "(ratio: median over rounds of rps / plain rps in the same round; CPU: µs per request, \
         medians; Redis: the primary redis-server; mirror: the mirror's redis-server, which \
         shares the cores with the client, the proxy and the primary here; machine: all CPUs, \
         from /proc/stat; ceiling: plain CPU per request / this variant's, the ratio if both \
         runs were bound by the machine's CPU alone, from the processes' times and from the \
         machine's)"
    );
    let mirror = median(&mut mirror_redis[1].clone());
    println!(
        "Mirror bound: even if the proxy's copies cost nothing, the mirror's redis-server's \
         {mirror:.2} µs per request on these cores caps a CPU-bound run at plain machine / \
         (plain machine + mirror) = {:.2}",
        plain.machine / (plain.machine + mirror)
    );
    Ok(())
}

/// Opens `n` client connections, sends each one PING, and reports the proxy's RSS growth per
/// connection while they sit idle.
fn idle_clients(proxy: &ProxyProcess, n: usize) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    let _ = rlimit::increase_nofile_limit(n as u64 + 1024);
    let before = status_kib(proxy.pid(), "VmRSS")?;
    let mut conns = Vec::with_capacity(n);
    for _ in 0..n {
        let mut c = TcpStream::connect(proxy.addr).context("open idle client")?;
        c.write_all(b"*1\r\n$4\r\nPING\r\n")?;
        conns.push(c);
    }
    for c in &mut conns {
        let mut pong = [0u8; 7];
        c.read_exact(&mut pong)?;
    }
    std::thread::sleep(Duration::from_millis(500));
    let after = status_kib(proxy.pid(), "VmRSS")?;
    let per = (after.saturating_sub(before)) as f64 * 1024.0 / n as f64;
    println!(
        "idle clients: {n} connected (each sent one PING): RSS {:.1} → {:.1} MiB, {:.1} KiB per client (target ≤ 16 KiB)",
        before as f64 / 1024.0,
        after as f64 / 1024.0,
        per / 1024.0
    );
    Ok(())
}
