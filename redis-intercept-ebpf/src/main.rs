//! cgroup/connect eBPF programs of redis-intercept.
//!
//! For now this holds one program that lets every connect through unchanged, so the build
//! pipeline (nightly, `rust-src`, `bpf-linker`) is exercised from the first commit. The intercept
//! issue replaces it with the VIP lookup, the cgroup policy walk and the rewrite.
#![no_std]
#![no_main]

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};

/// Allows the connect. Returning 1 is "continue" for cgroup/connect programs, which is also
/// what every error path will return: the hook must fail open.
#[cgroup_sock_addr(connect4)]
pub fn redis_intercept_connect4(_ctx: SockAddrContext) -> i32 {
    // Referenced so the shared crate stays in the object's build graph.
    let _ = redis_intercept_common::PROXY_SO_MARK;
    1
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
