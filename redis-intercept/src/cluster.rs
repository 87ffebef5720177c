//! Redis Cluster logic without sockets: key slots (CRC16 with hash tags), the slot map read
//! from `CLUSTER SLOTS` or `CLUSTER SHARDS`, and `MOVED`/`ASK` redirects.
//!
//! Nothing here does I/O, so every rule is unit-tested against the cluster specification.

use crate::resp::Frame;

/// Number of hash slots in a Redis Cluster.
pub const SLOT_COUNT: usize = 16384;

/// A hash slot. Type invariant: the value is below [`SLOT_COUNT`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Slot(u16);

impl Slot {
    /// The slot `n`, if it is in range.
    pub fn new(n: u16) -> Option<Slot> {
        (usize::from(n) < SLOT_COUNT).then_some(Slot(n))
    }

    /// The slot of `key`: CRC16/XMODEM of its hash tag (or of the whole key) modulo 16384.
    pub fn for_key(key: &[u8]) -> Slot {
        let crc = crc16::State::<crc16::XMODEM>::calculate(hash_tag(key));
        Slot(crc % SLOT_COUNT as u16)
    }

    /// The slot number.
    pub fn get(self) -> u16 {
        self.0
    }
}

/// The part of `key` that is hashed: the bytes between the first `{` and the first `}` after
/// it, if that is not empty; otherwise the whole key (cluster spec, "Hash tags").
pub fn hash_tag(key: &[u8]) -> &[u8] {
    if let Some(open) = key.iter().position(|&b| b == b'{') {
        let rest = &key[open + 1..];
        if let Some(close) = rest.iter().position(|&b| b == b'}')
            && close > 0
        {
            return &rest[..close];
        }
    }
    key
}

/// Why a topology reply could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopologyError {
    /// The reply isn't shaped like `CLUSTER SLOTS` / `CLUSTER SHARDS` output.
    #[error("malformed topology reply: {0}")]
    Malformed(&'static str),
    /// A slot number outside 0..16384, or a range that ends before it starts.
    #[error("invalid slot range {0}-{1}")]
    BadRange(i64, i64),
    /// The node answered with an error (e.g. cluster support disabled).
    #[error("node answered: {0}")]
    NodeError(String),
}

/// One master and its replicas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shard {
    /// `host:port` of the master.
    pub master: String,
    /// `host:port` of each replica that is usable.
    pub replicas: Vec<String>,
}

/// Which shard owns each slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotMap {
    /// Shards in the order first seen.
    shards: Vec<Shard>,
    /// For each slot, an index into `shards`, or `NO_OWNER`.
    owner: Vec<u16>,
}

/// Marks a slot no shard covers.
const NO_OWNER: u16 = u16::MAX;

impl SlotMap {
    /// A map where no slot has an owner.
    pub fn empty() -> SlotMap {
        SlotMap {
            shards: Vec::new(),
            owner: vec![NO_OWNER; SLOT_COUNT],
        }
    }

    /// The shard that owns `slot`.
    pub fn shard(&self, slot: Slot) -> Option<&Shard> {
        self.owner
            .get(usize::from(slot.get()))
            .and_then(|&i| self.shards.get(usize::from(i)))
    }

    /// The master that owns `slot`.
    pub fn master(&self, slot: Slot) -> Option<&str> {
        self.shard(slot).map(|s| s.master.as_str())
    }

    /// Every shard.
    pub fn shards(&self) -> &[Shard] {
        &self.shards
    }

    /// Whether every slot has an owner.
    pub fn is_complete(&self) -> bool {
        self.owner.iter().all(|&o| o != NO_OWNER)
    }

    /// Ranges of consecutive slots owned by the same shard, as (first, last, shard index).
    pub fn ranges(&self) -> Vec<(u16, u16, usize)> {
        let mut out: Vec<(u16, u16, usize)> = Vec::new();
        for (slot, &o) in self.owner.iter().enumerate() {
            if o == NO_OWNER {
                continue;
            }
            let slot = slot as u16;
            match out.last_mut() {
                Some(last) if last.2 == usize::from(o) && last.1 + 1 == slot => last.1 = slot,
                _ => out.push((slot, slot, usize::from(o))),
            }
        }
        out
    }

