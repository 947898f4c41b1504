//! Types that cross the kernel/user boundary.
//!
//! Everything here is `#[repr(C)]`, built only from fixed-width integers and
//! byte arrays, with explicit padding and a compile-time size check, so the
//! kernel programs (bpfel target) and the daemon (host target) agree on every
//! byte. Userspace decodes these raw records with `TryFrom` into typed events;
//! nothing here is ever transmuted into a Rust enum.
#![no_std]

/// What a record reports. Stored in [`Event::kind`].
pub mod kind {
    /// A bind finished: `errno` 0 means it succeeded and `bound_port` holds the
    /// port the kernel gave (an ephemeral one when `port` was 0).
    pub const BIND: u8 = 1;
    /// A TCP socket entered LISTEN and `listen()` returned 0.
    pub const LISTEN: u8 = 2;
    /// `listen()` failed after the socket tried to enter LISTEN (for example
    /// EADDRINUSE when two SO_REUSEADDR sockets share an address).
    pub const LISTEN_FAILED: u8 = 3;
    /// A listening TCP socket left LISTEN but stays open (`shutdown()`); a
    /// port bound explicitly stays bound. Not sent when the socket is closed:
    /// that is [`CLOSE`].
    pub const LISTEN_STOP: u8 = 4;
    /// A socket portwatch tracks (bound, listening, or known from the
    /// start-up snapshot) was released: closed by its last holder, so its
    /// port is free again.
    pub const CLOSE: u8 = 5;
    /// connect() found no local port: `errno` is EADDRNOTAVAIL (TCP, every
    /// port of the range in use to that destination), EAGAIN (UDP
    /// autobind, the range full) or EADDRINUSE; `peer_addr`/`peer_port`
    /// hold the destination, `bound_port` the socket's port if it had one.
    pub const CONNECT_FAILED: u8 = 6;
    /// A socket portwatch tracks (bound or listening) connected: a UDP
    /// socket stops receiving from everyone, and a TCP socket bound before
    /// it connected holds its port for every destination.
    pub const CONNECTED: u8 = 7;
}

/// Which kernel hook produced the outcome of a record. Stored in
/// [`Event::source`]; exposed so operators can see which path is active.
pub mod source {
    /// cgroup `post_bind4`/`post_bind6`: the bind succeeded.
    pub const POST_BIND: u8 = 1;
    /// `syscalls/sys_exit_bind` or `syscalls/sys_exit_listen`.
    pub const SYSCALL_EXIT: u8 = 2;
    /// fexit on `inet_bind`/`inet6_bind`/`inet_listen`.
    pub const FEXIT: u8 = 3;
    /// `sock/inet_sock_set_state`.
    pub const STATE: u8 = 4;
    /// cgroup `sock_release`.
    pub const RELEASE: u8 = 5;
    /// A bind or listen whose outcome no hook reported before the same
    /// thread started another (an io_uring call that failed, on a kernel
    /// without fexit; an MPTCP call that skips `inet_bind`). Its `errno` is
    /// [`super::ERRNO_UNKNOWN`].
    pub const UNRESOLVED: u8 = 6;
    /// `tcp/tcp_destroy_sock`: a tracked TCP socket freed without a release
    /// the cgroup hook saw (an MPTCP subflow, a kernel socket).
    pub const DESTROY: u8 = 7;
}

/// How outcomes reach the programs: the value userspace writes in slot 0 of
/// the `OUTCOME` map before attaching.
pub mod outcome {
    /// The `syscalls/sys_enter_*`/`sys_exit_*` tracepoints.
    pub const TRACEPOINT: u32 = 0;
    /// fexit on the `proto_ops` functions: every bind waits for its outcome.
    pub const FEXIT: u32 = 1;
    /// No outcome hook: a bind that post_bind does not see succeed is sent
    /// as unresolved when its thread next binds, listens, connects or
    /// closes a socket; a listen is sent at its LISTEN transition; a
    /// connect that finds no port is seen leaving SYN_SENT without one.
    pub const INFERRED: u32 = 2;
}

