//! Bind: the attempt, its success, and its outcome.
//!
//! Why these hooks:
//! - cgroup `bind4`/`bind6` (sock_addr) run inside `inet_bind`/`inet6_bind`
//!   for every bind on an AF_INET/AF_INET6 socket in the watched cgroup,
//!   whether it came from bind(2) or io_uring's IORING_OP_BIND, before the
//!   kernel looks for a conflict. They see the requested address and port,
//!   the socket options in force and the owner uid. The attempt is parked in
//!   `PENDING_BIND` under the thread id; nothing is emitted yet.
//!
//!   Each comes in two variants, and the loader keeps the first the kernel
//!   accepts:
//!   - `bind4`/`bind6` read SO_REUSEADDR/SO_REUSEPORT with `bpf_getsockopt`
//!     (two calls per bind). Preferred: the helper is a stable ABI and needs
//!     no struct offsets. cgroup bind hooks got it only after 5.10 (there
//!     only the connect hooks have it): 5.10's verifier refuses the program
//!     with "unknown func bpf_getsockopt#57"; Debian's 6.1 and 6.12 take it.
//!   - `bind4_sk`/`bind6_sk` read both from `sock_common`'s `skc_reuse:4` and
//!     `skc_reuseport:1` through the BTF offsets. `sock_getsockopt` returns
//!     exactly those fields (`sk->sk_reuse`, `sk->sk_reuseport` are macros
//!     for them), so the answers are the same; `trace`'s root test
//!     `options_from_sock_bits_match_getsockopt` checks that on every option
//!     combination it makes. The only difference is when the kernel's BTF
//!     lacks those fields: then this variant leaves them unknown (null).
//!
//!   In both, IPV6_V6ONLY and the IP-level options (IP_FREEBIND,
//!   IP_TRANSPARENT, IP_BIND_ADDRESS_NO_PORT) come from the socket's own bits:
//!   `bpf_getsockopt` does not answer them at any level.
//! - cgroup `post_bind4`/`post_bind6` (sock) run in `__inet_bind` right after
//!   `get_port` succeeded: `src_port` holds the real port (an ephemeral one
//!   for port 0). The bind can still fail: every cgroup program attached
//!   there runs and their verdicts are combined, so another tool's program
//!   (Cilium's bind protection, say) can refuse it, and the kernel then
//!   releases the port. So where an outcome hook will run for the bind, the
//!   record waits for it (`PendingBind::deferred`); only where none will
//!   (an io_uring bind on the tracepoint path) is it sent from here.
//! - The outcome and its errno come from the return of the bind:
//!   - fexit on `inet_bind_sk`/`inet6_bind_sk` where they exist (6.3+;
//!     MPTCP's `mptcp_bind` calls them directly for its subflow), else on
//!     `inet_bind`/`inet6_bind`. They run for every inet bind (bind(2),
//!     io_uring, the kernel's own), and complete only the attempt of the
//!     same socket.
//!   - Where fexit is refused, the `syscalls/sys_exit_bind` tracepoint
//!     (format: `long ret` at offset 16), paired with `sys_enter_bind`,
//!     which marks the call as a syscall and flushes whatever an earlier
//!     call left parked, so a bind(2) of any family (AF_UNIX, netlink)
//!     never completes an io_uring attempt. While any syscall tracepoint is
//!     attached every syscall on the machine takes the slow path, which is
//!     why fexit is preferred.
//!
//! An io_uring bind that fails on a kernel without fexit never reaches the
//! syscall tracepoint; its parked attempt is emitted with an unknown errno
//! when the same thread starts its next bind, rather than lost.
//!
//! Where no outcome hook is attached at all (`outcome = "inferred"`, which
//! spares every syscall on the machine the slow path), post_bind sends
//! each success, and an attempt it did not see succeed is sent unresolved
//! as soon as its thread is seen doing anything else: its next bind, a
//! LISTEN transition, a connect, a socket's release. The daemon infers its
//! errno from the conflict rules, and sweeps what a thread left parked and
//! never came back for.
//!
//! Every cgroup program here returns ALLOW on every path.

use aya_ebpf::{
    EbpfContext,
    bindings::bpf_sock_addr,
    helpers::{
        bpf_probe_read_kernel,
        generated::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_getsockopt},
    },
    macros::{cgroup_sock, cgroup_sock_addr, fexit, tracepoint},
    programs::{FExitContext, SockAddrContext, SockContext, TracePointContext},
};
use portwatch_ebpf::{
    AF_INET, AF_INET6, ERRNO_UNKNOWN, Event, PendingBind, bind_state, hook, kind, opt, source,
    tracepoint::SYS_EXIT_RET,
};

