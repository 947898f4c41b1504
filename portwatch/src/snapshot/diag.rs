//! The socket listing: sock_diag dumps (NETLINK_SOCK_DIAG,
//! SOCK_DIAG_BY_FAMILY with an `inet_diag_req_v2`) on a netlink socket opened
//! inside the namespace being listed, decoded with `netlink-packet-sock-diag`.
//!
//! What is asked for, and why:
//! - TCP: LISTEN, the connected states and TIME_WAIT, plus the pseudo-state
//!   TCP_BOUND_INACTIVE (13, Linux 6.7+), which walks the bind hash for
//!   sockets that are bound but neither listening nor connected; the kernel
//!   reports those with state CLOSE. Asking for TCPF_CLOSE alone finds none
//!   of them: no CLOSE socket sits in the listening or established hash.
//!   Older kernels ignore the bit, and such sockets stay invisible here.
//! - Not SYN_RECV: asking for it also dumps request sockets (half-open
//!   connections), which have no inode, no owner and only share their
//!   listener's port.
//! - UDP: every state; an unconnected socket is CLOSE, a connected one
//!   ESTABLISHED.
//! - No extensions (`idiag_ext` 0): INET_DIAG_SKV6ONLY comes unasked for IPv6
//!   sockets in LISTEN or CLOSE (`inet_diag_msg_attrs_fill`), which covers
//!   every socket whose v6only matters to a bind.
//! - TCP in one dump for both families: the kernel keeps IPv4 and IPv6 TCP
//!   sockets in the same hash tables, and a dump walks all of them (every
//!   namespace's, too) whatever it asks for, skipping what does not match.
//!   So an IPv4 dump and an IPv6 dump walked 100k listeners twice in every
//!   namespace, for about a third of a reconciliation's CPU. The older
//!   request, TCPDIAG_GETSOCK with an `inet_diag_req` (uapi, kept for the
//!   first `ss`), dumps with AF_UNSPEC: one walk, both families, the same
//!   records. A kernel that refuses it gets the two SOCK_DIAG_BY_FAMILY
//!   dumps instead, and is not asked again by that socket.

use std::{
    io,
    net::IpAddr,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
};

use netlink_packet_core::{
    Emitable, NLM_F_DUMP, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR, NetlinkBuffer, NetlinkHeader,
    NetlinkMessage, Parseable,
};
use netlink_packet_sock_diag::{
    SockDiagMessage,
    constants::{
        AF_INET, AF_INET6, IPPROTO_TCP, IPPROTO_UDP, SOCK_DIAG_BY_FAMILY, TCP_CLOSE,
        TCP_CLOSE_WAIT, TCP_CLOSING, TCP_ESTABLISHED, TCP_FIN_WAIT1, TCP_FIN_WAIT2, TCP_LAST_ACK,
        TCP_LISTEN, TCP_SYN_RECV, TCP_SYN_SENT, TCP_TIME_WAIT,
    },
    inet::{ExtensionFlags, InetRequest, InetResponse, SocketId, StateFlags, Timer, nlas::Nla},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_SOCK_DIAG};

use super::SnapshotError;
use crate::socket::{Family, NetnsCookie, Protocol, ShareOptions, SockState, SocketFacts};

/// `IPPROTO_UDPLITE`, which `netlink-packet-sock-diag` has no constant for.
const IPPROTO_UDPLITE: u8 = libc::IPPROTO_UDPLITE as u8;

/// The pseudo-state that asks for bound, inactive TCP sockets
/// (`include/net/tcp_states.h`); `netlink-packet-sock-diag` 0.5 predates it.
const TCP_BOUND_INACTIVE: u8 = 13;

/// The dumps made in every namespace: every protocol whose binds the
/// programs record, so that a reconciliation never removes a live socket
/// it did not ask about. UDP-Lite is served by `udp_diag` too.
const DUMPS: [(Protocol, Family); 6] = [
    (Protocol::Tcp, Family::Ipv4),
    (Protocol::Tcp, Family::Ipv6),
    (Protocol::Udp, Family::Ipv4),
    (Protocol::Udp, Family::Ipv6),
    (Protocol::UdpLite, Family::Ipv4),
    (Protocol::UdpLite, Family::Ipv6),
];

