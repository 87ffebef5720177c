//! eBPF interception (aya): loads the programs embedded in the binary, fills their maps from
//! the services' VIPs and the per-cgroup settings, and attaches them to the attach cgroup with
//! unpinned `bpf_link`s, so they go away with this process (fail-open).
//!
//! The kernel side is `redis-intercept-ebpf`; the map layouts are in `redis-intercept-common`.

use std::collections::BTreeMap;
use std::fs::File;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use aya::Ebpf;
use aya::maps::{MapData, SockHash};
use aya::programs::{CgroupAttachMode, CgroupSockAddr, SkMsg, SockOps};
use aya::util::KernelVersion;
use redis_intercept_common as common;
use tracing::{info, warn};

mod btf;
mod cgroupfs;
mod maps;
mod policy;
mod stale;

pub use cgroupfs::{cgroup_id, cgroup2_mount};
use stale::remove_stale;

/// The eBPF object built by `build.rs` (empty when the toolchain was missing).
static OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/redis-intercept-ebpf"));

/// Why interception can't run.
#[derive(Debug, thiserror::Error)]
pub enum InterceptError {
    /// The binary has no eBPF programs in it.
    #[error(
        "this binary was built without the eBPF programs (bpf-linker was missing): run \
         `cargo xtask setup`, then build again"
    )]
    NotBuilt,
    /// The kernel is too old for unpinned cgroup links.
    #[error("kernel {0} is too old: interception needs Linux 5.7 or later (cgroup bpf_link)")]
    OldKernel(String),
    /// A cgroup path is wrong.
    #[error("cgroup {path}: {why}")]
    Cgroup {
        /// The path given.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// aya or the kernel refused something.
    #[error("{0}")]
    Ebpf(String),
}

fn ebpf_err(what: &str, e: impl std::fmt::Display) -> InterceptError {
    InterceptError::Ebpf(format!("{what}: {e}"))
}

/// One VIP to intercept and the proxy listener it goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Vip {
    /// What applications dial.
    pub vip: SocketAddr,
    /// The service's bound listener.
    pub listener: SocketAddr,
    /// The service's number in the config.
    pub service: u32,
}

/// What interception needs from the config.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Where the programs attach (a cgroup2 directory).
    pub attach: PathBuf,
    /// Policy of cgroups with no explicit setting.
    pub default_on: bool,
    /// Explicit settings applied at start: (path, on).
    pub rules: Vec<(PathBuf, bool)>,
    /// Proxy address for callers in other network namespaces, per family.
    pub pod_addresses: Vec<IpAddr>,
    /// Attach the getpeername programs too.
    pub getpeername: bool,
    /// Pair local connections to the proxy so their writes skip the TCP/IP stack.
    pub accelerate: bool,
    /// Unread bytes a paired socket may hold before writers to it use TCP; 0: no limit.
    pub backlog_limit: u32,
}

/// One explicit cgroup setting, as `cgroup list` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// The cgroup directory.
    pub path: PathBuf,
    /// Its id when the setting was made.
    pub id: u64,
    /// On or off.
    pub on: bool,
    /// Whether the directory still exists with that id.
    pub exists: bool,
}

/// The loaded programs and their maps. Dropping it detaches everything.
pub struct Interceptor {
    /// The loaded object; owns the programs and their links.
    ebpf: Ebpf,
    /// The plan it was started with.
    plan: Plan,
    /// The cgroup2 mount, for relative paths.
    mount: PathBuf,
    /// Explicit settings by path.
    rules: BTreeMap<PathBuf, (u64, bool)>,
    /// The VIPs in the maps now.
    vips: Vec<Vip>,
    /// Whether the programs are attached.
    attached: bool,
    /// Offset of `sk_rmem_alloc` in `struct sock` from the kernel's BTF, for the backlog
    /// check of `accelerate`; 0 when unknown (no check).
    rmem_offset: u32,
}

