//! Typed events decoded from the kernel's raw ring-buffer records.
//!
//! [`decode`] checks the record's length, copies it into the wire struct
//! [`portwatch_ebpf::Event`], and converts every enum-like integer (kind,
//! family, protocol, socket type, source) with `TryFrom` or a `match`: an
//! unknown value is a [`DecodeError`] naming the field, never a guess. Values
//! the kernel marks as unknown (socket uid `u32::MAX`, cookie 0, an option bit
//! missing from `options_known`) become `None`.
//!
//! Nothing here does I/O except [`BootClock::now`], which reads two clocks.

use std::{
    borrow::Cow,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    str::FromStr,
    sync::LazyLock,
    time::{Duration, SystemTime},
};

use portwatch_ebpf::{
    AF_INET, AF_INET6, ERRNO_UNKNOWN, Event as RawEvent, kind, opt, port_alloc, source,
};
use serde::{Serialize, Serializer};

/// Why a raw record could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The record is not the size of [`portwatch_ebpf::Event`]: the daemon
    /// and the kernel programs disagree on the wire format.
    #[error("record is {actual} bytes, expected {expected}")]
    Length {
        /// Size of the wire struct.
        expected: usize,
        /// Size of the record received.
        actual: usize,
    },
    /// `kind` is not one of the [`portwatch_ebpf::kind`] constants.
    #[error("unknown event kind {0}")]
    Kind(u8),
    /// `family` is neither `AF_INET` nor `AF_INET6`.
    #[error("unknown address family {0}")]
    Family(u16),
    /// `protocol` is not an IP protocol portwatch knows.
    #[error("unknown ip protocol {0}")]
    Protocol(u16),
    /// `sock_type` is not a Linux socket type.
    #[error("unknown socket type {0}")]
    SockType(u8),
    /// `source` is not one of the [`portwatch_ebpf::source`] constants.
    #[error("unknown event source {0}")]
    Source(u8),
    /// `port_alloc` is not one of the [`portwatch_ebpf::port_alloc`]
    /// constants.
    #[error("unknown port allocation verdict {0}")]
    PortAlloc(u8),
}

/// Decodes one record from the ring buffer.
pub fn decode(bytes: &[u8]) -> Result<PortEvent, DecodeError> {
    let expected = size_of::<RawEvent>();
    if bytes.len() != expected {
        return Err(DecodeError::Length {
            expected,
            actual: bytes.len(),
        });
    }
    // SAFETY: `bytes` holds exactly `size_of::<RawEvent>()` bytes (checked
    // above); `RawEvent` is `#[repr(C)]` and made only of integers and byte
    // arrays, so every bit pattern is a valid value; `read_unaligned` copies
    // without requiring the ring buffer's slice to be aligned.
    let raw = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<RawEvent>()) };
    PortEvent::try_from(&raw)
}

/// What happened to a socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// A bind succeeded.
    Bind,
    /// A bind failed; the event's `errno` says why.
    BindFailed,
    /// A TCP socket started listening.
    Listen,
    /// `listen()` failed; the event's `errno` says why.
    ListenFailed,
    /// A listener stopped listening but stays open (`shutdown()`).
    ListenStop,
    /// A tracked socket was closed by its last holder: its port is free.
    Close,
    /// connect() found no free local port (EADDRNOTAVAIL, EAGAIN,
    /// EADDRINUSE); `peer` is the destination.
    ConnectFailed,
    /// A tracked socket (bound or listening) connected to `peer`.
    Connected,
}

impl EventKind {
    /// Maps the raw `kind` and `errno`: a bind is split by its outcome.
    fn from_raw(kind: u8, errno: i32) -> Result<Self, DecodeError> {
        Ok(match kind {
            kind::BIND if errno == 0 => Self::Bind,
            kind::BIND => Self::BindFailed,
            kind::LISTEN => Self::Listen,
            kind::LISTEN_FAILED => Self::ListenFailed,
            kind::LISTEN_STOP => Self::ListenStop,
            kind::CLOSE => Self::Close,
            kind::CONNECT_FAILED => Self::ConnectFailed,
            kind::CONNECTED => Self::Connected,
            other => return Err(DecodeError::Kind(other)),
        })
    }

    /// The name used in text and JSON output (`bind_failed`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Self::Bind => "bind",
            Self::BindFailed => "bind_failed",
            Self::Listen => "listen",
            Self::ListenFailed => "listen_failed",
            Self::ListenStop => "listen_stop",
            Self::Close => "close",
            Self::ConnectFailed => "connect_failed",
            Self::Connected => "connected",
        }
    }

    /// Every kind of event.
    pub const ALL: [EventKind; 8] = [
        EventKind::Bind,
        EventKind::BindFailed,
        EventKind::Listen,
        EventKind::ListenFailed,
        EventKind::ListenStop,
        EventKind::Close,
        EventKind::ConnectFailed,
        EventKind::Connected,
    ];

    /// Whether this is a failed bind, listen or connect.
    pub fn is_failure(self) -> bool {
        matches!(
            self,
            Self::BindFailed | Self::ListenFailed | Self::ConnectFailed
        )
    }

    /// Whether this is about a connect (`peer` is its destination).
    pub fn is_connect(self) -> bool {
        matches!(self, Self::ConnectFailed | Self::Connected)
    }

    /// Whether this is about a listener (the backlog is meaningful).
    pub fn is_listen(self) -> bool {
        matches!(self, Self::Listen | Self::ListenFailed | Self::ListenStop)
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Transport protocol of the socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// IPPROTO_TCP (6).
    Tcp,
    /// IPPROTO_UDP (17).
    Udp,
    /// IPPROTO_UDPLITE (136).
    UdpLite,
    /// IPPROTO_SCTP (132).
    Sctp,
    /// IPPROTO_MPTCP (262).
    Mptcp,
}

impl Protocol {
    /// The IP protocol number.
    pub fn number(self) -> u16 {
        match self {
            Self::Tcp => 6,
            Self::Udp => 17,
            Self::UdpLite => 136,
            Self::Sctp => 132,
            Self::Mptcp => 262,
        }
    }

    /// The name used in text and JSON output (`tcp`, `udplite`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
            Self::UdpLite => "udplite",
            Self::Sctp => "sctp",
            Self::Mptcp => "mptcp",
        }
    }

    /// Every protocol portwatch reports.
    pub const ALL: [Protocol; 5] = [
        Protocol::Tcp,
        Protocol::Udp,
        Protocol::UdpLite,
        Protocol::Sctp,
        Protocol::Mptcp,
    ];

    /// The protocol [`Protocol::name`] spells `name`, in any case.
    pub fn from_name(name: &str) -> Option<Protocol> {
        Protocol::ALL
            .into_iter()
            .find(|p| p.name().eq_ignore_ascii_case(name))
    }
}