/// The netlink message type of the older TCP dump request
/// (`include/uapi/linux/inet_diag.h`), answered with AF_UNSPEC: both
/// families in one walk (see the module comment).
const TCPDIAG_GETSOCK: u16 = 18;

/// The kernel fills at most about 32 KiB per read of a dump; twice that
/// leaves no room for truncation.
const RECV_BUFFER: usize = 64 * 1024;

/// One socket as sock_diag reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct DiagSocket {
    pub facts: SocketFacts,
    /// 0 for TIME_WAIT entries, which have no inode.
    pub inode: u64,
    /// The remote end (unspecified and 0 for listening and bound sockets).
    pub peer: (IpAddr, u16),
    /// The kernel's TCP state number (`TCP_ESTABLISHED`...; CLOSE or
    /// ESTABLISHED for UDP), which [`SockState`] folds together.
    pub tcp_state: u8,
}

/// A sock_diag socket: it lists the namespace of the thread that opened it,
/// whichever thread uses it later.
pub(crate) struct Diag {
    socket: Socket,
    buffer: Vec<u8>,
    sequence: u32,
    /// Whether TCP is still asked for in one TCPDIAG_GETSOCK dump: until
    /// the kernel refuses it.
    tcp_in_one: bool,
}

impl Diag {
    /// Opens a sock_diag socket in the calling thread's namespace.
    pub fn open() -> Result<Diag, SnapshotError> {
        let socket = Socket::new(NETLINK_SOCK_DIAG).map_err(SnapshotError::NetlinkOpen)?;
        // Only the kernel (port 0) may then send to us.
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(SnapshotError::NetlinkOpen)?;
        Ok(Diag {
            socket,
            buffer: vec![0; RECV_BUFFER],
            sequence: 0,
            tcp_in_one: true,
        })
    }

    /// The cookie of the namespace this socket lists. SO_NETNS_COOKIE is a
    /// SOL_SOCKET option every socket family answers; asking the listing
    /// socket itself ties the cookie to exactly the namespace dumped.
    pub fn netns_cookie(&self) -> Result<NetnsCookie, SnapshotError> {
        // SAFETY: the descriptor is owned by `self.socket`, which outlives
        // the borrow.
        let fd = unsafe { BorrowedFd::borrow_raw(self.socket.as_raw_fd()) };
        super::netns::socket_netns_cookie(fd).map_err(SnapshotError::Cookie)
    }

    /// Appends the TCP, UDP and UDP-Lite sockets of the namespace that
    /// `dump` asks for to `out`.
    pub fn dump_all(
        &mut self,
        netns: NetnsCookie,
        dump: Dump,
        out: &mut Vec<DiagSocket>,
    ) -> Result<(), SnapshotError> {
        // A dump the kernel has no handler for (ENOENT: its module missing)
        // does not stop the others, so the error names every one of them.
        let mut refused = Vec::new();
        let tcp_listed = self.tcp_in_one && self.dump_tcp_in_one(tcp_states(dump), netns, out)?;
        for (protocol, family) in DUMPS {
            if protocol == Protocol::Tcp && tcp_listed {
                continue;
            }
            let tcp = tcp_states(dump);
            match self.dump(protocol, family, tcp, netns, out) {
                Err(SnapshotError::DiagRefused { source, .. })
                    if source.raw_os_error() == Some(libc::ENOENT) =>
                {
                    // A kernel without UDP-Lite (it is being removed
                    // upstream) has no such sockets to list; without
                    // udp_diag, UDP's own refusal names the module.
                    if protocol != Protocol::UdpLite {
                        refused.push((protocol, family));
                    }
                }
                other => other?,
            }
        }
        if refused.is_empty() {
            Ok(())
        } else {
            Err(SnapshotError::NoHandler { refused })
        }
    }

