//! Transactions (MULTI/EXEC/DISCARD/WATCH/UNWATCH), blocking commands and pub/sub: the
//! commands that leave state on a connection, so a client using them gets a connection of its
//! own.
//!
//! A client that subscribes gets a connection of its own too, served by `pubsub` until it
//! leaves subscribed mode (pushed messages have no request, so they don't fit reply slots).
//!
//! The client is pinned (see `forward`) from its first WATCH, MULTI or blocking command until
//! its state is clean again (EXEC, DISCARD or UNWATCH answered, the blocking reply in) and no
//! reply is outstanding; then the connection goes back to the pool for the next client.
//! Before pinning, the session waits until every reply owed on the shared connections is in,
//! so the client's commands still run in the order it sent them. On a cluster, or with key
//! routes, MULTI alone doesn't say which node the transaction runs on: the proxy answers MULTI
//! (`+OK`) and the keyless commands after it (`+QUEUED`) itself, as Redis would, and holds
//! them until a command with a key picks the node (any master, or the catch-all, if EXEC
//! comes first); then they go there first, their replies dropped. If that key's slot has
//! moved, the node's MOVED is followed once for the whole (see [`Probe`]).

use std::rc::Rc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::time::Instant;

use super::probe::{Probe, ProbeSink};
use super::{Session, forward, routing};
use crate::command::{Command, Handling, Local};
use crate::resp::{Request, RequestParser};
use crate::upstream::{ConnSettings, ReplySink, ReplyTo, error_reply};

/// Most commands held while a transaction waits for a key to pick its node; then it takes
/// the default node (a transaction of only keyless commands).
pub(super) const MAX_HELD: usize = 64;

/// How long a blocking command (and whatever the client queued behind it on the same
/// connection) may wait: as long as the client asked, so no op_timeout.
pub(super) const BLOCKING_WAIT: Duration = Duration::from_secs(365 * 24 * 3600);

/// A client's transaction and blocking-command state.
#[derive(Default)]
pub(super) struct Stateful {
    /// MULTI was sent and no EXEC or DISCARD yet.
    pub(super) multi: bool,
    /// WATCH was sent and no EXEC, DISCARD or UNWATCH has ended it.
    pub(super) watching: bool,
    /// The proxy refused a command inside the transaction, so EXEC must fail as Redis's
    /// does after a queueing error.
    pub(super) dirty: bool,
    /// EXEC itself was refused (a wrong number of arguments): Redis then ends the
    /// transaction with `EXECABORT Transaction discarded because of: <the error>`.
    pub(super) exec_refused: Option<String>,
    /// MULTI and the commands after it, encoded (already answered), while no key has picked
    /// the transaction's node.
    pub(super) held: Vec<Bytes>,
    /// A blocking command went out on the pinned connection: requests behind it wait as long.
    pub(super) blocking: bool,
    /// Input processing stopped until every owed reply is in (before pinning).
    pub(super) barrier: bool,
    /// The client subscribed: once its owed replies are written, `pubsub` serves it on a
    /// connection to this node.
    pub(super) subscribe: Option<(String, ConnSettings)>,
    /// The next command sent opens a [`Probe`], after these held commands (cluster only).
    pub(super) arm_probe: Option<Vec<Bytes>>,
    /// The first keyed command on a fresh cluster connection, until its reply shows the node
    /// owns the slot.
    pub(super) probe: Option<Probe>,
}

impl Stateful {
    /// Whether a blocking command may still be waiting on the client's own connection.
    pub(super) fn is_blocked(&self) -> bool {
        self.blocking
    }

    /// Whether the client has transaction or blocking state (faults then stay out of its way).
    pub(super) fn active(&self, forwarder: &forward::Forwarder) -> bool {
        self.multi || self.watching || !self.held.is_empty() || forwarder.is_pinned()
    }
}

/// What [`Session::stateful`] did with a command.
pub(super) enum Step {
    /// Not a stateful matter: the normal dispatch handles it.
    Normal,
    /// Handled.
    Done,
    /// Wait until every owed reply is in, then offer the command again.
    Wait,
    /// Hand the connection over to a pub/sub pipe, from this command on.
    Subscribe,
}

/// Which transaction command a command is, if any.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Txn {
    Multi,
    Exec,
    Discard,
    Watch,
    Unwatch,
}

