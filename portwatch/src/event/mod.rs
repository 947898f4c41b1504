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

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use portwatch_ebpf::{Event as RawEvent, opt};
use serde::Serialize;

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

mod clock;
mod errno;
mod kinds;

pub use clock::{BootClock, boot_ns_now};
pub use errno::{Errno, ParseErrnoError};
pub use kinds::{EventKind, Family, PortAlloc, Protocol, SockType, Source};

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

#[cfg(test)]
pub(crate) mod tests;
