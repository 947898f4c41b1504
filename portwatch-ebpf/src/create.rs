//! Create: every inet socket of the watched cgroup gets its identity at
//! birth.
//!
//! Why this hook: a socket's cookie is assigned the first time something
//! asks for it, and the other hooks can only ask where a helper exists. A
//! socket that listens without binding first (listen() picks its port) met
//! no cgroup hook before `inet_sock_set_state` saw it start listening, and a
//! tracepoint cannot ask: its cookie read 0, so the listener had no
//! identity, was never tracked, and its close was never reported. cgroup
//! `sock_create` runs in `inet_create` for every AF_INET/AF_INET6 socket
//! made in the watched cgroup (not for accepted connections, which
//! `accept()` clones); asking for the cookie there costs one per-CPU counter
//! step per socket().
//!
//! Cookies are then in creation order, not bind order; nothing relies on
//! bind order from cookies (`rules::predict_bind_unordered`).
//!
//! Returns ALLOW on every path.

use aya_ebpf::{
    helpers::generated::bpf_get_socket_cookie, macros::cgroup_sock, programs::SockContext,
};

use crate::{ALLOW, variant};

#[cgroup_sock(sock_create)]
pub fn sock_create(ctx: SockContext) -> i32 {
    if variant::EMPTY {
        return ALLOW;
    }
    // SAFETY: verifier-checked context; the helper assigns the cookie.
    unsafe { bpf_get_socket_cookie(ctx.sock.cast()) };
    ALLOW
}
