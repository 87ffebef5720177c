//! INFO as the proxy gives it. On a cluster the request goes to every master and their
//! sections are combined into the one reply a single Redis would give; a standalone
//! server's reply passes through this too, for the proxy's `Server` and `Clients` fields. `Server` is the first master's
//! with the proxy's identity; `Cluster` is the proxy's view of the cluster (it presents a
//! standalone server); `Keyspace` adds up each database's keys; `Clients` counts the
//! proxy's own clients. Every other field is combined by one rule per field ([`combine`]):
//! counters and sizes are added up, ratios, flags and times take the largest, uptimes the
//! smallest, text the first master's; `*_human` sizes are written again from the sum, and
//! `usec_per_call` from the summed `usec` and `calls`.

use std::collections::BTreeMap;
use std::rc::Rc;

use bytes::Bytes;

use super::merge::frame;
use crate::cluster::SlotMap;
use crate::resp::Frame;

/// What the proxy writes into a cluster's INFO itself.
pub(super) struct InfoCtx {
    /// The map, for the cluster section; `None` for a standalone server, whose own
    /// sections pass through.
    pub(super) map: Option<Rc<SlotMap>>,
    /// The upstream's name.
    pub(super) upstream: String,
    /// The client speaks RESP3: INFO is a verbatim string.
    pub(super) resp3: bool,
    /// The service's connected clients (all workers).
    pub(super) connected_clients: usize,
    /// The service's `max_clients`.
    pub(super) max_clients: usize,
}

/// One INFO section: its name and its `field:value` lines in order.
type Section = (String, Vec<(String, String)>);

/// Parses an INFO text into sections.
fn sections(text: &str) -> Vec<Section> {
    let mut out: Vec<Section> = Vec::new();
    for line in text.lines() {
        if let Some(name) = line.strip_prefix("# ") {
            out.push((name.trim().to_owned(), Vec::new()));
        } else if let (Some((field, value)), Some(last)) = (line.split_once(':'), out.last_mut()) {
            last.1.push((field.to_owned(), value.to_owned()));
        }
    }
    out
}

/// The merged INFO of the masters' `parts`, as the reply to give.
pub(super) fn info(ctx: &InfoCtx, parts: &[Bytes]) -> Bytes {
    let texts: Vec<Vec<Section>> = parts
        .iter()
        .filter_map(|p| match frame(p) {
            Ok(Frame::Bulk(b)) => Some(String::from_utf8_lossy(&b).into_owned()),
            // RESP3: a verbatim string, `txt:` first.
            Ok(Frame::Verbatim(b)) => {
                Some(String::from_utf8_lossy(b.get(4..).unwrap_or_default()).into_owned())
            }
            _ => None,
        })
        .map(|t| sections(&t))
        .collect();
    let mut names: Vec<&str> = Vec::new();
    for s in texts.iter().flatten() {
        if !names.contains(&s.0.as_str()) {
            names.push(&s.0);
        }
    }
    let mut out = String::new();
    for name in names {
        let of_name: Vec<&[(String, String)]> = texts
            .iter()
            .filter_map(|t| t.iter().find(|s| s.0 == name).map(|s| s.1.as_slice()))
            .collect();
        let fields = match name {
            "Server" => server(&of_name),
            "Cluster" if ctx.map.is_some() => cluster(ctx),
            "Keyspace" if ctx.map.is_some() => keyspace(&of_name),
            "Clients" => clients(ctx, &of_name),
            _ => combine_all(&of_name),
        };
        if !out.is_empty() {
            out.push_str("\r\n");
        }
        out.push_str(&format!("# {name}\r\n"));
        for (f, v) in fields {
            out.push_str(&format!("{f}:{v}\r\n"));
        }
    }
    if ctx.resp3 {
        Frame::Verbatim(Bytes::from(format!("txt:{out}"))).to_bytes()
    } else {
        Frame::Bulk(Bytes::from(out)).to_bytes()
    }
}