    /// Both families' TCP sockets in one TCPDIAG_GETSOCK dump: whether the
    /// kernel answered it. A refusal is remembered and leaves `out` as it
    /// was.
    fn dump_tcp_in_one(
        &mut self,
        tcp: StateFlags,
        netns: NetnsCookie,
        out: &mut Vec<DiagSocket>,
    ) -> Result<bool, SnapshotError> {
        self.sequence = self.sequence.wrapping_add(1);
        let request = tcp_in_one_request(tcp, self.sequence);
        let before = out.len();
        match self.exchange(&request, Protocol::Tcp, Family::Ipv4, netns, out) {
            Ok(()) => Ok(true),
            Err(SnapshotError::DiagRefused { .. }) => {
                out.truncate(before);
                self.tcp_in_one = false;
                Ok(false)
            }
            Err(other) => Err(other),
        }
    }

    fn dump(
        &mut self,
        protocol: Protocol,
        family: Family,
        tcp: StateFlags,
        netns: NetnsCookie,
        out: &mut Vec<DiagSocket>,
    ) -> Result<(), SnapshotError> {
        self.sequence = self.sequence.wrapping_add(1);
        let request = dump_request(protocol, family, tcp, self.sequence);
        self.exchange(&request, protocol, family, netns, out)
    }

    /// Sends a dump `request` and appends what it answers to `out`, until
    /// the dump is done. `protocol` and `family` name the dump in errors;
    /// the records say their own family.
    fn exchange(
        &mut self,
        request: &[u8],
        protocol: Protocol,
        family: Family,
        netns: NetnsCookie,
        out: &mut Vec<DiagSocket>,
    ) -> Result<(), SnapshotError> {
        self.socket
            .send(request, 0)
            .map_err(SnapshotError::NetlinkSend)?;
        loop {
            // MSG_TRUNC: the kernel returns a datagram's full length, so a
            // truncated one is caught below rather than misread.
            let received = match self.socket.recv(&mut &mut self.buffer[..], libc::MSG_TRUNC) {
                Ok(received) => received,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) => return Err(SnapshotError::NetlinkRecv(error)),
            };
            if received > self.buffer.len() {
                return Err(SnapshotError::NetlinkRecv(io::Error::other(
                    "a sock_diag message did not fit the receive buffer",
                )));
            }
            let mut rest = &self.buffer[..received];
            while !rest.is_empty() {
                // The message is read by its type here, not through
                // `SockDiagMessage`, which does not know TCPDIAG_GETSOCK's
                // answers; their records are the same `inet_diag_msg`.
                let message = NetlinkBuffer::new_checked(rest).map_err(SnapshotError::Decode)?;
                let length = message.length() as usize;
                let (kind, sequence) = (message.message_type(), message.sequence_number());
                let payload = message.payload();
                // Netlink messages start on 4-byte boundaries.
                rest = rest.get(length.next_multiple_of(4)..).unwrap_or_default();
                if sequence != self.sequence {
                    continue;
                }
                match kind {
                    SOCK_DIAG_BY_FAMILY | TCPDIAG_GETSOCK => {
                        let response =
                            InetResponse::parse(payload).map_err(SnapshotError::Decode)?;
                        out.extend(decode(protocol, netns, &response));
                    }
                    // Both start with the error code: 0 for a dump that
                    // ended well (DONE) or an acknowledgement (ERROR).
                    NLMSG_DONE | NLMSG_ERROR => {
                        let code = status_code(payload);
                        if code != 0 {
                            return Err(refused(protocol, family, code));
                        }
                        if kind == NLMSG_DONE {
                            return Ok(());
                        }
                    }
                    _ => {}
                }
            }
        }
    }
}

fn refused(protocol: Protocol, family: Family, code: i32) -> SnapshotError {
    SnapshotError::DiagRefused {
        protocol,
        family,
        source: io::Error::from_raw_os_error(code.saturating_abs()),
    }
}

/// Which TCP sockets a dump asks the kernel for (UDP has no states: it is
/// dumped whole).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Dump {
    /// Every socket but half-open ones (SYN_RECV, not sockets yet).
    All,
    /// Listening and bound-but-inactive sockets: those that hold a port for
    /// receiving.
    Holders,
    /// Connections (established, opening, closing, TIME_WAIT) only: the
    /// ephemeral listing's, which skips the listening hash and the bind hash
    /// walks that 100k listeners cost.
    Connections,
}

