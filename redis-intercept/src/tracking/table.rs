//! The tracker's memories: which clients read a key, and which keys were invalidated lately.

use std::collections::{HashMap, VecDeque};

/// How many invalidated keys a worker remembers for reads in flight; a read that took longer
/// than this many invalidations is invalidated after its reply, to be safe.
const RECENT: usize = 64 * 1024;

/// Recently invalidated keys (by hash), with their sequence numbers.
#[derive(Default)]
pub(super) struct Recent {
    /// Hashes and their numbers, oldest first.
    ring: VecDeque<(u64, u64)>,
    /// The number of the newest entry dropped from `ring`.
    evicted: u64,
    /// Last number of each hash still in `ring`.
    last: HashMap<u64, u64, foldhash::fast::FixedState>,
}

impl Recent {
    /// Remembers that the key hashing to `hash` was invalidated as number `seq`.
    pub(super) fn record(&mut self, hash: u64, seq: u64) {
        self.ring.push_back((hash, seq));
        self.last.insert(hash, seq);
        if self.ring.len() > RECENT
            && let Some((old, at)) = self.ring.pop_front()
        {
            if self.last.get(&old) == Some(&at) {
                self.last.remove(&old);
            }
            self.evicted = at;
        }
    }

    /// Whether none of the keys hashing to `hashes` was invalidated after number `seq` (and
    /// the memory reaches back that far).
    pub(super) fn unchanged_since(&self, seq: u64, mut hashes: impl Iterator<Item = u64>) -> bool {
        if self.evicted > seq {
            return false;
        }
        if self.ring.back().is_none_or(|&(_, at)| at <= seq) {
            // Nothing was reported since.
            return true;
        }
        hashes.all(|h| self.last.get(&h).is_none_or(|&at| at <= seq))
    }
}

/// The clients that read a key: nearly always one, kept without an allocation.
pub(super) enum Readers {
    /// One client.
    One(u64),
    /// Several.
    Many(Vec<u64>),
}

impl Readers {
    /// Adds client `id` once.
    pub(super) fn add(&mut self, id: u64) {
        match self {
            Readers::One(first) if *first != id => *self = Readers::Many(vec![*first, id]),
            Readers::One(_) => {}
            Readers::Many(ids) => {
                if !ids.contains(&id) {
                    ids.push(id);
                }
            }
        }
    }

    /// The clients.
    pub(super) fn ids(&self) -> &[u64] {
        match self {
            Readers::One(id) => std::slice::from_ref(id),
            Readers::Many(ids) => ids,
        }
    }
}
