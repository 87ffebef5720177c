//! The command table: for every Redis 7.0 command, where its keys are, whether it reads or
//! writes, and how the proxy handles it.
//!
//! The raw facts (arity, flags, key specs) are generated from a live server's `COMMAND INFO`
//! by `cargo xtask gen-commands` into `command/table.rs`; an end-to-end test compares them with
//! the running redis-server. How the proxy treats each command ([`Handling`]) is policy and is
//! written by hand in [`handling_for`].

pub mod acl;
mod handling;
pub mod learned;
mod table;

use std::collections::HashMap;
use std::sync::LazyLock;

use crate::resp::Request;

pub use handling::{Handling, Local, handling_for};
pub use table::COMMANDS;

/// Redis command flags (`COMMAND INFO` field 3), one bit each.
pub mod flags {
    /// The command may modify data.
    pub const WRITE: u32 = 1 << 0;
    /// The command only reads data.
    pub const READONLY: u32 = 1 << 1;
    /// The command may grow memory use (refused under `maxmemory`).
    pub const DENYOOM: u32 = 1 << 2;
    /// Administrative command.
    pub const ADMIN: u32 = 1 << 3;
    /// Pub/sub command.
    pub const PUBSUB: u32 = 1 << 4;
    /// Not allowed inside scripts.
    pub const NOSCRIPT: u32 = 1 << 5;
    /// May block the client.
    pub const BLOCKING: u32 = 1 << 6;
    /// Allowed while the server loads its dataset.
    pub const LOADING: u32 = 1 << 7;
    /// Allowed on a replica with stale data.
    pub const STALE: u32 = 1 << 8;
    /// Not shown by MONITOR.
    pub const SKIP_MONITOR: u32 = 1 << 9;
    /// Not logged by SLOWLOG.
    pub const SKIP_SLOWLOG: u32 = 1 << 10;
    /// O(1) or O(log N).
    pub const FAST: u32 = 1 << 11;
    /// Allowed before authentication.
    pub const NO_AUTH: u32 = 1 << 12;
    /// May replicate even though it is not a write.
    pub const MAY_REPLICATE: u32 = 1 << 13;
    /// Keys are optional.
    pub const NO_MANDATORY_KEYS: u32 = 1 << 14;
    /// Refused inside MULTI.
    pub const NO_MULTI: u32 = 1 << 15;
    /// Key positions depend on the arguments (key specs needed).
    pub const MOVABLEKEYS: u32 = 1 << 16;
    /// Allowed while a script is busy.
    pub const ALLOW_BUSY: u32 = 1 << 17;
    /// Allowed during async loading.
    pub const NO_ASYNC_LOADING: u32 = 1 << 18;
    /// Protected command (DEBUG, MODULE).
    pub const PROTECTED: u32 = 1 << 19;
    /// Allowed on a cluster node for a slot being imported (after ASKING).
    pub const ASKING: u32 = 1 << 20;

    /// Flag names as `COMMAND INFO` prints them, with their bits.
    pub const NAMES: &[(&str, u32)] = &[
        ("write", WRITE),
        ("readonly", READONLY),
        ("denyoom", DENYOOM),
        ("admin", ADMIN),
        ("pubsub", PUBSUB),
        ("noscript", NOSCRIPT),
        ("blocking", BLOCKING),
        ("loading", LOADING),
        ("stale", STALE),
        ("skip_monitor", SKIP_MONITOR),
        ("skip_slowlog", SKIP_SLOWLOG),
        ("fast", FAST),
        ("no_auth", NO_AUTH),
        ("may_replicate", MAY_REPLICATE),
        ("no_mandatory_keys", NO_MANDATORY_KEYS),
        ("no_multi", NO_MULTI),
        ("movablekeys", MOVABLEKEYS),
        ("allow_busy", ALLOW_BUSY),
        ("no_async_loading", NO_ASYNC_LOADING),
        ("protected", PROTECTED),
        ("asking", ASKING),
    ];
}

/// Where a key spec starts looking for keys (`begin_search`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BeginSearch {
    /// Keys start at this argument index.
    Index(u16),
    /// Keys start after this keyword, searched from `start_from` (negative: from the end,
    /// backwards).
    Keyword {
        /// The keyword, upper case, e.g. `STREAMS`.
        keyword: &'static str,
        /// Where the search starts.
        start_from: i16,
    },
    /// Only the command's own logic knows (e.g. SORT's STORE).
    Unknown,
}

