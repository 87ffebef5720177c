//! cgroup eBPF programs of redis-intercept: `connect4`/`connect6` send TCP connects to a
//! Redis VIP to the node's proxy, for the cgroups whose policy says so, and
//! `getpeername4`/`getpeername6` make such sockets report the VIP they dialled.
//!
//! With `[intercept] accelerate`, `sockops` puts both ends of each local connection to a proxy
//! address into a sockhash, and `skmsg` hands a paired socket's writes straight to its peer's
//! receive queue, skipping the TCP/IP stack for the app-to-proxy hop, until the peer holds
//! more than `backlog_limit` unread (then the writer uses TCP, for its flow control).
//!
//! Every path that can't decide (no service, a failed lookup, a missing setting) returns 1
//! with the address untouched: the hook fails open, so an application can always reach its
//! VIP directly.
#![no_std]
#![no_main]

use aya_ebpf::bindings::{
    BPF_F_INGRESS, BPF_F_NO_PREALLOC, BPF_SK_STORAGE_GET_F_CREATE,
    BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB,
    BPF_SOCK_OPS_STATE_CB_FLAG, BPF_TCP_CLOSE, bpf_sock_addr, sk_action::SK_PASS,
};
use aya_ebpf::btf_maps::{Array, HashMap, PerCpuArray, SkStorage, SockHash};
use aya_ebpf::cty::c_void;
use aya_ebpf::helpers::generated::{
    bpf_probe_read_kernel, bpf_sk_storage_get, bpf_sock_ops_cb_flags_set,
};
use aya_ebpf::helpers::{bpf_get_current_ancestor_cgroup_id, bpf_get_netns_cookie, bpf_getsockopt};
use aya_ebpf::macros::{btf_map, cgroup_sock_addr, sk_msg, sock_ops};
use aya_ebpf::programs::{SkMsgContext, SockAddrContext, SockOpsContext};
use redis_intercept_common::{
    COUNTER_BACKLOGGED, COUNTER_PAIRED, COUNTER_REDIRECTED, COUNTER_SKIPPED_MARK,
    COUNTER_SKIPPED_NO_POD_ADDRESS, COUNTER_SKIPPED_POLICY, COUNTER_SPLICED, COUNTER_UNPAIRED,
    COUNTERS, MAX_CGROUP_DEPTH, MAX_CGROUP_RULES, MAX_PROXY_ADDRS, MAX_SERVICES, MAX_SOCK_PAIRS,
    OrigDst, POLICY_ON, ProxyAddr, ServiceKeyV4, ServiceKeyV6, ServiceValue, Settings, SockPair,
    V4_MAPPED_WORD, v4_mapped,
};

// All maps are BTF maps (the `.maps` section), which any current loader (aya, libbpf,
// bpftool) understands.

/// VIP:port → proxy, IPv4.
#[btf_map(name = "RI_SERVICES_V4")]
static SERVICES_V4: HashMap<ServiceKeyV4, ServiceValue, { MAX_SERVICES as usize }> = HashMap::new();

/// VIP:port → proxy, IPv6.
#[btf_map(name = "RI_SERVICES_V6")]
static SERVICES_V6: HashMap<ServiceKeyV6, ServiceValue, { MAX_SERVICES as usize }> = HashMap::new();

/// Cgroup id (inode of the cgroup2 directory) → on/off.
#[btf_map(name = "RI_CGROUP_POLICY")]
static CGROUP_POLICY: HashMap<u64, u32, { MAX_CGROUP_RULES as usize }> = HashMap::new();

/// The agent's settings; entry 0.
#[btf_map(name = "RI_SETTINGS")]
static SETTINGS: Array<Settings, 1> = Array::new();

/// Per-CPU counters.
#[btf_map(name = "RI_COUNTERS")]
static COUNTERS_MAP: PerCpuArray<u64, { COUNTERS as usize }> = PerCpuArray::new();

/// Per-socket storage: what a redirected socket dialled, for getpeername; freed with the
/// socket.
#[btf_map(name = "RI_ORIG_DST")]
static ORIG_DST: SkStorage<OrigDst> = SkStorage::new();

/// Addresses the proxy accepts on: connections to them are paired.
#[btf_map(name = "RI_PROXY_ADDRS")]
static PROXY_ADDRS: HashMap<ProxyAddr, u32, { MAX_PROXY_ADDRS as usize }> = HashMap::new();

/// Both ends of each local connection to the proxy, keyed by their own view of it.
#[btf_map(name = "RI_SOCK_PAIRS")]
static SOCK_PAIRS: SockHash<SockPair, { MAX_SOCK_PAIRS as usize }> = SockHash::new();

