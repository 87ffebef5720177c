//! The `redis-intercept` binary's command line: `check`, `--help`, and refusals.
#![expect(clippy::unwrap_used, reason = "tests panic on failure")]

use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_redis-intercept"))
}

fn check(text: &str) -> (bool, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("conf.toml");
    std::fs::write(&path, text).unwrap();
    let out = bin()
        .arg("check")
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).replace(&path.display().to_string(), "FILE");
    let stderr = String::from_utf8_lossy(&out.stderr).replace(&path.display().to_string(), "FILE");
    (out.status.success(), stdout, stderr)
}

const GOOD: &str = r#"
[[upstream]]
name = "main"
mode = "standalone"
nodes = ["127.0.0.1:6379"]

[[service]]
name = "cache"
listen = "127.0.0.1:16379"
upstream = "main"
"#;

#[test]
fn check_accepts_a_good_config_with_a_summary() {
    let (ok, out, err) = check(GOOD);
    assert!(ok, "{err}");
    assert_eq!(
        out,
        "FILE: ok: 1 service(s), 1 upstream(s), interception off\n"
    );
}

#[test]
fn check_rejects_broken_configs_naming_file_key_and_problem() {
    let (ok, _, err) = check(&GOOD.replace("mode = \"standalone\"", "mode = \"replicated\""));
    assert!(!ok);
    assert!(err.contains("FILE: upstream[0].mode: "), "{err}");
    assert!(
        err.contains("line 4") && err.contains("unknown variant `replicated`"),
        "{err}"
    );

    let (ok, _, err) = check(&GOOD.replace(
        "upstream = \"main\"",
        "upstream = \"missing\"\nop_timeout = \"0s\"",
    ));
    assert!(!ok);
    assert!(
        err.contains("FILE: service[0].upstream: no [[upstream]] is named \"missing\""),
        "{err}"
    );
    assert!(
        err.contains("FILE: service[0].op_timeout: must be more than 0"),
        "{err}"
    );

    let (ok, _, err) = check("[[service]\n");
    assert!(!ok);
    assert!(err.contains("FILE: ") && err.contains("line 1"), "{err}");

    let (ok, _, err) =
        check(&GOOD.replace("listen = \"127.0.0.1:16379\"", "listen = \"localhost\""));
    assert!(!ok);
    assert!(err.contains("FILE: service[0].listen:"), "{err}");
}

/// A setting `run` refuses in this build (appended to the service table).
const UNBUILT: &str = "read_policy = \"replica\"\n";

/// Runs a command that should exit by itself; kills it and fails the test after 10 s.
fn run_bounded(cmd: &mut Command) -> std::process::Output {
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the command was still running after 10s");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

#[test]
fn check_warns_when_the_admin_endpoint_listens_beyond_loopback() {
    let (ok, _, stderr) = check(&format!("[admin]\nlisten = \"0.0.0.0:9091\"\n{GOOD}"));
    assert!(ok, "a warning, not an error");
    assert!(
        stderr.contains(
            "FILE: warning: admin.listen = 0.0.0.0:9091 is reachable from beyond this host"
        ) && stderr.contains("set [admin] token_file"),
        "{stderr}"
    );
    let (ok, _, stderr) = check(&format!(
        "[admin]\nlisten = \"0.0.0.0:9091\"\ntoken_file = \"/run/token\"\n{GOOD}"
    ));
    assert!(
        ok && stderr.contains("only token_file guards it"),
        "{stderr}"
    );
    let (ok, _, stderr) = check(&format!("[admin]\nlisten = \"127.0.0.1:9091\"\n{GOOD}"));
    assert!(ok && !stderr.contains("warning"), "{stderr}");
}

#[test]
fn check_warns_about_features_run_would_refuse() {
    let (ok, _, err) = check(&format!(
        "{GOOD}{UNBUILT}\n[service.auth]\npasswords = [\"s3cret\"]\n"
    ));
    assert!(ok);
    assert!(
        err.contains("service[0].read_policy (only meaningful for a cluster, a sentinel upstream or one with replicas) is not supported by this build"),
        "{err}"
    );
    assert!(!err.contains("s3cret"), "a password leaked: {err}");
}

#[test]
fn run_refuses_settings_it_would_silently_ignore() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("conf.toml");
    std::fs::write(&path, format!("{GOOD}\n{UNBUILT}")).unwrap();
    let out = run_bounded(bin().arg("run").arg("--config").arg(&path));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("does not support: service[0].read_policy"),
        "{err}"
    );
    let out = run_bounded(bin().args([
        "run",
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        "127.0.0.1:1",
        "--vip",
        "127.0.100.1:6379",
    ]));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--vip needs --cgroup"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn help_explains_the_commands() {
    let out = bin().arg("--help").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    for word in ["run", "check", "RUST_LOG"] {
        assert!(text.contains(word), "--help lacks {word}: {text}");
    }
    let out = bin().args(["run", "--help"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("--listen") && text.contains("--upstream") && text.contains("--config"));
}

