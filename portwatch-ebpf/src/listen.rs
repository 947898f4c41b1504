//! Listen: the LISTEN transition, its outcome, and the listener's close.
//!
//! Why these hooks:
//! - `sock/inet_sock_set_state` is a plain tracepoint (not a syscall one, so
//!   it adds no per-syscall cost) that fires in `inet_csk_listen_start` when a
//!   TCP socket enters LISTEN, and again when it leaves LISTEN (close,
//!   shutdown, or a failed listen). Format (checked by userspace before
//!   attaching): `skaddr` @8, `oldstate` @16, `newstate` @20, `sport` @24,
//!   `family` @28, `protocol` @30, `saddr[4]` @32, `saddr_v6[16]` @40. The
//!   socket cookie, netns cookie, owner uid and backlog are read from
//!   `skaddr` with the BTF offsets userspace provides.
//! - LISTEN -> CLOSE is reported as LISTEN_STOP only for a socket still in
//!   `TRACKED`: on close() the release hook ran first and reported CLOSE.
//! - The LISTEN transition happens before `get_port` validates the port, so a
//!   listen can still fail with EADDRINUSE (two SO_REUSEADDR sockets bound to
//!   one address). The transition is parked in `PENDING_LISTEN` and emitted
//!   when the listen returns: fexit on `__inet_listen_sk` where it exists
//!   (6.5+; MPTCP's `mptcp_listen` calls it directly for its subflow), else
//!   on `inet_listen`, completing only the same socket's listen; where fexit
//!   is refused, `syscalls/sys_exit_listen`, after `sys_enter_listen` has
//!   flushed whatever an earlier call (an io_uring listen) left parked. A
//!   LISTEN -> CLOSE of the parked socket in between is part of that
//!   failure, not a close.
//!   Where outcomes are inferred (no outcome hook), the LISTEN is sent at
//!   the transition, and a failed listen shows as that socket's LISTEN ->
//!   CLOSE right after, which the daemon reads as the failure.
//! - The same tracepoint counts CLOSE -> SYN_SENT, new outgoing connections,
//!   per namespace (see `connect.rs`); where outcomes are inferred, a
//!   SYN_SENT -> CLOSE with no local port is a connect that found none.
//! - Tracepoints fire machine-wide. A LISTEN counts when its socket belongs
//!   to the watched cgroup, judged as the cgroup hooks judge it, by where
//!   the socket was made (`socket_is_watched`), not by the listening task.

use aya_ebpf::{
    macros::{fexit, tracepoint},
    programs::{FExitContext, TracePointContext},
};
use portwatch_ebpf::{
    AF_INET, ERRNO_UNKNOWN, Event, hook, kind, source,
    tracepoint::{
        SET_STATE_FAMILY, SET_STATE_NEWSTATE, SET_STATE_OLDSTATE, SET_STATE_PROTOCOL,
        SET_STATE_SADDR, SET_STATE_SADDR_V6, SET_STATE_SKADDR, SET_STATE_SPORT, SYS_EXIT_RET,
    },
};

use crate::bind::flush_if_inferred;
use crate::common::{
    PENDING_LISTEN, PendingListen, TRACKED, count_drop, current_tid, emit, fill_from_sock,
    fill_task, offsets, outcome_inferred, read_field, sock_in_watched_cgroup, sock_of_socket,
    task_is_watched, watching_subtree,
};
use crate::connect::{connect_found_no_port, count_connect};
use crate::variant;

const IPPROTO_TCP: u16 = 6;
const TCP_SYN_SENT: i32 = 2;
const TCP_CLOSE: i32 = 7;
const TCP_LISTEN: i32 = 10;

/// `errno` marker for a parked listen whose socket already fell back to CLOSE:
/// it failed, and `inet_listen` is about to return the errno.
const FAILING: i32 = i32::MIN;

#[tracepoint(category = "sock", name = "inet_sock_set_state")]
pub fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    if variant::EMPTY {
        return 0;
    }
    let _ = try_set_state(&ctx);
    0
}

