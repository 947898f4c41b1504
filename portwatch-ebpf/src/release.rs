//! Release: a tracked socket goes away and its port is free again.
//!
//! Why this hook: cgroup `sock_release` runs in `inet_release` for every
//! AF_INET/AF_INET6 socket created in the watched cgroup, when its last
//! reference is dropped (close, exit, SIGKILL). It is the only place UDP
//! sockets and TCP sockets that were bound but never listened end. Only the
//! socket's family, type, protocol and cookie can be read there (the verifier
//! refuses `src_port`), so userspace maps the cookie back to what it knew.
//! Only cookies in `TRACKED` are reported: ordinary connections never are.
//!
//! Returns ALLOW on every path.

use aya_ebpf::{
    helpers::generated::bpf_get_socket_cookie, macros::cgroup_sock, programs::SockContext,
};
use portwatch_ebpf::{hook, kind, source};

use crate::{
    ALLOW,
    common::{TRACKED, emit, sock_event},
};

#[cgroup_sock(sock_release)]
pub fn sock_release(ctx: SockContext) -> i32 {
    // SAFETY: verifier-checked context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock.cast()) };
    if TRACKED.get_ptr(cookie).is_none() {
        return ALLOW;
    }
    let _ = TRACKED.remove(cookie);
    let mut event = sock_event(&ctx, kind::CLOSE);
    event.cookie = cookie;
    event.source = source::RELEASE;
    emit(&event, hook::RELEASE);
    ALLOW
}