/// What fexit on `inet_csk_get_port` saw of a TCP bind or listen. Stored in
/// [`Event::port_alloc`].
pub mod port_alloc {
    /// The hook is not attached, did not run for this call (UDP, an
    /// IP_BIND_ADDRESS_NO_PORT bind, a failure before the port check), or
    /// could not match the socket.
    pub const NOT_SEEN: u8 = 0;
    /// `inet_csk_get_port` returned 0: the port is this socket's.
    pub const ALLOCATED: u8 = 1;
    /// `inet_csk_get_port` returned nonzero (1 or -EADDRINUSE, depending on
    /// the kernel): the port conflict check refused the socket.
    pub const REFUSED: u8 = 2;
}

/// `errno` value of a bind whose failure was seen but whose error code was not.
pub const ERRNO_UNKNOWN: i32 = -1;

/// Socket options in force at bind time. Bits of [`Event::options`] and
/// [`Event::options_known`].
pub mod opt {
    pub const REUSEADDR: u32 = 1 << 0;
    pub const REUSEPORT: u32 = 1 << 1;
    pub const V6ONLY: u32 = 1 << 2;
    pub const FREEBIND: u32 = 1 << 3;
    pub const TRANSPARENT: u32 = 1 << 4;
    pub const BIND_ADDRESS_NO_PORT: u32 = 1 << 5;
    /// Every option bit portwatch reads.
    pub const ALL: u32 =
        REUSEADDR | REUSEPORT | V6ONLY | FREEBIND | TRANSPARENT | BIND_ADDRESS_NO_PORT;
}

/// Index of each hook's slot in the per-CPU `DROPS` array: ring-buffer
/// reservations (or bookkeeping-map inserts) that failed in that hook.
pub mod hook {
    pub const BIND: u32 = 0;
    pub const POST_BIND: u32 = 1;
    /// The bind outcome, from fexit or the sys_exit_bind tracepoint.
    pub const BIND_OUTCOME: u32 = 2;
    pub const LISTEN: u32 = 3;
    /// The listen outcome, from fexit or the sys_exit_listen tracepoint.
    pub const LISTEN_OUTCOME: u32 = 4;
    pub const LISTEN_STOP: u32 = 5;
    pub const RELEASE: u32 = 6;
    /// cgroup `connect4`/`connect6`: the attempt, parked.
    pub const CONNECT: u32 = 7;
    /// The connect outcome, from fexit or the sys_exit_connect tracepoint.
    pub const CONNECT_OUTCOME: u32 = 8;
    /// Number of slots.
    pub const COUNT: u32 = 9;
    /// Names, indexed by slot, as they appear in logs and metrics (the
    /// `hook` label of both the drop counter and `portwatch_program_attached`).
    pub const NAMES: [&str; COUNT as usize] = [
        "bind",
        "post_bind",
        "bind_outcome",
        "listen",
        "listen_outcome",
        "listen_stop",
        "release",
        "connect",
        "connect_outcome",
    ];
}

