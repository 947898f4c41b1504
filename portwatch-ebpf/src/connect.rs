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
//!   higher than bind rates. Only what the outcome cannot read is parked
//!   (the destination, the socket's identity): the task, the socket's port
//!   and options are read when a record is sent, which few connects need.
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
use portwatch_ebpf::{
    AF_INET, AF_INET6, Event, hook, kind, opt, source,
    tracepoint::{
        SET_STATE_DADDR, SET_STATE_DADDR_V6, SET_STATE_DPORT, SET_STATE_FAMILY, SET_STATE_SKADDR,
        SET_STATE_SPORT, SYS_EXIT_RET,
    },
};

use crate::{
    ALLOW,
    bind::flush_if_inferred,
    common::{
        EVENTS, TRACKED, count_drop, current_tid, emit, fill_options_from_sock, fill_task,
        netns_by_inode, netns_id, offsets, outcome_inferred, read_field, sock_of_socket,
        task_is_watched,
    },
    variant,
};

const IPPROTO_TCP: u16 = 6;

// The errnos of a connect that found no local port (uapi values).
const EAGAIN: i64 = 11;
const EADDRINUSE: i64 = 98;
const EADDRNOTAVAIL: i64 = 99;
/// A non-blocking connect under way: the local port is taken.
const EINPROGRESS: i64 = 115;

/// A connect waiting for its outcome: what only the connect hook sees.
#[derive(Clone, Copy)]
#[repr(C)]
pub struct PendingConnect {
    pub cookie: u64,
    pub netns_cookie: u64,
    /// The `struct sock`, for its port and options if a record is sent.
    pub sk: u64,
    /// The destination, network byte order; IPv4 in the first 4 bytes.
    pub peer_addr: [u8; 16],
    /// The destination port, host byte order.
    pub peer_port: u16,
    pub family: u16,
    pub protocol: u16,
    pub sock_type: u8,
    /// 1 when the socket is in `TRACKED`.
    pub tracked: u8,
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
    if variant::EMPTY {
        return ALLOW;
    }
    on_connect(&ctx, false);
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    if variant::EMPTY {
        return ALLOW;
    }
    on_connect(&ctx, true);
    ALLOW
}