impl TryFrom<u16> for Protocol {
    type Error = DecodeError;

    fn try_from(number: u16) -> Result<Self, DecodeError> {
        Ok(match number {
            6 => Self::Tcp,
            17 => Self::Udp,
            136 => Self::UdpLite,
            132 => Self::Sctp,
            262 => Self::Mptcp,
            other => return Err(DecodeError::Protocol(other)),
        })
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Address family of the socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// AF_INET.
    Ipv4,
    /// AF_INET6.
    Ipv6,
}

impl Family {
    /// The family of an address (an IPv4-mapped IPv6 address is IPv6).
    pub fn of(address: IpAddr) -> Family {
        match address {
            IpAddr::V4(_) => Family::Ipv4,
            IpAddr::V6(_) => Family::Ipv6,
        }
    }

    /// The name used in text and JSON output (`ipv4`, `ipv6`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Ipv4 => "ipv4",
            Self::Ipv6 => "ipv6",
        }
    }
}

impl TryFrom<u16> for Family {
    type Error = DecodeError;

    fn try_from(family: u16) -> Result<Self, DecodeError> {
        match family {
            AF_INET => Ok(Self::Ipv4),
            AF_INET6 => Ok(Self::Ipv6),
            other => Err(DecodeError::Family(other)),
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Socket type (`SOCK_STREAM`, ...), as Linux numbers them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SockType {
    /// SOCK_STREAM (1).
    Stream,
    /// SOCK_DGRAM (2).
    Dgram,
    /// SOCK_RAW (3).
    Raw,
    /// SOCK_RDM (4).
    Rdm,
    /// SOCK_SEQPACKET (5).
    Seqpacket,
    /// SOCK_DCCP (6).
    Dccp,
    /// SOCK_PACKET (10).
    Packet,
}

impl SockType {
    /// The name used in JSON output (`stream`, `dgram`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Self::Stream => "stream",
            Self::Dgram => "dgram",
            Self::Raw => "raw",
            Self::Rdm => "rdm",
            Self::Seqpacket => "seqpacket",
            Self::Dccp => "dccp",
            Self::Packet => "packet",
        }
    }
}

impl TryFrom<u8> for SockType {
    type Error = DecodeError;

    fn try_from(sock_type: u8) -> Result<Self, DecodeError> {
        Ok(match sock_type {
            1 => Self::Stream,
            2 => Self::Dgram,
            3 => Self::Raw,
            4 => Self::Rdm,
            5 => Self::Seqpacket,
            6 => Self::Dccp,
            10 => Self::Packet,
            other => return Err(DecodeError::SockType(other)),
        })
    }
}

impl fmt::Display for SockType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Which kernel hook reported the outcome (see [`portwatch_ebpf::source`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// cgroup `post_bind4`/`post_bind6`.
    PostBind,
    /// `syscalls/sys_exit_bind` or `syscalls/sys_exit_listen`.
    SyscallExit,
    /// fexit on `inet_bind`/`inet6_bind`/`inet_listen`.
    Fexit,
    /// `sock/inet_sock_set_state`.
    State,
    /// cgroup `sock_release`.
    Release,
    /// No hook reported the outcome: the errno is unknown, or inferred by
    /// the conflict rules ([`PortEvent::errno_source`]).
    Unresolved,
    /// `tcp/tcp_destroy_sock`: a tracked TCP socket freed where no release
    /// hook ran (an MPTCP subflow, a kernel socket).
    Destroy,
}

impl Source {
    /// The name used in text and JSON output (`post_bind`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Self::PostBind => "post_bind",
            Self::SyscallExit => "syscall_exit",
            Self::Fexit => "fexit",
            Self::State => "state",
            Self::Release => "release",
            Self::Unresolved => "unresolved",
            Self::Destroy => "destroy",
        }
    }
}

impl TryFrom<u8> for Source {
    type Error = DecodeError;

    fn try_from(raw: u8) -> Result<Self, DecodeError> {
        Ok(match raw {
            source::POST_BIND => Self::PostBind,
            source::SYSCALL_EXIT => Self::SyscallExit,
            source::FEXIT => Self::Fexit,
            source::STATE => Self::State,
            source::RELEASE => Self::Release,
            source::UNRESOLVED => Self::Unresolved,
            source::DESTROY => Self::Destroy,
            other => return Err(DecodeError::Source(other)),
        })
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What TCP's port allocation (`inet_csk_get_port`) said during a bind or
/// listen, seen by fexit on it. Absent (`None` on [`PortEvent`]) when that
/// hook is not attached or did not run for the call: UDP, an
/// IP_BIND_ADDRESS_NO_PORT bind, a failure decided before the port check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PortAlloc {
    /// The port was given to the socket.
    Allocated,
    /// The port conflict check refused the socket: an EADDRINUSE that
    /// follows comes from a conflict for certain.
    Refused,
}

impl PortAlloc {
    /// Decodes [`RawEvent::port_alloc`]; `None` for "not seen".
    fn from_raw(raw: u8) -> Result<Option<Self>, DecodeError> {
        Ok(match raw {
            port_alloc::NOT_SEEN => None,
            port_alloc::ALLOCATED => Some(Self::Allocated),
            port_alloc::REFUSED => Some(Self::Refused),
            other => return Err(DecodeError::PortAlloc(other)),
        })
    }

    /// The name used in text and JSON output (`allocated`, `refused`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Allocated => "allocated",
            Self::Refused => "refused",
        }
    }
}

impl fmt::Display for PortAlloc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Error number of a failed bind or listen: positive as in `errno(3)`, or
/// [`Errno::UNKNOWN`] when the failure was seen but its code was not.
///
/// Displays and serializes as its symbolic name (`EADDRINUSE`), and parses
/// back from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Errno(pub i32);

/// The largest error number the kernel can return (`MAX_ERRNO`): the names
/// table is built for 1 through this.
const MAX_ERRNO: i32 = 4095;

