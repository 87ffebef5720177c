//! Merging the replies of a command that went to several nodes into the one reply Redis
//! would send: MGET values back in key order, sums (DEL, EXISTS, DBSIZE), all-OK writes,
//! concatenated KEYS, PUBSUB counts, CONFIG SET on every node, and INFO for a cluster
//! (`info.rs`). The merge itself is pure and unit-tested; [`Merge`]
//! is the sink that collects the parts.

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use bytes::Bytes;

use super::info::{InfoCtx, info};
use crate::resp::{Frame, Limits};
use crate::route::{Keyless, SplitKind};
use crate::upstream::{Reply, ReplySink, error_reply};

/// Where the values of MGET's parts go in the merged reply.
#[derive(Default)]
pub(super) struct Positions {
    /// Value positions of every part's keys, part after part.
    pub(super) at: Vec<usize>,
    /// Where each part's positions end in `at`.
    pub(super) ends: Vec<usize>,
    /// Keys in the client's MGET.
    pub(super) total: usize,
}

impl Positions {
    /// From each part's key argument indexes (MGET's key argument k is value k-1).
    pub(super) fn new<P, K>(parts: P, total: usize) -> Positions
    where
        P: Iterator<Item = K>,
        K: Iterator<Item = usize>,
    {
        let mut p = Positions {
            total,
            ..Positions::default()
        };
        for keys in parts {
            p.at.extend(keys.map(|k| k.saturating_sub(1)));
            p.ends.push(p.at.len());
        }
        p
    }

    /// Part `i`'s value positions.
    pub(super) fn of(&self, i: usize) -> &[usize] {
        let start = if i == 0 {
            0
        } else {
            self.ends.get(i - 1).copied().unwrap_or(self.at.len())
        };
        let end = self.ends.get(i).copied().unwrap_or(self.at.len());
        self.at.get(start..end).unwrap_or_default()
    }
}

/// How part replies are combined.
pub(super) enum MergeKind {
    /// A split multi-key command; for MGET, where each part's values go.
    Split(SplitKind, Positions),
    /// A keyless command sent to every master.
    All(Keyless),
    /// INFO: what the proxy writes into it itself (see `info.rs`).
    Info(Box<InfoCtx>),
    /// A command every node ran (CONFIG SET …): the nodes, in part order.
    EveryNode(Vec<String>),
}

/// Collects the replies of a split or broadcast request and gives the parent one reply.
pub(super) struct Merge {
    /// Who gets the merged reply.
    pub(super) parent: Rc<dyn ReplySink>,
    /// The parent's token for it.
    pub(super) token: u64,
    /// How to combine.
    pub(super) kind: MergeKind,
    /// Part replies by part number.
    pub(super) parts: RefCell<Vec<Option<Bytes>>>,
    /// Parts still missing.
    pub(super) remaining: Cell<usize>,
}

impl Merge {
    /// A merge of `parts` replies, for `parent`'s slot `token`.
    pub(super) fn new(
        parent: Rc<dyn ReplySink>,
        token: u64,
        kind: MergeKind,
        parts: usize,
    ) -> Rc<Merge> {
        Rc::new(Merge {
            parent,
            token,
            kind,
            parts: RefCell::new(vec![None; parts]),
            remaining: Cell::new(parts),
        })
    }

    /// Builds the merged reply and hands it to the parent.
    pub(super) fn finish(&self) -> bool {
        let parts: Vec<Bytes> = self.parts.borrow_mut().drain(..).flatten().collect();
        let reply = merge(&self.kind, &parts).unwrap_or_else(|e| e);
        self.parent.deliver(self.token, reply.into())
    }
}

impl ReplySink for Merge {
    fn deliver(&self, token: u64, reply: Reply<'_>) -> bool {
        {
            let mut parts = self.parts.borrow_mut();
            let Some(slot) = parts.get_mut(token as usize) else {
                return false;
            };
            if slot.is_some() {
                return false;
            }
            *slot = Some(reply.into_bytes());
        }
        let left = self.remaining.get().saturating_sub(1);
        self.remaining.set(left);
        left == 0 && self.finish()
    }

    fn flush(&self) {
        self.parent.flush();
    }

    fn expects_more(&self) -> bool {
        self.parent.expects_more()
    }
}

/// Parses one part reply.
pub(super) fn frame(reply: &Bytes) -> Result<Frame, Bytes> {
    match Frame::parse(reply, &Limits::default()) {
        Ok(Some((f, _))) => Ok(f),
        _ => Err(error_reply("unexpected reply from a cluster node")),
    }
}