/// Byte offsets in the tracepoint records the programs read. Userspace checks
/// them against the kernel's format files before attaching.
pub mod tracepoint {
    /// `ret` in every `syscalls/sys_exit_*` record.
    pub const SYS_EXIT_RET: usize = 16;
    /// Fields of `sock/inet_sock_set_state`, as (name, offset, size).
    pub const SET_STATE_SKADDR: usize = 8;
    pub const SET_STATE_OLDSTATE: usize = 16;
    pub const SET_STATE_NEWSTATE: usize = 20;
    pub const SET_STATE_SPORT: usize = 24;
    pub const SET_STATE_DPORT: usize = 26;
    pub const SET_STATE_FAMILY: usize = 28;
    pub const SET_STATE_PROTOCOL: usize = 30;
    pub const SET_STATE_SADDR: usize = 32;
    pub const SET_STATE_DADDR: usize = 36;
    pub const SET_STATE_SADDR_V6: usize = 40;
    pub const SET_STATE_DADDR_V6: usize = 56;
    /// Every field the set_state program reads: name, offset, size.
    pub const SET_STATE_FIELDS: [(&str, usize, usize); 11] = [
        ("skaddr", SET_STATE_SKADDR, 8),
        ("oldstate", SET_STATE_OLDSTATE, 4),
        ("newstate", SET_STATE_NEWSTATE, 4),
        ("sport", SET_STATE_SPORT, 2),
        ("dport", SET_STATE_DPORT, 2),
        ("family", SET_STATE_FAMILY, 2),
        ("protocol", SET_STATE_PROTOCOL, 2),
        ("saddr", SET_STATE_SADDR, 4),
        ("daddr", SET_STATE_DADDR, 4),
        ("saddr_v6", SET_STATE_SADDR_V6, 16),
        ("daddr_v6", SET_STATE_DADDR_V6, 16),
    ];
    /// The one field of `tcp/tcp_destroy_sock` read: the socket (the
    /// record has no family on Debian 11's 5.10).
    pub const DESTROY_SKADDR: usize = 8;
    pub const DESTROY_FIELDS: [(&str, usize, usize); 1] = [("skaddr", DESTROY_SKADDR, 8)];
}

/// A bind waiting for its outcome (`PENDING_BIND`, by thread id): the
/// record so far, and how far it got. Userspace sweeps what is left parked
/// where outcomes are inferred.
#[derive(Clone, Copy)]
#[repr(C)]
pub struct PendingBind {
    pub event: Event,
    /// A [`bind_state`] constant.
    pub state: u8,
    /// The outcome hook will run for it: post_bind leaves the record to
    /// that hook instead of sending it, so a bind that another program
    /// refuses after post_bind is reported as the failure it is. 0 or 1.
    pub deferred: u8,
    pub _pad: [u8; 6],
}

/// How far a [`PendingBind`] got.
pub mod bind_state {
    /// A bind(2) of the watched cgroup started (tracepoint path) and no
    /// inet bind hook has run yet: only marks the call as a syscall, whose
    /// exit will come. Never reported.
    pub const SYSCALL: u8 = 0;
    /// The bind hook parked the attempt.
    pub const PARKED: u8 = 1;
    /// post_bind saw the port reserved; the outcome is still to come.
    pub const BOUND: u8 = 2;
}

const _: () = assert!(size_of::<PendingBind>() == 136);

/// Address families, as the kernel numbers them.
pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// Where one single-bit socket flag lives: the byte of `struct sock` (or of
/// the `struct inet_sock` that begins with it) that holds the bit, and the
/// bit's position in that byte. `byte` 0 means "unknown": no flag lives in
/// the first byte of `struct sock`.
///
/// The programs read the one byte: a flag kept as a bit of an `unsigned
/// long` (`inet_flags`, Linux 6.6+) and one kept as a C bitfield (`freebind:1`
/// before 6.6) are found the same way, without knowing which it is.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlagBit {
    pub byte: u32,
    pub shift: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(size_of::<FlagBit>() == 8);

impl FlagBit {
    /// The flag at bit `bits` counted from the start of the struct, on a
    /// little-endian machine (every bpf target portwatch builds is bpfel):
    /// bit n of a word is bit n % 8 of its byte n / 8, and BTF numbers
    /// bitfield members the same way.
    pub const fn at_bit(bits: u32) -> FlagBit {
        FlagBit {
            byte: bits / 8,
            shift: (bits % 8) as u8,
            _pad: [0; 3],
        }
    }

    /// Whether the flag's location was found.
    pub const fn known(&self) -> bool {
        self.byte != 0
    }
}

