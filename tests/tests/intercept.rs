//! End-to-end eBPF interception, as root: unmodified clients in a test cgroup dialling a VIP
//! are served by the proxy; the same clients outside reach the VIP's own server. VIPs are
//! loopback addresses (127.0.100.x, ::1) or live in a network namespace the test makes; the
//! programs attach only to the test's own cgroup.
#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests panic on failure"
)]

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use redis_intercept_e2e::{
    RedisServer, TestCgroup, free_port, http_get, our_programs_on, proxy_bin, start_proxy_config,
    wait_until,
};

/// Runs `ri-probe` (in `cgroup` if given): returns (peer address, reply line).
fn probe(cgroup: Option<&Path>, addr: &str, cmd: &[&str]) -> (String, String) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ri-probe"));
    if let Some(cg) = cgroup {
        c.arg("--cgroup").arg(cg);
    }
    let out = c.arg(addr).args(cmd).output().expect("run ri-probe");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "ri-probe {addr} failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let field = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(k))
            .unwrap_or_default()
            .to_owned()
    };
    (field("peer="), field("reply="))
}

/// A backend holding who=backend, and a server on the VIP itself holding who=vip.
fn servers(vip_ip: &str) -> (RedisServer, RedisServer) {
    let backend = RedisServer::start();
    backend.cmd(&["SET", "who", "backend"]);
    let vip = RedisServer::start_on(vip_ip.parse().unwrap(), &[]);
    vip.cmd(&["SET", "who", "vip"]);
    (backend, vip)
}

fn config(backend: SocketAddr, vips: &[SocketAddr], listen: &str, intercept: &str) -> String {
    let vips: Vec<String> = vips.iter().map(|v| format!("\"{v}\"")).collect();
    format!(
        "[proxy]\nworkers = 1\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n[intercept]\n{intercept}\n\n\
         [[upstream]]\nname = \"main\"\nmode = \"standalone\"\nnodes = [\"{backend}\"]\n\n\
         [[service]]\nname = \"svc\"\nlisten = \"{listen}\"\nupstream = \"main\"\nvips = [{}]\n",
        vips.join(", ")
    )
}

