//! End-to-end: upstream TLS against a real redis-server with TLS on (Debian's build links
//! OpenSSL), with a throwaway CA the test makes.

use std::net::SocketAddr;
use std::time::Duration;

use redis_intercept::resp::Frame;
use redis_intercept_e2e::{
    RedisServer, RespReader, TestCerts, free_port, http_get, start_proxy_config, wait_until,
};

/// A redis-server with a plain port (for the test's own checks) and a TLS port.
fn tls_server(certs: &TestCerts, verify_clients: bool) -> (RedisServer, SocketAddr) {
    let tls_port = free_port();
    let port = tls_port.to_string();
    let (cert, key, ca) = (
        certs.path("server.pem"),
        certs.path("server.key"),
        certs.path("ca.pem"),
    );
    let server = RedisServer::start_with(&[
        "--tls-port",
        &port,
        "--tls-cert-file",
        &cert,
        "--tls-key-file",
        &key,
        "--tls-ca-cert-file",
        &ca,
        "--tls-auth-clients",
        if verify_clients { "yes" } else { "no" },
    ]);
    (server, SocketAddr::from(([127, 0, 0, 1], tls_port)))
}

fn proxy_with_tls(node: SocketAddr, tls: &str) -> redis_intercept::app::Proxy {
    start_proxy_config(&format!(
        "[proxy]\nworkers = 2\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [[upstream]]\nname = \"main\"\nmode = \"standalone\"\nnodes = [\"{node}\"]\n\
         connect_timeout = \"1s\"\nreconnect_backoff_max = \"200ms\"\ntls = {tls}\n\n\
         [[service]]\nname = \"svc\"\nlisten = \"127.0.0.1:0\"\nupstream = \"main\"\n"
    ))
}

#[test]
fn traffic_goes_over_tls_verified_by_the_configured_ca() {
    let certs = TestCerts::generate();
    let (server, tls_addr) = tls_server(&certs, false);
    let proxy = proxy_with_tls(
        tls_addr,
        &format!(
            "{{ ca_file = \"{}\", server_name = \"localhost\" }}",
            certs.path("ca.pem")
        ),
    );
    let mut c = RespReader::connect(proxy.addr("svc").unwrap());
    assert_eq!(
        c.call(&["SET", "tls-key", "secret"]),
        Frame::Simple("OK".into())
    );
    assert_eq!(c.call(&["GET", "tls-key"]), Frame::Bulk("secret".into()));
    // It really went to the server, and over the TLS port (the plain port saw no client but us).
    assert_eq!(
        server.cmd(&["GET", "tls-key"]),
        Frame::Bulk("secret".into())
    );
    let Frame::Bulk(clients) = server.cmd(&["INFO", "clients"]) else {
        panic!("INFO");
    };
    assert!(
        String::from_utf8_lossy(&clients).contains("connected_clients:3"),
        "2 workers + us"
    );
    wait_until(Duration::from_secs(5), || {
        http_get(proxy.admin_addr().unwrap(), "/ready").0 == 200
    });
    // A subscriber's own connection is TLS too, both ways, and unsubscribing hands the
    // client back.
    let mut sub = RespReader::connect(proxy.addr("svc").unwrap());
    let bulk = |s: &str| Frame::Bulk(s.as_bytes().to_vec().into());
    assert_eq!(
        sub.call(&["SUBSCRIBE", "tls-news"]),
        Frame::Array(vec![bulk("subscribe"), bulk("tls-news"), Frame::Integer(1)])
    );
    assert_eq!(c.call(&["PUBLISH", "tls-news", "hi"]), Frame::Integer(1));
    assert_eq!(
        sub.read(),
        Frame::Array(vec![bulk("message"), bulk("tls-news"), bulk("hi")])
    );
    sub.call(&["UNSUBSCRIBE"]);
    assert_eq!(sub.call(&["GET", "tls-key"]), bulk("secret"));
    // The node's IP as the name works too (the certificate lists 127.0.0.1).
    let by_ip = proxy_with_tls(
        tls_addr,
        &format!("{{ ca_file = \"{}\" }}", certs.path("ca.pem")),
    );
    let mut c = RespReader::connect(by_ip.addr("svc").unwrap());
    assert_eq!(c.call(&["GET", "tls-key"]), Frame::Bulk("secret".into()));
    by_ip.shutdown();
    proxy.shutdown();
}

