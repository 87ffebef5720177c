//! Commands the upstream knows and the built-in table (Redis 7.0's) doesn't, read from the
//! `COMMAND` reply of the first upstream the proxy connects to: newer commands are then
//! routed by their own key specs and flags, and those whose flags don't show them safe on a
//! shared connection (no `readonly` or `write` flag: connection and server commands such as
//! `CLIENT CAPA`) are refused instead of forwarded.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{LazyLock, RwLock};

use super::{BeginSearch, Command, CommandInfo, FindKeys, Handling, KeySpec, by_name, flags};
use crate::locks::RwLockRecovered;
use crate::resp::Frame;

/// Learned commands and subcommands by full lower-case name. Filled once; bounded by the
/// upstream's table.
static LEARNED: LazyLock<RwLock<HashMap<&'static str, Command>>> = LazyLock::new(Default::default);

/// A fetch of the upstream's table was started (once per process).
static STARTED: AtomicBool = AtomicBool::new(false);

/// Some command was learned: lookups of unknown names look here only then.
static ANY: AtomicBool = AtomicBool::new(false);

/// Claims the one fetch of the upstream's table; false when it was claimed already.
pub fn start_learning() -> bool {
    !STARTED.swap(true, Ordering::AcqRel)
}

/// A learned command by full lower-case name.
pub fn get(name: &str) -> Option<Command> {
    if !ANY.load(Ordering::Acquire) {
        return None;
    }
    LEARNED.read_recovered().get(name).copied()
}

/// Merges an upstream's `COMMAND` reply: every command and subcommand the built-in table
/// lacks. Returns how many were learned.
pub fn learn(reply: &Frame) -> usize {
    let Some(commands) = items(reply) else {
        return 0;
    };
    let mut learned = LEARNED.write_recovered();
    let before = learned.len();
    for c in commands {
        let Some(info) = parse(c) else { continue };
        let mut add = |info: &'static CommandInfo| {
            if by_name(info.name).is_none() && !learned.contains_key(info.name) {
                learned.insert(
                    info.name,
                    Command {
                        info,
                        handling: handling(info),
                    },
                );
            }
        };
        add(info);
        for sub in info.subcommands {
            add(sub);
        }
    }
    let n = learned.len() - before;
    ANY.store(!learned.is_empty(), Ordering::Release);
    n
}

/// How the proxy treats a command only the upstream knows: by its flags.
fn handling(info: &CommandInfo) -> Handling {
    if info.has(flags::BLOCKING) {
        // A connection of the client's own, as for any blocking command.
        return Handling::Blocking;
    }
    let data = info.has(flags::READONLY) || info.has(flags::WRITE);
    if data && !info.has(flags::ADMIN) && !info.has(flags::PUBSUB) {
        Handling::Forward
    } else {
        Handling::Unsupported
    }
}

/// The elements of an array, set or map reply (a map's keys and values in turn).
fn items(f: &Frame) -> Option<Vec<&Frame>> {
    match f {
        Frame::Array(v) | Frame::Set(v) => Some(v.iter().collect()),
        Frame::Map(pairs) => Some(pairs.iter().flat_map(|(k, v)| [k, v]).collect()),
        _ => None,
    }
}

fn text(f: &Frame) -> Option<String> {
    match f {
        Frame::Bulk(b) | Frame::Simple(b) => Some(String::from_utf8_lossy(b).into_owned()),
        _ => None,
    }
}

fn int(f: &Frame) -> Option<i64> {
    match f {
        Frame::Integer(n) => Some(*n),
        _ => None,
    }
}

/// `key`'s value in a map reply (RESP3) or a flat `[k, v, …]` array (RESP2).
fn field<'a>(map: &'a Frame, key: &str) -> Option<&'a Frame> {
    let all = items(map)?;
    all.chunks(2)
        .find(|kv| text(kv[0]).is_some_and(|k| k == key))
        .and_then(|kv| kv.get(1).copied())
}

/// Leaks `s`: learned names live as long as the process (bounded by the upstream's table,
/// learned once).
fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

/// One command (with its subcommands) from a `COMMAND` reply entry.
fn parse(c: &Frame) -> Option<&'static CommandInfo> {
    let f = items(c)?;
    let name = text(f.first()?)?.to_lowercase();
    let mut bits = 0;
    for flag in items(f.get(2)?)? {
        let flag = text(flag)?;
        if let Some((_, b)) = flags::NAMES.iter().find(|(n, _)| *n == flag) {
            bits |= b;
        }
    }
    let categories: Vec<&'static str> = f
        .get(6)
        .copied()
        .and_then(items)
        .unwrap_or_default()
        .into_iter()
        .filter_map(text)
        .map(|c| leak(c.trim_start_matches('@').to_owned()))
        .collect();
    let specs: Vec<KeySpec> = f
        .get(8)
        .copied()
        .and_then(items)
        .unwrap_or_default()
        .into_iter()
        .filter_map(key_spec)
        .collect();
    let subs: Vec<CommandInfo> = f
        .get(9)
        .copied()
        .and_then(items)
        .unwrap_or_default()
        .into_iter()
        .filter_map(parse)
        .copied()
        .collect();
    Some(Box::leak(Box::new(CommandInfo {
        name: leak(name),
        arity: i16::try_from(int(f.get(1)?)?).ok()?,
        flags: bits,
        first_key: i16::try_from(int(f.get(3)?)?).ok()?,
        last_key: i16::try_from(int(f.get(4)?)?).ok()?,
        step: i16::try_from(int(f.get(5)?)?).ok()?,
        acl_categories: Box::leak(categories.into_boxed_slice()),
        key_specs: Box::leak(specs.into_boxed_slice()),
        subcommands: Box::leak(subs.into_boxed_slice()),
    })))
}

