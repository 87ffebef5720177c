//! Which of a node's shared connections a client's requests take. A node has two sets, one
//! per protocol (RESP2 and RESP3: Redis encodes replies by the connection's protocol, so a
//! client's replies pass through as bytes only on a connection in its own protocol). In
//! each set: ordinary connections, picked by client id, and a bulk connection, kept for
//! clients whose replies are big, so that megabytes of their replies never queue ahead of
//! anyone's small ones.

use super::NodeConn;

/// The bit of a connection key that asks for the RESP3 set.
pub const RESP3: u64 = 1 << 63;

/// The connection key of a client on the bulk lane, in the RESP2 set (or with [`RESP3`]).
/// Any other key is a client id.
pub const BULK: u64 = RESP3 - 1;

/// The connection key of client `client`, on the bulk lane or not, in its protocol's set.
pub fn key(client: u64, bulk: bool, resp3: bool) -> u64 {
    let k = if bulk { BULK } else { client & BULK };
    if resp3 { k | RESP3 } else { k }
}

/// Whether `key` asks for RESP3 connections.
pub fn is_resp3(key: u64) -> bool {
    key & RESP3 != 0
}

/// A node's shared connections: for RESP2 and then RESP3, `per_node` ordinary ones and a
/// bulk one, each made by `make(lazy, protocol)`. Only RESP2's ordinary connections start
/// now; the others start with their first request, so a node no big-reply or RESP3 client
/// uses costs no more connections.
pub fn node_conns(per_node: usize, mut make: impl FnMut(bool, u8) -> NodeConn) -> Vec<NodeConn> {
    let mut conns = Vec::new();
    for protocol in [2, 3] {
        for _ in 0..per_node.max(1) {
            conns.push(make(protocol == 3, protocol));
        }
        conns.push(make(true, protocol));
    }
    conns
}

/// The connection of `conns` (as [`node_conns`] made them) that `key` uses.
pub fn index(len: usize, key: u64) -> usize {
    let half = len / 2;
    if half < 2 {
        return 0;
    }
    let base = if is_resp3(key) { half } else { 0 };
    match key & BULK {
        BULK => base + half - 1,
        client => base + (client % (half as u64 - 1)) as usize,
    }
}

/// How many of `conns` are RESP2's ordinary connections (the ones started at once).
pub fn ordinary(len: usize) -> usize {
    index(len, BULK).max(1).min(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clients_spread_over_the_ordinary_connections_of_their_protocol() {
        // Three ordinary connections and a bulk one per protocol.
        assert_eq!(index(8, key(0, false, false)), 0);
        assert_eq!(index(8, key(4, false, false)), 1);
        assert_eq!(index(8, key(5, false, false)), 2);
        assert_eq!(index(8, key(5, true, false)), 3);
        assert_eq!(index(8, key(5, false, true)), 6);
        assert_eq!(index(8, key(5, true, true)), 7);
        assert_eq!(index(4, key(7, false, false)), 0);
        assert_eq!(index(4, key(7, true, false)), 1);
        assert_eq!(index(4, key(7, false, true)), 2);
        assert_eq!(index(4, key(7, true, true)), 3);
        assert_eq!(ordinary(8), 3);
        assert_eq!(ordinary(4), 1);
    }
}
