//! Maps and helpers shared by every hook.

use aya_ebpf::{
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
        bpf_probe_read_kernel,
        generated::{bpf_get_current_cgroup_id, bpf_ktime_get_boot_ns},
    },
    macros::map,
    maps::{Array, CgroupArray, HashMap, PerCpuArray, RingBuf},
    programs::SockContext,
};
use portwatch_ebpf::{
    Event, FlagBit, KernelOffsets, PendingBind, WatchedCgroup, hook, opt, outcome,
};

/// The one ring buffer every hook writes to. Userspace may resize it.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(4 * 1024 * 1024, 0);

/// Per hook ([`hook`]), how many records were lost because the ring buffer
/// (or a bookkeeping map) was full. Never silent.
#[map]
pub static DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(hook::COUNT, 0);

/// Binds waiting for their outcome, by thread id.
#[map]
pub static PENDING_BIND: HashMap<u32, PendingBind> = HashMap::with_max_entries(16384, 0);

/// Slot 0 says how outcomes come (an [`outcome`] constant), written by
/// userspace once it attached them. [`outcome::FEXIT`]: the fexit programs
/// run for every inet bind (bind(2), io_uring, MPTCP, the kernel's own), so
/// every bind is deferred to its outcome.
#[map]
pub static OUTCOME: Array<u32> = Array::with_max_entries(1, 0);

/// Whether the fexit outcome programs are attached.
#[inline(always)]
pub fn outcome_by_fexit() -> bool {
    OUTCOME.get(0).is_some_and(|mode| *mode == outcome::FEXIT)
}

/// Whether no outcome hook is attached: outcomes are inferred.
#[inline(always)]
pub fn outcome_inferred() -> bool {
    OUTCOME
        .get(0)
        .is_some_and(|mode| *mode == outcome::INFERRED)
}

/// A listen waiting for `listen()` to return: the record so far, and the
/// socket, whose port may still change (autobind happens after LISTEN).
#[derive(Clone, Copy)]
#[repr(C)]
pub struct PendingListen {
    pub event: Event,
    pub sk: u64,
}

/// Listens waiting for `listen()` to return, by thread id.
#[map]
pub static PENDING_LISTEN: HashMap<u32, PendingListen> = HashMap::with_max_entries(16384, 0);

/// Cookies of the sockets whose release userspace wants to hear about: bound
/// or listening ones, and those found by the start-up snapshot. Filtering
/// here keeps every ordinary connection's close out of the ring buffer.
///
/// Preallocated, like every map here: `inet_sock_set_state` is a tracepoint
/// program, and on 5.7 to 6.0 the verifier answers a tracepoint program
/// that uses a run-time-allocated hash map with `WARN_ONCE("trace type BPF
/// program uses run-time allocation")`, which taints the kernel (and panics
/// it under `panic_on_warn`); PREEMPT_RT kernels refuse the load. Userspace
/// removes the cookies of sockets the map drops (`Capture::untrack`), so
/// only live sockets hold entries.
#[map]
pub static TRACKED: HashMap<u64, u8> = HashMap::with_max_entries(131072, 0);

/// Slot 0 holds the cgroup the daemon watches. Tracepoints fire for the whole
/// machine; this keeps them to the same tasks the cgroup hooks see.
#[map]
pub static WATCHED: CgroupArray = CgroupArray::with_max_entries(1, 0);

/// Struct offsets from the kernel's BTF, written by userspace at load time.
#[unsafe(no_mangle)]
static OFFSETS: KernelOffsets = KernelOffsets {
    sk_cookie: 0,
    sk_net: 0,
    net_cookie: 0,
    sk_max_ack_backlog: 0,
    sk_uid: 0,
    sk_reuse_byte: 0,
    reuse_shift: 0,
    reuseport_shift: 0,
    ipv6only_shift: 0,
    _pad0: 0,
    freebind: FlagBit::at_bit(0),
    transparent: FlagBit::at_bit(0),
    bind_address_no_port: FlagBit::at_bit(0),
    sk_num: 0,
    net_ns_inum: 0,
    socket_sk: 0,
    sk_family: 0,
    sk_cgrp_data: 0,
    cgroup_level: 0,
    cgroup_ancestor_ids: 0,
    cgroup_ancestors: 0,
    cgroup_kn: 0,
    kernfs_node_id: 0,
};