/// The TCP states dumped (see the module comment).
fn tcp_states(dump: Dump) -> StateFlags {
    let holders = (1 << TCP_LISTEN) | (1 << TCP_CLOSE) | (1 << TCP_BOUND_INACTIVE);
    let all = StateFlags::all().bits() | (1 << TCP_BOUND_INACTIVE);
    let bits = match dump {
        Dump::All => all & !(1 << TCP_SYN_RECV),
        Dump::Holders => holders,
        Dump::Connections => all & !(1 << TCP_SYN_RECV) & !holders,
    };
    StateFlags::from_bits_retain(bits)
}

/// Whether this kernel's sock_diag lists TCP sockets that are bound but
/// neither listening nor connected (the TCP_BOUND_INACTIVE pseudo-state,
/// Linux 6.7+; older kernels ignore the bit and list none of them). Found by
/// trying, on a thread of its own that moves into a new, empty network
/// namespace (the caller's is never touched; it needs CAP_SYS_ADMIN): a TCP
/// socket bound to 0.0.0.0:0 there, then a TCP dump of that namespace.
pub fn bound_only_tcp_listed() -> Result<bool, SnapshotError> {
    std::thread::Builder::new()
        .name("diag-probe".into())
        .spawn(bound_only_tcp_listed_here)
        .map_err(SnapshotError::Probe)?
        .join()
        .unwrap_or_else(|_| {
            Err(SnapshotError::Probe(io::Error::other(
                "the probe thread panicked",
            )))
        })
}

fn bound_only_tcp_listed_here() -> Result<bool, SnapshotError> {
    let last = || SnapshotError::Probe(io::Error::last_os_error());
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
        .map_err(|err| SnapshotError::Probe(err.into()))?;
    // SAFETY: plain socket(2); the descriptor is owned right away.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(last());
    }
    // SAFETY: a fresh descriptor nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    let (mut addr, mut len) =
        crate::socket::sockaddr(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 0);
    // SAFETY: `addr` holds a sockaddr_in of the length passed.
    if unsafe { libc::bind(sock.as_raw_fd(), (&raw const addr).cast(), len) } != 0 {
        return Err(last());
    }
    // SAFETY: as above; the kernel writes at most `len` bytes.
    if unsafe { libc::getsockname(sock.as_raw_fd(), (&raw mut addr).cast(), &raw mut len) } != 0 {
        return Err(last());
    }
    // SAFETY: getsockname wrote a sockaddr_in (an AF_INET socket).
    let port = u16::from_be(unsafe { (*(&raw const addr).cast::<libc::sockaddr_in>()).sin_port });
    let mut diag = Diag::open()?;
    let mut found = Vec::new();
    // Only this namespace's sockets come back; none needs its cookie, which
    // a kernel before 5.14 cannot tell (SO_NETNS_COOKIE).
    diag.dump(
        Protocol::Tcp,
        Family::Ipv4,
        tcp_states(Dump::Holders),
        0,
        &mut found,
    )?;
    Ok(found.iter().any(|s| s.facts.port == port))
}

/// A serialized dump request for one protocol and family.
fn dump_request(protocol: Protocol, family: Family, tcp: StateFlags, sequence: u32) -> Vec<u8> {
    let (family, socket_id) = match family {
        Family::Ipv4 => (AF_INET, SocketId::new_v4()),
        Family::Ipv6 => (AF_INET6, SocketId::new_v6()),
    };
    let (protocol, states) = match protocol {
        Protocol::Udp => (IPPROTO_UDP, StateFlags::all()),
        Protocol::UdpLite => (IPPROTO_UDPLITE, StateFlags::all()),
        _ => (IPPROTO_TCP, tcp),
    };
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    header.sequence_number = sequence;
    let mut message = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol,
            extensions: ExtensionFlags::empty(),
            states,
            socket_id,
        })
        .into(),
    );
    message.finalize();
    let mut bytes = vec![0; message.buffer_len()];
    message.serialize(&mut bytes);
    bytes
}

