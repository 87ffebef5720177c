//! Staleness under churn: many RESP3 tracking clients read (keeping a local cache the way
//! redis-py's does: fill on reply, drop on an invalidation push) while other clients write
//! the same keys through the proxy, across a slot migration, a manual failover and a
//! master's death. At checkpoints the writers pause; once the invalidations are in, no
//! reader may hold a value other than the one in Redis.

#![expect(clippy::unwrap_used, reason = "tests panic on failure")]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use redis_intercept::cluster::{Slot, SlotMap};
use redis_intercept::resp::Frame;
use redis_intercept_e2e::{RedisCluster, RedisServer, RespReader, start_cluster_proxy, wait_until};

/// Keys under test: four hash tags (so a migrated slot carries a quarter of them).
fn keys() -> Vec<String> {
    (0..160).map(|i| format!("{{g{}}}:{i}", i % 4)).collect()
}

/// A tracking client with a local cache.
struct Reader {
    conn: RespReader,
    cache: HashMap<String, Bytes>,
    hits: u64,
    invalidations: u64,
}

impl Reader {
    fn connect(addr: SocketAddr) -> Reader {
        let mut conn = RespReader::connect(addr);
        conn.call(&["HELLO", "3"]);
        assert_eq!(
            conn.call(&["CLIENT", "TRACKING", "ON"]),
            Frame::Simple("OK".into())
        );
        Reader {
            conn,
            cache: HashMap::new(),
            hits: 0,
            invalidations: 0,
        }
    }

    fn apply(&mut self, push: Vec<Frame>) {
        self.invalidations += 1;
        match push.get(1) {
            Some(Frame::Array(keys)) => {
                for k in keys {
                    if let Frame::Bulk(k) = k {
                        self.cache.remove(String::from_utf8_lossy(k).as_ref());
                    }
                }
            }
            _ => self.cache.clear(),
        }
    }

    /// GET through the cache, which first takes the invalidations that came (as redis-py
    /// does before it serves from its cache).
    fn get(&mut self, key: &str) {
        self.drain(Duration::from_micros(1));
        if self.cache.contains_key(key) {
            self.hits += 1;
            return;
        }
        self.conn.send(&redis_intercept_e2e::encode(&["GET", key]));
        loop {
            match self.conn.read() {
                Frame::Push(p) => self.apply(p),
                Frame::Bulk(v) => {
                    self.cache.insert(key.to_owned(), v);
                    return;
                }
                // A missing key, or an error in a failover window: nothing to cache.
                _ => return,
            }
        }
    }

    /// Takes the invalidations that come until none has for `idle`.
    fn drain(&mut self, idle: Duration) {
        for raw in self.conn.drain_raw(idle) {
            let parsed = Frame::parse(&raw, &redis_intercept::resp::Limits::default());
            if let Ok(Some((Frame::Push(p), _))) = parsed {
                self.apply(p);
            }
        }
    }
}

/// Shared phase: readers and writers run while `running`; at a checkpoint they pause and
/// each reader compares its cache with Redis.
struct Control {
    running: AtomicBool,
    stop: AtomicBool,
    paused: AtomicUsize,
    writes: AtomicU64,
}

/// `key`'s value on its master, read directly.
fn truth(cluster: &RedisCluster, map: &SlotMap, key: &str) -> Option<Bytes> {
    let owner = map.master(Slot::for_key(key.as_bytes())).unwrap();
    match node(cluster, owner).cmd(&["GET", key]) {
        Frame::Bulk(v) => Some(v),
        _ => None,
    }
}

fn slot_map(cluster: &RedisCluster) -> SlotMap {
    let node = cluster.nodes.iter().find(|n| n.pid().is_some()).unwrap();
    SlotMap::from_cluster_slots(&node.cmd(&["CLUSTER", "SLOTS"]), "127.0.0.1").unwrap()
}

fn node<'c>(cluster: &'c RedisCluster, addr: &str) -> &'c RedisServer {
    cluster
        .nodes
        .iter()
        .find(|n| n.addr.to_string() == addr)
        .unwrap()
}

fn is_master(n: &RedisServer) -> bool {
    matches!(n.cmd(&["ROLE"]), Frame::Array(p) if p.first() == Some(&Frame::Bulk("master".into())))
}

