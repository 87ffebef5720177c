//! The slot map: which shard (a master and its usable replicas) owns each slot.

use super::{SLOT_COUNT, Slot};

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
    pub(super) shards: Vec<Shard>,
    /// For each slot, an index into `shards`, or `NO_OWNER`.
    pub(super) owner: Vec<u16>,
}

/// Marks a slot no shard covers.
pub(super) const NO_OWNER: u16 = u16::MAX;

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

    pub(super) fn assign(
        &mut self,
        start: i64,
        end: i64,
        shard: Shard,
    ) -> Result<(), TopologyError> {
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
}

/// `host:port`, bracketing IPv6 hosts.
pub fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

impl SlotMap {
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