/// How a key spec finds keys once it knows where they start (`find_keys`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FindKeys {
    /// Every `step`-th argument up to `last_key` (relative; negative counts from the end,
    /// divided by `limit` when that is non-zero).
    Range {
        /// Last key relative to the first (negative: from the end).
        last_key: i16,
        /// Distance between keys.
        step: u16,
        /// When `last_key` is negative, only 1/limit of the remaining arguments are keys.
        limit: u16,
    },
    /// The number of keys is in an argument.
    Keynum {
        /// Index of the count, relative to the begin position.
        keynum_idx: u16,
        /// Index of the first key, relative to the begin position.
        first_key: u16,
        /// Distance between keys.
        step: u16,
    },
    /// Only the command's own logic knows.
    Unknown,
}

/// One key spec of a command, as `COMMAND INFO` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeySpec {
    /// Where keys start.
    pub begin: BeginSearch,
    /// How keys are found from there.
    pub find: FindKeys,
    /// Key spec flags (RO, RW, OW, RM, access, update, insert, delete, …) as their names.
    pub flags: &'static [&'static str],
}

/// One Redis command or subcommand, straight from `COMMAND INFO`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommandInfo {
    /// Lower-case name; subcommands are `container|sub`, e.g. `config|get`.
    pub name: &'static str,
    /// Redis arity: exact argument count when positive, a minimum when negative.
    pub arity: i16,
    /// Bits from [`flags`].
    pub flags: u32,
    /// Legacy first key index (0: no keys).
    pub first_key: i16,
    /// Legacy last key index (negative: from the end).
    pub last_key: i16,
    /// Legacy key step.
    pub step: i16,
    /// ACL categories (`COMMAND INFO` field 7, without the `@`).
    pub acl_categories: &'static [&'static str],
    /// Key specs, in Redis's order.
    pub key_specs: &'static [KeySpec],
    /// Subcommands, for container commands like CONFIG and CLIENT.
    pub subcommands: &'static [CommandInfo],
}

impl CommandInfo {
    /// Whether the command has this flag bit.
    pub fn has(&self, flag: u32) -> bool {
        self.flags & flag != 0
    }

    /// Whether `argc` arguments (name included) satisfy the arity.
    pub fn arity_ok(&self, argc: usize) -> bool {
        let arity = i64::from(self.arity);
        let argc = argc as i64;
        if arity >= 0 {
            argc == arity
        } else {
            argc >= -arity
        }
    }

    /// Why Redis refuses `req` before running it or queueing it in a transaction: a wrong
    /// number of arguments, in Redis's words (`COMMAND INFO` names a subcommand
    /// `container|sub`, and so does Redis's error).
    pub fn arity_error(&self, req: &Request<'_>) -> Option<String> {
        (!self.arity_ok(req.len()))
            .then(|| format!("wrong number of arguments for '{}' command", self.name))
    }

    /// Why Redis refuses `req` when it runs it: argument rules beyond the arity that the
    /// proxy must check itself because it splits the command (MSET's key/value pairs). Inside
    /// MULTI Redis queues such a command and reports this error in EXEC's reply, so callers
    /// check it only for commands about to run.
    pub fn run_error(&self, req: &Request<'_>) -> Option<String> {
        let paired = matches!(self.name, "mset" | "msetnx");
        (paired && req.len().is_multiple_of(2))
            .then(|| format!("wrong number of arguments for '{}' command", self.name))
    }

    /// Indexes of the key arguments of `req`, per the key specs, in the order Redis lists them.
    /// Specs with unknown begin or find rules are skipped; commands that rely on them get a
    /// handler of their own.
    ///
    /// A spec whose keys fall outside the arguments (a `numkeys` larger than what follows, or
    /// zero) makes the whole request keyless, as in Redis: its cluster routing then finds no
    /// keys, and the command's own error (`Number of keys can't be greater than number of
    /// args`, `syntax error`) comes from whichever node runs it.
    pub fn key_indexes(&self, req: &Request<'_>, out: &mut Vec<usize>) {
        let start = out.len();
        if !self.push_key_indexes(req, out) {
            out.truncate(start);
        }
    }

