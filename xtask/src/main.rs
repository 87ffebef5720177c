//! `cargo xtask <task>`: the project's set-up, build, demo, test and benchmark entry points.

mod bench;
mod bench_tracking;
mod chaos;
mod demo;
mod gen_commands;
mod setup;

use std::path::PathBuf;
use std::process::Command;

use anyhow::Result;
use clap::{Parser, Subcommand};

use crate::setup::{run, say};

/// Project tasks. Each one installs what it needs first and says what it does.
#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what is missing: redis-server/redis-tools, bpftool, LLVM 22, nightly rust-src,
    /// bpf-linker.
    Setup,
    /// Build the eBPF programs (nightly, bpfel-unknown-none).
    BuildEbpf,
    /// Start a local Redis and the proxy, run a redis-cli session through it, stop both.
    Demo,
    /// Setup, then rustfmt, clippy, the eBPF build, and every unit and end-to-end test.
    Test,
    /// redis-benchmark directly vs through the proxy; prints ratios.
    Bench(bench::BenchArgs),
    /// Chaos scenarios (a stopped or killed master, hostile clients, churn, SIGTERM
    /// mid-pipeline …), each bounded and on loopback, with a pass/fail table.
    Chaos {
        /// Also the slow scenarios (CI runs only the fast ones).
        #[arg(long)]
        all: bool,
    },
    /// Fuzz the RESP parsers with cargo-fuzz (nightly).
    Fuzz {
        /// Seconds to fuzz.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
    /// Regenerate the command table from a live redis-server's COMMAND output.
    GenCommands,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    match cli.task {
        Task::Setup => setup::setup(),
        Task::BuildEbpf => setup::build_ebpf(&root).map(|_| ()),
        Task::Demo => {
            setup::setup()?;
            demo::demo(&root)
        }
        Task::Test => test(&root),
        Task::Bench(args) => {
            setup::setup()?;
            bench::bench(&root, &args)
        }
        Task::Chaos { all } => {
            setup::setup()?;
            chaos::chaos(&root, all)
        }
        Task::Fuzz { seconds } => fuzz(&root, seconds),
        Task::GenCommands => gen_commands::run(&root),
    }
}

fn cargo(root: &std::path::Path) -> Command {
    let mut c = Command::new("cargo");
    c.current_dir(root);
    c
}

/// The end-to-end test files run a second time with Valkey as the server.
const VALKEY_TESTS: &[&str] = &[
    "resp3",
    "tracking",
    "tracking_churn",
    "client_modes",
    "acl",
    "admin_commands",
    "redis_cli_modes",
    "upstream_commands",
    "libraries",
    "config",
    "clients",
    "standalone",
    "cluster_proxy",
    "sentinel",
    "stateful",
    "argument_errors",
];

/// Everything CI checks, in order of cost.
fn test(root: &std::path::Path) -> Result<()> {
    setup::setup()?;
    setup::client_libraries(root)?;
    say("cargo fmt --check");
    run(
        cargo(root).args(["fmt", "--all", "--", "--check"]),
        "cargo fmt --check (run `cargo fmt --all`)",
    )?;
    say("cargo clippy --all-targets -- -D warnings");
    run(
        cargo(root).args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]),
        "cargo clippy",
    )?;
    setup::build_ebpf(root)?;
    say("cargo test --workspace (unit and end-to-end tests against real redis-server processes)");
    run(cargo(root).args(["test", "--workspace"]), "cargo test")?;
    let valkey = setup::valkey_server(root)?;
    say(&format!(
        "the end-to-end tests of RESP3, client libraries, admin commands, standalone, cluster and sentinel upstreams again, against Valkey 8.1 ({})",
        valkey.display()
    ));
    let mut again = cargo(root);
    again.args(["test", "-p", "redis-intercept-e2e"]);
    for t in VALKEY_TESTS {
        again.args(["--test", t]);
    }
    run(
        again.env("REDIS_SERVER_BIN", &valkey),
        "cargo test (Valkey)",
    )?;
    say("all checks passed");
    Ok(())
}

/// Runs the RESP fuzz target for `seconds`.
fn fuzz(root: &std::path::Path, seconds: u64) -> Result<()> {
    if !setup::have("cargo-fuzz") {
        say("installing cargo-fuzz");
        run(
            Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]),
            "cargo install cargo-fuzz",
        )?;
    }
    say(&format!("fuzzing the RESP parsers for {seconds}s"));
    run(
        cargo(&root.join("fuzz"))
            .args([
                "+nightly",
                "fuzz",
                "run",
                "resp",
                "--",
                &format!("-max_total_time={seconds}"),
            ])
            .env_remove("RUSTUP_TOOLCHAIN"),
        "cargo fuzz run resp",
    )
}

/// The workspace root: xtask's manifest directory's parent.
fn workspace_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}