const PROGRAMS: [&str; 2] = [common::CONNECT4_PROGRAM, common::CONNECT6_PROGRAM];
const PEER_PROGRAMS: [&str; 2] = [common::GETPEERNAME4_PROGRAM, common::GETPEERNAME6_PROGRAM];

impl Interceptor {
    /// Loads the programs into the kernel (the verifier runs now) and fills the settings and
    /// cgroup rules; nothing is attached yet.
    ///
    /// # Errors
    /// No embedded object, an old kernel, a bad cgroup path, or a refusal from the kernel.
    pub fn load(plan: Plan) -> Result<Interceptor, InterceptError> {
        if OBJECT.is_empty() {
            return Err(InterceptError::NotBuilt);
        }
        let kernel = KernelVersion::current().map_err(|e| ebpf_err("kernel version", e))?;
        // aya would fall back to the legacy attach call below 5.7, whose programs outlive the
        // process; refuse instead.
        if kernel < KernelVersion::new(5, 7, 0) {
            return Err(InterceptError::OldKernel(format!("{kernel:?}")));
        }
        if plan.getpeername && kernel < KernelVersion::new(5, 8, 0) {
            return Err(InterceptError::Ebpf(
                "the getpeername hooks need Linux 5.8; set [intercept] getpeername = false"
                    .to_owned(),
            ));
        }
        let mount = cgroup2_mount()?;
        cgroup_id(&plan.attach)?;
        // Kernels before memcg accounting of BPF memory need a higher locked-memory limit.
        let _ = rlimit::setrlimit(
            rlimit::Resource::MEMLOCK,
            rlimit::INFINITY,
            rlimit::INFINITY,
        );
        // The per-socket storage map is a type aya 0.13 has no wrapper for; it is only used by
        // the programs.
        let mut ebpf = aya::EbpfLoader::new()
            .allow_unsupported_maps()
            .load(OBJECT)
            .map_err(|e| ebpf_err("load the eBPF object", e))?;
        let names: Vec<&str> = if plan.getpeername {
            PROGRAMS
                .iter()
                .chain(PEER_PROGRAMS.iter())
                .copied()
                .collect()
        } else {
            PROGRAMS.to_vec()
        };
        for name in names {
            program::<CgroupSockAddr>(&mut ebpf, name)?
                .load()
                .map_err(|e| ebpf_err(name, e))?;
        }
        let mut rmem_offset = 0;
        if plan.accelerate {
            load_accelerator(&mut ebpf)?;
            if plan.backlog_limit > 0 {
                match btf::sock_rmem_offset() {
                    Ok(offset) => rmem_offset = offset,
                    Err(e) => warn!(
                        error = %e,
                        "[intercept] accelerate: the kernel's socket layout is unknown, so accelerate_backlog can't apply: a paired client that stops reading can hold kernel memory up to the node's TCP memory limit"
                    ),
                }
            }
        }
        let mut me = Interceptor {
            ebpf,
            plan,
            mount,
            rules: BTreeMap::new(),
            vips: Vec::new(),
            attached: false,
            rmem_offset,
        };
        me.write_settings()?;
        // A cgroup that doesn't exist yet (a service not started) can't be set by id: say
        // so and go on, rather than keep every other application from being served.
        for (path, on) in me.plan.rules.clone() {
            if let Err(e) = me.set(&path, Some(on)) {
                warn!(error = %e, "[intercept] setting not applied; use `redis-intercept cgroup` once the cgroup exists");
            }
        }
        Ok(me)
    }

