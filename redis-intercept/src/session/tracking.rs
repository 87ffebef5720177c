//! A session's side of client-side caching: `CLIENT TRACKING`, `CACHING`, `GETREDIR` and
//! `TRACKINGINFO` with Redis's rules and replies, and noting which of the client's requests
//! read which keys, for the worker's tracker (`tracking.rs`).

use std::rc::Rc;
use std::time::Duration;

use bytes::Bytes;

use super::replies::{ReplySlots, TrackedOp};
use super::{ClientState, Session, directory};
use crate::command::{Command, Local, flags};
use crate::resp::{Frame, Request};
use crate::tracking::{self, Options};
use crate::upstream::{ReplySink, error_reply};

/// Keys of one transaction the proxy notes for invalidation; a transaction that reads more
/// makes its client drop everything after EXEC.
const MAX_TXN_KEYS: usize = 64 * 1024;

/// The longest `CLIENT TRACKING ON` waits for the worker's listeners to come up; after it,
/// it is answered anyway (reads are then invalidated as soon as answered, until they are).
const READY_WAIT: Duration = Duration::from_secs(2);

/// A tracking client's keys of the transaction it is queueing.
#[derive(Default)]
pub(super) struct TxnKeys {
    /// Keys read by queued commands.
    reads: Vec<Bytes>,
    /// More than [`MAX_TXN_KEYS`].
    overflow: bool,
}

/// Answers a tracking subcommand. `CLIENT TRACKING ON` is answered once the worker listens
/// to every node it knows, so the client's first reads can be cached.
pub(super) fn command(
    local: Local,
    req: &Request<'_>,
    state: &mut ClientState,
    core: &Rc<ReplySlots>,
) {
    let reply = match local {
        Local::ClientTracking => return tracking(req, state, core),
        Local::ClientCaching => caching(req, state),
        Local::ClientGetRedir => Frame::Integer(match &state.tracking {
            Some(t) => t.opts.borrow().redirect as i64,
            None => -1,
        })
        .to_bytes(),
        _ => info(state),
    };
    core.push_ready(reply);
}

/// `CLIENT TRACKING ON|OFF [REDIRECT id] [PREFIX p]… [BCAST] [OPTIN] [OPTOUT] [NOLOOP]`.
fn tracking(req: &Request<'_>, state: &mut ClientState, core: &Rc<ReplySlots>) {
    let mut opts = Options::default();
    let mut new_prefixes = Vec::new();
    let mut j = 3;
    while let Some(arg) = req.arg(j) {
        let more = req.arg(j + 1);
        if arg.eq_ignore_ascii_case(b"redirect") && more.is_some() {
            j += 1;
            if opts.redirect != 0 {
                return core.push_ready(error_reply(
                    "A client can only redirect to a single other client",
                ));
            }
            let id = more
                .and_then(|m| std::str::from_utf8(m).ok())
                .and_then(|m| m.parse::<i64>().ok());
            let Some(id) = id else {
                return core.push_ready(error_reply("value is not an integer or out of range"));
            };
            if u64::try_from(id)
                .ok()
                .and_then(|id| (id != 0).then(|| directory::find(id)).flatten())
                .is_none()
            {
                return core.push_ready(error_reply(
                    "The client ID you want redirect to does not exist",
                ));
            }
            opts.redirect = id as u64;
        } else if arg.eq_ignore_ascii_case(b"bcast") {
            opts.bcast = true;
        } else if arg.eq_ignore_ascii_case(b"optin") {
            opts.optin = true;
        } else if arg.eq_ignore_ascii_case(b"optout") {
            opts.optout = true;
        } else if arg.eq_ignore_ascii_case(b"noloop") {
            opts.noloop = true;
        } else if arg.eq_ignore_ascii_case(b"prefix") && more.is_some() {
            j += 1;
            new_prefixes.push(Bytes::copy_from_slice(more.unwrap_or_default()));
        } else {
            return core.push_ready(error_reply("syntax error"));
        }
        j += 1;
    }
    let on_off = req.arg(2).unwrap_or_default();
    if on_off.eq_ignore_ascii_case(b"off") {
        if state.tracking.take().is_some() {
            tracking::tracker().disable(state.id);
        }
        state.caching = false;
        return core.push_ready(Bytes::from_static(b"+OK\r\n"));
    }
    if !on_off.eq_ignore_ascii_case(b"on") {
        return core.push_ready(error_reply("syntax error"));
    }
    if let Err(why) = check_on(&opts, &new_prefixes, state.tracking.as_deref()) {
        return core.push_ready(error_reply(&why));
    }
    if let Some(client) = &state.tracking {
        // Already on: the new options replace the old, and prefixes add up, as in Redis.
        let mut current = client.opts.borrow_mut();
        opts.prefixes = std::mem::take(&mut current.prefixes);
        add_prefixes(&mut opts, new_prefixes);
        *current = opts;
        client.broken_redirect.set(false);
        return core.push_ready(Bytes::from_static(b"+OK\r\n"));
    }
    add_prefixes(&mut opts, new_prefixes);
    let client = tracking::Client::new(state.id, opts);
    state.tracking = Some(Rc::clone(&client));
    let token = core.push_pending();
    let answer = {
        let core = Rc::downgrade(core);
        move || {
            client.ready.set(true);
            if let Some(core) = core.upgrade()
                && core.is_pending(token)
            {
                core.deliver(token, Bytes::from_static(b"+OK\r\n").into());
                core.flush();
            }
        }
    };
    let late = answer.clone();
    tokio::task::spawn_local(async move {
        tokio::time::sleep(READY_WAIT).await;
        late();
    });
    if let Some(client) = &state.tracking {
        tracking::tracker().enable(client, Box::new(answer));
    }
}