/// The first master's server section, as the proxy: `redis_mode` standalone, the proxy's
/// process id, a `proxy` line, and the youngest master's uptime.
fn server(parts: &[&[(String, String)]]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (f, v) in parts.first().copied().unwrap_or_default() {
        match f.as_str() {
            uptime if uptime.starts_with("uptime") => {
                let values: Vec<&str> = parts
                    .iter()
                    .filter_map(|p| p.iter().find(|(k, _)| k == f).map(|(_, v)| v.as_str()))
                    .collect();
                let min = combine_numbers(Rule::Min, &values).unwrap_or_else(|| v.clone());
                out.push((f.clone(), min));
            }
            // Valkey names it `server_mode`.
            "redis_mode" | "server_mode" => {
                out.push((f.clone(), "standalone".to_owned()));
                out.push((
                    "proxy".to_owned(),
                    format!("redis-intercept {}", env!("CARGO_PKG_VERSION")),
                ));
            }
            "process_id" => out.push((f.clone(), std::process::id().to_string())),
            _ => out.push((f.clone(), v.clone())),
        }
    }
    out
}

/// The cluster as the proxy shows it: not a cluster, and the upstream's state.
fn cluster(ctx: &InfoCtx) -> Vec<(String, String)> {
    let Some(map) = &ctx.map else {
        return Vec::new();
    };
    [
        ("cluster_enabled", "0".to_owned()),
        ("upstream", ctx.upstream.clone()),
        (
            "upstream_cluster_state",
            if map.is_complete() { "ok" } else { "fail" }.to_owned(),
        ),
        ("upstream_cluster_slots_covered", map.covered().to_string()),
        (
            "upstream_cluster_masters",
            map.serving_masters().len().to_string(),
        ),
    ]
    .into_iter()
    .map(|(f, v)| (f.to_owned(), v))
    .collect()
}

/// Each database's keys and expires added up; `avg_ttl` weighted by expires.
fn keyspace(parts: &[&[(String, String)]]) -> Vec<(String, String)> {
    // db -> (keys, expires, avg_ttl × expires)
    let mut dbs: BTreeMap<String, (u64, u64, u128)> = BTreeMap::new();
    for (db, fields) in parts.iter().flat_map(|p| p.iter()) {
        let mut keys = 0;
        let mut expires = 0;
        let mut ttl: u64 = 0;
        for kv in fields.split(',') {
            match kv.split_once('=') {
                Some(("keys", v)) => keys = v.parse().unwrap_or(0),
                Some(("expires", v)) => expires = v.parse().unwrap_or(0),
                Some(("avg_ttl", v)) => ttl = v.parse().unwrap_or(0),
                _ => {}
            }
        }
        let e = dbs.entry(db.clone()).or_default();
        e.0 += keys;
        e.1 += expires;
        e.2 += u128::from(ttl) * u128::from(expires);
    }
    dbs.into_iter()
        .map(|(db, (keys, expires, ttl))| {
            let avg = ttl.checked_div(u128::from(expires)).unwrap_or(0);
            (db, format!("keys={keys},expires={expires},avg_ttl={avg}"))
        })
        .collect()
}

/// The clients section: the masters' fields combined, with the proxy's own count of
/// connected clients and its limit.
fn clients(ctx: &InfoCtx, parts: &[&[(String, String)]]) -> Vec<(String, String)> {
    let mut out = combine_all(parts);
    for (f, v) in &mut out {
        match f.as_str() {
            "connected_clients" => *v = ctx.connected_clients.to_string(),
            "maxclients" => *v = ctx.max_clients.to_string(),
            _ => {}
        }
    }
    out
}

/// Every field of a section, combined over the parts, in the first part's order (fields
/// only later parts have come after).
fn combine_all(parts: &[&[(String, String)]]) -> Vec<(String, String)> {
    let mut order: Vec<&str> = Vec::new();
    for (f, _) in parts.iter().flat_map(|p| p.iter()) {
        if !order.contains(&f.as_str()) {
            order.push(f);
        }
    }
    let mut out: Vec<(String, String)> = order
        .iter()
        .map(|f| {
            let values: Vec<&str> = parts
                .iter()
                .filter_map(|p| p.iter().find(|(k, _)| k == f).map(|(_, v)| v.as_str()))
                .collect();
            ((*f).to_owned(), combine(f, &values))
        })
        .collect();
    // Human-readable sizes, from the combined byte counts.
    let bytes: BTreeMap<String, String> = out.iter().cloned().collect();
    for (f, v) in &mut out {
        if let Some(n) = f
            .strip_suffix("_human")
            .and_then(|base| bytes.get(base))
            .and_then(|b| b.parse::<u64>().ok())
        {
            *v = human(n);
        }
    }
    out
}

