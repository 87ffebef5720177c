//! The `redis-intercept` binary: command line, logging, and hand-off to [`redis_intercept::app`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use redis_intercept::app;
use redis_intercept::config::Config;

/// Transparent Redis proxy for a node: applications keep talking to the Redis address they
/// know, and redis-intercept serves them (standalone or cluster upstreams, auth rewriting,
/// routes, mirrors, faults), with eBPF interception of their connects per cgroup.
///
/// Logging follows RUST_LOG (default "info"); e.g. RUST_LOG=debug or
/// RUST_LOG=redis_intercept=debug,access=off.
#[derive(Parser)]
#[command(name = "redis-intercept", version)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the proxy from a config file, or one service from flags.
    ///
    /// Examples:
    ///   redis-intercept run --config /etc/redis-intercept/config.toml
    ///   redis-intercept run --listen 127.0.0.1:6380 --upstream 127.0.0.1:6379
    #[command(verbatim_doc_comment)]
    Run(RunArgs),
    /// Validate a config file: exit 0 with a summary, or non-zero with every problem found.
    Check {
        /// The TOML config file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Change or show which cgroups are intercepted, on the running agent (through its admin
    /// endpoint).
    ///
    /// Examples:
    ///   redis-intercept cgroup enable /sys/fs/cgroup/kubepods.slice
    ///   redis-intercept cgroup disable kubepods.slice/some-pod.slice
    ///   redis-intercept cgroup clear kubepods.slice/some-pod.slice
    ///   redis-intercept cgroup list
    #[command(verbatim_doc_comment)]
    Cgroup(CgroupArgs),
}

#[derive(clap::Args)]
struct CgroupArgs {
    /// What to do.
    #[arg(value_enum)]
    action: CgroupAction,
    /// The cgroup directory (absolute, or relative to the cgroup2 mount); not for `list`.
    path: Option<PathBuf>,
    /// The agent's admin address.
    #[arg(long, default_value = "127.0.0.1:9091", conflicts_with = "config")]
    admin: SocketAddr,
    /// Take the admin address from this config file instead.
    #[arg(long, short)]
    config: Option<PathBuf>,
}

#[derive(Clone, Copy, ValueEnum)]
enum CgroupAction {
    /// Intercept this cgroup and what is below it (unless set otherwise deeper down).
    Enable,
    /// Don't intercept this cgroup and what is below it (unless set otherwise deeper down).
    Disable,
    /// Remove this cgroup's setting: it follows its parents again.
    Clear,
    /// Show every setting, the counters and where the programs are attached.
    List,
}