/// Symbolic names by number, from nix's table (which follows libc's), built
/// on first use. Index 0 is unused.
static ERRNO_NAMES: LazyLock<Vec<Option<String>>> = LazyLock::new(|| {
    (0..=MAX_ERRNO)
        .map(|n| match nix::errno::Errno::from_raw(n) {
            nix::errno::Errno::UnknownErrno => None,
            known => Some(format!("{known:?}")),
        })
        .collect()
});

/// Names glibc defines as aliases of another errno: accepted when parsing,
/// never printed.
const ERRNO_ALIASES: [(&str, i32); 3] = [
    ("EWOULDBLOCK", libc::EAGAIN),
    ("EDEADLOCK", libc::EDEADLK),
    ("ENOTSUP", libc::EOPNOTSUPP),
];

impl Errno {
    /// A failure whose error code no hook reported.
    pub const UNKNOWN: Errno = Errno(ERRNO_UNKNOWN);
    /// Address already in use.
    pub const EADDRINUSE: Errno = Errno(libc::EADDRINUSE);
    /// Address not available on this host.
    pub const EADDRNOTAVAIL: Errno = Errno(libc::EADDRNOTAVAIL);
    /// Permission denied (privileged port, or a cgroup program refused).
    pub const EACCES: Errno = Errno(libc::EACCES);
    /// Operation not permitted.
    pub const EPERM: Errno = Errno(libc::EPERM);
    /// Invalid argument (for example, the socket is already bound).
    pub const EINVAL: Errno = Errno(libc::EINVAL);
    /// Try again: a UDP socket's autobind found the range full.
    pub const EAGAIN: Errno = Errno(libc::EAGAIN);

    /// The symbolic name: `EADDRINUSE`, `UNKNOWN` for [`Errno::UNKNOWN`],
    /// `E<n>` for a number no table knows.
    pub fn name(self) -> Cow<'static, str> {
        if self == Self::UNKNOWN {
            return Cow::Borrowed("UNKNOWN");
        }
        let known = usize::try_from(self.0)
            .ok()
            .and_then(|n| ERRNO_NAMES.get(n))
            .and_then(|name| name.as_deref());
        match known {
            Some(name) => Cow::Borrowed(name),
            None => Cow::Owned(format!("E{}", self.0)),
        }
    }

    /// A short description, as `strerror(3)` gives it.
    pub fn description(self) -> &'static str {
        if self == Self::UNKNOWN {
            return "error code not reported";
        }
        match nix::errno::Errno::from_raw(self.0) {
            nix::errno::Errno::UnknownErrno => "unknown error",
            known => known.desc(),
        }
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

impl Serialize for Errno {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.name())
    }
}

/// A string that is not an errno name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown errno name {0:?}")]
pub struct ParseErrnoError(pub String);

impl FromStr for Errno {
    type Err = ParseErrnoError;

    /// Parses what [`Errno::name`] prints, ignoring case: a symbolic name
    /// (`EADDRINUSE`, or a glibc alias such as `EWOULDBLOCK`), `UNKNOWN`,
    /// `E<n>`, or a bare number.
    fn from_str(s: &str) -> Result<Self, ParseErrnoError> {
        if s.eq_ignore_ascii_case("UNKNOWN") {
            return Ok(Self::UNKNOWN);
        }
        if let Some(n) = ERRNO_NAMES.iter().position(|name| {
            name.as_deref()
                .is_some_and(|name| name.eq_ignore_ascii_case(s))
        }) {
            // Index is at most MAX_ERRNO, so it fits.
            return Ok(Self(n as i32));
        }
        if let Some(&(_, n)) = ERRNO_ALIASES
            .iter()
            .find(|(alias, _)| alias.eq_ignore_ascii_case(s))
        {
            return Ok(Self(n));
        }
        let digits = match s.as_bytes().first() {
            Some(b'E' | b'e') => &s[1..],
            _ => s,
        };
        digits
            .parse()
            .map(Self)
            .map_err(|_| ParseErrnoError(s.to_owned()))
    }
}

/// Socket options in force at bind time. Each is `None` when the kernel could
/// not read it: unknown, never guessed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Options {
    /// SO_REUSEADDR.
    pub reuse_addr: Option<bool>,
    /// SO_REUSEPORT.
    pub reuse_port: Option<bool>,
    /// IPV6_V6ONLY; always `None` on IPv4 sockets, where it has no meaning.
    pub v6only: Option<bool>,
    /// IP_FREEBIND.
    pub freebind: Option<bool>,
    /// IP_TRANSPARENT.
    pub transparent: Option<bool>,
    /// IP_BIND_ADDRESS_NO_PORT.
    pub bind_address_no_port: Option<bool>,
}

impl Options {
    /// Reads the [`portwatch_ebpf::opt`] bits: `options` says which are set,
    /// `known` which were read at all.
    pub fn from_bits(options: u32, known: u32) -> Self {
        let bit = |b: u32| (known & b != 0).then_some(options & b != 0);
        Self {
            reuse_addr: bit(opt::REUSEADDR),
            reuse_port: bit(opt::REUSEPORT),
            v6only: bit(opt::V6ONLY),
            freebind: bit(opt::FREEBIND),
            transparent: bit(opt::TRANSPARENT),
            bind_address_no_port: bit(opt::BIND_ADDRESS_NO_PORT),
        }
    }
}

/// One decoded event about a socket's address.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PortEvent {
    /// What happened.
    pub kind: EventKind,
    /// When, as CLOCK_BOOTTIME nanoseconds (see [`BootClock`]).
    pub boot_ns: u64,
    /// Process id (tgid) of the calling task.
    pub pid: u32,
    /// Thread id of the calling task.
    pub tid: u32,
    /// Real uid of the calling task.
    pub uid: u32,
    /// Owner uid of the socket (what SO_REUSEPORT compares); `None` when
    /// unknown.
    pub sock_uid: Option<u32>,
    /// `comm` of the calling task (at most 15 bytes, lossy UTF-8).
    pub process: String,
    /// cgroup v2 id of the calling task.
    pub cgroup_id: u64,
    /// Network namespace cookie; `None` when unknown.
    pub netns: Option<u64>,
    /// Socket cookie, the socket's identity; `None` when unknown.
    pub cookie: Option<u64>,
    /// Transport protocol.
    pub protocol: Protocol,
    /// Address family.
    pub family: Family,
    /// Socket type.
    pub sock_type: SockType,
    /// Local address asked for (or listened on). Unspecified for `Close`
    /// records, which carry no address.
    pub address: IpAddr,
    /// Port asked for; 0 asks for an ephemeral port (and for `Close`
    /// records, which carry no port).
    pub port: u16,
    /// Port actually bound; `None` when none is (yet) known.
    pub bound_port: Option<u16>,
    /// Why it failed: `Some` exactly for [`EventKind::is_failure`] kinds.
    pub errno: Option<Errno>,
    /// Socket options at bind time.
    pub options: Options,
    /// `listen()` backlog as the kernel capped it; listen kinds only.
    pub backlog: Option<u32>,
    /// Which kernel hook reported the outcome.
    pub source: Source,
    /// TCP's port allocation verdict; `None` when not seen.
    pub port_alloc: Option<PortAlloc>,
    /// The destination of a connect; `None` for other kinds.
    pub peer: Option<SocketAddr>,
}

