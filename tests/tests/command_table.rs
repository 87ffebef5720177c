//! The generated command table matches what a live redis-server reports in `COMMAND`.

use redis_intercept::command::{self, BeginSearch, CommandInfo, FindKeys, flags};
use redis_intercept::resp::Frame;
use redis_intercept_e2e::RedisServer;

fn text(f: &Frame) -> String {
    match f {
        Frame::Bulk(b) | Frame::Simple(b) => String::from_utf8_lossy(b).into_owned(),
        other => panic!("expected text, got {other:?}"),
    }
}

fn int(f: &Frame) -> i64 {
    match f {
        Frame::Integer(i) => *i,
        other => panic!("expected integer, got {other:?}"),
    }
}

fn items(f: &Frame) -> &[Frame] {
    match f {
        Frame::Array(v) | Frame::Set(v) => v,
        other => panic!("expected array, got {other:?}"),
    }
}

fn field<'a>(map: &'a [Frame], key: &str) -> &'a Frame {
    map.chunks(2)
        .find(|kv| text(&kv[0]) == key)
        .map(|kv| &kv[1])
        .unwrap_or_else(|| panic!("no field {key}"))
}

fn check(live: &Frame, ours: &CommandInfo) {
    let f = items(live);
    let name = text(&f[0]).to_lowercase();
    assert_eq!(ours.name, name);
    assert_eq!(i64::from(ours.arity), int(&f[1]), "{name}: arity");
    let mut bits = 0;
    for flag in items(&f[2]) {
        let flag = text(flag);
        let (_, bit) = flags::NAMES
            .iter()
            .find(|(n, _)| *n == flag)
            .unwrap_or_else(|| panic!("{name}: flag {flag} unknown to the table"));
        bits |= bit;
    }
    assert_eq!(ours.flags, bits, "{name}: flags");
    assert_eq!(i64::from(ours.first_key), int(&f[3]), "{name}: first key");
    assert_eq!(i64::from(ours.last_key), int(&f[4]), "{name}: last key");
    assert_eq!(i64::from(ours.step), int(&f[5]), "{name}: step");
    let specs = items(&f[8]);
    assert_eq!(ours.key_specs.len(), specs.len(), "{name}: key spec count");
    for (spec, live) in ours.key_specs.iter().zip(specs) {
        let live = items(live);
        let begin = items(field(live, "begin_search"));
        match spec.begin {
            BeginSearch::Index(i) => {
                assert_eq!(text(field(begin, "type")), "index", "{name}");
                assert_eq!(
                    i64::from(i),
                    int(field(items(field(begin, "spec")), "index")),
                    "{name}"
                );
            }
            BeginSearch::Keyword {
                keyword,
                start_from,
            } => {
                let s = items(field(begin, "spec"));
                assert_eq!(keyword, text(field(s, "keyword")), "{name}");
                assert_eq!(i64::from(start_from), int(field(s, "startfrom")), "{name}");
            }
            BeginSearch::Unknown => assert_eq!(text(field(begin, "type")), "unknown", "{name}"),
        }
        let find = items(field(live, "find_keys"));
        match spec.find {
            FindKeys::Range {
                last_key,
                step,
                limit,
            } => {
                let s = items(field(find, "spec"));
                assert_eq!(
                    (i64::from(last_key), i64::from(step), i64::from(limit)),
                    (
                        int(field(s, "lastkey")),
                        int(field(s, "keystep")),
                        int(field(s, "limit"))
                    ),
                    "{name}"
                );
            }
            FindKeys::Keynum {
                keynum_idx,
                first_key,
                step,
            } => {
                let s = items(field(find, "spec"));
                assert_eq!(
                    (i64::from(keynum_idx), i64::from(first_key), i64::from(step)),
                    (
                        int(field(s, "keynumidx")),
                        int(field(s, "firstkey")),
                        int(field(s, "keystep"))
                    ),
                    "{name}"
                );
            }
            FindKeys::Unknown => assert_eq!(text(field(find, "type")), "unknown", "{name}"),
        }
        let live_flags: Vec<String> = items(field(live, "flags")).iter().map(text).collect();
        assert_eq!(spec.flags, live_flags, "{name}: key spec flags");
    }
    let live_subs = f.get(9).map(items).unwrap_or(&[]);
    assert_eq!(
        ours.subcommands.len(),
        live_subs.len(),
        "{name}: subcommand count"
    );
    for sub in live_subs {
        let sub_name = text(&items(sub)[0]).to_lowercase();
        let ours_sub = ours
            .subcommands
            .iter()
            .find(|s| s.name == sub_name)
            .unwrap_or_else(|| panic!("subcommand {sub_name} missing from the table"));
        check(sub, ours_sub);
    }
}

#[test]
fn table_matches_live_command_info() {
    let server = RedisServer::start();
    let live = server.cmd(&["COMMAND"]);
    let live = items(&live);
    assert_eq!(
        live.len(),
        command::COMMANDS.len(),
        "command count differs: run `cargo xtask gen-commands`"
    );
    for entry in live {
        let name = text(&items(entry)[0]).to_lowercase();
        let ours = command::by_name(&name)
            .unwrap_or_else(|| panic!("{name} is missing: run `cargo xtask gen-commands`"));
        check(entry, ours.info);
    }
}
