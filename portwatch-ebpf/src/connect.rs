//! Connect: outgoing connections that find no local port, and tracked
//! sockets that connect.
//!
//! Why these hooks:
//! - cgroup `connect4`/`connect6` (sock_addr) run in the protocol's
//!   `pre_connect`, inside `inet_stream_connect`/`inet_dgram_connect`, for
//!   every TCP and UDP connect of a task in the watched cgroup, before the
//!   kernel picks a local port. They see the destination, the socket's
//!   cookie, namespace, type and protocol. The attempt is parked in
//!   `PENDING_CONNECT` under the thread id; nothing is emitted yet, so a
//!   successful connect of an untracked socket (nearly every one) costs one
//!   map update and one delete, and never a record: connection rates are far
//!   higher than bind rates.
//! - The outcome comes from the return of the connect:
//!   - fexit on `inet_stream_connect`/`inet_dgram_connect` where fexit is
//!     allowed (the `proto_ops` functions of both families; they also run
//!     for io_uring's IORING_OP_CONNECT);
//!   - else the `syscalls/sys_exit_connect` tracepoint, paired with
//!     `sys_enter_connect`, which drops whatever an earlier call left
//!     parked (an io_uring connect, whose exit the tracepoint never sees),
//!     so that a later connect(2) of another family never completes it.
//!
//!   A record is sent only for what runs out of ports (EADDRNOTAVAIL,
//!   EAGAIN, EADDRINUSE: kind `CONNECT_FAILED`, with the destination), and
//!   for a socket in `TRACKED` that connected (`CONNECTED`): a bound UDP
//!   socket that stops being a listener, or a TCP socket bound before it
//!   connected, which holds its port for every destination.
//! - New outgoing TCP connections are counted, not sent: the
//!   `inet_sock_set_state` program (`listen.rs`, the one program on that
//!   tracepoint) adds one per CLOSE -> SYN_SENT to a per-CPU counter of the
//!   socket's network namespace, for the allocation rate. Machine-wide, like
//!   the ephemeral listing it goes with.
//!
//! Every cgroup program here returns ALLOW on every path.

use aya_ebpf::{
    bindings::{BPF_NOEXIST, bpf_sock_addr},
    helpers::{
        bpf_probe_read_kernel,
        generated::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    },
    macros::{cgroup_sock_addr, fexit, map, tracepoint},
    maps::{HashMap, PerCpuHashMap},
    programs::{FExitContext, SockAddrContext, TracePointContext},
};
use portwatch_ebpf::{AF_INET, AF_INET6, Event, hook, kind, opt, source, tracepoint::SYS_EXIT_RET};

use crate::{
    ALLOW,
    common::{
        TRACKED, count_drop, current_tid, emit, fill_options_from_sock, fill_task, netns_by_inode,
        netns_id, offsets, read_field, sock_of_socket,
    },
};

// The errnos of a connect that found no local port (uapi values).
const EAGAIN: i64 = 11;
const EADDRINUSE: i64 = 98;
const EADDRNOTAVAIL: i64 = 99;
/// A non-blocking connect under way: the local port is taken.
const EINPROGRESS: i64 = 115;

/// A connect waiting for its outcome.
#[derive(Clone, Copy)]
#[repr(C)]
pub struct PendingConnect {
    pub event: Event,
    /// 1 when the socket is in `TRACKED`.
    pub tracked: u8,
    pub _pad: [u8; 7],
}

/// Connects waiting for their outcome, by thread id. Preallocated, as every
/// map a tracepoint program uses (see `TRACKED`).
#[map]
pub static PENDING_CONNECT: HashMap<u32, PendingConnect> = HashMap::with_max_entries(16384, 0);

/// New outgoing TCP connections (CLOSE -> SYN_SENT) per network namespace
/// id, per CPU, since the programs were loaded. Preallocated; a namespace
/// past the capacity is counted under id 0.
#[map]
pub static CONNECTS: PerCpuHashMap<u64, u64> = PerCpuHashMap::with_max_entries(4096, 0);

/// Counts one new outgoing connection of socket `sk`. Not inlined: its
/// locals stay out of the set_state program's frame, whose LISTEN path is
/// near the verifier's 512-byte stack limit.
#[inline(never)]
pub fn count_connect(sk: u64) {
    let netns = netns_id(sk).unwrap_or(0);
    for key in [netns, 0] {
        if let Some(count) = CONNECTS.get_ptr_mut(key) {
            // SAFETY: this CPU's slot; only this CPU writes it while we run.
            unsafe { *count += 1 };
            return;
        }
        // A first connection in the namespace (or a race with another
        // CPU's first, which then holds the entry: counted on the next).
        if CONNECTS.insert(key, 1, BPF_NOEXIST.into()).is_ok() {
            return;
        }
    }
}

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    on_connect(&ctx, false);
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    on_connect(&ctx, true);
    ALLOW
}

