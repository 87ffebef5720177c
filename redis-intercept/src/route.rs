//! Pure routing decisions for a cluster upstream: which slots a request touches, whether it
//! must be split or refused, and which node of a shard serves it under the read policy.
//!
//! No sockets here: callers pass node health in as a function, so every rule is unit-tested.

use crate::cluster::{Shard, Slot};
use crate::command::{Command, flags};
use crate::config::ReadPolicy;
use crate::resp::Request;

/// How a multi-slot command's per-slot replies are put back together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SplitKind {
    /// MGET: values in the order of the original keys.
    Values,
    /// MSET: `OK` when every part is OK.
    AllOk,
    /// DEL, UNLINK, EXISTS, TOUCH: the integers added up.
    Sum,
}

/// What a keyless command does on a cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keyless {
    /// Any one master answers (TIME, COMMAND, EVAL with no keys, unknown commands…).
    AnyMaster,
    /// KEYS: every master's array, concatenated.
    Concat,
    /// DBSIZE: every master's integer, added up.
    Sum,
    /// FLUSHDB, FLUSHALL, SCRIPT FLUSH, FUNCTION FLUSH: every master; OK when all are.
    AllOk,
    /// SCRIPT LOAD, FUNCTION LOAD/DELETE: every master, so any node can run it; the first
    /// master's reply (they are equal).
    First,
    /// SCAN with a cluster-wide cursor.
    Scan,
    /// RANDOMKEY: a random master.
    RandomKey,
    /// INFO: the proxy's own sections plus the masters' keyspace, added up.
    Info,
    /// CONFIG SET / RESETSTAT / REWRITE: every node, masters and replicas; OK when all are,
    /// else one error naming the nodes that failed.
    EveryNode,
    /// SCRIPT EXISTS: every master's array of 0/1; 1 only where every master has the
    /// script (any master may be asked to run it).
    AllHave,
    /// SCRIPT KILL / FUNCTION KILL: every master; OK from the one that ran a script, else
    /// Redis's `NOTBUSY`.
    AnyOk,
    /// PUBSUB CHANNELS / SHARDCHANNELS: every master's array, each name once.
    Union,
    /// PUBSUB NUMSUB / SHARDNUMSUB: every master's `[name, count, …]`, counts added up by
    /// position.
    NumSub,
    /// LASTSAVE: every master's integer, the smallest (every master has saved since).
    Min,
}

/// Where a request goes on a cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// No keys.
    Keyless(Keyless),
    /// Every key hashes to this slot.
    Slot(Slot),
    /// Keys span slots and the command can be split: (slot, key argument index) of every
    /// key, grouped by slot (sorted by slot; a slot's keys keep their order). One flat list
    /// instead of a list per slot: one allocation per request, not one per slot.
    Split(SplitKind, Vec<(Slot, usize)>),
    /// Keys span slots and the command must not be split.
    CrossSlot,
}

/// Redis's reply to keys that span slots.
pub const CROSSSLOT: &[u8] = b"-CROSSSLOT Keys in request don't hash to the same slot\r\n";

/// How a command's keys are split, if they may be.
pub fn split_kind(name: &str) -> Option<SplitKind> {
    match name {
        "mget" => Some(SplitKind::Values),
        "mset" => Some(SplitKind::AllOk),
        "del" | "unlink" | "exists" | "touch" => Some(SplitKind::Sum),
        _ => None,
    }
}

/// The keyless behaviour of a command by name.
fn keyless(name: &str) -> Keyless {
    match name {
        "keys" => Keyless::Concat,
        "dbsize" => Keyless::Sum,
        "flushdb" | "flushall" | "script|flush" | "function|flush" => Keyless::AllOk,
        "script|load" | "function|load" | "function|delete" => Keyless::First,
        "scan" => Keyless::Scan,
        "randomkey" => Keyless::RandomKey,
        "info" => Keyless::Info,
        "pubsub|channels" | "pubsub|shardchannels" => Keyless::Union,
        "pubsub|numsub" | "pubsub|shardnumsub" => Keyless::NumSub,
        "pubsub|numpat" => Keyless::Sum,
        "config|set" | "config|resetstat" | "config|rewrite" => Keyless::EveryNode,
        "script|exists" => Keyless::AllHave,
        "script|kill" | "function|kill" => Keyless::AnyOk,
        "slowlog|len" | "latency|reset" => Keyless::Sum,
        "slowlog|get" | "latency|latest" => Keyless::Concat,
        "slowlog|reset" | "memory|purge" => Keyless::AllOk,
        "bgsave" | "bgrewriteaof" | "save" => Keyless::First,
        "lastsave" => Keyless::Min,
        _ => Keyless::AnyMaster,
    }
}