/// How the values of one field combine.
#[derive(Debug, PartialEq, Eq)]
enum Rule {
    /// Counters and sizes.
    Sum,
    /// Ratios, flags, times and offsets: adding them up would lie.
    Max,
    /// Uptimes: the cluster has been up as long as its youngest master.
    Min,
}

/// The rule for `field`.
fn rule(field: &str) -> Rule {
    const MAX: &[&str] = &[
        "ratio",
        "perc",
        "in_progress",
        "enabled",
        "loading",
        "lru_clock",
        "io_threads",
        "repl_offset",
        "_last_",
        "time_sec",
        "_status",
        "p50",
        "p99",
        "p90",
        "p999",
        "maxmemory",
        "mem_clients",
        "max_input",
        "max_output",
    ];
    if field.starts_with("uptime") {
        Rule::Min
    } else if MAX.iter().any(|m| field.contains(m))
        || field.starts_with('p') && field[1..].starts_with(|c: char| c.is_ascii_digit())
    {
        Rule::Max
    } else {
        Rule::Sum
    }
}

/// One field's values over the masters combined (see [`rule`]): numbers by the rule, text as
/// the first master has it, `k=v,…` lists (commandstats, errorstats) key by key.
fn combine(field: &str, values: &[&str]) -> String {
    let Some(first) = values.first() else {
        return String::new();
    };
    if first.contains('=') {
        return combine_pairs(values);
    }
    combine_numbers(rule(field), values).unwrap_or_else(|| (*first).to_owned())
}

/// Numbers combined by `rule`, written as Redis writes them (integers, or as many decimals
/// as the values had); `None` if any isn't a number.
fn combine_numbers(rule: Rule, values: &[&str]) -> Option<String> {
    if let Ok(ints) = values
        .iter()
        .map(|v| v.parse::<i64>())
        .collect::<Result<Vec<_>, _>>()
    {
        let n = match rule {
            Rule::Sum => ints.iter().fold(0i64, |a, b| a.saturating_add(*b)),
            Rule::Max => ints.iter().copied().max().unwrap_or(0),
            Rule::Min => ints.iter().copied().min().unwrap_or(0),
        };
        return Some(n.to_string());
    }
    let floats = values
        .iter()
        .map(|v| v.parse::<f64>())
        .collect::<Result<Vec<_>, _>>()
        .ok()?;
    let decimals = values
        .iter()
        .map(|v| v.split_once('.').map_or(0, |(_, d)| d.len()))
        .max()
        .unwrap_or(0);
    let n = match rule {
        Rule::Sum => floats.iter().sum(),
        Rule::Max => floats.iter().copied().fold(f64::MIN, f64::max),
        Rule::Min => floats.iter().copied().fold(f64::MAX, f64::min),
    };
    Some(format!("{n:.decimals$}"))
}

