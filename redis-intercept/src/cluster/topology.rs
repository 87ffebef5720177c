//! The slot map read from a node's `CLUSTER SLOTS` or `CLUSTER SHARDS` reply.

use super::{Shard, SlotMap, TopologyError, join_host_port};
use crate::resp::Frame;

impl SlotMap {
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