/// Marks a socket that wrote through TCP once: it keeps doing so, or the peer could read a
/// later write (queued on its socket directly) before an earlier one (still in TCP). Storage
/// of the socket itself, so the mark can't be evicted and goes with the socket.
#[btf_map(name = "RI_SOCK_TCP")]
static SOCK_TCP: SkStorage<u32> = SkStorage::new();

/// Each paired socket's kernel address, so that a writer can check how much its reader holds
/// unread. Not preallocated: entries come and go with the sockets.
#[btf_map(name = "RI_SOCK_ADDRS")]
static SOCK_ADDRS: HashMap<
    SockPair,
    u64,
    { MAX_SOCK_PAIRS as usize },
    { BPF_F_NO_PREALLOC as usize },
> = HashMap::new();

/// Returned by every program: let the call proceed.
const PROCEED: i32 = 1;
const IPPROTO_TCP: u32 = 6;
const SOL_SOCKET: i32 = 1;
const SO_MARK: i32 = 36;

fn count(index: u32) {
    if let Some(c) = COUNTERS_MAP.get_ptr_mut(index) {
        // SAFETY: a per-CPU slot of this map, only touched by this CPU.
        unsafe { *c += 1 };
    }
}

/// What to do with a connect to a known VIP from this socket and task: `None` to leave it,
/// or whether the caller is in the host network namespace.
fn decide(ctx: &SockAddrContext, settings: &Settings) -> Option<bool> {
    let mut mark: u32 = 0;
    // SAFETY: the helper writes at most 4 bytes into `mark`.
    let got = unsafe {
        bpf_getsockopt(
            ctx.sock_addr.cast(),
            SOL_SOCKET,
            SO_MARK,
            (&raw mut mark).cast(),
            4,
        )
    };
    if got == 0 && mark == settings.proxy_mark {
        count(COUNTER_SKIPPED_MARK);
        return None;
    }
    // The deepest cgroup with an explicit setting wins.
    let mut policy = settings.default_policy;
    let mut level = MAX_CGROUP_DEPTH;
    while level > 0 {
        // SAFETY: a helper with no pointer arguments.
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
        if id != 0 {
            // SAFETY: the map value is a plain u32 copied out at once.
            if let Some(p) = unsafe { CGROUP_POLICY.get(id) } {
                policy = *p;
                break;
            }
        }
        level -= 1;
    }
    if policy != POLICY_ON {
        count(COUNTER_SKIPPED_POLICY);
        return None;
    }
    // SAFETY: the helper reads the context it is given; NULL asks for the initial netns.
    let (mine, host) = unsafe {
        (
            bpf_get_netns_cookie(ctx.sock_addr.cast()),
            bpf_get_netns_cookie(core::ptr::null_mut()),
        )
    };
    Some(mine == host)
}

fn settings() -> Option<&'static Settings> {
    SETTINGS.get(0)
}

fn remember(ctx: &SockAddrContext, orig: &OrigDst) {
    let mut value = *orig;
    // SAFETY: the helper reads the context's socket; the storage is created with `value`.
    let slot = unsafe { ORIG_DST.get_or_insert_ptr_mut(ctx, Some(&mut value)) };
    if !slot.is_null() {
        // SAFETY: non-null storage of this socket, written only here.
        unsafe { *slot = *orig };
    }
}

fn orig_dst(ctx: &SockAddrContext) -> Option<OrigDst> {
    // SAFETY: as in `remember`; a null pointer means no storage.
    let slot = unsafe { ORIG_DST.get_ptr_mut(ctx) };
    if slot.is_null() {
        return None;
    }
    // SAFETY: checked non-null just above.
    Some(unsafe { *slot })
}

/// Rewrites a connect to an IPv4 VIP (also used for v4-mapped IPv6 connects); returns the
/// new IPv4 address and port, or `None` to leave the connect alone.
fn redirect_v4(ctx: &SockAddrContext, ip: u32, port: u32) -> Option<(u32, u32)> {
    // SAFETY: the value is copied out at once.
    let svc = unsafe { SERVICES_V4.get(ServiceKeyV4 { ip, port }) }.copied()?;
    let settings = settings()?;
    let host = decide(ctx, settings)?;
    let target = if host { svc.host_ip4 } else { settings.pod_ip4 };
    if target == 0 {
        count(COUNTER_SKIPPED_NO_POD_ADDRESS);
        return None;
    }
    Some((target, svc.port))
}

