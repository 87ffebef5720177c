//! `#[repr(C)]` types and constants shared by the userspace agent and the eBPF programs.
//!
//! Both sides must agree on these byte for byte, so every type here is plain old data made of
//! `u32`/`u64` fields with no implicit padding. Addresses and ports are kept exactly as the
//! kernel shows them in `struct bpf_sock_addr`: IPv4 addresses and each IPv6 word as the
//! network-order bytes read as a native `u32`, ports as the network-order `u16` in the low bits
//! of a `u32`. [`ip4_word`] and [`port_word`] do that conversion for userspace.
#![no_std]

/// Socket mark the proxy sets on its own upstream sockets so that the connect hook never
/// redirects the proxy to itself ("rI" in ASCII, unlikely to clash with other marks).
pub const PROXY_SO_MARK: u32 = 0x7249;

/// Name of the eBPF object embedded in the agent.
pub const EBPF_OBJECT_NAME: &str = "redis-intercept-ebpf";

/// Program names inside the eBPF object.
pub const CONNECT4_PROGRAM: &str = "redis_intercept_connect4";
/// The `cgroup/connect6` program.
pub const CONNECT6_PROGRAM: &str = "redis_intercept_connect6";
/// The `cgroup/getpeername4` program.
pub const GETPEERNAME4_PROGRAM: &str = "redis_intercept_getpeername4";
/// The `cgroup/getpeername6` program.
pub const GETPEERNAME6_PROGRAM: &str = "redis_intercept_getpeername6";

/// The `sock_ops` program that pairs the two ends of a local connection to the proxy.
pub const SOCKOPS_PROGRAM: &str = "redis_intercept_sockops";
/// The `sk_msg` program that hands a paired socket's writes to its peer.
pub const SKMSG_PROGRAM: &str = "redis_intercept_skmsg";

/// Map names inside the eBPF object.
pub const SERVICES_V4_MAP: &str = "RI_SERVICES_V4";
/// IPv6 services.
pub const SERVICES_V6_MAP: &str = "RI_SERVICES_V6";
/// Cgroup id → [`POLICY_ON`] / [`POLICY_OFF`].
pub const CGROUP_POLICY_MAP: &str = "RI_CGROUP_POLICY";
/// One [`Settings`] entry.
pub const SETTINGS_MAP: &str = "RI_SETTINGS";
/// Per-CPU counters, indexed by the `COUNTER_*` constants.
pub const COUNTERS_MAP: &str = "RI_COUNTERS";
/// Per-socket storage of [`OrigDst`], for getpeername.
pub const ORIG_DST_MAP: &str = "RI_ORIG_DST";

/// Proxy addresses ([`ProxyAddr`]) whose local connections are paired.
pub const PROXY_ADDRS_MAP: &str = "RI_PROXY_ADDRS";
/// Sockhash of paired sockets, keyed by [`SockPair`].
pub const SOCK_PAIRS_MAP: &str = "RI_SOCK_PAIRS";
/// Socket storage marking sockets whose writes went through TCP once and so always will.
pub const SOCK_TCP_MAP: &str = "RI_SOCK_TCP";
/// Hash of each paired socket's kernel address by [`SockPair`], so that a writer can read its
/// reader's unread bytes; entries are removed when the socket closes.
pub const SOCK_ADDRS_MAP: &str = "RI_SOCK_ADDRS";

/// Most services per address family.
pub const MAX_SERVICES: u32 = 4096;
/// Most explicit cgroup settings.
pub const MAX_CGROUP_RULES: u32 = 16384;
/// Most proxy addresses in [`PROXY_ADDRS_MAP`] (host and pod address of each service).
pub const MAX_PROXY_ADDRS: u32 = 4 * MAX_SERVICES;
/// Most sockets in [`SOCK_PAIRS_MAP`]: two per connection; beyond it connections use TCP.
pub const MAX_SOCK_PAIRS: u32 = 1 << 18;
/// Deepest cgroup level the policy walk looks at.
pub const MAX_CGROUP_DEPTH: i32 = 32;

