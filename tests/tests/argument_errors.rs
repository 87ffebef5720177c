//! End-to-end, differential: commands with wrong, odd and edge argument counts, sent to Redis
//! directly and through the proxy (a standalone server behind, and a cluster behind), give the
//! same reply bytes and leave the same data. The chaos run's `MSET a b c` wrote `c = ""` across
//! slots; Redis refuses it and writes nothing.

use bytes::Bytes;
use redis_intercept::cluster::Slot;
use redis_intercept::command::{COMMANDS, CommandInfo, FindKeys, KeySpec, flags};
use redis_intercept::resp::Frame;
use redis_intercept_e2e::{
    RedisCluster, RedisServer, RespReader, start_cluster_proxy, start_proxy,
};

/// Arguments the generator draws from: keys on several slots, two keys sharing a slot, numbers
/// and a few keywords, so that some generated commands are valid and most are not.
const TOKENS: &[&str] = &[
    "a", "b", "c", "{t}x", "{t}y", "1", "2", "0", "LEFT", "MIN", "COUNT",
];

/// What a `numkeys` argument may be: in range, too large, zero, negative, not a number.
const NUMKEYS: &[&str] = &["1", "2", "3", "9", "0", "-1", "x"];

/// Every key the generated commands can have touched.
fn all_keys() -> Vec<&'static str> {
    TOKENS.to_vec()
}

/// A small deterministic generator (xorshift64*), seeded per command so a failure names a
/// reproducible case.
struct Rng(u64);

impl Rng {
    fn new(name: &str) -> Rng {
        let seed = name.bytes().fold(0x9e37_79b9_7f4a_7c15_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
        Rng(seed | 1)
    }

    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) as usize % n
    }
}

/// Where a command's `numkeys` argument is, if it has one at a fixed index.
fn numkeys_index(info: &CommandInfo) -> Option<usize> {
    info.key_specs
        .iter()
        .find_map(|spec: &KeySpec| match (spec.begin, spec.find) {
            (
                redis_intercept::command::BeginSearch::Index(i),
                FindKeys::Keynum { keynum_idx, .. },
            ) => Some(usize::from(i) + usize::from(keynum_idx)),
            _ => None,
        })
}

/// The multi-key and `numkeys` commands of the table: a key spec that spans several
/// arguments. Blocking commands would wait, transaction and pub/sub commands change the
/// connection's mode, and MIGRATE dials an address: those are left out.
fn multi_key_commands() -> Vec<&'static CommandInfo> {
    let many = |spec: &KeySpec| match spec.find {
        FindKeys::Range { last_key, .. } => last_key != 0,
        FindKeys::Keynum { .. } => true,
        FindKeys::Unknown => false,
    };
    let mut out: Vec<&'static CommandInfo> = COMMANDS
        .iter()
        .flat_map(|c| std::iter::once(c).chain(c.subcommands.iter()))
        .filter(|c| c.key_specs.iter().any(many))
        .filter(|c| !c.has(flags::BLOCKING) && !c.has(flags::ADMIN) && !c.has(flags::PUBSUB))
        .filter(|c| !matches!(c.name, "migrate" | "watch"))
        .collect();
    out.sort_by_key(|c| c.name);
    out
}

/// Generated argument lists for `info`: every count from none to eight arguments, each
/// drawn a few times.
fn cases(info: &CommandInfo) -> Vec<Vec<String>> {
    let mut rng = Rng::new(info.name);
    let numkeys_at = numkeys_index(info);
    let words: Vec<String> = info.name.split('|').map(|w| w.to_uppercase()).collect();
    let mut out = Vec::new();
    for extra in 0..=8 {
        for _ in 0..4 {
            let mut args = words.clone();
            while args.len() < words.len() + extra {
                let at = args.len() - (words.len() - 1);
                let arg = if Some(at) == numkeys_at {
                    NUMKEYS[rng.below(NUMKEYS.len())]
                } else if at == 1 && info.name.starts_with("eval") {
                    "return #KEYS + #ARGV"
                } else {
                    TOKENS[rng.below(TOKENS.len())]
                };
                args.push(arg.to_owned());
            }
            if !out.contains(&args) {
                out.push(args);
            }
        }
    }
    out
}