pub(super) fn txn_kind(cmd: Option<Command>) -> Option<Txn> {
    let cmd = cmd.filter(|c| c.handling == Handling::Transaction)?;
    match cmd.info.name {
        "multi" => Some(Txn::Multi),
        "exec" => Some(Txn::Exec),
        "discard" => Some(Txn::Discard),
        "watch" => Some(Txn::Watch),
        "unwatch" => Some(Txn::Unwatch),
        _ => None,
    }
}

/// Blocking commands that get a connection of their own (not WAIT: it counts replicas
/// acknowledging one connection's writes, and the client's writes go over shared ones).
pub(super) fn is_blocking(cmd: Option<Command>) -> bool {
    cmd.is_some_and(|c| {
        c.handling == Handling::Blocking && !matches!(c.info.name, "wait" | "waitaof")
    })
}

impl Session {
    /// Gives the pinned connection back once the client's state is clean and nothing is owed
    /// on it.
    pub(super) fn maybe_unpin(&mut self) {
        let st = &self.stateful;
        if self.forwarder.is_pinned()
            && !st.multi
            && !st.watching
            && st.held.is_empty()
            && self.core.unfilled.get() == 0
        {
            self.forwarder.unpin(true);
            self.stateful.blocking = false;
        }
    }

    /// Gives the pinned connection up at the end of the session: kept only if clean.
    pub(super) fn release_at_end(&mut self) {
        let st = &self.stateful;
        let clean = !st.multi && !st.watching && self.core.unfilled.get() == 0;
        self.forwarder.unpin(clean);
    }

    /// Handles `req` if it is a transaction or blocking command, or if the client is in a
    /// transaction or pinned.
    pub(super) fn stateful(
        &mut self,
        req: &Request<'_>,
        cmd: Option<Command>,
        deadline: Instant,
    ) -> Step {
        if !self.state.authenticated {
            return Step::Normal;
        }
        match cmd.map(|c| c.handling) {
            Some(Handling::Local(Local::Quit)) => return Step::Normal,
            Some(Handling::Local(Local::Reset)) if self.stateful.active(&self.forwarder) => {
                return self.reset();
            }
            Some(Handling::PubSub) if !self.stateful.active(&self.forwarder) => {
                return self.subscribe(req, cmd);
            }
            // SELECT moves the client to other connections, and so do HELLO and RESET
            // (another protocol's): what it sent before runs first (a
            // `MOVE k 2; SELECT 2; GET k` pipeline reads the moved key).
            Some(Handling::Local(Local::Select | Local::Hello | Local::Reset))
                if self.core.unfilled.get() > 0 =>
            {
                self.stateful.barrier = true;
                return Step::Wait;
            }
            _ => {}
        }
        if self.stateful.probe.is_some() {
            // Until the probe's reply shows where the client's state lives.
            self.stateful.barrier = true;
            return Step::Wait;
        }
        self.maybe_unpin();
        let txn = txn_kind(cmd);
        let wait = !self.stateful.multi && self.is_wait(req, cmd);
        let blocking = is_blocking(cmd) || wait;
        if !self.forwarder.is_pinned() && self.stateful.held.is_empty() {
            match txn {
                // Redis's own answers for a client with no transaction or WATCH.
                Some(Txn::Exec) => {
                    self.core.push_ready(error_reply("EXEC without MULTI"));
                    return Step::Done;
                }
                Some(Txn::Discard) => {
                    self.core.push_ready(error_reply("DISCARD without MULTI"));
                    return Step::Done;
                }
                Some(Txn::Unwatch) => {
                    self.core.push_ready(Bytes::from_static(b"+OK\r\n"));
                    return Step::Done;
                }
                Some(Txn::Multi | Txn::Watch) => {}
                _ if blocking => {}
                _ => return Step::Normal,
            }
            if let Some(step) = self.not_yet() {
                return step;
            }
            return self.start(req, cmd, txn, deadline);
        }
        if !self.stateful.held.is_empty() {
            return self.while_held(req, cmd, txn, deadline);
        }
        self.pinned(req, cmd, txn, blocking, deadline);
        Step::Done
    }