/// Combines part replies (all present, in part order). `Err` carries the reply to give
/// instead: the first part's error, or a malformed part.
pub(super) fn merge(kind: &MergeKind, parts: &[Bytes]) -> Result<Bytes, Bytes> {
    if let MergeKind::All(Keyless::AnyOk) = kind {
        // The master that ran the script says OK; the others NOTBUSY.
        return match parts.iter().find(|p| p.starts_with(b"+")) {
            Some(ok) => Ok(ok.clone()),
            None => Err(parts
                .iter()
                .find(|p| !p.starts_with(b"-NOTBUSY"))
                .or(parts.first())
                .cloned()
                .unwrap_or_else(|| error_reply("no master answered"))),
        };
    }
    if let Some(err) = parts
        .iter()
        .find(|p| p.first() == Some(&b'-'))
        .filter(|_| !matches!(kind, MergeKind::EveryNode(_)))
    {
        return Err(err.clone());
    }
    let sum = |parts: &[Bytes]| -> Result<Bytes, Bytes> {
        let mut total: i64 = 0;
        for p in parts {
            match frame(p)? {
                Frame::Integer(n) => total = total.saturating_add(n),
                _ => return Err(error_reply("unexpected reply from a cluster node")),
            }
        }
        Ok(Frame::Integer(total).to_bytes())
    };
    match kind {
        MergeKind::Split(SplitKind::Values, positions) => {
            let mut values = vec![Frame::NullBulk; positions.total];
            for (i, p) in parts.iter().enumerate() {
                let Frame::Array(items) = frame(p)? else {
                    return Err(error_reply("unexpected reply from a cluster node"));
                };
                for (item, &at) in items.into_iter().zip(positions.of(i)) {
                    if let Some(v) = values.get_mut(at) {
                        *v = item;
                    }
                }
            }
            Ok(Frame::Array(values).to_bytes())
        }
        MergeKind::Split(SplitKind::AllOk, ..) | MergeKind::All(Keyless::AllOk) => {
            Ok(Bytes::from_static(b"+OK\r\n"))
        }
        MergeKind::Split(SplitKind::Sum, ..) | MergeKind::All(Keyless::Sum) => sum(parts),
        MergeKind::All(Keyless::Min) => {
            let mut least: Option<i64> = None;
            for p in parts {
                match frame(p)? {
                    Frame::Integer(n) => least = Some(least.map_or(n, |l| l.min(n))),
                    _ => return Err(error_reply("unexpected reply from a cluster node")),
                }
            }
            least
                .map(|n| Frame::Integer(n).to_bytes())
                .ok_or_else(|| error_reply("no master answered"))
        }
        MergeKind::All(Keyless::Concat) => {
            let mut all = Vec::new();
            for p in parts {
                match frame(p)? {
                    Frame::Array(items) | Frame::Set(items) => all.extend(items),
                    _ => return Err(error_reply("unexpected reply from a cluster node")),
                }
            }
            Ok(Frame::Array(all).to_bytes())
        }
        MergeKind::All(Keyless::Union) => {
            let mut all: Vec<Frame> = Vec::new();
            for p in parts {
                match frame(p)? {
                    Frame::Array(items) | Frame::Set(items) => {
                        for item in items {
                            if !all.contains(&item) {
                                all.push(item);
                            }
                        }
                    }
                    _ => return Err(error_reply("unexpected reply from a cluster node")),
                }
            }
            Ok(Frame::Array(all).to_bytes())
        }
        MergeKind::All(Keyless::AllHave) => {
            let mut all: Option<Vec<Frame>> = None;
            for p in parts {
                let Frame::Array(items) = frame(p)? else {
                    return Err(error_reply("unexpected reply from a cluster node"));
                };
                match all.as_mut() {
                    None => all = Some(items),
                    Some(all) => {
                        for (a, b) in all.iter_mut().zip(items) {
                            if b == Frame::Integer(0) {
                                *a = Frame::Integer(0);
                            }
                        }
                    }
                }
            }
            Ok(Frame::Array(all.unwrap_or_default()).to_bytes())
        }
        MergeKind::All(Keyless::NumSub) => {
            // `[name, count, …]` in RESP2, a map in RESP3; every master lists the same
            // names in the same order.
            let mut total: Option<Frame> = None;
            for p in parts {
                let part = frame(p)?;
                let Some(sum) = total.as_mut() else {
                    total = Some(part);
                    continue;
                };
                let add = |a: &mut Frame, b: Frame| {
                    if let (Frame::Integer(x), Frame::Integer(y)) = (&*a, b) {
                        *a = Frame::Integer(x.saturating_add(y));
                    }
                };
                match (sum, part) {
                    (Frame::Array(sum), Frame::Array(items)) => {
                        sum.iter_mut().zip(items).for_each(|(a, b)| add(a, b));
                    }
                    (Frame::Map(sum), Frame::Map(pairs)) => {
                        sum.iter_mut()
                            .zip(pairs)
                            .for_each(|((_, a), (_, b))| add(a, b));
                    }
                    _ => return Err(error_reply("unexpected reply from a cluster node")),
                }
            }
            Ok(total.unwrap_or(Frame::Array(Vec::new())).to_bytes())
        }
        MergeKind::All(_) => parts
            .first()
            .cloned()
            .ok_or_else(|| error_reply("no master answered")),
        MergeKind::Info(ctx) => Ok(info(ctx, parts)),
        MergeKind::EveryNode(nodes) => every_node(nodes, parts),
    }
}