    /// Records that `master` now owns `slot` (after a MOVED), adding a shard for a master not
    /// seen before.
    pub fn set_owner(&mut self, slot: Slot, master: &str) {
        let index = match self.shards.iter().position(|s| s.master == master) {
            Some(i) => i,
            None => {
                self.shards.push(Shard {
                    master: master.to_owned(),
                    replicas: Vec::new(),
                });
                self.shards.len() - 1
            }
        };
        if let Some(o) = self.owner.get_mut(usize::from(slot.get())) {
            *o = index as u16;
        }
    }

    fn assign(&mut self, start: i64, end: i64, shard: Shard) -> Result<(), TopologyError> {
        let in_range = |n: i64| (0..SLOT_COUNT as i64).contains(&n);
        if !in_range(start) || !in_range(end) || end < start {
            return Err(TopologyError::BadRange(start, end));
        }
        let index = match self.shards.iter().position(|s| s.master == shard.master) {
            Some(i) => i,
            None => {
                self.shards.push(shard);
                self.shards.len() - 1
            }
        };
        for o in &mut self.owner[start as usize..=end as usize] {
            *o = index as u16;
        }
        Ok(())
    }

    /// Reads a `CLUSTER SLOTS` reply. `answering_host` replaces an empty host (the node
    /// doesn't know its own address); nodes with host `?` are skipped.
    ///
    /// # Errors
    /// A [`TopologyError`] for replies that aren't a slot table.
    pub fn from_cluster_slots(
        reply: &Frame,
        answering_host: &str,
    ) -> Result<SlotMap, TopologyError> {
        let ranges = match reply {
            Frame::Array(r) => r,
            Frame::Error(e) => {
                return Err(TopologyError::NodeError(
                    String::from_utf8_lossy(e).into_owned(),
                ));
            }
            _ => return Err(TopologyError::Malformed("CLUSTER SLOTS is not an array")),
        };
        let mut map = SlotMap::empty();
        for range in ranges {
            let Frame::Array(parts) = range else {
                return Err(TopologyError::Malformed("slot range is not an array"));
            };
            let (Some(Frame::Integer(start)), Some(Frame::Integer(end))) =
                (parts.first(), parts.get(1))
            else {
                return Err(TopologyError::Malformed("slot range without start and end"));
            };
            let mut nodes = parts[2..]
                .iter()
                .filter_map(|n| node_addr(n, answering_host));
            let Some(master) = nodes.next() else {
                continue;
            };
            map.assign(
                *start,
                *end,
                Shard {
                    master,
                    replicas: nodes.collect(),
                },
            )?;
        }
        Ok(map)
    }

    /// Reads a `CLUSTER SHARDS` reply (Redis 7): uses each node's `endpoint` (or `ip`),
    /// skips nodes whose health isn't `online`, and takes the master from `role`.
    ///
    /// # Errors
    /// A [`TopologyError`] for replies that aren't a shard list.
    pub fn from_cluster_shards(
        reply: &Frame,
        answering_host: &str,
    ) -> Result<SlotMap, TopologyError> {
        let shards = match reply {
            Frame::Array(s) => s,
            Frame::Error(e) => {
                return Err(TopologyError::NodeError(
                    String::from_utf8_lossy(e).into_owned(),
                ));
            }
            _ => return Err(TopologyError::Malformed("CLUSTER SHARDS is not an array")),
        };
        let mut map = SlotMap::empty();
        for shard in shards {
            let fields = map_fields(shard).ok_or(TopologyError::Malformed("shard is not a map"))?;
            let slots = match field(&fields, "slots") {
                Some(Frame::Array(s)) => s,
                _ => return Err(TopologyError::Malformed("shard without slots")),
            };
            let nodes = match field(&fields, "nodes") {
                Some(Frame::Array(n)) => n,
                _ => return Err(TopologyError::Malformed("shard without nodes")),
            };
            let mut master = None;
            let mut replicas = Vec::new();
            for node in nodes {
                let f = map_fields(node).ok_or(TopologyError::Malformed("node is not a map"))?;
                if field(&f, "health")
                    .and_then(text)
                    .is_some_and(|h| h != "online")
                {
                    continue;
                }
                let host = field(&f, "endpoint")
                    .and_then(text)
                    .filter(|h| !h.is_empty() && h != "?")
                    .or_else(|| field(&f, "ip").and_then(text))
                    .map(|h| {
                        if h.is_empty() {
                            answering_host.to_owned()
                        } else {
                            h
                        }
                    });
                let port = match field(&f, "port") {
                    Some(Frame::Integer(p)) => u16::try_from(*p).ok(),
                    _ => None,
                };
                let (Some(host), Some(port)) = (host, port) else {
                    continue;
                };
                if host == "?" {
                    continue;
                }
                let addr = join_host_port(&host, port);
                match field(&f, "role").and_then(text).as_deref() {
                    Some("master") => master = Some(addr),
                    _ => replicas.push(addr),
                }
            }
            let Some(master) = master else {
                continue;
            };
            let shard = Shard { master, replicas };
            for pair in slots.chunks(2) {
                let (Some(Frame::Integer(start)), Some(Frame::Integer(end))) =
                    (pair.first(), pair.get(1))
                else {
                    return Err(TopologyError::Malformed("odd slot list"));
                };
                map.assign(*start, *end, shard.clone())?;
            }
        }
        Ok(map)
    }
}

