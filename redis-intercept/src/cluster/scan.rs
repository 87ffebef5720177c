//! A cluster-wide SCAN: one cursor that walks the shards in slot order, restarting a
//! shard whose master changed.

use super::slot_map::NO_OWNER;
use super::{Slot, SlotMap};

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
    pub(super) fn first_slots(&self) -> Vec<Option<u16>> {
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
}
