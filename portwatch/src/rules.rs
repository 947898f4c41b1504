//! The kernel's rules for sharing a local port, as pure logic: would this bind
//! (or listen) succeed given the sockets that already hold the port, and if
//! not, which of them block it and why; and for two sockets that both hold a
//! port, which rule lets them. No I/O: unit-tested without root, and checked
//! against the real kernel by `tests/predictor.rs`.
//!
//! # The rules (Linux 6.18, TCP and UDP, IPv4 and IPv6)
//!
//! Two sockets can only collide in the same network namespace, the same port
//! space and on the same port number. TCP and MPTCP share one port space (an
//! MPTCP socket binds through a TCP subflow); UDP, UDP-Lite and SCTP each have
//! their own. There they collide when all of these hold:
//!
//! - **Devices**: unless both are bound (`SO_BINDTODEVICE`) to different
//!   devices (`inet_bind_conflict`, `udp_lib_lport_inuse`).
//! - **Addresses overlap** (`inet_rcv_saddr_equal` with
//!   `ipv4_rcv_saddr_equal` / `ipv6_rcv_saddr_equal`; for TCP the same answer
//!   comes out of the bhash2 split in `inet_csk_bind_conflict`,
//!   `inet_bhash2_addr_any_conflict`, `__inet_bhash2_conflict` and
//!   `inet_use_hash2_on_bind`): the same address; a wildcard and any address of
//!   its family; `[::]` without `IPV6_V6ONLY` and any IPv4 address. An
//!   IPv4-mapped address `::ffff:a.b.c.d` is the IPv4 address `a.b.c.d` (and
//!   `::ffff:0.0.0.0` the IPv4 wildcard). `[::]` with `IPV6_V6ONLY` covers no
//!   IPv4 address, and a specific IPv6 address never overlaps IPv4
//!   (`__inet6_bind` turns `IPV6_V6ONLY` on for such sockets itself).
//! - **No sharing option lets them through**:
//!   - TCP (`inet_bind_conflict` as `inet_csk_get_port` calls it for an
//!     explicit port, `relax` and `reuseport_ok` set): not when both set
//!     `SO_REUSEADDR` and the existing socket is not listening; not when both
//!     set `SO_REUSEPORT` and the existing one is in TIME_WAIT or has the same
//!     owner uid.
//!   - UDP (`udp_lib_get_port`, `udp_lib_lport_inuse`): not when both set
//!     `SO_REUSEADDR`; not when both set `SO_REUSEPORT` with the same owner.
//!     The kernel walks the port's list of sockets and stops at the first
//!     overlapping one that both-`SO_REUSEADDR` does not skip: a
//!     `SO_REUSEPORT` match there lets the bind through even when a socket
//!     further down would refuse it. The list has the newest socket first,
//!     except that IPv6 sockets with `SO_REUSEPORT` are appended at its end
//!     (`sk_add_node_rcu`). **So `existing` must be in bind order, oldest
//!     first.**
//! - **listen** (`inet_csk_listen_start` runs `inet_csk_get_port` again with
//!   the socket already in LISTEN): the TCP rules again, the listening socket
//!   being the requester. Two `SO_REUSEADDR` sockets on one address both bind,
//!   the first `listen` succeeds and the second fails with EADDRINUSE.
//! - **TCP's `SO_REUSEPORT` shortcut** (`sk_reuseport_match`, updated by
//!   `inet_csk_update_fastreuse` after every successful bind and listen): the
//!   port's bind bucket remembers the owner and address of the last
//!   `SO_REUSEPORT` socket that did not match what it remembered. A later
//!   `SO_REUSEPORT` socket of that owner whose address the remembered one
//!   covers skips the conflict check entirely, even against sockets without
//!   `SO_REUSEPORT`, and even after the remembered socket closed. Only a
//!   [`PortHistory`] (fed every successful TCP bind and listen on the port)
//!   can replay that; without one, TCP refusals of `SO_REUSEPORT` requests
//!   are not [`confident`](Prediction::confident). (The `SO_REUSEADDR`
//!   shortcut, `tb->fastreuse`, never lets through more than the rules above.)
//!
//! Some requests fail whatever holds the port, and those are predicted too:
//! an `IPV6_V6ONLY` socket binding an IPv4-mapped address (EINVAL,
//! `__inet6_bind`), an IPv4 socket given an IPv6 address (EAFNOSUPPORT) or an
//! IPv6 socket given an IPv4 one (EINVAL, the address is too short), `listen`
//! on a datagram socket (EOPNOTSUPP) or on a connected one (EINVAL).
//!
//! # What the predictor cannot know
//!
//! - Anything about addresses and permissions: whether the address is
//!   configured (EADDRNOTAVAIL), privileged ports (EACCES), cgroup programs
//!   (EPERM). It answers the port-sharing question only.
//! - Unknown options and owners (`None`): predicted as the kernel defaults
//!   (option not set, `net.ipv6.bindv6only=0`) and an unknown owner as a
//!   different one; the prediction is marked not confident when setting them
//!   (and owners being equal) would change the answer.
//! - Port 0: the kernel picks a free port. Predicted Ok, not confident.
//! - SCTP has rules of its own: judged by the TCP rules, not confident.
//! - UDP binds of a specific address when the kernel's hash slot for the port
//!   (which it shares with other ports and namespaces) holds more than 10
//!   sockets: the kernel then looks only at that address's and the wildcard's
//!   sockets (`udp_lib_lport_inuse2`), which can change which socket the walk
//!   meets first. With 10 or more sockets on the port, not confident; a slot
//!   crowded by other ports is invisible here.
//! - A [`BindRequest`] names no device: a socket that set `SO_BINDTODEVICE`
//!   before its bind is judged as bound to none (more conflicts than real).
//! - VRFs: sockets bound to devices under different L3 master devices live in
//!   different TCP buckets (`inet_sk_bound_l3mdev`); portwatch does not know
//!   which devices are VRF members, so these are judged by the device rule.
//! - Options changed after bind, `SO_REUSEADDR`'s force mode of kernel
//!   sockets, and a listener that was shut down and listens again.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::Serialize;

use crate::{
    event::Errno,
    socket::{BindRequest, Family, Protocol, SockState, SocketFacts},
};

/// Whether a bind (or listen) would succeed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum Verdict {
    /// The kernel would let it through.
    Ok,
    /// The kernel would fail it with `errno`.
    Refused {
        errno: Errno,
        /// The sockets holding the address, in `existing` order. TCP names
        /// every one; UDP only the one its walk stops at (the kernel's
        /// answer does not depend on the others). Empty for an invalid request.
        blockers: Vec<Blocker>,
        /// Set when the request fails by itself, whatever holds the port.
        invalid: Option<InvalidRequest>,
    },
}

impl Verdict {
    /// Whether the kernel would let it through.
    pub fn is_ok(&self) -> bool {
        matches!(self, Verdict::Ok)
    }

    /// The predicted error, `None` for [`Verdict::Ok`].
    pub fn errno(&self) -> Option<Errno> {
        match self {
            Verdict::Ok => None,
            Verdict::Refused { errno, .. } => Some(*errno),
        }
    }

    /// The blocking sockets (empty unless refused for a conflict).
    pub fn blockers(&self) -> &[Blocker] {
        match self {
            Verdict::Ok => &[],
            Verdict::Refused { blockers, .. } => blockers,
        }
    }

    fn conflict(blockers: Vec<Blocker>) -> Verdict {
        if blockers.is_empty() {
            Verdict::Ok
        } else {
            Verdict::Refused {
                errno: Errno::EADDRINUSE,
                blockers,
                invalid: None,
            }
        }
    }

    fn invalid(why: InvalidRequest) -> Verdict {
        Verdict::Refused {
            errno: why.errno(),
            blockers: Vec::new(),
            invalid: Some(why),
        }
    }

    /// The same answer, blockers aside (they can differ in number when
    /// unknown options are filled in differently).
    fn same_answer(&self, other: &Verdict) -> bool {
        self.errno() == other.errno()
    }
}

/// A [`Verdict`] and whether the inputs were enough to be sure of it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Prediction {
    pub verdict: Verdict,
    /// False when something the inputs do not show could change the answer:
    /// an unknown option or owner, TCP's `SO_REUSEPORT` shortcut without a
    /// [`PortHistory`], port 0, SCTP, a crowded UDP port (see the module
    /// documentation).
    pub confident: bool,
}

/// A socket that blocks a bind, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Blocker {
    /// The socket holding the address.
    pub socket: SocketFacts,
    /// How its address overlaps the request's.
    pub overlap: Overlap,
    /// Why the kernel does not let them share.
    pub why: ConflictReason,
}

impl Blocker {
    /// The blocking socket's cookie (0 for TIME_WAIT).
    pub fn cookie(&self) -> u64 {
        self.socket.cookie
    }
}

/// How a blocking socket's address overlaps the request's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Overlap {
    /// The same address (`a.b.c.d` and `::ffff:a.b.c.d` are the same).
    SameAddress,
    /// The existing socket holds the wildcard of the request's family.
    ExistingWildcard,
    /// The request is the wildcard of the existing socket's family.
    RequestWildcard,
    /// The existing socket holds `[::]` without `IPV6_V6ONLY`, which covers
    /// the request's IPv4 address.
    ExistingDualStack,
    /// The request is `[::]` without `IPV6_V6ONLY`, which needs the IPv4
    /// address the existing socket holds.
    RequestDualStack,
}