    /// [`CommandInfo::key_indexes`]; `false` when a spec is out of bounds.
    fn push_key_indexes(&self, req: &Request<'_>, out: &mut Vec<usize>) -> bool {
        let argc = req.len();
        for spec in self.key_specs {
            let first = match spec.begin {
                BeginSearch::Index(i) => usize::from(i),
                BeginSearch::Keyword {
                    keyword,
                    start_from,
                } => match find_keyword(req, keyword, start_from) {
                    Some(found) => found + 1,
                    None => continue,
                },
                BeginSearch::Unknown => continue,
            };
            let (first, last, step) = match spec.find {
                FindKeys::Range {
                    last_key,
                    step,
                    limit,
                } => {
                    let last = if last_key >= 0 {
                        first as i64 + i64::from(last_key)
                    } else if limit == 0 {
                        argc as i64 + i64::from(last_key)
                    } else {
                        first as i64
                            + ((argc as i64 - first as i64) / i64::from(limit)
                                + i64::from(last_key))
                    };
                    (first, last, usize::from(step))
                }
                FindKeys::Keynum {
                    keynum_idx,
                    first_key,
                    step,
                } => {
                    let count = req
                        .arg(first + usize::from(keynum_idx))
                        .and_then(|a| std::str::from_utf8(a).ok())
                        .and_then(|a| a.parse::<i64>().ok())
                        .filter(|&n| n >= 0);
                    let Some(count) = count else { return false };
                    let start = first + usize::from(first_key);
                    (
                        start,
                        start as i64 + (count - 1) * i64::from(step),
                        usize::from(step),
                    )
                }
                FindKeys::Unknown => continue,
            };
            // Redis's bounds check (`getKeysUsingKeySpecs`): out of bounds is a syntax error
            // the command reports, and there are no keys.
            if last >= argc as i64 || last < first as i64 || first >= argc {
                return false;
            }
            let mut i = first;
            while step > 0 && (i as i64) <= last {
                out.push(i);
                i += step;
            }
        }
        true
    }
}

/// Finds `keyword` among the arguments the way Redis's keyword begin-search does.
fn find_keyword(req: &Request<'_>, keyword: &str, start_from: i16) -> Option<usize> {
    let argc = req.len() as i64;
    let (mut i, end, dir): (i64, i64, i64) = if start_from >= 0 {
        (i64::from(start_from), argc - 1, 1)
    } else {
        (argc + i64::from(start_from), 0, -1)
    };
    while (dir > 0 && i <= end) || (dir < 0 && i > end) {
        let arg = usize::try_from(i).ok().and_then(|i| req.arg(i))?;
        if arg.eq_ignore_ascii_case(keyword.as_bytes()) {
            return usize::try_from(i).ok();
        }
        i += dir;
    }
    None
}

/// A command found in the table, with the proxy's handling.
#[derive(Debug, Clone, Copy)]
pub struct Command {
    /// What Redis says about the command (the subcommand's entry for containers).
    pub info: &'static CommandInfo,
    /// What the proxy does with it.
    pub handling: Handling,
}

/// `CLIENT SETINFO` appeared after Redis 7.0, but client libraries send it on connect.
static CLIENT_SETINFO: CommandInfo = CommandInfo {
    name: "client|setinfo",
    arity: -4,
    flags: flags::NOSCRIPT | flags::LOADING | flags::STALE,
    first_key: 0,
    last_key: 0,
    step: 0,
    acl_categories: &["slow", "connection"],
    key_specs: &[],
    subcommands: &[],
};

/// Every command and subcommand by full lower-case name, with its handling. Looked up once
/// per request, so it uses a fast fixed hasher: the table never changes after start, so
/// chosen names can't make it degrade.
static BY_NAME: LazyLock<HashMap<&'static str, Command, foldhash::fast::FixedState>> =
    LazyLock::new(|| {
        let mut map = HashMap::default();
        let mut add = |info: &'static CommandInfo| {
            map.insert(
                info.name,
                Command {
                    info,
                    handling: handling_for(info),
                },
            );
        };
        for info in COMMANDS {
            add(info);
            for sub in info.subcommands {
                add(sub);
            }
        }
        add(&CLIENT_SETINFO);
        map
    });

/// Longest command name looked up (`container|subcommand`); anything longer is unknown.
const MAX_NAME: usize = 64;

