//! Stale programs of ours (left by a crashed agent that used the legacy attach call, which
//! outlives its process), found with bpftool and detached at start.

use std::path::Path;

use tracing::warn;

/// Detaches programs of ours that the legacy attach call left on `cgroup` (they outlive the
/// process that attached them). Links of a running agent can't be detached this way and stay.
/// Uses `bpftool`; without it, says so and goes on.
pub(super) fn remove_stale(cgroup: &Path) {
    let out = std::process::Command::new("bpftool")
        .args(["-j", "cgroup", "show"])
        .arg(cgroup)
        .output();
    let out = match out {
        Ok(o) if o.status.success() => o,
        Ok(_) | Err(_) => {
            warn!(cgroup = %cgroup.display(), "bpftool unavailable: not checking for stale programs");
            return;
        }
    };
    let text = String::from_utf8_lossy(&out.stdout);
    for (id, attach_type, name) in stale_entries(&text) {
        if !name.starts_with("redis_intercept") {
            continue;
        }
        let detached = std::process::Command::new("bpftool")
            .args(["cgroup", "detach"])
            .arg(cgroup)
            .args([attach_type.as_str(), "id", &id.to_string()])
            .status()
            .is_ok_and(|s| s.success());
        if detached {
            warn!(cgroup = %cgroup.display(), program = %name, id, "detached a stale program left by an earlier run");
        }
    }
}

/// (id, attach type, name) of each program in `bpftool -j cgroup show` output.
pub(super) fn stale_entries(json: &str) -> Vec<(u64, String, String)> {
    // The output is a flat array of objects with scalar fields; pick the three we need.
    let mut out = Vec::new();
    for obj in json.split('{').skip(1) {
        let obj = obj.split('}').next().unwrap_or_default();
        let field = |key: &str| -> Option<String> {
            let at = obj.find(&format!("\"{key}\":"))? + key.len() + 3;
            let rest = obj[at..].trim_start();
            let value = if let Some(s) = rest.strip_prefix('"') {
                s.split('"').next()?.to_owned()
            } else {
                rest.split([',', '}']).next()?.trim().to_owned()
            };
            Some(value)
        };
        if let (Some(id), Some(kind), Some(name)) = (
            field("id").and_then(|i| i.parse().ok()),
            field("attach_type"),
            field("name"),
        ) {
            out.push((id, kind, name));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    pub(super) fn reads_bpftool_cgroup_show_json() {
        let json = r#"[{"id":42,"attach_type":"cgroup_inet4_connect","attach_flags":"","name":"redis_intercept_connect4"},{"id":7,"attach_type":"cgroup_inet6_connect","attach_flags":"multi","name":"other"}]"#;
        assert_eq!(
            stale_entries(json),
            [
                (
                    42,
                    "cgroup_inet4_connect".to_owned(),
                    "redis_intercept_connect4".to_owned()
                ),
                (7, "cgroup_inet6_connect".to_owned(), "other".to_owned())
            ]
        );
    }
}
