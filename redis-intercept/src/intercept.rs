//! eBPF interception (aya): loads the programs embedded in the binary, fills their maps from
//! the services' VIPs and the per-cgroup settings, and attaches them to the attach cgroup with
//! unpinned `bpf_link`s, so they go away with this process (fail-open).
//!
//! The kernel side is `redis-intercept-ebpf`; the map layouts are in `redis-intercept-common`.

use std::collections::BTreeMap;
use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use aya::Ebpf;
use aya::maps::{Array, HashMap, MapData, PerCpuArray, SockHash};
use aya::programs::{CgroupAttachMode, CgroupSockAddr, SkMsg, SockOps};
use aya::util::KernelVersion;
use redis_intercept_common as common;
use tracing::{info, warn};

mod btf;

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

/// The cgroup2 mount point, from `/proc/self/mountinfo` (`/sys/fs/cgroup` on a pure v2
/// host, `/sys/fs/cgroup/unified` on hybrid ones).
///
/// # Errors
/// No cgroup2 file system is mounted.
pub fn cgroup2_mount() -> Result<PathBuf, InterceptError> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| ebpf_err("read /proc/self/mountinfo", e))?;
    cgroup2_mount_in(&info).ok_or_else(|| InterceptError::Cgroup {
        path: PathBuf::from("/proc/self/mountinfo"),
        why: "no cgroup2 file system is mounted".to_owned(),
    })
}

/// The first cgroup2 mount point in mountinfo text.
fn cgroup2_mount_in(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        if right.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        // Field 5 is the mount point; spaces and the like are octal-escaped.
        let mount = left.split_whitespace().nth(4)?;
        Some(PathBuf::from(unescape_mount(mount)))
    })
}

