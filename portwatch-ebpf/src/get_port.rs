//! Port allocation: the TCP port conflict check itself.
//!
//! Why this hook: `int inet_csk_get_port(struct sock *sk, unsigned short
//! snum)` is where TCP (`tcp_prot.get_port`, and DCCP's) decides whether a
//! socket may have a port. `__inet_bind` calls it for every bind that
//! reserves a port, and `inet_csk_listen_start` calls it again after the
//! LISTEN transition (a bound socket is checked once more, now as a
//! listener; an unbound one gets its ephemeral port here). fexit sees its
//! verdict: 0 when the port is the socket's (then `skc_num` holds it), and
//! nonzero when the conflict check refused it (1 or -EADDRINUSE, depending
//! on the kernel version; any nonzero counts as refused).
//!
//! What it adds: the verdict is written into the thread's `PENDING_BIND`
//! (matched by socket cookie) or `PENDING_LISTEN` (matched by socket) entry
//! as `port_alloc`. A TCP `bind_failed` or `listen_failed` with EADDRINUSE
//! and `port_alloc = refused` is a port conflict for certain, not some other
//! path returning the same errno; a listen that autobinds takes its port from
//! here, the moment it is allocated.
//!
//! It complements, and does not replace, fexit on `inet_bind`/`inet_listen`
//! and `post_bind4`/`post_bind6`: it sees neither UDP (`udp_v4_get_port`)
//! nor failures decided before the port check (EACCES for a low port,
//! EADDRNOTAVAIL, EINVAL for a bound socket), nor one decided after it (a
//! post_bind program refusing, the listener hash failing), so the errno and
//! the final outcome still come from those hooks. It is one hash lookup per
//! TCP bind or listen on the machine; connect()'s autobind goes through
//! `inet_hash_connect`, not here.
//!
//! Measured on Debian's 5.10.223, 6.1.176 and 6.12.111 under QEMU (the same
//! script of binds on each): a first bind and its listen were `allocated`, a
//! second bind of the same address `refused` (bind_failed EADDRINUSE), the
//! second listen of two SO_REUSEADDR sockets bound to one address `refused`
//! (listen_failed EADDRINUSE: the bind-time check let both in, the listen
//! re-check did not), a listen without bind `allocated` with its ephemeral
//! port, and UDP binds and an IP_BIND_ADDRESS_NO_PORT bind of port 0 null.
//! post_bind and the outcome hooks agreed with it on every call, so it is
//! the TCP witness of *why*, not a second source of *whether*.
//!
//! Fallback: it needs fexit, so it is attached only with the other fexit
//! programs. Without it `port_alloc` stays unknown (null) and `post_bind`
//! plus the outcome hooks report what they always did.

use aya_ebpf::{macros::fexit, programs::FExitContext};
use portwatch_ebpf::port_alloc;

use crate::common::{PENDING_BIND, PENDING_LISTEN, current_tid, offsets, read_field};
use crate::variant;

#[fexit(function = "inet_csk_get_port")]
pub fn fexit_inet_csk_get_port(ctx: FExitContext) -> i32 {
    if variant::EMPTY {
        return 0;
    }
    // int inet_csk_get_port(struct sock *sk, unsigned short snum)
    let sk: u64 = ctx.arg(0);
    let ret: i32 = ctx.arg(2);
    on_get_port(sk, ret);
    0
}

/// Records the verdict in the pending bind or listen of this socket, if
/// this thread has one.
#[inline(always)]
fn on_get_port(sk: u64, ret: i32) {
    let verdict = if ret == 0 {
        port_alloc::ALLOCATED
    } else {
        port_alloc::REFUSED
    };
    let tid = current_tid();
    if let Some(pending) = PENDING_LISTEN.get_ptr_mut(tid) {
        // SAFETY: map value pointer from a successful lookup.
        let pending = unsafe { &mut *pending };
        if pending.sk == sk {
            let event = &mut pending.event;
            event.port_alloc = verdict;
            if ret == 0
                && event.port == 0
                && let Some(port) = read_field::<u16>(sk, offsets().sk_num)
            {
                // listen() autobind: this is the port it was given.
                event.port = port;
                event.bound_port = port;
            }
            return;
        }
    }
    if let Some(pending) = PENDING_BIND.get_ptr_mut(tid) {
        // SAFETY: map value pointer from a successful lookup.
        let event = unsafe { &mut (*pending).event };
        // The bind hook asked for the cookie, so the socket has one by now.
        if event.cookie != 0 && read_field::<u64>(sk, offsets().sk_cookie) == Some(event.cookie) {
            event.port_alloc = verdict;
        }
    }
}