#[test]
fn shipped_configs_pass_check() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut files = vec![root.join("config/redis-intercept.toml")];
    for entry in std::fs::read_dir(root.join("config/examples")).unwrap() {
        files.push(entry.unwrap().path());
    }
    assert!(files.len() >= 3);
    for file in files {
        let out = bin()
            .arg("check")
            .arg("--config")
            .arg(&file)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}: {}",
            file.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Sends one command over a fresh connection and returns the first reply line.
fn ask(addr: &str, args: &[&str]) -> String {
    use std::io::{BufRead, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let mut req = format!("*{}\r\n", args.len());
    for a in args {
        req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    s.write_all(req.as_bytes()).unwrap();
    let mut line = String::new();
    std::io::BufReader::new(s).read_line(&mut line).unwrap();
    line.trim_end().to_owned()
}

/// A loopback address with a free port.
fn free_addr() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    format!("127.0.0.1:{port}")
}

/// One service on `addr` with client passwords from `secret`, in front of a closed port (the
/// proxy answers AUTH and faults itself), reading its files every `watch`.
fn auth_only_config(addr: &str, secret: &std::path::Path, watch: &str) -> String {
    format!(
        "[proxy]\nworkers = 1\nwatch_config = \"{watch}\"\n\n\
         [[upstream]]\nname = \"main\"\nmode = \"standalone\"\nnodes = [\"127.0.0.1:1\"]\n\n\
         [[service]]\nname = \"cache\"\nlisten = \"{addr}\"\nupstream = \"main\"\n\
         [service.auth]\npassword_file = \"{}\"\n",
        secret.display()
    )
}

/// A `redis-intercept run` process, stopped (SIGTERM, then waited for) when dropped, so a
/// failing test doesn't leave it running and holding the test's output open.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let _ = self.0.wait();
    }
}

/// `redis-intercept run --config path`, once it accepts on `addr`.
/// Its log goes to `log` next to the config file.
fn spawn_run(path: &std::path::Path, addr: &str) -> Running {
    let log = std::fs::File::create(path.with_file_name("log")).unwrap();
    let child = bin()
        .arg("run")
        .arg("--config")
        .arg(path)
        .stderr(log)
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "the proxy did not start"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    Running(child)
}

/// A connection that sends raw lines and reads one-line replies.
struct LineClient {
    /// The socket, for writing.
    stream: std::net::TcpStream,
    /// The same socket, buffered for reading.
    replies: std::io::BufReader<std::net::TcpStream>,
}

impl LineClient {
    fn connect(addr: &str) -> LineClient {
        let stream = std::net::TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let replies = std::io::BufReader::new(stream.try_clone().unwrap());
        LineClient { stream, replies }
    }