    /// Before a command moves the client off the shared connections: while replies are owed
    /// the session waits (the ordering barrier). Its arity was checked when it was read.
    pub(super) fn not_yet(&mut self) -> Option<Step> {
        if self.core.unfilled.get() > 0 {
            self.stateful.barrier = true;
            return Some(Step::Wait);
        }
        None
    }

    /// A (un)subscribe command from a client with no other state: the session becomes a
    /// pipe once the replies it owes are written.
    pub(super) fn subscribe(&mut self, req: &Request<'_>, cmd: Option<Command>) -> Step {
        if let Some(step) = self.not_yet() {
            return step;
        }
        let sharded = cmd.is_some_and(|c| matches!(c.info.name, "ssubscribe" | "sunsubscribe"));
        let channel = if sharded { req.arg(1) } else { None };
        match self.forwarder.pubsub_target(channel) {
            Ok(target) => {
                self.stateful.subscribe = Some(target);
                Step::Subscribe
            }
            Err(e) => {
                self.core.push_ready(e);
                Step::Done
            }
        }
    }

    /// RESET of a client with transaction or blocking state: once the owed replies are in,
    /// the pinned connection is closed (its state ends with it) and the session answers RESET
    /// as for any client.
    pub(super) fn reset(&mut self) -> Step {
        // Held commands never reached Redis and were answered already.
        self.stateful.held.clear();
        if self.core.unfilled.get() > 0 {
            self.stateful.barrier = true;
            return Step::Wait;
        }
        self.forwarder.unpin(false);
        self.stateful = Stateful::default();
        Step::Normal
    }

    /// The first stateful command of a client with nothing pinned.
    pub(super) fn start(
        &mut self,
        req: &Request<'_>,
        cmd: Option<Command>,
        txn: Option<Txn>,
        deadline: Instant,
    ) -> Step {
        let routing = routing(&self.svc);
        if txn == Some(Txn::Multi) {
            if self.forwarder.pins_without_key(&routing) {
                if let Err(e) = self.forwarder.pin(&routing, 0, None) {
                    self.core.push_ready(e);
                    return Step::Done;
                }
                self.stateful.multi = true;
                self.send(req, cmd, deadline);
            } else {
                self.core.push_ready(Bytes::from_static(b"+OK\r\n"));
                self.stateful.held.push(encode(req));
                self.stateful.multi = true;
            }
            return Step::Done;
        }
        let route = match self.forwarder.route_of(&routing, req, cmd) {
            Ok(r) => r.unwrap_or(0),
            Err(e) => {
                self.core.push_ready(e);
                return Step::Done;
            }
        };
        if let Err(e) = self.forwarder.pin(&routing, route, Some((req, cmd))) {
            self.core.push_ready(e);
            return Step::Done;
        }
        if self.is_wait(req, cmd) {
            // WAIT counts the replicas that acknowledged the connection's writes up to its
            // last one. The client's went over shared connections and are answered (the
            // barrier above), so a PUBLISH on its own connection (Redis replicates it even
            // with no subscriber) moves that connection's offset past them: WAIT then counts
            // the replicas that have the client's writes, and blocks nobody else.
            let publish = encode_args(&[b"PUBLISH", WAIT_CHANNEL, b""]);
            self.send_held(&[publish], deadline);
        }
        if txn == Some(Txn::Watch) {
            self.stateful.watching = true;
        } else {
            self.stateful.blocking = true;
            self.learn_blocked_conn(deadline);
        }
        if self.forwarder.pinned_to_cluster() {
            self.stateful.arm_probe = Some(Vec::new());
        }
        self.send(req, cmd, deadline);
        self.stateful.arm_probe = None;
        Step::Done
    }

