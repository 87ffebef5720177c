//! Which of a node's shared connections a client's requests take: one of the ordinary ones,
//! picked by client id, or the node's bulk connection, kept for clients whose replies are
//! big, so that megabytes of their replies never queue ahead of anyone's small ones.

use super::NodeConn;

/// The connection key of a client on the bulk lane (any other key is a client id).
pub const BULK: u64 = u64::MAX;

/// A node's shared connections: `per_node` ordinary ones made by `make(false)`, then the bulk
/// one made by `make(true)` (its task starts with its first request, so a node no big-reply
/// client uses costs no connection).
pub fn node_conns(per_node: usize, mut make: impl FnMut(bool) -> NodeConn) -> Vec<NodeConn> {
    let mut conns: Vec<NodeConn> = (0..per_node.max(1)).map(|_| make(false)).collect();
    conns.push(make(true));
    conns
}

/// The connection of `conns` (as [`node_conns`] made them) that `key` uses.
pub fn index(len: usize, key: u64) -> usize {
    match len {
        0 | 1 => 0,
        _ if key == BULK => len - 1,
        _ => (key % (len as u64 - 1)) as usize,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clients_spread_over_the_ordinary_connections_and_bulk_takes_the_last() {
        assert_eq!(index(4, 0), 0);
        assert_eq!(index(4, 4), 1);
        assert_eq!(index(4, 5), 2);
        assert_eq!(index(4, BULK), 3);
        assert_eq!(index(2, 7), 0);
        assert_eq!(index(2, BULK), 1);
        assert_eq!(index(1, BULK), 0);
    }
}
