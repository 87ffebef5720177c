//! Fault injection for one client: picks the rule that hits a request (by command, key prefix
//! and chance) and applies it: an error reply in its slot, or a delay that holds the client's
//! later commands behind it.

use bytes::{Bytes, BytesMut};
use tokio::time::Instant;

use super::ReplySlots;
use crate::command::{Command, Handling};
use crate::metrics::ServiceMetrics;
use crate::resp::Request;
use crate::service::{Fault, FaultAction};
use std::rc::Rc;

use super::dispatch::routing;
use super::forward;
use crate::command;
use crate::resp::RequestParser;
use crate::upstream::{ReplySink, ReplyTo, error_reply};

/// A small xorshift generator for fault dice: statistically fine for percentages, and
/// cheaper than a shared generator.
pub(crate) struct Sampler(u64);

impl Sampler {
    pub(super) fn new(seed: u64) -> Sampler {
        Sampler(seed | 1)
    }

    /// A number in `0..n`.
    pub(crate) fn below(&mut self, n: u32) -> u32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 32) % u64::from(n)) as u32
    }

    /// The next 64 random bits.
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// A request held back by a delay fault.
pub(super) struct Delayed {
    /// When it may go.
    pub(super) until: Instant,
    /// The command, encoded.
    pub(super) request: Bytes,
    /// Its reply slot.
    pub(super) token: u64,
}

/// Applies a fault to `req` if one hits. Returns true when the request was consumed: an
/// error reply took its slot, or it was held back in `delayed`.
pub(super) fn inject_fault(
    req: &Request<'_>,
    cmd: Option<Command>,
    faults: &[Fault],
    core: &ReplySlots,
    dice: &mut Sampler,
    delayed: &mut Option<Delayed>,
    metrics: &ServiceMetrics,
) -> bool {
    let Some(action) = pick_fault(req, cmd, faults, dice) else {
        return false;
    };
    match action {
        FaultAction::Error(reply) => {
            metrics.fault_errors.inc();
            core.push_ready(reply.clone());
        }
        FaultAction::Delay(delay) => {
            metrics.fault_delays.inc();
            let token = core.push_pending();
            let mut request = BytesMut::new();
            req.write_resp(&mut request);
            *delayed = Some(Delayed {
                until: Instant::now() + *delay,
                request: request.freeze(),
                token,
            });
        }
    }
    true
}

/// The fault to apply to `req`, if any: only commands that would be forwarded are affected
/// (AUTH, PING and other local commands never are).
pub(super) fn pick_fault<'f>(
    req: &Request<'_>,
    cmd: Option<Command>,
    faults: &'f [Fault],
    dice: &mut Sampler,
) -> Option<&'f FaultAction> {
    if !matches!(cmd.map(|c| c.handling), None | Some(Handling::Forward)) {
        return None;
    }
    let name = req.arg(0)?;
    for fault in faults {
        if !fault.commands.is_empty()
            && !fault.commands.iter().any(|c| c.eq_ignore_ascii_case(name))
        {
            continue;
        }
        if let Some(prefix) = &fault.key_prefix {
            let mut keys = Vec::new();
            if let Some(c) = cmd {
                c.info.key_indexes(req, &mut keys);
            }
            let first = keys.first().and_then(|&i| req.arg(i));
            if !first.is_some_and(|k| k.starts_with(prefix)) {
                continue;
            }
        }
        if dice.below(10_000) < fault.per_10000 {
            return Some(&fault.action);
        }
    }
    None
}

impl super::Session {
    /// Sends the request a delay fault held back.
    pub(super) fn send_delayed(&mut self) {
        let Some(d) = self.delayed.take() else {
            return;
        };
        let deadline = Instant::now() + self.svc.policy().op_timeout;
        let sink: Rc<dyn ReplySink> = self.core.clone();
        // The held request was encoded from a parsed one, so it parses again.
        let mut parser = RequestParser::new(self.svc.limits);
        let sent = match parser.parse(&d.request) {
            Ok(Some(n)) => {
                let req = parser.request(&d.request[..n]);
                let routing = routing(&self.svc);
                let mut cx = forward::Ctx {
                    svc: &routing,
                    dice: &mut self.dice,
                };
                self.forwarder.forward(
                    &mut cx,
                    &req,
                    command::lookup(&req),
                    ReplyTo::new(sink, d.token, deadline),
                )
            }
            _ => Err(error_reply("internal error: delayed request lost")),
        };
        if let Err(reply) = sent {
            // The session writes its output right after this; no flush needed.
            let _ = self.core.deliver(d.token, reply.into());
        }
    }
}