    /// A command inside a transaction whose node isn't known yet.
    pub(super) fn while_held(
        &mut self,
        req: &Request<'_>,
        cmd: Option<Command>,
        txn: Option<Txn>,
        deadline: Instant,
    ) -> Step {
        let routing = routing(&self.svc);
        let route = match self.forwarder.route_of(&routing, req, cmd) {
            Ok(r) => r,
            Err(e) => {
                self.core.push_ready(e);
                self.stateful.dirty = true;
                return Step::Done;
            }
        };
        let ends = matches!(txn, Some(Txn::Exec | Txn::Discard));
        if txn == Some(Txn::Multi) {
            // Redis's answer; the transaction goes on.
            self.core
                .push_ready(error_reply("MULTI calls can not be nested"));
            return Step::Done;
        }
        if route.is_none() && !ends && self.stateful.held.len() < MAX_HELD {
            if refused_in_multi(cmd) {
                return self.refuse_in_multi(req, cmd);
            }
            self.core.push_ready(Bytes::from_static(b"+QUEUED\r\n"));
            self.stateful.held.push(encode(req));
            return Step::Done;
        }
        let key_req = route.map(|_| (req, cmd));
        if let Err(e) = self.forwarder.pin(&routing, route.unwrap_or(0), key_req) {
            // Nothing reached Redis yet; a later command may find a node, but this
            // transaction's EXEC fails as after a queueing error.
            self.stateful.dirty = true;
            if ends {
                self.stateful = Stateful::default();
            }
            self.core.push_ready(e);
            return Step::Done;
        }
        let held = std::mem::take(&mut self.stateful.held);
        self.send_held(&held, deadline);
        if route.is_some() && self.forwarder.pinned_to_cluster() {
            self.stateful.arm_probe = Some(held);
        }
        self.pinned(req, cmd, txn, is_blocking(cmd), deadline);
        self.stateful.arm_probe = None;
        Step::Done
    }

    /// Sends held commands on the pinned connection, their replies dropped (the client had
    /// its answers when they were held).
    pub(super) fn send_held(&mut self, held: &[Bytes], deadline: Instant) {
        let routing = routing(&self.svc);
        let discard = Rc::clone(&self.svc.discard);
        for bytes in held {
            let mut parser = RequestParser::new(self.svc.limits);
            // Held requests were encoded from parsed ones, so they parse again.
            if let Ok(Some(n)) = parser.parse(bytes) {
                let held_req = parser.request(&bytes[..n]);
                let held_cmd = crate::command::lookup(&held_req);
                let mut cx = forward::Ctx {
                    svc: &routing,
                    dice: &mut self.dice,
                };
                let sink = Rc::clone(&discard);
                if self
                    .forwarder
                    .forward(
                        &mut cx,
                        &held_req,
                        held_cmd,
                        ReplyTo::new(sink, 0, deadline),
                    )
                    .is_err()
                {
                    self.stateful.dirty = true;
                }
            }
        }
    }

    /// A command of a pinned client: everything it sends goes on its own connection.
    pub(super) fn pinned(
        &mut self,
        req: &Request<'_>,
        cmd: Option<Command>,
        txn: Option<Txn>,
        blocking: bool,
        deadline: Instant,
    ) {
        let st = &mut self.stateful;
        if st.multi && refused_in_multi(cmd) {
            self.refuse_in_multi(req, cmd);
            return;
        }
        if !st.multi
            && cmd.is_some_and(|c| !matches!(c.handling, Handling::Forward))
            && txn.is_none()
            && !blocking
        {
            // Local answers and refusals need no connection.
            self.dispatch_normal(req, cmd, deadline);
            return;
        }
        match txn {
            Some(Txn::Multi) => st.multi = true,
            Some(Txn::Watch) if !st.multi => st.watching = true,
            Some(Txn::Unwatch) if !st.multi => st.watching = false,
            Some(Txn::Exec | Txn::Discard) if st.multi => {
                let dirty = std::mem::take(&mut st.dirty);
                st.multi = false;
                st.watching = false;
                let refused = st.exec_refused.take();
                if (dirty || refused.is_some()) && txn == Some(Txn::Exec) {
                    // Redis discards a transaction with a queueing error; the proxy's own
                    // refusals count as such errors.
                    self.send_discard(deadline);
                    self.core.push_ready(match refused {
                        Some(why) => Bytes::from(format!(
                            "-EXECABORT Transaction discarded because of: {why}\r\n"
                        )),
                        None => Bytes::from_static(
                            b"-EXECABORT Transaction discarded because of previous errors.\r\n",
                        ),
                    });
                    return;
                }
            }
            _ if blocking && !st.multi => {
                st.blocking = true;
                self.learn_blocked_conn(deadline);
            }
            _ => {}
        }
        self.send(req, cmd, deadline);
    }