/// Runs `command`, asserts it succeeded, and returns what it printed.
fn stdout_of(command: &mut Command) -> String {
    let out = command.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{command:?}: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// Runs `redis-intercept cgroup ARGS` against the proxy's admin endpoint.
fn cgroup_cli(admin: SocketAddr, args: &[&str]) -> String {
    stdout_of(
        Command::new(proxy_bin())
            .arg("cgroup")
            .args(args)
            .arg("--admin")
            .arg(admin.to_string()),
    )
}

#[test]
fn vip_is_served_by_the_proxy_inside_the_cgroup_only_with_nested_toggles() {
    let cg = TestCgroup::new("toggle");
    let (backend, vip_server) = servers("127.0.100.1");
    let vip = vip_server.addr;
    let proxy = start_proxy_config(&config(
        backend.addr,
        &[vip],
        "127.0.0.1:0",
        &format!(
            "cgroup = \"{}\"\ndefault = \"off\"\nenable = [\"{}\"]",
            cg.path.display(),
            cg.path.display()
        ),
    ));
    let admin = proxy.admin_addr().unwrap();
    wait_until(Duration::from_secs(10), || our_programs_on(&cg.path));
    let v = vip.to_string();
    // An unmodified client in the cgroup reaches the proxy (and so the backend), and
    // getpeername still says it talks to the VIP.
    let (peer, reply) = probe(Some(&cg.path), &v, &["GET", "who"]);
    assert_eq!(reply, "backend");
    assert_eq!(peer, v, "getpeername returns the VIP");
    // The same client outside reaches the VIP's own server.
    assert_eq!(probe(None, &v, &["GET", "who"]).1, "vip");
    // Disable a child, enable a grandchild under it.
    let child = cg.child("svc");
    let grandchild = cg.child("svc/proc");
    cgroup_cli(admin, &["disable", &child.display().to_string()]);
    cgroup_cli(admin, &["enable", &grandchild.display().to_string()]);
    assert_eq!(probe(Some(&child), &v, &["GET", "who"]).1, "vip");
    assert_eq!(probe(Some(&grandchild), &v, &["GET", "who"]).1, "backend");
    let list = cgroup_cli(admin, &["list"]);
    assert!(
        list.contains(&format!("{}\t", child.display())) && list.contains("disable"),
        "{list}"
    );
    assert!(list.contains("redirected"), "{list}");
    // Clear: the child follows its parent (enabled) again.
    cgroup_cli(admin, &["clear", &child.display().to_string()]);
    assert_eq!(probe(Some(&child), &v, &["GET", "who"]).1, "backend");
    // A setting whose directory went away is listed as such.
    cgroup_cli(admin, &["clear", &grandchild.display().to_string()]);
    let gone = cg.child("gone");
    cgroup_cli(admin, &["disable", &gone.display().to_string()]);
    std::fs::remove_dir(&gone).unwrap();
    let list = cgroup_cli(admin, &["list"]);
    let line = list.lines().find(|l| l.contains("gone")).unwrap();
    assert!(line.ends_with("no"), "{list}");
    let (status, _) = http_get(admin, "/cgroups");
    assert_eq!(status, 200);
    // Three connects were redirected (the cgroup, the grandchild, the cleared child) and one
    // left alone by policy (the disabled child); the probes outside never reach the hook.
    let (_, metrics) = http_get(admin, "/metrics");
    let count = |result: &str| -> f64 {
        let prefix = format!("redis_intercept_intercepted_connects{{result=\"{result}\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.parse().ok())
            .unwrap_or(-1.0)
    };
    assert_eq!(count("redirected"), 3.0, "{metrics}");
    assert_eq!(count("skipped_policy"), 1.0, "{metrics}");
    assert_eq!(count("skipped_mark"), 0.0, "{metrics}");
    proxy.shutdown();
    // Detached at shutdown: connects go straight to the VIP again.
    assert!(!our_programs_on(&cg.path));
    assert_eq!(probe(Some(&cg.path), &v, &["GET", "who"]).1, "vip");
}

#[test]
fn fail_open_on_kill_9_and_no_loop_when_the_upstream_is_the_vip() {
    let cg = TestCgroup::new("failopen");
    let (_backend, vip_server) = servers("127.0.100.2");
    let vip = vip_server.addr;
    let listen = format!("127.0.0.1:{}", free_port());
    let log = tempfile::NamedTempFile::new().unwrap();
    // The agent runs inside the intercepted cgroup and its upstream is the VIP itself: only
    // its socket mark keeps it from being sent to itself. Started with the command-line
    // shorthand (--vip, --cgroup). Killed on drop if an assertion fails first.
    let mut agent = Agent(
        Command::new("sh")
            .arg("-c")
            .arg(format!(
                "echo $$ > {cg}/cgroup.procs && exec {bin} run --workers 1 --listen {listen} \
             --upstream {vip} --vip {vip} --cgroup {cg}",
                cg = cg.path.display(),
                bin = proxy_bin().display(),
            ))
            .stderr(log.reopen().unwrap())
            .spawn()
            .unwrap(),
    );
    wait_until(Duration::from_secs(10), || our_programs_on(&cg.path));
    // Its start-up log has no warning from aya about the socket-storage maps, which it loads
    // on purpose.
    let text = || std::fs::read_to_string(log.path()).unwrap();
    wait_until(Duration::from_secs(5), || {
        text().contains("eBPF interception attached")
    });
    assert!(!text().contains("unsupported in Aya"), "{}", text());
    let v = vip.to_string();
    // Through the proxy (which refuses DEBUG SLEEP in its own words), and no loop: the
    // proxy's upstream connection to the VIP reached the VIP's server.
    let (_, reply) = probe(Some(&cg.path), &v, &["DEBUG", "SLEEP", "0"]);
    assert!(reply.contains("redis-intercept"), "{reply}");
    assert_eq!(probe(Some(&cg.path), &v, &["GET", "who"]).1, "vip");
    let Ok(_) = Command::new("kill")
        .args(["-9", &agent.id().to_string()])
        .status()
    else {
        panic!("kill");
    };
    let _ = agent.wait();
    // The links died with the process: nothing of ours is attached, connects go direct.
    wait_until(Duration::from_secs(5), || !our_programs_on(&cg.path));
    let (peer, reply) = probe(Some(&cg.path), &v, &["DEBUG", "SLEEP", "0"]);
    assert!(
        reply.contains("DEBUG command not allowed"),
        "Redis itself answers: {reply}"
    );
    assert_eq!(peer, v);
}

#[test]
fn ipv6_vips_and_v4_mapped_connects() {
    let cg = TestCgroup::new("v6");
    let backend = RedisServer::start();
    backend.cmd(&["SET", "who", "backend"]);
    let v6_server = RedisServer::start_on("::1".parse().unwrap(), &[]);
    v6_server.cmd(&["SET", "who", "vip6"]);
    let v4_server = RedisServer::start_on("127.0.100.3".parse().unwrap(), &[]);
    let v6 = v6_server.addr;
    let v4 = v4_server.addr;
    // Two services: one listening on ::1 for the IPv6 VIP, one on 127.0.0.1 for the IPv4 VIP.
    let text = format!(
        "{}\n[[service]]\nname = \"v4\"\nlisten = \"127.0.0.1:0\"\nupstream = \"main\"\nvips = [\"{v4}\"]\n",
        config(
            backend.addr,
            &[v6],
            "[::1]:0",
            &format!("cgroup = \"{}\"\ndefault = \"on\"", cg.path.display()),
        )
    );
    let proxy = start_proxy_config(&text);
    wait_until(Duration::from_secs(10), || our_programs_on(&cg.path));
    let (peer, reply) = probe(Some(&cg.path), &v6.to_string(), &["GET", "who"]);
    assert_eq!(reply, "backend");
    assert_eq!(peer, v6.to_string());
    assert_eq!(probe(None, &v6.to_string(), &["GET", "who"]).1, "vip6");
    // An IPv6 socket dialling the IPv4 VIP as ::ffff:a.b.c.d.
    let mapped = format!("[::ffff:{}]:{}", v4.ip(), v4.port());
    let (peer, reply) = probe(Some(&cg.path), &mapped, &["GET", "who"]);
    assert_eq!(reply, "backend");
    assert_eq!(peer, mapped, "getpeername keeps the v4-mapped VIP");
    proxy.shutdown();
}

/// A network namespace with a veth pair and no default route, removed on drop.
struct Pod {
    name: String,
    host_if: String,
}

impl Pod {
    /// A netns and veth pair named after this process and `tag` (one letter per test).
    fn new(tag: char, host_ip: &str, pod_ip: &str) -> Pod {
        let id = std::process::id();
        let pod = Pod {
            name: format!("ri-test-{id}-{tag}"),
            host_if: format!("rih{}{tag}", id % 100_000),
        };
        let pod_if = format!("rip{}{tag}", id % 100_000);
        let run = |args: &[&str]| {
            let out = Command::new("ip")
                .args(args)
                .output()
                .expect("run ip (iproute2)");
            assert!(
                out.status.success(),
                "ip {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        run(&["netns", "add", &pod.name]);
        run(&[
            "link",
            "add",
            &pod.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &pod_if,
        ]);
        run(&["link", "set", &pod_if, "netns", &pod.name]);
        run(&["addr", "add", &format!("{host_ip}/30"), "dev", &pod.host_if]);
        run(&["link", "set", &pod.host_if, "up"]);
        run(&[
            "-n",
            &pod.name,
            "addr",
            "add",
            &format!("{pod_ip}/30"),
            "dev",
            &pod_if,
        ]);
        run(&["-n", &pod.name, "link", "set", &pod_if, "up"]);
        run(&["-n", &pod.name, "link", "set", "lo", "up"]);
        pod
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

#[test]
fn a_pod_in_its_own_netns_reaches_the_proxy_over_its_veth() {
    let cg = TestCgroup::new("pod");
    let pod = Pod::new('a', "169.254.77.1", "169.254.77.2");
    let backend = RedisServer::start();
    backend.cmd(&["SET", "who", "backend"]);
    // The VIP: nothing listens on it in the pod's netns, so only a redirect can answer.
    let vip: SocketAddr = format!("127.0.100.4:{}", free_port()).parse().unwrap();
    let listen = format!("169.254.77.1:{}", free_port());
    let proxy = start_proxy_config(&config(
        backend.addr,
        &[vip],
        &listen,
        &format!(
            "cgroup = \"{}\"\ndefault = \"on\"\npod_addresses = [\"169.254.77.1\"]",
            cg.path.display()
        ),
    ));
    wait_until(Duration::from_secs(10), || our_programs_on(&cg.path));
    // Join the cgroup first (ip netns exec remounts /sys), then enter the netns.
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo $$ > {}/cgroup.procs && exec ip netns exec {} {} {vip} GET who",
            cg.path.display(),
            pod.name,
            env!("CARGO_BIN_EXE_ri-probe"),
        ))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("reply=backend"), "{text}");
    assert!(text.contains(&format!("peer={vip}")), "{text}");
    proxy.shutdown();
}

#[test]
fn reload_adds_and_removes_a_vip() {
    let cg = TestCgroup::new("reload");
    let (backend, first) = servers("127.0.100.5");
    let second = RedisServer::start_on(IpAddr::from([127, 0, 100, 6]), &[]);
    second.cmd(&["SET", "who", "vip"]);
    // A configured cgroup that doesn't exist yet is skipped with a log line, not fatal.
    let intercept = format!(
        "cgroup = \"{0}\"\ndefault = \"on\"\ndisable = [\"{0}/not-yet\"]",
        cg.path.display()
    );
    let text = config(backend.addr, &[first.addr], "127.0.0.1:0", &intercept);
    let proxy = start_proxy_config(&text);
    wait_until(Duration::from_secs(10), || our_programs_on(&cg.path));
    let (a, b) = (first.addr.to_string(), second.addr.to_string());
    assert_eq!(probe(Some(&cg.path), &a, &["GET", "who"]).1, "backend");
    assert_eq!(probe(Some(&cg.path), &b, &["GET", "who"]).1, "vip");
    // The service listens where it did (port 0 became a real port): keep that in the new file.
    let bound = proxy.addr("svc").unwrap();
    let next = config(backend.addr, &[second.addr], &bound.to_string(), &intercept);
    let notes = proxy
        .reload(&redis_intercept::config::Config::parse(&next, "reload").unwrap())
        .unwrap();
    assert!(notes.iter().all(|n| !n.contains("vips")), "{notes:?}");
    assert_eq!(
        probe(Some(&cg.path), &a, &["GET", "who"]).1,
        "vip",
        "removed"
    );
    assert_eq!(
        probe(Some(&cg.path), &b, &["GET", "who"]).1,
        "backend",
        "added"
    );
    proxy.shutdown();
}

#[test]
fn reload_applies_the_files_default_and_cgroup_settings() {
    let cg = TestCgroup::new("reload-cg");
    let (backend, vip_server) = servers("127.0.100.8");
    let v = vip_server.addr.to_string();
    let app = cg.child("app");
    let intercept = |default: &str, enable: &str, disable: &str| {
        format!(
            "cgroup = \"{}\"\ndefault = \"{default}\"\nenable = [{enable}]\ndisable = [{disable}]",
            cg.path.display()
        )
    };
    let quoted = format!("\"{}\"", app.display());
    let first = intercept("off", &quoted, "");
    let proxy = start_proxy_config(&config(
        backend.addr,
        &[vip_server.addr],
        "127.0.0.1:0",
        &first,
    ));
    wait_until(Duration::from_secs(10), || our_programs_on(&cg.path));
    assert_eq!(probe(Some(&app), &v, &["GET", "who"]).1, "backend");
    assert_eq!(probe(Some(&cg.path), &v, &["GET", "who"]).1, "vip");
    // The default turns on and the app's setting flips to off: both apply at once, and
    // nothing about [intercept] is left for a restart.
    let bound = proxy.addr("svc").unwrap().to_string();
    let reload = |intercept: &str| {
        let text = config(backend.addr, &[vip_server.addr], &bound, intercept);
        proxy
            .reload(&redis_intercept::config::Config::parse(&text, "reload").unwrap())
            .unwrap()
    };
    let notes = reload(&intercept("on", "", &quoted));
    assert!(notes.iter().all(|n| !n.contains("intercept")), "{notes:?}");
    assert_eq!(probe(Some(&app), &v, &["GET", "who"]).1, "vip");
    assert_eq!(probe(Some(&cg.path), &v, &["GET", "who"]).1, "backend");
    // A cgroup the file names before it exists is reported, and set by a later reload.
    let later = cg.path.join("later");
    let with_later = format!("{quoted}, \"{}\"", later.display());
    let notes = reload(&intercept("on", "", &with_later));
    assert!(
        notes
            .iter()
            .any(|n| n.contains("setting not applied") && n.contains("later")),
        "{notes:?}"
    );
    let later = cg.child("later");
    reload(&intercept("on", "", &with_later));
    assert_eq!(probe(Some(&later), &v, &["GET", "who"]).1, "vip");
    // A run-time change for a cgroup whose line didn't change survives a reload.
    let admin = proxy.admin_addr().unwrap();
    cgroup_cli(admin, &["enable", &later.display().to_string()]);
    reload(&intercept("on", "", &with_later));
    assert_eq!(probe(Some(&later), &v, &["GET", "who"]).1, "backend");
    // Dropped from the file: the app's setting is cleared and it follows the default (on).
    reload(&intercept("on", "", ""));
    assert_eq!(probe(Some(&app), &v, &["GET", "who"]).1, "backend");
    assert_eq!(probe(Some(&later), &v, &["GET", "who"]).1, "backend");
    // A service added by a reload: its VIP (where nothing listens) is intercepted at once.
    let vip2 = format!("127.0.100.8:{}", redis_intercept_e2e::free_port());
    let two = format!(
        "{}\n[[service]]\nname = \"two\"\nlisten = \"127.0.0.1:{}\"\nupstream = \"main\"\nvips = [\"{vip2}\"]\n",
        config(
            backend.addr,
            &[vip_server.addr],
            "127.0.0.1:0",
            &intercept("on", "", "")
        ),
        redis_intercept_e2e::free_port()
    );
    let notes = proxy
        .reload(&redis_intercept::config::Config::parse(&two, "reload").unwrap())
        .unwrap();
    assert_eq!(notes, Vec::<String>::new());
    assert_eq!(probe(Some(&app), &vip2, &["GET", "who"]).1, "backend");
    assert_eq!(probe(Some(&app), &v, &["GET", "who"]).1, "backend");
    proxy.shutdown();
}

#[test]
fn stale_programs_left_by_the_legacy_attach_call_are_removed_at_start() {
    let cg = TestCgroup::new("stale");
    // target/debug/deps/<test> → target/ebpf/…: the object the agent's build script built.
    let target = std::env::current_exe()
        .unwrap()
        .ancestors()
        .nth(3)
        .unwrap()
        .to_owned();
    let object = target.join("ebpf/bpfel-unknown-none/release/redis-intercept-ebpf");
    let pin = PathBuf::from(format!("/sys/fs/bpf/ri-test-{}", std::process::id()));
    let bpftool = |args: &[&str]| {
        let out = Command::new("bpftool").args(args).output().unwrap();
        assert!(
            out.status.success(),
            "bpftool {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    // An attachment made with BPF_PROG_ATTACH, as a crashed older agent could leave: it
    // outlives its process and its pins.
    bpftool(&[
        "prog",
        "loadall",
        &object.display().to_string(),
        &pin.display().to_string(),
    ]);
    bpftool(&[
        "cgroup",
        "attach",
        &cg.path.display().to_string(),
        "connect4",
        "pinned",
        &pin.join("redis_intercept_connect4").display().to_string(),
    ]);
    let _ = std::fs::remove_dir_all(&pin);
    assert!(our_programs_on(&cg.path));
    let backend = RedisServer::start();
    let proxy = start_proxy_config(&config(
        backend.addr,
        &["127.0.100.7:6379".parse().unwrap()],
        "127.0.0.1:0",
        &format!("cgroup = \"{}\"", cg.path.display()),
    ));
    let admin = proxy.admin_addr().unwrap();
    wait_until(Duration::from_secs(10), || {
        http_get(admin, "/cgroups").1.contains("(attached)")
    });
    proxy.shutdown();
    // Had the stale program stayed, it would still be listed after our links are gone.
    assert!(
        !our_programs_on(&cg.path),
        "the stale attachment was removed"
    );
}

/// Runs `ri-probe ADDR --check N` (in `cgroup` if given) and asserts every reply was right.
fn check_in_order(cgroup: Option<&Path>, addr: &str, n: usize) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ri-probe"));
    if let Some(cg) = cgroup {
        c.arg("--cgroup").arg(cg);
    }
    let out = c
        .args([addr, "--check", &n.to_string()])
        .output()
        .expect("run ri-probe");
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("checked="),
        "ri-probe --check {addr}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An agent process (or another server a test started) that is killed if a test fails before
/// stopping it, so that no agent (and no attached program) outlives its test.
struct Agent(std::process::Child);

impl std::ops::Deref for Agent {
    type Target = std::process::Child;
    fn deref(&self) -> &std::process::Child {
        &self.0
    }
}

impl std::ops::DerefMut for Agent {
    fn deref_mut(&mut self) -> &mut std::process::Child {
        &mut self.0
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Starts the agent binary inside `cgroup` with config `text` (the proxy's ends of
/// connections are paired only when it runs inside the attach cgroup). The directory holds
/// the file.
fn agent_in(cgroup: &Path, text: &str) -> (Agent, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("agent.toml");
    std::fs::write(&file, text).unwrap();
    let agent = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo $$ > {}/cgroup.procs && exec {} run --config {}",
            cgroup.display(),
            proxy_bin().display(),
            file.display()
        ))
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    (Agent(agent), dir)
}

/// The acceleration counters from `/cgroups`: paired, spliced, unpaired, backlogged.
fn accel_line(admin: SocketAddr) -> Vec<u64> {
    let (_, body) = http_get(admin, "/cgroups");
    let line = body
        .lines()
        .find(|l| l.starts_with("accelerate:"))
        .unwrap_or_else(|| panic!("no accelerate line in /cgroups: {body}"));
    line.split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect()
}

/// (paired, spliced, unpaired) from [`accel_line`].
fn accel_counters(admin: SocketAddr) -> (u64, u64, u64) {
    let n = accel_line(admin);
    (n[0], n[1], n[2])
}

/// What an acceleration test starts with: a test cgroup with `proxy` and `client` children,
/// a backend, a VIP on 127.0.100.`octet`, and free ports for the listener and admin.
struct Rig {
    cg: TestCgroup,
    proxy_cg: PathBuf,
    client_cg: PathBuf,
    backend: RedisServer,
    vip: SocketAddr,
    listen: SocketAddr,
    admin: SocketAddr,
}

impl Rig {
    fn new(label: &str, octet: u8) -> Rig {
        let cg = TestCgroup::new(label);
        Rig {
            proxy_cg: cg.child("proxy"),
            client_cg: cg.child("client"),
            cg,
            backend: RedisServer::start(),
            vip: SocketAddr::from(([127, 0, 100, octet], free_port())),
            listen: SocketAddr::from(([127, 0, 0, 1], free_port())),
            admin: SocketAddr::from(([127, 0, 0, 1], free_port())),
        }
    }

    /// The agent's config: one service on `listen` for `vip`, interception of `cg` on by
    /// default with `accelerate`, and the admin endpoint on `admin`.
    fn config(&self) -> String {
        config(
            self.backend.addr,
            &[self.vip],
            &self.listen.to_string(),
            &format!(
                "cgroup = \"{}\"\ndefault = \"on\"\naccelerate = true",
                self.cg.path.display()
            ),
        )
        .replace("127.0.0.1:0", &self.admin.to_string())
    }
}

#[test]
fn accelerated_connections_are_spliced_in_order_and_unpaired_ones_use_tcp() {
    let rig = Rig::new("accel", 10);
    let agent_config = rig.config();
    // Bound before the agent, so that it is killed before the cgroups are removed.
    let Rig {
        cg,
        proxy_cg,
        client_cg,
        backend: _,
        vip,
        listen,
        admin,
    } = rig;
    let (mut agent, _dir) = agent_in(&proxy_cg, &agent_config);
    wait_until(Duration::from_secs(10), || our_programs_on(&cg.path));
    assert_eq!(accel_counters(admin), (0, 0, 0));

    // An intercepted client: both ends paired, replies in order over many writes of every
    // size (values up to 70 KB, commands cut across 64 KiB writes).
    let v = vip.to_string();
    check_in_order(Some(&client_cg), &v, 2000);
    let (paired, spliced, unpaired) = accel_counters(admin);
    assert_eq!(paired, 2, "the client's socket and the proxy's");
    assert!(spliced >= 100, "writes went socket to socket: {spliced}");
    assert_eq!(unpaired, 0);
    // Many clients at once.
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo $$ > {}/cgroup.procs && exec redis-benchmark -h {} -p {} -c 20 -n 20000 -P 8 \
             -t set,get -q",
            client_cg.display(),
            vip.ip(),
            vip.port()
        ))
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(accel_counters(admin).0 >= 42);
    // What waits or streams on a paired socket: a blocked BLPOP woken by another client, a
    // subscriber's messages, a transaction, and a 6 MB value both ways.
    // Each redis-cli is stopped after `secs` (a subscriber never ends by itself).
    let cli = |secs: u32, args: &[&str], input: Option<&[u8]>| -> std::process::Child {
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "echo $$ > {}/cgroup.procs && exec timeout {secs} redis-cli -h {} -p {} \"$@\"",
                client_cg.display(),
                vip.ip(),
                vip.port()
            ))
            .arg("sh")
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        if let Some(bytes) = input {
            std::io::Write::write_all(&mut stdin, bytes).unwrap();
        }
        drop(stdin);
        child
    };
    let text = |child: std::process::Child| {
        String::from_utf8_lossy(&child.wait_with_output().unwrap().stdout).into_owned()
    };
    let blpop = cli(10, &["BLPOP", "ri-q", "5"], None);
    let sub = cli(2, &["SUBSCRIBE", "ri-ch"], None);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(text(cli(10, &["LPUSH", "ri-q", "hello"], None)).trim(), "1");
    assert_eq!(text(blpop), "ri-q\nhello\n");
    assert_eq!(text(cli(10, &["PUBLISH", "ri-ch", "m1"], None)).trim(), "1");
    let tx = text(cli(10, &[], Some(b"MULTI\nINCR ri-n\nINCR ri-n\nEXEC\n")));
    assert_eq!(tx, "OK\nQUEUED\nQUEUED\n1\n2\n");
    let big: String = (0..6_000_000)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    assert_eq!(
        text(cli(10, &["-x", "SET", "ri-big"], Some(big.as_bytes()))).trim(),
        "OK"
    );
    assert_eq!(text(cli(10, &["GET", "ri-big"], None)).trim_end(), big);
    let sub = text(sub);
    assert!(sub.contains("message\nri-ch\nm1"), "{sub}");
    // A client outside the attach cgroup dialling the listener: only the proxy's end is
    // paired, its first write finds no peer and the connection stays on TCP, correctly.
    check_in_order(None, &listen.to_string(), 500);
    let (_, spliced_before, _) = accel_counters(admin);
    let (_, reply) = probe(None, &listen.to_string(), &["GET", "ri-none"]);
    assert_eq!(reply, "$-1");
    let (_, spliced_after, unpaired) = accel_counters(admin);
    assert_eq!(unpaired, 2, "one per outside connection");
    assert_eq!(spliced_after, spliced_before);
    let (_, metrics) = http_get(admin, "/metrics");
    assert!(
        metrics.contains("redis_intercept_accelerated{result=\"unpaired\"} 2"),
        "{metrics}"
    );
    // A graceful stop while a paired client pipelines and reads slowly (replies queue on its
    // socket): it gets right replies until the proxy closes, never a reply that belongs to
    // another request (as it would if the pairs map went before the proxy's last replies).
    let client = Command::new(env!("CARGO_BIN_EXE_ri-probe"))
        .arg("--cgroup")
        .arg(&client_cg)
        .args([v.as_str(), "--check", "20000", "--slow"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let _ = Command::new("kill")
        .args(["-TERM", &agent.id().to_string()])
        .status();
    let out = client.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && (text.contains("checked=") || text.contains("eof_after=")),
        "{text}"
    );
    let _ = agent.wait();
    wait_until(Duration::from_secs(5), || !our_programs_on(&cg.path));
}

/// Runs `ri-probe ARGS` in `cgroup`, asserts it succeeded, and returns what it printed.
fn probe_in(cgroup: &Path, args: &[&str]) -> String {
    stdout_of(
        Command::new(env!("CARGO_BIN_EXE_ri-probe"))
            .arg("--cgroup")
            .arg(cgroup)
            .args(args),
    )
}

/// The number after `name=` in ri-probe's output.
fn field(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix('='))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no {name}= in {text}"))
}

/// A paired client that pipelines 200 GETs of 1 MiB and reads nothing for two seconds: its
/// socket holds little more than `accelerate_backlog` (4 MiB) unread (a paired write skips the
/// receive buffer, so without the limit all 200 MiB would be queued on it), the rest waits in
/// the proxy under `max_client_buffer` as with TCP, and every reply then arrives whole and in
/// order. Then the same for requests the proxy doesn't read.
#[test]
fn a_paired_client_that_stops_reading_holds_at_most_the_backlog_limit() {
    let rig = Rig::new("backlog", 12);
    // accelerate_backlog is the default, 4 MiB.
    let agent_config = rig.config().replace(
        "upstream = \"main\"\n",
        "upstream = \"main\"\nmax_client_buffer = \"512MiB\"\nmax_pipeline = 16\n",
    );
    let Rig {
        cg,
        proxy_cg,
        client_cg,
        backend: _,
        vip,
        listen: _,
        admin,
    } = rig;
    let (mut agent, _dir) = agent_in(&proxy_cg, &agent_config);
    wait_until(Duration::from_secs(10), || our_programs_on(&cg.path));
    let v = vip.to_string();
    let text = probe_in(&client_cg, &[&v, "--backlog", "200"]);
    assert!(text.contains("checked=200"), "{text}");
    let peak = field(&text, "unread_peak");
    // The limit, plus the one write that crossed it and what TCP then let through.
    assert!(
        peak < 16 << 20,
        "the client's socket held {peak} bytes unread"
    );
    let n = accel_line(admin);
    assert_eq!(n[0], 2, "both ends were paired");
    assert!(n[1] > 0, "some writes were spliced");
    assert!(n[3] >= 1, "the proxy's end went to TCP: {n:?}");
    let (_, metrics) = http_get(admin, "/metrics");
    assert!(
        metrics.contains(&format!(
            "redis_intercept_accelerated{{result=\"backlogged\"}} {}",
            n[3]
        )),
        "{metrics}"
    );
    // The other way: the proxy reads nothing more from a client while its BLPOP blocks and 16
    // requests are in flight (`max_pipeline`), so the client's writes fill the proxy's socket
    // up to the limit, then go through TCP and stop. Without the limit the kernel took 1.6 GB
    // in these two seconds.
    let accepted = field(&probe_in(&client_cg, &[&v, "--flood"]), "accepted");
    assert!(
        accepted < 64 << 20,
        "a client wrote {accepted} bytes unread"
    );
    assert!(accel_line(admin)[3] > n[3], "the client's end went to TCP");
    let _ = Command::new("kill")
        .args(["-TERM", &agent.id().to_string()])
        .status();
    let _ = agent.wait();
}

#[test]
fn a_pods_connection_is_paired_across_network_namespaces() {
    let cg = TestCgroup::new("podaccel");
    let proxy_cg = cg.child("proxy");
    let pod = Pod::new('b', "169.254.78.1", "169.254.78.2");
    let backend = RedisServer::start();
    let vip = SocketAddr::from(([127, 0, 100, 11], free_port()));
    let listen = format!("169.254.78.1:{}", free_port());
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let (mut agent, _dir) = agent_in(
        &proxy_cg,
        &config(
            backend.addr,
            &[vip],
            &listen,
            &format!(
                "cgroup = \"{}\"\ndefault = \"on\"\npod_addresses = [\"169.254.78.1\"]\n\
                 accelerate = true",
                cg.path.display()
            ),
        )
        .replace("127.0.0.1:0", &admin.to_string()),
    );
    wait_until(Duration::from_secs(10), || our_programs_on(&cg.path));
    // The pod's client dials the VIP in its netns; the proxy's end is in the host's.
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo $$ > {}/cgroup.procs && exec ip netns exec {} {} {vip} --check 2000",
            cg.path.display(),
            pod.name,
            env!("CARGO_BIN_EXE_ri-probe"),
        ))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("checked=2000"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (paired, spliced, unpaired) = accel_counters(admin);
    assert_eq!((paired, unpaired), (2, 0));
    assert!(spliced >= 100, "{spliced}");
    let _ = Command::new("kill")
        .args(["-TERM", &agent.id().to_string()])
        .status();
    let _ = agent.wait();
}

/// A pod's own loopback is its own: a client in a pod netns (inside the attach cgroup) that
/// dials 127.0.0.1 on the proxy's listening port reaches a server on the pod's loopback, and
/// its socket is not put in the sockhash, where its key could match a host connection to the
/// proxy's listener. A host client on the same address is paired, as the control.
#[test]
fn a_pods_own_loopback_on_the_proxys_port_is_not_paired() {
    let rig = Rig::new("podlo", 13);
    let agent_config = rig.config();
    let Rig {
        cg,
        proxy_cg,
        client_cg,
        backend,
        vip: _,
        listen,
        admin,
    } = rig;
    backend.cmd(&["SET", "who", "backend"]);
    let pod = Pod::new('c', "169.254.79.1", "169.254.79.2");
    let port = listen.port().to_string();
    let _pod_server = Agent(
        Command::new("ip")
            .args(["netns", "exec", &pod.name, "redis-server", "--port", &port])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let in_pod = |args: &[&str]| {
        stdout_of(
            Command::new("sh")
                .arg("-c")
                .arg(format!(
                    "echo $$ > {}/cgroup.procs && exec ip netns exec {} \"$@\"",
                    client_cg.display(),
                    pod.name
                ))
                .arg("sh")
                .args(args),
        )
    };
    wait_until(Duration::from_secs(10), || {
        Command::new("ip")
            .args(["netns", "exec", &pod.name, "redis-cli", "-p", &port, "SET"])
            .args(["who", "pod"])
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "OK")
    });
    let (mut agent, _dir) = agent_in(&proxy_cg, &agent_config);
    wait_until(Duration::from_secs(10), || our_programs_on(&cg.path));
    // The control: from the host's netns, the listener is the proxy, and both ends pair.
    let (_, reply) = probe(Some(&client_cg), &listen.to_string(), &["GET", "who"]);
    assert_eq!(reply, "backend");
    wait_until(Duration::from_secs(5), || accel_counters(admin).0 == 2);
    // In the pod, the same address is the pod's own server, and nothing more is paired.
    let text = in_pod(&[
        env!("CARGO_BIN_EXE_ri-probe"),
        &listen.to_string(),
        "GET",
        "who",
    ]);
    assert!(text.contains("reply=pod"), "{text}");
    let text = in_pod(&[
        env!("CARGO_BIN_EXE_ri-probe"),
        &listen.to_string(),
        "--check",
        "200",
    ]);
    assert!(text.contains("checked=200"), "{text}");
    assert_eq!(
        accel_counters(admin).0,
        2,
        "a pod loopback socket was paired"
    );
    assert_eq!(
        accel_counters(admin).2,
        0,
        "a pod loopback socket went to the sockhash"
    );
    let _ = Command::new("kill")
        .args(["-TERM", &agent.id().to_string()])
        .status();
    let _ = agent.wait();
}
