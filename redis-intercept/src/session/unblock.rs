//! `CLIENT UNBLOCK` through the proxy: a client's blocking command runs on a dedicated
//! connection, whose id on the server the session learns (a `CLIENT ID` sent just before the
//! command); `CLIENT UNBLOCK <client> [TIMEOUT|ERROR]` sends Redis's own `CLIENT UNBLOCK` for
//! that connection to its node, so the blocked client gets Redis's reply.

use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;

use super::directory::{self, BlockedOn, ClientEntry};
use super::replies::ReplySlots;
use super::{ClientState, Session};
use crate::locks::LockRecovered;
use crate::resp::{Frame, Request};
use crate::upstream::{ConnSettings, Reply, ReplySink, ReplyTo, error_reply};

/// Takes the reply to the `CLIENT ID` sent before a blocking command: the dedicated
/// connection's id on the server, for CLIENT UNBLOCK.
struct IdSink {
    entry: Arc<ClientEntry>,
    addr: String,
    settings: ConnSettings,
}

impl ReplySink for IdSink {
    fn deliver(&self, _token: u64, reply: Reply<'_>) -> bool {
        let text = std::str::from_utf8(reply.as_slice()).unwrap_or_default();
        if let Some(id) = text
            .strip_prefix(':')
            .and_then(|t| t.trim_end().parse::<i64>().ok())
        {
            *self.entry.blocked_on.locked() = Some(BlockedOn {
                addr: self.addr.clone(),
                settings: self.settings.clone(),
                upstream_id: id,
            });
        }
        false
    }

    fn flush(&self) {}
}

impl Session {
    /// Before a blocking command goes on the client's dedicated connection: a `CLIENT ID`
    /// there, whose reply tells CLIENT UNBLOCK which connection to unblock.
    pub(super) fn learn_blocked_conn(&mut self, deadline: tokio::time::Instant) {
        let Some(conn) = self.forwarder.pinned_conn() else {
            return;
        };
        let sink: Rc<dyn ReplySink> = Rc::new(IdSink {
            entry: Arc::clone(&self.state.entry),
            addr: conn.addr().to_owned(),
            settings: conn.settings().clone(),
        });
        let _ = conn.send_encoded(
            b"*2\r\n$6\r\nCLIENT\r\n$2\r\nID\r\n",
            ReplyTo::new(sink, 0, deadline),
        );
    }
}

/// `CLIENT UNBLOCK id [TIMEOUT|ERROR]`: answered once the blocked client's node answers
/// (0 when that client isn't blocked in a command).
pub(super) fn unblock(req: &Request<'_>, state: &ClientState, core: &Rc<ReplySlots>) {
    let id = std::str::from_utf8(req.arg(2).unwrap_or_default())
        .ok()
        .and_then(|t| t.parse::<u64>().ok());
    let Some(id) = id else {
        return core.push_ready(error_reply("value is not an integer or out of range"));
    };
    let mode: &[u8] = match req.arg(3) {
        None => b"TIMEOUT",
        Some(m) if m.eq_ignore_ascii_case(b"timeout") => b"TIMEOUT",
        Some(m) if m.eq_ignore_ascii_case(b"error") => b"ERROR",
        Some(_) => {
            return core.push_ready(error_reply(
                "CLIENT UNBLOCK reason should be TIMEOUT or ERROR",
            ));
        }
    };
    let target = directory::find(id).filter(|e| {
        e.same_service(&state.entry)
            && e.flags.load(Ordering::Relaxed) & directory::flag::BLOCKED != 0
    });
    let blocked = target.and_then(|e| e.blocked_on.locked().clone());
    let Some(on) = blocked else {
        return core.push_ready(Frame::Integer(0).to_bytes());
    };
    let token = core.push_pending();
    let core = Rc::downgrade(core);
    tokio::task::spawn_local(async move {
        let id = on.upstream_id.to_string();
        let args: [&[u8]; 4] = [b"CLIENT", b"UNBLOCK", id.as_bytes(), mode];
        let reply = match crate::upstream::one_command(&on.addr, &on.settings, &args).await {
            Ok(reply) => reply,
            Err(e) => Bytes::from(e),
        };
        if let Some(core) = core.upgrade() {
            core.deliver(token, reply.into());
            core.flush();
        }
    });
}