/// Redis's checks of `CLIENT TRACKING ON` options against each other and the client's
/// current tracking.
fn check_on(
    opts: &Options,
    prefixes: &[Bytes],
    current: Option<&tracking::Client>,
) -> Result<(), String> {
    if !opts.bcast && !prefixes.is_empty() {
        return Err("PREFIX option requires BCAST mode to be enabled".to_owned());
    }
    let old = current.map(|c| c.opts.borrow().clone());
    if old.as_ref().is_some_and(|o| o.bcast != opts.bcast) {
        return Err("You can't switch BCAST mode on/off before disabling tracking for this client, and then re-enabling it with a different mode.".to_owned());
    }
    if opts.bcast && (opts.optin || opts.optout) {
        return Err("OPTIN and OPTOUT are not compatible with BCAST".to_owned());
    }
    if opts.optin && opts.optout {
        return Err("You can't specify both OPTIN mode and OPTOUT mode".to_owned());
    }
    if old
        .as_ref()
        .is_some_and(|o| (opts.optin && o.optout) || (opts.optout && o.optin))
    {
        return Err("You can't switch OPTIN/OPTOUT mode before disabling tracking for this client, and then re-enabling it with a different mode.".to_owned());
    }
    if opts.bcast {
        let existing = old.map(|o| o.prefixes).unwrap_or_default();
        let overlap = |a: &[u8], b: &[u8]| a.starts_with(b) || b.starts_with(a);
        for (i, p) in prefixes.iter().enumerate() {
            if let Some(e) = existing.iter().find(|e| overlap(p, e)) {
                return Err(format!(
                    "Prefix '{}' overlaps with an existing prefix '{}'. Prefixes for a single client must not overlap.",
                    String::from_utf8_lossy(p),
                    String::from_utf8_lossy(e)
                ));
            }
            if let Some(q) = prefixes[i + 1..].iter().find(|q| overlap(p, q)) {
                return Err(format!(
                    "Prefix '{}' overlaps with another provided prefix '{}'. Prefixes for a single client must not overlap.",
                    String::from_utf8_lossy(p),
                    String::from_utf8_lossy(q)
                ));
            }
        }
    }
    Ok(())
}

/// Adds BCAST prefixes as Redis does: none given means the empty prefix (every key).
fn add_prefixes(opts: &mut Options, new: Vec<Bytes>) {
    if !opts.bcast {
        return;
    }
    let new = if new.is_empty() {
        vec![Bytes::new()]
    } else {
        new
    };
    for p in new {
        if !opts.prefixes.contains(&p) {
            opts.prefixes.push(p);
        }
    }
    opts.prefixes.sort();
}

/// `CLIENT CACHING YES|NO`.
fn caching(req: &Request<'_>, state: &mut ClientState) -> Bytes {
    let Some(t) = &state.tracking else {
        return error_reply(
            "CLIENT CACHING can be called only when the client is in tracking mode with OPTIN or OPTOUT mode enabled",
        );
    };
    let opts = t.opts.borrow();
    let arg = req.arg(2).unwrap_or_default();
    if arg.eq_ignore_ascii_case(b"yes") {
        if !opts.optin {
            return error_reply(
                "CLIENT CACHING YES is only valid when tracking is enabled in OPTIN mode.",
            );
        }
    } else if arg.eq_ignore_ascii_case(b"no") {
        if !opts.optout {
            return error_reply(
                "CLIENT CACHING NO is only valid when tracking is enabled in OPTOUT mode.",
            );
        }
    } else {
        return error_reply("syntax error");
    }
    drop(opts);
    state.caching = true;
    Bytes::from_static(b"+OK\r\n")
}

