//! The upstream connections one generation of a service's routes owns, closed when the last
//! client and listener using that generation let go of it (after a reload replaced it).

use std::rc::Rc;

use super::cluster_nodes::ClusterNodes;
use super::standalone::Standalone;

/// A worker's cluster pool as the route generations that use it hold it. Generations of
/// several services share one pool; the pool closes when the last of them is dropped.
pub struct NodesLease(pub Rc<ClusterNodes>);

impl Drop for NodesLease {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// What one generation of a service's routes opened or shares.
#[derive(Default)]
pub struct GenerationConns {
    /// Standalone servers, each made for this generation alone.
    pub standalones: Vec<Rc<Standalone>>,
    /// Cluster pools, shared with other generations that route to the same cluster.
    pub pools: Vec<Rc<NodesLease>>,
}

impl GenerationConns {
    /// Closes every connection now (shutdown), shared pools included.
    pub fn close(&self) {
        for s in &self.standalones {
            s.close();
        }
        for p in &self.pools {
            p.0.close();
        }
    }
}

impl Drop for GenerationConns {
    fn drop(&mut self) {
        // Standalone servers are this generation's alone; pools close with their last lease.
        for s in &self.standalones {
            s.close();
        }
    }
}