/// Kernel struct offsets the programs need but cannot know at compile time
/// (Rust eBPF has no CO-RE). The daemon reads them from the kernel's BTF and
/// writes them into the `OFFSETS` global before loading. A zero offset means
/// "unknown": the programs then leave that field out instead of guessing.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    /// `struct sock` -> `__sk_common.skc_cookie`.
    pub sk_cookie: u32,
    /// `struct sock` -> `__sk_common.skc_net` (a `struct net *`).
    pub sk_net: u32,
    /// `struct net` -> `net_cookie`.
    pub net_cookie: u32,
    /// `struct sock` -> `sk_max_ack_backlog`.
    pub sk_max_ack_backlog: u32,
    /// `struct sock` -> `sk_uid`.
    pub sk_uid: u32,
    /// Byte holding `skc_reuse:4`, `skc_reuseport:1`, `skc_ipv6only:1`.
    pub sk_reuse_byte: u32,
    /// Bit positions inside that byte.
    pub reuse_shift: u8,
    pub reuseport_shift: u8,
    pub ipv6only_shift: u8,
    pub _pad0: u8,
    /// IP_FREEBIND, IP_TRANSPARENT and IP_BIND_ADDRESS_NO_PORT: bits of
    /// `inet_sock.inet_flags` on Linux 6.6+, bitfields of `inet_sock` before.
    pub freebind: FlagBit,
    pub transparent: FlagBit,
    pub bind_address_no_port: FlagBit,
    /// `struct sock` -> `__sk_common.skc_num` (the local port, host order):
    /// a listen() that autobinds gets its port only after the LISTEN
    /// transition, so the port is read again when listen() returns.
    pub sk_num: u32,
    /// `struct net` -> `ns.inum`, set only where userspace names network
    /// namespaces by inode number: a kernel before 5.14 has no
    /// SO_NETNS_COOKIE, so userspace cannot learn the cookies the programs
    /// would report. Then the programs report this instead of the cookie.
    pub net_ns_inum: u32,
    /// `struct socket` -> `sk`: the fexit outcome hooks get the `struct
    /// socket *` and complete a parked call only if it is the same socket.
    pub socket_sk: u32,
    /// `struct sock` -> `__sk_common.skc_family`: `tcp_destroy_sock` has
    /// no family field on Debian 11's 5.10, so it is read from the socket.
    pub sk_family: u32,
    /// `struct sock` -> `sk_cgrp_data`: the cgroup v2 the socket was made
    /// in, a `struct cgroup *` in its first word (on 5.10 that word can
    /// instead hold net_prio/net_cls data, marked by its low bits).
    pub sk_cgrp_data: u32,
    /// `struct cgroup` -> `level`: its depth in the hierarchy (root 0).
    pub cgroup_level: u32,
    /// `struct cgroup` -> `ancestor_ids`: the ids of its ancestors by level,
    /// itself last (Linux before 6.0).
    pub cgroup_ancestor_ids: u32,
    /// `struct cgroup` -> `ancestors`: pointers to its ancestors by level,
    /// itself last (Linux 6.0+, which dropped `ancestor_ids`).
    pub cgroup_ancestors: u32,
    /// `struct cgroup` -> `kn` and `struct kernfs_node` -> `id`: a cgroup's
    /// id, the inode number of its directory.
    pub cgroup_kn: u32,
    pub kernfs_node_id: u32,
}
const _: () = assert!(size_of::<KernelOffsets>() == 92);

impl KernelOffsets {
    /// Whether the programs can tell a socket's cgroup and its ancestors.
    pub const fn knows_socket_cgroups(&self) -> bool {
        self.sk_cgrp_data != 0
            && self.cgroup_level != 0
            && (self.cgroup_ancestor_ids != 0
                || (self.cgroup_ancestors != 0 && self.cgroup_kn != 0 && self.kernfs_node_id != 0))
    }
}

/// The cgroup the daemon watches, written by userspace at load time into the
/// `WATCH_CGROUP` global.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WatchedCgroup {
    /// Its id: the inode number of its cgroup2 directory, as the kernel's
    /// `kernfs_node.id`.
    pub id: u64,
    /// 1 when it is a subtree (`--cgroup`), 0 for the whole machine.
    pub subtree: u8,
    pub _pad: [u8; 7],
}
const _: () = assert!(size_of::<WatchedCgroup>() == 16);