/// A reply made comparable across servers: set members come in each server's hash order
/// (Redis seeds its hash function per process), so set replies are sorted.
fn comparable(name: &str, raw: Bytes) -> Bytes {
    if !matches!(name, "sunion" | "sinter" | "sdiff") {
        return raw;
    }
    let Ok(Some((Frame::Array(mut items), _))) = Frame::parse(&raw, &Default::default()) else {
        return raw;
    };
    items.sort_by_key(|f| format!("{f:?}"));
    let mut out = bytes::BytesMut::new();
    Frame::Array(items).encode(&mut out);
    out.freeze()
}

/// Everything stored under the generator's keys, read in a form equal on any two servers.
fn snapshot(c: &mut RespReader) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for key in all_keys() {
        let ty = c.call(&["TYPE", key]);
        let value = match &ty {
            Frame::Simple(t) if &t[..] == b"string" => c.call(&["GET", key]),
            Frame::Simple(t) if &t[..] == b"list" => c.call(&["LRANGE", key, "0", "-1"]),
            Frame::Simple(t) if &t[..] == b"set" => match c.call(&["SMEMBERS", key]) {
                Frame::Array(mut m) => {
                    m.sort_by_key(|f| format!("{f:?}"));
                    Frame::Array(m)
                }
                other => other,
            },
            Frame::Simple(t) if &t[..] == b"zset" => {
                c.call(&["ZRANGE", key, "0", "-1", "WITHSCORES"])
            }
            Frame::Simple(t) if &t[..] == b"hash" => match c.call(&["HGETALL", key]) {
                Frame::Array(m) => {
                    let mut pairs: Vec<String> = m.chunks(2).map(|p| format!("{p:?}")).collect();
                    pairs.sort();
                    Frame::Bulk(pairs.join(",").into())
                }
                other => other,
            },
            Frame::Simple(t) if &t[..] == b"none" => Frame::NullBulk,
            other => panic!("TYPE {key}: {other:?}"),
        };
        out.push((format!("{key} {ty:?}"), format!("{value:?}")));
    }
    out
}

/// The slots of the keys Redis itself finds in `args` (`COMMAND GETKEYS` on a plain server);
/// empty when Redis finds none.
fn slots_per_redis(reference: &mut RespReader, args: &[&str]) -> Vec<Slot> {
    let mut q = vec!["COMMAND", "GETKEYS"];
    q.extend_from_slice(args);
    match reference.call(&q) {
        Frame::Array(keys) => keys
            .iter()
            .map(|k| match k {
                Frame::Bulk(k) => Slot::for_key(k),
                other => panic!("GETKEYS item {other:?}"),
            })
            .collect(),
        _ => Vec::new(),
    }
}

const CROSSSLOT: &[u8] = b"-CROSSSLOT Keys in request don't hash to the same slot\r\n";

#[test]
fn wrong_argument_counts_get_redis_replies_and_write_nothing_more() {
    let reference = RedisServer::start();
    let behind = RedisServer::start();
    let proxy = start_proxy(behind.addr, "");
    let cluster_reference = RedisServer::start();
    let cluster = RedisCluster::start(3, 0);
    let seeds: Vec<String> = cluster.addrs().iter().map(ToString::to_string).collect();
    let cluster_proxy = start_cluster_proxy(&seeds, "", "");

    let mut direct = RespReader::connect(reference.addr);
    let mut through = RespReader::connect(proxy.addr("svc").unwrap());
    let mut direct_c = RespReader::connect(cluster_reference.addr);
    let mut through_c = RespReader::connect(cluster_proxy.addr("svc").unwrap());

    let commands = multi_key_commands();
    for expected in [
        "mset", "mget", "del", "exists", "touch", "unlink", "msetnx", "eval",
    ] {
        assert!(
            commands.iter().any(|c| c.name == expected),
            "{expected} is not among the generated commands"
        );
    }
    let (mut sent, mut cross) = (0, 0);
    for info in &commands {
        for args in cases(info) {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let name = info.name;
            let want = comparable(name, direct.call_raw(&args));
            let got = comparable(name, through.call_raw(&args));
            assert_eq!(
                String::from_utf8_lossy(&got),
                String::from_utf8_lossy(&want),
                "standalone behind, {args:?}"
            );
            let got_c = comparable(name, through_c.call_raw(&args));
            sent += 1;
            if got_c == CROSSSLOT {
                // A real cluster refuses these too; the proxy must only say so when Redis
                // itself finds keys on several slots and the command can't be split.
                let slots = slots_per_redis(&mut direct_c, &args);
                assert!(
                    slots.windows(2).any(|w| w[0] != w[1]),
                    "CROSSSLOT for {args:?}, whose keys per Redis are on slots {slots:?}"
                );
                assert!(
                    redis_intercept::route::split_kind(name).is_none(),
                    "{name} is split by the proxy, yet {args:?} got CROSSSLOT"
                );
                cross += 1;
                continue;
            }
            let want_c = comparable(name, direct_c.call_raw(&args));
            assert_eq!(
                String::from_utf8_lossy(&got_c),
                String::from_utf8_lossy(&want_c),
                "cluster behind, {args:?}"
            );
        }
        assert_eq!(
            snapshot(&mut through),
            snapshot(&mut direct),
            "data after {} (standalone behind)",
            info.name
        );
        assert_eq!(
            snapshot(&mut through_c),
            snapshot(&mut direct_c),
            "data after {} (cluster behind)",
            info.name
        );
    }
    assert!(sent > 500, "only {sent} commands generated");
    assert!(
        cross < sent / 2,
        "{cross} of {sent} were cross-slot refusals"
    );
    proxy.shutdown();
    cluster_proxy.shutdown();
}