/// `host:port`, bracketing IPv6 hosts.
pub fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

fn text(f: &Frame) -> Option<String> {
    match f {
        Frame::Bulk(b) | Frame::Simple(b) | Frame::Verbatim(b) => {
            Some(String::from_utf8_lossy(b).into_owned())
        }
        _ => None,
    }
}

/// Key/value pairs of a RESP2 flattened map or a RESP3 map.
fn map_fields(f: &Frame) -> Option<Vec<(&Frame, &Frame)>> {
    match f {
        Frame::Array(items) if items.len() % 2 == 0 => {
            Some(items.chunks(2).map(|kv| (&kv[0], &kv[1])).collect())
        }
        Frame::Map(pairs) => Some(pairs.iter().map(|(k, v)| (k, v)).collect()),
        _ => None,
    }
}

fn field<'a>(fields: &[(&'a Frame, &'a Frame)], key: &str) -> Option<&'a Frame> {
    fields
        .iter()
        .find(|(k, _)| text(k).is_some_and(|k| k == key))
        .map(|(_, v)| *v)
}

/// A CLUSTER SLOTS node entry `[host, port, id, …]` as `host:port`.
fn node_addr(node: &Frame, answering_host: &str) -> Option<String> {
    let Frame::Array(parts) = node else {
        return None;
    };
    let host = text(parts.first()?)?;
    let Frame::Integer(port) = parts.get(1)? else {
        return None;
    };
    let port = u16::try_from(*port).ok()?;
    if host == "?" {
        return None;
    }
    let host = if host.is_empty() {
        answering_host.to_owned()
    } else {
        host
    };
    Some(join_host_port(&host, port))
}

/// Which kind of redirect a node sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedirectKind {
    /// The slot moved for good: update the map and resend.
    Moved,
    /// The slot is being migrated: resend once to the target after `ASKING`.
    Ask,
}

/// A `-MOVED slot host:port` or `-ASK slot host:port` error reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redirect {
    /// Moved or ask.
    pub kind: RedirectKind,
    /// The slot concerned.
    pub slot: Slot,
    /// Where to go (`host:port`; an empty host means the node that answered).
    pub addr: String,
}

impl Redirect {
    /// Parses a redirect from an error reply's bytes (with or without the leading `-` and
    /// trailing CRLF); `None` for any other reply.
    pub fn parse(reply: &[u8], answering_host: &str) -> Option<Redirect> {
        let reply = reply.strip_prefix(b"-").unwrap_or(reply);
        let reply = reply.strip_suffix(b"\r\n").unwrap_or(reply);
        let text = std::str::from_utf8(reply).ok()?;
        let mut words = text.split(' ');
        let kind = match words.next()? {
            "MOVED" => RedirectKind::Moved,
            "ASK" => RedirectKind::Ask,
            _ => return None,
        };
        let slot = Slot::new(words.next()?.parse().ok()?)?;
        let target = words.next()?;
        if words.next().is_some() {
            return None;
        }
        let (host, port) = target.rsplit_once(':')?;
        let port: u16 = port.parse().ok()?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let host = if host.is_empty() {
            answering_host
        } else {
            host
        };
        Some(Redirect {
            kind,
            slot,
            addr: join_host_port(host, port),
        })
    }
}