/// `v6` is a constant per program: connect4 may read only `user_ip4`,
/// connect6 only `user_ip6`.
#[inline(always)]
fn on_connect(ctx: &SockAddrContext, v6: bool) {
    let sa = ctx.sock_addr;
    let mut event = Event::ZERO;
    fill_task(&mut event);
    // SAFETY: `sa` is the verifier-checked context; helpers take it as is.
    unsafe {
        let raw: &bpf_sock_addr = &*sa;
        event.family = if v6 { AF_INET6 } else { AF_INET };
        event.sock_type = raw.type_ as u8;
        event.protocol = raw.protocol as u16;
        // user_port holds the port in network byte order in its low 16 bits.
        event.peer_port = u16::from_be(raw.user_port as u16);
        if !v6 {
            event.peer_addr[..4].copy_from_slice(&raw.user_ip4.to_ne_bytes());
        } else {
            for (i, word) in raw.user_ip6.iter().enumerate() {
                event.peer_addr[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
            }
        }
        event.cookie = bpf_get_socket_cookie(sa.cast());
        event.netns_cookie = if netns_by_inode() {
            // `struct bpf_sock_addr_kern` starts with `struct sock *sk`.
            bpf_probe_read_kernel(sa as *const u64)
                .ok()
                .and_then(netns_id)
                .unwrap_or(0)
        } else {
            bpf_get_netns_cookie(sa.cast())
        };
    }
    // The socket's own port, if it has one already (bound, or a UDP socket
    // connected before), and IP_BIND_ADDRESS_NO_PORT.
    // SAFETY: probe read of one pointer from the kernel context.
    if let Ok(sk) = unsafe { bpf_probe_read_kernel(sa as *const u64) } {
        if let Some(port) = read_field::<u16>(sk, offsets().sk_num) {
            event.port = port;
            event.bound_port = port;
        }
        fill_options_from_sock(&mut event, sk, opt::BIND_ADDRESS_NO_PORT);
        if let Some(uid) = read_field::<u32>(sk, offsets().sk_uid) {
            event.sock_uid = uid;
        }
    }
    let tracked = u8::from(TRACKED.get_ptr(event.cookie).is_some());
    let pending = PendingConnect {
        event,
        tracked,
        _pad: [0; 7],
    };
    if PENDING_CONNECT.insert(event.tid, pending, 0).is_err() {
        count_drop(hook::CONNECT);
    }
}

/// Completes the connect parked for this thread with its return value.
/// `sk` is the socket whose connect returned (0 where unknown, as in a
/// syscall tracepoint): an attempt parked for another socket is dropped.
#[inline(always)]
fn finish_connect(ret: i64, src: u8, sk: u64) {
    let tid = current_tid();
    let Some(pending) = PENDING_CONNECT.get_ptr_mut(tid) else {
        return; // not an inet connect in the watched cgroup
    };
    // SAFETY: map value pointer from a successful lookup.
    let pending = unsafe { &mut *pending };
    let event = &mut pending.event;
    let same = sk == 0
        || read_field::<u64>(sk, offsets().sk_cookie).is_none_or(|cookie| cookie == event.cookie);
    if same {
        let errno = -ret;
        if errno == EADDRNOTAVAIL || errno == EAGAIN || errno == EADDRINUSE {
            event.kind = kind::CONNECT_FAILED;
            event.errno = errno as i32;
            event.source = src;
            emit(event, hook::CONNECT_OUTCOME);
        } else if (ret == 0 || errno == EINPROGRESS) && pending.tracked == 1 {
            // Its port, now that connect() chose one if it had none.
            if sk != 0
                && let Some(port) = read_field::<u16>(sk, offsets().sk_num)
            {
                event.bound_port = port;
            }
            event.kind = kind::CONNECTED;
            event.source = src;
            emit(event, hook::CONNECT_OUTCOME);
        }
    }
    let _ = PENDING_CONNECT.remove(tid);
}

/// On the tracepoint path, a connect(2) starting: whatever is still parked
/// for this thread is not this call's (see the module header).
#[tracepoint(category = "syscalls", name = "sys_enter_connect")]
pub fn sys_enter_connect(_ctx: TracePointContext) -> u32 {
    let _ = PENDING_CONNECT.remove(current_tid());
    0
}

#[tracepoint(category = "syscalls", name = "sys_exit_connect")]
pub fn sys_exit_connect(ctx: TracePointContext) -> u32 {
    // SAFETY: `ret` sits at this offset in every sys_exit record; userspace
    // checks the format file before attaching.
    if let Ok(ret) = unsafe { ctx.read_at::<i64>(SYS_EXIT_RET) } {
        finish_connect(ret, source::SYSCALL_EXIT, 0);
    }
    0
}

#[fexit(function = "inet_stream_connect")]
pub fn fexit_inet_stream_connect(ctx: FExitContext) -> i32 {
    // int inet_stream_connect(struct socket *sock, struct sockaddr *uaddr,
    //                         int addr_len, int flags)
    let ret: i32 = ctx.arg(4);
    finish_connect(ret as i64, source::FEXIT, sock_of_socket(ctx.arg(0)));
    0
}

#[fexit(function = "inet_dgram_connect")]
pub fn fexit_inet_dgram_connect(ctx: FExitContext) -> i32 {
    // int inet_dgram_connect(struct socket *sock, struct sockaddr *uaddr,
    //                        int addr_len, int flags)
    let ret: i32 = ctx.arg(4);
    finish_connect(ret as i64, source::FEXIT, sock_of_socket(ctx.arg(0)));
    0
}