/// OK when every node said OK; otherwise one error naming each node that didn't and what it
/// said (the nodes that did have applied the command).
fn every_node(nodes: &[String], parts: &[Bytes]) -> Result<Bytes, Bytes> {
    let failed: Vec<String> = nodes
        .iter()
        .zip(parts)
        .filter(|(_, p)| !p.starts_with(b"+"))
        .map(|(node, p)| {
            let text = String::from_utf8_lossy(p);
            format!("{node}: {}", text.trim_start_matches(['-', '+']).trim_end())
        })
        .collect();
    if failed.is_empty() {
        return Ok(Bytes::from_static(b"+OK\r\n"));
    }
    Err(error_reply(&format!(
        "failed on {} of {} nodes ({}); the others applied it",
        failed.len(),
        nodes.len(),
        failed.join("; ")
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    #[test]
    fn script_exists_is_true_where_every_master_has_it() {
        let parts = [b("*2\r\n:1\r\n:1\r\n"), b("*2\r\n:1\r\n:0\r\n")];
        assert_eq!(
            merge(&MergeKind::All(Keyless::AllHave), &parts),
            Ok(b("*2\r\n:1\r\n:0\r\n"))
        );
        let kill = |parts: &[Bytes]| merge(&MergeKind::All(Keyless::AnyOk), parts);
        let notbusy = b("-NOTBUSY No scripts in execution right now.\r\n");
        assert_eq!(kill(&[notbusy.clone(), b("+OK\r\n")]), Ok(b("+OK\r\n")));
        assert_eq!(kill(&[notbusy.clone(), notbusy.clone()]), Err(notbusy));
    }

    #[test]
    fn mget_values_go_back_to_key_order() {
        // MGET a b c d: part 0 holds keys 2 and 4, part 1 keys 1 and 3 (argument indexes).
        let positions = Positions::new(
            [vec![2, 4], vec![1, 3]].into_iter().map(|v| v.into_iter()),
            4,
        );
        let kind = MergeKind::Split(SplitKind::Values, positions);
        let parts = [
            b("*2\r\n$1\r\nB\r\n$-1\r\n"),
            b("*2\r\n$1\r\nA\r\n$1\r\nC\r\n"),
        ];
        assert_eq!(
            merge(&kind, &parts),
            Ok(b("*4\r\n$1\r\nA\r\n$1\r\nB\r\n$1\r\nC\r\n$-1\r\n"))
        );
    }

    #[test]
    fn sums_all_ok_and_concatenation() {
        let sum = MergeKind::Split(SplitKind::Sum, Positions::default());
        assert_eq!(merge(&sum, &[b(":2\r\n"), b(":3\r\n")]), Ok(b(":5\r\n")));
        let ok = MergeKind::All(Keyless::AllOk);
        assert_eq!(merge(&ok, &[b("+OK\r\n"), b("+OK\r\n")]), Ok(b("+OK\r\n")));
        let keys = MergeKind::All(Keyless::Concat);
        assert_eq!(
            merge(
                &keys,
                &[b("*1\r\n$1\r\na\r\n"), b("*0\r\n"), b("*1\r\n$1\r\nb\r\n")]
            ),
            Ok(b("*2\r\n$1\r\na\r\n$1\r\nb\r\n"))
        );
        let dbsize = MergeKind::All(Keyless::Sum);
        assert_eq!(merge(&dbsize, &[b(":7\r\n")]), Ok(b(":7\r\n")));
    }

    #[test]
    fn the_first_error_wins_and_odd_replies_are_refused() {
        let sum = MergeKind::Split(SplitKind::Sum, Positions::default());
        assert_eq!(
            merge(&sum, &[b(":1\r\n"), b("-ERR one\r\n"), b("-ERR two\r\n")]),
            Err(b("-ERR one\r\n"))
        );
        assert_eq!(
            merge(&sum, &[b("+OK\r\n")]),
            Err(error_reply("unexpected reply from a cluster node"))
        );
    }
}