/// The request for both families' TCP sockets in one dump: a netlink header
/// and `struct inet_diag_req` (family, source and destination prefix
/// lengths, extensions, `inet_diag_sockid`, states, `idiag_dbs`). The
/// kernel answers it with AF_UNSPEC whatever the family says.
fn tcp_in_one_request(tcp: StateFlags, sequence: u32) -> Vec<u8> {
    const INET_DIAG_REQ: usize = 4 + 48 + 4 + 4;
    let mut header = NetlinkHeader::default();
    let header_len = header.buffer_len();
    header.length = (header_len + INET_DIAG_REQ) as u32;
    header.message_type = TCPDIAG_GETSOCK;
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    header.sequence_number = sequence;
    let mut bytes = vec![0; header_len];
    header.emit(&mut bytes);
    bytes.reserve(INET_DIAG_REQ);
    bytes.extend([AF_INET, 0, 0, 0]); // no prefixes, no extensions
    bytes.extend([0; 48]); // inet_diag_sockid: every socket
    bytes.extend(tcp.bits().to_ne_bytes());
    bytes.extend(0u32.to_ne_bytes()); // idiag_dbs, unused
    bytes
}

/// The error code at the start of a DONE or ERROR message's payload
/// (negative errno, 0 for none); a payload too short to hold one is read
/// as EBADMSG rather than as success.
fn status_code(payload: &[u8]) -> i32 {
    payload
        .get(..4)
        .and_then(|code| code.try_into().ok())
        .map_or(-libc::EBADMSG, i32::from_ne_bytes)
}

/// Where a socket in sock_diag state `state` stands. UDP has no states of
/// its own: it is connected when it has a remote port. `None` for a state
/// this version does not know.
pub(crate) fn sock_state(protocol: Protocol, state: u8, remote_port: u16) -> Option<SockState> {
    if matches!(protocol, Protocol::Udp | Protocol::UdpLite) {
        return Some(if remote_port == 0 {
            SockState::Bound
        } else {
            SockState::Connected
        });
    }
    Some(match state {
        TCP_LISTEN => SockState::Listening,
        TCP_CLOSE => SockState::Bound,
        TCP_TIME_WAIT => SockState::TimeWait,
        TCP_ESTABLISHED | TCP_SYN_SENT | TCP_SYN_RECV | TCP_FIN_WAIT1 | TCP_FIN_WAIT2
        | TCP_CLOSE_WAIT | TCP_LAST_ACK | TCP_CLOSING => SockState::Connected,
        _ => return None,
    })
}

/// The socket cookie from `idiag_cookie`: two native-endian u32 halves, low
/// half first (`sock_diag_save_cookie`).
pub(crate) fn cookie(raw: [u8; 8]) -> u64 {
    let low = u32::from_ne_bytes([raw[0], raw[1], raw[2], raw[3]]);
    let high = u32::from_ne_bytes([raw[4], raw[5], raw[6], raw[7]]);
    (u64::from(high) << 32) | u64::from(low)
}