#[cgroup_sock_addr(connect4)]
pub fn redis_intercept_connect4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel hands the program a valid, exclusive `bpf_sock_addr` for the
    // length of this run; the verifier checks every field access.
    let sa: &mut bpf_sock_addr = unsafe { &mut *ctx.sock_addr };
    if sa.protocol != IPPROTO_TCP {
        return PROCEED;
    }
    let (ip, port) = (sa.user_ip4, sa.user_port);
    if let Some((to_ip, to_port)) = redirect_v4(&ctx, ip, port) {
        remember(
            &ctx,
            &OrigDst {
                ip4: ip,
                ip6: [0; 4],
                port,
                family: 4,
            },
        );
        sa.user_ip4 = to_ip;
        sa.user_port = to_port;
        count(COUNTER_REDIRECTED);
    }
    PROCEED
}

#[cgroup_sock_addr(connect6)]
pub fn redis_intercept_connect6(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel hands the program a valid, exclusive `bpf_sock_addr` for the
    // length of this run; the verifier checks every field access.
    let sa: &mut bpf_sock_addr = unsafe { &mut *ctx.sock_addr };
    if sa.protocol != IPPROTO_TCP {
        return PROCEED;
    }
    // Word by word: the verifier refuses the array as a whole.
    let w0 = sa.user_ip6[0];
    let w1 = sa.user_ip6[1];
    let w2 = sa.user_ip6[2];
    let w3 = sa.user_ip6[3];
    let port = sa.user_port;
    if w0 == 0 && w1 == 0 && w2 == V4_MAPPED_WORD {
        // ::ffff:a.b.c.d from a dual-stack socket: an IPv4 VIP.
        if let Some((to_ip, to_port)) = redirect_v4(&ctx, w3, port) {
            remember(
                &ctx,
                &OrigDst {
                    ip4: w3,
                    ip6: [0; 4],
                    port,
                    family: 4,
                },
            );
            sa.user_ip6[3] = to_ip;
            sa.user_port = to_port;
            count(COUNTER_REDIRECTED);
        }
        return PROCEED;
    }
    let key = ServiceKeyV6 {
        ip: [w0, w1, w2, w3],
        port,
    };
    // SAFETY: the value is copied out at once.
    let Some(svc) = (unsafe { SERVICES_V6.get(key) }).copied() else {
        return PROCEED;
    };
    let Some(settings) = settings() else {
        return PROCEED;
    };
    let Some(host) = decide(&ctx, settings) else {
        return PROCEED;
    };
    let target = if host { svc.host_ip6 } else { settings.pod_ip6 };
    if target == [0; 4] {
        count(COUNTER_SKIPPED_NO_POD_ADDRESS);
        return PROCEED;
    }
    remember(
        &ctx,
        &OrigDst {
            ip4: 0,
            ip6: [w0, w1, w2, w3],
            port,
            family: 6,
        },
    );
    sa.user_ip6[0] = target[0];
    sa.user_ip6[1] = target[1];
    sa.user_ip6[2] = target[2];
    sa.user_ip6[3] = target[3];
    sa.user_port = svc.port;
    count(COUNTER_REDIRECTED);
    PROCEED
}

#[cgroup_sock_addr(getpeername4)]
pub fn redis_intercept_getpeername4(ctx: SockAddrContext) -> i32 {
    if let Some(orig) = orig_dst(&ctx)
        && orig.family == 4
    {
        // SAFETY: the kernel hands the program a valid, exclusive `bpf_sock_addr` for the
        // length of this run; the verifier checks every field access.
        let sa: &mut bpf_sock_addr = unsafe { &mut *ctx.sock_addr };
        sa.user_ip4 = orig.ip4;
        sa.user_port = orig.port;
    }
    PROCEED
}

#[cgroup_sock_addr(getpeername6)]
pub fn redis_intercept_getpeername6(ctx: SockAddrContext) -> i32 {
    if let Some(orig) = orig_dst(&ctx) {
        // SAFETY: the kernel hands the program a valid, exclusive `bpf_sock_addr` for the
        // length of this run; the verifier checks every field access.
        let sa: &mut bpf_sock_addr = unsafe { &mut *ctx.sock_addr };
        if orig.family == 4 {
            sa.user_ip6[0] = 0;
            sa.user_ip6[1] = 0;
            sa.user_ip6[2] = V4_MAPPED_WORD;
            sa.user_ip6[3] = orig.ip4;
        } else {
            sa.user_ip6[0] = orig.ip6[0];
            sa.user_ip6[1] = orig.ip6[1];
            sa.user_ip6[2] = orig.ip6[2];
            sa.user_ip6[3] = orig.ip6[3];
        }
        sa.user_port = orig.port;
    }
    PROCEED
}