/// Looks up a request's command, descending into the subcommand for container commands.
/// `None` for commands Redis 7.0 doesn't know.
pub fn lookup(req: &Request<'_>) -> Option<Command> {
    let name = req.arg(0)?;
    let mut buf = [0u8; MAX_NAME];
    let top = lower_into(name, &mut buf)?;
    let Some(&cmd) = BY_NAME.get(top) else {
        // Newer than the built-in table: the upstream's own entry, if it has one.
        return learned::get(top);
    };
    if cmd.info.subcommands.is_empty() {
        return Some(cmd);
    }
    // A container without a subcommand argument: let Redis's arity error speak.
    let Some(sub) = req.arg(1) else {
        return Some(cmd);
    };
    let n = name.len();
    if n + 1 + sub.len() > MAX_NAME {
        return None;
    }
    buf[n] = b'|';
    let full = lower_into(sub, &mut buf[n + 1..]).map(|s| s.len())?;
    let full = std::str::from_utf8(&buf[..n + 1 + full]).ok()?;
    BY_NAME.get(full).copied().or_else(|| learned::get(full))
}

/// Redis's error for a subcommand the table doesn't know, of a command it does (`CLIENT
/// NO-TOUCH`: newer servers', some of which change the connection they run on), so that the
/// proxy answers it and never sends it on a shared connection.
pub fn unknown_subcommand(req: &Request<'_>) -> Option<String> {
    let name = req.arg(0)?;
    let sub = req.arg(1)?;
    let mut buf = [0u8; MAX_NAME];
    let top = *BY_NAME.get(lower_into(name, &mut buf)?)?;
    if top.info.subcommands.is_empty() || lookup(req).is_some() {
        return None;
    }
    Some(format!(
        "unknown subcommand '{}'. Try {} HELP.",
        String::from_utf8_lossy(sub),
        top.info.name.to_uppercase()
    ))
}

/// Writes the ASCII-lower-case form of `name` into `buf`; `None` if it doesn't fit or isn't
/// UTF-8 (no command name is either).
fn lower_into<'b>(name: &[u8], buf: &'b mut [u8]) -> Option<&'b str> {
    let dst = buf.get_mut(..name.len())?;
    for (d, s) in dst.iter_mut().zip(name) {
        *d = s.to_ascii_lowercase();
    }
    std::str::from_utf8(dst).ok()
}

/// Every command and subcommand of the table.
pub fn all() -> impl Iterator<Item = &'static Command> {
    BY_NAME.values()
}