/// One key spec of a `COMMAND` reply.
fn key_spec(spec: &Frame) -> Option<KeySpec> {
    let num = |f: &Frame, k: &str| field(f, k).and_then(int);
    let begin = field(spec, "begin_search")?;
    let bspec = field(begin, "spec")?;
    let begin = match text(field(begin, "type")?)?.as_str() {
        "index" => BeginSearch::Index(u16::try_from(num(bspec, "index")?).ok()?),
        "keyword" => BeginSearch::Keyword {
            keyword: leak(text(field(bspec, "keyword")?)?.to_uppercase()),
            start_from: i16::try_from(num(bspec, "startfrom")?).ok()?,
        },
        _ => BeginSearch::Unknown,
    };
    let find = field(spec, "find_keys")?;
    let fspec = field(find, "spec")?;
    let find = match text(field(find, "type")?)?.as_str() {
        "range" => FindKeys::Range {
            last_key: i16::try_from(num(fspec, "lastkey")?).ok()?,
            step: u16::try_from(num(fspec, "keystep")?).ok()?,
            limit: u16::try_from(num(fspec, "limit")?).ok()?,
        },
        "keynum" => FindKeys::Keynum {
            keynum_idx: u16::try_from(num(fspec, "keynumidx")?).ok()?,
            first_key: u16::try_from(num(fspec, "firstkey")?).ok()?,
            step: u16::try_from(num(fspec, "keystep")?).ok()?,
        },
        _ => FindKeys::Unknown,
    };
    let flags: Vec<&'static str> = field(spec, "flags")
        .and_then(items)
        .unwrap_or_default()
        .into_iter()
        .filter_map(text)
        .map(leak)
        .collect();
    Some(KeySpec {
        begin,
        find,
        flags: Box::leak(flags.into_boxed_slice()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resp::{Limits, RequestParser};
    use crate::route::{Plan, plan};

    /// A bulk string frame.
    fn b(s: &str) -> Frame {
        Frame::Bulk(bytes::Bytes::copy_from_slice(s.as_bytes()))
    }

    /// A `COMMAND` entry: name, arity, flags, key range and one index/range key spec.
    fn entry(name: &str, arity: i64, flags: &[&str], keyed: bool) -> Frame {
        let spec = Frame::Array(vec![
            b("flags"),
            Frame::Array(vec![b("RW")]),
            b("begin_search"),
            Frame::Array(vec![
                b("type"),
                b("index"),
                b("spec"),
                Frame::Array(vec![b("index"), Frame::Integer(1)]),
            ]),
            b("find_keys"),
            Frame::Array(vec![
                b("type"),
                b("range"),
                b("spec"),
                Frame::Array(vec![
                    b("lastkey"),
                    Frame::Integer(0),
                    b("keystep"),
                    Frame::Integer(1),
                    b("limit"),
                    Frame::Integer(0),
                ]),
            ]),
        ]);
        let k = i64::from(keyed);
        Frame::Array(vec![
            b(name),
            Frame::Integer(arity),
            Frame::Array(flags.iter().map(|f| b(f)).collect()),
            Frame::Integer(k),
            Frame::Integer(k),
            Frame::Integer(k),
            Frame::Array(vec![b("@write")]),
            Frame::Array(vec![]),
            Frame::Array(if keyed { vec![spec] } else { vec![] }),
            Frame::Array(vec![]),
        ])
    }

    #[test]
    fn a_newer_keyed_command_is_routed_by_its_key_and_a_connection_command_refused() {
        let reply = Frame::Array(vec![
            entry("hfuture", -3, &["write", "fast"], true),
            entry("connfuture", 2, &["noscript", "loading"], false),
            entry("get", 2, &["readonly"], true),
        ]);
        assert_eq!(learn(&reply), 2);
        let future = get("hfuture").unwrap();
        assert_eq!(future.handling, Handling::Forward);
        assert_eq!(get("connfuture").unwrap().handling, Handling::Unsupported);
        assert!(get("get").is_none(), "the built-in entry stays");
        let mut parser = RequestParser::new(Limits::default());
        let raw = b"*3\r\n$7\r\nHFUTURE\r\n$3\r\n{a}\r\n$1\r\nx\r\n";
        let n = parser.parse(raw).unwrap().unwrap();
        let req = parser.request(&raw[..n]);
        let cmd = crate::command::lookup(&req);
        assert_eq!(cmd.map(|c| c.info.name), Some("hfuture"));
        assert_eq!(
            plan(cmd, &req, &mut Vec::new()),
            Plan::Slot(crate::cluster::Slot::for_key(b"{a}"))
        );
    }
}