/// The chaos run's case on its own: `MSET a b c` across slots.
#[test]
fn odd_mset_across_slots_is_refused_and_writes_nothing() {
    let cluster = RedisCluster::start(3, 0);
    let seeds: Vec<String> = cluster.addrs().iter().map(ToString::to_string).collect();
    let proxy = start_cluster_proxy(&seeds, "", "");
    let mut c = RespReader::connect(proxy.addr("svc").unwrap());
    assert_ne!(Slot::for_key(b"a"), Slot::for_key(b"c"));
    assert_eq!(
        c.call_raw(&["MSET", "a", "b", "c"]),
        &b"-ERR wrong number of arguments for 'mset' command\r\n"[..]
    );
    assert_eq!(c.call(&["EXISTS", "a", "c"]), Frame::Integer(0));
    assert_eq!(cluster.get_from_owner("a"), Frame::NullBulk);
    assert_eq!(cluster.get_from_owner("c"), Frame::NullBulk);
    proxy.shutdown();
}

/// Scripts of transactions with argument errors, sent to Redis and through the proxy: an
/// arity error is answered at once and makes EXEC fail with EXECABORT; a pairing error is
/// queued and reported inside EXEC's reply.
#[test]
fn argument_errors_inside_multi_match_redis() {
    let scripts: &[&[&[&str]]] = &[
        &[
            &["MULTI"],
            &["GET"],
            &["SET", "{t}a", "1"],
            &["EXEC"],
            &["GET", "{t}a"],
        ],
        &[
            &["MULTI"],
            &["SET", "{t}a", "2"],
            &["MSET", "{t}a", "3", "{t}b"],
            &["EXEC"],
            &["MGET", "{t}a", "{t}b"],
        ],
        &[
            &["WATCH", "{t}a"],
            &["MULTI"],
            &["SET", "{t}a", "4", "x", "y", "z"],
            &["EXPIRE", "{t}a"],
            &["EXEC"],
            &["GET", "{t}a"],
        ],
        &[&["MULTI"], &["EXEC", "now"], &["DISCARD"], &["GET", "{t}a"]],
    ];
    let reference = RedisServer::start();
    let behind = RedisServer::start();
    let proxy = start_proxy(behind.addr, "");
    let cluster = RedisCluster::start(3, 0);
    let seeds: Vec<String> = cluster.addrs().iter().map(ToString::to_string).collect();
    let cluster_proxy = start_cluster_proxy(&seeds, "", "");
    for (i, script) in scripts.iter().enumerate() {
        let mut direct = RespReader::connect(reference.addr);
        let mut through = RespReader::connect(proxy.addr("svc").unwrap());
        let mut through_c = RespReader::connect(cluster_proxy.addr("svc").unwrap());
        for args in *script {
            let want = direct.call_raw(args);
            let got = through.call_raw(args);
            let got_c = through_c.call_raw(args);
            let show = |b: &Bytes| String::from_utf8_lossy(b).into_owned();
            assert_eq!(show(&got), show(&want), "script {i}, {args:?}, standalone");
            assert_eq!(show(&got_c), show(&want), "script {i}, {args:?}, cluster");
        }
    }
    proxy.shutdown();
    cluster_proxy.shutdown();
}