#[inline(always)]
pub fn offsets() -> KernelOffsets {
    // SAFETY: a read of our own global; volatile so the compiler does not fold
    // the zero initializer that userspace overwrites at load time.
    unsafe { core::ptr::read_volatile(&OFFSETS) }
}

/// One field of `OFFSETS`, read alone: the socket-cgroup walk runs inside
/// the LISTEN program, whose stack (with its record) is near the 512 bytes
/// 5.10's and 6.1's verifiers allow, so it does not copy the whole struct.
macro_rules! offset_of {
    ($field:ident) => {
        // SAFETY: a read of one field of our own global; volatile so the
        // compiler does not fold the zero initializer userspace overwrites.
        unsafe { core::ptr::read_volatile(&raw const OFFSETS.$field) }
    };
}

/// Counts one lost record for `hook`.
#[inline(always)]
pub fn count_drop(hook: u32) {
    if let Some(slot) = DROPS.get_ptr_mut(hook) {
        // SAFETY: per-CPU slot, only this CPU writes it while we run.
        unsafe { *slot += 1 };
    }
}

/// Sends `event` to userspace, counting a drop for `hook` when the ring is full.
///
/// Waking the reader is the most expensive part of a record (an irq_work
/// self-IPI, ~1.2 µs per bind in `cargo xtask bench`). With no flags the
/// kernel wakes it only for a record written when the reader had caught up:
/// the reader lingers a few milliseconds after that wakeup before it drains,
/// so a burst costs one wakeup and an idle ring none.
#[inline(always)]
pub fn emit(event: &Event, hook: u32) {
    if crate::variant::UNSENT {
        return;
    }
    if EVENTS.output::<Event>(event, 0).is_err() {
        count_drop(hook);
    }
}

/// Fills the fields every record has: time, task, uid, cgroup, comm.
#[inline(always)]
pub fn fill_task(event: &mut Event) {
    let pid_tgid = bpf_get_current_pid_tgid();
    event.pid = (pid_tgid >> 32) as u32;
    event.tid = pid_tgid as u32;
    event.uid = bpf_get_current_uid_gid() as u32;
    // SAFETY: helpers with no pointer arguments.
    unsafe {
        event.ts_ns = bpf_ktime_get_boot_ns();
        event.cgroup_id = bpf_get_current_cgroup_id();
    }
    if let Ok(comm) = bpf_get_current_comm() {
        event.comm = comm;
    }
}

/// A record of `kind` for the socket of a cgroup `sock` program: the task,
/// and the socket's family, type and protocol (readable in every such hook).
#[inline(always)]
pub fn sock_event(ctx: &SockContext, kind: u8) -> Event {
    let mut event = Event::ZERO;
    event.kind = kind;
    fill_task(&mut event);
    // SAFETY: verifier-checked context; these fields are readable in every
    // cgroup sock program.
    unsafe {
        let sk = &*ctx.sock;
        event.family = sk.family as u16;
        event.sock_type = sk.type_ as u8;
        event.protocol = sk.protocol as u16;
    }
    event
}

/// Current thread id, the key of the pending maps.
#[inline(always)]
pub fn current_tid() -> u32 {
    bpf_get_current_pid_tgid() as u32
}

/// The `struct sock *` of a `struct socket *`, 0 when unreadable.
#[inline(always)]
pub fn sock_of_socket(socket: u64) -> u64 {
    read_field::<u64>(socket, offsets().socket_sk).unwrap_or(0)
}

