//! Harness for end-to-end tests, the demo and the benchmark: real `redis-server` processes on
//! free loopback ports in temporary directories, killed when dropped, and a tiny blocking RESP
//! client for checks that must not go through the proxy.
//!
//! Panics are the error handling here: this is test support, and a panic with the server log
//! is the most useful failure.
#![expect(clippy::unwrap_used, clippy::expect_used, reason = "test support code")]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use redis_intercept::resp::{Frame, Limits};

/// The redis-server binary: `$REDIS_SERVER_BIN`, else `redis-server` on PATH.
pub fn redis_server_bin() -> String {
    std::env::var("REDIS_SERVER_BIN").unwrap_or_else(|_| "redis-server".to_owned())
}

/// A port that was free a moment ago on 127.0.0.1. Callers retry if it's taken by the time
/// they bind it.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0")
}

/// A redis-server child process with its own directory and log.
pub struct RedisServer {
    /// The running process, killed on drop.
    child: Option<Child>,
    /// Working directory holding the log (and any dump), removed on drop.
    dir: tempfile::TempDir,
    /// Extra arguments, kept to restart the server the same way.
    extra: Vec<String>,
    /// Where clients reach it.
    pub addr: SocketAddr,
}

impl RedisServer {
    /// Starts a plain standalone server.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts a server with extra `redis-server` arguments, e.g. `["--requirepass", "x"]`.
    pub fn start_with(extra: &[&str]) -> Self {
        Self::start_on(std::net::IpAddr::from([127, 0, 0, 1]), extra)
    }

    /// Starts a server listening on `ip` (a loopback address such as a test VIP, or `::1`).
    pub fn start_on(ip: std::net::IpAddr, extra: &[&str]) -> Self {
        let extra: Vec<String> = extra.iter().map(|s| (*s).to_owned()).collect();
        let mut dir = tempfile::Builder::new()
            .prefix("ri-redis-")
            .tempdir()
            .expect("temp dir");
        for _attempt in 0..10 {
            let port = free_port();
            let mut server = RedisServer {
                child: None,
                dir,
                extra: extra.clone(),
                addr: SocketAddr::new(ip, port),
            };
            match server.spawn() {
                Ok(()) => return server,
                Err(log) if log.contains("Address already in use") => {
                    dir = server.take_dir();
                }
                Err(log) => panic!("redis-server on port {port} did not start:\n{log}"),
            }
        }
        panic!("no free port for redis-server after 10 attempts");
    }

    fn take_dir(mut self) -> tempfile::TempDir {
        self.kill();
        let placeholder = tempfile::tempdir().expect("temp dir");
        std::mem::replace(&mut self.dir, placeholder)
    }

    /// Path of the server's log file.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    /// The server log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn spawn(&mut self) -> Result<(), String> {
        let _ = std::fs::remove_file(self.log_path());
        let child = Command::new(redis_server_bin())
            .arg("--bind")
            .arg(self.addr.ip().to_string())
            .arg("--port")
            .arg(self.addr.port().to_string())
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(self.log_path())
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| {
                format!(
                    "cannot run {}: {e} (run `cargo xtask setup` to install redis-server)",
                    redis_server_bin()
                )
            })?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                return Err(format!("exited with {status}\n{}", self.log()));
            }
            if TcpStream::connect(self.addr).is_ok() && self.log().contains("Ready to accept") {
                return Ok(());
            }
            if Instant::now() > deadline {
                self.kill();
                return Err(format!("not ready within 10s\n{}", self.log()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the server (SIGKILL) and waits for it; the address stays reserved for
    /// [`RedisServer::restart`].
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port, with the same arguments.
    pub fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.spawn() {
                Ok(()) => return,
                Err(log) if Instant::now() < deadline && log.contains("Address already in use") => {
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(log) => panic!("restart of redis-server on {} failed:\n{log}", self.addr),
            }
        }
    }

    /// The server's process id, if it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends one command straight to the server (not through the proxy).
    pub fn cmd(&self, args: &[&str]) -> Frame {
        raw_command(self.addr, args)
    }

    /// How many times the server has executed `command` (lower case, as `INFO
    /// commandstats` names it), so a test can tell which server served its requests.
    pub fn calls(&self, command: &str) -> u64 {
        let Frame::Bulk(info) = self.cmd(&["INFO", "commandstats"]) else {
            panic!("INFO commandstats")
        };
        let prefix = format!("cmdstat_{command}:calls=");
        String::from_utf8_lossy(&info)
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|rest| rest.split(',').next()?.parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- log of redis-server {} ---\n{}", self.addr, self.log());
        }
        self.kill();
    }
}