fn try_set_state(ctx: &TracePointContext) -> Result<(), i32> {
    // SAFETY: offsets of the tracepoint format, verified by userspace.
    let (protocol, oldstate, newstate) = unsafe {
        (
            ctx.read_at::<u16>(SET_STATE_PROTOCOL)?,
            ctx.read_at::<i32>(SET_STATE_OLDSTATE)?,
            ctx.read_at::<i32>(SET_STATE_NEWSTATE)?,
        )
    };
    if protocol != IPPROTO_TCP {
        return Ok(());
    }
    if oldstate == TCP_SYN_SENT && newstate == TCP_CLOSE && outcome_inferred() {
        return connect_found_no_port(ctx);
    }
    if newstate == TCP_SYN_SENT {
        // A new outgoing connection: counted for the allocation rate (see
        // `connect.rs`), never sent.
        // SAFETY: offset of the tracepoint format, verified by userspace.
        count_connect(unsafe { ctx.read_at::<u64>(SET_STATE_SKADDR)? });
        return Ok(());
    }
    if newstate == TCP_LISTEN && oldstate != TCP_LISTEN {
        // The listening thread's bind, if it parked one, is over.
        flush_if_inferred();
        // SAFETY: offsets of the tracepoint format, verified by userspace.
        let (skaddr, sport) = unsafe {
            (
                ctx.read_at::<u64>(SET_STATE_SKADDR)?,
                ctx.read_at::<u16>(SET_STATE_SPORT)?,
            )
        };
        let cookie = read_field::<u64>(skaddr, offsets().sk_cookie).unwrap_or(0);
        if !socket_is_watched(skaddr, cookie, sport) {
            return Ok(());
        }
        // Built in place: the record is not copied on this program's stack,
        // which 5.10's and 6.1's verifiers cap at 512 bytes over the calls.
        let mut pending = PendingListen {
            event: Event::ZERO,
            sk: 0,
        };
        pending.sk = listener_event(ctx, &mut pending.event)?;
        pending.event.kind = kind::LISTEN;
        let (tid, cookie) = (pending.event.tid, pending.event.cookie);
        if outcome_inferred() {
            // No outcome will come: sent now. A listen that fails falls
            // back to CLOSE at once, which the daemon reads as its failure.
            pending.event.source = source::STATE;
            emit(&pending.event, hook::LISTEN);
            track(cookie);
            return Ok(());
        }
        if let Some(stale) = PENDING_LISTEN.get_ptr_mut(tid) {
            // A listen that no exit hook completed (io_uring without fexit).
            // SAFETY: map value pointer from a successful lookup.
            flush(unsafe { &mut *stale }, None, source::UNRESOLVED);
        }
        // By reference: a moved record would be one more copy on the stack.
        #[allow(clippy::needless_borrows_for_generic_args)]
        let parked = PENDING_LISTEN.insert(tid, &pending, 0);
        if parked.is_err() {
            count_drop(hook::LISTEN);
        }
        track(cookie);
    } else if oldstate == TCP_LISTEN && newstate == TCP_CLOSE {
        // SAFETY: as above.
        let skaddr = unsafe { ctx.read_at::<u64>(SET_STATE_SKADDR)? };
        let cookie = read_field::<u64>(skaddr, offsets().sk_cookie).unwrap_or(0);
        let tid = current_tid();
        if let Some(pending) = PENDING_LISTEN.get_ptr_mut(tid) {
            // SAFETY: map value pointer from a successful lookup.
            let pending = unsafe { &mut *pending };
            if pending.sk == skaddr {
                pending.event.errno = FAILING;
                return Ok(());
            }
        }
        // On close() the release hook has already run and untracked the
        // socket: that is reported as CLOSE there. Still tracked here means
        // the listener stopped but the socket lives on (shutdown).
        if cookie == 0 || TRACKED.get_ptr(cookie).is_none() {
            return Ok(());
        }
        let mut event = Event::ZERO;
        listener_event(ctx, &mut event)?;
        event.kind = kind::LISTEN_STOP;
        event.source = source::STATE;
        emit(&event, hook::LISTEN_STOP);
    }
    Ok(())
}

/// Tracks a socket that starts listening, so that its close is reported.
/// Usually tracked already, since its bind: a lookup is cheaper than an
/// update that replaces the entry with itself.
#[inline(always)]
fn track(cookie: u64) {
    if cookie != 0 && TRACKED.get_ptr(cookie).is_none() && TRACKED.insert(cookie, 1, 0).is_err() {
        count_drop(hook::LISTEN);
    }
}

/// Whether a socket starting to listen belongs to the watched cgroup. The
/// cgroup hooks judge a socket by the cgroup it was made in, so this does
/// too: by the cgroup the socket recorded (`sock_in_watched_cgroup`),
/// whichever task listens on it, bound or not. Where the kernel's BTF
/// lacks the fields for that, as far as the maps can tell:
/// - tracked: its bind was seen by the watched cgroup's hooks (or the
///   listing found it);
/// - bound but untracked, with a subtree watched: it was bound outside the
///   subtree (a socket made there and handed in, by fork or SCM_RIGHTS);
/// - not bound yet (listen picks its port): only the task can tell.
#[inline(always)]
fn socket_is_watched(sk: u64, cookie: u64, port: u16) -> bool {
    if !watching_subtree() {
        return true;
    }
    if let Some(inside) = sock_in_watched_cgroup(sk) {
        return inside;
    }
    if cookie != 0 && TRACKED.get_ptr(cookie).is_some() {
        return true;
    }
    if port != 0 {
        return false;
    }
    task_is_watched()
}