/// A cluster-wide SCAN cursor, as one decimal `u64` for the client.
///
/// Layout, high bits to low: a 10-bit tag of the shard's master address (1 to 1023; 0 only in
/// the start cursor), the 14-bit *anchor* slot (the lowest slot the shard owns), and the
/// 40-bit cursor of that master's own SCAN. Shards are visited in the order of their lowest
/// slot. Naming the shard by a slot rather than a node index keeps the cursor meaningful after
/// a failover (the promoted replica owns the same slots); the tag notices that the master
/// changed, and that shard's scan restarts at 0, which may repeat keys but never skips any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScanCursor {
    /// Lowest slot of the shard being scanned.
    pub anchor: Slot,
    /// Tag of the master the node cursor belongs to; 0: none yet.
    pub tag: u16,
    /// The master's own SCAN cursor.
    pub node: u64,
}

/// Bits of the node cursor. A node cursor walks a hash table of at most 2^40 buckets, far more
/// than any node holds.
const NODE_CURSOR_BITS: u32 = 40;
/// Bits of the anchor slot (16384 slots).
const ANCHOR_BITS: u32 = 14;

impl ScanCursor {
    /// The cursor that starts a full iteration (`0`).
    pub const START: ScanCursor = ScanCursor {
        anchor: Slot(0),
        tag: 0,
        node: 0,
    };

    /// Splits a client cursor into its parts. Any `u64` decodes to some cursor; a cursor the
    /// proxy never issued just starts somewhere (as a made-up cursor does in Redis).
    pub fn decode(cursor: u64) -> ScanCursor {
        let node = cursor & ((1 << NODE_CURSOR_BITS) - 1);
        let anchor = ((cursor >> NODE_CURSOR_BITS) & ((1 << ANCHOR_BITS) - 1)) as u16;
        let tag = (cursor >> (NODE_CURSOR_BITS + ANCHOR_BITS)) as u16;
        ScanCursor {
            anchor: Slot(anchor),
            tag,
            node,
        }
    }

    /// The client's cursor; `None` if the node cursor doesn't fit its 40 bits.
    pub fn encode(self) -> Option<u64> {
        if self.node >> NODE_CURSOR_BITS != 0 {
            return None;
        }
        Some(
            (u64::from(self.tag) << (NODE_CURSOR_BITS + ANCHOR_BITS))
                | (u64::from(self.anchor.get()) << NODE_CURSOR_BITS)
                | self.node,
        )
    }

    /// The tag of a master address: FNV-1a folded to 1..=1023.
    pub fn tag_of(master: &str) -> u16 {
        let mut h: u32 = 0x811c_9dc5;
        for b in master.bytes() {
            h ^= u32::from(b);
            h = h.wrapping_mul(0x0100_0193);
        }
        (h % 1023) as u16 + 1
    }
}

/// Where one SCAN step goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScanStep {
    /// Index of the shard to scan, in [`SlotMap::shards`].
    pub shard: usize,
    /// Cursor to send to that shard's master.
    pub node_cursor: u64,
}

impl SlotMap {
    /// The lowest slot each shard owns (`None` for a shard that owns none any more).
    fn first_slots(&self) -> Vec<Option<u16>> {
        let mut first = vec![None; self.shards.len()];
        for (slot, &o) in self.owner.iter().enumerate() {
            if let Some(f) = first.get_mut(usize::from(o))
                && f.is_none()
            {
                *f = Some(slot as u16);
            }
        }
        first
    }

