//! Mirroring: a copy of a client's request to each of its route's mirrors, by percentage,
//! never slowing or failing the request itself.

use std::rc::Rc;

use tokio::time::Instant;

use super::Sampler;
use super::target::Target;
use crate::command::{Command, flags};
use crate::resp::Request;
use crate::service::RouteCtx;
use crate::upstream::{ReplySink, ReplyTo};

/// Copies a forwarded request to a route's mirrors. A mirror that can't take it (queue full,
/// down) drops it and counts: the client never waits for a mirror. A cluster mirror splits
/// multi-key commands like any cluster request.
#[expect(
    clippy::too_many_arguments,
    reason = "the forward's parts, borrowed separately"
)]
pub(super) fn mirror(
    req: &Request<'_>,
    cmd: Option<Command>,
    route: &RouteCtx,
    targets: &mut [Target],
    db: u32,
    discard: &Rc<dyn ReplySink>,
    dice: &mut Sampler,
    deadline: Instant,
) {
    let is_write = cmd.is_some_and(|c| c.info.has(flags::WRITE));
    for (m, target) in route.mirrors.iter().zip(targets.iter_mut()) {
        if m.exclude_reads.get() && !is_write {
            continue;
        }
        let per_10000 = m.per_10000.get();
        if per_10000 < 10_000 && dice.below(10_000) >= per_10000 {
            continue;
        }
        if db != 0 && target.is_cluster() {
            // A cluster has database 0 only: a copy there would land in the wrong keyspace.
            m.dropped.inc();
            continue;
        }
        let to = ReplyTo::new(Rc::clone(discard), 0, deadline + m.batch_delay);
        match target.forward(req, cmd, to) {
            Ok(()) => m.sent.inc(),
            Err(_) => m.dropped.inc(),
        };
    }
}