/// Decides where `req` goes. `keys` is scratch space for key indexes (reused to avoid an
/// allocation per request). Unknown commands are keyless: sent to a master, whose MOVED (if
/// the command had keys after all) is followed.
pub fn plan(cmd: Option<Command>, req: &Request<'_>, keys: &mut Vec<usize>) -> Plan {
    let Some(cmd) = cmd else {
        return Plan::Keyless(Keyless::AnyMaster);
    };
    keys.clear();
    cmd.info.key_indexes(req, keys);
    let mut slots = keys.iter().filter_map(|&i| req.arg(i)).map(Slot::for_key);
    let Some(first) = slots.next() else {
        if cmd.info.name == "debug"
            && let Some(key) = req.arg(2)
        {
            // DEBUG OBJECT key (the only DEBUG the proxy forwards) goes to the key's master.
            return Plan::Slot(Slot::for_key(key));
        }
        if cmd.info.name == "publish"
            && let Some(channel) = req.arg(1)
        {
            // Where the proxy subscribes the channel (`session/pubsub.rs`), so the count
            // of receivers is exact for its clients.
            return Plan::Slot(Slot::for_key(channel));
        }
        return Plan::Keyless(keyless(cmd.info.name));
    };
    if slots.all(|s| s == first) {
        return Plan::Slot(first);
    }
    let Some(kind) = split_kind(cmd.info.name) else {
        return Plan::CrossSlot;
    };
    let mut pairs: Vec<(Slot, usize)> = keys
        .iter()
        .filter_map(|&k| req.arg(k).map(|key| (Slot::for_key(key), k)))
        .collect();
    // Stable: a slot's keys stay in request order.
    pairs.sort_by_key(|&(slot, _)| slot);
    Plan::Split(kind, pairs)
}

/// The slot groups of a [`Plan::Split`]: each is the keys of one slot.
pub fn slot_groups(pairs: &[(Slot, usize)]) -> impl Iterator<Item = &[(Slot, usize)]> {
    pairs.chunk_by(|a, b| a.0 == b.0)
}

/// Key-prefix routes of a service: the longest matching prefix wins; no match is the
/// catch-all (route 0). Routes are numbered from 1 in the order given.
#[derive(Debug, Clone, Default)]
pub struct Prefixes {
    /// (prefix, ignore case, route number), longest prefix first. Case-insensitive prefixes
    /// are stored in lower case.
    entries: Vec<(Vec<u8>, bool, usize)>,
}

impl Prefixes {
    /// Routes for `(prefix, case_insensitive)` in config order.
    pub fn new(routes: &[(Vec<u8>, bool)]) -> Prefixes {
        let mut entries: Vec<(Vec<u8>, bool, usize)> = routes
            .iter()
            .enumerate()
            .map(|(i, (p, ci))| {
                let p = if *ci {
                    p.to_ascii_lowercase()
                } else {
                    p.clone()
                };
                (p, *ci, i + 1)
            })
            .collect();
        // Longest first; among equal lengths, config order.
        entries.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.2.cmp(&b.2)));
        Prefixes { entries }
    }

    /// Whether there are no routes (everything goes to the catch-all).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The route `key` falls under; 0 for the catch-all.
    pub fn route_of(&self, key: &[u8]) -> usize {
        for (prefix, ci, route) in &self.entries {
            let Some(head) = key.get(..prefix.len()) else {
                continue;
            };
            let hit = if *ci {
                head.eq_ignore_ascii_case(prefix)
            } else {
                head == prefix.as_slice()
            };
            if hit {
                return *route;
            }
        }
        0
    }

    /// The key arguments `keys` of `req` grouped by route, routes in order of first key
    /// and each route's keys in request order: the parts of a multi-key command whose keys
    /// fall under several routes.
    pub fn group_keys(&self, req: &Request<'_>, keys: &[usize]) -> Vec<(usize, Vec<usize>)> {
        let mut groups: Vec<(usize, Vec<usize>)> = Vec::new();
        for &k in keys {
            let r = self.route_of(req.arg(k).unwrap_or_default());
            match groups.iter_mut().find(|(g, _)| *g == r) {
                Some((_, idx)) => idx.push(k),
                None => groups.push((r, vec![k])),
            }
        }
        groups
    }

    /// Length of route `route`'s prefix (0 for the catch-all).
    pub fn prefix_len(&self, route: usize) -> usize {
        self.entries
            .iter()
            .find(|e| e.2 == route)
            .map_or(0, |e| e.0.len())
    }
}