/// Fills `event` (zeroed) with a record for the socket in a set_state
/// tracepoint (task, address, port, and what the BTF offsets let us read
/// from the socket); the socket.
fn listener_event(ctx: &TracePointContext, event: &mut Event) -> Result<u64, i32> {
    let skaddr;
    fill_task(event);
    // SAFETY: offsets of the tracepoint format, verified by userspace.
    unsafe {
        event.family = ctx.read_at::<u16>(SET_STATE_FAMILY)?;
        event.port = ctx.read_at::<u16>(SET_STATE_SPORT)?;
        if event.family == AF_INET {
            let v4: [u8; 4] = ctx.read_at(SET_STATE_SADDR)?;
            event.addr[..4].copy_from_slice(&v4);
        } else {
            event.addr = ctx.read_at(SET_STATE_SADDR_V6)?;
        }
        skaddr = ctx.read_at::<u64>(SET_STATE_SKADDR)?;
        fill_from_sock(event, skaddr);
        if let Some(backlog) = read_field::<u32>(skaddr, offsets().sk_max_ack_backlog) {
            event.backlog = backlog;
        }
    }
    event.bound_port = event.port;
    event.protocol = IPPROTO_TCP;
    event.sock_type = 1; // SOCK_STREAM
    Ok(skaddr)
}

/// Emits a parked listen as LISTEN or LISTEN_FAILED and forgets it.
#[inline(always)]
fn flush(pending: &mut PendingListen, ret: Option<i64>, src: u8) {
    let event = &mut pending.event;
    if event.port == 0 {
        // listen() on an unbound socket picks its port after the LISTEN
        // transition (autobind): read the port it got.
        if let Some(port) = read_field::<u16>(pending.sk, offsets().sk_num) {
            event.port = port;
            event.bound_port = port;
        }
    }
    let failed_in_kernel = event.errno == FAILING;
    match ret {
        Some(ret) if ret < 0 => {
            event.kind = kind::LISTEN_FAILED;
            event.errno = (-ret) as i32;
        }
        Some(_) => {
            event.kind = kind::LISTEN;
            event.errno = 0;
        }
        None if failed_in_kernel => {
            event.kind = kind::LISTEN_FAILED;
            event.errno = ERRNO_UNKNOWN;
        }
        None => {
            event.kind = kind::LISTEN;
            event.errno = 0;
        }
    }
    event.source = src;
    let hook = if src == source::UNRESOLVED {
        hook::LISTEN
    } else {
        hook::LISTEN_OUTCOME
    };
    emit(event, hook);
    let tid = event.tid;
    let _ = PENDING_LISTEN.remove(tid);
}

/// Completes the listen parked for this thread with `ret`. `sk` is the
/// socket whose listen returned (0 where unknown, as in a syscall
/// tracepoint): a listen parked for another socket is stale and is emitted
/// unresolved instead of taking this outcome.
#[inline(always)]
fn finish_listen(ret: i64, src: u8, sk: u64) {
    let tid = current_tid();
    if let Some(pending) = PENDING_LISTEN.get_ptr_mut(tid) {
        // SAFETY: map value pointer from a successful lookup.
        let pending = unsafe { &mut *pending };
        if sk != 0 && pending.sk != sk {
            flush(pending, None, source::UNRESOLVED);
        } else {
            flush(pending, Some(ret), src);
        }
    }
}

/// On the tracepoint path, a listen(2) starting: a listen still parked for
/// this thread did not come from it (an io_uring listen), so this call's
/// exit, which may be an AF_UNIX listen's, must not complete it.
#[tracepoint(category = "syscalls", name = "sys_enter_listen")]
pub fn sys_enter_listen(_ctx: TracePointContext) -> u32 {
    if variant::EMPTY {
        return 0;
    }
    if let Some(stale) = PENDING_LISTEN.get_ptr_mut(current_tid()) {
        // SAFETY: map value pointer from a successful lookup.
        flush(unsafe { &mut *stale }, None, source::UNRESOLVED);
    }
    0
}

#[tracepoint(category = "syscalls", name = "sys_exit_listen")]
pub fn sys_exit_listen(ctx: TracePointContext) -> u32 {
    if variant::EMPTY {
        return 0;
    }
    // SAFETY: `ret` offset of every sys_exit record, verified by userspace.
    if let Ok(ret) = unsafe { ctx.read_at::<i64>(SYS_EXIT_RET) } {
        finish_listen(ret, source::SYSCALL_EXIT, 0);
    }
    0
}

#[fexit(function = "inet_listen")]
pub fn fexit_inet_listen(ctx: FExitContext) -> i32 {
    if variant::EMPTY {
        return 0;
    }
    // int inet_listen(struct socket *sock, int backlog)
    let ret: i32 = ctx.arg(2);
    finish_listen(ret as i64, source::FEXIT, sock_of_socket(ctx.arg(0)));
    0
}

/// Where the kernel has it (Linux 6.5+), the function under `inet_listen`
/// that MPTCP calls directly for its subflow (`mptcp_listen`): without it
/// an MPTCP listen stayed parked, unreported, until the thread listened
/// again. Takes the socket itself.
#[fexit(function = "__inet_listen_sk")]
pub fn fexit_inet_listen_sk(ctx: FExitContext) -> i32 {
    if variant::EMPTY {
        return 0;
    }
    // int __inet_listen_sk(struct sock *sk, int backlog)
    let ret: i32 = ctx.arg(2);
    finish_listen(ret as i64, source::FEXIT, ctx.arg(0));
    0
}
