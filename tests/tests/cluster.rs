//! End-to-end: slot and topology logic against a real Redis Cluster.

use redis_intercept::cluster::{Slot, SlotMap};
use redis_intercept::resp::Frame;
use redis_intercept_e2e::{RedisCluster, RedisServer, RespReader};

/// A small deterministic generator, so failures reproduce.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn slot_of_10000_random_keys_matches_cluster_keyslot() {
    let node = RedisServer::start_with(&[
        "--cluster-enabled",
        "yes",
        "--cluster-config-file",
        "nodes.conf",
    ]);
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    let alphabet = b"ab{}xyz:._-0123456789";
    let keys: Vec<Vec<u8>> = (0..10_000)
        .map(|_| {
            let len = (rng.next() % 24) as usize;
            (0..len)
                .map(|_| alphabet[(rng.next() % alphabet.len() as u64) as usize])
                .collect()
        })
        .collect();
    let mut c = RespReader::connect(node.addr);
    let mut batch = Vec::new();
    for key in &keys {
        batch.extend_from_slice(
            format!("*3\r\n$7\r\nCLUSTER\r\n$7\r\nKEYSLOT\r\n${}\r\n", key.len()).as_bytes(),
        );
        batch.extend_from_slice(key);
        batch.extend_from_slice(b"\r\n");
    }
    c.send(&batch);
    let mut tagged = 0;
    for key in &keys {
        let expected = c.read();
        assert_eq!(
            Frame::Integer(i64::from(Slot::for_key(key).get())),
            expected,
            "key {:?}",
            String::from_utf8_lossy(key)
        );
        if key.contains(&b'{') {
            tagged += 1;
        }
    }
    assert!(tagged > 1000, "too few keys exercised hash tags ({tagged})");
}

#[test]
fn topology_from_a_real_cluster_parses_and_agrees() {
    let cluster = RedisCluster::start(3, 1);
    let seed = &cluster.nodes[0];
    let host = seed.addr.ip().to_string();
    let from_slots = SlotMap::from_cluster_slots(&seed.cmd(&["CLUSTER", "SLOTS"]), &host).unwrap();
    let from_shards =
        SlotMap::from_cluster_shards(&seed.cmd(&["CLUSTER", "SHARDS"]), &host).unwrap();
    assert!(from_slots.is_complete());
    assert_eq!(from_slots.shards().len(), 3);
    for shard in from_slots.shards() {
        assert_eq!(shard.replicas.len(), 1, "{shard:?}");
    }
    for slot in (0..16384).step_by(97).map(|n| Slot::new(n).unwrap()) {
        assert_eq!(
            from_slots.shard(slot),
            from_shards.shard(slot),
            "slot {slot:?}"
        );
    }
    // Each master really owns what the map says: a key written there is readable there.
    for (i, shard) in from_slots.shards().iter().enumerate() {
        let key = (0..)
            .map(|n| format!("probe{i}-{n}"))
            .find(|k| from_slots.master(Slot::for_key(k.as_bytes())) == Some(shard.master.as_str()))
            .unwrap();
        let master = cluster
            .nodes
            .iter()
            .find(|n| n.addr.to_string() == shard.master)
            .unwrap();
        assert_eq!(master.cmd(&["SET", &key, "v"]), Frame::Simple("OK".into()));
    }
}