/// Whether the command may be served by a replica under a read policy.
pub fn is_read(cmd: Option<Command>) -> bool {
    cmd.is_some_and(|c| c.info.has(flags::READONLY) && !c.info.has(flags::WRITE))
}

/// Picks the node of `shard` that serves a request. Writes (`read == false`) always go to the
/// master. `usable` says whether a node is reachable right now; `roll` is a random number for
/// spreading reads. `None` only under `Replica` when the shard has no replica at all.
///
/// Semantics follow Envoy's `read_policy`: the `Prefer*` policies fall back to the other role
/// when no node of the preferred role is usable; `Any` spreads over every usable node.
pub fn pick_node<'a>(
    shard: &'a Shard,
    policy: ReadPolicy,
    read: bool,
    usable: impl Fn(&str) -> bool,
    roll: u32,
) -> Option<&'a str> {
    let master = shard.master.as_str();
    if !read {
        return Some(master);
    }
    let pick = |nodes: &[&'a str]| -> Option<&'a str> {
        (!nodes.is_empty()).then(|| nodes[roll as usize % nodes.len()])
    };
    if policy == ReadPolicy::Master {
        return Some(master);
    }
    let usable_replicas: Vec<&str> = shard
        .replicas
        .iter()
        .map(String::as_str)
        .filter(|r| usable(r))
        .collect();
    match policy {
        ReadPolicy::Master => Some(master),
        ReadPolicy::PreferMaster => {
            if usable(master) {
                Some(master)
            } else {
                pick(&usable_replicas).or(Some(master))
            }
        }
        ReadPolicy::Replica => pick(&usable_replicas).or_else(|| {
            // None reachable: one of them anyway, so the client gets that node's error.
            let all: Vec<&str> = shard.replicas.iter().map(String::as_str).collect();
            pick(&all)
        }),
        ReadPolicy::PreferReplica => pick(&usable_replicas).or(Some(master)),
        ReadPolicy::Any => {
            let mut nodes = usable_replicas;
            if usable(master) {
                nodes.push(master);
            }
            pick(&nodes).or(Some(master))
        }
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn debug_object_goes_to_its_keys_slot() {
        let mut parser = crate::resp::RequestParser::new(crate::resp::Limits::default());
        let raw = b"*3\r\n$5\r\nDEBUG\r\n$6\r\nOBJECT\r\n$3\r\n{a}\r\n";
        let n = parser.parse(raw).unwrap().unwrap();
        let req = parser.request(&raw[..n]);
        let cmd = crate::command::lookup(&req);
        assert_eq!(
            plan(cmd, &req, &mut Vec::new()),
            Plan::Slot(Slot::for_key(b"{a}"))
        );
    }

    use super::*;
    use crate::command::lookup;
    use crate::resp::{Limits, RequestParser};

    fn plan_of(line: &str) -> Plan {
        let input = format!("{line}\r\n");
        let mut p = RequestParser::new(Limits::default());
        let n = p.parse(input.as_bytes()).unwrap().unwrap();
        let req = p.request(&input.as_bytes()[..n]);
        plan(lookup(&req), &req, &mut Vec::new())
    }

    #[test]
    fn plans_by_keys() {
        assert_eq!(plan_of("GET foo"), Plan::Slot(Slot::for_key(b"foo")));
        assert_eq!(
            plan_of("MGET {u}a {u}b"),
            Plan::Slot(Slot::for_key(b"u")),
            "one slot: no split"
        );
        let Plan::Split(SplitKind::Values, parts) = plan_of("MGET a b a c") else {
            panic!("MGET over slots splits");
        };
        let a = Slot::for_key(b"a");
        let groups: Vec<_> = slot_groups(&parts).collect();
        assert_eq!(groups.len(), 3);
        let of_a = groups.iter().find(|g| g[0].0 == a).expect("a's group");
        assert_eq!(of_a, &[(a, 1), (a, 3)], "a slot's keys keep their order");
        let Plan::Split(SplitKind::AllOk, p) = plan_of("MSET a 1 b 2") else {
            panic!("MSET over slots splits");
        };
        let mut keys: Vec<usize> = p.iter().map(|&(_, k)| k).collect();
        keys.sort_unstable();
        assert_eq!(keys, [1, 3], "MSET keys are arguments 1 and 3");
        assert!(matches!(plan_of("DEL a b"), Plan::Split(SplitKind::Sum, _)));
        assert_eq!(plan_of("RENAME a b"), Plan::CrossSlot);
        assert_eq!(plan_of("MSETNX a 1 b 2"), Plan::CrossSlot);
        assert_eq!(plan_of("EVAL s 2 a b"), Plan::CrossSlot);
        assert_eq!(plan_of("EVAL s 0"), Plan::Keyless(Keyless::AnyMaster));
        assert_eq!(plan_of("KEYS *"), Plan::Keyless(Keyless::Concat));
        assert_eq!(
            plan_of("PUBLISH news hi"),
            Plan::Slot(Slot::for_key(b"news"))
        );
        assert_eq!(plan_of("PUBSUB NUMSUB a b"), Plan::Keyless(Keyless::NumSub));
        assert_eq!(plan_of("SCAN 0"), Plan::Keyless(Keyless::Scan));
        assert_eq!(plan_of("SCRIPT LOAD x"), Plan::Keyless(Keyless::First));
        assert_eq!(plan_of("NOSUCHCMD a"), Plan::Keyless(Keyless::AnyMaster));
    }

    #[test]
    fn longest_prefix_wins_with_optional_case() {
        let p = Prefixes::new(&[
            (b"user:".to_vec(), false),
            (b"user:vip:".to_vec(), false),
            (b"Cache:".to_vec(), true),
        ]);
        assert_eq!(p.route_of(b"user:1"), 1);
        assert_eq!(p.route_of(b"user:vip:1"), 2);
        assert_eq!(p.route_of(b"USER:1"), 0, "case-sensitive by default");
        assert_eq!(p.route_of(b"cache:x"), 3);
        assert_eq!(p.route_of(b"CACHE:x"), 3);
        assert_eq!(p.route_of(b"user"), 0);
        assert_eq!(p.route_of(b"other"), 0);
        assert_eq!(p.prefix_len(2), 9);
        assert_eq!(p.prefix_len(0), 0);
        assert!(Prefixes::new(&[]).is_empty());
    }

    #[test]
    fn multi_key_commands_group_by_route_in_key_order() {
        let p = Prefixes::new(&[(b"a:".to_vec(), false), (b"b:".to_vec(), false)]);
        let input =
            b"*6\r\n$4\r\nMGET\r\n$3\r\nb:1\r\n$1\r\nx\r\n$3\r\na:1\r\n$3\r\nb:2\r\n$1\r\ny\r\n";
        let mut parser = crate::resp::RequestParser::new(crate::resp::Limits::default());
        let n = parser.parse(input).unwrap().unwrap();
        let req = parser.request(&input[..n]);
        assert_eq!(
            p.group_keys(&req, &[1, 2, 3, 4, 5]),
            [(2, vec![1, 4]), (0, vec![2, 5]), (1, vec![3])]
        );
    }

    #[test]
    fn read_policies() {
        let shard = Shard {
            master: "m:1".into(),
            replicas: vec!["r1:1".into(), "r2:1".into()],
        };
        let all = |_: &str| true;
        let no_master = |n: &str| n != "m:1";
        let no_replicas = |n: &str| n == "m:1";
        for policy in [
            ReadPolicy::Master,
            ReadPolicy::Replica,
            ReadPolicy::PreferReplica,
            ReadPolicy::Any,
        ] {
            assert_eq!(pick_node(&shard, policy, false, all, 1), Some("m:1"));
        }
        assert_eq!(
            pick_node(&shard, ReadPolicy::Master, true, all, 1),
            Some("m:1")
        );
        assert_eq!(
            pick_node(&shard, ReadPolicy::PreferMaster, true, all, 1),
            Some("m:1")
        );
        assert_eq!(
            pick_node(&shard, ReadPolicy::PreferMaster, true, no_master, 1),
            Some("r2:1")
        );
        assert_eq!(
            pick_node(&shard, ReadPolicy::Replica, true, all, 0),
            Some("r1:1")
        );
        assert_eq!(
            pick_node(&shard, ReadPolicy::Replica, true, no_replicas, 0),
            Some("r1:1"),
            "replica-only never falls back to the master"
        );
        assert_eq!(
            pick_node(&shard, ReadPolicy::PreferReplica, true, no_replicas, 0),
            Some("m:1")
        );
        let any: std::collections::HashSet<_> = (0..3)
            .map(|roll| pick_node(&shard, ReadPolicy::Any, true, all, roll).unwrap())
            .collect();
        assert_eq!(any.len(), 3, "any spreads over all nodes");
        let lone = Shard {
            master: "m:1".into(),
            replicas: vec![],
        };
        assert_eq!(pick_node(&lone, ReadPolicy::Replica, true, all, 0), None);
    }
}