#[derive(clap::Args)]
struct RunArgs {
    /// The TOML config file (see config/redis-intercept.toml for every option).
    #[arg(long, short, conflicts_with_all = ["listen", "upstream"])]
    config: Option<PathBuf>,
    /// Quick start without a file: where clients connect.
    #[arg(long, requires = "upstream")]
    listen: Option<SocketAddr>,
    /// Quick start without a file: the Redis server (host:port), or a cluster's seed nodes
    /// separated by commas (with --mode cluster).
    #[arg(long, requires = "listen")]
    upstream: Option<String>,
    /// Quick start: how the upstream is deployed.
    #[arg(long, value_enum, default_value_t = ModeArg::Standalone)]
    mode: ModeArg,
    /// Quick start: worker threads (0: one per CPU).
    #[arg(long, default_value_t = 0)]
    workers: usize,
    /// Quick start: a VIP (ip:port) whose connections are sent to --listen by eBPF, for the
    /// processes in --cgroup.
    #[arg(long, requires = "listen")]
    vip: Vec<SocketAddr>,
    /// Quick start: the cgroup (and what is below it) whose connections to --vip are
    /// intercepted; the programs attach there.
    #[arg(long)]
    cgroup: Option<PathBuf>,
    /// Quick start: pair local connections to --listen so their data skips the TCP/IP
    /// stack (`[intercept] accelerate`; the proxy must run inside --cgroup).
    #[arg(long, requires = "cgroup")]
    accelerate: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum ModeArg {
    Standalone,
    Cluster,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    let result = match cli.command {
        Cmd::Check { config } => check(&config),
        Cmd::Run(args) => run(args),
        Cmd::Cgroup(args) => cgroup(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("redis-intercept: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging() {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::registry()
        .with(filter)
        .with(QuietUnsupportedMaps)
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .init();
}

/// Drops aya's warning that a map "is of type BPF_MAP_TYPE_SK_STORAGE which is currently
/// unsupported in Aya, use `allow_unsupported_maps()`": we load with
/// `allow_unsupported_maps()` on purpose (only the programs use those maps), so at every
/// start it told an operator to do what is already done.
struct QuietUnsupportedMaps;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for QuietUnsupportedMaps {
    fn event_enabled(
        &self,
        event: &tracing::Event<'_>,
        _: tracing_subscriber::layer::Context<'_, S>,
    ) -> bool {
        /// Whether the event's message is the one to drop.
        struct Unsupported(bool);
        impl tracing::field::Visit for Unsupported {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                if field.name() == "message" {
                    self.0 |= format!("{value:?}").contains("unsupported in Aya");
                }
            }
        }
        // aya logs through the `log` crate; tracing-log gives such events the target "log".
        // Checking that and the level first keeps the message formatting off every other
        // event (access logs among them).
        let meta = event.metadata();
        if meta.target() != "log" || *meta.level() != tracing::Level::WARN {
            return true;
        }
        let mut seen = Unsupported(false);
        event.record(&mut seen);
        !seen.0
    }
}

fn check(path: &std::path::Path) -> Result<()> {
    let config = Config::load(path)?;
    for warning in config.warnings() {
        eprintln!("{}: warning: {warning}", path.display());
    }
    let unsupported = config.unsupported_features();
    for feature in &unsupported {
        eprintln!(
            "{}: warning: {feature} is not supported by this build; `run` will refuse it",
            path.display()
        );
    }
    println!(
        "{}: ok: {} service(s), {} upstream(s), interception {}",
        path.display(),
        config.services.len(),
        config.upstreams.len(),
        if config.intercept.is_some() {
            "on"
        } else {
            "off"
        }
    );
    Ok(())
}

fn run(args: RunArgs) -> Result<()> {
    if args.vip.is_empty() != args.cgroup.is_none() {
        bail!("--vip needs --cgroup and --cgroup needs --vip: say whose connections to which VIP");
    }
    let config = match (&args.config, &args.listen, &args.upstream) {
        (Some(path), _, _) => Config::load(path)?,
        (None, Some(listen), Some(upstream)) => quick_config(&args, *listen, upstream)?,
        _ => bail!("give --config FILE, or --listen ADDR --upstream ADDR (see --help)"),
    };
    // Each client is a socket: lift the soft open-file limit to the hard one.
    if let Err(e) = rlimit::increase_nofile_limit(u64::MAX) {
        tracing::warn!(error = %e, "could not raise the open file limit");
    }
    app::run(&config, args.config.as_deref())
}

/// The one-service config the quick-start flags describe.
fn quick_config(args: &RunArgs, listen: SocketAddr, upstream: &str) -> Result<Config> {
    let workers = args.workers;
    let mode = match args.mode {
        ModeArg::Standalone => "standalone",
        ModeArg::Cluster => "cluster",
    };
    // A cluster may be given several seeds, separated by commas.
    let nodes: Vec<String> = upstream
        .split(',')
        .map(|n| format!("{:?}", n.trim()))
        .collect();
    let nodes = nodes.join(", ");
    // --vip/--cgroup: attach at that cgroup, on by default there (so only it is intercepted).
    let intercept = match &args.cgroup {
        Some(cgroup) => format!(
            "[intercept]\ncgroup = {:?}\ndefault = \"on\"\naccelerate = {}\n\n",
            cgroup.display().to_string(),
            args.accelerate
        ),
        None => String::new(),
    };
    let vips: Vec<String> = args.vip.iter().map(|v| format!("\"{v}\"")).collect();
    let text = format!(
        "[proxy]\nworkers = {workers}\n\n{intercept}[[upstream]]\nname = \"default\"\nmode = \"{mode}\"\nnodes = [{nodes}]\n\n\
         [[service]]\nname = \"default\"\nlisten = \"{listen}\"\nupstream = \"default\"\nvips = [{}]\n",
        vips.join(", ")
    );
    Ok(Config::parse(&text, "<command line>")?)
}

/// `cgroup enable|disable|clear PATH` and `cgroup list`, through the agent's admin endpoint.
fn cgroup(args: &CgroupArgs) -> Result<()> {
    let (admin, token_file) = match &args.config {
        Some(path) => match Config::load(path)?.admin {
            Some(a) => (a.listen, a.token_file),
            None => bail!(
                "{} has no [admin] section to reach the agent through",
                path.display()
            ),
        },
        None => (args.admin, None),
    };
    let token = match token_file {
        Some(file) => Some(
            std::fs::read_to_string(&file)
                .with_context(|| format!("admin token_file {}", file.display()))?
                .lines()
                .next()
                .unwrap_or_default()
                .trim()
                .to_owned(),
        ),
        None => None,
    };
    let (method, body) = match (args.action, &args.path) {
        (CgroupAction::List, _) => ("GET", String::new()),
        (action, Some(path)) => {
            // Relative paths are resolved by the agent (against the cgroup2 mount it uses).
            let path = if path.is_absolute() || path.exists() {
                std::fs::canonicalize(path).unwrap_or_else(|_| path.clone())
            } else {
                path.clone()
            };
            let verb = match action {
                CgroupAction::Enable => "enable",
                CgroupAction::Disable => "disable",
                _ => "clear",
            };
            ("POST", format!("{verb} {}\n", path.display()))
        }
        (_, None) => bail!("give the cgroup's path"),
    };
    let (status, text) = http(admin, method, "/cgroups", &body, token.as_deref())
        .map_err(|e| anyhow::anyhow!("cannot reach the agent's admin endpoint at {admin}: {e}"))?;
    print!("{text}");
    if status != 200 {
        bail!("the agent answered {status}");
    }
    Ok(())
}

/// One HTTP/1.1 request to the local admin endpoint; returns status and body.
fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
    token: Option<&str>,
) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream =
        std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(5))?;
    stream.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    let auth = token.map_or_else(String::new, |t| format!("Authorization: Bearer {t}\r\n"));
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: text/plain\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}