/// `v6` is a constant per program: connect4 may read only `user_ip4`,
/// connect6 only `user_ip6`.
///
/// Where outcomes are inferred nothing is parked: a tracked socket's
/// connect is sent now (it holds its port whatever the connect's fate), and
/// a TCP connect that finds no port is seen by `inet_sock_set_state`
/// leaving SYN_SENT without one (`listen.rs`).
#[inline(always)]
fn on_connect(ctx: &SockAddrContext, v6: bool) {
    let inferred = outcome_inferred();
    if inferred {
        flush_if_inferred();
    }
    let sa = ctx.sock_addr;
    // SAFETY: `sa` is the verifier-checked context; the helper takes it as is.
    let cookie = unsafe { bpf_get_socket_cookie(sa.cast()) };
    let tracked = TRACKED.get_ptr(cookie).is_some();
    if inferred && !tracked {
        // Nothing to park and nothing to send: most connects end here.
        return;
    }
    let mut pending = PendingConnect {
        cookie,
        netns_cookie: 0,
        sk: 0,
        peer_addr: [0; 16],
        peer_port: 0,
        family: if v6 { AF_INET6 } else { AF_INET },
        protocol: 0,
        sock_type: 0,
        tracked: 0,
    };
    // SAFETY: `sa` is the verifier-checked context; helpers take it as is.
    unsafe {
        let raw: &bpf_sock_addr = &*sa;
        pending.sock_type = raw.type_ as u8;
        pending.protocol = raw.protocol as u16;
        // user_port holds the port in network byte order in its low 16 bits.
        pending.peer_port = u16::from_be(raw.user_port as u16);
        if !v6 {
            pending.peer_addr[..4].copy_from_slice(&raw.user_ip4.to_ne_bytes());
        } else {
            for (i, word) in raw.user_ip6.iter().enumerate() {
                pending.peer_addr[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
            }
        }
        // `struct bpf_sock_addr_kern` starts with `struct sock *sk`.
        pending.sk = bpf_probe_read_kernel(sa as *const u64).unwrap_or(0);
        pending.netns_cookie = if netns_by_inode() {
            netns_id(pending.sk).unwrap_or(0)
        } else {
            bpf_get_netns_cookie(sa.cast())
        };
    }
    pending.tracked = u8::from(tracked);
    if inferred {
        let mut event = Event::ZERO;
        connect_event(&pending, pending.sk, kind::CONNECTED, &mut event);
        event.source = source::UNRESOLVED;
        emit(&event, hook::CONNECT);
        return;
    }
    if PENDING_CONNECT.insert(current_tid(), pending, 0).is_err() {
        count_drop(hook::CONNECT);
    }
}

/// The record of a parked connect of `kind`: the task (the one that
/// connected: outcomes run in its context), what was parked, and the
/// socket's port, IP_BIND_ADDRESS_NO_PORT and owner read from `sk` now.
#[inline(always)]
fn connect_event(pending: &PendingConnect, sk: u64, kind: u8, event: &mut Event) {
    event.kind = kind;
    fill_task(event);
    event.family = pending.family;
    event.sock_type = pending.sock_type;
    event.protocol = pending.protocol;
    event.peer_port = pending.peer_port;
    event.peer_addr = pending.peer_addr;
    event.cookie = pending.cookie;
    event.netns_cookie = pending.netns_cookie;
    if sk == 0 {
        return;
    }
    // A failed connect leaves the port as it was: 0, or the one it was
    // bound to; a successful one has the port it connected from.
    if let Some(port) = read_field::<u16>(sk, offsets().sk_num) {
        event.port = port;
        event.bound_port = port;
    }
    fill_options_from_sock(event, sk, opt::BIND_ADDRESS_NO_PORT);
    if let Some(uid) = read_field::<u32>(sk, offsets().sk_uid) {
        event.sock_uid = uid;
    }
}

/// Completes the connect parked for this thread with its return value.
/// `sk` is the socket whose connect returned (0 where unknown, as in a
/// syscall tracepoint): an attempt parked for another socket is dropped.
#[inline(always)]
fn finish_connect(ret: i64, src: u8, sk: u64) {
    let tid = current_tid();
    let Some(pending) = PENDING_CONNECT.get_ptr(tid) else {
        return; // not an inet connect in the watched cgroup
    };
    // SAFETY: map value pointer from a successful lookup; copied before the
    // entry is deleted.
    let pending = unsafe { *pending };
    let _ = PENDING_CONNECT.remove(tid);
    let same = sk == 0
        || read_field::<u64>(sk, offsets().sk_cookie).is_none_or(|cookie| cookie == pending.cookie);
    if !same {
        return;
    }
    // The socket the connect returned for, or the one parked (the same
    // socket: it is still open while its connect returns).
    let sk = if sk != 0 { sk } else { pending.sk };
    let errno = -ret;
    let kind = if errno == EADDRNOTAVAIL || errno == EAGAIN || errno == EADDRINUSE {
        kind::CONNECT_FAILED
    } else if (ret == 0 || errno == EINPROGRESS) && pending.tracked == 1 {
        kind::CONNECTED
    } else {
        return;
    };
    let mut event = Event::ZERO;
    connect_event(&pending, sk, kind, &mut event);
    if kind == kind::CONNECT_FAILED {
        event.errno = errno as i32;
    }
    event.source = src;
    emit(&event, hook::CONNECT_OUTCOME);
}

/// Where outcomes are inferred: a TCP socket left SYN_SENT for CLOSE (the
/// `inet_sock_set_state` record in `ctx`). With no local port it is a
/// connect that found none: `tcp_v4_connect` and `tcp_v6_connect` set
/// SYN_SENT, then fail `inet_hash_connect` (EADDRNOTAVAIL) and fall back to
/// CLOSE before any port is the socket's. A refused or reset connection
/// leaves SYN_SENT with its port. Runs in the connecting task's context.
///
/// Not inlined, and written in place in the ring buffer: the set_state
/// program's frame is near the verifier's 512-byte limit.
#[inline(never)]
pub fn connect_found_no_port(ctx: &TracePointContext) -> Result<(), i32> {
    // SAFETY: offsets of the tracepoint format, verified by userspace.
    let (sport, sk) = unsafe {
        (
            ctx.read_at::<u16>(SET_STATE_SPORT)?,
            ctx.read_at::<u64>(SET_STATE_SKADDR)?,
        )
    };
    if sport != 0 || !task_is_watched() || variant::UNSENT {
        return Ok(());
    }
    let Some(mut entry) = EVENTS.reserve::<Event>(0) else {
        count_drop(hook::CONNECT);
        return Ok(());
    };
    let event = entry.write(Event::ZERO);
    event.kind = kind::CONNECT_FAILED;
    fill_task(event);
    event.protocol = IPPROTO_TCP;
    event.sock_type = 1; // SOCK_STREAM
    event.errno = EADDRNOTAVAIL as i32;
    event.source = source::STATE;
    // SAFETY: offsets of the tracepoint format, verified by userspace.
    unsafe {
        event.family = ctx.read_at::<u16>(SET_STATE_FAMILY).unwrap_or(0);
        event.peer_port = ctx.read_at::<u16>(SET_STATE_DPORT).unwrap_or(0);
        if event.family == AF_INET {
            if let Ok(v4) = ctx.read_at::<[u8; 4]>(SET_STATE_DADDR) {
                event.peer_addr[..4].copy_from_slice(&v4);
            }
        } else if let Ok(v6) = ctx.read_at::<[u8; 16]>(SET_STATE_DADDR_V6) {
            event.peer_addr = v6;
        }
    }
    event.cookie = read_field::<u64>(sk, offsets().sk_cookie).unwrap_or(0);
    event.netns_cookie = netns_id(sk).unwrap_or(0);
    fill_options_from_sock(event, sk, opt::BIND_ADDRESS_NO_PORT);
    if let Some(uid) = read_field::<u32>(sk, offsets().sk_uid) {
        event.sock_uid = uid;
    }
    entry.submit(0);
    Ok(())
}

/// On the tracepoint path, a connect(2) starting: whatever is still parked
/// for this thread is not this call's (see the module header).
#[tracepoint(category = "syscalls", name = "sys_enter_connect")]
pub fn sys_enter_connect(_ctx: TracePointContext) -> u32 {
    if variant::EMPTY {
        return 0;
    }
    let _ = PENDING_CONNECT.remove(current_tid());
    0
}

#[tracepoint(category = "syscalls", name = "sys_exit_connect")]
pub fn sys_exit_connect(ctx: TracePointContext) -> u32 {
    if variant::EMPTY {
        return 0;
    }
    // SAFETY: `ret` sits at this offset in every sys_exit record; userspace
    // checks the format file before attaching.
    if let Ok(ret) = unsafe { ctx.read_at::<i64>(SYS_EXIT_RET) } {
        finish_connect(ret, source::SYSCALL_EXIT, 0);
    }
    0
}

#[fexit(function = "inet_stream_connect")]
pub fn fexit_inet_stream_connect(ctx: FExitContext) -> i32 {
    if variant::EMPTY {
        return 0;
    }
    // int inet_stream_connect(struct socket *sock, struct sockaddr *uaddr,
    //                         int addr_len, int flags)
    let ret: i32 = ctx.arg(4);
    finish_connect(ret as i64, source::FEXIT, sock_of_socket(ctx.arg(0)));
    0
}

#[fexit(function = "inet_dgram_connect")]
pub fn fexit_inet_dgram_connect(ctx: FExitContext) -> i32 {
    if variant::EMPTY {
        return 0;
    }
    // int inet_dgram_connect(struct socket *sock, struct sockaddr *uaddr,
    //                        int addr_len, int flags)
    let ret: i32 = ctx.arg(4);
    finish_connect(ret as i64, source::FEXIT, sock_of_socket(ctx.arg(0)));
    0
}
