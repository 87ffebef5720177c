//! Builds the eBPF programs (`redis-intercept-ebpf`, nightly + `bpf-linker`) into `OUT_DIR`,
//! where `intercept` embeds them. Without the toolchain the agent still builds, with an empty
//! object and a warning; `[intercept]` then refuses to start and says to run
//! `cargo xtask setup`.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    let root = manifest.parent().map(Path::to_path_buf).unwrap_or_default();
    let out = PathBuf::from(std::env::var_os("OUT_DIR").unwrap_or_default());
    let object = out.join("redis-intercept-ebpf");
    for dir in ["redis-intercept-ebpf/src", "redis-intercept-common/src"] {
        println!("cargo:rerun-if-changed={}", root.join(dir).display());
    }
    println!(
        "cargo:rerun-if-changed={}",
        root.join("redis-intercept-ebpf/Cargo.toml").display()
    );
    println!("cargo:rerun-if-env-changed=REDIS_INTERCEPT_SKIP_EBPF");
    let linker = which("bpf-linker");
    match &linker {
        // Rebuilt when the linker changes (or appears: see below).
        Some(path) => println!("cargo:rerun-if-changed={}", path.display()),
        None => {
            // A path that doesn't exist makes cargo run this script again on every build,
            // so the programs are built as soon as `cargo xtask setup` installed the linker.
            let home = std::env::var_os("CARGO_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
                .unwrap_or_default();
            println!(
                "cargo:rerun-if-changed={}",
                home.join("bin/bpf-linker").display()
            );
        }
    }
    if std::env::var_os("REDIS_INTERCEPT_SKIP_EBPF").is_some() || linker.is_none() {
        if linker.is_none() {
            println!(
                "cargo:warning=bpf-linker not found: building without the eBPF programs \
                 ([intercept] will refuse to start). Run `cargo xtask setup`, then build again."
            );
        }
        let _ = std::fs::write(&object, b"");
        return;
    }
    let target_dir = root.join("target/ebpf");
    let mut cmd = Command::new("rustup");
    cmd.current_dir(root.join("redis-intercept-ebpf"))
        .args([
            "run",
            "nightly",
            "cargo",
            "build",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
        ])
        .arg("--target-dir")
        .arg(&target_dir);
    // What the outer cargo (or clippy) set would pin its toolchain, flags or wrappers.
    for var in [
        "RUSTUP_TOOLCHAIN",
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO",
        "CLIPPY_ARGS",
        "CARGO_PRIMARY_PACKAGE",
    ] {
        cmd.env_remove(var);
    }
    // BTF, which the per-socket storage map needs.
    cmd.env("RUSTFLAGS", "-C debuginfo=2 -C link-arg=--btf");
    let status = cmd.status();
    let built = target_dir.join("bpfel-unknown-none/release/redis-intercept-ebpf");
    match status {
        Ok(s) if s.success() => {
            if let Err(e) = std::fs::copy(&built, &object) {
                panic!("copy {} to {}: {e}", built.display(), object.display());
            }
        }
        Ok(s) => panic!(
            "building the eBPF programs failed ({s}); is the nightly rust-src component \
             installed? Run `cargo xtask setup`."
        ),
        Err(e) => {
            panic!("cannot run rustup to build the eBPF programs: {e}. Run `cargo xtask setup`.")
        }
    }
}

/// The first `name` on PATH (or in cargo's bin directory).
fn which(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(PathBuf::from(home).join(".cargo/bin"));
    }
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file())
}