/// Where a failure's errno came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrnoSource {
    /// The kernel returned it: an outcome hook saw the call return.
    Kernel,
    /// No outcome hook ran; the conflict rules, replayed against what
    /// portwatch knew of the port, named it (`failures::infer_errno`).
    Inferred,
}

impl ErrnoSource {
    /// The name used in text and JSON output.
    pub fn name(self) -> &'static str {
        match self {
            Self::Kernel => "kernel",
            Self::Inferred => "inferred",
        }
    }
}

impl PortEvent {
    /// Where the errno came from; `None` where there is none, or it is
    /// [`Errno::UNKNOWN`]. A record no outcome hook completed
    /// ([`Source::Unresolved`]) carries a known errno only once the rules
    /// inferred it.
    pub fn errno_source(&self) -> Option<ErrnoSource> {
        match self.errno {
            None | Some(Errno::UNKNOWN) => None,
            // An unresolved failure's errno came from the rules; a failed
            // connect seen leaving SYN_SENT with no port, from the state.
            Some(_)
                if self.source == Source::Unresolved
                    || (self.source == Source::State && self.kind == EventKind::ConnectFailed) =>
            {
                Some(ErrnoSource::Inferred)
            }
            Some(_) => Some(ErrnoSource::Kernel),
        }
    }

    /// A failed bind or listen that no outcome hook completed, whose errno
    /// is not known (yet): the rules may infer it.
    pub fn errno_unknown(&self) -> bool {
        matches!(self.kind, EventKind::BindFailed | EventKind::ListenFailed)
            && self.source == Source::Unresolved
            && self.errno.is_none_or(|e| e == Errno::UNKNOWN)
    }

    /// Where the socket is, as users write it: the bound port when known,
    /// else the requested one (`127.0.0.1:8000`, `[::1]:8000`).
    pub fn endpoint(&self) -> String {
        endpoint(self.address, self.bound_port.unwrap_or(self.port))
    }

    /// The address and port that were asked for (`0.0.0.0:0`).
    pub fn requested_endpoint(&self) -> String {
        endpoint(self.address, self.port)
    }

    /// Whether the event is about port `port`: the one asked for, the one
    /// bound, or a connect's destination port.
    pub fn concerns_port(&self, port: u16) -> bool {
        self.port == port
            || self.bound_port == Some(port)
            || self.peer.is_some_and(|peer| peer.port() == port)
    }

    /// A plausible event built by hand, for tests and examples: `kind` of
    /// socket `cookie` on `address:port`, by `example` (pid and tid 1000,
    /// uid 0) in network namespace 1, options unknown. A failure carries
    /// EADDRINUSE and no bound port. Override fields with `..`.
    pub fn example(
        kind: EventKind,
        protocol: Protocol,
        address: IpAddr,
        port: u16,
        cookie: u64,
    ) -> PortEvent {
        let failed = kind.is_failure();
        PortEvent {
            kind,
            boot_ns: 1,
            pid: 1000,
            tid: 1000,
            uid: 0,
            sock_uid: Some(0),
            process: "example".into(),
            cgroup_id: 1,
            netns: Some(1),
            cookie: Some(cookie),
            protocol,
            family: Family::of(address),
            sock_type: if protocol == Protocol::Udp {
                SockType::Dgram
            } else {
                SockType::Stream
            },
            address,
            port,
            bound_port: (!failed && port != 0).then_some(port),
            errno: failed.then_some(Errno::EADDRINUSE),
            options: Options::default(),
            backlog: None,
            source: if failed {
                Source::SyscallExit
            } else {
                Source::PostBind
            },
            port_alloc: None,
            peer: None,
        }
    }
}

impl TryFrom<&RawEvent> for PortEvent {
    type Error = DecodeError;

    fn try_from(raw: &RawEvent) -> Result<Self, DecodeError> {
        let kind = EventKind::from_raw(raw.kind, raw.errno)?;
        let family = Family::try_from(raw.family)?;
        let address = match family {
            Family::Ipv4 => {
                let [a, b, c, d, ..] = raw.addr;
                IpAddr::V4(Ipv4Addr::new(a, b, c, d))
            }
            Family::Ipv6 => IpAddr::V6(Ipv6Addr::from(raw.addr)),
        };
        // A failure record always carries a code; 0 there would be a
        // kernel-side bug, reported as "not known" rather than success.
        let errno = kind.is_failure().then_some(match raw.errno {
            0 => Errno::UNKNOWN,
            n => Errno(n),
        });
        let mut options = Options::from_bits(raw.options, raw.options_known);
        if family == Family::Ipv4 {
            options.v6only = None;
        }
        let comm_len = raw
            .comm
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(raw.comm.len());
        Ok(Self {
            kind,
            boot_ns: raw.ts_ns,
            pid: raw.pid,
            tid: raw.tid,
            uid: raw.uid,
            sock_uid: (raw.sock_uid != u32::MAX).then_some(raw.sock_uid),
            process: String::from_utf8_lossy(&raw.comm[..comm_len]).into_owned(),
            cgroup_id: raw.cgroup_id,
            netns: (raw.netns_cookie != 0).then_some(raw.netns_cookie),
            cookie: (raw.cookie != 0).then_some(raw.cookie),
            protocol: Protocol::try_from(raw.protocol)?,
            family,
            sock_type: SockType::try_from(raw.sock_type)?,
            address,
            port: raw.port,
            bound_port: (raw.bound_port != 0).then_some(raw.bound_port),
            errno,
            options,
            backlog: (kind.is_listen() && raw.backlog != 0).then_some(raw.backlog),
            source: Source::try_from(raw.source)?,
            port_alloc: PortAlloc::from_raw(raw.port_alloc)?,
            peer: kind.is_connect().then(|| {
                let address = match family {
                    Family::Ipv4 => {
                        let [a, b, c, d, ..] = raw.peer_addr;
                        IpAddr::V4(Ipv4Addr::new(a, b, c, d))
                    }
                    Family::Ipv6 => IpAddr::V6(Ipv6Addr::from(raw.peer_addr)),
                };
                SocketAddr::new(address, raw.peer_port)
            }),
        })
    }
}