const AF_INET: u32 = 2;

/// A port as `remote_port` gives it (network order, in the high half of the word on
/// little-endian kernels, the low half on some) in host order.
fn remote_port(raw: u32) -> u32 {
    let be = if raw > 0xffff { raw >> 16 } else { raw };
    u32::from(u16::from_be(be as u16))
}

/// Reads a context field at once, at its fixed offset: the verifier refuses a load through a
/// context pointer the compiler computed (for example one chosen by a branch).
macro_rules! rd {
    ($place:expr) => {
        // SAFETY: a field of the context the kernel handed the program.
        unsafe { core::ptr::read_volatile(&raw const $place) }
    };
}

/// [`pick_addrs`] of a `bpf_sock_ops` or `sk_msg_md` (same field names), every field read
/// word by word (the verifier refuses the arrays as a whole).
macro_rules! addrs {
    ($c:ident) => {
        pick_addrs(
            rd!($c.family),
            [rd!($c.local_ip4), rd!($c.remote_ip4)],
            [
                rd!($c.local_ip6[0]),
                rd!($c.local_ip6[1]),
                rd!($c.local_ip6[2]),
                rd!($c.local_ip6[3]),
            ],
            [
                rd!($c.remote_ip6[0]),
                rd!($c.remote_ip6[1]),
                rd!($c.remote_ip6[2]),
                rd!($c.remote_ip6[3]),
            ],
        )
    };
}

/// The local and remote addresses as IPv6 words (IPv4 mapped), from a context's fields of
/// both families.
#[inline(always)]
fn pick_addrs(
    family: u32,
    v4: [u32; 2],
    local6: [u32; 4],
    remote6: [u32; 4],
) -> ([u32; 4], [u32; 4]) {
    if family == AF_INET {
        (v4_mapped(v4[0]), v4_mapped(v4[1]))
    } else {
        (local6, remote6)
    }
}

/// Whether IPv6 words (IPv4 mapped) are a loopback address: 127.0.0.0/8 or ::1.
fn is_loopback(ip: &[u32; 4]) -> bool {
    if ip[0] != 0 || ip[1] != 0 {
        return false;
    }
    (ip[2] == V4_MAPPED_WORD && ip[3].to_ne_bytes()[0] == 127)
        || (ip[2] == 0 && ip[3] == u32::from_ne_bytes([0, 0, 0, 1]))
}

/// Pairs the two ends of a connection to a proxy address once established. A socket that
/// already moved data through TCP (a fast-open SYN) is left out, so that no data of the
/// connection can be overtaken.
#[sock_ops]
pub fn redis_intercept_sockops(ctx: SockOpsContext) -> u32 {
    // SAFETY: the kernel gives a valid context for the program's run.
    let ops = unsafe { &mut *ctx.ops };
    let op = rd!(ops.op);
    if op == BPF_SOCK_OPS_STATE_CB {
        // `args[1]` is the new state for this callback.
        if rd!(ops.__bindgen_anon_1.args[1]) == BPF_TCP_CLOSE {
            let (local_ip, remote_ip) = addrs!(ops);
            let key = SockPair {
                local_ip,
                remote_ip,
                local_port: rd!(ops.local_port),
                remote_port: remote_port(rd!(ops.remote_port)),
            };
            let _ = SOCK_ADDRS.remove(key);
        }
        return 0;
    }
    if op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB && op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB {
        return 0;
    }
    // Every field is read whatever the family, then values (not pointers) are picked: the
    // verifier refuses a context pointer chosen by a branch.
    let (local_ip, remote_ip) = addrs!(ops);
    let mut key = SockPair {
        local_ip,
        remote_ip,
        local_port: rd!(ops.local_port),
        remote_port: remote_port(rd!(ops.remote_port)),
    };
    let (segs_out, segs_in) = (rd!(ops.data_segs_out), rd!(ops.data_segs_in));
    let (proxy, moved) = if op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        let proxy = ProxyAddr {
            ip: key.remote_ip,
            port: key.remote_port,
        };
        (proxy, segs_out)
    } else {
        let proxy = ProxyAddr {
            ip: key.local_ip,
            port: key.local_port,
        };
        (proxy, segs_in)
    };
    // SAFETY: only the presence of the key is used.
    if unsafe { PROXY_ADDRS.get(proxy) }.is_none() || moved != 0 {
        return 0;
    }
    // The proxy runs in the host namespace: a socket elsewhere holding a proxy address is
    // another server's, and another namespace's loopback is its own.
    // SAFETY: the helper reads the context it is given; NULL asks for the initial netns.
    let in_host = unsafe {
        bpf_get_netns_cookie(ctx.ops.cast()) == bpf_get_netns_cookie(core::ptr::null_mut())
    };
    let passive = op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB;
    if !in_host && (passive || is_loopback(&proxy.ip)) {
        return 0;
    }
    // The context's socket, a full one in the established callbacks.
    let sk = rd!(ops.__bindgen_anon_2.sk) as u64;
    if SOCK_PAIRS.update(&mut key, &mut *ops, 0).is_ok() {
        count(COUNTER_PAIRED);
        // The close callback removes the address again; without it (the flag refused) the
        // entry isn't made, so no address outlives its socket. The helper replaces the
        // socket's flags, so those other programs set are kept.
        let flags = rd!(ops.bpf_sock_ops_cb_flags) | BPF_SOCK_OPS_STATE_CB_FLAG;
        // SAFETY: the helper takes the context it is given.
        if sk != 0 && unsafe { bpf_sock_ops_cb_flags_set(ops, flags as i32) } == 0 {
            let _ = SOCK_ADDRS.insert(key, sk, 0);
        }
    }
    0
}