/// The cgroup the daemon watches (its id, and whether it is a subtree);
/// written by userspace at load time.
#[unsafe(no_mangle)]
static WATCH_CGROUP: WatchedCgroup = WatchedCgroup {
    id: 0,
    subtree: 0,
    _pad: [0; 7],
};

/// The watched cgroup's id.
#[inline(always)]
fn watched_cgroup_id() -> u64 {
    // SAFETY: a read of one field of a global that userspace sets before
    // loading; volatile so the compiler cannot fold the zero initialiser.
    unsafe { core::ptr::read_volatile(&raw const WATCH_CGROUP.id) }
}

/// Whether only a subtree of the machine is watched.
#[inline(always)]
pub fn watching_subtree() -> bool {
    // SAFETY: as above.
    unsafe { core::ptr::read_volatile(&raw const WATCH_CGROUP.subtree) == 1 }
}

/// How many levels above a socket's cgroup the watched one is looked for:
/// deeper than any hierarchy systemd, Kubernetes or nested containers make.
const MAX_CGROUP_CLIMB: i32 = 16;

/// Whether socket `sk` was made in the watched subtree, judged as the
/// cgroup hooks judge it: by the cgroup v2 the socket recorded when it was
/// made (`sk_cgrp_data`), whichever task uses it now. `None` when the BTF
/// offsets for that are unknown, or the socket's cgroup is more than
/// [`MAX_CGROUP_CLIMB`] levels below the watched one.
///
/// The watched cgroup is found among the socket cgroup's ancestors by id,
/// level by level upwards, so its own depth need not be known: a daemon in
/// a cgroup namespace sees a different root than the kernel counts from.
///
/// Not inlined: the walk's registers would otherwise spill into the LISTEN
/// program's own frame, and 5.10's and 6.1's verifiers refuse a program
/// whose frames along one call chain pass 512 bytes.
#[inline(never)]
pub fn sock_in_watched_cgroup(sk: u64) -> Option<bool> {
    let cgrp_data = offset_of!(sk_cgrp_data);
    let level_at = offset_of!(cgroup_level);
    let ids_at = offset_of!(cgroup_ancestor_ids);
    let ancestors_at = offset_of!(cgroup_ancestors);
    let kn_at = offset_of!(cgroup_kn);
    let id_at = offset_of!(kernfs_node_id);
    if cgrp_data == 0
        || level_at == 0
        || (ids_at == 0 && (ancestors_at == 0 || kn_at == 0 || id_at == 0))
    {
        return None;
    }
    let data = read_field::<u64>(sk, cgrp_data)?;
    // No cgroup, or 5.10's net_prio/net_cls data in its place: the kernel
    // then runs the root cgroup's programs for the socket (sock_cgroup_ptr).
    if data == 0 || data & 3 != 0 {
        return Some(!watching_subtree());
    }
    let watched = watched_cgroup_id();
    let level = read_field::<i32>(data, level_at)?;
    for climb in 0..MAX_CGROUP_CLIMB {
        let at = level - climb;
        if at < 0 {
            return Some(false);
        }
        // The ancestor at depth `at`: its id, or (6.0+) its kernfs node's.
        let slot = data + at as u64 * 8;
        let id = if ids_at != 0 {
            read_field::<u64>(slot, ids_at)?
        } else {
            let ancestor = read_field::<u64>(slot, ancestors_at)?;
            let kn = read_field::<u64>(ancestor, kn_at)?;
            read_field::<u64>(kn, id_at)?
        };
        if id == watched {
            return Some(true);
        }
    }
    None
}

/// Whether the current task is inside the watched cgroup subtree.
#[inline(always)]
pub fn task_is_watched() -> bool {
    WATCHED.current_task_under_cgroup(0).unwrap_or(false)
}