/// `CLIENT TRACKINGINFO`: a map of flags (a set), redirect and prefixes.
fn info(state: &ClientState) -> Bytes {
    let text = |s: &'static str| Frame::Bulk(Bytes::from_static(s.as_bytes()));
    let (flag_list, redirect, prefixes) = match &state.tracking {
        None => (vec![text("off")], -1, Vec::new()),
        Some(t) => {
            let o = t.opts.borrow();
            let mut f = vec![text("on")];
            if o.bcast {
                f.push(text("bcast"));
            }
            if o.optin {
                f.push(text("optin"));
                if state.caching {
                    f.push(text("caching-yes"));
                }
            }
            if o.optout {
                f.push(text("optout"));
                if state.caching {
                    f.push(text("caching-no"));
                }
            }
            if o.noloop {
                f.push(text("noloop"));
            }
            if t.broken_redirect.get() {
                f.push(text("broken_redirect"));
            }
            let prefixes = o.prefixes.iter().cloned().map(Frame::Bulk).collect();
            (f, o.redirect as i64, prefixes)
        }
    };
    let pairs = vec![
        (
            text("flags"),
            if state.resp3 {
                Frame::Set(flag_list)
            } else {
                Frame::Array(flag_list)
            },
        ),
        (text("redirect"), Frame::Integer(redirect)),
        (text("prefixes"), Frame::Array(prefixes)),
    ];
    if state.resp3 {
        Frame::Map(pairs).to_bytes()
    } else {
        Frame::Array(pairs.into_iter().flat_map(|(k, v)| [k, v]).collect()).to_bytes()
    }
}

/// The keys a tracking client's command reads (recorded when answered), as Redis decides:
/// read-only commands (and scripts, for their declared keys), unless OPTIN without
/// `CLIENT CACHING YES`, or OPTOUT with `CLIENT CACHING NO`.
pub(super) fn keys_of(state: &ClientState, req: &Request<'_>, cmd: Option<Command>) -> Vec<Bytes> {
    let (Some(t), Some(cmd)) = (&state.tracking, cmd) else {
        return Vec::new();
    };
    let info = cmd.info;
    let o = t.opts.borrow();
    let script = matches!(
        info.name,
        "eval" | "evalsha" | "eval_ro" | "evalsha_ro" | "fcall" | "fcall_ro"
    );
    let reads = (info.has(flags::READONLY) && !info.has(flags::PUBSUB) || script)
        && !o.bcast
        && (!o.optin || state.caching)
        && !(o.optout && state.caching);
    if !reads {
        return Vec::new();
    }
    let mut at = Vec::new();
    info.key_indexes(req, &mut at);
    at.into_iter()
        .filter_map(|i| req.arg(i).map(Bytes::copy_from_slice))
        .collect()
}

impl Session {
    /// Notes a tracking client's command that took slot `token` (`was_multi`: the client
    /// was queueing a transaction when it sent it). Its reads are recorded when answered;
    /// a transaction's, when EXEC is.
    pub(super) fn note_tracking(
        &mut self,
        token: u64,
        was_multi: bool,
        cmd: Option<Command>,
        reads: Vec<Bytes>,
    ) {
        let Some(client) = self.state.tracking.clone() else {
            return;
        };
        let is_client = cmd.is_some_and(|c| c.info.name.starts_with("client|"));
        if was_multi && self.stateful.multi {
            let txn = &mut self.state.txn_keys;
            if txn.reads.len() + reads.len() > MAX_TXN_KEYS {
                txn.overflow = true;
            } else {
                txn.reads.extend(reads);
            }
            return;
        }
        if !is_client && !self.stateful.multi {
            // As in Redis, CLIENT CACHING covers the next command (a whole transaction).
            self.state.caching = false;
        }
        let reads = if was_multi {
            // EXEC (or DISCARD): the transaction's reads happen now.
            let txn = std::mem::take(&mut self.state.txn_keys);
            if txn.overflow && self.core.is_pending(token) {
                tracking::tracker().invalidate_client(client.id);
            }
            txn.reads
        } else {
            reads
        };
        if reads.is_empty() || !self.core.is_pending(token) {
            return;
        }
        self.core.tracked_ops.borrow_mut().push_back(TrackedOp {
            token,
            id: client.id,
            reads,
            seq: tracking::seq(),
        });
    }

