//! The vocabulary shared by the per-port map, the conflict rules and the
//! snapshot: what portwatch knows about one socket that holds (or asks for) a
//! local port. Pure data, no I/O.

use std::net::IpAddr;

use serde::Serialize;

use crate::event::Options;
pub use crate::event::{Family, Protocol};

/// A network namespace, named by its cookie (`SO_NETNS_COOKIE`, the same
/// value the kernel programs read with `bpf_get_netns_cookie`).
pub type NetnsCookie = u64;

/// Where a socket stands, as far as port conflicts are concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SockState {
    /// TCP in LISTEN.
    Listening,
    /// Bound and not connected: a UDP socket that receives on its port, or a
    /// TCP socket bound but not (yet) listening.
    Bound,
    /// Connected (TCP ESTABLISHED and the other connection states, or a
    /// connected UDP socket). Still holds its local port.
    Connected,
    /// TCP TIME_WAIT: no socket any more, but the port is still held.
    TimeWait,
}

impl SockState {
    /// Listening or bound and not connected: the states in which a socket
    /// holds its port for receiving, which are the ones the map keeps and
    /// whose sharing options matter. Connections and TIME_WAIT also hold the
    /// port, but only against binds.
    pub fn is_listening_or_bound(self) -> bool {
        matches!(self, SockState::Listening | SockState::Bound)
    }
}

/// Socket options that decide whether sockets may share a port. `None` is
/// "unknown" (never guessed).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize)]
pub struct ShareOptions {
    pub reuse_addr: Option<bool>,
    pub reuse_port: Option<bool>,
    /// Only meaningful for IPv6 sockets.
    pub v6only: Option<bool>,
}

/// The sharing options among the options an event read.
impl From<Options> for ShareOptions {
    fn from(options: Options) -> ShareOptions {
        ShareOptions {
            reuse_addr: options.reuse_addr,
            reuse_port: options.reuse_port,
            v6only: options.v6only,
        }
    }
}

/// Event options with only the sharing ones known.
impl From<ShareOptions> for Options {
    fn from(options: ShareOptions) -> Options {
        Options {
            reuse_addr: options.reuse_addr,
            reuse_port: options.reuse_port,
            v6only: options.v6only,
            ..Options::default()
        }
    }
}

/// One socket holding a local port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SocketFacts {
    /// Socket cookie: the socket's identity. 0 for TIME_WAIT entries.
    pub cookie: u64,
    pub netns: NetnsCookie,
    pub protocol: Protocol,
    pub family: Family,
    /// Local address (an IPv4-mapped IPv6 address stays as the kernel has it).
    pub address: IpAddr,
    pub port: u16,
    pub state: SockState,
    pub options: ShareOptions,
    /// Owner uid of the socket (what SO_REUSEPORT compares); `None` unknown.
    pub uid: Option<u32>,
    /// Device the socket is bound to (SO_BINDTODEVICE), 0 for none.
    pub bound_dev_if: u32,
}

/// A bind someone wants to make (or made and failed).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BindRequest {
    pub netns: NetnsCookie,
    pub protocol: Protocol,
    pub family: Family,
    pub address: IpAddr,
    pub port: u16,
    pub options: ShareOptions,
    pub uid: u32,
}

/// `address`:`port` as the C socket calls take it: a `sockaddr_in` for an
/// IPv4 address, a `sockaddr_in6` for an IPv6 one (whatever the socket's
/// family: that is how an IPv6 address meets an IPv4 socket), in a
/// `sockaddr_storage`, and its length. Pure encoding; no call is made.
pub fn sockaddr(address: IpAddr, port: u16) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match address {
        IpAddr::V4(v4) => {
            // SAFETY: sockaddr_storage is large and aligned enough.
            let sin = unsafe { &mut *(&raw mut storage).cast::<libc::sockaddr_in>() };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = port.to_be();
            sin.sin_addr.s_addr = u32::from_ne_bytes(v4.octets());
            size_of::<libc::sockaddr_in>()
        }
        IpAddr::V6(v6) => {
            // SAFETY: as above.
            let sin6 = unsafe { &mut *(&raw mut storage).cast::<libc::sockaddr_in6>() };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = port.to_be();
            sin6.sin6_addr.s6_addr = v6.octets();
            size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}