/// One response record as [`DiagSocket`]; `None` for an unknown family or
/// state.
pub(crate) fn decode(
    protocol: Protocol,
    netns: NetnsCookie,
    response: &InetResponse,
) -> Option<DiagSocket> {
    let header = &response.header;
    let id = &header.socket_id;
    let family = match header.family {
        AF_INET => Family::Ipv4,
        AF_INET6 => Family::Ipv6,
        _ => return None,
    };
    // A TIME_WAIT mini-socket reports its substate (FIN_WAIT2 for an
    // orphan that timed out in it) with the TIME_WAIT timer.
    let time_wait = header.timer == Some(Timer::TimeWait);
    let state = if time_wait {
        SockState::TimeWait
    } else {
        sock_state(protocol, header.state, id.destination_port)?
    };
    let v6only = match family {
        Family::Ipv6 => response.nlas.iter().find_map(|nla| match nla {
            Nla::SkV6Only(v6only) => Some(*v6only),
            _ => None,
        }),
        Family::Ipv4 => None,
    };
    // The kernel sends uid 0 and inode 0 for TIME_WAIT entries: unknown, not
    // root. Their cookie is left 0, as the shared vocabulary says.
    let (cookie, uid) = match state {
        SockState::TimeWait => (0, None),
        _ => (cookie(id.cookie), Some(header.uid)),
    };
    Some(DiagSocket {
        facts: SocketFacts {
            cookie,
            netns,
            protocol,
            family,
            address: id.source_address,
            port: id.source_port,
            state,
            options: ShareOptions {
                reuse_addr: None,
                reuse_port: None,
                v6only,
            },
            uid,
            bound_dev_if: id.interface_id,
        },
        inode: u64::from(header.inode),
        peer: (id.destination_address, id.destination_port),
        tcp_state: if time_wait {
            TCP_TIME_WAIT
        } else {
            header.state
        },
    })
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    use netlink_packet_core::{NlaBuffer, Parseable};
    use netlink_packet_sock_diag::inet::InetResponseHeader;

    use super::*;

    #[test]
    fn tcp_states_map_to_sock_states() {
        let table = [
            (TCP_LISTEN, Some(SockState::Listening)),
            (TCP_CLOSE, Some(SockState::Bound)),
            (TCP_TIME_WAIT, Some(SockState::TimeWait)),
            (TCP_ESTABLISHED, Some(SockState::Connected)),
            (TCP_SYN_SENT, Some(SockState::Connected)),
            (TCP_SYN_RECV, Some(SockState::Connected)),
            (TCP_FIN_WAIT1, Some(SockState::Connected)),
            (TCP_FIN_WAIT2, Some(SockState::Connected)),
            (TCP_CLOSE_WAIT, Some(SockState::Connected)),
            (TCP_LAST_ACK, Some(SockState::Connected)),
            (TCP_CLOSING, Some(SockState::Connected)),
            (0, None),
            (12, None),
            (TCP_BOUND_INACTIVE, None),
        ];
        for (state, expected) in table {
            assert_eq!(
                sock_state(Protocol::Tcp, state, 0),
                expected,
                "state {state}"
            );
        }
    }

    #[test]
    fn udp_is_bound_until_it_has_a_peer() {
        assert_eq!(
            sock_state(Protocol::Udp, TCP_CLOSE, 0),
            Some(SockState::Bound)
        );
        assert_eq!(
            sock_state(Protocol::Udp, TCP_ESTABLISHED, 53),
            Some(SockState::Connected)
        );
    }

    #[test]
    fn tcp_dump_asks_for_bound_inactive_and_not_request_sockets() {
        let states = tcp_states(Dump::All).bits();
        assert_ne!(states & 1 << TCP_BOUND_INACTIVE, 0);
        assert_ne!(states & 1 << TCP_LISTEN, 0);
        assert_ne!(states & 1 << TCP_CLOSE, 0);
        assert_ne!(states & 1 << TCP_TIME_WAIT, 0);
        assert_eq!(states & 1 << TCP_SYN_RECV, 0);
        let holders = tcp_states(Dump::Holders).bits();
        assert_eq!(
            holders,
            1 << TCP_LISTEN | 1 << TCP_CLOSE | 1 << TCP_BOUND_INACTIVE
        );
        let connections = tcp_states(Dump::Connections).bits();
        assert_eq!(connections & holders, 0, "no listener, no bound socket");
        assert_eq!(connections & 1 << TCP_SYN_RECV, 0);
        assert_eq!(
            connections | holders | 1 << TCP_SYN_RECV,
            states | 1 << TCP_SYN_RECV
        );
    }

    #[test]
    fn dump_request_is_an_inet_diag_req_v2() {
        let bytes = dump_request(Protocol::Tcp, Family::Ipv6, tcp_states(Dump::All), 9);
        // nlmsghdr (16) + inet_diag_req_v2 (56).
        assert_eq!(bytes.len(), 72);
        assert_eq!(u32::from_ne_bytes(bytes[0..4].try_into().unwrap()), 72);
        assert_eq!(u16::from_ne_bytes(bytes[4..6].try_into().unwrap()), 20); // SOCK_DIAG_BY_FAMILY
        assert_eq!(
            u16::from_ne_bytes(bytes[6..8].try_into().unwrap()),
            NLM_F_REQUEST | NLM_F_DUMP
        );
        assert_eq!(u32::from_ne_bytes(bytes[8..12].try_into().unwrap()), 9);
        assert_eq!(bytes[16], AF_INET6);
        assert_eq!(bytes[17], IPPROTO_TCP);
        assert_eq!(bytes[18], 0, "no extensions");
        let udplite = dump_request(Protocol::UdpLite, Family::Ipv4, tcp_states(Dump::All), 9);
        assert_eq!(
            (udplite[16], udplite[17]),
            (AF_INET, 136),
            "IPPROTO_UDPLITE"
        );
        assert_eq!(
            u32::from_ne_bytes(bytes[20..24].try_into().unwrap()),
            tcp_states(Dump::All).bits()
        );
    }

    #[test]
    fn the_one_tcp_dump_request_is_an_inet_diag_req() {
        let bytes = tcp_in_one_request(tcp_states(Dump::Holders), 5);
        // nlmsghdr (16) + inet_diag_req (60).
        assert_eq!(bytes.len(), 76);
        assert_eq!(u32::from_ne_bytes(bytes[0..4].try_into().unwrap()), 76);
        assert_eq!(
            u16::from_ne_bytes(bytes[4..6].try_into().unwrap()),
            TCPDIAG_GETSOCK
        );
        assert_eq!(
            u16::from_ne_bytes(bytes[6..8].try_into().unwrap()),
            NLM_F_REQUEST | NLM_F_DUMP
        );
        assert_eq!(u32::from_ne_bytes(bytes[8..12].try_into().unwrap()), 5);
        assert_eq!(bytes[16..20], [AF_INET, 0, 0, 0]);
        assert!(bytes[20..68].iter().all(|&b| b == 0), "every socket");
        assert_eq!(
            u32::from_ne_bytes(bytes[68..72].try_into().unwrap()),
            tcp_states(Dump::Holders).bits()
        );
    }

    #[test]
    fn a_status_is_its_leading_code_and_a_short_one_is_an_error() {
        assert_eq!(status_code(&0i32.to_ne_bytes()), 0);
        let mut enoent = (-libc::ENOENT).to_ne_bytes().to_vec();
        enoent.extend([0; 16]); // the request's header follows in an ERROR
        assert_eq!(status_code(&enoent), -libc::ENOENT);
        assert_eq!(status_code(&[0, 0]), -libc::EBADMSG);
    }

    #[test]
    #[ignore = "needs CAP_SYS_ADMIN (a network namespace of its own); run by `cargo xtask test`"]
    fn one_tcp_dump_lists_what_the_two_family_dumps_list() {
        std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("a new netns");
            let v4 = std::net::TcpListener::bind("0.0.0.0:0").expect("v4 listener");
            let v6 = std::net::TcpListener::bind("[::]:0").expect("v6 listener");
            let ports = [&v4, &v6].map(|l| l.local_addr().expect("bound").port());
            let mut diag = Diag::open().expect("sock_diag");
            let states = || tcp_states(Dump::All);
            let mut one = Vec::new();
            assert!(
                diag.dump_tcp_in_one(states(), 0, &mut one).expect("dump"),
                "the kernel answered TCPDIAG_GETSOCK"
            );
            let mut two = Vec::new();
            for family in [Family::Ipv4, Family::Ipv6] {
                diag.dump(Protocol::Tcp, family, states(), 0, &mut two)
                    .expect("dump");
            }
            let key = |s: &DiagSocket| s.facts.cookie;
            one.sort_by_key(key);
            two.sort_by_key(key);
            assert_eq!(one, two);
            let found: Vec<(Family, u16)> =
                one.iter().map(|s| (s.facts.family, s.facts.port)).collect();
            assert!(found.contains(&(Family::Ipv4, ports[0])), "{found:?}");
            assert!(found.contains(&(Family::Ipv6, ports[1])), "{found:?}");
        })
        .join()
        .expect("the test thread");
    }

    #[test]
    fn cookie_joins_the_two_halves() {
        let value: u64 = 0x0123_4567_89ab_cdef;
        let mut raw = [0u8; 8];
        raw[..4].copy_from_slice(&(value as u32).to_ne_bytes());
        raw[4..].copy_from_slice(&((value >> 32) as u32).to_ne_bytes());
        assert_eq!(cookie(raw), value);
    }

    fn response(family: u8, state: u8, timer: Option<Timer>, nlas: Vec<Nla>) -> InetResponse {
        let v6 = family == AF_INET6;
        let mut cookie = [0u8; 8];
        cookie[..4].copy_from_slice(&42u32.to_ne_bytes());
        InetResponse {
            header: InetResponseHeader {
                family,
                state,
                timer,
                socket_id: SocketId {
                    source_port: 8000,
                    destination_port: 0,
                    source_address: if v6 {
                        IpAddr::V6(Ipv6Addr::UNSPECIFIED)
                    } else {
                        IpAddr::V4(Ipv4Addr::LOCALHOST)
                    },
                    destination_address: if v6 {
                        IpAddr::V6(Ipv6Addr::UNSPECIFIED)
                    } else {
                        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
                    },
                    interface_id: 3,
                    cookie,
                },
                recv_queue: 0,
                send_queue: 0,
                uid: 1000,
                inode: 5555,
            },
            nlas: nlas.into_iter().collect(),
        }
    }

    #[test]
    fn decodes_a_v6only_listener() {
        let socket = decode(
            Protocol::Tcp,
            77,
            &response(AF_INET6, TCP_LISTEN, None, vec![Nla::SkV6Only(true)]),
        )
        .expect("decoded");
        assert_eq!(socket.inode, 5555);
        let facts = socket.facts;
        assert_eq!(facts.cookie, 42);
        assert_eq!(facts.netns, 77);
        assert_eq!(facts.family, Family::Ipv6);
        assert_eq!(facts.address, IpAddr::V6(Ipv6Addr::UNSPECIFIED));
        assert_eq!(facts.port, 8000);
        assert_eq!(facts.state, SockState::Listening);
        assert_eq!(facts.uid, Some(1000));
        assert_eq!(facts.bound_dev_if, 3);
        assert_eq!(
            facts.options,
            ShareOptions {
                reuse_addr: None,
                reuse_port: None,
                v6only: Some(true)
            }
        );
    }

    #[test]
    fn v6only_is_unknown_when_not_reported_and_for_ipv4() {
        let v6 = decode(
            Protocol::Tcp,
            1,
            &response(AF_INET6, TCP_ESTABLISHED, None, vec![]),
        )
        .expect("decoded");
        assert_eq!(v6.facts.options.v6only, None);
        let v4 = decode(
            Protocol::Udp,
            1,
            &response(AF_INET, TCP_CLOSE, None, vec![Nla::SkV6Only(false)]),
        )
        .expect("decoded");
        assert_eq!(v4.facts.options.v6only, None);
        assert_eq!(v4.facts.state, SockState::Bound);
    }

    #[test]
    fn time_wait_entries_have_no_cookie_and_no_uid() {
        for state in [TCP_TIME_WAIT, TCP_FIN_WAIT2] {
            let socket = decode(
                Protocol::Tcp,
                1,
                &response(AF_INET, state, Some(Timer::TimeWait), vec![]),
            )
            .expect("decoded");
            assert_eq!(socket.facts.state, SockState::TimeWait, "state {state}");
            assert_eq!(socket.facts.cookie, 0);
            assert_eq!(socket.facts.uid, None);
        }
    }

    #[test]
    fn unknown_family_and_state_are_dropped() {
        assert_eq!(
            decode(Protocol::Tcp, 1, &response(1, TCP_LISTEN, None, vec![])),
            None
        );
        assert_eq!(
            decode(Protocol::Tcp, 1, &response(AF_INET, 99, None, vec![])),
            None
        );
    }

    #[test]
    fn unknown_attributes_are_kept_aside() {
        // INET_DIAG_CGROUP_ID (21), which this crate version does not name.
        let bytes = [12u8, 0, 21, 0, 1, 0, 0, 0, 0, 0, 0, 0];
        let nla = Nla::parse(&NlaBuffer::new_checked(&bytes[..]).expect("nla")).expect("parsed");
        assert!(matches!(nla, Nla::Other(_)));
        let socket = decode(
            Protocol::Tcp,
            1,
            &response(AF_INET6, TCP_CLOSE, None, vec![nla, Nla::SkV6Only(false)]),
        )
        .expect("decoded");
        assert_eq!(socket.facts.options.v6only, Some(false));
    }
}
