//! `cargo xtask chaos`: the chaos scenarios (every end-to-end test named `chaos_…`), with a
//! pass/fail table. CI runs the fast ones with the other tests; this runs them all.

use std::process::Command;

use anyhow::{Result, bail};

use crate::setup::say;

/// Runs the scenarios (all of them, or only those not marked slow) one at a time, so they
/// don't compete for the machine, and prints a table.
pub fn chaos(root: &std::path::Path, all: bool) -> Result<()> {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root).args([
        "test",
        "-p",
        "redis-intercept-e2e",
        "chaos_",
        "--",
        "--test-threads",
        "1",
    ]);
    if all {
        cmd.arg("--include-ignored");
    }
    // The scenarios' timing checks hold on a machine that runs nothing else.
    cmd.env("REDIS_INTERCEPT_CHAOS_TIMING", "1");
    say(&format!(
        "running the chaos scenarios ({}), one at a time",
        if all { "all" } else { "the fast ones" }
    ));
    let out = cmd.output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let mut rows: Vec<(String, String)> = Vec::new();
    for line in stdout.lines() {
        let Some(rest) = line.strip_prefix("test ") else {
            continue;
        };
        let Some((name, result)) = rest.rsplit_once(" ... ") else {
            continue;
        };
        if name.contains("chaos_") {
            rows.push((name.trim().to_owned(), result.trim().to_owned()));
        }
    }
    println!("\n{:<72} result", "scenario");
    for (name, result) in &rows {
        let shown = match result.as_str() {
            "ok" => "pass",
            r if r.starts_with("ignored") => "skipped (slow: --all)",
            _ => "FAIL",
        };
        println!("{name:<72} {shown}");
    }
    let failed = rows
        .iter()
        .filter(|(_, r)| r != "ok" && !r.starts_with("ignored"))
        .count();
    if !out.status.success() || failed > 0 || rows.is_empty() {
        eprintln!("{}", String::from_utf8_lossy(&out.stderr));
        eprintln!("{stdout}");
        bail!("{failed} chaos scenario(s) failed");
    }
    say(&format!(
        "{} chaos scenarios passed",
        rows.iter().filter(|(_, r)| r == "ok").count()
    ));
    Ok(())
}
