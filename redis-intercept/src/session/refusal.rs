//! Why the proxy refuses a command before routing, queueing or splitting it, as Redis
//! refuses before running or queueing: arity and argument rules, the service's command
//! policy (`-NOPERM`), DEBUG subcommands and WAIT where they can't hold.

use bytes::Bytes;

use super::Session;
use super::dispatch::routing;
use super::stateful::{Txn, txn_kind};
use crate::command::{self, Command};
use crate::resp::Request;
use crate::upstream::error_reply;

impl Session {
    /// Redis's error for a request it would refuse before running it: a wrong number of
    /// arguments always, and argument pairing outside a transaction (inside one, Redis queues
    /// the command and its error is part of EXEC's reply). A refusal inside MULTI makes EXEC
    /// fail with `EXECABORT`, as in Redis. Subscribed clients never get here.
    pub(super) fn refusal(&mut self, req: &Request<'_>, cmd: Option<Command>) -> Option<String> {
        let Some(cmd) = cmd else {
            if req
                .arg(0)
                .is_some_and(|n| n.eq_ignore_ascii_case(b"waitaof"))
                && !self.is_wait(req, None)
            {
                return Some(WAIT_ON_CLUSTER.replace("WAIT", "WAITAOF"));
            }
            // Queued as an error inside MULTI, as Redis does with any unknown command.
            let e = command::unknown_subcommand(req)?;
            self.stateful.dirty |= self.stateful.multi;
            return Some(e);
        };
        let info = cmd.info;
        if info.name == "debug"
            && info.arity_ok(req.len())
            && !req
                .arg(1)
                .is_some_and(|a| a.eq_ignore_ascii_case(b"object"))
        {
            // DEBUG SLEEP, RELOAD, SEGFAULT… would act on the server every client of the
            // proxy shares (and hold the shared connection).
            return Some(format!(
                "'DEBUG {}' is not supported by redis-intercept: it would act on the server as a whole (DEBUG OBJECT is forwarded)",
                String::from_utf8_lossy(req.arg(1).unwrap_or_default()).to_uppercase()
            ));
        }
        if let Some(e) = info.arity_error(req) {
            if !self.stateful.multi {
                return Some(e);
            }
            if txn_kind(Some(cmd)) == Some(Txn::Exec) {
                // Redis aborts the transaction on the spot: EXEC goes on as after a queueing
                // error, with this reason.
                self.stateful.exec_refused = Some(e);
                return None;
            }
            self.stateful.dirty = true;
            return Some(e);
        }
        if self.state.authenticated
            && let Some(acl) = &self.svc.policy().acl
            && !acl.allows(info)
        {
            // Redis's refusal; inside MULTI it fails the transaction, as there.
            self.stateful.dirty |= self.stateful.multi;
            return Some(noperm(&self.svc, info.name));
        }
        if self.stateful.multi {
            return None;
        }
        info.run_error(req)
    }

    /// Whether `req` is WAIT (or WAITAOF, newer than the command table) on a service whose
    /// one route is a standalone server: it runs on a connection of the client's own.
    pub(super) fn is_wait(&self, req: &Request<'_>, cmd: Option<Command>) -> bool {
        let name = req.arg(0).unwrap_or_default();
        let wait = match cmd {
            // WAITAOF is in the table once learned from the upstream.
            Some(c) => matches!(c.info.name, "wait" | "waitaof"),
            None => name.eq_ignore_ascii_case(b"waitaof"),
        };
        wait && self.forwarder.pins_without_key(&routing(&self.svc))
    }
}

/// Redis's NOPERM text for `command`, in the words of the server behind: Redis 7.2 and
/// Valkey name the user, 7.0 says "this user".
fn noperm(svc: &crate::service::ServiceCtx, command: &str) -> String {
    let (server, version) = svc.upstream_identity();
    let mut v = version.split('.').filter_map(|n| n.parse::<u32>().ok());
    let newer = server != "redis" || (v.next().unwrap_or(0), v.next().unwrap_or(0)) >= (7, 2);
    if newer {
        let auth = crate::locks::RwLockRecovered::read_recovered(&*svc.auth);
        let user = auth.as_ref().map_or("default", |a| a.username.as_str());
        format!("NOPERM User {user} has no permissions to run the '{command}' command")
    } else {
        format!("NOPERM this user has no permissions to run the '{command}' command")
    }
}

/// The reply for a refusal ([`Session::refusal`]'s text): Redis's `-NOPERM`, or `-ERR`.
pub(super) fn refusal_reply(why: &str) -> Bytes {
    if why.starts_with("NOPERM ") {
        Bytes::from(format!("-{why}\r\n"))
    } else {
        error_reply(why)
    }
}

/// Why WAIT is refused when the service isn't one standalone server.
pub(super) const WAIT_ON_CLUSTER: &str = "'WAIT' is not supported by redis-intercept here: it counts one server's replicas, and this service's keys are on several servers (a cluster, or key-prefix routes)";