use aya_log_ebpf::warn;

use crate::{
    ALLOW,
    common::{
        PENDING_BIND, TRACKED, count_drop, current_tid, emit, fill_options_from_sock, fill_task,
        netns_by_inode, netns_id, offsets, outcome_by_fexit, outcome_inferred, read_field,
        sock_event, sock_of_socket, task_is_watched,
    },
    variant,
};

// Socket option level and names (uapi values, identical on every arch).
const SOL_SOCKET: i32 = 1;
const SO_REUSEADDR: i32 = 2;
const SO_REUSEPORT: i32 = 15;

#[cgroup_sock_addr(bind4)]
pub fn bind4(ctx: SockAddrContext) -> i32 {
    if variant::EMPTY {
        return ALLOW;
    }
    on_bind(&ctx, false, true);
    ALLOW
}

#[cgroup_sock_addr(bind6)]
pub fn bind6(ctx: SockAddrContext) -> i32 {
    if variant::EMPTY {
        return ALLOW;
    }
    on_bind(&ctx, true, true);
    ALLOW
}

/// `bind4` for kernels whose bind hooks lack `bpf_getsockopt`.
#[cgroup_sock_addr(bind4)]
pub fn bind4_sk(ctx: SockAddrContext) -> i32 {
    if variant::EMPTY {
        return ALLOW;
    }
    on_bind(&ctx, false, false);
    ALLOW
}

/// `bind6` for kernels whose bind hooks lack `bpf_getsockopt`.
#[cgroup_sock_addr(bind6)]
pub fn bind6_sk(ctx: SockAddrContext) -> i32 {
    if variant::EMPTY {
        return ALLOW;
    }
    on_bind(&ctx, true, false);
    ALLOW
}