    /// Where the SCAN step for `cursor` goes: the shard owning the anchor slot (or the next
    /// owned slot), restarting at node cursor 0 if that shard's master isn't the one the
    /// cursor was issued for. `None` when no slot from the anchor on has an owner.
    pub fn scan_step(&self, cursor: ScanCursor) -> Option<ScanStep> {
        let from = usize::from(cursor.anchor.get());
        let (slot, &owner) = self
            .owner
            .iter()
            .enumerate()
            .skip(from)
            .find(|(_, o)| **o != NO_OWNER)?;
        let shard = usize::from(owner);
        let master = &self.shards.get(shard)?.master;
        let same_node = slot == from && cursor.tag != 0 && cursor.tag == ScanCursor::tag_of(master);
        Some(ScanStep {
            shard,
            node_cursor: if same_node { cursor.node } else { 0 },
        })
    }

    /// The cursor to give the client after `shard`'s master answered `node_next`: the same
    /// shard while it has more, else the start of the shard with the next lowest first slot,
    /// else 0 (the iteration is complete). `None` if the node cursor doesn't fit.
    pub fn scan_next(&self, shard: usize, node_next: u64) -> Option<u64> {
        let first = self.first_slots();
        let this = first.get(shard).copied().flatten()?;
        if node_next != 0 {
            return ScanCursor {
                anchor: Slot(this),
                tag: ScanCursor::tag_of(&self.shards.get(shard)?.master),
                node: node_next,
            }
            .encode();
        }
        let next = first
            .iter()
            .enumerate()
            .filter_map(|(i, f)| f.map(|f| (f, i)))
            .filter(|&(f, _)| f > this)
            .min();
        match next {
            None => Some(0),
            Some((slot, i)) => ScanCursor {
                anchor: Slot(slot),
                tag: ScanCursor::tag_of(&self.shards.get(i)?.master),
                node: 0,
            }
            .encode(),
        }
    }

    /// Masters of the shards that own at least one slot, in shard order.
    pub fn serving_masters(&self) -> Vec<&str> {
        self.first_slots()
            .iter()
            .zip(&self.shards)
            .filter(|(f, _)| f.is_some())
            .map(|(_, s)| s.master.as_str())
            .collect()
    }

    /// Index of the shard that owns `slot`.
    pub fn shard_index(&self, slot: Slot) -> Option<usize> {
        let o = *self.owner.get(usize::from(slot.get()))?;
        (o != NO_OWNER).then_some(usize::from(o))
    }

    /// Number of slots that have an owner.
    pub fn covered(&self) -> usize {
        self.owner.iter().filter(|&&o| o != NO_OWNER).count()
    }
}

/// When to refresh the topology besides the periodic refresh: after `threshold` redirects or
/// upstream failures, but not more often than `min_interval` (Envoy's
/// `redirect_refresh_threshold` / `redirect_refresh_interval`). Times are passed in, so the
/// rule is tested without clocks.
#[derive(Debug, Clone)]
pub struct RefreshTrigger {
    /// Events that ask for a refresh.
    pub threshold: u32,
    /// Shortest time between two refreshes.
    pub min_interval: std::time::Duration,
    /// Events since the last refresh.
    events: u32,
    /// When the last refresh started.
    last: Option<std::time::Instant>,
}

impl RefreshTrigger {
    /// A trigger with nothing counted yet.
    pub fn new(threshold: u32, min_interval: std::time::Duration) -> RefreshTrigger {
        RefreshTrigger {
            threshold: threshold.max(1),
            min_interval,
            events: 0,
            last: None,
        }
    }

    /// Counts a redirect or failure; true when enough have been seen to ask for a refresh.
    pub fn note(&mut self) -> bool {
        self.events = self.events.saturating_add(1);
        self.events >= self.threshold
    }

    /// When a refresh may start, if one is wanted: now, or when the minimum interval ends.
    pub fn due(&self, now: std::time::Instant) -> Option<std::time::Instant> {
        if self.events < self.threshold {
            return None;
        }
        Some(match self.last {
            Some(last) if now < last + self.min_interval => last + self.min_interval,
            _ => now,
        })
    }

    /// Records that a refresh started at `now`.
    pub fn refreshed(&mut self, now: std::time::Instant) {
        self.events = 0;
        self.last = Some(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