/// Why two overlapping sockets may not share the port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ConflictReason {
    /// Same address, no sharing option on either side.
    SameAddress,
    /// A wildcard and an address of its family, no sharing option.
    WildcardCoversAddress,
    /// The existing `[::]` without `IPV6_V6ONLY` holds the IPv4 side too.
    DualStackWildcardCoversIpv4,
    /// The requested `[::]` without `IPV6_V6ONLY` needs an IPv4 address that
    /// an existing socket holds.
    Ipv4BlocksDualStackWildcard,
    /// Both set `SO_REUSEADDR`, but the existing TCP socket is listening.
    ReuseAddrButListening,
    /// Both set `SO_REUSEPORT`, but they have different owners.
    ReusePortUidMismatch,
    /// Only one of the two set `SO_REUSEPORT` (and `SO_REUSEADDR` does not
    /// help).
    ReusePortNotSetOnBoth,
    /// Only one of the two set `SO_REUSEADDR`.
    ReuseAddrNotSetOnBoth,
    /// A TIME_WAIT connection holds the address, and `SO_REUSEADDR` is not
    /// set on both the new socket and the one that made the connection.
    TimeWaitNeedsReuseAddr,
}

impl ConflictReason {
    /// One plain sentence.
    pub fn explanation(self) -> &'static str {
        match self {
            Self::SameAddress => {
                "both sockets want the same address and port, and neither SO_REUSEADDR nor SO_REUSEPORT is set on both"
            }
            Self::WildcardCoversAddress => {
                "one of the two is bound to the wildcard address, which covers every address of its family on this port"
            }
            Self::DualStackWildcardCoversIpv4 => {
                "the existing socket is bound to [::] without IPV6_V6ONLY, so it also holds every IPv4 address on this port"
            }
            Self::Ipv4BlocksDualStackWildcard => {
                "binding [::] without IPV6_V6ONLY also takes the IPv4 side of the port, and an IPv4 socket already holds it"
            }
            Self::ReuseAddrButListening => {
                "both sockets set SO_REUSEADDR, but TCP shares an address only with sockets that are not listening"
            }
            Self::ReusePortUidMismatch => {
                "both sockets set SO_REUSEPORT, but they belong to different users and the kernel only groups sockets of one owner"
            }
            Self::ReusePortNotSetOnBoth => {
                "SO_REUSEPORT is set on only one of the two sockets, and it has to be set on every socket sharing the port"
            }
            Self::ReuseAddrNotSetOnBoth => {
                "SO_REUSEADDR is set on only one of the two sockets, and it has to be set on both"
            }
            Self::TimeWaitNeedsReuseAddr => {
                "a closed connection in TIME_WAIT still holds the address, which only SO_REUSEADDR on both sockets (or SO_REUSEPORT on both) gets past"
            }
        }
    }
}

impl From<Overlap> for ConflictReason {
    fn from(overlap: Overlap) -> ConflictReason {
        match overlap {
            Overlap::SameAddress => Self::SameAddress,
            Overlap::ExistingWildcard | Overlap::RequestWildcard => Self::WildcardCoversAddress,
            Overlap::ExistingDualStack => Self::DualStackWildcardCoversIpv4,
            Overlap::RequestDualStack => Self::Ipv4BlocksDualStackWildcard,
        }
    }
}

/// Why two sockets that both hold a port may do so.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CoexistReason {
    /// Different network namespaces have separate port tables.
    DifferentNetns,
    /// Different port spaces (TCP, UDP, UDP-Lite, SCTP).
    DifferentProtocol,
    /// Not the same port at all.
    DifferentPort,
    /// Different specific addresses of one family.
    DifferentAddress,
    /// IPv4 and `[::]` with `IPV6_V6ONLY`.
    V6onlySplit,
    /// An IPv4 address and a specific IPv6 address.
    DifferentFamilyNoOverlap,
    /// Both `SO_REUSEPORT` with the same owner (or one in TIME_WAIT).
    ReusePortGroup,
    /// Both UDP with `SO_REUSEADDR`.
    UdpReuseAddr,
    /// Both TCP with `SO_REUSEADDR`, not both listening.
    TcpReuseAddrNotListening,
    /// Bound to different devices.
    BoundToDifferentDevices,
}

impl CoexistReason {
    /// Every reason.
    pub const ALL: [CoexistReason; 10] = [
        Self::DifferentNetns,
        Self::DifferentProtocol,
        Self::DifferentPort,
        Self::DifferentAddress,
        Self::V6onlySplit,
        Self::DifferentFamilyNoOverlap,
        Self::ReusePortGroup,
        Self::UdpReuseAddr,
        Self::TcpReuseAddrNotListening,
        Self::BoundToDifferentDevices,
    ];

    /// The name the HTTP API (serde) and the metrics' `kind` label use.
    pub fn name(self) -> &'static str {
        match self {
            Self::DifferentNetns => "different_netns",
            Self::DifferentProtocol => "different_protocol",
            Self::DifferentPort => "different_port",
            Self::DifferentAddress => "different_address",
            Self::V6onlySplit => "v6only_split",
            Self::DifferentFamilyNoOverlap => "different_family_no_overlap",
            Self::ReusePortGroup => "reuse_port_group",
            Self::UdpReuseAddr => "udp_reuse_addr",
            Self::TcpReuseAddrNotListening => "tcp_reuse_addr_not_listening",
            Self::BoundToDifferentDevices => "bound_to_different_devices",
        }
    }

    /// One plain sentence.
    pub fn explanation(self) -> &'static str {
        match self {
            Self::DifferentNetns => {
                "they live in different network namespaces, which have separate port tables"
            }
            Self::DifferentProtocol => {
                "TCP, UDP, UDP-Lite and SCTP each number their ports separately"
            }
            Self::DifferentPort => "they hold different ports",
            Self::DifferentAddress => "they are bound to different addresses of the same family",
            Self::V6onlySplit => {
                "the IPv6 socket is bound to [::] with IPV6_V6ONLY, which leaves the IPv4 side of the port free"
            }
            Self::DifferentFamilyNoOverlap => {
                "one holds an IPv4 address and the other a specific IPv6 address, which never overlap"
            }
            Self::ReusePortGroup => {
                "both set SO_REUSEPORT and belong to the same user, so they share the port as one group"
            }
            Self::UdpReuseAddr => {
                "both UDP sockets set SO_REUSEADDR, which lets them share the address"
            }
            Self::TcpReuseAddrNotListening => {
                "both set SO_REUSEADDR and they are not both listening, which TCP allows"
            }
            Self::BoundToDifferentDevices => "they are bound to different network devices",
        }
    }
}

/// A request that fails whatever holds the port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum InvalidRequest {
    /// An `IPV6_V6ONLY` socket asked for an IPv4-mapped address.
    V6onlyMappedAddress,
    /// An IPv4 socket was given an IPv6 address.
    Ipv6AddressOnIpv4Socket,
    /// An IPv6 socket was given an IPv4 address.
    Ipv4AddressOnIpv6Socket,
    /// `listen` on a datagram socket.
    ListenOnDatagramSocket,
    /// `listen` on a connected socket.
    ListenOnConnectedSocket,
}

impl InvalidRequest {
    /// What the kernel returns.
    pub fn errno(self) -> Errno {
        match self {
            Self::V6onlyMappedAddress
            | Self::Ipv4AddressOnIpv6Socket
            | Self::ListenOnConnectedSocket => Errno::EINVAL,
            Self::Ipv6AddressOnIpv4Socket => Errno(libc::EAFNOSUPPORT),
            Self::ListenOnDatagramSocket => Errno(libc::EOPNOTSUPP),
        }
    }

    /// One plain sentence.
    pub fn explanation(self) -> &'static str {
        match self {
            Self::V6onlyMappedAddress => {
                "an IPV6_V6ONLY socket cannot bind an IPv4-mapped address (::ffff:a.b.c.d)"
            }
            Self::Ipv6AddressOnIpv4Socket => "an IPv4 socket cannot bind an IPv6 address",
            Self::Ipv4AddressOnIpv6Socket => {
                "an IPv6 socket needs an IPv6 address (write an IPv4 one as ::ffff:a.b.c.d)"
            }
            Self::ListenOnDatagramSocket => "UDP sockets cannot listen",
            Self::ListenOnConnectedSocket => "only a socket that is not connected can listen",
        }
    }
}

/// What the kernel remembers about one TCP port between binds: the
/// `SO_REUSEPORT` shortcut of its bind bucket (`tb->fastreuseport`, `fastuid`,
/// `fast_rcv_saddr`, ...). Keep one per (network namespace, TCP port), feed it
/// every successful bind and listen in the order they happened, and start a
/// new one when the port's last holder (TIME_WAIT included) is gone, which is
/// when the kernel frees the bucket.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PortHistory {
    shortcut: Shortcut,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Shortcut {
    /// `fastreuseport` 0: every bind is checked.
    #[default]
    Off,
    /// Same-owner `SO_REUSEPORT` sockets that `end` covers skip the check.
    On {
        family: Family,
        end: Endpoint,
        uid: u32,
    },
    /// A recorded socket had an unknown option or owner.
    Unknown,
}

impl PortHistory {
    /// The state of a port nobody holds.
    pub fn new() -> PortHistory {
        PortHistory::default()
    }

    /// Records that `sock` took the port: a successful bind, or a successful
    /// listen (with the options it had then). Ignores sockets outside TCP's
    /// port space.
    pub fn record(&mut self, sock: &SocketFacts) {
        if Space::of(sock.protocol) != Space::Tcp {
            return;
        }
        // Mirrors the SO_REUSEPORT half of inet_csk_update_fastreuse: a
        // socket without SO_REUSEPORT turns the shortcut off, one with it
        // replaces what is remembered unless sk_reuseport_match already
        // covered it.
        self.shortcut = match sock.options.reuse_port {
            Some(false) => Shortcut::Off,
            None => Shortcut::Unknown,
            Some(true) => {
                let known = sock
                    .uid
                    .zip(known_endpoint(sock.address, sock.options.v6only));
                match (self.shortcut, known) {
                    (_, None) | (Shortcut::Unknown, _) => Shortcut::Unknown,
                    (Shortcut::On { family, end, uid }, Some((sock_uid, sock_end)))
                        if uid == sock_uid && shortcut_covers(family, end, sock_end) =>
                    {
                        self.shortcut
                    }
                    (_, Some((uid, end))) => Shortcut::On {
                        family: sock.family,
                        end,
                        uid,
                    },
                }
            }
        };
    }
}