    /// Tracking ends with the session (or RESET).
    pub(super) fn end_tracking(&mut self) {
        if self.state.tracking.take().is_some() {
            tracking::tracker().disable(self.state.id);
        }
        self.state.caching = false;
        self.state.txn_keys = TxnKeys::default();
    }
}

/// Commands whose RESP2 reply can be Redis's null *array*, which RESP3 doesn't tell apart
/// from its null bulk: a RESP2 client's write of these never runs on a listener.
fn null_array_in_resp2(name: &str) -> bool {
    matches!(name, "lpop" | "rpop" | "lmpop" | "zmpop")
}

/// Whether every key of `info` comes from key specs the proxy reads (no command logic).
fn keys_fully_known(info: &crate::command::CommandInfo) -> bool {
    use crate::command::{BeginSearch, FindKeys};
    !info.key_specs.is_empty()
        && info
            .key_specs
            .iter()
            .all(|s| s.begin != BeginSearch::Unknown && s.find != FindKeys::Unknown)
}

impl Session {
    /// A NOLOOP client's write runs on the listener of its node, so that Redis reports it to
    /// nobody and the proxy tells every other reader itself (`tracking.rs`): Redis's own
    /// reports can't say who wrote. It waits for the client's earlier commands, and holds
    /// its later ones until answered, so order is kept. `None`: the ordinary way (not a
    /// NOLOOP client's plain write of known keys on one node, or mirrors or faults apply;
    /// then the client may also get its own write's invalidation).
    pub(super) fn noloop_write(
        &mut self,
        req: &Request<'_>,
        cmd: Option<Command>,
    ) -> Option<super::stateful::Step> {
        use super::stateful::Step;
        let noloop = self
            .state
            .tracking
            .as_ref()
            .is_some_and(|t| t.opts.borrow().noloop);
        if !noloop {
            return None;
        }
        if self.noloop_pending.is_some_and(|t| self.core.is_pending(t)) {
            self.stateful.barrier = true;
            return Some(Step::Wait);
        }
        let cmd = cmd?;
        let info = cmd.info;
        let svc = &self.svc;
        let eligible = info.has(flags::WRITE)
            && !info.has(flags::BLOCKING)
            && matches!(cmd.handling, crate::command::Handling::Forward)
            && keys_fully_known(info)
            && (self.state.resp3 || !null_array_in_resp2(info.name))
            && self.state.authenticated
            && !self.stateful.active(&self.forwarder)
            && self.forwarder.db() == 0
            && svc.routes.len() == 1
            && svc.routes.iter().all(|r| r.mirrors.is_empty())
            && svc.prefixes.is_empty()
            && self.svc.policy().faults.is_empty();
        if !eligible {
            return None;
        }
        let mut at = Vec::new();
        info.key_indexes(req, &mut at);
        let keys: Vec<Bytes> = at
            .into_iter()
            .filter_map(|i| req.arg(i).map(Bytes::copy_from_slice))
            .collect();
        let slot = crate::cluster::Slot::for_key(keys.first()?);
        if keys
            .iter()
            .any(|k| crate::cluster::Slot::for_key(k) != slot)
        {
            return None;
        }
        let (addr, _) = self
            .forwarder
            .pubsub_target(keys.first().map(|k| &k[..]))
            .ok()?;
        if !tracking::tracker().is_listening(&addr) {
            return None;
        }
        if self.core.unfilled.get() > 0 {
            // Its earlier commands go first.
            self.stateful.barrier = true;
            return Some(Step::Wait);
        }
        let token = self.core.push_pending();
        let request = super::stateful::encode(req);
        let sink: Rc<dyn ReplySink> = self.core.clone();
        let deadline = tokio::time::Instant::now() + self.svc.policy().op_timeout;
        let redo = {
            let core = Rc::downgrade(&self.core);
            let request = request.clone();
            Box::new(move || {
                if let Some(core) = core.upgrade() {
                    *core.redo.borrow_mut() = Some((token, request));
                    core.signal.notify();
                }
            })
        };
        let write = crate::upstream::tracking_listener::NoloopWrite {
            to: crate::upstream::ReplyTo::new(sink, token, deadline),
            client: self.state.id,
            keys,
            resp2: !self.state.resp3,
            redo,
        };
        if let Err(write) = tracking::tracker().noloop_write(&addr, &request, write) {
            // The listener went down just now: the ordinary way, from the same slot.
            (write.redo)();
        }
        self.noloop_pending = Some(token);
        Some(Step::Done)
    }
}