/// One record in the `EVENTS` ring buffer. Every kind uses the same layout;
/// fields a kind does not fill are zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    /// CLOCK_BOOTTIME, nanoseconds.
    pub ts_ns: u64,
    /// Socket cookie (`bpf_get_socket_cookie`), the socket's identity; 0 when
    /// the kernel never assigned one.
    pub cookie: u64,
    /// Network namespace cookie; 0 when unknown.
    pub netns_cookie: u64,
    /// cgroup v2 id of the calling task.
    pub cgroup_id: u64,
    /// Process id (tgid) and thread id of the calling task.
    pub pid: u32,
    pub tid: u32,
    /// Real uid of the calling task.
    pub uid: u32,
    /// Owner uid of the socket (`sk_uid`, what SO_REUSEPORT compares);
    /// `u32::MAX` when unknown.
    pub sock_uid: u32,
    /// 0 on success, a positive errno on failure, [`ERRNO_UNKNOWN`].
    pub errno: i32,
    /// `listen()` backlog as the kernel capped it; 0 when not a listen.
    pub backlog: u32,
    /// [`opt`] bits set on the socket.
    pub options: u32,
    /// [`opt`] bits that were read; a bit missing here means "unknown".
    pub options_known: u32,
    /// [`AF_INET`] or [`AF_INET6`].
    pub family: u16,
    /// Port asked for (host byte order).
    pub port: u16,
    /// Port actually bound (host byte order); 0 when none.
    pub bound_port: u16,
    /// IP protocol number (6 TCP, 17 UDP, 136 UDP-Lite, 262 MPTCP).
    pub protocol: u16,
    /// A [`kind`] constant.
    pub kind: u8,
    /// SOCK_STREAM (1), SOCK_DGRAM (2), ...
    pub sock_type: u8,
    /// A [`source`] constant.
    pub source: u8,
    /// A [`port_alloc`] constant: what the kernel's TCP port allocation
    /// (`inet_csk_get_port`) said during this bind or listen.
    pub port_alloc: u8,
    /// The remote port of a connect (host byte order); 0 otherwise.
    pub peer_port: u16,
    pub _pad: [u8; 2],
    /// Local address, network byte order; IPv4 uses the first 4 bytes.
    pub addr: [u8; 16],
    /// `comm` of the calling task, NUL-padded.
    pub comm: [u8; 16],
    /// The remote address of a connect, network byte order; zero otherwise.
    pub peer_addr: [u8; 16],
}
const _: () = assert!(size_of::<Event>() == 128);

impl Event {
    /// The record every hook starts from: zeroes, with the socket uid unknown.
    pub const ZERO: Event = Event {
        ts_ns: 0,
        cookie: 0,
        netns_cookie: 0,
        cgroup_id: 0,
        pid: 0,
        tid: 0,
        uid: 0,
        sock_uid: u32::MAX,
        errno: 0,
        backlog: 0,
        options: 0,
        options_known: 0,
        family: 0,
        port: 0,
        bound_port: 0,
        protocol: 0,
        kind: 0,
        sock_type: 0,
        source: 0,
        port_alloc: port_alloc::NOT_SEEN,
        peer_port: 0,
        _pad: [0; 2],
        addr: [0; 16],
        comm: [0; 16],
        peer_addr: [0; 16],
    };
}

#[cfg(feature = "user")]
// SAFETY: plain-old-data, every bit pattern is valid, no padding left implicit.
unsafe impl aya::Pod for Event {}
#[cfg(feature = "user")]
// SAFETY: as above.
unsafe impl aya::Pod for KernelOffsets {}
#[cfg(feature = "user")]
// SAFETY: as above.
unsafe impl aya::Pod for WatchedCgroup {}
#[cfg(feature = "user")]
// SAFETY: as above.
unsafe impl aya::Pod for PendingBind {}