/// Undoes mountinfo's `\040`-style escapes.
fn unescape_mount(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8)
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A cgroup's id as the kernel's cgroup-id helpers give it: the inode of its directory.
///
/// # Errors
/// The directory doesn't exist or isn't a cgroup2 directory.
pub fn cgroup_id(path: &Path) -> Result<u64, InterceptError> {
    let meta = std::fs::metadata(path).map_err(|e| InterceptError::Cgroup {
        path: path.to_owned(),
        why: e.to_string(),
    })?;
    if !meta.is_dir() || !path.join("cgroup.procs").exists() {
        return Err(InterceptError::Cgroup {
            path: path.to_owned(),
            why: "not a cgroup2 directory".to_owned(),
        });
    }
    Ok(meta.ino())
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

    fn write_settings(&mut self) -> Result<(), InterceptError> {
        let mut pod_ip4 = 0;
        let mut pod_ip6 = [0; 4];
        for ip in &self.plan.pod_addresses {
            match ip {
                IpAddr::V4(v4) => pod_ip4 = common::ip4_word(v4.octets()),
                IpAddr::V6(v6) => pod_ip6 = common::ip6_words(v6.octets()),
            }
        }
        let settings = common::Settings {
            default_policy: if self.plan.default_on {
                common::POLICY_ON
            } else {
                common::POLICY_OFF
            },
            proxy_mark: common::PROXY_SO_MARK,
            pod_ip4,
            pod_ip6,
            rmem_offset: self.rmem_offset,
            backlog_limit: self.plan.backlog_limit,
        };
        let mut map: Array<&mut MapData, common::Settings> = Array::try_from(
            self.ebpf
                .map_mut(common::SETTINGS_MAP)
                .ok_or_else(|| InterceptError::Ebpf("settings map missing".to_owned()))?,
        )
        .map_err(|e| ebpf_err("settings map", e))?;
        map.set(0, settings, 0)
            .map_err(|e| ebpf_err("write settings", e))
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

    /// Replaces the VIPs in the services maps with `vips`.
    ///
    /// # Errors
    /// A VIP whose family differs from its listener's, or a map write the kernel refused.
    pub fn set_vips(&mut self, vips: &[Vip]) -> Result<(), InterceptError> {
        for v in vips {
            if v.vip.is_ipv4() != v.listener.is_ipv4() {
                return Err(InterceptError::Ebpf(format!(
                    "VIP {} and its service listener {} are of different address families",
                    v.vip, v.listener
                )));
            }
        }
        let old = std::mem::take(&mut self.vips);
        for v in &old {
            if !vips.iter().any(|n| n.vip == v.vip) {
                self.remove_vip(v.vip)?;
            }
        }
        for v in vips {
            self.insert_vip(v)?;
        }
        self.vips = vips.to_vec();
        if self.plan.accelerate {
            self.set_proxy_addrs()?;
        }
        Ok(())
    }

    /// Writes the addresses redirected connects go to (each listener's host and pod address)
    /// into the proxy addresses map, and removes the ones no VIP goes to any more.
    fn set_proxy_addrs(&mut self) -> Result<(), InterceptError> {
        let mut want = Vec::new();
        for v in &self.vips {
            let port = u32::from(v.listener.port());
            let mut ips = vec![host_target(v.listener.ip())];
            ips.extend(
                self.plan
                    .pod_addresses
                    .iter()
                    .filter(|ip| ip.is_ipv4() == v.listener.is_ipv4()),
            );
            for ip in ips {
                want.push(common::ProxyAddr {
                    ip: mapped_words(ip),
                    port,
                });
            }
        }
        let mut map: HashMap<&mut MapData, common::ProxyAddr, u32> =
            self.hash_map(common::PROXY_ADDRS_MAP)?;
        let stale: Vec<common::ProxyAddr> = map
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !want.contains(k))
            .collect();
        for k in stale {
            let _ = map.remove(&k);
        }
        for k in want {
            map.insert(k, 1, 0)
                .map_err(|e| ebpf_err("write the proxy addresses map", e))?;
        }
        Ok(())
    }

    /// Warns when this process runs outside the attach cgroup: the proxy's ends of connections
    /// are then never paired, and every connection keeps using TCP.
    fn warn_if_outside(&self) {
        let own = std::fs::read_to_string("/proc/self/cgroup")
            .ok()
            .and_then(|text| {
                text.lines()
                    .find_map(|l| l.strip_prefix("0::").map(str::to_owned))
            });
        let Some(own) = own else {
            return;
        };
        let own = self.mount.join(own.trim_start_matches('/'));
        if !own.starts_with(&self.plan.attach) {
            warn!(
                proxy_cgroup = %own.display(),
                attach = %self.plan.attach.display(),
                "[intercept] accelerate: the proxy runs outside the attach cgroup, so its sockets can't be paired; connections use TCP"
            );
        }
    }

    fn insert_vip(&mut self, v: &Vip) -> Result<(), InterceptError> {
        let port = common::port_word(v.listener.port());
        let host = host_target(v.listener.ip());
        let value = common::ServiceValue {
            host_ip4: match host {
                IpAddr::V4(ip) => common::ip4_word(ip.octets()),
                IpAddr::V6(_) => 0,
            },
            host_ip6: match host {
                IpAddr::V6(ip) => common::ip6_words(ip.octets()),
                IpAddr::V4(_) => [0; 4],
            },
            port,
            service: v.service,
            flags: 0,
        };
        match v.vip {
            SocketAddr::V4(vip) => {
                let mut map = self.v4_map()?;
                let key = common::ServiceKeyV4 {
                    ip: common::ip4_word(vip.ip().octets()),
                    port: common::port_word(vip.port()),
                };
                map.insert(key, value, 0)
                    .map_err(|e| ebpf_err("write the IPv4 services map", e))
            }
            SocketAddr::V6(vip) => {
                let mut map = self.v6_map()?;
                let key = common::ServiceKeyV6 {
                    ip: common::ip6_words(vip.ip().octets()),
                    port: common::port_word(vip.port()),
                };
                map.insert(key, value, 0)
                    .map_err(|e| ebpf_err("write the IPv6 services map", e))
            }
        }
    }

    fn remove_vip(&mut self, vip: SocketAddr) -> Result<(), InterceptError> {
        let result = match vip {
            SocketAddr::V4(vip) => self.v4_map()?.remove(&common::ServiceKeyV4 {
                ip: common::ip4_word(vip.ip().octets()),
                port: common::port_word(vip.port()),
            }),
            SocketAddr::V6(vip) => self.v6_map()?.remove(&common::ServiceKeyV6 {
                ip: common::ip6_words(vip.ip().octets()),
                port: common::port_word(vip.port()),
            }),
        };
        result.map_err(|e| ebpf_err("remove a VIP", e))
    }

    fn v4_map(
        &mut self,
    ) -> Result<HashMap<&mut MapData, common::ServiceKeyV4, common::ServiceValue>, InterceptError>
    {
        self.hash_map(common::SERVICES_V4_MAP)
    }

    fn v6_map(
        &mut self,
    ) -> Result<HashMap<&mut MapData, common::ServiceKeyV6, common::ServiceValue>, InterceptError>
    {
        self.hash_map(common::SERVICES_V6_MAP)
    }

    /// The hash map `name` of the object.
    fn hash_map<K: aya::Pod, V: aya::Pod>(
        &mut self,
        name: &str,
    ) -> Result<HashMap<&mut MapData, K, V>, InterceptError> {
        HashMap::try_from(
            self.ebpf
                .map_mut(name)
                .ok_or_else(|| InterceptError::Ebpf(format!("map {name} missing")))?,
        )
        .map_err(|e| ebpf_err(name, e))
    }

    /// The absolute form of a cgroup path: as given if absolute, else under the cgroup2
    /// mount.
    pub fn resolve(&self, path: &Path) -> PathBuf {
        if path.is_absolute() {
            path.to_owned()
        } else {
            self.mount.join(path)
        }
    }

    /// Sets (`Some`) or clears (`None`) the explicit setting of a cgroup. Returns its id.
    ///
    /// # Errors
    /// The path isn't a cgroup2 directory (when setting), or the map write failed.
    pub fn set(&mut self, path: &Path, on: Option<bool>) -> Result<u64, InterceptError> {
        let path = self.resolve(path);
        let mount = self.mount.clone();
        let known = self.rules.get(&path).map(|r| r.0);
        let mut map: HashMap<&mut MapData, u64, u32> = self.hash_map(common::CGROUP_POLICY_MAP)?;
        match on {
            Some(on) => {
                if !path.starts_with(&mount) {
                    return Err(InterceptError::Cgroup {
                        path,
                        why: format!("not under the cgroup2 mount {}", mount.display()),
                    });
                }
                let id = cgroup_id(&path)?;
                let value = if on {
                    common::POLICY_ON
                } else {
                    common::POLICY_OFF
                };
                map.insert(id, value, 0)
                    .map_err(|e| ebpf_err("write the cgroup policy", e))?;
                self.rules.insert(path, (id, on));
                Ok(id)
            }
            None => {
                let id = match known {
                    Some(id) => id,
                    None => cgroup_id(&path)?,
                };
                // Clearing a setting that isn't there is fine.
                let _ = map.remove(&id);
                self.rules.remove(&path);
                Ok(id)
            }
        }
    }

    /// Applies a reloaded file's `default` and `enable`/`disable` lists. The default policy
    /// changes; a setting the old file made and the new one drops is cleared; a setting the
    /// new file adds or changes is made, and so is one the file had but that isn't in force
    /// (its cgroup didn't exist before). A setting changed at run time (`redis-intercept
    /// cgroup`) for a cgroup whose line in the file didn't change stays. Returns why a
    /// setting could not be made (a cgroup that doesn't exist yet, say); the rest are made.
    ///
    /// # Errors
    /// The settings map can't be written.
    pub fn reconcile(
        &mut self,
        default_on: bool,
        rules: Vec<(PathBuf, bool)>,
    ) -> Result<Vec<String>, InterceptError> {
        if default_on != self.plan.default_on {
            self.plan.default_on = default_on;
            self.write_settings()?;
        }
        let old = std::mem::replace(&mut self.plan.rules, rules.clone());
        for (path, _) in &old {
            if !rules.iter().any(|(p, _)| p == path) {
                // Gone with its cgroup is as good as cleared.
                let _ = self.set(path, None);
            }
        }
        let mut problems = Vec::new();
        for (path, on) in rules {
            let unchanged = old.contains(&(path.clone(), on));
            if unchanged && self.rules.contains_key(&self.resolve(&path)) {
                continue;
            }
            if let Err(e) = self.set(&path, Some(on)) {
                problems.push(format!("[intercept] setting not applied: {e}"));
            }
        }
        Ok(problems)
    }

    /// Every explicit setting.
    pub fn rules(&self) -> Vec<Rule> {
        self.rules
            .iter()
            .map(|(path, &(id, on))| Rule {
                path: path.clone(),
                id,
                on,
                exists: cgroup_id(path).is_ok_and(|now| now == id),
            })
            .collect()
    }

    /// The counters, summed over CPUs: redirected, skipped by mark, skipped by policy,
    /// skipped for want of a pod address, paired sockets, spliced writes, unpaired sockets,
    /// sockets sent through TCP because their reader was backlogged.
    ///
    /// # Errors
    /// The counters map can't be read.
    pub fn counters(&self) -> Result<[u64; common::COUNTERS as usize], InterceptError> {
        let map: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(
            self.ebpf
                .map(common::COUNTERS_MAP)
                .ok_or_else(|| InterceptError::Ebpf("counters map missing".to_owned()))?,
        )
        .map_err(|e| ebpf_err("counters map", e))?;
        let mut out = [0u64; common::COUNTERS as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            let values = map
                .get(&(i as u32), 0)
                .map_err(|e| ebpf_err("read counters", e))?;
            *slot = values.iter().sum();
        }
        Ok(out)
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

/// Where host processes' connects to a VIP of a listener on `ip` go: the listener's address,
/// or loopback for a wildcard listener.
fn host_target(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    }
}

/// An address as the pairing programs key it: IPv6 words, IPv4 mapped.
fn mapped_words(ip: IpAddr) -> [u32; 4] {
    match ip {
        IpAddr::V4(v4) => common::v4_mapped(common::ip4_word(v4.octets())),
        IpAddr::V6(v6) => common::ip6_words(v6.octets()),
    }
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

/// Detaches programs of ours that the legacy attach call left on `cgroup` (they outlive the
/// process that attached them). Links of a running agent can't be detached this way and stay.
/// Uses `bpftool`; without it, says so and goes on.
fn remove_stale(cgroup: &Path) {
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
fn stale_entries(json: &str) -> Vec<(u64, String, String)> {
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

/// The loaded eBPF programs, shared with the admin endpoint; `None` once detached.
pub type InterceptSlot = std::sync::Arc<std::sync::Mutex<Option<Interceptor>>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_cgroup2_mount_on_hybrid_and_pure_hosts() {
        let hybrid = "25 30 0:23 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755\n\
                      26 25 0:24 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n\
                      27 25 0:25 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n";
        assert_eq!(
            cgroup2_mount_in(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let pure = "30 1 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_mount_in(pure),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        let spaced = "30 1 0:26 / /mnt/my\\040cg rw - cgroup2 none rw\n";
        assert_eq!(cgroup2_mount_in(spaced), Some(PathBuf::from("/mnt/my cg")));
        assert_eq!(
            cgroup2_mount_in("1 0 0:1 / / rw - ext4 /dev/sda rw\n"),
            None
        );
    }

    #[test]
    fn reads_bpftool_cgroup_show_json() {
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
