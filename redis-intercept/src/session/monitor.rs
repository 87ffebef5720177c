//! MONITOR in the proxy: a monitoring client gets every command the service's clients send,
//! on any worker, with the client's own address and database, in Redis's format. (MONITOR
//! on the server would show only the proxy's shared connections.)

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex};

use bytes::Bytes;

use super::directory::ClientEntry;
use crate::command::{Command, flags};
use crate::locks::LockRecovered;
use crate::resp::Request;

/// One monitoring client.
struct Monitor {
    /// Its service ([`super::ClientGuard::service_key`]).
    service: usize,
    /// Where its lines go.
    entry: Arc<ClientEntry>,
}

/// Every monitoring client of the process; bounded by the services' `max_clients`.
static MONITORS: LazyLock<Mutex<Vec<Monitor>>> = LazyLock::new(Default::default);

/// How many there are: the request path looks at [`MONITORS`] only when some exist.
static COUNT: AtomicUsize = AtomicUsize::new(0);

/// `entry`'s client monitors `service` from now on.
pub(super) fn start(service: usize, entry: &Arc<ClientEntry>) {
    let mut monitors = MONITORS.locked();
    if monitors.iter().all(|m| m.entry.id != entry.id) {
        monitors.push(Monitor {
            service,
            entry: Arc::clone(entry),
        });
        COUNT.store(monitors.len(), Ordering::Release);
    }
}

/// Client `id` stopped monitoring (it left, or RESET).
pub(super) fn stop(id: u64) {
    if COUNT.load(Ordering::Acquire) == 0 {
        return;
    }
    let mut monitors = MONITORS.locked();
    monitors.retain(|m| m.entry.id != id);
    COUNT.store(monitors.len(), Ordering::Release);
}

/// Shows `req`, sent by `from`, to the service's monitors, as Redis does: commands it
/// flags `skip_monitor` are not shown, and credentials are redacted.
pub(super) fn feed(service: usize, from: &ClientEntry, req: &Request<'_>, cmd: Option<Command>) {
    if COUNT.load(Ordering::Acquire) == 0 {
        return;
    }
    let Some(cmd) = cmd else { return };
    if cmd.info.has(flags::SKIP_MONITOR) {
        return;
    }
    let targets: Vec<Arc<ClientEntry>> = MONITORS
        .locked()
        .iter()
        .filter(|m| m.service == service)
        .map(|m| Arc::clone(&m.entry))
        .collect();
    if targets.is_empty() {
        return;
    }
    let line = Bytes::from(line(from, req, cmd.info.name));
    for t in targets {
        t.post_or_close(line.clone());
    }
}

/// `+<seconds>.<micros> [<db> <addr>] "arg" …`, each argument quoted as Redis's
/// `sdscatrepr` quotes it.
fn line(from: &ClientEntry, req: &Request<'_>, name: &str) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let mut out = format!(
        "+{}.{:06} [{} {}]",
        now.as_secs(),
        now.subsec_micros(),
        from.db.load(Ordering::Relaxed),
        from.addr_text()
    );
    let redact_from = if name == "auth" { 1 } else { usize::MAX };
    let mut after_auth = false;
    for (i, arg) in req.args().enumerate() {
        out.push(' ');
        if i >= redact_from || after_auth {
            out.push_str("\"(redacted)\"");
            continue;
        }
        quote(&mut out, arg);
        // HELLO … AUTH user pass: the two after AUTH.
        if name == "hello" && arg.eq_ignore_ascii_case(b"auth") {
            after_auth = true;
        }
    }
    out.push_str("\r\n");
    out
}

/// Redis's `sdscatrepr`.
fn quote(out: &mut String, arg: &[u8]) {
    out.push('"');
    for &b in arg {
        match b {
            b'\\' => out.push_str("\\\\"),
            b'"' => out.push_str("\\\""),
            b'\n' => out.push_str("\\n"),
            b'\r' => out.push_str("\\r"),
            b'\t' => out.push_str("\\t"),
            7 => out.push_str("\\a"),
            8 => out.push_str("\\b"),
            b if b.is_ascii_graphic() || b == b' ' => out.push(b as char),
            b => out.push_str(&format!("\\x{b:02x}")),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_are_quoted_as_redis_quotes_them() {
        let mut s = String::new();
        quote(&mut s, b"a \"b\"\n\x01\\");
        assert_eq!(s, "\"a \\\"b\\\"\\n\\x01\\\\\"");
    }
}
