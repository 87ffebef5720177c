//! The `redis-intercept` binary: command line, logging, and hand-off to [`redis_intercept::app`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use redis_intercept::app;
use redis_intercept::config::Config;

/// Transparent Redis proxy for a node: applications keep talking to the Redis address they
/// know, and redis-intercept serves them (slot routing, auth rewriting, mirroring, faults are
/// on the roadmap; this build proxies a standalone Redis).
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
    /// Reserved: a VIP (ip:port) to intercept with eBPF. Not available in this build.
    #[arg(long)]
    vip: Option<SocketAddr>,
    /// Reserved: the cgroup whose connections to --vip are intercepted. Not available in
    /// this build.
    #[arg(long)]
    cgroup: Option<PathBuf>,
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
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn check(path: &std::path::Path) -> Result<()> {
    let config = Config::load(path)?;
    let unsupported = config.unsupported_features();
    for feature in &unsupported {
        eprintln!(
            "{}: warning: {feature} is not implemented in this build; `run` will refuse it",
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
    if args.vip.is_some() || args.cgroup.is_some() {
        bail!(
            "--vip and --cgroup are reserved for eBPF interception, which this build does not implement yet"
        );
    }
    let config = match (&args.config, &args.listen, &args.upstream) {
        (Some(path), _, _) => Config::load(path)?,
        (None, Some(listen), Some(upstream)) => {
            quick_config(*listen, upstream, args.mode, args.workers)?
        }
        _ => bail!("give --config FILE, or --listen ADDR --upstream ADDR (see --help)"),
    };
    // Each client is a socket: lift the soft open-file limit to the hard one.
    if let Err(e) = rlimit::increase_nofile_limit(u64::MAX) {
        tracing::warn!(error = %e, "could not raise the open file limit");
    }
    app::run(&config, args.config.as_deref())
}

/// The one-service config the quick-start flags describe.
fn quick_config(
    listen: SocketAddr,
    upstream: &str,
    mode: ModeArg,
    workers: usize,
) -> Result<Config> {
    let mode = match mode {
        ModeArg::Standalone => "standalone",
        ModeArg::Cluster => "cluster",
    };
    // A cluster may be given several seeds, separated by commas.
    let nodes: Vec<String> = upstream
        .split(',')
        .map(|n| format!("{:?}", n.trim()))
        .collect();
    let nodes = nodes.join(", ");
    let text = format!(
        "[proxy]\nworkers = {workers}\n\n[[upstream]]\nname = \"default\"\nmode = \"{mode}\"\nnodes = [{nodes}]\n\n\
         [[service]]\nname = \"default\"\nlisten = \"{listen}\"\nupstream = \"default\"\n"
    );
    Ok(Config::parse(&text, "<command line>")?)
}
