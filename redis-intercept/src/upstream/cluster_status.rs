//! What the admin endpoint shows of a cluster upstream: each worker's view of its slot map,
//! published by the worker's `ClusterNodes` after every refresh.

use std::sync::{Arc, Mutex};

use crate::cluster::{Shard, SlotMap};
use crate::locks::LockRecovered;

/// What the admin endpoint shows of one worker's view of a cluster.
#[derive(Debug, Clone, Default)]
pub struct TopologyView {
    /// Every slot has a master.
    pub complete: bool,
    /// Slots with a master.
    pub covered: usize,
    /// Each shard: its slot ranges (`0-5460`), master and replicas.
    pub shards: Vec<(String, String, Vec<String>)>,
}

/// The views of one cluster upstream from every worker, for `/ready` and `/topology`.
#[derive(Debug, Default)]
pub struct ClusterStatus {
    /// Indexed by worker; `None` until that worker's first successful discovery.
    pub workers: Mutex<Vec<Option<TopologyView>>>,
}

impl ClusterStatus {
    /// Status for `workers` workers, none of which has a map yet.
    pub fn new(workers: usize) -> Arc<ClusterStatus> {
        Arc::new(ClusterStatus {
            workers: Mutex::new(vec![None; workers]),
        })
    }

    pub(super) fn publish(&self, worker: usize, view: TopologyView) {
        // A poisoned lock only means another worker panicked while publishing; the data is a
        // plain snapshot, still fine to overwrite.
        let mut workers = self.workers.locked();
        if let Some(w) = workers.get_mut(worker) {
            *w = Some(view);
        }
    }
}

/// The admin view of a map.
pub(super) fn view(map: &SlotMap) -> TopologyView {
    let mut ranges: Vec<Vec<String>> = vec![Vec::new(); map.shards().len()];
    for (first, last, shard) in map.ranges() {
        if let Some(r) = ranges.get_mut(shard) {
            r.push(if first == last {
                first.to_string()
            } else {
                format!("{first}-{last}")
            });
        }
    }
    TopologyView {
        complete: map.is_complete(),
        covered: map.covered(),
        shards: map
            .shards()
            .iter()
            .zip(ranges)
            .filter(|(_, r)| !r.is_empty())
            .map(|(Shard { master, replicas }, r)| (r.join(","), master.clone(), replicas.clone()))
            .collect(),
    }
}