    /// Attaches the programs to the attach cgroup (unpinned links: they are detached when
    /// this is dropped or the process dies). First detaches stale programs of ours that the
    /// legacy attach call left there.
    ///
    /// # Errors
    /// The kernel refused the attach.
    pub fn attach(&mut self) -> Result<(), InterceptError> {
        if self.attached {
            return Ok(());
        }
        remove_stale(&self.plan.attach);
        let names: Vec<&str> = if self.plan.getpeername {
            PROGRAMS
                .iter()
                .chain(PEER_PROGRAMS.iter())
                .copied()
                .collect()
        } else {
            PROGRAMS.to_vec()
        };
        // A cgroup bpf_link is always multi-attach; Single is what the kernel accepts.
        for name in names {
            let cgroup = self.open_attach()?;
            program::<CgroupSockAddr>(&mut self.ebpf, name)?
                .attach(cgroup, CgroupAttachMode::Single)
                .map_err(|e| ebpf_err(&format!("attach {name}"), e))?;
        }
        if self.plan.accelerate {
            let cgroup = self.open_attach()?;
            let name = common::SOCKOPS_PROGRAM;
            program::<SockOps>(&mut self.ebpf, name)?
                .attach(cgroup, CgroupAttachMode::Single)
                .map_err(|e| ebpf_err(&format!("attach {name}"), e))?;
            self.warn_if_outside();
        }
        self.attached = true;
        info!(cgroup = %self.plan.attach.display(), "eBPF interception attached");
        Ok(())
    }

    fn open_attach(&self) -> Result<File, InterceptError> {
        File::open(&self.plan.attach).map_err(|e| InterceptError::Cgroup {
            path: self.plan.attach.clone(),
            why: e.to_string(),
        })
    }

    /// Detaches the cgroup programs (connects go straight to their VIPs, new connections
    /// aren't paired) but keeps the maps: a paired socket loses what is queued on it when it
    /// leaves the pairs map, so connections already paired must end before this is dropped.
    pub fn detach(&mut self) {
        let mut names: Vec<&str> = PROGRAMS.to_vec();
        if self.plan.getpeername {
            names.extend(PEER_PROGRAMS);
        }
        for name in names {
            let program: Option<&mut CgroupSockAddr> =
                self.ebpf.program_mut(name).and_then(|p| p.try_into().ok());
            if let Some(p) = program {
                let _ = p.unload();
            }
        }
        if self.plan.accelerate {
            let program: Option<&mut SockOps> = self
                .ebpf
                .program_mut(common::SOCKOPS_PROGRAM)
                .and_then(|p| p.try_into().ok());
            if let Some(p) = program {
                let _ = p.unload();
            }
        }
        self.attached = false;
    }

    /// Whether the programs are attached.
    pub fn is_attached(&self) -> bool {
        self.attached
    }

    /// Whether local connections to the proxy are paired (`accelerate`).
    pub fn accelerates(&self) -> bool {
        self.plan.accelerate
    }

    /// The cgroup the programs attach to.
    pub fn attach_point(&self) -> &Path {
        &self.plan.attach
    }
}

/// The program `name` of `ebpf`, as its type.
fn program<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T, InterceptError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or_else(|| InterceptError::Ebpf(format!("program {name} missing")))?
        .try_into()
        .map_err(|e| ebpf_err(name, e))
}

/// Loads the pairing programs and attaches `skmsg` to the pairs map (the `sockops` program
/// attaches with the connect hooks).
fn load_accelerator(ebpf: &mut Ebpf) -> Result<(), InterceptError> {
    let fd = {
        let map: SockHash<&MapData, common::SockPair> = SockHash::try_from(
            ebpf.map(common::SOCK_PAIRS_MAP)
                .ok_or_else(|| InterceptError::Ebpf("pairs map missing".to_owned()))?,
        )
        .map_err(|e| ebpf_err("pairs map", e))?;
        map.fd().try_clone().map_err(|e| ebpf_err("pairs map", e))?
    };
    let name = common::SKMSG_PROGRAM;
    let skmsg = program::<SkMsg>(ebpf, name)?;
    skmsg.load().map_err(|e| ebpf_err(name, e))?;
    skmsg
        .attach(&fd)
        .map_err(|e| ebpf_err(&format!("attach {name}"), e))?;
    let name = common::SOCKOPS_PROGRAM;
    program::<SockOps>(ebpf, name)?
        .load()
        .map_err(|e| ebpf_err(name, e))
}

/// The loaded eBPF programs, shared with the admin endpoint; `None` once detached.
pub type InterceptSlot = std::sync::Arc<std::sync::Mutex<Option<Interceptor>>>;
