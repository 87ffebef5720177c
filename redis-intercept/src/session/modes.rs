//! Client modes the proxy keeps itself, as Redis keeps them for one server: `CLIENT REPLY`
//! (per client: its replies are dropped), `CLIENT PAUSE`/`UNPAUSE` (per service, across
//! workers: its clients' commands are held) and `CLIENT NO-EVICT` (per client: a flag).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::Session;
use crate::command::{Command, flags};
use crate::locks::LockRecovered;
use crate::resp::Request;
use crate::upstream::error_reply;

/// `CLIENT REPLY`'s state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) enum ReplyMode {
    /// Replies are sent.
    #[default]
    On,
    /// `OFF`: none is.
    Off,
    /// `SKIP`: the next command's isn't.
    Skip,
}

/// A service's `CLIENT PAUSE`: until when, and whether every command waits or only writes.
#[derive(Clone, Copy)]
struct Pause {
    until: Instant,
    all: bool,
}

/// Paused services, by [`super::ClientGuard::service_key`].
static PAUSES: LazyLock<Mutex<HashMap<usize, Pause>>> = LazyLock::new(Default::default);

/// Some service may be paused: the request path looks at `PAUSES` only then.
static ANY_PAUSE: AtomicBool = AtomicBool::new(false);

/// `CLIENT PAUSE timeout [WRITE|ALL]` for `service`.
pub(super) fn pause(service: usize, req: &Request<'_>) -> Bytes {
    let ms = std::str::from_utf8(req.arg(2).unwrap_or_default())
        .ok()
        .and_then(|t| t.parse::<i64>().ok());
    let Some(ms) = ms else {
        return error_reply("timeout is not an integer or out of range");
    };
    if ms < 0 {
        return error_reply("timeout is negative");
    }
    let all = match req.arg(3) {
        None => true,
        Some(m) if m.eq_ignore_ascii_case(b"all") => true,
        Some(m) if m.eq_ignore_ascii_case(b"write") => false,
        Some(_) => return error_reply("CLIENT PAUSE mode must be WRITE or ALL"),
    };
    let until = Instant::now() + Duration::from_millis(ms.unsigned_abs());
    let mut pauses = PAUSES.locked();
    let pause = pauses
        .entry(service.to_owned())
        .or_insert(Pause { until, all });
    // As in Redis, a second pause extends the first and can only widen it.
    pause.until = pause.until.max(until);
    pause.all |= all;
    ANY_PAUSE.store(true, Ordering::Release);
    Bytes::from_static(b"+OK\r\n")
}

/// `CLIENT UNPAUSE` for `service`.
pub(super) fn unpause(service: usize) -> Bytes {
    let mut pauses = PAUSES.locked();
    pauses.remove(&service);
    ANY_PAUSE.store(!pauses.is_empty(), Ordering::Release);
    Bytes::from_static(b"+OK\r\n")
}

/// Whether `service`'s pause holds a command that writes (`writes`), or any.
fn holds(service: usize, writes: bool) -> bool {
    if !ANY_PAUSE.load(Ordering::Acquire) {
        return false;
    }
    let mut pauses = PAUSES.locked();
    let Some(p) = pauses.get(&service).copied() else {
        return false;
    };
    if p.until <= Instant::now() {
        pauses.remove(&service);
        ANY_PAUSE.store(!pauses.is_empty(), Ordering::Release);
        return false;
    }
    p.all || writes
}

/// Whether Redis's `CLIENT PAUSE WRITE` holds `cmd`: it may write or replicate.
fn writes(cmd: Option<Command>) -> bool {
    cmd.is_some_and(|c| c.info.has(flags::WRITE) || c.info.has(flags::MAY_REPLICATE))
}

impl Session {
    /// Whether a `CLIENT PAUSE` of the client's service holds `cmd` now (the session looks
    /// again shortly). `CLIENT PAUSE` and `UNPAUSE` themselves always go, and so do commands
    /// queued in a transaction: its `EXEC` waits if the transaction writes.
    pub(super) fn paused(&mut self, cmd: Option<Command>) -> bool {
        if !self.stateful.multi && !ANY_PAUSE.load(Ordering::Acquire) {
            // The request path's usual case: no pause anywhere.
            self.txn_writes = false;
            return false;
        }
        let name = cmd.map_or("", |c| c.info.name);
        if matches!(name, "client|pause" | "client|unpause") {
            return false;
        }
        if self.stateful.multi && name != "exec" {
            self.txn_writes |= writes(cmd);
            return false;
        }
        let w = writes(cmd) || (name == "exec" && self.txn_writes);
        let held = holds(self.state.service_key, w);
        if held {
            self.held_by_pause = true;
        } else if name == "exec" || name == "discard" {
            self.txn_writes = false;
        }
        held
    }

    /// Applies `CLIENT REPLY` to the command about to run (`req`, `cmd`): whether its
    /// replies are dropped, and the mode after it.
    pub(super) fn reply_muted(&mut self, req: &Request<'_>, cmd: Option<Command>) -> bool {
        let before = self.reply_mode;
        if cmd.is_some_and(|c| c.info.name == "client|reply") {
            let arg = req.arg(2).unwrap_or_default();
            if arg.eq_ignore_ascii_case(b"on") {
                self.reply_mode = ReplyMode::On;
                return false;
            }
            if arg.eq_ignore_ascii_case(b"off") {
                self.reply_mode = ReplyMode::Off;
                return true;
            }
            if arg.eq_ignore_ascii_case(b"skip") {
                if before != ReplyMode::Off {
                    self.reply_mode = ReplyMode::Skip;
                }
                return true;
            }
        }
        if before == ReplyMode::Skip {
            self.reply_mode = ReplyMode::On;
        }
        before != ReplyMode::On
    }
}

/// `CLIENT REPLY ON|OFF|SKIP`'s own reply (its effect is [`Session::reply_muted`]'s).
pub(super) fn reply(req: &Request<'_>) -> Bytes {
    let arg = req.arg(2).unwrap_or_default();
    if [&b"on"[..], b"off", b"skip"]
        .iter()
        .any(|m| arg.eq_ignore_ascii_case(m))
    {
        Bytes::from_static(b"+OK\r\n")
    } else {
        error_reply("syntax error")
    }
}

/// `CLIENT NO-EVICT ON|OFF`: the proxy's clients are never evicted by Redis (it sees only
/// the proxy's connections), so this only records the flag CLIENT LIST shows.
pub(super) fn no_evict(req: &Request<'_>, entry: &super::directory::ClientEntry) -> Bytes {
    let arg = req.arg(2).unwrap_or_default();
    let on = if arg.eq_ignore_ascii_case(b"on") {
        true
    } else if arg.eq_ignore_ascii_case(b"off") {
        false
    } else {
        return error_reply("syntax error");
    };
    entry.no_evict.store(on, Ordering::Relaxed);
    Bytes::from_static(b"+OK\r\n")
}
