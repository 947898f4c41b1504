//! portwatch's kernel programs.
//!
//! One file per hook family; each explains why that hook was chosen:
//! - `bind.rs`: cgroup `bind4`/`bind6` (the attempt), `post_bind4`/`post_bind6`
//!   (success and the real port), and the outcome with its errno from fexit on
//!   `inet_bind`/`inet6_bind` or, where fexit is refused, `sys_exit_bind`;
//!   the bind hooks come in a `bpf_getsockopt` and a socket-bits variant;
//! - `get_port.rs`: fexit on `inet_csk_get_port`, TCP's port allocation, where
//!   fexit is allowed;
//! - `connect.rs`: cgroup `connect4`/`connect6` (the attempt and its
//!   destination) and the outcome from fexit on `inet_stream_connect`/
//!   `inet_dgram_connect` or `sys_exit_connect`: connects that find no local
//!   port, and tracked sockets that connect;
//! - `listen.rs`: `sock/inet_sock_set_state` for LISTEN and LISTEN -> CLOSE,
//!   with fexit on `inet_listen` or `sys_exit_listen` for the outcome;
//! - `create.rs`: cgroup `sock_create`, which gives every socket its cookie
//!   at birth;
//! - `release.rs`: cgroup `sock_release` and `tcp/tcp_destroy_sock`, to
//!   forget sockets that go away.
//!
//! portwatch observes and never decides: every cgroup program returns
//! [`ALLOW`] on every path, including errors and full maps.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]

#[cfg(target_arch = "bpf")]
mod bind;
#[cfg(target_arch = "bpf")]
mod common;
#[cfg(target_arch = "bpf")]
mod connect;
#[cfg(target_arch = "bpf")]
mod create;
#[cfg(target_arch = "bpf")]
mod get_port;
#[cfg(target_arch = "bpf")]
mod listen;
#[cfg(target_arch = "bpf")]
mod release;

/// The bench's variants of these programs, chosen when they are built, to
/// measure where their cost lies: `PORTWATCH_EBPF_VARIANT`, which only
/// `cargo xtask bench --ebpf-variant` sets. In every other build both are
/// false and compiled away.
#[cfg(target_arch = "bpf")]
mod variant {
    /// `empty`: every program returns at its first instruction, what the
    /// hooks cost with nothing in them.
    pub const EMPTY: bool = built_as("empty");
    /// `unsent`: the programs do all their work but send no record.
    pub const UNSENT: bool = built_as("unsent");

    const fn built_as(name: &str) -> bool {
        let Some(variant) = option_env!("PORTWATCH_EBPF_VARIANT") else {
            return false;
        };
        let (a, b) = (variant.as_bytes(), name.as_bytes());
        if a.len() != b.len() {
            return false;
        }
        let mut i = 0;
        while i < a.len() {
            if a[i] != b[i] {
                return false;
            }
            i += 1;
        }
        true
    }
}

/// What a cgroup program returns to let the operation go on.
#[cfg(target_arch = "bpf")]
const ALLOW: i32 = 1;

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any reachable panic, so this is never entered.
    loop {}
}

/// `bpf_probe_read_kernel` is GPL-only; the rest is MIT.
#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

/// Built for the host this crate is only its library (the wire types); the
/// programs exist for the bpf target alone.
#[cfg(not(target_arch = "bpf"))]
fn main() {}