/// `k=v,…` lists combined key by key, each by its own rule; `usec_per_call` again from the
/// combined `usec` and `calls`.
fn combine_pairs(values: &[&str]) -> String {
    let mut order: Vec<&str> = Vec::new();
    let mut by_key: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for v in values {
        for kv in v.split(',') {
            if let Some((k, v)) = kv.split_once('=') {
                if !order.contains(&k) {
                    order.push(k);
                }
                by_key.entry(k).or_default().push(v);
            }
        }
    }
    let mut combined: Vec<(&str, String)> = order
        .iter()
        .map(|k| {
            let vs = by_key.get(k).map(Vec::as_slice).unwrap_or_default();
            (*k, combine(k, vs))
        })
        .collect();
    let get = |c: &[(&str, String)], k: &str| {
        c.iter()
            .find(|(n, _)| *n == k)
            .and_then(|(_, v)| v.parse::<f64>().ok())
    };
    if let (Some(usec), Some(calls)) = (get(&combined, "usec"), get(&combined, "calls")) {
        for (k, v) in &mut combined {
            if *k == "usec_per_call" {
                *v = format!("{:.2}", if calls > 0.0 { usec / calls } else { 0.0 });
            }
        }
    }
    combined
        .into_iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// A byte count as Redis writes its `*_human` fields.
fn human(n: u64) -> String {
    const UNITS: [(u64, &str); 5] = [
        (1 << 50, "P"),
        (1 << 40, "T"),
        (1 << 30, "G"),
        (1 << 20, "M"),
        (1 << 10, "K"),
    ];
    for (size, unit) in UNITS {
        if n >= size {
            return format!("{:.2}{unit}", n as f64 / size as f64);
        }
    }
    format!("{n}B")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(text: &str) -> Bytes {
        Frame::Bulk(Bytes::copy_from_slice(text.as_bytes())).to_bytes()
    }

    fn ctx() -> InfoCtx {
        InfoCtx {
            map: Some(Rc::new(SlotMap::empty())),
            upstream: "main".into(),
            resp3: false,
            connected_clients: 3,
            max_clients: 100,
        }
    }

    #[test]
    fn fields_combine_by_their_rule() {
        let a = "# Server\r\nredis_version:7.0.15\r\nredis_mode:cluster\r\nuptime_in_seconds:50\r\n\r\n# Memory\r\nused_memory:1048576\r\nused_memory_human:1.00M\r\nmem_fragmentation_ratio:1.50\r\nmaxmemory_policy:noeviction\r\n\r\n# Commandstats\r\ncmdstat_get:calls=2,usec=10,usec_per_call=5.00,rejected_calls=0,failed_calls=0\r\n\r\n# Clients\r\nconnected_clients:9\r\nblocked_clients:1\r\n\r\n# Keyspace\r\ndb0:keys=3,expires=1,avg_ttl=100\r\n";
        let b = "# Server\r\nredis_version:7.0.15\r\nredis_mode:cluster\r\nuptime_in_seconds:40\r\n\r\n# Memory\r\nused_memory:2097152\r\nused_memory_human:2.00M\r\nmem_fragmentation_ratio:2.25\r\nmaxmemory_policy:noeviction\r\n\r\n# Commandstats\r\ncmdstat_get:calls=3,usec=5,usec_per_call=1.67,rejected_calls=0,failed_calls=1\r\n\r\n# Clients\r\nconnected_clients:7\r\nblocked_clients:2\r\n\r\n# Keyspace\r\ndb0:keys=2,expires=1,avg_ttl=300\r\n";
        let out = info(&ctx(), &[part(a), part(b)]);
        let Ok(Frame::Bulk(text)) = frame(&out) else {
            panic!("{out:?}");
        };
        let text = String::from_utf8_lossy(&text);
        for want in [
            "# Server\r\nredis_version:7.0.15\r\nredis_mode:standalone\r\nproxy:redis-intercept",
            "uptime_in_seconds:40\r\n",
            "\r\n\r\n# Memory\r\nused_memory:3145728\r\nused_memory_human:3.00M\r\nmem_fragmentation_ratio:2.25\r\nmaxmemory_policy:noeviction\r\n",
            "cmdstat_get:calls=5,usec=15,usec_per_call=3.00,rejected_calls=0,failed_calls=1\r\n",
            "# Clients\r\nconnected_clients:3\r\nblocked_clients:3\r\n",
            "# Keyspace\r\ndb0:keys=5,expires=2,avg_ttl=200\r\n",
        ] {
            assert!(text.contains(want), "{want:?} in {text}");
        }
        assert!(
            !text.ends_with("\r\n\r\n"),
            "Redis ends with the last field's line"
        );
    }

    #[test]
    fn resp3_clients_get_a_verbatim_string() {
        let mut c = ctx();
        c.resp3 = true;
        let out = info(&c, &[part("# Cluster\r\ncluster_enabled:1\r\n")]);
        assert!(out.starts_with(b"="), "{out:?}");
        assert!(String::from_utf8_lossy(&out).contains("txt:# Cluster\r\ncluster_enabled:0\r\n"));
    }

    #[test]
    fn sizes_are_written_as_redis_does() {
        assert_eq!(human(512), "512B");
        assert_eq!(human(1536), "1.50K");
        assert_eq!(human(3 << 30), "3.00G");
    }
}