/// Formats an address and port as users write them: `0.0.0.0:8000`,
/// `[::1]:8000`.
pub fn endpoint(addr: IpAddr, port: u16) -> String {
    SocketAddr::new(addr, port).to_string()
}

/// Converts CLOCK_BOOTTIME timestamps (what the kernel records) to wall-clock
/// time, with the offset between the two clocks taken once.
///
/// Boot time keeps counting through suspend, so the offset stays right until
/// someone sets the wall clock; take a new one then.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootClock {
    /// CLOCK_REALTIME minus CLOCK_BOOTTIME, in nanoseconds.
    offset_ns: i128,
}

impl BootClock {
    /// Reads CLOCK_REALTIME and CLOCK_BOOTTIME now.
    ///
    /// # Panics
    ///
    /// If `clock_gettime` fails, which it only does for a clock the kernel
    /// lacks (CLOCK_BOOTTIME is older than every kernel portwatch loads on).
    pub fn now() -> Self {
        // Boot time read on both sides of the wall clock, halving the error
        // a preemption between the two reads would add.
        let before = clock_ns(libc::CLOCK_BOOTTIME);
        let real = clock_ns(libc::CLOCK_REALTIME);
        let after = clock_ns(libc::CLOCK_BOOTTIME);
        Self::from_offset_ns(real - (before + after) / 2)
    }

    /// A clock with a fixed offset (wall time minus boot time, nanoseconds).
    pub const fn from_offset_ns(offset_ns: i128) -> Self {
        Self { offset_ns }
    }

    /// The wall-clock time of a CLOCK_BOOTTIME timestamp. Saturates at the
    /// Unix epoch and at the largest time `SystemTime` holds, which only
    /// nonsense timestamps reach.
    pub fn to_system_time(&self, boot_ns: u64) -> SystemTime {
        let wall_ns = i128::from(boot_ns) + self.offset_ns;
        let Ok(wall_ns) = u128::try_from(wall_ns) else {
            return SystemTime::UNIX_EPOCH;
        };
        let secs = u64::try_from(wall_ns / 1_000_000_000).unwrap_or(u64::MAX);
        // The remainder is below 1e9, so it fits.
        let nanos = (wall_ns % 1_000_000_000) as u32;
        let since_epoch = Duration::new(secs, nanos);
        SystemTime::UNIX_EPOCH
            .checked_add(since_epoch)
            .unwrap_or_else(|| largest_system_time(since_epoch))
    }
}

/// The latest `SystemTime` not after `UNIX_EPOCH + want`, found by halving.
fn largest_system_time(want: Duration) -> SystemTime {
    let (mut good, mut bad) = (Duration::ZERO, want);
    while bad - good > Duration::from_secs(1) {
        let mid = good + (bad - good) / 2;
        if SystemTime::UNIX_EPOCH.checked_add(mid).is_some() {
            good = mid;
        } else {
            bad = mid;
        }
    }
    SystemTime::UNIX_EPOCH + good
}

/// Reads one clock, in nanoseconds.
/// CLOCK_BOOTTIME now, in nanoseconds: the clock of the kernel's records.
pub fn boot_ns_now() -> u64 {
    u64::try_from(clock_ns(libc::CLOCK_BOOTTIME)).unwrap_or(0)
}

fn clock_ns(clock: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
    let rc = unsafe { libc::clock_gettime(clock, &mut ts) };
    assert_eq!(
        rc,
        0,
        "clock_gettime({clock}) failed: {}",
        std::io::Error::last_os_error()
    );
    i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
}

#[cfg(test)]
pub(crate) mod tests {
    use std::mem::offset_of;

    use proptest::prelude::*;

    use super::*;

    const SIZE: usize = size_of::<RawEvent>();

    /// Records of random bytes whose enum-like fields hold known values, so
    /// most of them decode (shared with the formatting tests).
    pub(crate) fn valid_record() -> impl Strategy<Value = Vec<u8>> {
        (
            proptest::collection::vec(any::<u8>(), SIZE),
            1..=7u8,
            prop::sample::select(vec![AF_INET, AF_INET6]),
            prop::sample::select(vec![6u16, 17, 136, 132, 262]),
            prop::sample::select(vec![1u8, 2, 3, 4, 5, 6, 10]),
            1..=6u8,
            0..=2u8,
        )
            .prop_map(
                |(mut bytes, kind, family, protocol, sock_type, source, alloc)| {
                    bytes[offset_of!(RawEvent, kind)] = kind;
                    bytes[offset_of!(RawEvent, port_alloc)] = alloc;
                    bytes[offset_of!(RawEvent, sock_type)] = sock_type;
                    bytes[offset_of!(RawEvent, source)] = source;
                    let family_at = offset_of!(RawEvent, family);
                    bytes[family_at..family_at + 2].copy_from_slice(&family.to_ne_bytes());
                    let protocol_at = offset_of!(RawEvent, protocol);
                    bytes[protocol_at..protocol_at + 2].copy_from_slice(&protocol.to_ne_bytes());
                    bytes
                },
            )
    }

    /// The record's bytes, as the ring buffer would hand them over.
    fn bytes_of(raw: &RawEvent) -> Vec<u8> {
        // SAFETY: `RawEvent` is `#[repr(C)]` plain data with explicit padding
        // fields, so all `SIZE` bytes behind the reference are initialized.
        unsafe { std::slice::from_raw_parts((raw as *const RawEvent).cast::<u8>(), SIZE) }.to_vec()
    }

    fn comm(name: &[u8]) -> [u8; 16] {
        let mut comm = [0; 16];
        comm[..name.len()].copy_from_slice(name);
        comm
    }

    /// A successful IPv4 TCP bind of 127.0.0.1:8000.
    fn bind_v4() -> RawEvent {
        let mut addr = [0; 16];
        addr[..4].copy_from_slice(&[127, 0, 0, 1]);
        RawEvent {
            ts_ns: 1_000_000_123,
            cookie: 4242,
            netns_cookie: 4096,
            cgroup_id: 77,
            pid: 1234,
            tid: 1235,
            uid: 1000,
            sock_uid: 1000,
            errno: 0,
            family: AF_INET,
            port: 8000,
            bound_port: 8000,
            protocol: 6,
            kind: kind::BIND,
            sock_type: 1,
            source: source::POST_BIND,
            addr,
            comm: comm(b"nginx"),
            ..RawEvent::ZERO
        }
    }

