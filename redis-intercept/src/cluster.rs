//! Redis Cluster logic without sockets: key slots (CRC16 with hash tags), the slot map read
//! from `CLUSTER SLOTS` or `CLUSTER SHARDS`, and `MOVED`/`ASK` redirects.
//!
//! Nothing here does I/O, so every rule is unit-tested against the cluster specification.

mod redirect;
mod refresh;
mod scan;
mod slot;
mod slot_map;
mod topology;

pub use redirect::{
    Decision, Hops, MAX_HOPS, RETRY_MAX, RETRY_START, Redirect, RedirectKind, decide, retry_wait,
};
pub use refresh::RefreshTrigger;
pub use scan::{ScanCursor, ScanStep};
pub use slot::{SLOT_COUNT, Slot, hash_tag};
pub use slot_map::{Shard, SlotMap, TopologyError, join_host_port};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resp::Frame;
    use bytes::Bytes;

    #[test]
    fn slots_match_the_cluster_spec() {
        // The spec's CRC16 check value: "123456789" -> 0x31C3.
        assert_eq!(
            crc16::State::<crc16::XMODEM>::calculate(b"123456789"),
            0x31C3
        );
        // 0x31C3 = 12739 is below 16384, so the slot is the CRC itself.
        assert_eq!(Slot::for_key(b"123456789").get(), 12739);
        assert_eq!(Slot::for_key(b"foo").get(), 12182);
        assert_eq!(Slot::for_key(b"bar").get(), 5061);
        assert_eq!(Slot::for_key(b"").get(), 0);
    }

    #[test]
    fn hash_tags_follow_the_spec_examples() {
        assert_eq!(hash_tag(b"{user1000}.following"), b"user1000");
        assert_eq!(
            Slot::for_key(b"{user1000}.following"),
            Slot::for_key(b"{user1000}.followers")
        );
        assert_eq!(hash_tag(b"foo{}{bar}"), b"foo{}{bar}");
        assert_eq!(hash_tag(b"foo{{bar}}zap"), b"{bar");
        assert_eq!(hash_tag(b"foo{bar}{zap}"), b"bar");
        assert_eq!(hash_tag(b"no-tag"), b"no-tag");
        assert_eq!(hash_tag(b"open{only"), b"open{only");
    }

    fn bulk(s: &str) -> Frame {
        Frame::Bulk(Bytes::copy_from_slice(s.as_bytes()))
    }

    fn node(host: &str, port: i64) -> Frame {
        Frame::Array(vec![bulk(host), Frame::Integer(port), bulk("id")])
    }

    #[test]
    fn cluster_slots_builds_the_map() {
        let reply = Frame::Array(vec![
            Frame::Array(vec![
                Frame::Integer(0),
                Frame::Integer(5460),
                node("10.0.0.1", 7000),
                node("10.0.0.4", 7003),
            ]),
            Frame::Array(vec![
                Frame::Integer(5461),
                Frame::Integer(10922),
                node("", 7001),
            ]),
            Frame::Array(vec![
                Frame::Integer(10923),
                Frame::Integer(16383),
                node("10.0.0.3", 7002),
                node("?", 7005),
            ]),
        ]);
        let map = SlotMap::from_cluster_slots(&reply, "10.0.0.9").unwrap();
        assert!(map.is_complete());
        assert_eq!(map.master(Slot(0)), Some("10.0.0.1:7000"));
        assert_eq!(map.shard(Slot(100)).unwrap().replicas, ["10.0.0.4:7003"]);
        assert_eq!(map.master(Slot(5461)), Some("10.0.0.9:7001"));
        assert_eq!(
            map.shard(Slot(16383)).unwrap().replicas,
            Vec::<String>::new()
        );
        assert_eq!(
            map.ranges(),
            [(0, 5460, 0), (5461, 10922, 1), (10923, 16383, 2)]
        );
    }

    #[test]
    fn cluster_slots_rejects_bad_ranges_and_errors() {
        let bad = Frame::Array(vec![Frame::Array(vec![
            Frame::Integer(10),
            Frame::Integer(16384),
            node("a", 1),
        ])]);
        assert_eq!(
            SlotMap::from_cluster_slots(&bad, "x"),
            Err(TopologyError::BadRange(10, 16384))
        );
        let backwards = Frame::Array(vec![Frame::Array(vec![
            Frame::Integer(10),
            Frame::Integer(5),
            node("a", 1),
        ])]);
        assert_eq!(
            SlotMap::from_cluster_slots(&backwards, "x"),
            Err(TopologyError::BadRange(10, 5))
        );
        let err = Frame::Error(Bytes::from_static(
            b"ERR This instance has cluster support disabled",
        ));
        assert!(matches!(
            SlotMap::from_cluster_slots(&err, "x"),
            Err(TopologyError::NodeError(_))
        ));
        let partial = Frame::Array(vec![Frame::Array(vec![
            Frame::Integer(0),
            Frame::Integer(99),
            node("a", 1),
        ])]);
        assert!(
            !SlotMap::from_cluster_slots(&partial, "x")
                .unwrap()
                .is_complete()
        );
    }

    #[test]
    fn cluster_shards_uses_endpoints_roles_and_health() {
        let n = |endpoint: &str, port: i64, role: &str, health: &str| {
            Frame::Array(vec![
                bulk("id"),
                bulk("abc"),
                bulk("port"),
                Frame::Integer(port),
                bulk("ip"),
                bulk("10.0.0.1"),
                bulk("endpoint"),
                bulk(endpoint),
                bulk("hostname"),
                bulk("redis-0.redis"),
                bulk("role"),
                bulk(role),
                bulk("health"),
                bulk(health),
            ])
        };
        let reply = Frame::Array(vec![Frame::Array(vec![
            bulk("slots"),
            Frame::Array(vec![
                Frame::Integer(0),
                Frame::Integer(99),
                Frame::Integer(200),
                Frame::Integer(299),
            ]),
            bulk("nodes"),
            Frame::Array(vec![
                n("redis-1.redis", 7001, "replica", "online"),
                n("redis-0.redis", 7000, "master", "online"),
                n("redis-2.redis", 7002, "replica", "failed"),
            ]),
        ])]);
        let map = SlotMap::from_cluster_shards(&reply, "x").unwrap();
        assert_eq!(map.master(Slot(50)), Some("redis-0.redis:7000"));
        assert_eq!(map.master(Slot(250)), Some("redis-0.redis:7000"));
        assert_eq!(map.master(Slot(150)), None);
        assert_eq!(map.shard(Slot(0)).unwrap().replicas, ["redis-1.redis:7001"]);
    }

    #[test]
    fn redirects_parse() {
        assert_eq!(
            Redirect::parse(b"-MOVED 3999 127.0.0.1:6381\r\n", "h"),
            Some(Redirect {
                kind: RedirectKind::Moved,
                slot: Slot(3999),
                addr: "127.0.0.1:6381".into()
            })
        );
        assert_eq!(
            Redirect::parse(b"ASK 15495 :7002", "10.1.1.1"),
            Some(Redirect {
                kind: RedirectKind::Ask,
                slot: Slot(15495),
                addr: "10.1.1.1:7002".into()
            })
        );
        assert_eq!(
            Redirect::parse(b"-MOVED 3999 [::1]:7000\r\n", "h")
                .unwrap()
                .addr,
            "[::1]:7000"
        );
        assert_eq!(Redirect::parse(b"-MOVED 16384 a:1\r\n", "h"), None);
        assert_eq!(Redirect::parse(b"-ERR MOVED 1 a:1\r\n", "h"), None);
        assert_eq!(Redirect::parse(b"-MOVED 1\r\n", "h"), None);
    }

    #[test]
    fn moved_updates_one_slot() {
        let mut map = SlotMap::empty();
        map.set_owner(Slot(7), "a:1");
        map.set_owner(Slot(8), "b:2");
        map.set_owner(Slot(7), "b:2");
        assert_eq!(map.master(Slot(7)), Some("b:2"));
        assert_eq!(map.shards().len(), 2);
    }
    fn three_shards() -> SlotMap {
        let mut map = SlotMap::empty();
        let shard = |m: &str| Shard {
            master: m.into(),
            replicas: vec![],
        };
        map.assign(0, 5460, shard("a:1")).unwrap();
        map.assign(5461, 10922, shard("b:2")).unwrap();
        map.assign(10923, 16383, shard("c:3")).unwrap();
        map
    }

    #[test]
    fn scan_cursor_round_trips_and_starts_at_zero() {
        assert_eq!(ScanCursor::decode(0), ScanCursor::START);
        let c = ScanCursor {
            anchor: Slot(10923),
            tag: 1023,
            node: (1 << 40) - 1,
        };
        assert_eq!(ScanCursor::decode(c.encode().unwrap()), c);
        assert_eq!(
            ScanCursor {
                node: 1 << 40,
                ..ScanCursor::START
            }
            .encode(),
            None
        );
        for m in ["a:1", "127.0.0.1:7000", ""] {
            assert!((1..=1023).contains(&ScanCursor::tag_of(m)));
        }
    }

    #[test]
    fn scan_visits_each_shard_once_in_slot_order() {
        let map = three_shards();
        let mut cursor = 0;
        let mut visited = Vec::new();
        // Each master answers "more" once, then 0.
        let mut answered_more = std::collections::HashSet::new();
        loop {
            let step = map.scan_step(ScanCursor::decode(cursor)).unwrap();
            visited.push((step.shard, step.node_cursor));
            let next = if answered_more.insert(step.shard) {
                77
            } else {
                0
            };
            cursor = map.scan_next(step.shard, next).unwrap();
            if cursor == 0 {
                break;
            }
        }
        assert_eq!(visited, [(0, 0), (0, 77), (1, 0), (1, 77), (2, 0), (2, 77)]);
    }

    #[test]
    fn scan_restarts_a_shard_whose_master_changed() {
        let map = three_shards();
        let mid_b = map.scan_next(1, 42).unwrap();
        assert_eq!(
            map.scan_step(ScanCursor::decode(mid_b)),
            Some(ScanStep {
                shard: 1,
                node_cursor: 42
            })
        );
        // Failover: b's replica d takes over the same slots.
        let mut after = SlotMap::empty();
        let shard = |m: &str| Shard {
            master: m.into(),
            replicas: vec![],
        };
        after.assign(0, 5460, shard("a:1")).unwrap();
        after.assign(5461, 10922, shard("d:4")).unwrap();
        after.assign(10923, 16383, shard("c:3")).unwrap();
        let step = after.scan_step(ScanCursor::decode(mid_b)).unwrap();
        assert_eq!(after.shards()[step.shard].master, "d:4");
        assert_eq!(step.node_cursor, 0, "a new master's scan starts over");
    }

    #[test]
    fn refresh_trigger_waits_for_threshold_and_interval() {
        let t0 = std::time::Instant::now();
        let sec = std::time::Duration::from_secs(1);
        let mut t = RefreshTrigger::new(3, sec);
        assert!(!t.note() && !t.note());
        assert_eq!(t.due(t0), None);
        assert!(t.note());
        assert_eq!(t.due(t0), Some(t0));
        t.refreshed(t0);
        assert_eq!(t.due(t0), None);
        for _ in 0..3 {
            t.note();
        }
        assert_eq!(t.due(t0 + sec / 2), Some(t0 + sec));
        assert_eq!(t.due(t0 + sec * 2), Some(t0 + sec * 2));
    }
}
