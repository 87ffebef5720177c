//! Where one command goes once it passed the checks: a local answer, a refusal, or a
//! hand-off to the forwarder with a reply slot; and a subscribed RESP3 client's commands.

use std::rc::Rc;

use bytes::Bytes;
use tokio::time::Instant;

use super::faults::Sampler;
use super::local::{display_name, local_reply, select};
use super::replies::ReplySlots;
use super::{ClientState, Session, forward, stateful};
use crate::command::{self, Command, Handling, Local, flags};
use crate::resp::Request;
use crate::service::ServiceCtx;
use crate::upstream::{ReplySink, ReplyTo, error_reply};

/// What a forward needs of the service.
pub(super) fn routing(svc: &ServiceCtx) -> forward::Routing<'_> {
    forward::Routing {
        routes: &svc.routes,
        prefixes: &svc.prefixes,
        discard: &svc.discard,
        limits: svc.limits,
    }
}

/// Handles one command: a local reply, a refusal, or a hand-off to the upstream.
#[expect(
    clippy::too_many_arguments,
    reason = "the session's parts, borrowed separately"
)]
pub(super) fn dispatch(
    req: &Request<'_>,
    cmd: Option<Command>,
    core: &Rc<ReplySlots>,
    state: &mut ClientState,
    svc: &ServiceCtx,
    forwarder: &mut forward::Forwarder,
    dice: &mut Sampler,
    deadline: Instant,
) {
    let handling = cmd.map(|c| (c.handling, c.info));
    if !state.authenticated && !handling.is_some_and(|(_, info)| info.has(flags::NO_AUTH)) {
        core.push_ready(Bytes::from_static(b"-NOAUTH Authentication required.\r\n"));
        return;
    }
    match handling {
        // Standalone upstreams answer unknown commands themselves, in Redis's words.
        None | Some((Handling::Forward, _)) => {
            let token = core.push_pending();
            let sink: Rc<dyn ReplySink> = core.clone();
            let routing = routing(svc);
            let mut cx = forward::Ctx {
                svc: &routing,
                dice,
            };
            let sent = forwarder.forward(&mut cx, req, cmd, ReplyTo::new(sink, token, deadline));
            if let Err(reply) = sent {
                // The session writes its output right after dispatching; no flush needed.
                let _ = core.deliver(token, reply.into());
            }
        }
        Some((
            Handling::Local(
                local @ (Local::ClientTracking
                | Local::ClientCaching
                | Local::ClientGetRedir
                | Local::ClientTrackingInfo),
            ),
            _,
        )) => super::tracking::command(local, req, state, core),
        Some((Handling::Local(Local::ClientUnblock), _)) => {
            super::unblock::unblock(req, state, core)
        }
        Some((Handling::Local(local), _)) => {
            // Arity was checked when the request was read (`Session::refusal`).
            let reply = if local == Local::Select {
                let reply = select(req, forwarder);
                state
                    .entry
                    .db
                    .store(forwarder.db(), std::sync::atomic::Ordering::Relaxed);
                reply
            } else {
                let resp3 = state.resp3;
                if local == Local::Reset {
                    // RESET turns tracking off, as in Redis.
                    if state.tracking.take().is_some() {
                        crate::tracking::tracker().disable(state.id);
                    }
                    state.caching = false;
                    // RESET selects database 0 again, as in Redis (0 is always valid).
                    let _ = forwarder.select(0);
                    state
                        .entry
                        .db
                        .store(0, std::sync::atomic::Ordering::Relaxed);
                }
                let switches = local == Local::Hello
                    && super::local::hello_args(req)
                        .is_ok_and(|a| a.protocol.is_some_and(|p| (p == 3) != resp3));
                if switches && forwarder.is_pinned() {
                    core.push_ready(error_reply(
                        "HELLO that changes the protocol while a WATCH or blocking command holds a connection is not supported by redis-intercept",
                    ));
                    return;
                }
                let reply = local_reply(local, req, state, svc);
                if state.resp3 != resp3 {
                    // HELLO or RESET changed the protocol: the client's replies come from
                    // connections in the new one from now on.
                    forwarder.set_protocol(state.resp3);
                }
                reply
            };
            core.push_ready(reply);
        }
        Some((handling, info)) => {
            let name = display_name(info.name);
            let why = match handling {
                Handling::PubSub => {
                    "a client can't subscribe during a transaction, a WATCH or a blocking command"
                }
                Handling::Blocking => {
                    let why =
                        super::refusal::WAIT_ON_CLUSTER.replace("'WAIT'", &format!("'{name}'"));
                    core.push_ready(error_reply(&why));
                    return;
                }
                _ => {
                    "it would act on the proxy's shared upstream connection or on the server as a whole"
                }
            };
            core.push_ready(error_reply(&format!(
                "'{name}' is not supported by redis-intercept: {why}"
            )));
        }
    }
}

impl Session {
    /// Serves a RESP3 client's command while it is subscribed, as Redis allows: routed
    /// like any other command, its reply through the session's reply slots, which the pipe
    /// writes in order among the pushes. `Err(None)`: a RESP2 client, which gets Redis's own
    /// refusal. Commands that would need a connection of the client's own (transactions,
    /// blocking commands) or change its state (SELECT, HELLO, AUTH) get the proxy's.
    pub(super) fn resp3_dispatch(
        &mut self,
        req: &Request<'_>,
        name: Option<&str>,
    ) -> Result<(), Option<Bytes>> {
        if !self.state.resp3 {
            return Err(None);
        }
        let cmd = command::lookup(req);
        let own = matches!(
            name,
            Some("select" | "hello" | "auth" | "monitor" | "sync" | "psync")
        ) || stateful::txn_kind(cmd).is_some()
            || stateful::is_blocking(cmd);
        if own {
            return Err(Some(error_reply(&format!(
                "'{}' while subscribed is not supported by redis-intercept: it needs a connection of the client's own, or changes the subscribed one",
                name.unwrap_or("unknown").replace('|', " ").to_uppercase()
            ))));
        }
        if let Some(refusal) = self.refusal(req, cmd) {
            self.core
                .push_ready(super::refusal::refusal_reply(&refusal));
            return Ok(());
        }
        let deadline = Instant::now() + self.svc.policy().op_timeout;
        let token = self.core.next_token();
        let keys = super::tracking::keys_of(&self.state, req, cmd);
        self.dispatch_normal(req, cmd, deadline);
        self.note_tracking(token, false, cmd, keys);
        Ok(())
    }
}