/// Reads a `T` at `offset` bytes into kernel object `base`; `None` when the
/// offset is unknown (0) or the read faults.
#[inline(always)]
pub fn read_field<T>(base: u64, offset: u32) -> Option<T> {
    if offset == 0 || base == 0 {
        return None;
    }
    // SAFETY: bpf_probe_read_kernel validates the address and fails cleanly.
    unsafe { bpf_probe_read_kernel((base + offset as u64) as *const T).ok() }
}

/// Socket facts read from a `struct sock *` through the BTF offsets: the
/// cookie, the network namespace cookie, the owner uid, and listen backlog.
#[inline(always)]
pub fn fill_from_sock(event: &mut Event, sk: u64) {
    let off = offsets();
    if let Some(cookie) = read_field::<u64>(sk, off.sk_cookie) {
        event.cookie = cookie;
    }
    if let Some(netns) = netns_id(sk) {
        event.netns_cookie = netns;
    }
    if let Some(uid) = read_field::<u32>(sk, off.sk_uid) {
        event.sock_uid = uid;
    }
}

/// Whether network namespaces are named by inode number rather than cookie
/// (see `KernelOffsets::net_ns_inum`).
#[inline(always)]
pub fn netns_by_inode() -> bool {
    offsets().net_ns_inum != 0
}

/// The id of the network namespace of a `struct sock *`: its cookie, or its
/// inode number where namespaces are named so.
#[inline(always)]
pub fn netns_id(sk: u64) -> Option<u64> {
    let off = offsets();
    let net = read_field::<u64>(sk, off.sk_net)?;
    if off.net_ns_inum != 0 {
        read_field::<u32>(net, off.net_ns_inum).map(u64::from)
    } else {
        read_field::<u64>(net, off.net_cookie)
    }
}

/// Options read from the socket's own bits through the BTF offsets:
/// SO_REUSEADDR/SO_REUSEPORT/IPV6_V6ONLY live in `sock_common`,
/// IP_FREEBIND/IP_TRANSPARENT/IP_BIND_ADDRESS_NO_PORT in `inet_sock` (bits
/// of `inet_flags` from Linux 6.6, bitfields before). Only the `wanted` bits
/// are filled; a bit whose location is unknown stays unknown.
#[inline(always)]
pub fn fill_options_from_sock(event: &mut Event, sk: u64, wanted: u32) {
    let off = offsets();
    if let Some(byte) = read_field::<u8>(sk, off.sk_reuse_byte) {
        let reuse = (byte >> off.reuse_shift) & 0xf;
        let reuseport = (byte >> off.reuseport_shift) & 1;
        let v6only = (byte >> off.ipv6only_shift) & 1;
        set_opt(event, wanted, opt::REUSEADDR, reuse != 0);
        set_opt(event, wanted, opt::REUSEPORT, reuseport != 0);
        set_opt(event, wanted, opt::V6ONLY, v6only != 0);
    }
    fill_flag(event, sk, wanted, opt::FREEBIND, off.freebind);
    fill_flag(event, sk, wanted, opt::TRANSPARENT, off.transparent);
    fill_flag(
        event,
        sk,
        wanted,
        opt::BIND_ADDRESS_NO_PORT,
        off.bind_address_no_port,
    );
}

/// Reads the one byte that holds `flag` and records option `bit` from it.
#[inline(always)]
fn fill_flag(event: &mut Event, sk: u64, wanted: u32, bit: u32, flag: FlagBit) {
    if wanted & bit == 0 {
        return;
    }
    if let Some(byte) = read_field::<u8>(sk, flag.byte) {
        set_opt(event, wanted, bit, (byte >> (flag.shift & 7)) & 1 != 0);
    }
}

/// Records option `bit` as known with value `on`, if `wanted` asks for it.
#[inline(always)]
fn set_opt(event: &mut Event, wanted: u32, bit: u32, on: bool) {
    if wanted & bit == 0 {
        return;
    }
    event.options_known |= bit;
    if on {
        event.options |= bit;
    } else {
        event.options &= !bit;
    }
}