/// Would `req` bind, given the sockets in `existing` (any port, protocol and
/// namespace: the ones that matter are picked out)? `existing` in bind order,
/// oldest first. Without a [`PortHistory`]; see [`predict_bind`].
pub fn can_bind(existing: &[SocketFacts], req: &BindRequest) -> Verdict {
    predict_bind(None, existing, req).verdict
}

/// Would `listen` on `sock` (bound, not yet listening) succeed, given the
/// other sockets in `existing` (`sock` itself may be among them)? Without a
/// [`PortHistory`]; see [`predict_listen`].
pub fn can_listen(existing: &[SocketFacts], sock: &SocketFacts) -> Verdict {
    predict_listen(None, existing, sock).verdict
}

/// [`can_bind`] with the port's [`PortHistory`] when there is one, and
/// whether the answer is certain.
pub fn predict_bind(
    history: Option<&PortHistory>,
    existing: &[SocketFacts],
    req: &BindRequest,
) -> Prediction {
    let space = Space::of(req.protocol);
    let holders: Vec<&SocketFacts> = existing
        .iter()
        .filter(|f| f.netns == req.netns && Space::of(f.protocol) == space && f.port == req.port)
        .collect();
    let judge = |fill| {
        if let Some(invalid) = invalid_bind(req, fill) {
            return Verdict::invalid(invalid);
        }
        if req.port == 0 {
            return Verdict::Ok;
        }
        let new = View::of_request(req, fill);
        judge(space, history, &new, &holders, fill)
    };
    let verdict = judge(Fill::Unset);
    // A specific UDP address on a crowded port may take the kernel's other
    // walk (udp_lib_lport_inuse2), whose order this does not model.
    let udp_hash2 =
        space.is_udp() && holders.len() >= UDP_HASH2_THRESHOLD && !is_wildcard(req.address);
    let knowable = req.port != 0 && space != Space::Sctp && !udp_hash2;
    Prediction {
        confident: knowable && verdict.same_answer(&judge(Fill::Set)),
        verdict,
    }
}

/// [`can_listen`] with the port's [`PortHistory`] when there is one, and
/// whether the answer is certain.
pub fn predict_listen(
    history: Option<&PortHistory>,
    existing: &[SocketFacts],
    sock: &SocketFacts,
) -> Prediction {
    let space = Space::of(sock.protocol);
    let holders: Vec<&SocketFacts> = existing
        .iter()
        .filter(|f| {
            f.netns == sock.netns
                && Space::of(f.protocol) == space
                && f.port == sock.port
                && !is_same_socket(f, sock)
        })
        .collect();
    let judge = |fill| {
        if space.is_udp() {
            return Verdict::invalid(InvalidRequest::ListenOnDatagramSocket);
        }
        match sock.state {
            // listen() on a listener only changes its backlog.
            SockState::Listening => return Verdict::Ok,
            SockState::Connected | SockState::TimeWait => {
                return Verdict::invalid(InvalidRequest::ListenOnConnectedSocket);
            }
            SockState::Bound => {}
        }
        if sock.port == 0 {
            return Verdict::Ok;
        }
        let new = View::of_socket(sock, fill);
        judge(space, history, &new, &holders, fill)
    };
    let verdict = judge(Fill::Unset);
    Prediction {
        confident: space != Space::Sctp && sock.port != 0 && verdict.same_answer(&judge(Fill::Set)),
        verdict,
    }
}

/// Why `a` and `b`, which both hold a port, may do so; `None` if the rules
/// say they may not (an inconsistent model, or one of the history effects the
/// module documentation describes: TCP's `SO_REUSEPORT` shortcut, UDP's
/// walk that stops at the first overlapping socket). Unknown options are first taken as not set and, if that
/// finds no reason, as set: the kernel let both in, so that is the likelier
/// story. Symmetric in `a` and `b`.
pub fn why_coexist(a: &SocketFacts, b: &SocketFacts) -> Option<CoexistReason> {
    if a.netns != b.netns {
        return Some(CoexistReason::DifferentNetns);
    }
    let space = Space::of(a.protocol);
    if space != Space::of(b.protocol) {
        return Some(CoexistReason::DifferentProtocol);
    }
    if a.port != b.port {
        return Some(CoexistReason::DifferentPort);
    }
    if !devices_compatible(a.bound_dev_if, b.bound_dev_if) {
        return Some(CoexistReason::BoundToDifferentDevices);
    }
    [Fill::Unset, Fill::Set].into_iter().find_map(|fill| {
        let (x, y) = (View::of_socket(a, fill), View::of_socket(b, fill));
        if overlap(x.end, y.end).is_none() {
            return Some(split_reason(x.end, y.end));
        }
        let tcp_like = !space.is_udp();
        // TCP does not compare the owner of a TIME_WAIT socket.
        let tcp_time_wait = tcp_like && (x.time_wait || y.time_wait);
        if x.reuse_port && y.reuse_port && (tcp_time_wait || same_owner(x.uid, y.uid, fill)) {
            Some(CoexistReason::ReusePortGroup)
        } else if x.reuse_addr && y.reuse_addr && !tcp_like {
            Some(CoexistReason::UdpReuseAddr)
        } else if x.reuse_addr && y.reuse_addr && !(x.listening && y.listening) {
            Some(CoexistReason::TcpReuseAddrNotListening)
        } else {
            None
        }
    })
}

/// With more than 10 sockets in the port's UDP hash slot (which other ports
/// share) the kernel checks a specific address through the (address, port)
/// hash instead (`udp_lib_get_port`); from 10 sockets on the port itself that
/// may be the case.
const UDP_HASH2_THRESHOLD: usize = 10;

/// Whether sockets of protocols `a` and `b` number their ports in one space
/// and so may collide: TCP and MPTCP share one (an MPTCP socket binds
/// through a TCP subflow); UDP, UDP-Lite and SCTP each have their own.
pub fn same_port_space(a: Protocol, b: Protocol) -> bool {
    Space::of(a) == Space::of(b)
}

/// A port numbering space: sockets in different ones never collide.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Space {
    Tcp,
    Udp,
    UdpLite,
    Sctp,
}

impl Space {
    fn of(protocol: Protocol) -> Space {
        match protocol {
            Protocol::Tcp | Protocol::Mptcp => Space::Tcp,
            Protocol::Udp => Space::Udp,
            Protocol::UdpLite => Space::UdpLite,
            Protocol::Sctp => Space::Sctp,
        }
    }

    fn is_udp(self) -> bool {
        matches!(self, Space::Udp | Space::UdpLite)
    }
}

/// How unknown (`None`) options and owners are filled in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fill {
    /// Options not set, owners different: the kernel defaults, and the answer
    /// reported.
    Unset,
    /// Options set, owners equal: the other extreme, to tell whether the
    /// unknowns matter (and, without a history, TCP's shortcut assumed).
    Set,
}

impl Fill {
    fn flag(self, value: Option<bool>) -> bool {
        value.unwrap_or(self == Fill::Set)
    }
}

fn same_owner(a: Option<u32>, b: Option<u32>, fill: Fill) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => a == b,
        _ => fill == Fill::Set,
    }
}

/// A bound address as the conflict rules see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Endpoint {
    /// An IPv4 address, from an IPv4 socket or an IPv4-mapped IPv6 one.
    V4(Ipv4Addr),
    /// `[::]`.
    V6Any { v6only: bool },
    /// A specific IPv6 address (the kernel makes these sockets v6-only).
    V6(Ipv6Addr),
}

pub(crate) fn endpoint(address: IpAddr, v6only: Option<bool>, fill: Fill) -> Endpoint {
    match address {
        IpAddr::V4(v4) => Endpoint::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => Endpoint::V4(v4),
            None if v6.is_unspecified() => Endpoint::V6Any {
                v6only: fill.flag(v6only),
            },
            None => Endpoint::V6(v6),
        },
    }
}

/// The endpoint when nothing about it is unknown.
fn known_endpoint(address: IpAddr, v6only: Option<bool>) -> Option<Endpoint> {
    let end = endpoint(address, v6only, Fill::Unset);
    (end == endpoint(address, v6only, Fill::Set)).then_some(end)
}

/// How `new`'s address overlaps `old`'s, if at all (`inet_rcv_saddr_equal`
/// with wildcards matching on both sides).
pub(crate) fn overlap(new: Endpoint, old: Endpoint) -> Option<Overlap> {
    use Endpoint::{V4, V6, V6Any};
    match (new, old) {
        (V4(n), V4(o)) if n == o => Some(Overlap::SameAddress),
        (V4(_), V4(o)) if o.is_unspecified() => Some(Overlap::ExistingWildcard),
        (V4(n), V4(_)) if n.is_unspecified() => Some(Overlap::RequestWildcard),
        (V4(_), V6Any { v6only: false }) => Some(Overlap::ExistingDualStack),
        (V6Any { v6only: false }, V4(_)) => Some(Overlap::RequestDualStack),
        (V6Any { .. }, V6Any { .. }) => Some(Overlap::SameAddress),
        (V6(_), V6Any { .. }) => Some(Overlap::ExistingWildcard),
        (V6Any { .. }, V6(_)) => Some(Overlap::RequestWildcard),
        (V6(n), V6(o)) if n == o => Some(Overlap::SameAddress),
        _ => None,
    }
}