    /// An IPv6 UDP bind of [::1]:5353.
    fn bind_v6() -> RawEvent {
        RawEvent {
            family: AF_INET6,
            protocol: 17,
            sock_type: 2,
            port: 5353,
            bound_port: 5353,
            addr: Ipv6Addr::LOCALHOST.octets(),
            ..bind_v4()
        }
    }

    fn decoded(raw: RawEvent) -> PortEvent {
        decode(&bytes_of(&raw)).expect("valid record")
    }

    #[test]
    fn size_is_the_wire_size() {
        assert_eq!(SIZE, 128);
    }

    #[test]
    fn decodes_an_ipv4_bind() {
        let ev = decoded(bind_v4());
        assert_eq!(
            ev,
            PortEvent {
                kind: EventKind::Bind,
                boot_ns: 1_000_000_123,
                pid: 1234,
                tid: 1235,
                uid: 1000,
                sock_uid: Some(1000),
                process: "nginx".into(),
                cgroup_id: 77,
                netns: Some(4096),
                cookie: Some(4242),
                protocol: Protocol::Tcp,
                family: Family::Ipv4,
                sock_type: SockType::Stream,
                address: IpAddr::V4(Ipv4Addr::LOCALHOST),
                port: 8000,
                bound_port: Some(8000),
                errno: None,
                options: Options::default(),
                backlog: None,
                source: Source::PostBind,
                port_alloc: None,
                peer: None,
            }
        );
        assert_eq!(ev.endpoint(), "127.0.0.1:8000");
    }

    #[test]
    fn decodes_an_ipv6_bind() {
        let ev = decoded(bind_v6());
        assert_eq!(ev.family, Family::Ipv6);
        assert_eq!(ev.protocol, Protocol::Udp);
        assert_eq!(ev.sock_type, SockType::Dgram);
        assert_eq!(ev.address, IpAddr::V6(Ipv6Addr::LOCALHOST));
        assert_eq!(ev.endpoint(), "[::1]:5353");
    }

