//! End-to-end: a service's command policy (`[service.acl] rules`): refused commands,
//! subcommands and categories get the server's `-NOPERM` (compared with a Redis, or Valkey,
//! user given the same rules), a refusal inside MULTI fails the transaction, `ACL WHOAMI` and `ACL CAT` are
//! the proxy's, and a reload that changes the rules applies to connected clients.

use redis_intercept::resp::Frame;
use redis_intercept_e2e::{RedisServer, RespReader, reload, start_proxy_config};

const RULES: &str = "+@all -@admin -flushall +config|get -@dangerous +keys";

fn config(server: std::net::SocketAddr, rules: &str) -> String {
    format!(
        "[proxy]\nworkers = 2\n\n[[upstream]]\nname = \"main\"\nmode = \"standalone\"\nnodes = [\"{server}\"]\n\n\
         [[service]]\nname = \"svc\"\nlisten = \"127.0.0.1:0\"\nupstream = \"main\"\n\n[service.acl]\nrules = \"{rules}\"\n"
    )
}

/// The commands compared: allowed, refused by name, by subcommand, by category.
const SCRIPT: &[&[&str]] = &[
    &["SET", "k", "v"],
    &["GET", "k"],
    &["FLUSHALL"],
    &["CONFIG", "GET", "maxmemory"],
    &["CONFIG", "SET", "maxmemory", "0"],
    &["KEYS", "nomatch*"],
    &["SORT", "nokey"],
    &["SWAPDB", "0", "1"],
    &["MULTI"],
    &["SET", "k", "w"],
    &["FLUSHALL"],
    &["EXEC"],
    &["GET", "k"],
    &["ACL", "WHOAMI"],
    &["ACL", "CAT", "nosuch"],
];

fn run(c: &mut RespReader) -> Vec<String> {
    SCRIPT
        .iter()
        .map(|cmd| String::from_utf8_lossy(&c.call_raw(cmd)).into_owned())
        .collect()
}

#[test]
fn acl_rules_refuse_as_redis_does_and_follow_a_reload() {
    // Redis with a user that has the same rules (and no password), as the reference.
    let direct = RedisServer::start();
    let mut rules = vec![
        "ACL", "SETUSER", "default", "reset", "on", "nopass", "~*", "&*",
    ];
    rules.extend(RULES.split(' '));
    assert_eq!(direct.cmd(&rules), Frame::Simple("OK".into()));
    let mut d = RespReader::connect(direct.addr);
    let want = run(&mut d);
    let server = RedisServer::start();
    let text = config(server.addr, RULES);
    let proxy = start_proxy_config(&text);
    let mut p = RespReader::connect(proxy.addr("svc").unwrap());
    assert_eq!(want, run(&mut p));
    // ACL CAT: Redis 7.0's categories, and a category's commands.
    assert_eq!(p.call(&["ACL", "CAT"]), d.call(&["ACL", "CAT"]));
    let sorted = |f: Frame| {
        let Frame::Array(mut items) = f else {
            panic!("ACL CAT")
        };
        items.sort_by_key(|i| format!("{i:?}"));
        items
    };
    assert_eq!(
        sorted(p.call(&["ACL", "CAT", "hyperloglog"])),
        sorted(d.call(&["ACL", "CAT", "hyperloglog"]))
    );
    // A reload narrows the rules for the client already connected.
    let narrower = config(server.addr, "+@all -@write");
    assert!(reload(&proxy, &narrower).is_empty());
    let refused = p.call(&["SET", "k", "x"]);
    assert!(
        redis_intercept_e2e::is_err(&refused, "no permissions to run the 'set' command"),
        "{refused:?}"
    );
    assert_eq!(p.call(&["GET", "k"]), Frame::Bulk("v".into()));
    proxy.shutdown();
}

#[test]
fn bad_acl_rules_are_refused_at_load() {
    let text = config("127.0.0.1:1".parse().unwrap(), "+@all -nosuchcommand");
    let err = match redis_intercept::config::Config::parse(&text, "<test>") {
        Ok(_) => panic!("accepted"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("service[0].acl.rules") && err.contains("nosuchcommand"),
        "{err}"
    );
}