/// What a reader held at a checkpoint.
type Held = (usize, HashMap<String, Bytes>);

/// Pauses everyone, lets the invalidations arrive, and compares every reader's cache with
/// Redis.
fn checkpoint(
    ctl: &Control,
    cluster: &RedisCluster,
    held: &std::sync::mpsc::Receiver<Held>,
    readers: usize,
    writers: usize,
    what: &str,
) {
    ctl.running.store(false, Ordering::SeqCst);
    wait_until(Duration::from_secs(20), || {
        ctl.paused.load(Ordering::SeqCst) == readers + writers
    });
    // The writers are still: the readers take what invalidations came, and report.
    ctl.paused.store(0, Ordering::SeqCst);
    let map = slot_map(cluster);
    let mut stale = Vec::new();
    let mut entries = 0;
    for _ in 0..readers {
        let (r, cache) = held.recv_timeout(Duration::from_secs(20)).unwrap();
        for (k, v) in cache {
            entries += 1;
            let now = truth(cluster, &map, &k);
            if now.as_ref() != Some(&v) {
                stale.push(format!("reader {r}: {k} cached {v:?}, Redis has {now:?}"));
            }
        }
    }
    assert!(
        stale.is_empty(),
        "{what}: stale values:\n{}",
        stale.join("\n")
    );
    assert!(entries > 0, "{what}: the readers cached nothing");
    ctl.running.store(true, Ordering::SeqCst);
}

/// Moves every key of `slot` to another master, as `redis-cli --cluster reshard` does.
fn migrate_slot(cluster: &RedisCluster, slot: u16) {
    let map = slot_map(cluster);
    let from_addr = map.master(Slot::new(slot).unwrap()).unwrap().to_owned();
    let from = node(cluster, &from_addr);
    let to_addr = map
        .shards()
        .iter()
        .map(|s| s.master.clone())
        .find(|m| *m != from_addr)
        .unwrap();
    let to = node(cluster, &to_addr);
    let id = |n: &RedisServer| match n.cmd(&["CLUSTER", "MYID"]) {
        Frame::Bulk(b) => String::from_utf8_lossy(&b).into_owned(),
        other => panic!("{other:?}"),
    };
    let s = slot.to_string();
    to.cmd(&["CLUSTER", "SETSLOT", &s, "IMPORTING", &id(from)]);
    from.cmd(&["CLUSTER", "SETSLOT", &s, "MIGRATING", &id(to)]);
    let port = to.addr.port().to_string();
    loop {
        let Frame::Array(keys) = from.cmd(&["CLUSTER", "GETKEYSINSLOT", &s, "100"]) else {
            panic!("GETKEYSINSLOT")
        };
        if keys.is_empty() {
            break;
        }
        for k in keys {
            if let Frame::Bulk(k) = k {
                let k = String::from_utf8_lossy(&k).into_owned();
                from.cmd(&["MIGRATE", "127.0.0.1", &port, &k, "0", "5000"]);
            }
        }
    }
    let to_id = id(to);
    for shard in map.shards() {
        node(cluster, &shard.master).cmd(&["CLUSTER", "SETSLOT", &s, "NODE", &to_id]);
    }
}