    #[test]
    fn ipv4_reads_only_the_first_four_bytes_in_network_order() {
        let mut raw = bind_v4();
        raw.addr = [10, 1, 2, 3, 0xff, 0xff, 0xff, 0xff, 9, 9, 9, 9, 9, 9, 9, 9];
        assert_eq!(decoded(raw).address, "10.1.2.3".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn decodes_every_kind() {
        let cases = [
            (kind::BIND, 0, EventKind::Bind),
            (kind::BIND, 98, EventKind::BindFailed),
            (kind::BIND, ERRNO_UNKNOWN, EventKind::BindFailed),
            (kind::LISTEN, 0, EventKind::Listen),
            (kind::LISTEN_FAILED, 98, EventKind::ListenFailed),
            (kind::LISTEN_STOP, 0, EventKind::ListenStop),
            (kind::CLOSE, 0, EventKind::Close),
        ];
        for (raw_kind, errno, want) in cases {
            let raw = RawEvent {
                kind: raw_kind,
                errno,
                ..bind_v4()
            };
            let ev = decoded(raw);
            assert_eq!(ev.kind, want, "kind {raw_kind} errno {errno}");
            assert_eq!(ev.errno.is_some(), want.is_failure(), "{want}");
        }
    }

    #[test]
    fn decodes_a_close_record_as_the_release_hook_fills_it() {
        let raw = RawEvent {
            kind: kind::CLOSE,
            source: source::RELEASE,
            family: AF_INET6,
            protocol: 6,
            sock_type: 1,
            cookie: 99,
            comm: comm(b"python3"),
            ..RawEvent::ZERO
        };
        let ev = decoded(raw);
        assert_eq!(ev.kind, EventKind::Close);
        assert_eq!(ev.source, Source::Release);
        assert_eq!(ev.cookie, Some(99));
        assert_eq!(ev.address, IpAddr::V6(Ipv6Addr::UNSPECIFIED));
        assert_eq!(ev.bound_port, None);
        assert_eq!(ev.sock_uid, None);
        assert_eq!(ev.netns, None);
        assert_eq!(ev.options, Options::default());
    }

    #[test]
    fn a_failed_bind_keeps_its_errno() {
        let raw = RawEvent {
            errno: 98,
            bound_port: 0,
            source: source::FEXIT,
            ..bind_v4()
        };
        let ev = decoded(raw);
        assert_eq!(ev.kind, EventKind::BindFailed);
        assert_eq!(ev.errno, Some(Errno::EADDRINUSE));
        assert_eq!(ev.bound_port, None);
        assert_eq!(ev.source, Source::Fexit);
    }

    #[test]
    fn a_listen_failure_without_a_code_is_unknown_not_success() {
        let raw = RawEvent {
            kind: kind::LISTEN_FAILED,
            errno: 0,
            ..bind_v4()
        };
        assert_eq!(decoded(raw).errno, Some(Errno::UNKNOWN));
    }

    #[test]
    fn backlog_only_for_listen_kinds() {
        let listen = RawEvent {
            kind: kind::LISTEN,
            backlog: 4096,
            source: source::FEXIT,
            ..bind_v4()
        };
        assert_eq!(decoded(listen).backlog, Some(4096));
        let unknown = RawEvent {
            backlog: 0,
            ..listen
        };
        assert_eq!(decoded(unknown).backlog, None);
        let bind = RawEvent {
            backlog: 4096,
            ..bind_v4()
        };
        assert_eq!(decoded(bind).backlog, None);
    }

    #[test]
    fn every_source_decodes() {
        let cases = [
            (source::POST_BIND, Source::PostBind),
            (source::SYSCALL_EXIT, Source::SyscallExit),
            (source::FEXIT, Source::Fexit),
            (source::STATE, Source::State),
            (source::RELEASE, Source::Release),
            (source::UNRESOLVED, Source::Unresolved),
            (source::DESTROY, Source::Destroy),
        ];
        for (raw, want) in cases {
            assert_eq!(
                decoded(RawEvent {
                    source: raw,
                    ..bind_v4()
                })
                .source,
                want
            );
        }
    }

    #[test]
    fn every_port_alloc_verdict_decodes() {
        let cases = [
            (port_alloc::NOT_SEEN, None),
            (port_alloc::ALLOCATED, Some(PortAlloc::Allocated)),
            (port_alloc::REFUSED, Some(PortAlloc::Refused)),
        ];
        for (raw, want) in cases {
            assert_eq!(
                decoded(RawEvent {
                    port_alloc: raw,
                    ..bind_v4()
                })
                .port_alloc,
                want
            );
        }
    }

    #[test]
    fn every_protocol_decodes() {
        let cases = [
            (6, Protocol::Tcp),
            (17, Protocol::Udp),
            (136, Protocol::UdpLite),
            (132, Protocol::Sctp),
            (262, Protocol::Mptcp),
        ];
        for (number, want) in cases {
            let raw = RawEvent {
                protocol: number,
                ..bind_v4()
            };
            assert_eq!(decoded(raw).protocol, want);
            assert_eq!(want.number(), number);
        }
    }

    #[test]
    fn wrong_lengths_are_rejected() {
        let good = bytes_of(&bind_v4());
        for len in [0, 1, 50, 127] {
            assert_eq!(
                decode(&good[..len]),
                Err(DecodeError::Length {
                    expected: 128,
                    actual: len
                })
            );
        }
        let mut long = good.clone();
        long.push(0);
        assert_eq!(
            decode(&long),
            Err(DecodeError::Length {
                expected: 128,
                actual: 129
            })
        );
    }

    #[test]
    fn decodes_from_an_unaligned_slice() {
        let mut buf = vec![0u8; 1];
        buf.extend(bytes_of(&bind_v4()));
        assert_eq!(decode(&buf[1..]), Ok(decoded(bind_v4())));
    }

    #[test]
    fn unknown_values_name_the_field() {
        let raw = bind_v4();
        let cases = [
            (RawEvent { kind: 0, ..raw }, DecodeError::Kind(0)),
            (RawEvent { kind: 8, ..raw }, DecodeError::Kind(8)),
            (RawEvent { family: 0, ..raw }, DecodeError::Family(0)),
            (RawEvent { family: 1, ..raw }, DecodeError::Family(1)),
            (RawEvent { protocol: 0, ..raw }, DecodeError::Protocol(0)),
            (RawEvent { protocol: 1, ..raw }, DecodeError::Protocol(1)),
            (
                RawEvent {
                    sock_type: 0,
                    ..raw
                },
                DecodeError::SockType(0),
            ),
            (RawEvent { source: 0, ..raw }, DecodeError::Source(0)),
            (RawEvent { source: 8, ..raw }, DecodeError::Source(8)),
            (
                RawEvent {
                    port_alloc: 3,
                    ..raw
                },
                DecodeError::PortAlloc(3),
            ),
        ];
        for (bad, want) in cases {
            assert_eq!(decode(&bytes_of(&bad)), Err(want));
        }
        assert_eq!(
            DecodeError::Protocol(1).to_string(),
            "unknown ip protocol 1"
        );
        assert_eq!(
            DecodeError::Length {
                expected: 128,
                actual: 50
            }
            .to_string(),
            "record is 50 bytes, expected 128"
        );
    }

    #[test]
    fn errno_names() {
        let cases = [
            (98, "EADDRINUSE"),
            (99, "EADDRNOTAVAIL"),
            (13, "EACCES"),
            (1, "EPERM"),
            (22, "EINVAL"),
            (105, "ENOBUFS"),
            (12, "ENOMEM"),
            (97, "EAFNOSUPPORT"),
            (95, "EOPNOTSUPP"),
            (106, "EISCONN"),
            (9, "EBADF"),
            (88, "ENOTSOCK"),
            (14, "EFAULT"),
            (107, "ENOTCONN"),
            (89, "EDESTADDRREQ"),
            (-1, "UNKNOWN"),
            (4242, "E4242"),
            (0, "E0"),
            (-5, "E-5"),
        ];
        for (n, name) in cases {
            assert_eq!(Errno(n).name(), name, "errno {n}");
            assert_eq!(Errno(n).to_string(), name);
            assert_eq!(name.parse::<Errno>(), Ok(Errno(n)), "{name}");
        }
        assert_eq!(Errno::UNKNOWN, Errno(-1));
        assert_eq!(Errno::EADDRINUSE.description(), "Address already in use");
    }

    #[test]
    fn errno_parsing() {
        assert_eq!("eaddrinuse".parse(), Ok(Errno::EADDRINUSE));
        assert_eq!("EAddrInUse".parse(), Ok(Errno::EADDRINUSE));
        assert_eq!("unknown".parse(), Ok(Errno::UNKNOWN));
        assert_eq!("98".parse(), Ok(Errno::EADDRINUSE));
        assert_eq!("E98".parse(), Ok(Errno::EADDRINUSE));
        assert_eq!("EWOULDBLOCK".parse(), Ok(Errno(libc::EAGAIN)));
        assert_eq!("enotsup".parse(), Ok(Errno(libc::EOPNOTSUPP)));
        for bad in ["", "E", "EADDRINUS", "EADDRINUSE ", "bind", "E9x"] {
            assert_eq!(
                bad.parse::<Errno>(),
                Err(ParseErrnoError(bad.to_owned())),
                "{bad:?}"
            );
        }
        assert_eq!(
            ParseErrnoError("x".into()).to_string(),
            "unknown errno name \"x\""
        );
    }

    #[test]
    fn errno_serializes_as_its_name() {
        assert_eq!(
            serde_json::to_string(&Errno::EADDRINUSE).unwrap(),
            "\"EADDRINUSE\""
        );
        assert_eq!(
            serde_json::to_string(&Errno::UNKNOWN).unwrap(),
            "\"UNKNOWN\""
        );
    }

    #[test]
    fn option_bits_known_and_unknown() {
        let raw = RawEvent {
            family: AF_INET6,
            addr: [0; 16],
            options: opt::REUSEADDR | opt::V6ONLY | opt::FREEBIND,
            options_known: opt::REUSEADDR | opt::REUSEPORT | opt::V6ONLY,
            ..bind_v4()
        };
        assert_eq!(
            decoded(raw).options,
            Options {
                reuse_addr: Some(true),
                reuse_port: Some(false),
                v6only: Some(true),
                // Set but not known: not trusted.
                freebind: None,
                transparent: None,
                bind_address_no_port: None,
            }
        );
        let all = RawEvent {
            options: opt::ALL,
            options_known: opt::ALL,
            ..raw
        };
        assert_eq!(decoded(all).options.bind_address_no_port, Some(true));
    }

    #[test]
    fn v6only_is_never_reported_for_ipv4() {
        let raw = RawEvent {
            options: opt::V6ONLY,
            options_known: opt::ALL,
            ..bind_v4()
        };
        let options = decoded(raw).options;
        assert_eq!(options.v6only, None);
        assert_eq!(options.reuse_addr, Some(false));
    }

    #[test]
    fn comm_with_and_without_nul() {
        let full = RawEvent {
            comm: *b"abcdefghijklmnop",
            ..bind_v4()
        };
        assert_eq!(decoded(full).process, "abcdefghijklmnop");
        let short = RawEvent {
            comm: comm(b"sshd"),
            ..bind_v4()
        };
        assert_eq!(decoded(short).process, "sshd");
        let empty = RawEvent {
            comm: [0; 16],
            ..bind_v4()
        };
        assert_eq!(decoded(empty).process, "");
        let after_nul = RawEvent {
            comm: comm(b"ab\0cd"),
            ..bind_v4()
        };
        assert_eq!(decoded(after_nul).process, "ab");
        let invalid = RawEvent {
            comm: comm(b"a\xffb"),
            ..bind_v4()
        };
        assert_eq!(decoded(invalid).process, "a\u{fffd}b");
    }

    #[test]
    fn unknown_markers_become_none() {
        let raw = RawEvent {
            sock_uid: u32::MAX,
            cookie: 0,
            netns_cookie: 0,
            bound_port: 0,
            ..bind_v4()
        };
        let ev = decoded(raw);
        assert_eq!(ev.sock_uid, None);
        assert_eq!(ev.cookie, None);
        assert_eq!(ev.netns, None);
        assert_eq!(ev.bound_port, None);
        assert_eq!(decoded(RawEvent { sock_uid: 0, ..raw }).sock_uid, Some(0));
    }

    #[test]
    fn endpoints_as_users_write_them() {
        let cases = [
            ("0.0.0.0", 8000, "0.0.0.0:8000"),
            ("127.0.0.1", 65535, "127.0.0.1:65535"),
            ("::1", 8000, "[::1]:8000"),
            ("::", 0, "[::]:0"),
            ("::", 8000, "[::]:8000"),
            ("::ffff:127.0.0.1", 80, "[::ffff:127.0.0.1]:80"),
        ];
        for (addr, port, want) in cases {
            assert_eq!(endpoint(addr.parse().unwrap(), port), want);
        }
    }

    #[test]
    fn endpoint_prefers_the_bound_port() {
        let raw = RawEvent {
            port: 0,
            bound_port: 43210,
            ..bind_v4()
        };
        let ev = decoded(raw);
        assert_eq!(ev.endpoint(), "127.0.0.1:43210");
        assert_eq!(ev.requested_endpoint(), "127.0.0.1:0");
    }

    #[test]
    fn an_event_concerns_the_requested_and_the_bound_port() {
        let ev = decoded(RawEvent {
            port: 0,
            bound_port: 43210,
            ..bind_v4()
        });
        assert!(ev.concerns_port(0) && ev.concerns_port(43210));
        assert!(!ev.concerns_port(8000));
    }

    #[test]
    fn serde_names_match_name_methods() {
        let name = |v: serde_json::Value| v.as_str().unwrap().to_owned();
        for k in EventKind::ALL {
            assert_eq!(name(serde_json::to_value(k).unwrap()), k.name());
        }
        for p in Protocol::ALL {
            assert_eq!(name(serde_json::to_value(p).unwrap()), p.name());
        }
        for f in [Family::Ipv4, Family::Ipv6] {
            assert_eq!(name(serde_json::to_value(f).unwrap()), f.name());
        }
        for s in [
            Source::PostBind,
            Source::SyscallExit,
            Source::Fexit,
            Source::State,
            Source::Release,
            Source::Unresolved,
        ] {
            assert_eq!(name(serde_json::to_value(s).unwrap()), s.name());
        }
        for n in [1, 2, 3, 4, 5, 6, 10] {
            let t = SockType::try_from(n).unwrap();
            assert_eq!(name(serde_json::to_value(t).unwrap()), t.name());
        }
        assert_eq!(EventKind::BindFailed.to_string(), "bind_failed");
        assert_eq!(Protocol::UdpLite.to_string(), "udplite");
        assert_eq!(Source::SyscallExit.to_string(), "syscall_exit");
    }

    #[test]
    fn boot_clock_adds_the_offset() {
        let clock = BootClock::from_offset_ns(1_700_000_000_000_000_000);
        assert_eq!(
            clock.to_system_time(5_500_000_001),
            SystemTime::UNIX_EPOCH + Duration::new(1_700_000_005, 500_000_001)
        );
        let before_epoch = BootClock::from_offset_ns(-10);
        assert_eq!(before_epoch.to_system_time(5), SystemTime::UNIX_EPOCH);
        // Nonsense offsets saturate instead of panicking.
        let huge = BootClock::from_offset_ns(i128::MAX - i128::from(u64::MAX));
        assert!(huge.to_system_time(u64::MAX) > SystemTime::UNIX_EPOCH);
    }

    #[test]
    fn boot_clock_now_is_close_to_the_wall_clock() {
        let clock = BootClock::now();
        let boot_now = u64::try_from(clock_ns(libc::CLOCK_BOOTTIME)).unwrap();
        let wall = clock.to_system_time(boot_now);
        let diff = match wall.duration_since(SystemTime::now()) {
            Ok(ahead) => ahead,
            Err(behind) => behind.duration(),
        };
        assert!(diff < Duration::from_secs(1), "off by {diff:?}");
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn records_with_known_values_decode(bytes in valid_record()) {
            let ev = decode(&bytes).unwrap();
            prop_assert_eq!(ev.errno.is_some(), ev.kind.is_failure());
            prop_assert!(ev.backlog.is_none() || ev.kind.is_listen());
            prop_assert!(ev.process.chars().count() <= 16);
            prop_assert!(!ev.process.contains('\0'));
            if ev.family == Family::Ipv4 {
                prop_assert!(ev.address.is_ipv4());
                prop_assert_eq!(ev.options.v6only, None);
            } else {
                prop_assert!(ev.address.is_ipv6());
            }
        }

        #[test]
        fn errno_names_round_trip(n in any::<i32>()) {
            prop_assert_eq!(Errno(n).name().parse::<Errno>(), Ok(Errno(n)));
        }
    }
}