    /// Sends `line` (with its CRLF) and returns the first line of the reply.
    fn send(&mut self, line: &str) -> String {
        use std::io::{BufRead, Write};
        self.stream.write_all(line.as_bytes()).unwrap();
        let mut reply = String::new();
        self.replies.read_line(&mut reply).unwrap();
        reply.trim_end().to_owned()
    }
}

/// The value of metric `name` (with its labels) at the admin endpoint `admin`.
fn metric(admin: &str, name: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(admin).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    let prefix = format!("redis_intercept_{name} ");
    body.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {name} in {body}"))
        .to_owned()
}

/// Asks until the first line of the reply is `want` (10 s at most).
fn wait_for(addr: &str, args: &[&str], want: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let got = ask(addr, args);
        if got == want {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{args:?}: {got}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn a_changed_config_or_password_file_is_reloaded_without_a_signal() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("passwords");
    std::fs::write(&secret, "old-pass\n").unwrap();
    let addr = free_addr();
    let admin = free_addr();
    let text = auth_only_config(&addr, &secret, "100ms").replace(
        "[[upstream]]",
        &format!("[admin]\nlisten = \"{admin}\"\n\n[[upstream]]"),
    );
    let path = dir.path().join("conf.toml");
    std::fs::write(&path, &text).unwrap();
    let mut child = spawn_run(&path, &addr);
    assert_eq!(ask(&addr, &["AUTH", "old-pass"]), "+OK");
    // A rotated Secret: only the password file changes.
    std::fs::write(&secret, "new-pass\n").unwrap();
    wait_for(&addr, &["AUTH", "new-pass"], "+OK");
    assert!(ask(&addr, &["AUTH", "old-pass"]).starts_with("-WRONGPASS"));
    // An updated ConfigMap, written as Kubernetes does: a new file swapped in by rename.
    let next = dir.path().join("conf.toml.new");
    std::fs::write(
        &next,
        format!("{text}\n[[service.fault]]\nkind = \"error\"\npercentage = 100.0\ncommands = [\"GET\"]\n"),
    )
    .unwrap();
    std::fs::rename(&next, &path).unwrap();
    let mut client = LineClient::connect(&addr);
    let mut send = |line: &str| client.send(line);
    assert_eq!(send("AUTH new-pass\r\n"), "+OK");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while send("GET k\r\n") != "-ERR Fault Injected: Error" {
        assert!(std::time::Instant::now() < deadline, "the fault never came");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(
        metric(&admin, "config_reloads_total{result=\"applied\"}"),
        "2"
    );
    assert_eq!(metric(&admin, "config_last_reload_successful"), "1");
    // A broken file is refused once, and the running config stays. The log says why
    // without quoting the broken line, which holds a password.
    std::fs::write(
        &path,
        text.replace(
            "[service.auth]\n",
            "[service.auth]\npasswords = [\"leaked-secret\", 5]\n",
        ),
    )
    .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(400));
    assert_eq!(send("GET k\r\n"), "-ERR Fault Injected: Error");
    let log = std::fs::read_to_string(dir.path().join("log")).unwrap();
    assert!(log.contains("reload failed"), "{log}");
    assert!(!log.contains("leaked-secret"), "{log}");
    assert_eq!(
        metric(&admin, "config_reloads_total{result=\"failed\"}"),
        "1"
    );
    assert_eq!(metric(&admin, "config_last_reload_successful"), "0");
    assert!(
        child.0.try_wait().unwrap().is_none(),
        "the proxy kept running"
    );
}

#[test]
fn sighup_reloads_client_passwords_and_keeps_running_on_a_bad_file() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("passwords");
    std::fs::write(&secret, "old-pass\n").unwrap();
    let addr = free_addr();
    // AUTH is answered by the proxy, so no Redis is needed (the upstream port is closed).
    // Only SIGHUP reloads here (no watch).
    let text = auth_only_config(&addr, &secret, "0s");
    let path = dir.path().join("conf.toml");
    std::fs::write(&path, &text).unwrap();
    let mut child = spawn_run(&path, &addr);
    let hup = || {
        let ok = Command::new("kill")
            .args(["-HUP", &child.0.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok);
    };
    assert_eq!(ask(&addr, &["AUTH", "old-pass"]), "+OK");
    // Rotation: the Secret file changes, then SIGHUP.
    std::fs::write(&secret, "new-pass\n").unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(
        ask(&addr, &["AUTH", "old-pass"]),
        "+OK",
        "no reload before SIGHUP"
    );
    hup();
    wait_for(&addr, &["AUTH", "new-pass"], "+OK");
    assert!(ask(&addr, &["AUTH", "old-pass"]).starts_with("-WRONGPASS"));
    // A fault rule added to the file applies on SIGHUP to a client already connected
    // (answered by the proxy, so no Redis is needed).
    let mut client = LineClient::connect(&addr);
    let mut get = |line: &str| client.send(line);
    assert_eq!(get("AUTH new-pass\r\n"), "+OK");
    assert!(get("GET k\r\n").starts_with("-ERR upstream"));
    std::fs::write(
        &path,
        format!("{text}\n[[service.fault]]\nkind = \"error\"\npercentage = 100.0\n"),
    )
    .unwrap();
    hup();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let reply = get("GET k\r\n");
        if reply == "-ERR Fault Injected: Error" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{reply}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // A broken file is refused and the running config stays.
    std::fs::write(&path, "[[service]\n").unwrap();
    hup();
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(ask(&addr, &["AUTH", "new-pass"]), "+OK");
    assert!(
        child.0.try_wait().unwrap().is_none(),
        "the proxy kept running"
    );
}

/// `POST path` to the admin endpoint `admin`: the status code and the body.
fn post(admin: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(admin).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(15)))
        .unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).unwrap();
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

