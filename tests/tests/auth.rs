//! End-to-end: client-facing auth answered by the proxy, and upstream auth with the real
//! credentials, against real redis-server processes.
#![expect(clippy::unwrap_used, reason = "tests panic on failure")]

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis_intercept::resp::Frame;
use redis_intercept_e2e::{
    RedisServer, RespReader, http_get, redis_cli, start_proxy_full, start_proxy_with, wait_until,
};

fn ok() -> Frame {
    Frame::Simple("OK".into())
}

fn is_err(f: &Frame, prefix: &str) -> bool {
    matches!(f, Frame::Error(e) if e.starts_with(prefix.as_bytes()))
}

fn secret_file(dir: &tempfile::TempDir, name: &str, content: &str) -> std::path::PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, content).unwrap();
    path
}

/// Logs of this test binary, captured so the tests can look for leaked secrets.
fn captured_logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: std::sync::OnceLock<Arc<Mutex<Vec<u8>>>> = std::sync::OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let writer = buf.clone();
        let _ = tracing_subscriber::fmt()
            .with_env_filter("debug")
            .with_writer(move || LogWriter(writer.clone()))
            .try_init();
        buf
    })
    .clone()
}

struct LogWriter(Arc<Mutex<Vec<u8>>>);

impl Write for LogWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn requirepass_upstream_is_reached_without_a_client_password() {
    let logs = captured_logs();
    let server = RedisServer::start_with(&["--requirepass", "upstream-s3cret"]);
    let dir = tempfile::tempdir().unwrap();
    let file = secret_file(&dir, "redis-pw", "upstream-s3cret\n");
    let top = "[admin]\nlisten = \"127.0.0.1:0\"\n";
    let proxy = start_proxy_full(
        server.addr,
        top,
        &format!("password_file = {:?}", file.display().to_string()),
        "",
    );
    let addr = proxy.addr("svc").unwrap();
    assert_eq!(redis_cli(addr, &["SET", "k", "through-proxy"]), "OK\n");
    assert_eq!(redis_cli(addr, &["GET", "k"]), "through-proxy\n");
    // Straight to Redis without the password is refused: the proxy really authenticated.
    assert!(redis_cli(server.addr, &["GET", "k"]).contains("NOAUTH"));
    let (_, config) = http_get(proxy.admin_addr().unwrap(), "/config");
    assert!(!config.contains("upstream-s3cret"), "{config}");
    proxy.shutdown();
    let text = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    assert!(
        !text.contains("upstream-s3cret"),
        "password in the logs:\n{text}"
    );
}

#[test]
fn acl_user_upstream_with_password_env() {
    // cargo sets CARGO_PKG_NAME for test processes: a variable we can rely on without
    // changing the environment of a multi-threaded test.
    let password = std::env::var("CARGO_PKG_NAME").unwrap();
    let rule = format!(">{password}");
    let server = RedisServer::start_with(&["--user", "proxy", "on", &rule, "~*", "&*", "+@all"]);
    let proxy = start_proxy_full(
        server.addr,
        "",
        "username = \"proxy\"\npassword_env = \"CARGO_PKG_NAME\"",
        "",
    );
    let addr = proxy.addr("svc").unwrap();
    assert_eq!(redis_cli(addr, &["SET", "acl", "1"]), "OK\n");
    // Redis saw the proxy's ACL user.
    let list = match server.cmd(&["CLIENT", "LIST"]) {
        Frame::Bulk(b) => String::from_utf8_lossy(&b).into_owned(),
        other => panic!("{other:?}"),
    };
    assert!(list.contains("user=proxy"), "{list}");
    proxy.shutdown();
}