/// Sends one command over a fresh blocking connection and returns the reply.
pub fn raw_command(addr: SocketAddr, args: &[&str]) -> Frame {
    let mut stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    stream.write_all(&encode(args)).unwrap();
    read_frame(&mut stream)
}

/// A command as RESP.
pub fn encode(args: &[&str]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        out.extend_from_slice(format!("${}\r\n{a}\r\n", a.len()).as_bytes());
    }
    out
}

/// Reads replies one at a time from a blocking stream, keeping bytes that arrived early.
pub struct RespReader {
    /// The connection.
    pub stream: TcpStream,
    /// Bytes received and not yet returned as a frame.
    buf: BytesMut,
}

impl RespReader {
    /// Wraps a connected stream with a 10 s read timeout.
    pub fn new(stream: TcpStream) -> Self {
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        RespReader {
            stream,
            buf: BytesMut::new(),
        }
    }

    /// Connects to `addr`.
    pub fn connect(addr: SocketAddr) -> Self {
        Self::new(TcpStream::connect(addr).unwrap())
    }

    /// Sends raw bytes.
    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    /// Sends one command and reads its reply.
    pub fn call(&mut self, args: &[&str]) -> Frame {
        self.send(&encode(args));
        self.read()
    }

    /// Reads the next reply.
    pub fn read(&mut self) -> Frame {
        self.read_both().0
    }

    /// Reads the next reply as the bytes that came over the wire, for byte-for-byte
    /// comparisons.
    pub fn read_raw(&mut self) -> Bytes {
        self.read_both().1
    }

    /// Sends one command and returns its reply's bytes.
    pub fn call_raw(&mut self, args: &[&str]) -> Bytes {
        self.send(&encode(args));
        self.read_raw()
    }

    /// Every frame that arrives until none has for `idle`, as bytes (invalidation pushes,
    /// pub/sub messages).
    pub fn drain_raw(&mut self, idle: Duration) -> Vec<Bytes> {
        let mut got = Vec::new();
        let mut chunk = [0u8; 64 * 1024];
        loop {
            let bytes = Bytes::copy_from_slice(&self.buf);
            if let Some((_, len)) = Frame::parse(&bytes, &Limits::default()).unwrap() {
                got.push(self.buf.split_to(len).freeze());
                continue;
            }
            self.stream.set_read_timeout(Some(idle)).unwrap();
            let read = self.stream.read(&mut chunk);
            self.stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            match read {
                Ok(n) => {
                    assert!(n > 0, "connection closed");
                    self.buf.extend_from_slice(&chunk[..n]);
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return got;
                }
                Err(e) => panic!("read failed: {e}"),
            }
        }
    }

