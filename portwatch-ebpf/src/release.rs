//! Release: a tracked socket goes away and its port is free again.
//!
//! Why these hooks:
//! - cgroup `sock_release` runs in `inet_release` for every AF_INET/AF_INET6
//!   socket created in the watched cgroup, when its last reference is
//!   dropped (close, exit, SIGKILL). It is the only place UDP sockets and
//!   TCP sockets that were bound but never listened end. Only the socket's
//!   family, type, protocol and cookie can be read there (the verifier
//!   refuses `src_port`), so userspace maps the cookie back to what it knew.
//!   `inet_release` skips it for kernel sockets (`sk_kern_sock`).
//! - `tcp/tcp_destroy_sock` fires in `tcp_v4_destroy_sock` when any TCP
//!   socket is freed, including those no `inet_release` of ours saw: an
//!   MPTCP socket's subflow (the TCP socket that holds the port: MPTCP
//!   closes it directly, and on close its listener only falls back from
//!   LISTEN to CLOSE first), kernel-owned TCP sockets, and sockets created
//!   outside a `--cgroup` subtree that the snapshot found. A socket the
//!   release hook already reported is no longer tracked, so nothing is
//!   reported twice.
//!
//! Only cookies in `TRACKED` are reported, and each is untracked as it is:
//! ordinary connections never are. Where outcomes are inferred, the release
//! also sends on a bind its thread left parked (see `bind.rs`).
//!
//! `sock_release` returns ALLOW on every path.

use aya_ebpf::{
    helpers::generated::bpf_get_socket_cookie,
    macros::{cgroup_sock, tracepoint},
    programs::{SockContext, TracePointContext},
};
use portwatch_ebpf::{Event, hook, kind, source, tracepoint::DESTROY_SKADDR};

use crate::{
    ALLOW,
    bind::flush_if_inferred,
    common::{TRACKED, emit, fill_task, offsets, read_field, sock_event},
    variant,
};

#[cgroup_sock(sock_release)]
pub fn sock_release(ctx: SockContext) -> i32 {
    if variant::EMPTY {
        return ALLOW;
    }
    // The thread is closing a socket: a bind it parked is over.
    flush_if_inferred();
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

#[tracepoint(category = "tcp", name = "tcp_destroy_sock")]
pub fn tcp_destroy_sock(ctx: TracePointContext) -> u32 {
    if variant::EMPTY {
        return 0;
    }
    // SAFETY: offsets of the tracepoint format, verified by userspace.
    let Ok(skaddr) = (unsafe { ctx.read_at::<u64>(DESTROY_SKADDR) }) else {
        return 0;
    };
    let Some(cookie) = read_field::<u64>(skaddr, offsets().sk_cookie) else {
        return 0;
    };
    if cookie == 0 || TRACKED.get_ptr(cookie).is_none() {
        return 0;
    }
    let _ = TRACKED.remove(cookie);
    let mut event = Event::ZERO;
    event.kind = kind::CLOSE;
    fill_task(&mut event);
    event.family = read_field::<u16>(skaddr, offsets().sk_family).unwrap_or(0);
    event.sock_type = 1; // SOCK_STREAM
    event.protocol = 6; // IPPROTO_TCP
    event.cookie = cookie;
    event.source = source::DESTROY;
    emit(&event, hook::RELEASE);
    0
}