/// A cgroup (and what is below it) is intercepted.
pub const POLICY_ON: u32 = 1;
/// A cgroup (and what is below it) is not intercepted.
pub const POLICY_OFF: u32 = 2;

/// Counter: connects rewritten to the proxy.
pub const COUNTER_REDIRECTED: u32 = 0;
/// Counter: connects to a VIP from a socket with the proxy's mark (the proxy itself).
pub const COUNTER_SKIPPED_MARK: u32 = 1;
/// Counter: connects to a VIP from a cgroup whose policy is off.
pub const COUNTER_SKIPPED_POLICY: u32 = 2;
/// Counter: connects to a VIP from another network namespace with no pod address configured.
pub const COUNTER_SKIPPED_NO_POD_ADDRESS: u32 = 3;
/// Counter: sockets added to the pairs map (each end of a connection counts once).
pub const COUNTER_PAIRED: u32 = 4;
/// Counter: writes handed straight to the peer socket.
pub const COUNTER_SPLICED: u32 = 5;
/// Counter: sockets whose writes went through TCP because the peer wasn't paired.
pub const COUNTER_UNPAIRED: u32 = 6;
/// Counter: sockets whose writes went through TCP because their reader held more than
/// `backlog_limit` unread.
pub const COUNTER_BACKLOGGED: u32 = 7;
/// Number of counters.
pub const COUNTERS: u32 = 8;

/// Key of the IPv4 services map: a VIP and port as the kernel shows them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct ServiceKeyV4 {
    /// `user_ip4`.
    pub ip: u32,
    /// `user_port`.
    pub port: u32,
}

/// Key of the IPv6 services map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct ServiceKeyV6 {
    /// `user_ip6`, word by word.
    pub ip: [u32; 4],
    /// `user_port`.
    pub port: u32,
}

/// Where a VIP's connections go: the proxy listener of its service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct ServiceValue {
    /// Proxy address for callers in the host network namespace (IPv4 services).
    pub host_ip4: u32,
    /// Proxy address for callers in the host network namespace (IPv6 services).
    pub host_ip6: [u32; 4],
    /// The proxy listener's port (`user_port` form).
    pub port: u32,
    /// The service's number in the config, for counters and debugging.
    pub service: u32,
    /// Reserved; zero.
    pub flags: u32,
}

/// Settings the programs read from the one-entry settings map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct Settings {
    /// Policy of cgroups with no explicit setting: [`POLICY_ON`] or [`POLICY_OFF`].
    pub default_policy: u32,
    /// Sockets with this mark are never redirected.
    pub proxy_mark: u32,
    /// Proxy address for callers in other network namespaces (pods), IPv4; 0: don't
    /// redirect them.
    pub pod_ip4: u32,
    /// Proxy address for pods, IPv6; all zero: don't redirect them.
    pub pod_ip6: [u32; 4],
    /// Byte offset of `sk_rmem_alloc` in the running kernel's `struct sock`, from its BTF; 0:
    /// unknown, so a paired socket's backlog isn't checked.
    pub rmem_offset: u32,
    /// Bytes a paired socket may hold unread before writers to it go through TCP, whose
    /// receive window then applies back pressure; 0: no limit.
    pub backlog_limit: u32,
}

/// Key of the proxy addresses map: an address and port the proxy accepts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct ProxyAddr {
    /// The address as IPv6 words; IPv4 as `::ffff:a.b.c.d` ([`v4_mapped`]).
    pub ip: [u32; 4],
    /// The port in host order.
    pub port: u32,
}