    fn read_both(&mut self) -> (Frame, Bytes) {
        let mut chunk = [0u8; 64 * 1024];
        loop {
            let bytes = Bytes::copy_from_slice(&self.buf);
            if let Some((frame, len)) = Frame::parse(&bytes, &Limits::default()).unwrap() {
                return (frame, self.buf.split_to(len).freeze());
            }
            let n = self.stream.read(&mut chunk).unwrap();
            assert!(n > 0, "connection closed before a full reply");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// `+OK`.
pub fn ok() -> Frame {
    Frame::Simple("OK".into())
}

/// A bulk string reply holding `s`.
pub fn bulk(s: &str) -> Frame {
    Frame::Bulk(Bytes::copy_from_slice(s.as_bytes()))
}

/// Whether `f` is an error reply whose text contains `text`.
pub fn is_err(f: &Frame, text: &str) -> bool {
    matches!(f, Frame::Error(e) if String::from_utf8_lossy(e).contains(text))
}

/// Reads exactly one reply from a blocking stream that carries only that reply.
pub fn read_frame(stream: &mut TcpStream) -> Frame {
    RespReader::new(stream.try_clone().unwrap()).read()
}

/// Starts the proxy in-process with its real listeners: one service called `svc` on a free
/// loopback port in front of the standalone server `upstream`. `service_extra` is TOML added to
/// the `[[service]]` table (e.g. `op_timeout = "300ms"`).
pub fn start_proxy(upstream: SocketAddr, service_extra: &str) -> redis_intercept::app::Proxy {
    start_proxy_with(upstream, "", service_extra)
}

/// Like [`start_proxy`], with `top_extra` TOML (e.g. an `[admin]` table) before the upstream.
pub fn start_proxy_with(
    upstream: SocketAddr,
    top_extra: &str,
    service_extra: &str,
) -> redis_intercept::app::Proxy {
    start_proxy_full(upstream, top_extra, "", service_extra)
}

/// Like [`start_proxy_with`], with `upstream_extra` TOML (e.g. credentials) in the
/// `[[upstream]]` table.
pub fn start_proxy_full(
    upstream: SocketAddr,
    top_extra: &str,
    upstream_extra: &str,
    service_extra: &str,
) -> redis_intercept::app::Proxy {
    let text = format!(
        "[proxy]\nworkers = 2\ndrain_timeout = \"1s\"\n\n{top_extra}\n\
         [[upstream]]\nname = \"main\"\nmode = \"standalone\"\nnodes = [\"{upstream}\"]\n\
         connect_timeout = \"500ms\"\nreconnect_backoff_max = \"200ms\"\n{upstream_extra}\n\n\
         [[service]]\nname = \"svc\"\nlisten = \"127.0.0.1:0\"\nupstream = \"main\"\n{service_extra}\n"
    );
    start_proxy_config(&text)
}

/// Starts the proxy in-process in front of a cluster whose seeds are `seeds`: a service `svc`
/// with `service_extra`, an `[admin]` on a free port, and `upstream_extra` in the upstream.
pub fn start_cluster_proxy(
    seeds: &[String],
    upstream_extra: &str,
    service_extra: &str,
) -> redis_intercept::app::Proxy {
    let seeds: Vec<String> = seeds.iter().map(|s| format!("\"{s}\"")).collect();
    let text = format!(
        "[proxy]\nworkers = 2\ndrain_timeout = \"1s\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [[upstream]]\nname = \"main\"\nmode = \"cluster\"\nnodes = [{}]\n\
         connect_timeout = \"500ms\"\nreconnect_backoff_max = \"200ms\"\n{upstream_extra}\n\n\
         [[service]]\nname = \"svc\"\nlisten = \"127.0.0.1:0\"\nupstream = \"main\"\n{service_extra}\n",
        seeds.join(", ")
    );
    start_proxy_config(&text)
}

/// Starts the proxy in-process from config text with a service called `svc`, and waits until
/// that service accepts connections.
pub fn start_proxy_config(text: &str) -> redis_intercept::app::Proxy {
    let config = redis_intercept::config::Config::parse(text, "<test>").unwrap();
    let proxy = redis_intercept::app::start(&config).unwrap();
    wait_until(Duration::from_secs(5), || {
        TcpStream::connect(proxy.addr("svc").unwrap()).is_ok()
    });
    proxy
}

/// Sends a backlog to the proxy on `client`: 1000 SETs of 64 KiB (`big0`…`big999`), which
/// keep an upstream connection busy for a while. Read 1000 `OK`s afterwards.
pub fn send_backlog(client: &mut RespReader) {
    let value = "x".repeat(64 * 1024);
    let batch: Vec<u8> = (0..1000)
        .flat_map(|i| encode(&["SET", &format!("big{i}"), &value]))
        .collect();
    client.send(&batch);
}

/// Applies config `text` to a running proxy, as SIGHUP does; returns the notes.
pub fn reload(proxy: &redis_intercept::app::Proxy, text: &str) -> Vec<String> {
    proxy
        .reload(&redis_intercept::config::Config::parse(text, "reload").unwrap())
        .unwrap()
}

/// The `redis-intercept` binary next to the running test's executable (`cargo build -p
/// redis-intercept` builds it; `cargo xtask test` does).
pub fn proxy_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(std::path::Path::parent).unwrap();
    let bin = dir.join("redis-intercept");
    assert!(bin.exists(), "{} not built", bin.display());
    bin
}

/// The proxy binary as a process of its own (for what a test must measure per process, such
/// as memory), killed when dropped.
pub struct ProxyChild {
    /// The process.
    pub child: Child,
    /// Holds the config file.
    _dir: tempfile::TempDir,
}

impl ProxyChild {
    /// Starts `redis-intercept run` with config `text`, and waits until `addr` answers PING.
    pub fn start(text: &str, addr: SocketAddr) -> ProxyChild {
        let dir = tempfile_dir();
        let file = dir.path().join("proxy.toml");
        std::fs::write(&file, text).unwrap();
        let child = Command::new(proxy_bin())
            .args(["run", "--config"])
            .arg(&file)
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let proxy = ProxyChild { child, _dir: dir };
        wait_until(Duration::from_secs(10), || {
            TcpStream::connect(addr).is_ok_and(|s| {
                let mut r = RespReader::new(s);
                r.call(&["PING"]) == Frame::Simple(Bytes::from_static(b"PONG"))
            })
        });
        proxy
    }

    /// A `/proc/PID/status` field in KiB (`VmRSS`, `VmHWM`, …).
    pub fn status_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("no {field} in /proc status"))
    }
}

