//! `#[repr(C)]` types and constants shared by the userspace agent and the eBPF programs.
//!
//! Both sides must agree on these byte for byte, so every type here is plain old data with no
//! implicit padding. The intercept issue adds the map key and value types.
#![no_std]

/// Socket mark the proxy sets on its own upstream sockets so that the connect hook never
/// redirects the proxy to itself ("rI" in ASCII, unlikely to clash with other marks).
pub const PROXY_SO_MARK: u32 = 0x7249;

/// Name of the eBPF object embedded in the agent and built by `cargo xtask build-ebpf`.
pub const EBPF_OBJECT_NAME: &str = "redis-intercept-ebpf";

/// Name of the `cgroup/connect4` program inside the eBPF object.
pub const CONNECT4_PROGRAM: &str = "redis_intercept_connect4";