#[test]
fn post_reload_applies_the_file_and_says_what_went_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("passwords");
    std::fs::write(&secret, "pass\n").unwrap();
    let addr = free_addr();
    let admin = free_addr();
    // No watch: only the POST reloads.
    let text = auth_only_config(&addr, &secret, "0s").replace(
        "[[upstream]]",
        &format!("[admin]\nlisten = \"{admin}\"\n\n[[upstream]]"),
    );
    let path = dir.path().join("conf.toml");
    std::fs::write(&path, &text).unwrap();
    let _child = spawn_run(&path, &addr);
    let mut client = LineClient::connect(&addr);
    assert_eq!(client.send("AUTH pass\r\n"), "+OK");
    std::fs::write(
        &path,
        format!("{text}\n[[service.fault]]\nkind = \"error\"\npercentage = 100.0\n"),
    )
    .unwrap();
    let (status, body) = post(&admin, "/reload");
    assert_eq!(status, 200, "{body}");
    assert!(body.starts_with("reloaded "), "{body}");
    // Applied when the answer came: the client's next command sees the fault.
    assert_eq!(client.send("GET k\r\n"), "-ERR Fault Injected: Error");
    // A broken file: the answer says where, the running config stays.
    std::fs::write(&path, "[proxy]\nworkers = \"two\"\n").unwrap();
    let (status, body) = post(&admin, "/reload");
    assert_eq!(status, 422, "{body}");
    assert!(body.contains("reload failed"), "{body}");
    assert!(body.contains("proxy.workers"), "{body}");
    assert!(body.contains("line 2"), "{body}");
    assert_eq!(client.send("GET k\r\n"), "-ERR Fault Injected: Error");
    assert_eq!(
        metric(&admin, "config_reloads_total{result=\"failed\"}"),
        "1"
    );
    // Only POST reloads.
    let mut s = std::net::TcpStream::connect(&admin).unwrap();
    use std::io::{Read, Write};
    s.write_all(b"GET /reload HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 404"), "{response}");
}