#[test]
fn wrong_upstream_password_is_a_clear_error_and_not_ready_until_rotated() {
    let logs = captured_logs();
    let server = RedisServer::start_with(&["--requirepass", "right-one"]);
    let dir = tempfile::tempdir().unwrap();
    let file = secret_file(&dir, "pw", "wrong-one\n");
    let proxy = start_proxy_full(
        server.addr,
        "[admin]\nlisten = \"127.0.0.1:0\"\n",
        &format!("password_file = {:?}", file.display().to_string()),
        "",
    );
    let admin = proxy.admin_addr().unwrap();
    let mut c = RespReader::connect(proxy.addr("svc").unwrap());
    c.send(b"GET k\r\n");
    let reply = c.read();
    assert!(
        is_err(&reply, "ERR upstream authentication failed"),
        "{reply:?}"
    );
    assert_eq!(http_get(admin, "/ready").0, 503);
    // The Secret is rotated: the next reconnect reads the file again.
    std::fs::write(&file, "right-one\n").unwrap();
    wait_until(Duration::from_secs(10), || {
        http_get(admin, "/ready").0 == 200
    });
    c.send(b"SET k v\r\n");
    assert_eq!(c.read(), ok());
    proxy.shutdown();
    let text = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    assert!(
        text.contains("authentication failed"),
        "the failure was not logged:\n{text}"
    );
    assert!(
        !text.contains("wrong-one") && !text.contains("right-one"),
        "password in the logs:\n{text}"
    );
}

#[test]
fn client_passwords_are_checked_by_the_proxy() {
    let server = RedisServer::start();
    let proxy = start_proxy_with(
        server.addr,
        "",
        "[service.auth]\npasswords = [\"current\", \"previous\"]\n",
    );
    let mut c = RespReader::connect(proxy.addr("svc").unwrap());
    c.send(b"GET k\r\nPING\r\nAUTH nope\r\nAUTH previous\r\nSET k v\r\nGET k\r\n");
    assert_eq!(
        c.read(),
        Frame::Error("NOAUTH Authentication required.".into())
    );
    assert_eq!(
        c.read(),
        Frame::Error("NOAUTH Authentication required.".into())
    );
    assert_eq!(
        c.read(),
        Frame::Error("WRONGPASS invalid username-password pair or user is disabled.".into())
    );
    assert_eq!(c.read(), ok());
    assert_eq!(c.read(), ok());
    assert_eq!(c.read(), Frame::Bulk("v".into()));
    // RESET forgets the authentication.
    c.send(b"RESET\r\nGET k\r\nAUTH default current\r\nGET k\r\n");
    assert_eq!(c.read(), Frame::Simple("RESET".into()));
    assert!(is_err(&c.read(), "NOAUTH"));
    assert_eq!(c.read(), ok());
    assert_eq!(c.read(), Frame::Bulk("v".into()));
    // HELLO: without AUTH it needs an authenticated client; with AUTH it authenticates.
    let mut h = RespReader::connect(proxy.addr("svc").unwrap());
    h.send(b"HELLO 2\r\nHELLO 2 AUTH default wrong\r\nHELLO 2 AUTH default current SETNAME app\r\nCLIENT GETNAME\r\n");
    assert!(is_err(&h.read(), "NOAUTH HELLO must be called"));
    assert!(is_err(&h.read(), "WRONGPASS"));
    assert!(matches!(h.read(), Frame::Array(_)));
    assert_eq!(h.read(), Frame::Bulk("app".into()));
    // AUTH never reached Redis.
    let stats = match server.cmd(&["INFO", "commandstats"]) {
        Frame::Bulk(b) => String::from_utf8_lossy(&b).into_owned(),
        other => panic!("{other:?}"),
    };
    assert!(!stats.contains("cmdstat_auth"), "{stats}");
    // The proxy's own connections say HELLO 2 (to learn the server's version), one each;
    // the client's three HELLOs never went.
    let hellos: usize = stats
        .lines()
        .find_map(|l| l.strip_prefix("cmdstat_hello:calls="))
        .and_then(|v| v.split(',').next()?.parse().ok())
        .unwrap_or(0);
    let Frame::Bulk(list) = server.cmd(&["CLIENT", "LIST"]) else {
        panic!("CLIENT LIST");
    };
    let proxy_conns = String::from_utf8_lossy(&list).lines().count() - 1;
    assert!(
        hellos <= proxy_conns,
        "{hellos} HELLOs from {proxy_conns} connections: {stats}"
    );
    proxy.shutdown();
}