impl Drop for ProxyChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `f` every 20ms until it returns true; panics after `limit`.
pub fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(
            Instant::now() < deadline,
            "condition not met within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `redis-cli` with `args` against `addr` and returns its stdout (panics on failure to
/// start).
pub fn redis_cli(addr: SocketAddr, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .arg("-h")
        .arg(addr.ip().to_string())
        .arg("-p")
        .arg(addr.port().to_string())
        .args(args)
        .output()
        .expect("run redis-cli (cargo xtask setup installs redis-tools)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `GET path` on the admin endpoint at `addr`: status and body.
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    http_request(addr, "GET", path, &[])
}

/// One HTTP/1.1 request with extra header lines (`"Authorization: Bearer x"`): status and
/// body.
pub fn http_request(addr: SocketAddr, method: &str, path: &str, headers: &[&str]) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let extra: String = headers.iter().map(|h| format!("{h}\r\n")).collect();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\n{extra}Content-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad HTTP response: {response}"));
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// A Redis Sentinel (`redis-server --sentinel`) monitoring one master as `m`, with short
/// timeouts so a failover takes seconds. Killed (by its pid) when dropped.
pub struct RedisSentinel {
    /// The running process.
    child: Child,
    /// Holds its config file (which Sentinel rewrites) and log.
    dir: tempfile::TempDir,
    /// Where clients reach it.
    pub addr: SocketAddr,
    /// The sentinel's own `requirepass`, if any.
    password: Option<String>,
}

impl RedisSentinel {
    /// Starts a sentinel that monitors `master` as `m` with quorum 1: it alone decides a
    /// failover, after `down_after_ms` without an answer.
    pub fn start(master: SocketAddr, down_after_ms: u32) -> RedisSentinel {
        Self::start_on(free_port(), master, down_after_ms)
    }

    /// Like [`RedisSentinel::start`], on `port` of 127.0.0.1.
    pub fn start_on(port: u16, master: SocketAddr, down_after_ms: u32) -> RedisSentinel {
        Self::start_full(port, master, down_after_ms, None)
    }

    /// Like [`RedisSentinel::start`], with `requirepass password` on the sentinel itself.
    pub fn start_with_password(master: SocketAddr, password: &str) -> RedisSentinel {
        Self::start_full(free_port(), master, 5000, Some(password))
    }

    fn start_full(
        port: u16,
        master: SocketAddr,
        down_after_ms: u32,
        password: Option<&str>,
    ) -> RedisSentinel {
        let dir = tempfile::Builder::new()
            .prefix("ri-sentinel-")
            .tempdir()
            .expect("temp dir");
        let conf = dir.path().join("sentinel.conf");
        let ip = master.ip();
        let mport = master.port();
        std::fs::write(
            &conf,
            format!(
                "bind 127.0.0.1\nport {port}\ndir {dir}\nlogfile {dir}/sentinel.log\n\
                 sentinel monitor m {ip} {mport} 1\n\
                 sentinel down-after-milliseconds m {down_after_ms}\n\
                 sentinel failover-timeout m 2000\n{}",
                password.map_or(String::new(), |p| format!("requirepass {p}\n")),
                dir = dir.path().display()
            ),
        )
        .expect("write sentinel.conf");
        let child = Command::new(redis_server_bin())
            .arg(&conf)
            .arg("--sentinel")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run redis-server --sentinel");
        let sentinel = RedisSentinel {
            child,
            dir,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            password: password.map(str::to_owned),
        };
        wait_until(Duration::from_secs(10), || {
            TcpStream::connect(sentinel.addr).is_ok() && sentinel.master() == Some(master)
        });
        sentinel
    }

    /// The master of `m` as the sentinel sees it now.
    pub fn master(&self) -> Option<SocketAddr> {
        let stream = TcpStream::connect(self.addr).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        let mut stream = stream;
        if let Some(p) = &self.password {
            stream.write_all(&encode(&["AUTH", p])).ok()?;
            read_frame(&mut stream);
        }
        stream
            .write_all(&encode(&["SENTINEL", "get-master-addr-by-name", "m"]))
            .ok()?;
        match read_frame(&mut stream) {
            Frame::Array(parts) => match parts.as_slice() {
                [Frame::Bulk(ip), Frame::Bulk(port)] => format!(
                    "{}:{}",
                    String::from_utf8_lossy(ip),
                    String::from_utf8_lossy(port)
                )
                .parse()
                .ok(),
                _ => None,
            },
            _ => None,
        }
    }

    /// Sends one command to the sentinel.
    pub fn cmd(&self, args: &[&str]) -> Frame {
        raw_command(self.addr, args)
    }

    /// The sentinel's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sentinel.log")).unwrap_or_default()
    }
}

impl Drop for RedisSentinel {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- log of sentinel {} ---\n{}", self.addr, self.log());
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A Redis Cluster of real redis-server processes (each in its own directory, so a killed node
/// restarts with its `nodes.conf`).
pub struct RedisCluster {
    /// Every node, masters first as `redis-cli --cluster create` assigned them.
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts `masters × (1 + replicas)` nodes, creates the cluster with
    /// `redis-cli --cluster create … --cluster-replicas R`, and waits until every node reports
    /// `cluster_state:ok` and the same slot table.
    pub fn start(masters: usize, replicas: usize) -> RedisCluster {
        let nodes: Vec<RedisServer> = (0..masters * (1 + replicas))
            .map(|_| {
                RedisServer::start_with(&[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "2000",
                ])
            })
            .collect();
        let addrs: Vec<String> = nodes.iter().map(|n| n.addr.to_string()).collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .output()
            .expect("run redis-cli --cluster create");
        assert!(
            out.status.success(),
            "cluster create failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let cluster = RedisCluster { nodes };
        cluster.wait_consistent(Duration::from_secs(30));
        // Replicas attach after `create` returns; wait until every range lists them.
        wait_until(Duration::from_secs(30), || {
            let table = slots_without_ids(&cluster.nodes[0].cmd(&["CLUSTER", "SLOTS"]));
            !table.is_empty()
                && table
                    .iter()
                    .all(|(_, _, nodes)| nodes.len() == 1 + replicas)
        });
        cluster.wait_consistent(Duration::from_secs(30));
        cluster
    }

    /// Addresses of every node, as seeds.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.nodes.iter().map(|n| n.addr).collect()
    }

    /// Reads `key` from the node that owns its slot, asked directly.
    pub fn get_from_owner(&self, key: &str) -> Frame {
        let map = redis_intercept::cluster::SlotMap::from_cluster_slots(
            &self.nodes[0].cmd(&["CLUSTER", "SLOTS"]),
            "127.0.0.1",
        )
        .unwrap();
        let owner = map
            .master(redis_intercept::cluster::Slot::for_key(key.as_bytes()))
            .unwrap();
        let node = self
            .nodes
            .iter()
            .find(|n| n.addr.to_string() == owner)
            .unwrap();
        node.cmd(&["GET", key])
    }

    /// Waits until every running node says `cluster_state:ok` and agrees on `CLUSTER SLOTS`.
    pub fn wait_consistent(&self, limit: Duration) {
        wait_until(limit, || {
            let mut tables = Vec::new();
            for node in self.nodes.iter().filter(|n| n.pid().is_some()) {
                let info = match node.cmd(&["CLUSTER", "INFO"]) {
                    Frame::Bulk(b) => String::from_utf8_lossy(&b).into_owned(),
                    _ => return false,
                };
                if !info.contains("cluster_state:ok") {
                    return false;
                }
                tables.push(slots_without_ids(&node.cmd(&["CLUSTER", "SLOTS"])));
            }
            tables.windows(2).all(|w| w[0] == w[1])
        });
    }
}

/// A CLUSTER SLOTS reply with node ids and metadata dropped and ranges sorted, for comparing
/// what nodes believe.
fn slots_without_ids(reply: &Frame) -> Vec<(i64, i64, Vec<String>)> {
    let Frame::Array(ranges) = reply else {
        return Vec::new();
    };
    let mut out: Vec<(i64, i64, Vec<String>)> = ranges
        .iter()
        .filter_map(|r| {
            let Frame::Array(p) = r else { return None };
            let (Frame::Integer(s), Frame::Integer(e)) = (p.first()?, p.get(1)?) else {
                return None;
            };
            let nodes = p[2..]
                .iter()
                .filter_map(|n| match n {
                    Frame::Array(n) => match (n.first(), n.get(1)) {
                        (Some(Frame::Bulk(h)), Some(Frame::Integer(port))) => {
                            Some(format!("{}:{port}", String::from_utf8_lossy(h)))
                        }
                        _ => None,
                    },
                    _ => None,
                })
                .collect();
            Some((*s, *e, nodes))
        })
        .collect();
    out.sort();
    out
}

/// A temporary directory (for configs and secrets of tools built on this harness).
pub fn tempfile_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("ri-")
        .tempdir()
        .expect("temp dir")
}

/// A throwaway CA with a server certificate (for `localhost` and 127.0.0.1) and a client
/// certificate, written as PEM files, for TLS tests.
pub struct TestCerts {
    /// Holds the files.
    pub dir: tempfile::TempDir,
}

impl TestCerts {
    /// Generates the CA and both certificates.
    pub fn generate() -> TestCerts {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        };
        let dir = tempfile_dir();
        let write = |name: &str, pem: String| std::fs::write(dir.path().join(name), pem).unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "redis-intercept test CA");
        let ca_key = KeyPair::generate().unwrap();
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        write("ca.pem", ca_cert.pem());
        for (name, usage) in [
            ("server", ExtendedKeyUsagePurpose::ServerAuth),
            ("client", ExtendedKeyUsagePurpose::ClientAuth),
        ] {
            let mut params =
                CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
                    .unwrap();
            params.distinguished_name.push(DnType::CommonName, name);
            params.extended_key_usages = vec![usage];
            let key = KeyPair::generate().unwrap();
            let cert = params.signed_by(&key, &ca_cert, &ca_key).unwrap();
            write(&format!("{name}.pem"), cert.pem());
            write(&format!("{name}.key"), key.serialize_pem());
        }
        TestCerts { dir }
    }

    /// Path of one of the files: `ca.pem`, `server.pem`, `server.key`, `client.pem`,
    /// `client.key`.
    pub fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }
}