/// One end of a TCP connection, from its own point of view: the key of the pairs map. The
/// peer of a socket is the same connection with local and remote swapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct SockPair {
    /// Local address, IPv6 words (IPv4 mapped).
    pub local_ip: [u32; 4],
    /// Remote address, IPv6 words (IPv4 mapped).
    pub remote_ip: [u32; 4],
    /// Local port, host order.
    pub local_port: u32,
    /// Remote port, host order.
    pub remote_port: u32,
}

/// The IPv6 words of `::ffff:a.b.c.d` for an IPv4 `user_ip4`-style word, so that an IPv4
/// socket and a dual-stack socket on the same connection agree on its addresses.
pub const fn v4_mapped(ip4: u32) -> [u32; 4] {
    [0, 0, V4_MAPPED_WORD, ip4]
}

/// What a redirected socket originally dialled, for getpeername.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct OrigDst {
    /// The VIP (IPv4 services, and v4-mapped IPv6 connects).
    pub ip4: u32,
    /// The VIP (IPv6 services).
    pub ip6: [u32; 4],
    /// The VIP's port.
    pub port: u32,
    /// 4 or 6: which field holds the address.
    pub family: u32,
}

/// An IPv4 address's octets as the kernel's `user_ip4` word.
pub fn ip4_word(octets: [u8; 4]) -> u32 {
    u32::from_ne_bytes(octets)
}

/// An IPv6 address's octets as the kernel's four `user_ip6` words.
pub fn ip6_words(octets: [u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([octets[0], octets[1], octets[2], octets[3]]),
        u32::from_ne_bytes([octets[4], octets[5], octets[6], octets[7]]),
        u32::from_ne_bytes([octets[8], octets[9], octets[10], octets[11]]),
        u32::from_ne_bytes([octets[12], octets[13], octets[14], octets[15]]),
    ]
}

/// A port as the kernel's `user_port` word.
pub fn port_word(port: u16) -> u32 {
    u32::from(port.to_be())
}

/// The third `user_ip6` word of a v4-mapped address (`::ffff:a.b.c.d`).
pub const V4_MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

#[cfg(feature = "user")]
mod pod {
    // Each type below is `#[repr(C)]` and made only of `u32` fields: no padding, and every bit
    // pattern is valid, as `aya::Pod` requires.
    #[expect(unsafe_code, reason = "aya::Pod is an unsafe marker trait")]
    // SAFETY: `ServiceKeyV4` is `#[repr(C)]` with `u32` fields only (see above).
    unsafe impl aya::Pod for super::ServiceKeyV4 {}
    #[expect(unsafe_code, reason = "aya::Pod is an unsafe marker trait")]
    // SAFETY: `ServiceKeyV6` is `#[repr(C)]` with `u32` fields only (see above).
    unsafe impl aya::Pod for super::ServiceKeyV6 {}
    #[expect(unsafe_code, reason = "aya::Pod is an unsafe marker trait")]
    // SAFETY: `ServiceValue` is `#[repr(C)]` with `u32` fields only (see above).
    unsafe impl aya::Pod for super::ServiceValue {}
    #[expect(unsafe_code, reason = "aya::Pod is an unsafe marker trait")]
    // SAFETY: `Settings` is `#[repr(C)]` with `u32` fields only (see above).
    unsafe impl aya::Pod for super::Settings {}
    #[expect(unsafe_code, reason = "aya::Pod is an unsafe marker trait")]
    // SAFETY: `OrigDst` is `#[repr(C)]` with `u32` fields only (see above).
    unsafe impl aya::Pod for super::OrigDst {}
    #[expect(unsafe_code, reason = "aya::Pod is an unsafe marker trait")]
    // SAFETY: `ProxyAddr` is `#[repr(C)]` with `u32` fields only (see above).
    unsafe impl aya::Pod for super::ProxyAddr {}
    #[expect(unsafe_code, reason = "aya::Pod is an unsafe marker trait")]
    // SAFETY: `SockPair` is `#[repr(C)]` with `u32` fields only (see above).
    unsafe impl aya::Pod for super::SockPair {}
}