#[test]
fn no_tracking_client_holds_a_stale_value_across_resharding_and_failover() {
    const READERS: usize = 12;
    const WRITERS: usize = 3;
    let mut cluster = RedisCluster::start(3, 1);
    let seeds: Vec<String> = cluster.addrs().iter().map(ToString::to_string).collect();
    let proxy = start_cluster_proxy(&seeds, "refresh_interval = \"1s\"", "op_timeout = \"2s\"");
    let addr = proxy.addr("svc").unwrap();
    let ctl = Arc::new(Control {
        running: AtomicBool::new(true),
        stop: AtomicBool::new(false),
        paused: AtomicUsize::new(0),
        writes: AtomicU64::new(0),
    });
    let keys = Arc::new(keys());
    let (report, held) = std::sync::mpsc::channel::<Held>();
    let mut threads = Vec::new();
    for w in 0..WRITERS {
        let (ctl, keys) = (Arc::clone(&ctl), Arc::clone(&keys));
        threads.push(std::thread::spawn(move || {
            let mut conn = RespReader::connect(addr);
            let mut n = 0u64;
            while !ctl.stop.load(Ordering::SeqCst) {
                if !ctl.running.load(Ordering::SeqCst) {
                    ctl.paused.fetch_add(1, Ordering::SeqCst);
                    while !ctl.running.load(Ordering::SeqCst) && !ctl.stop.load(Ordering::SeqCst) {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    continue;
                }
                n += 1;
                let key = &keys[(n as usize * 7 + w * 13) % keys.len()];
                conn.call(&["SET", key, &format!("{w}-{n}")]);
                ctl.writes.fetch_add(1, Ordering::Relaxed);
                // Each key changes every few tens of milliseconds: readers cache in between.
                std::thread::sleep(Duration::from_millis(4));
            }
            (0, 0)
        }));
    }
    for r in 0..READERS {
        let (ctl, keys, report) = (Arc::clone(&ctl), Arc::clone(&keys), report.clone());
        threads.push(std::thread::spawn(move || {
            let mut reader = Reader::connect(addr);
            let mut i = r;
            while !ctl.stop.load(Ordering::SeqCst) {
                if !ctl.running.load(Ordering::SeqCst) {
                    ctl.paused.fetch_add(1, Ordering::SeqCst);
                    // Wait for the writers to be still (the counter was reset), then check.
                    wait_until(Duration::from_secs(20), || {
                        ctl.paused.load(Ordering::SeqCst) == 0
                    });
                    reader.drain(Duration::from_millis(300));
                    report.send((r, reader.cache.clone())).unwrap();
                    while !ctl.running.load(Ordering::SeqCst) && !ctl.stop.load(Ordering::SeqCst) {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    continue;
                }
                // A hot set of 16 keys per reader, re-read far more often than each is written.
                i = (i + 10) % keys.len();
                reader.get(&keys[i]);
            }
            (reader.hits, reader.invalidations)
        }));
    }
    std::thread::sleep(Duration::from_secs(2));
    checkpoint(&ctl, &cluster, &held, READERS, WRITERS, "steady");

    // A slot migration under load: its keys move to another master.
    migrate_slot(&cluster, Slot::for_key(b"{g1}").get());
    std::thread::sleep(Duration::from_secs(2));
    checkpoint(&ctl, &cluster, &held, READERS, WRITERS, "after resharding");

    // A manual failover: a replica takes over its master's slots.
    let map = slot_map(&cluster);
    let replica = map.shards()[0].replicas[0].clone();
    assert_eq!(
        node(&cluster, &replica).cmd(&["CLUSTER", "FAILOVER"]),
        Frame::Simple("OK".into())
    );
    wait_until(Duration::from_secs(20), || {
        is_master(node(&cluster, &replica))
    });
    std::thread::sleep(Duration::from_secs(3));
    checkpoint(
        &ctl,
        &cluster,
        &held,
        READERS,
        WRITERS,
        "after a manual failover",
    );

    // A master dies; its replica is promoted.
    let map = slot_map(&cluster);
    let victim = map
        .shards()
        .iter()
        .find(|s| s.master != replica && !s.replicas.is_empty())
        .unwrap()
        .clone();
    let heir = victim.replicas[0].clone();
    cluster
        .nodes
        .iter_mut()
        .find(|n| n.addr.to_string() == victim.master)
        .unwrap()
        .kill();
    wait_until(Duration::from_secs(30), || is_master(node(&cluster, &heir)));
    std::thread::sleep(Duration::from_secs(4));
    checkpoint(
        &ctl,
        &cluster,
        &held,
        READERS,
        WRITERS,
        "after a master died",
    );

    ctl.stop.store(true, Ordering::SeqCst);
    let mut hits = 0;
    let mut invalidations = 0;
    for t in threads {
        let (h, i) = t.join().unwrap();
        hits += h;
        invalidations += i;
    }
    // Not vacuous: readers were served from their caches, and invalidated.
    assert!(hits > 1000, "cache hits: {hits}");
    assert!(invalidations > 100, "invalidations: {invalidations}");
    assert!(ctl.writes.load(Ordering::Relaxed) > 1000);
    proxy.shutdown();
}