#[test]
fn acl_style_client_auth_and_password_file() {
    let server = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let file = secret_file(&dir, "client-pw", "from-file\n");
    let proxy = start_proxy_with(
        server.addr,
        "",
        &format!(
            "[service.auth]\nusername = \"app\"\npassword_file = {:?}\n",
            file.display().to_string()
        ),
    );
    let mut c = RespReader::connect(proxy.addr("svc").unwrap());
    c.send(
        b"AUTH from-file\r\nAUTH other from-file\r\nAUTH app from-file\r\nPING\r\nAUTH a b c\r\n",
    );
    assert!(is_err(&c.read(), "WRONGPASS"), "plain AUTH is user default");
    assert!(is_err(&c.read(), "WRONGPASS"));
    assert_eq!(c.read(), ok());
    assert_eq!(c.read(), Frame::Simple("PONG".into()));
    assert_eq!(c.read(), Frame::Error("ERR syntax error".into()));
    proxy.shutdown();
}

#[test]
fn legacy_auth_without_client_auth() {
    let server = RedisServer::start();
    let proxy = start_proxy_with(server.addr, "", "");
    let mut c = RespReader::connect(proxy.addr("svc").unwrap());
    // Apps that still send the old password keep working.
    c.send(b"AUTH old-password\r\nGET k\r\n");
    assert_eq!(c.read(), ok());
    assert_eq!(c.read(), Frame::NullBulk);
    proxy.shutdown();
    let proxy = start_proxy_with(server.addr, "", "legacy_auth = \"reject\"\n");
    let mut c = RespReader::connect(proxy.addr("svc").unwrap());
    c.send(b"AUTH old-password\r\nGET k\r\n");
    assert!(is_err(
        &c.read(),
        "ERR AUTH <password> called without any password configured"
    ));
    assert_eq!(c.read(), Frame::NullBulk);
    proxy.shutdown();
}

#[test]
fn reload_turns_client_auth_on_and_reports_what_needs_a_restart() {
    let server = RedisServer::start();
    let base = format!(
        "[proxy]\nworkers = 2\n\n[[upstream]]\nname = \"main\"\nmode = \"standalone\"\nnodes = [\"{}\"]\n\n\
         [[service]]\nname = \"svc\"\nlisten = \"127.0.0.1:0\"\nupstream = \"main\"\n",
        server.addr
    );
    let proxy = redis_intercept_e2e::start_proxy_config(&base);
    let addr = proxy.addr("svc").unwrap();
    let mut before = RespReader::connect(addr);
    assert_eq!(before.call(&["SET", "k", "v"]), ok());
    let with_auth = format!("{base}[service.auth]\npasswords = [\"pw\"]\n");
    let config = redis_intercept::config::Config::parse(&with_auth, "reload").unwrap();
    assert_eq!(proxy.reload(&config).unwrap(), Vec::<String>::new());
    // New clients need the password; the one already in keeps its session.
    let mut after = RespReader::connect(addr);
    assert!(is_err(&after.call(&["GET", "k"]), "NOAUTH"));
    assert_eq!(after.call(&["AUTH", "pw"]), ok());
    assert_eq!(after.call(&["GET", "k"]), Frame::Bulk("v".into()));
    assert_eq!(before.call(&["GET", "k"]), Frame::Bulk("v".into()));
    // A setting that only a restart applies is reported, and the passwords still change.
    let changed = with_auth
        .replace("passwords = [\"pw\"]", "passwords = [\"pw2\"]")
        .replace(
            "mode = \"standalone\"\n",
            "mode = \"standalone\"\nconnect_timeout = \"3s\"\n",
        )
        .replace("workers = 2", "workers = 3");
    let config = redis_intercept::config::Config::parse(&changed, "reload").unwrap();
    let notes = proxy.reload(&config).unwrap();
    assert!(
        notes
            .iter()
            .any(|n| n.ends_with("after a restart: proxy.workers")),
        "only the worker count waits for a restart: {notes:?}"
    );
    // The upstream's new connections carry the client that was in.
    assert_eq!(before.call(&["GET", "k"]), Frame::Bulk("v".into()));
    let mut third = RespReader::connect(addr);
    assert!(is_err(&third.call(&["AUTH", "pw"]), "WRONGPASS"));
    assert_eq!(third.call(&["AUTH", "pw2"]), ok());
    proxy.shutdown();
}