/// Looks up a command by its full lower-case name (`get`, `config|get`).
pub fn by_name(name: &str) -> Option<Command> {
    BY_NAME.get(name).copied()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resp::{Limits, RequestParser};

    /// Parses `line` as an inline command and hands it to `f`.
    fn with_request<R>(line: &str, f: impl FnOnce(&Request<'_>) -> R) -> R {
        let input = format!("{line}\r\n");
        let mut p = RequestParser::new(Limits::default());
        let n = p.parse(input.as_bytes()).unwrap().unwrap();
        f(&p.request(&input.as_bytes()[..n]))
    }

    fn keys_of(line: &str) -> Vec<String> {
        with_request(line, |req| {
            let cmd = lookup(req).unwrap();
            let mut idx = Vec::new();
            cmd.info.key_indexes(req, &mut idx);
            idx.iter()
                .map(|&i| String::from_utf8(req.arg(i).unwrap().to_vec()).unwrap())
                .collect()
        })
    }

    #[test]
    fn key_positions_follow_key_specs() {
        assert_eq!(keys_of("GET a"), ["a"]);
        assert_eq!(keys_of("mset a 1 b 2 c 3"), ["a", "b", "c"]);
        assert_eq!(keys_of("MGET a b c"), ["a", "b", "c"]);
        assert_eq!(keys_of("EVAL script 2 k1 k2 arg"), ["k1", "k2"]);
        assert_eq!(
            keys_of("ZUNIONSTORE dst 2 a b WEIGHTS 1 2"),
            ["dst", "a", "b"]
        );
        assert_eq!(keys_of("XREAD COUNT 2 STREAMS s1 s2 0 0"), ["s1", "s2"]);
        assert_eq!(keys_of("RENAME a b"), ["a", "b"]);
        assert_eq!(keys_of("PING"), Vec::<String>::new());
        assert_eq!(keys_of("OBJECT ENCODING k"), ["k"]);
    }

    #[test]
    fn lookup_is_case_insensitive_and_finds_subcommands() {
        let input = b"*3\r\n$6\r\nConFig\r\n$3\r\nget\r\n$1\r\n*\r\n";
        let mut p = RequestParser::new(Limits::default());
        let n = p.parse(input).unwrap().unwrap();
        let cmd = lookup(&p.request(&input[..n])).unwrap();
        assert_eq!(cmd.info.name, "config|get");
        assert_eq!(cmd.handling, Handling::Forward);
    }

    #[test]
    fn handling_policy() {
        let h = |name| by_name(name).unwrap().handling;
        assert_eq!(h("get"), Handling::Forward);
        assert_eq!(h("flushall"), Handling::Forward);
        assert_eq!(h("ping"), Handling::Local(Local::Ping));
        assert_eq!(h("client|setname"), Handling::Local(Local::ClientSetName));
        assert_eq!(h("client|kill"), Handling::Local(Local::ClientKill));
        assert_eq!(h("client|pause"), Handling::Local(Local::ClientPause));
        assert_eq!(h("client|unblock"), Handling::Local(Local::ClientUnblock));
        assert_eq!(h("client|tracking"), Handling::Local(Local::ClientTracking));
        assert_eq!(h("acl|whoami"), Handling::Local(Local::AclWhoami));
        assert_eq!(h("acl|setuser"), Handling::Unsupported);
        assert_eq!(h("slowlog|get"), Handling::Forward);
        assert_eq!(h("blpop"), Handling::Blocking);
        assert_eq!(h("wait"), Handling::Blocking);
        assert_eq!(h("multi"), Handling::Transaction);
        assert_eq!(h("subscribe"), Handling::PubSub);
        assert_eq!(h("shutdown"), Handling::Unsupported);
        assert_eq!(h("monitor"), Handling::Local(Local::Monitor));
        assert_eq!(h("config|set"), Handling::Forward);
        // Only DEBUG OBJECT gets past `Session::refusal`.
        assert_eq!(h("debug"), Handling::Forward);
        assert!(by_name("client|setinfo").is_some());
    }

    fn errors_of(line: &str) -> (Option<String>, Option<String>) {
        with_request(line, |req| {
            let info = lookup(req).unwrap().info;
            (info.arity_error(req), info.run_error(req))
        })
    }

    #[test]
    fn out_of_bounds_key_specs_mean_no_keys_as_in_redis() {
        // numkeys larger than what follows, zero, negative or not a number.
        assert_eq!(keys_of("EVAL s 3 a b"), Vec::<String>::new());
        assert_eq!(keys_of("EVAL s 0"), Vec::<String>::new());
        assert_eq!(keys_of("EVAL s -1 a"), Vec::<String>::new());
        assert_eq!(keys_of("EVAL s x a"), Vec::<String>::new());
        assert_eq!(keys_of("ZUNIONSTORE dst 3 a b"), Vec::<String>::new());
        assert_eq!(keys_of("ZUNIONSTORE dst 0 a"), Vec::<String>::new());
        assert_eq!(keys_of("SINTERCARD 2 a"), Vec::<String>::new());
        // An odd list of streams: Redis finds no keys either.
        assert_eq!(keys_of("XREAD STREAMS a"), Vec::<String>::new());
        assert_eq!(keys_of("XREAD COUNT 1 STREAMS"), Vec::<String>::new());
        // In bounds, the keys as before.
        assert_eq!(keys_of("EVAL s 2 a b"), ["a", "b"]);
        assert_eq!(keys_of("ZUNIONSTORE dst 1 a"), ["dst", "a"]);
    }

    #[test]
    fn arity_and_pairing_errors_use_redis_words() {
        let wrong = |name: &str| Some(format!("wrong number of arguments for '{name}' command"));
        assert_eq!(errors_of("GET"), (wrong("get"), None));
        assert_eq!(errors_of("GET a b"), (wrong("get"), None));
        assert_eq!(errors_of("CONFIG GET"), (wrong("config|get"), None));
        assert_eq!(errors_of("MSET a"), (wrong("mset"), wrong("mset")));
        // The corruption case: three arguments pass the arity, not the pairing.
        assert_eq!(errors_of("MSET a b c"), (None, wrong("mset")));
        assert_eq!(errors_of("MSETNX a b c"), (None, wrong("msetnx")));
        assert_eq!(errors_of("MSET a b c d"), (None, None));
        assert_eq!(errors_of("MGET a b c"), (None, None));
    }

    #[test]
    fn arity() {
        let get = by_name("get").unwrap().info;
        assert!(get.arity_ok(2) && !get.arity_ok(3));
        let mset = by_name("mset").unwrap().info;
        assert!(mset.arity_ok(3) && mset.arity_ok(5) && !mset.arity_ok(2));
    }
}