/// `v6` is a constant per program: bind4 may read only `user_ip4`, bind6
/// only `user_ip6`. `getsockopt` too: a program whose kernel lacks the
/// helper must not contain the call at all.
///
/// The record is written straight into its `PENDING_BIND` entry: into the
/// mark a bind(2) left on the tracepoint path, or into a blank entry made
/// for it. Building it on the stack and inserting it cost a second map
/// update and two copies of the record per bind.
#[inline(always)]
fn on_bind(ctx: &SockAddrContext, v6: bool, getsockopt: bool) {
    let tid = current_tid();
    // A bind(2) on the tracepoint path left its mark; anything else still
    // parked is a call whose outcome never came.
    // SAFETY: map value pointer from a successful lookup.
    let in_syscall = PENDING_BIND
        .get_ptr(tid)
        .is_some_and(|pending| unsafe { (*pending).state == bind_state::SYSCALL });
    if !in_syscall {
        flush_stale(tid);
        let blank = PendingBind {
            event: Event::ZERO,
            state: bind_state::SYSCALL,
            deferred: 0,
            _pad: [0; 6],
        };
        if PENDING_BIND.insert(tid, blank, 0).is_err() {
            count_drop(hook::BIND);
            return;
        }
    }
    let Some(pending) = PENDING_BIND.get_ptr_mut(tid) else {
        count_drop(hook::BIND);
        return;
    };
    // SAFETY: map value pointer from a successful lookup; only this thread
    // uses its entry.
    let pending = unsafe { &mut *pending };
    pending.deferred = u8::from(in_syscall || outcome_by_fexit());
    let event = &mut pending.event;
    event.kind = kind::BIND;
    fill_task(event);
    let sa = ctx.sock_addr;
    // SAFETY: `sa` is the verifier-checked context; helpers take it as is.
    unsafe {
        let raw: &bpf_sock_addr = &*sa;
        // The socket's family, not the caller's sa_family: a bind with
        // AF_UNSPEC or a bogus family must still be reported as this socket's.
        event.family = if v6 { AF_INET6 } else { AF_INET };
        event.sock_type = raw.type_ as u8;
        event.protocol = raw.protocol as u16;
        // user_port holds the port in network byte order in its low 16 bits.
        event.port = u16::from_be(raw.user_port as u16);
        if !v6 {
            event.addr[..4].copy_from_slice(&raw.user_ip4.to_ne_bytes());
        } else {
            copy_ip6(&mut event.addr, &raw.user_ip6);
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
    read_options(ctx, event, getsockopt);
    // Last: until now the entry still reads as a mark (or a blank).
    pending.state = bind_state::PARKED;
}

/// Reads the options in force and the socket's owner uid: SO_REUSEADDR and
/// SO_REUSEPORT with `bpf_getsockopt` when `getsockopt` (see the header),
/// everything else, and those two on a kernel whose helper refuses them,
/// from the socket's own bits.
#[inline(always)]
fn read_options(ctx: &SockAddrContext, event: &mut Event, getsockopt: bool) {
    if getsockopt {
        getsockopt_reuse(ctx, event);
    }
    let mut from_sock = opt::FREEBIND | opt::TRANSPARENT | opt::BIND_ADDRESS_NO_PORT;
    if event.family == AF_INET6 {
        from_sock |= opt::V6ONLY;
    }
    from_sock |= (opt::REUSEADDR | opt::REUSEPORT) & !event.options_known;
    // `struct bpf_sock_addr_kern` starts with `struct sock *sk`.
    // SAFETY: probe read of one pointer from the kernel context.
    if let Ok(sk) = unsafe { bpf_probe_read_kernel(ctx.sock_addr as *const u64) } {
        fill_options_from_sock(event, sk, from_sock);
        if let Some(uid) = read_field::<u32>(sk, offsets().sk_uid) {
            event.sock_uid = uid;
        }
    }
}

/// SO_REUSEADDR and SO_REUSEPORT through `bpf_getsockopt` (not in 5.10's
/// bind hooks); an option the helper refuses stays unknown here.
#[inline(always)]
fn getsockopt_reuse(ctx: &SockAddrContext, event: &mut Event) {
    let mut try_opt = |bit: u32, name: i32| {
        let mut value: i32 = 0;
        // SAFETY: `value` is a 4-byte stack buffer whose length we pass.
        let ret = unsafe {
            bpf_getsockopt(
                ctx.sock_addr.cast(),
                SOL_SOCKET,
                name,
                (&raw mut value).cast(),
                4,
            )
        };
        if ret == 0 {
            event.options_known |= bit;
            if value != 0 {
                event.options |= bit;
            }
        }
    };
    try_opt(opt::REUSEADDR, SO_REUSEADDR);
    try_opt(opt::REUSEPORT, SO_REUSEPORT);
}

/// Copies an IPv6 address held as four 32-bit words in network byte order.
#[inline(always)]
fn copy_ip6(addr: &mut [u8; 16], words: &[u32; 4]) {
    for (i, word) in words.iter().enumerate() {
        addr[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
    }
}

#[cgroup_sock(post_bind4)]
pub fn post_bind4(ctx: SockContext) -> i32 {
    if variant::EMPTY {
        return ALLOW;
    }
    on_post_bind(&ctx, false);
    ALLOW
}

#[cgroup_sock(post_bind6)]
pub fn post_bind6(ctx: SockContext) -> i32 {
    if variant::EMPTY {
        return ALLOW;
    }
    on_post_bind(&ctx, true);
    ALLOW
}

/// `v6` is a constant per program: the verifier lets post_bind4 read only
/// `src_ip4` and post_bind6 only `src_ip6`, so each must compile alone.
#[inline(always)]
fn on_post_bind(ctx: &SockContext, v6: bool) {
    // SAFETY: verifier-checked context.
    let (cookie, bound_port) = unsafe {
        (
            bpf_get_socket_cookie(ctx.sock.cast()),
            (*ctx.sock).src_port as u16, // host byte order here
        )
    };
    let tid = current_tid();
    match PENDING_BIND.get_ptr_mut(tid) {
        // SAFETY: map value pointer from a successful lookup.
        Some(pending) if unsafe { (*pending).event.cookie } == cookie => {
            let pending = unsafe { &mut *pending };
            let event = &mut pending.event;
            event.bound_port = bound_port;
            event.errno = 0;
            event.source = source::POST_BIND;
            if pending.deferred == 1 {
                // Other cgroup programs may still refuse it: the outcome
                // hook sends the record.
                pending.state = bind_state::BOUND;
            } else {
                emit(event, hook::POST_BIND);
                let _ = PENDING_BIND.remove(tid);
            }
        }
        _ => {
            // The attempt was not parked (map full): report what this hook knows.
            let mut event = sock_event(ctx, kind::BIND);
            // SAFETY: verifier-checked context.
            unsafe {
                let sk = &*ctx.sock;
                if !v6 {
                    event.addr[..4].copy_from_slice(&sk.src_ip4.to_ne_bytes());
                } else {
                    copy_ip6(&mut event.addr, &sk.src_ip6);
                }
                event.netns_cookie = if netns_by_inode() {
                    // A cgroup sock program's context is the `struct sock`.
                    netns_id(ctx.sock as u64).unwrap_or(0)
                } else {
                    bpf_get_netns_cookie(ctx.sock.cast())
                };
            }
            event.cookie = cookie;
            event.port = bound_port;
            event.bound_port = bound_port;
            event.source = source::POST_BIND;
            emit(&event, hook::POST_BIND);
        }
    }
    if TRACKED.insert(cookie, 1, 0).is_err() {
        count_drop(hook::POST_BIND);
    }
}

/// Sends what is still parked for `tid`, if anything, since whatever call
/// comes next on the thread is not its outcome. An attempt whose outcome
/// hook never ran (an io_uring bind on the tracepoint path, an MPTCP bind
/// that skips `inet_bind`) is a failure with an unknown errno, and its port
/// is returned for the caller to log; one that post_bind saw succeed is
/// that success; a syscall mark is dropped.
///
/// It does not log itself: in the bind hooks the logging code pushed the
/// verifier past its limit on 6.1.
#[inline(always)]
fn flush_stale(tid: u32) -> Option<u16> {
    let stale = PENDING_BIND.get_ptr_mut(tid)?;
    // SAFETY: map value pointer from a successful lookup.
    let stale = unsafe { &mut *stale };
    let state = stale.state;
    let event = &mut stale.event;
    let port = event.port;
    if state == bind_state::BOUND {
        emit(event, hook::POST_BIND);
    } else if state == bind_state::PARKED {
        event.errno = ERRNO_UNKNOWN;
        event.source = source::UNRESOLVED;
        emit(event, hook::BIND);
    }
    let _ = PENDING_BIND.remove(tid);
    (state == bind_state::PARKED).then_some(port)
}

/// Where outcomes are inferred (no outcome hook attached): the thread that
/// parked a bind is now doing something else (listening, connecting,
/// closing a socket), so that bind has returned, and if post_bind did not
/// see it succeed it failed. Sent now, unresolved, for the daemon to infer
/// its errno.
#[inline(always)]
pub fn flush_if_inferred() {
    if outcome_inferred() {
        let _ = flush_stale(current_tid());
    }
}

/// [`flush_stale`], saying so in the daemon's log (rare, so worth a line).
#[inline(always)]
fn flush_stale_logged<C: EbpfContext>(ctx: &C, tid: u32) {
    if let Some(port) = flush_stale(tid) {
        warn!(
            ctx,
            "bind by tid {} to port {} failed without passing an outcome hook (io_uring?); errno unknown",
            tid,
            port
        );
    }
}

/// Completes the attempt parked for this thread with the return value of
/// its bind. `sk` is the socket whose bind returned (0 where unknown, as
/// in a syscall tracepoint): an attempt parked for another socket is stale
/// and is flushed instead of taking this bind's outcome.
#[inline(always)]
fn finish_bind<C: EbpfContext>(ctx: &C, ret: i64, src: u8, sk: u64) {
    let tid = current_tid();
    let Some(pending) = PENDING_BIND.get_ptr_mut(tid) else {
        return; // not an inet bind in the watched cgroup, or already emitted
    };
    // SAFETY: map value pointer from a successful lookup.
    let pending = unsafe { &mut *pending };
    if pending.state == bind_state::SYSCALL {
        // A bind(2) no inet bind hook saw: AF_UNIX, netlink, unwatched.
        let _ = PENDING_BIND.remove(tid);
        return;
    }
    let event = &mut pending.event;
    if sk != 0
        && let Some(cookie) = read_field::<u64>(sk, offsets().sk_cookie)
        && cookie != event.cookie
    {
        flush_stale_logged(ctx, tid);
        return;
    }
    if pending.state == bind_state::BOUND {
        if ret < 0 {
            // post_bind saw the port reserved, then a cgroup program of
            // another tool refused the bind and the kernel released the
            // port: a failure, and no socket to track.
            event.errno = (-ret) as i32;
            event.source = src;
            let _ = TRACKED.remove(event.cookie);
            emit(event, hook::BIND_OUTCOME);
        } else {
            emit(event, hook::POST_BIND);
        }
        let _ = PENDING_BIND.remove(tid);
        return;
    }
    // ret 0 without post_bind: IP_BIND_ADDRESS_NO_PORT with port 0, so the
    // address is set but no port is reserved yet.
    event.errno = if ret < 0 { (-ret) as i32 } else { 0 };
    event.source = src;
    emit(event, hook::BIND_OUTCOME);
    let _ = PENDING_BIND.remove(tid);
}

/// On the tracepoint path, a bind(2) starting: an attempt still parked for
/// this thread did not come from it (nothing was parked yet), so this
/// call's exit must not complete it. Without this, a failed io_uring bind
/// took the result of the thread's next bind(2) of any family: a netlink
/// bind's 0 made it a success, an AF_UNIX EADDRINUSE an inet conflict.
///
/// It also marks the call as a syscall (for the watched cgroup's tasks),
/// so that the bind hook knows this bind's exit will come and post_bind
/// leaves the record to it.
#[tracepoint(category = "syscalls", name = "sys_enter_bind")]
pub fn sys_enter_bind(ctx: TracePointContext) -> u32 {
    if variant::EMPTY {
        return 0;
    }
    let tid = current_tid();
    flush_stale_logged(&ctx, tid);
    if task_is_watched() {
        let mark = PendingBind {
            event: Event::ZERO,
            state: bind_state::SYSCALL,
            deferred: 0,
            _pad: [0; 6],
        };
        // A full map only loses the mark: post_bind then reports the
        // success itself, as it does for io_uring.
        let _ = PENDING_BIND.insert(tid, mark, 0);
    }
    0
}

#[tracepoint(category = "syscalls", name = "sys_exit_bind")]
pub fn sys_exit_bind(ctx: TracePointContext) -> u32 {
    if variant::EMPTY {
        return 0;
    }
    // SAFETY: `ret` sits at this offset in every sys_exit record; userspace
    // checks the format file before attaching.
    if let Ok(ret) = unsafe { ctx.read_at::<i64>(SYS_EXIT_RET) } {
        finish_bind(&ctx, ret, source::SYSCALL_EXIT, 0);
    }
    0
}

#[fexit(function = "inet_bind")]
pub fn fexit_inet_bind(ctx: FExitContext) -> i32 {
    if variant::EMPTY {
        return 0;
    }
    // int inet_bind(struct socket *sock, struct sockaddr *uaddr, int addr_len)
    let ret: i32 = ctx.arg(3);
    finish_bind(&ctx, ret as i64, source::FEXIT, sock_of_socket(ctx.arg(0)));
    0
}

#[fexit(function = "inet6_bind")]
pub fn fexit_inet6_bind(ctx: FExitContext) -> i32 {
    if variant::EMPTY {
        return 0;
    }
    // int inet6_bind(struct socket *sock, struct sockaddr *uaddr, int addr_len)
    let ret: i32 = ctx.arg(3);
    finish_bind(&ctx, ret as i64, source::FEXIT, sock_of_socket(ctx.arg(0)));
    0
}

/// Where the kernel has it (Linux 6.3+), the function under `inet_bind`
/// that MPTCP calls directly for its subflow (`mptcp_bind`), so that an
/// MPTCP bind has its outcome too. Takes the socket itself.
#[fexit(function = "inet_bind_sk")]
pub fn fexit_inet_bind_sk(ctx: FExitContext) -> i32 {
    if variant::EMPTY {
        return 0;
    }
    // int inet_bind_sk(struct sock *sk, struct sockaddr *uaddr, int addr_len)
    let ret: i32 = ctx.arg(3);
    finish_bind(&ctx, ret as i64, source::FEXIT, ctx.arg(0));
    0
}

/// `inet6_bind_sk`: as `fexit_inet_bind_sk`, for IPv6.
#[fexit(function = "inet6_bind_sk")]
pub fn fexit_inet6_bind_sk(ctx: FExitContext) -> i32 {
    if variant::EMPTY {
        return 0;
    }
    // int inet6_bind_sk(struct sock *sk, struct sockaddr *uaddr, int addr_len)
    let ret: i32 = ctx.arg(3);
    finish_bind(&ctx, ret as i64, source::FEXIT, ctx.arg(0));
    0
}