/// A cgroup2 directory made for one test, removed (with the children made through it) when
/// dropped. Never the cgroup2 root: programs are attached only here.
pub struct TestCgroup {
    /// The directory.
    pub path: PathBuf,
    /// Children made with [`TestCgroup::child`], removed deepest first.
    children: std::cell::RefCell<Vec<PathBuf>>,
}

impl TestCgroup {
    /// Makes `<cgroup2 mount>/ri-test-<pid>-<label>`. Panics (with the reason) when not root
    /// or without cgroup2: these tests must not pass silently.
    pub fn new(label: &str) -> TestCgroup {
        let uid = Command::new("id").arg("-u").output().expect("run id");
        assert_eq!(
            String::from_utf8_lossy(&uid.stdout).trim(),
            "0",
            "interception tests need root (CAP_BPF, CAP_SYS_ADMIN, CAP_NET_ADMIN)"
        );
        let mount = redis_intercept::intercept::cgroup2_mount().expect("a cgroup2 mount");
        let path = mount.join(format!("ri-test-{}-{label}", std::process::id()));
        let _ = std::fs::remove_dir(&path);
        std::fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        TestCgroup {
            path,
            children: std::cell::RefCell::new(Vec::new()),
        }
    }

    /// Makes `relative` (e.g. `a/b`) below this cgroup and returns its path.
    pub fn child(&self, relative: &str) -> PathBuf {
        let mut path = self.path.clone();
        for part in relative.split('/') {
            path = path.join(part);
            if !path.exists() {
                std::fs::create_dir(&path)
                    .unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
                self.children.borrow_mut().push(path.clone());
            }
        }
        path
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        for child in self.children.borrow().iter().rev() {
            let _ = std::fs::remove_dir(child);
        }
        let _ = std::fs::remove_dir(&self.path);
    }
}

/// Whether `bpftool cgroup show DIR` lists a program of ours.
pub fn our_programs_on(cgroup: &std::path::Path) -> bool {
    let out = Command::new("bpftool")
        .args(["cgroup", "show"])
        .arg(cgroup)
        .output()
        .expect("run bpftool (cargo xtask setup installs it)");
    String::from_utf8_lossy(&out.stdout).contains("redis_intercept")
}