/// Why two endpoints that do not overlap do not.
fn split_reason(a: Endpoint, b: Endpoint) -> CoexistReason {
    use Endpoint::{V4, V6, V6Any};
    match (a, b) {
        (V4(_), V6Any { .. }) | (V6Any { .. }, V4(_)) => CoexistReason::V6onlySplit,
        (V4(_), V6(_)) | (V6(_), V4(_)) => CoexistReason::DifferentFamilyNoOverlap,
        _ => CoexistReason::DifferentAddress,
    }
}

/// Whether the remembered `SO_REUSEPORT` socket's address covers `sk`'s, as
/// `sk_reuseport_match` compares them: the remembered side's wildcard
/// matches, `sk`'s does not, and an IPv4 socket's `0.0.0.0` also matches a
/// dual-stack `[::]` (whose IPv4 address is 0) while a mapped `::ffff:0.0.0.0`
/// does not.
fn shortcut_covers(family: Family, fast: Endpoint, sk: Endpoint) -> bool {
    use Endpoint::{V4, V6, V6Any};
    match (fast, sk) {
        (V4(f), V4(a)) => f.is_unspecified() || f == a,
        (V4(f), V6Any { v6only: false }) => family == Family::Ipv4 && f.is_unspecified(),
        (V4(_), _) => false,
        (V6Any { v6only }, V4(_)) => !v6only,
        (V6Any { .. }, _) => true,
        (V6(f), V6(a)) => f == a,
        (V6(_), _) => false,
    }
}

/// One socket as the rules see it, unknowns filled in.
#[derive(Clone, Copy, Debug)]
struct View {
    end: Endpoint,
    reuse_addr: bool,
    reuse_port: bool,
    uid: Option<u32>,
    listening: bool,
    time_wait: bool,
    dev: u32,
}

impl View {
    fn of_socket(facts: &SocketFacts, fill: Fill) -> View {
        View {
            end: endpoint(facts.address, facts.options.v6only, fill),
            reuse_addr: fill.flag(facts.options.reuse_addr),
            reuse_port: fill.flag(facts.options.reuse_port),
            uid: facts.uid,
            listening: facts.state == SockState::Listening,
            time_wait: facts.state == SockState::TimeWait,
            dev: facts.bound_dev_if,
        }
    }

    fn of_request(req: &BindRequest, fill: Fill) -> View {
        View {
            end: endpoint(req.address, req.options.v6only, fill),
            reuse_addr: fill.flag(req.options.reuse_addr),
            reuse_port: fill.flag(req.options.reuse_port),
            uid: Some(req.uid),
            listening: false,
            time_wait: false,
            // Not in the request: a device is usually bound after bind, if at all.
            dev: 0,
        }
    }
}

fn invalid_bind(req: &BindRequest, fill: Fill) -> Option<InvalidRequest> {
    match (req.family, req.address) {
        (Family::Ipv4, IpAddr::V6(_)) => Some(InvalidRequest::Ipv6AddressOnIpv4Socket),
        (Family::Ipv6, IpAddr::V4(_)) => Some(InvalidRequest::Ipv4AddressOnIpv6Socket),
        (Family::Ipv6, IpAddr::V6(v6))
            if v6.to_ipv4_mapped().is_some() && fill.flag(req.options.v6only) =>
        {
            Some(InvalidRequest::V6onlyMappedAddress)
        }
        _ => None,
    }
}

/// `0.0.0.0`, `[::]` or `::ffff:0.0.0.0` (`inet_use_hash2_on_bind` is false).
pub(crate) fn is_wildcard(address: IpAddr) -> bool {
    match endpoint(address, None, Fill::Unset) {
        Endpoint::V4(v4) => v4.is_unspecified(),
        Endpoint::V6Any { .. } => true,
        Endpoint::V6(_) => false,
    }
}

fn devices_compatible(a: u32, b: u32) -> bool {
    a == 0 || b == 0 || a == b
}

fn is_same_socket(a: &SocketFacts, b: &SocketFacts) -> bool {
    if a.cookie != 0 || b.cookie != 0 {
        a.cookie == b.cookie
    } else {
        a == b
    }
}

/// The conflict check of one bind or listen against the port's holders.
fn judge(
    space: Space,
    history: Option<&PortHistory>,
    new: &View,
    holders: &[&SocketFacts],
    fill: Fill,
) -> Verdict {
    if holders.is_empty() {
        return Verdict::Ok;
    }
    match space {
        Space::Udp | Space::UdpLite => {
            Verdict::conflict(udp_blocker(new, holders, fill).into_iter().collect())
        }
        Space::Tcp | Space::Sctp => {
            if space == Space::Tcp && shortcut_applies(history, new, fill) {
                return Verdict::Ok;
            }
            Verdict::conflict(
                holders
                    .iter()
                    .filter_map(|old| tcp_blocker(new, old, fill))
                    .collect(),
            )
        }
    }
}

/// `sk_reuseport_match`: whether the bucket's shortcut lets `new` skip the
/// conflict check. Without a history, only [`Fill::Set`] assumes it does.
fn shortcut_applies(history: Option<&PortHistory>, new: &View, fill: Fill) -> bool {
    if !new.reuse_port {
        return false;
    }
    match history.map_or(Shortcut::Unknown, |h| h.shortcut) {
        Shortcut::Off => false,
        Shortcut::Unknown => fill == Fill::Set,
        Shortcut::On { family, end, uid } => {
            same_owner(Some(uid), new.uid, fill) && shortcut_covers(family, end, new.end)
        }
    }
}

/// `inet_bind_conflict` (relaxed, reuseport allowed) for one existing socket.
fn tcp_blocker(new: &View, old_facts: &SocketFacts, fill: Fill) -> Option<Blocker> {
    let old = View::of_socket(old_facts, fill);
    if !devices_compatible(new.dev, old.dev) {
        return None;
    }
    let overlap = overlap(new.end, old.end)?;
    if new.reuse_addr && old.reuse_addr && !old.listening {
        return None;
    }
    if new.reuse_port && old.reuse_port && (old.time_wait || same_owner(new.uid, old.uid, fill)) {
        return None;
    }
    Some(blocker(new, &old, old_facts, overlap))
}

/// `udp_lib_lport_inuse`: the first overlapping socket in the port's list
/// that both-`SO_REUSEADDR` does not skip decides.
fn udp_blocker(new: &View, holders: &[&SocketFacts], fill: Fill) -> Option<Blocker> {
    // The list as `sk_add_node_rcu` builds it, bind by bind: at the head,
    // except IPv6 sockets with SO_REUSEPORT, which go to the tail.
    let mut list = std::collections::VecDeque::with_capacity(holders.len());
    for &facts in holders {
        let view = View::of_socket(facts, fill);
        if facts.family == Family::Ipv6 && view.reuse_port {
            list.push_back((facts, view));
        } else {
            list.push_front((facts, view));
        }
    }
    for (old_facts, old) in list {
        if (new.reuse_addr && old.reuse_addr) || !devices_compatible(new.dev, old.dev) {
            continue;
        }
        let Some(overlap) = overlap(new.end, old.end) else {
            continue;
        };
        if new.reuse_port && old.reuse_port && same_owner(new.uid, old.uid, fill) {
            return None;
        }
        return Some(blocker(new, &old, old_facts, overlap));
    }
    None
}

