//! The integer-coded fields of a record as types: what happened
//! ([`EventKind`]), to which kind of socket ([`Protocol`], [`Family`],
//! [`SockType`]), seen by which hook ([`Source`]), and TCP's port
//! allocation verdict ([`PortAlloc`]). Each converts from its wire integer
//! with `TryFrom`, refusing a value it does not know.

use std::{fmt, net::IpAddr};

use portwatch_ebpf::{AF_INET, AF_INET6, kind, port_alloc, source};
use serde::Serialize;

use super::DecodeError;

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
    pub(super) fn from_raw(kind: u8, errno: i32) -> Result<Self, DecodeError> {
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
    /// the conflict rules ([`PortEvent::errno_source`](super::PortEvent::errno_source)).
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
/// listen, seen by fexit on it. Absent (`None` on [`PortEvent`](super::PortEvent)) when that
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
    /// Decodes [`Event::port_alloc`](portwatch_ebpf::Event::port_alloc); `None` for "not seen".
    pub(super) fn from_raw(raw: u8) -> Result<Option<Self>, DecodeError> {
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