#[test]
fn an_unknown_ca_is_refused_unless_verification_is_off() {
    let certs = TestCerts::generate();
    let other = TestCerts::generate();
    let (_server, tls_addr) = tls_server(&certs, false);
    let proxy = proxy_with_tls(
        tls_addr,
        &format!(
            "{{ ca_file = \"{}\", server_name = \"localhost\" }}",
            other.path("ca.pem")
        ),
    );
    std::thread::sleep(Duration::from_millis(300));
    let mut c = RespReader::connect(proxy.addr("svc").unwrap());
    let reply = c.call(&["GET", "x"]);
    let Frame::Error(e) = &reply else {
        panic!("expected an error, got {reply:?}");
    };
    let e = String::from_utf8_lossy(e);
    assert!(e.contains("TLS handshake failed"), "{e}");
    let (status, body) = http_get(proxy.admin_addr().unwrap(), "/ready");
    assert_eq!(status, 503, "{body}");
    proxy.shutdown();
    let insecure = proxy_with_tls(tls_addr, "{ insecure_skip_verify = true }");
    let mut c = RespReader::connect(insecure.addr("svc").unwrap());
    wait_until(Duration::from_secs(5), || {
        c.call(&["PING", "x"]) == Frame::Bulk("x".into())
            && c.call(&["SET", "k", "v"]) == Frame::Simple("OK".into())
    });
    insecure.shutdown();
}

#[test]
fn client_certificates_for_servers_that_verify_clients() {
    let certs = TestCerts::generate();
    let (_server, tls_addr) = tls_server(&certs, true);
    let ca = certs.path("ca.pem");
    let without = proxy_with_tls(
        tls_addr,
        &format!("{{ ca_file = \"{ca}\", server_name = \"localhost\" }}"),
    );
    let mut c = RespReader::connect(without.addr("svc").unwrap());
    assert!(
        matches!(c.call(&["SET", "k", "v"]), Frame::Error(_)),
        "a server that verifies clients refuses the proxy without a certificate"
    );
    without.shutdown();
    let with = proxy_with_tls(
        tls_addr,
        &format!(
            "{{ ca_file = \"{ca}\", server_name = \"localhost\", client_cert_file = \"{}\", client_key_file = \"{}\" }}",
            certs.path("client.pem"),
            certs.path("client.key")
        ),
    );
    let mut c = RespReader::connect(with.addr("svc").unwrap());
    assert_eq!(c.call(&["SET", "k", "v"]), Frame::Simple("OK".into()));
    with.shutdown();
}

#[test]
fn a_reload_picks_up_rotated_tls_files_with_new_connections() {
    let certs = TestCerts::generate();
    let rotated = TestCerts::generate();
    let (server, tls_addr) = tls_server(&certs, false);
    // The proxy's CA bundle, as a mounted Secret would hold it.
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::copy(certs.path("ca.pem"), &ca).unwrap();
    let text = format!(
        "[proxy]\nworkers = 2\n\n[[upstream]]\nname = \"main\"\nmode = \"standalone\"\nnodes = [\"{tls_addr}\"]\n\
         connect_timeout = \"1s\"\nreconnect_backoff_max = \"200ms\"\n\
         tls = {{ ca_file = \"{}\", server_name = \"localhost\" }}\n\n\
         [[service]]\nname = \"svc\"\nlisten = \"127.0.0.1:0\"\nupstream = \"main\"\nop_timeout = \"1s\"\n",
        ca.display()
    );
    let proxy = start_proxy_config(&text);
    let mut c = RespReader::connect(proxy.addr("svc").unwrap());
    assert_eq!(c.call(&["SET", "a", "1"]), Frame::Simple("OK".into()));
    // Rotation: the server takes a certificate from another CA, the Secret gets that CA, and
    // the proxy's connections are cut (so the old ones can't carry on).
    assert_eq!(
        server.cmd(&[
            "CONFIG",
            "SET",
            "tls-cert-file",
            &rotated.path("server.pem"),
            "tls-key-file",
            &rotated.path("server.key"),
        ]),
        Frame::Simple("OK".into())
    );
    std::fs::copy(rotated.path("ca.pem"), &ca).unwrap();
    server.cmd(&["CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes"]);
    // Reconnecting with the old CA fails: the server's new certificate isn't trusted.
    wait_until(Duration::from_secs(5), || {
        matches!(c.call(&["GET", "a"]), Frame::Error(_))
    });
    // The same file again: its TLS files changed, so the upstream gets new connections.
    let notes = proxy
        .reload(&redis_intercept::config::Config::parse(&text, "reload").unwrap())
        .unwrap();
    assert_eq!(notes, Vec::<String>::new());
    wait_until(Duration::from_secs(5), || {
        c.call(&["GET", "a"]) == Frame::Bulk("1".into())
    });
    assert_eq!(c.call(&["SET", "b", "2"]), Frame::Simple("OK".into()));
    assert_eq!(server.cmd(&["GET", "b"]), Frame::Bulk("2".into()));
    proxy.shutdown();
}