    /// Answers a command the proxy can't queue in a transaction, and marks it failed.
    pub(super) fn refuse_in_multi(&mut self, req: &Request<'_>, cmd: Option<Command>) -> Step {
        let name = String::from_utf8_lossy(req.arg(0).unwrap_or_default()).to_uppercase();
        self.core.push_ready(error_reply(&format!(
            "'{name}' inside MULTI is not supported by redis-intercept"
        )));
        if cmd.is_some() {
            self.stateful.dirty = true;
        }
        Step::Done
    }

    /// Sends a DISCARD whose reply nobody waits for.
    pub(super) fn send_discard(&mut self, deadline: Instant) {
        let mut parser = RequestParser::new(self.svc.limits);
        let raw = b"*1\r\n$7\r\nDISCARD\r\n";
        if let Ok(Some(n)) = parser.parse(raw) {
            let req = parser.request(&raw[..n]);
            let routing = routing(&self.svc);
            let mut cx = forward::Ctx {
                svc: &routing,
                dice: &mut self.dice,
            };
            let sink = Rc::clone(&self.svc.discard);
            let _ = self
                .forwarder
                .forward(&mut cx, &req, None, ReplyTo::new(sink, 0, deadline));
        }
    }

    /// Sends `req` on the pinned connection into a new reply slot.
    pub(super) fn send(&mut self, req: &Request<'_>, cmd: Option<Command>, deadline: Instant) {
        let token = self.core.push_pending();
        let Some(held) = self.stateful.arm_probe.take() else {
            self.send_as(req, cmd, token, deadline);
            return;
        };
        let redirect = Rc::default();
        self.stateful.probe = Some(Probe {
            held,
            first: encode(req),
            token,
            hops: 0,
            redirect: Rc::clone(&redirect),
        });
        let sink = Rc::new(ProbeSink {
            core: Rc::clone(&self.core),
            redirect,
        });
        self.send_to(req, cmd, token, deadline, sink);
    }

    /// Sends `req` on the pinned connection; its reply fills slot `token`.
    pub(super) fn send_as(
        &mut self,
        req: &Request<'_>,
        cmd: Option<Command>,
        token: u64,
        deadline: Instant,
    ) {
        let sink: Rc<dyn ReplySink> = self.core.clone();
        self.send_to(req, cmd, token, deadline, sink);
    }

    /// Sends `req` on the pinned connection; its reply goes to `sink` as `token`.
    pub(super) fn send_to(
        &mut self,
        req: &Request<'_>,
        cmd: Option<Command>,
        token: u64,
        deadline: Instant,
        sink: Rc<dyn ReplySink>,
    ) {
        let deadline = if self.stateful.blocking {
            Instant::now() + BLOCKING_WAIT
        } else {
            deadline
        };
        let routing = routing(&self.svc);
        let mut cx = forward::Ctx {
            svc: &routing,
            dice: &mut self.dice,
        };
        if let Err(reply) =
            self.forwarder
                .forward(&mut cx, req, cmd, ReplyTo::new(sink, token, deadline))
        {
            if self.stateful.multi {
                self.stateful.dirty = true;
            }
            let _ = self.core.deliver(token, reply.into());
        }
    }
}

/// Commands the proxy answers itself or refuses, which can't be queued in a transaction on
/// the server (PING and ECHO can: Redis queues them).
pub(super) fn refused_in_multi(cmd: Option<Command>) -> bool {
    cmd.is_some_and(|c| {
        !matches!(
            c.handling,
            Handling::Local(Local::Ping | Local::Echo | Local::Quit)
                | Handling::Forward
                | Handling::Transaction
                | Handling::Blocking
        )
    })
}

/// The channel of the PUBLISH sent before a client's WAIT (see `Session::start`).
const WAIT_CHANNEL: &[u8] = b"__redis-intercept__:wait";

/// A command encoded from its arguments.
fn encode_args(args: &[&[u8]]) -> Bytes {
    let mut out = BytesMut::new();
    crate::resp::encode_command(args.iter().copied(), &mut out);
    out.freeze()
}

/// `req` as RESP, to hold it.
pub(super) fn encode(req: &Request<'_>) -> Bytes {
    let mut out = BytesMut::new();
    req.write_resp(&mut out);
    out.freeze()
}