/// The blocker, with the most specific reason: a sharing option that was
/// tried and fell short beats the bare address overlap.
fn blocker(new: &View, old: &View, old_facts: &SocketFacts, overlap: Overlap) -> Blocker {
    let why = if old.time_wait {
        ConflictReason::TimeWaitNeedsReuseAddr
    } else if new.reuse_port && old.reuse_port {
        ConflictReason::ReusePortUidMismatch
    } else if new.reuse_addr && old.reuse_addr {
        ConflictReason::ReuseAddrButListening
    } else if new.reuse_port != old.reuse_port {
        ConflictReason::ReusePortNotSetOnBoth
    } else if new.reuse_addr != old.reuse_addr {
        ConflictReason::ReuseAddrNotSetOnBoth
    } else {
        overlap.into()
    };
    Blocker {
        socket: old_facts.clone(),
        overlap,
        why,
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::socket::{NetnsCookie, ShareOptions};

    const PORT: u16 = 8080;

    fn family_of(address: IpAddr) -> Family {
        match address {
            IpAddr::V4(_) => Family::Ipv4,
            IpAddr::V6(_) => Family::Ipv6,
        }
    }

    /// A socket bound (not listening) on PORT in netns 1, owned by uid 0,
    /// every option known and off.
    fn sock(cookie: u64, protocol: Protocol, address: &str) -> SocketFacts {
        let address: IpAddr = address.parse().expect("address");
        SocketFacts {
            cookie,
            netns: 1,
            protocol,
            family: family_of(address),
            address,
            port: PORT,
            state: SockState::Bound,
            options: OFF,
            uid: Some(0),
            bound_dev_if: 0,
        }
    }

    fn tcp(cookie: u64, address: &str) -> SocketFacts {
        sock(cookie, Protocol::Tcp, address)
    }

    fn udp(cookie: u64, address: &str) -> SocketFacts {
        sock(cookie, Protocol::Udp, address)
    }

    /// The bind request for PORT in netns 1 by uid 0, every option off.
    fn want(protocol: Protocol, address: &str) -> BindRequest {
        let address: IpAddr = address.parse().expect("address");
        BindRequest {
            netns: 1,
            protocol,
            family: family_of(address),
            address,
            port: PORT,
            options: OFF,
            uid: 0,
        }
    }

    const OFF: ShareOptions = ShareOptions {
        reuse_addr: Some(false),
        reuse_port: Some(false),
        v6only: Some(false),
    };

    /// Builder steps shared by sockets and requests.
    trait Set: Sized {
        fn options(&mut self) -> &mut ShareOptions;
        fn reuse_addr(mut self) -> Self {
            self.options().reuse_addr = Some(true);
            self
        }
        fn reuse_port(mut self) -> Self {
            self.options().reuse_port = Some(true);
            self
        }
        fn v6only(mut self) -> Self {
            self.options().v6only = Some(true);
            self
        }
        fn unknown(mut self) -> Self {
            *self.options() = ShareOptions::default();
            self
        }
    }

    impl Set for SocketFacts {
        fn options(&mut self) -> &mut ShareOptions {
            &mut self.options
        }
    }

    impl Set for BindRequest {
        fn options(&mut self) -> &mut ShareOptions {
            &mut self.options
        }
    }

    trait SockSet {
        fn listening(self) -> Self;
        fn time_wait(self) -> Self;
        fn owner(self, uid: u32) -> Self;
        fn device(self, ifindex: u32) -> Self;
    }

    impl SockSet for SocketFacts {
        fn listening(mut self) -> Self {
            self.state = SockState::Listening;
            self
        }
        fn time_wait(mut self) -> Self {
            self.state = SockState::TimeWait;
            self.cookie = 0;
            self
        }
        fn owner(mut self, uid: u32) -> Self {
            self.uid = Some(uid);
            self
        }
        fn device(mut self, ifindex: u32) -> Self {
            self.bound_dev_if = ifindex;
            self
        }
    }

    /// `sock` as the request that would have bound it.
    fn request_of(sock: &SocketFacts) -> BindRequest {
        BindRequest {
            netns: sock.netns,
            protocol: sock.protocol,
            family: sock.family,
            address: sock.address,
            port: sock.port,
            options: sock.options,
            uid: sock.uid.unwrap_or(0),
        }
    }

    /// What a test expects: Ok, or EADDRINUSE with these blockers (cookie, why).
    #[derive(Debug)]
    enum Expect {
        Ok,
        InUse(&'static [(u64, ConflictReason)]),
    }

    fn check(name: &str, existing: &[SocketFacts], req: &BindRequest, expect: Expect) {
        let prediction = predict_bind(Some(&history_of(existing)), existing, req);
        assert!(
            prediction.confident,
            "{name}: not confident: {prediction:?}"
        );
        match (expect, &prediction.verdict) {
            (Expect::Ok, Verdict::Ok) => {}
            (
                Expect::InUse(want),
                Verdict::Refused {
                    errno,
                    blockers,
                    invalid,
                },
            ) => {
                assert_eq!(*errno, Errno::EADDRINUSE, "{name}");
                assert_eq!(*invalid, None, "{name}");
                let got: Vec<(u64, ConflictReason)> =
                    blockers.iter().map(|b| (b.cookie(), b.why)).collect();
                assert_eq!(got, want, "{name}");
            }
            (expect, got) => panic!("{name}: expected {expect:?}, got {got:?}"),
        }
    }

    /// The history of `existing` bound in order (listeners listened right
    /// after their bind).
    fn history_of(existing: &[SocketFacts]) -> PortHistory {
        let mut history = PortHistory::new();
        for sock in existing {
            history.record(sock);
        }
        history
    }

    use ConflictReason as R;

    // The seed experiments, as a table.
    #[test]
    fn seed_experiments() {
        let cases: Vec<(&str, Vec<SocketFacts>, BindRequest, Expect)> = vec![
            (
                "IPv4 wildcard, then IPv6 wildcard with v6only",
                vec![tcp(1, "0.0.0.0")],
                want(Protocol::Tcp, "::").v6only(),
                Expect::Ok,
            ),
            (
                "IPv6 wildcard with v6only, then IPv4 wildcard",
                vec![tcp(1, "::").v6only()],
                want(Protocol::Tcp, "0.0.0.0"),
                Expect::Ok,
            ),
            (
                "TCP and UDP on one port",
                vec![tcp(1, "0.0.0.0").listening()],
                want(Protocol::Udp, "0.0.0.0"),
                Expect::Ok,
            ),
            (
                "two IPv4 addresses",
                vec![tcp(1, "127.0.0.1").listening()],
                want(Protocol::Tcp, "127.0.0.2"),
                Expect::Ok,
            ),
            (
                "same address twice",
                vec![tcp(1, "127.0.0.1").listening()],
                want(Protocol::Tcp, "127.0.0.1"),
                Expect::InUse(&[(1, R::SameAddress)]),
            ),
            (
                "same UDP address twice",
                vec![udp(1, "127.0.0.1")],
                want(Protocol::Udp, "127.0.0.1"),
                Expect::InUse(&[(1, R::SameAddress)]),
            ),
            (
                "SO_REUSEPORT twice",
                vec![tcp(1, "127.0.0.1").reuse_port().listening()],
                want(Protocol::Tcp, "127.0.0.1").reuse_port(),
                Expect::Ok,
            ),
            (
                "SO_REUSEPORT twice, UDP",
                vec![udp(1, "0.0.0.0").reuse_port()],
                want(Protocol::Udp, "0.0.0.0").reuse_port(),
                Expect::Ok,
            ),
            (
                "wildcard, then a specific address",
                vec![tcp(1, "0.0.0.0").listening()],
                want(Protocol::Tcp, "127.0.0.1"),
                Expect::InUse(&[(1, R::WildcardCoversAddress)]),
            ),
            (
                "specific address, then the wildcard",
                vec![tcp(1, "127.0.0.1").listening()],
                want(Protocol::Tcp, "0.0.0.0"),
                Expect::InUse(&[(1, R::WildcardCoversAddress)]),
            ),
            (
                "[::] without v6only, then 0.0.0.0",
                vec![tcp(1, "::").listening()],
                want(Protocol::Tcp, "0.0.0.0"),
                Expect::InUse(&[(1, R::DualStackWildcardCoversIpv4)]),
            ),
            (
                "0.0.0.0, then [::] without v6only",
                vec![tcp(1, "0.0.0.0").listening()],
                want(Protocol::Tcp, "::"),
                Expect::InUse(&[(1, R::Ipv4BlocksDualStackWildcard)]),
            ),
        ];
        for (name, existing, req, expect) in cases {
            check(name, &existing, &req, expect);
        }
    }

    #[test]
    fn addresses_overlap_as_the_kernel_compares_them() {
        let cases: &[(&str, &str, bool, Option<Overlap>)] = &[
            // (existing, request, existing v6only, overlap)
            (
                "127.0.0.1",
                "::ffff:127.0.0.1",
                false,
                Some(Overlap::SameAddress),
            ),
            (
                "::ffff:127.0.0.1",
                "127.0.0.1",
                false,
                Some(Overlap::SameAddress),
            ),
            (
                "::ffff:0.0.0.0",
                "127.0.0.1",
                false,
                Some(Overlap::ExistingWildcard),
            ),
            (
                "0.0.0.0",
                "::ffff:127.0.0.1",
                false,
                Some(Overlap::ExistingWildcard),
            ),
            (
                "::",
                "::ffff:127.0.0.1",
                false,
                Some(Overlap::ExistingDualStack),
            ),
            ("::", "::ffff:127.0.0.1", true, None),
            ("::", "127.0.0.1", true, None),
            // v6only only keeps IPv4 out: the IPv6 side is still the wildcard.
            ("::", "::1", true, Some(Overlap::ExistingWildcard)),
            ("::", "::", true, Some(Overlap::SameAddress)),
            ("::1", "0.0.0.0", false, None),
            ("0.0.0.0", "::1", false, None),
            ("::1", "::2", false, None),
            ("::1", "::1", false, Some(Overlap::SameAddress)),
            ("127.0.0.1", "::", false, Some(Overlap::RequestDualStack)),
            ("::1", "::", false, Some(Overlap::RequestWildcard)),
            (
                "127.0.0.2",
                "::ffff:0.0.0.0",
                false,
                Some(Overlap::RequestWildcard),
            ),
        ];
        for &(old, new, v6only, want_overlap) in cases {
            let mut existing = tcp(1, old);
            existing.options.v6only = Some(v6only);
            let verdict = can_bind(&[existing], &want(Protocol::Tcp, new));
            let got = verdict.blockers().first().map(|b| b.overlap);
            assert_eq!(got, want_overlap, "{old} (v6only {v6only}) then {new}");
        }
    }

    #[test]
    fn tcp_reuse_addr_shares_with_sockets_that_do_not_listen() {
        let bound = tcp(1, "127.0.0.1").reuse_addr();
        let req = want(Protocol::Tcp, "127.0.0.1").reuse_addr();
        check(
            "both SO_REUSEADDR, bound",
            std::slice::from_ref(&bound),
            &req,
            Expect::Ok,
        );
        check(
            "both SO_REUSEADDR, listening",
            &[bound.clone().listening()],
            &req,
            Expect::InUse(&[(1, R::ReuseAddrButListening)]),
        );
        check(
            "SO_REUSEADDR on the request only",
            &[tcp(1, "127.0.0.1")],
            &req,
            Expect::InUse(&[(1, R::ReuseAddrNotSetOnBoth)]),
        );
        check(
            "SO_REUSEADDR on the existing socket only",
            &[bound],
            &want(Protocol::Tcp, "127.0.0.1"),
            Expect::InUse(&[(1, R::ReuseAddrNotSetOnBoth)]),
        );
        // Wildcards too: SO_REUSEADDR is about addresses, not just equal ones.
        check(
            "0.0.0.0 then 127.0.0.1, both SO_REUSEADDR",
            &[tcp(1, "0.0.0.0").reuse_addr()],
            &req,
            Expect::Ok,
        );
    }

    #[test]
    fn udp_reuse_addr_shares_with_anything() {
        check(
            "both SO_REUSEADDR",
            &[udp(1, "127.0.0.1").reuse_addr()],
            &want(Protocol::Udp, "127.0.0.1").reuse_addr(),
            Expect::Ok,
        );
        check(
            "one SO_REUSEADDR",
            &[udp(1, "0.0.0.0").reuse_addr()],
            &want(Protocol::Udp, "127.0.0.1"),
            Expect::InUse(&[(1, R::ReuseAddrNotSetOnBoth)]),
        );
    }

    #[test]
    fn reuse_port_needs_both_sides_and_one_owner() {
        let req = want(Protocol::Tcp, "127.0.0.1").reuse_port();
        check(
            "other owner",
            &[tcp(1, "127.0.0.1").reuse_port().owner(1000)],
            &req,
            Expect::InUse(&[(1, R::ReusePortUidMismatch)]),
        );
        check(
            "other owner, UDP",
            &[udp(1, "127.0.0.1").reuse_port().owner(1000)],
            &want(Protocol::Udp, "127.0.0.1").reuse_port(),
            Expect::InUse(&[(1, R::ReusePortUidMismatch)]),
        );
        check(
            "existing lacks it",
            &[tcp(1, "127.0.0.1")],
            &req,
            Expect::InUse(&[(1, R::ReusePortNotSetOnBoth)]),
        );
        check(
            "request lacks it",
            &[tcp(1, "127.0.0.1").reuse_port()],
            &want(Protocol::Tcp, "127.0.0.1"),
            Expect::InUse(&[(1, R::ReusePortNotSetOnBoth)]),
        );
        check(
            "SO_REUSEPORT beats listening",
            &[tcp(1, "127.0.0.1").reuse_addr().reuse_port().listening()],
            &want(Protocol::Tcp, "127.0.0.1").reuse_addr().reuse_port(),
            Expect::Ok,
        );
    }

    #[test]
    fn time_wait_needs_reuse_addr_on_both() {
        let tw = tcp(7, "127.0.0.1").time_wait();
        check(
            "plain",
            std::slice::from_ref(&tw),
            &want(Protocol::Tcp, "127.0.0.1").reuse_addr(),
            Expect::InUse(&[(0, R::TimeWaitNeedsReuseAddr)]),
        );
        check(
            "both SO_REUSEADDR",
            &[tw.clone().reuse_addr()],
            &want(Protocol::Tcp, "127.0.0.1").reuse_addr(),
            Expect::Ok,
        );
        // TIME_WAIT has no owner to compare: SO_REUSEPORT on both is enough.
        check(
            "both SO_REUSEPORT, other owner",
            &[tw.reuse_port().owner(1000)],
            &want(Protocol::Tcp, "127.0.0.1").reuse_port(),
            Expect::Ok,
        );
    }

    #[test]
    fn different_devices_netns_ports_and_spaces_never_collide() {
        let req = want(Protocol::Tcp, "127.0.0.1");
        // A bind request carries no device: it collides with a device-bound socket.
        check(
            "device-bound holder",
            &[tcp(1, "127.0.0.1").device(2)],
            &req,
            Expect::InUse(&[(1, R::SameAddress)]),
        );
        let mut other_ns = tcp(1, "127.0.0.1");
        other_ns.netns = 2;
        check("netns", &[other_ns], &req, Expect::Ok);
        let mut other_port = tcp(1, "127.0.0.1");
        other_port.port = PORT + 1;
        check("port", &[other_port], &req, Expect::Ok);
        check(
            "udp-lite vs udp",
            &[sock(1, Protocol::UdpLite, "127.0.0.1")],
            &want(Protocol::Udp, "127.0.0.1"),
            Expect::Ok,
        );
        // At listen the socket's device is known: other devices never
        // collide, no device collides with every device.
        let on_dev3 = tcp(9, "127.0.0.1").device(3);
        assert!(can_listen(&[tcp(1, "127.0.0.1").device(2).listening()], &on_dev3).is_ok());
        assert_eq!(
            can_listen(&[tcp(1, "127.0.0.1").listening()], &on_dev3).errno(),
            Some(Errno::EADDRINUSE)
        );
        assert_eq!(
            can_listen(&[tcp(1, "127.0.0.1").device(3).listening()], &on_dev3).errno(),
            Some(Errno::EADDRINUSE)
        );
    }

    #[test]
    fn mptcp_shares_tcp_ports() {
        check(
            "MPTCP after TCP",
            &[tcp(1, "0.0.0.0").listening()],
            &want(Protocol::Mptcp, "0.0.0.0"),
            Expect::InUse(&[(1, R::SameAddress)]),
        );
    }

    #[test]
    fn tcp_names_every_blocker() {
        let existing = [
            tcp(1, "127.0.0.1").listening(),
            tcp(2, "127.0.0.2"),
            tcp(3, "::").v6only(),
            tcp(4, "::ffff:127.0.0.3"),
        ];
        check(
            "0.0.0.0 over three IPv4 holders",
            &existing,
            &want(Protocol::Tcp, "0.0.0.0"),
            Expect::InUse(&[
                (1, R::WildcardCoversAddress),
                (2, R::WildcardCoversAddress),
                (4, R::WildcardCoversAddress),
            ]),
        );
    }

    #[test]
    fn invalid_requests_fail_whatever_holds_the_port() {
        let verdict = can_bind(&[], &want(Protocol::Tcp, "::ffff:127.0.0.1").v6only());
        assert_eq!(
            verdict,
            Verdict::Refused {
                errno: Errno::EINVAL,
                blockers: vec![],
                invalid: Some(InvalidRequest::V6onlyMappedAddress)
            }
        );
        let mut v4_with_v6 = want(Protocol::Tcp, "::1");
        v4_with_v6.family = Family::Ipv4;
        assert_eq!(
            can_bind(&[], &v4_with_v6).errno(),
            Some(Errno(libc::EAFNOSUPPORT))
        );
        let mut v6_with_v4 = want(Protocol::Udp, "127.0.0.1");
        v6_with_v4.family = Family::Ipv6;
        assert_eq!(can_bind(&[], &v6_with_v4).errno(), Some(Errno::EINVAL));
        assert_eq!(
            can_listen(&[], &udp(1, "127.0.0.1")).errno(),
            Some(Errno(libc::EOPNOTSUPP))
        );
        let mut connected = tcp(1, "127.0.0.1");
        connected.state = SockState::Connected;
        assert_eq!(can_listen(&[], &connected).errno(), Some(Errno::EINVAL));
        assert!(can_listen(&[], &tcp(1, "127.0.0.1").listening()).is_ok());
    }

    // Two SO_REUSEADDR sockets bind one address; the second listen fails
    // (measured on 6.18).
    #[test]
    fn second_reuse_addr_listener_fails_at_listen() {
        let a = tcp(1, "127.0.0.1").reuse_addr();
        let b = tcp(2, "127.0.0.1").reuse_addr();
        assert!(can_bind(std::slice::from_ref(&a), &request_of(&b)).is_ok());
        assert!(can_listen(&[a.clone(), b.clone()], &a).is_ok());
        let verdict = can_listen(&[a.clone().listening(), b.clone()], &b);
        assert_eq!(verdict.errno(), Some(Errno::EADDRINUSE));
        assert_eq!(verdict.blockers()[0].why, R::ReuseAddrButListening);
        assert_eq!(verdict.blockers()[0].cookie(), 1);
    }

    // The kernel's SO_REUSEPORT shortcut (sk_reuseport_match): after X
    // (SO_REUSEADDR + SO_REUSEPORT on 0.0.0.0) joined A (SO_REUSEADDR on
    // 127.0.0.1), a SO_REUSEPORT-only socket of X's owner binds 127.0.0.1
    // without being checked against A, even after X closed. Measured on 6.18.
    #[test]
    fn reuse_port_shortcut_remembers_the_last_reuseport_socket() {
        let a = tcp(1, "127.0.0.1").reuse_addr();
        let x = tcp(2, "0.0.0.0").reuse_addr().reuse_port();
        let c = want(Protocol::Tcp, "127.0.0.1").reuse_port();
        let mut history = PortHistory::new();
        history.record(&a);
        assert!(
            predict_bind(Some(&history), std::slice::from_ref(&a), &request_of(&x))
                .verdict
                .is_ok()
        );
        history.record(&x);
        let with_x = predict_bind(Some(&history), &[a.clone(), x.clone()], &c);
        assert_eq!(
            with_x,
            Prediction {
                verdict: Verdict::Ok,
                confident: true
            }
        );
        // X has closed: the bucket still remembers it.
        let after_x = predict_bind(Some(&history), std::slice::from_ref(&a), &c);
        assert_eq!(
            after_x,
            Prediction {
                verdict: Verdict::Ok,
                confident: true
            }
        );
        // Without a history the rules refuse, but cannot be sure.
        let blind = predict_bind(None, std::slice::from_ref(&a), &c);
        assert_eq!(blind.verdict.errno(), Some(Errno::EADDRINUSE));
        assert!(!blind.confident);
        // Another owner does not match the shortcut.
        let mut other = c.clone();
        other.uid = 1000;
        assert_eq!(
            predict_bind(Some(&history), std::slice::from_ref(&a), &other)
                .verdict
                .errno(),
            Some(Errno::EADDRINUSE)
        );
        // A socket without SO_REUSEPORT turns the shortcut off.
        history.record(&tcp(3, "127.0.0.2"));
        assert_eq!(
            predict_bind(Some(&history), &[a], &c).verdict.errno(),
            Some(Errno::EADDRINUSE)
        );
    }

    #[test]
    fn reuse_port_shortcut_also_applies_at_listen() {
        // A and X both SO_REUSEADDR on one address; X (SO_REUSEPORT) bound
        // last, so the bucket remembers it and X's own listen skips the check.
        let a = tcp(1, "127.0.0.1").reuse_addr();
        let x = tcp(2, "127.0.0.1").reuse_addr().reuse_port();
        let history = history_of(&[a.clone(), x.clone()]);
        let existing = [a.clone().listening(), x.clone()];
        assert!(
            predict_listen(Some(&history), &existing, &x)
                .verdict
                .is_ok()
        );
        assert_eq!(
            predict_listen(Some(&PortHistory::new()), &existing, &x)
                .verdict
                .errno(),
            Some(Errno::EADDRINUSE)
        );
    }

    #[test]
    fn shortcut_address_matching_follows_the_remembered_family() {
        let any4 = Endpoint::V4(Ipv4Addr::UNSPECIFIED);
        let dual = Endpoint::V6Any { v6only: false };
        // An IPv4 socket's 0.0.0.0 has the same IPv4 address as a dual-stack [::].
        assert!(shortcut_covers(Family::Ipv4, any4, dual));
        // An IPv6 socket's ::ffff:0.0.0.0 does not.
        assert!(!shortcut_covers(Family::Ipv6, any4, dual));
        assert!(shortcut_covers(
            Family::Ipv6,
            dual,
            Endpoint::V4(Ipv4Addr::LOCALHOST)
        ));
        assert!(!shortcut_covers(
            Family::Ipv6,
            Endpoint::V6Any { v6only: true },
            Endpoint::V4(Ipv4Addr::LOCALHOST)
        ));
        // The socket's own wildcard does not match the remembered address.
        assert!(!shortcut_covers(
            Family::Ipv4,
            Endpoint::V4(Ipv4Addr::LOCALHOST),
            any4
        ));
        assert!(!shortcut_covers(
            Family::Ipv6,
            Endpoint::V6(Ipv6Addr::LOCALHOST),
            dual
        ));
    }

    // UDP stops at the first overlapping socket that both-SO_REUSEADDR does
    // not skip, newest first. Measured on 6.18: with B (SO_REUSEADDR) bound
    // after A (SO_REUSEADDR + SO_REUSEPORT), C (SO_REUSEPORT) meets B first
    // and fails; in the other order it meets A first and binds.
    #[test]
    fn udp_walks_newest_first() {
        let a = udp(1, "127.0.0.1").reuse_addr().reuse_port();
        let b = udp(2, "127.0.0.1").reuse_addr();
        let c = want(Protocol::Udp, "127.0.0.1").reuse_port();
        check(
            "A then B",
            &[a.clone(), b.clone()],
            &c,
            Expect::InUse(&[(2, R::ReusePortNotSetOnBoth)]),
        );
        check("B then A", &[b, a], &c, Expect::Ok);
    }

    // Found by tests/predictor.rs (the rules walked plain newest-first): IPv6
    // sockets with SO_REUSEPORT sit at the end of the kernel's list, so the
    // IPv4 0.0.0.0 bound between them is met first and refuses [::].
    #[test]
    fn udp_ipv6_reuseport_sockets_are_walked_last() {
        let existing = [
            udp(2, "::1").reuse_port(),
            udp(3, "0.0.0.0").owner(4242),
            udp(4, "fd00::1").reuse_addr().reuse_port(),
        ];
        check(
            "[::] after ::1, 0.0.0.0, fd00::1",
            &existing,
            &want(Protocol::Udp, "::").reuse_port(),
            Expect::InUse(&[(3, R::ReusePortNotSetOnBoth)]),
        );
        // The same pair of holders, the reuseport one IPv4 or IPv6: an IPv4
        // one is met first and lets the request in, an IPv6 one is met last.
        let req = want(Protocol::Udp, "127.0.0.1").reuse_port();
        let plain = udp(1, "127.0.0.1").reuse_addr();
        let v4_group = udp(2, "0.0.0.0").reuse_addr().reuse_port();
        let v6_group = udp(2, "::").reuse_addr().reuse_port();
        check("IPv4 group", &[plain.clone(), v4_group], &req, Expect::Ok);
        check(
            "IPv6 group",
            &[plain, v6_group],
            &req,
            Expect::InUse(&[(1, R::ReusePortNotSetOnBoth)]),
        );
    }

    #[test]
    fn unknown_options_make_a_prediction_uncertain_only_when_they_matter() {
        let existing = [tcp(1, "127.0.0.1").unknown()];
        let history = PortHistory::new();
        let p = predict_bind(
            Some(&history),
            &existing,
            &want(Protocol::Tcp, "127.0.0.1").reuse_addr(),
        );
        assert_eq!(p.verdict.errno(), Some(Errno::EADDRINUSE));
        assert!(!p.confident);
        // Another address: the options cannot matter.
        let p = predict_bind(Some(&history), &existing, &want(Protocol::Tcp, "127.0.0.2"));
        assert_eq!(
            p,
            Prediction {
                verdict: Verdict::Ok,
                confident: true
            }
        );
        // The request has no SO_REUSEADDR: the existing socket's can't help.
        let p = predict_bind(Some(&history), &existing, &want(Protocol::Tcp, "127.0.0.1"));
        assert!(p.confident, "{p:?}");
        // Unknown v6only on [::] decides the IPv4 side.
        let p = predict_bind(
            Some(&history),
            &[tcp(1, "::").unknown()],
            &want(Protocol::Tcp, "0.0.0.0"),
        );
        assert_eq!(p.verdict.blockers()[0].why, R::DualStackWildcardCoversIpv4);
        assert!(!p.confident);
        // Unknown owner of a SO_REUSEPORT socket.
        let mut anon = tcp(1, "127.0.0.1").reuse_port();
        anon.uid = None;
        let p = predict_bind(
            Some(&history),
            &[anon],
            &want(Protocol::Tcp, "127.0.0.1").reuse_port(),
        );
        assert_eq!(p.verdict.blockers()[0].why, R::ReusePortUidMismatch);
        assert!(!p.confident);
        // Unknown v6only on a mapped request: it may be EINVAL.
        let p = predict_bind(
            Some(&history),
            &[],
            &want(Protocol::Tcp, "::ffff:127.0.0.1").unknown(),
        );
        assert!(p.verdict.is_ok());
        assert!(!p.confident);
    }

    #[test]
    fn what_cannot_be_known_is_not_confident() {
        let history = PortHistory::new();
        let mut any_port = want(Protocol::Tcp, "127.0.0.1");
        any_port.port = 0;
        assert_eq!(
            predict_bind(Some(&history), &[tcp(1, "127.0.0.1")], &any_port),
            Prediction {
                verdict: Verdict::Ok,
                confident: false
            }
        );
        let sctp = predict_bind(
            None,
            &[sock(1, Protocol::Sctp, "127.0.0.1")],
            &want(Protocol::Sctp, "127.0.0.1"),
        );
        assert_eq!(sctp.verdict.errno(), Some(Errno::EADDRINUSE));
        assert!(!sctp.confident);
        let crowd: Vec<SocketFacts> = (1..=10).map(|c| udp(c, "0.0.0.0").reuse_port()).collect();
        let p = predict_bind(None, &crowd, &want(Protocol::Udp, "127.0.0.1").reuse_port());
        assert!(p.verdict.is_ok());
        assert!(!p.confident);
        // Wildcards always take the walk modelled here.
        for wildcard in ["0.0.0.0", "::", "::ffff:0.0.0.0"] {
            let p = predict_bind(None, &crowd, &want(Protocol::Udp, wildcard).reuse_port());
            assert!(p.confident, "{wildcard}: {p:?}");
        }
    }

    #[test]
    fn history_ignores_other_protocols_and_tracks_unknowns() {
        let mut history = PortHistory::new();
        history.record(&udp(1, "0.0.0.0").reuse_port());
        assert_eq!(history, PortHistory::new());
        history.record(&tcp(1, "0.0.0.0").unknown());
        assert_eq!(history.shortcut, Shortcut::Unknown);
        history.record(&tcp(2, "127.0.0.1").reuse_port());
        assert_eq!(history.shortcut, Shortcut::Unknown);
        history.record(&tcp(3, "127.0.0.1"));
        assert_eq!(history.shortcut, Shortcut::Off);
        history.record(&tcp(4, "127.0.0.1").reuse_port());
        history.record(&tcp(5, "127.0.0.1").reuse_port().owner(7));
        assert_eq!(
            history.shortcut,
            Shortcut::On {
                family: Family::Ipv4,
                end: Endpoint::V4(Ipv4Addr::LOCALHOST),
                uid: 7
            }
        );
    }

    #[test]
    fn coexist_reasons() {
        use CoexistReason as C;
        let mut other_ns = tcp(2, "127.0.0.1");
        other_ns.netns = 9;
        let mut other_port = tcp(2, "127.0.0.1");
        other_port.port = 1;
        let cases: Vec<(SocketFacts, SocketFacts, Option<CoexistReason>)> = vec![
            (tcp(1, "127.0.0.1"), other_ns, Some(C::DifferentNetns)),
            (
                tcp(1, "127.0.0.1"),
                udp(2, "127.0.0.1"),
                Some(C::DifferentProtocol),
            ),
            (tcp(1, "127.0.0.1"), other_port, Some(C::DifferentPort)),
            (
                tcp(1, "127.0.0.1"),
                tcp(2, "127.0.0.2"),
                Some(C::DifferentAddress),
            ),
            (tcp(1, "::1"), tcp(2, "fd00::1"), Some(C::DifferentAddress)),
            (
                tcp(1, "0.0.0.0"),
                tcp(2, "::").v6only(),
                Some(C::V6onlySplit),
            ),
            (
                tcp(1, "127.0.0.1"),
                tcp(2, "::1"),
                Some(C::DifferentFamilyNoOverlap),
            ),
            (
                tcp(1, "0.0.0.0").reuse_port().listening(),
                tcp(2, "0.0.0.0").reuse_port().listening(),
                Some(C::ReusePortGroup),
            ),
            (
                tcp(1, "127.0.0.1").time_wait().reuse_port().owner(5),
                tcp(2, "127.0.0.1").reuse_port(),
                Some(C::ReusePortGroup),
            ),
            (
                udp(1, "0.0.0.0").reuse_addr(),
                udp(2, "127.0.0.1").reuse_addr(),
                Some(C::UdpReuseAddr),
            ),
            (
                tcp(1, "0.0.0.0").reuse_addr().listening(),
                tcp(2, "127.0.0.1").reuse_addr(),
                Some(C::TcpReuseAddrNotListening),
            ),
            (
                tcp(1, "127.0.0.1").device(2),
                tcp(2, "127.0.0.1").device(3),
                Some(C::BoundToDifferentDevices),
            ),
            // Inconsistent: these cannot both hold the port.
            (tcp(1, "127.0.0.1"), tcp(2, "127.0.0.1"), None),
            (
                tcp(1, "127.0.0.1").reuse_addr().listening(),
                tcp(2, "127.0.0.1").reuse_addr().listening(),
                None,
            ),
            (
                tcp(1, "127.0.0.1").reuse_port(),
                tcp(2, "127.0.0.1").reuse_port().owner(1),
                None,
            ),
            (tcp(1, "::"), tcp(2, "0.0.0.0"), None),
            // Unknown options: the kernel let both in, so they were set.
            (
                tcp(1, "::").unknown(),
                tcp(2, "0.0.0.0"),
                Some(C::V6onlySplit),
            ),
            (
                udp(1, "127.0.0.1").unknown(),
                udp(2, "127.0.0.1").reuse_addr(),
                Some(C::UdpReuseAddr),
            ),
        ];
        for (a, b, want_reason) in cases {
            assert_eq!(why_coexist(&a, &b), want_reason, "{a:?} / {b:?}");
            assert_eq!(why_coexist(&b, &a), want_reason, "{b:?} / {a:?}");
        }
    }

    #[test]
    fn reasons_explain_themselves_and_serialize_in_snake_case() {
        let reasons = [
            R::SameAddress,
            R::WildcardCoversAddress,
            R::DualStackWildcardCoversIpv4,
            R::Ipv4BlocksDualStackWildcard,
            R::ReuseAddrButListening,
            R::ReusePortUidMismatch,
            R::ReusePortNotSetOnBoth,
            R::ReuseAddrNotSetOnBoth,
            R::TimeWaitNeedsReuseAddr,
        ];
        for reason in reasons {
            assert!(!reason.explanation().is_empty());
            assert!(!reason.explanation().ends_with('.'));
        }
        assert_eq!(
            serde_json::to_value(R::DualStackWildcardCoversIpv4).unwrap(),
            "dual_stack_wildcard_covers_ipv4"
        );
        assert_eq!(
            serde_json::to_value(CoexistReason::V6onlySplit).unwrap(),
            "v6only_split"
        );
        let verdict = can_bind(
            &[tcp(1, "127.0.0.1").listening()],
            &want(Protocol::Tcp, "127.0.0.1"),
        );
        let json = serde_json::to_value(&verdict).unwrap();
        assert_eq!(json["verdict"], "refused");
        assert_eq!(json["errno"], "EADDRINUSE");
        assert_eq!(json["blockers"][0]["why"], "same_address");
        assert_eq!(json["blockers"][0]["socket"]["cookie"], 1);
        assert_eq!(serde_json::to_value(Verdict::Ok).unwrap()["verdict"], "ok");
    }

    // Invariants over arbitrary inputs, known and unknown options alike.

    fn arb_option() -> impl Strategy<Value = Option<bool>> {
        prop_oneof![Just(None), Just(Some(false)), Just(Some(true))]
    }

    fn arb_options() -> impl Strategy<Value = ShareOptions> {
        (arb_option(), arb_option(), arb_option()).prop_map(|(reuse_addr, reuse_port, v6only)| {
            ShareOptions {
                reuse_addr,
                reuse_port,
                v6only,
            }
        })
    }

    fn arb_address() -> impl Strategy<Value = IpAddr> {
        prop::sample::select(vec![
            "0.0.0.0",
            "127.0.0.1",
            "127.0.0.2",
            "::",
            "::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "::ffff:0.0.0.0",
        ])
        .prop_map(|a| a.parse().unwrap())
    }

    fn arb_protocol() -> impl Strategy<Value = Protocol> {
        prop::sample::select(vec![
            Protocol::Tcp,
            Protocol::Udp,
            Protocol::UdpLite,
            Protocol::Sctp,
            Protocol::Mptcp,
        ])
    }

    fn arb_state() -> impl Strategy<Value = SockState> {
        prop::sample::select(vec![
            SockState::Listening,
            SockState::Bound,
            SockState::Connected,
            SockState::TimeWait,
        ])
    }

    fn arb_family() -> impl Strategy<Value = Family> {
        prop::sample::select(vec![Family::Ipv4, Family::Ipv6])
    }

    prop_compose! {
        fn arb_socket()(
            cookie in 0u64..6,
            netns in 1 as NetnsCookie..3,
            protocol in arb_protocol(),
            address in arb_address(),
            // Mostly the family the address belongs to, sometimes not.
            family in prop::option::weighted(0.1, arb_family()),
            port in prop::sample::select(vec![0u16, PORT, PORT + 1]),
            state in arb_state(),
            options in arb_options(),
            uid in prop::option::of(0u32..3),
            bound_dev_if in 0u32..3,
        ) -> SocketFacts {
            SocketFacts {
                cookie,
                netns,
                protocol,
                family: family.unwrap_or(family_of(address)),
                address,
                port,
                state,
                options,
                uid,
                bound_dev_if,
            }
        }
    }

    /// A socket whose options and owner are all known.
    fn arb_known_socket() -> impl Strategy<Value = SocketFacts> {
        (arb_socket(), any::<[bool; 3]>(), 0u32..3).prop_map(|(mut sock, [a, p, v], uid)| {
            sock.options = ShareOptions {
                reuse_addr: Some(a),
                reuse_port: Some(p),
                v6only: Some(v),
            };
            sock.uid = Some(uid);
            sock
        })
    }

    proptest! {
        #[test]
        fn never_panics(
            existing in prop::collection::vec(arb_socket(), 0..6),
            sock in arb_socket(),
            recorded in prop::collection::vec(arb_socket(), 0..4),
        ) {
            let mut history = PortHistory::new();
            for s in &recorded {
                history.record(s);
            }
            let req = request_of(&sock);
            let _ = predict_bind(Some(&history), &existing, &req);
            let _ = predict_bind(None, &existing, &req);
            let _ = predict_listen(Some(&history), &existing, &sock);
            let _ = can_listen(&existing, &sock);
            for other in &existing {
                let _ = why_coexist(other, &sock);
            }
        }

        #[test]
        fn blockers_share_netns_port_space_and_port(
            existing in prop::collection::vec(arb_socket(), 0..6),
            sock in arb_socket(),
        ) {
            let req = request_of(&sock);
            // A bind request has no device yet; a listening socket has its own.
            for (verdict, dev) in [(can_bind(&existing, &req), 0), (can_listen(&existing, &sock), sock.bound_dev_if)] {
                for b in verdict.blockers() {
                    prop_assert_eq!(b.socket.netns, req.netns);
                    prop_assert_eq!(Space::of(b.socket.protocol), Space::of(req.protocol));
                    prop_assert_eq!(b.socket.port, req.port);
                    prop_assert!(devices_compatible(b.socket.bound_dev_if, dev));
                }
                if let Verdict::Refused { errno, blockers, invalid } = &verdict {
                    prop_assert_eq!(invalid.is_some(), blockers.is_empty());
                    prop_assert_eq!(*errno == Errno::EADDRINUSE, invalid.is_none());
                }
            }
        }

        #[test]
        fn why_coexist_is_symmetric(a in arb_socket(), b in arb_socket()) {
            prop_assert_eq!(why_coexist(&a, &b), why_coexist(&b, &a));
        }

        /// With one socket holding the port and everything known, a bind
        /// succeeds exactly when the two could coexist (bind order is the
        /// only history that exists then).
        #[test]
        fn one_holder_binds_iff_coexists(old in arb_known_socket(), new in arb_known_socket()) {
            // A listener only coexists with what bound before it listened.
            prop_assume!(old.state != SockState::Listening);
            prop_assume!(new.port != 0 && Space::of(new.protocol) != Space::Sctp);
            let req = request_of(&new);
            prop_assume!(invalid_bind(&req, Fill::Unset).is_none());
            let mut as_bound = new.clone();
            as_bound.state = SockState::Bound;
            as_bound.bound_dev_if = 0;
            let prediction = predict_bind(Some(&PortHistory::new()), std::slice::from_ref(&old), &req);
            prop_assert!(prediction.confident);
            prop_assert_eq!(
                prediction.verdict.is_ok(),
                why_coexist(&old, &as_bound).is_some(),
                "{:?} then {:?}: {:?}", old, req, prediction
            );
        }

        /// The order of TCP holders never matters without the shortcut.
        #[test]
        fn tcp_order_does_not_matter(
            existing in prop::collection::vec(arb_socket(), 0..6),
            sock in arb_socket(),
        ) {
            let req = request_of(&sock);
            prop_assume!(Space::of(req.protocol) == Space::Tcp);
            let mut reversed = existing.clone();
            reversed.reverse();
            let history = PortHistory::new();
            let a = predict_bind(Some(&history), &existing, &req);
            let b = predict_bind(Some(&history), &reversed, &req);
            prop_assert_eq!(a.verdict.errno(), b.verdict.errno());
            prop_assert_eq!(a.verdict.blockers().len(), b.verdict.blockers().len());
        }
    }
}