/// Hands a paired socket's write to its peer's receive queue; when the peer isn't paired
/// (not yet, or the map was full) or holds more than `backlog_limit` unread, the write and
/// every later one go through TCP.
#[sk_msg]
pub fn redis_intercept_skmsg(ctx: SkMsgContext) -> u32 {
    // SAFETY: the kernel gives a valid context for the program's run.
    let md = unsafe { &*ctx.msg };
    let (local_ip, remote_ip) = addrs!(md);
    let (local_port, remote_port) = (rd!(md.local_port), remote_port(rd!(md.remote_port)));
    let sk = rd!(md.__bindgen_anon_3.sk).cast::<c_void>();
    let tcp = core::ptr::from_ref(&SOCK_TCP).cast_mut().cast::<c_void>();
    // SAFETY: the helper takes the storage map and the context's own socket; without the
    // create flag it only looks.
    if !unsafe { bpf_sk_storage_get(tcp, sk, core::ptr::null_mut(), 0) }.is_null() {
        return SK_PASS;
    }
    // SAFETY: as above; the create flag makes a zeroed value, which marks the socket.
    let to_tcp = || unsafe {
        bpf_sk_storage_get(
            tcp,
            sk,
            core::ptr::null_mut(),
            u64::from(BPF_SK_STORAGE_GET_F_CREATE),
        )
    };
    let mut peer = SockPair {
        local_ip: remote_ip,
        remote_ip: local_ip,
        local_port: remote_port,
        remote_port: local_port,
    };
    if backlogged(&peer) {
        to_tcp();
        count(COUNTER_BACKLOGGED);
        return SK_PASS;
    }
    if SOCK_PAIRS.redirect_msg(&ctx, &mut peer, u64::from(BPF_F_INGRESS)) == i64::from(SK_PASS) {
        count(COUNTER_SPLICED);
    } else {
        to_tcp();
        count(COUNTER_UNPAIRED);
    }
    SK_PASS
}

/// Whether the socket at `peer` holds more unread bytes than `backlog_limit`. A redirected
/// write is queued on the reader's socket whatever its receive buffer, so a reader that
/// stops reading would otherwise take kernel memory without bound; through TCP its receive
/// window holds the writer back instead.
fn backlogged(peer: &SockPair) -> bool {
    let Some(s) = settings() else {
        return false;
    };
    if s.backlog_limit == 0 || s.rmem_offset == 0 {
        return false;
    }
    // SAFETY: a plain value copied out of the map.
    let Some(&addr) = (unsafe { SOCK_ADDRS.get(peer) }) else {
        return false;
    };
    let mut rmem: i32 = 0;
    // SAFETY: a fault-tolerant kernel read of 4 bytes. The address is a socket's (its entry
    // goes when it closes; TCP sockets are freed by RCU, under which this runs) and the
    // offset comes from the kernel's own BTF. A fault leaves `rmem` at 0.
    let _ = unsafe {
        bpf_probe_read_kernel(
            core::ptr::from_mut(&mut rmem).cast(),
            4,
            addr.wrapping_add(u64::from(s.rmem_offset)) as *const c_void,
        )
    };
    rmem > 0 && rmem.unsigned_abs() > s.backlog_limit
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

// SAFETY: the kernel reads the license from this section by name; nothing else uses the
// symbol, so keeping its name unmangled can't clash.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
