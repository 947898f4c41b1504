//! The kernel's rules for sharing a local port, as pure logic: would this bind
//! (or listen) succeed given the sockets that already hold the port, and if
//! not, which of them block it and why; and for two sockets that both hold a
//! port, which rule lets them. No I/O: unit-tested without root, and checked
//! against the real kernel by `tests/predictor.rs`.
//!
//! # The rules (Linux 6.18, TCP and UDP, IPv4 and IPv6)
//!
//! The code follows the kernel's split: `address.rs` compares addresses
//! (`inet_rcv_saddr_equal`), `tcp.rs` holds TCP's conflict check and its
//! bind-bucket memory, `udp.rs` UDP's walk; this module puts them together.
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
//!   Linux 6.1's TCP does not always see `::ffff:0.0.0.0` as the wildcard
//!   ([`MappedAny`], probed at start by [`crate::kernel_probe`]):
//!   - [`MappedAny::Wildcard`] (5.10, 6.12, 6.18): as above.
//!   - [`MappedAny::Quirk`] (measured on Debian's 6.1.176): an IPv6 socket
//!     binding or listening on a specific mapped address `::ffff:a.b.c.d`
//!     does not see IPv6 sockets on `::ffff:0.0.0.0`; every other check
//!     does. While one holds the port, or on a port where one has been since
//!     its bucket was made, whether that check sees the other wildcards is
//!     not known (cases were seen where it did not): such answers are not
//!     confident.
//!   - [`MappedAny::Unknown`]: an answer is confident only when both give it.
//! - **No sharing option lets them through**:
//!   - TCP (`inet_bind_conflict` as `inet_csk_get_port` calls it for an
//!     explicit port, `relax` and `reuseport_ok` set): not when both set
//!     `SO_REUSEADDR` and the existing socket is not listening; not when both
//!     set `SO_REUSEPORT` and the existing one is in TIME_WAIT or has the same
//!     owner uid.
//!   - UDP (`udp_lib_get_port`, `udp_lib_lport_inuse`): not when both set
//!     `SO_REUSEADDR`; not when both set `SO_REUSEPORT` with the same owner.
//!     Kernels differ in how they walk the port's list of sockets
//!     ([`UdpWalk`], probed at start by [`crate::kernel_probe`]), so the
//!     walk is an input ([`KernelRules`]):
//!     - [`UdpWalk::FirstMatch`] (upstream Linux; measured on
//!       6.18.44-fc-v657): the kernel stops at the first overlapping socket
//!       that both-`SO_REUSEADDR` does not skip: a `SO_REUSEPORT` match
//!       there lets the bind through even when a socket further down would
//!       refuse it. The list has the newest socket first, except that IPv6
//!       sockets with `SO_REUSEPORT` are appended at its end
//!       (`sk_add_node_rcu`). **So `existing` must be in bind order, oldest
//!       first.**
//!     - [`UdpWalk::EveryMatch`] (measured on 6.18.44-fc-v1252): every such
//!       socket must allow the bind; the order does not matter.
//!     - [`UdpWalk::Unknown`]: an answer is confident only when both walks
//!       give it.
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
//! - Which UDP walk the kernel takes, when it was not probed
//!   ([`UdpWalk::Unknown`]): the stricter [`UdpWalk::EveryMatch`] answer is
//!   reported, confident only when [`UdpWalk::FirstMatch`] agrees. Likewise
//!   how TCP treats `::ffff:0.0.0.0` ([`MappedAny::Unknown`]): the
//!   [`MappedAny::Wildcard`] answer, confident only when
//!   [`MappedAny::Quirk`] agrees.
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

mod address;
mod tcp;
#[cfg(test)]
mod tests;
mod udp;

use std::net::IpAddr;

use serde::Serialize;

pub(crate) use self::address::{Endpoint, endpoint, is_wildcard, overlap};
use self::{
    address::split_reason,
    tcp::{MappedCheck, shortcut_applies, tcp_blocker},
    udp::udp_blockers,
};
pub use self::{
    tcp::{MappedAny, PortHistory},
    udp::UdpWalk,
};
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
    /// documentation), or a UDP walk or TCP treatment of `::ffff:0.0.0.0`
    /// that was not probed and matters here.
    pub confident: bool,
    /// Whether the two UDP walks kernels take ([`UdpWalk::KNOWN`]) answer
    /// differently here, so that the answer rests on
    /// [`KernelRules::udp_walk`]. Always false outside UDP.
    pub udp_walk_decides: bool,
    /// Whether the two ways kernels treat a TCP socket on `::ffff:0.0.0.0`
    /// ([`MappedAny::KNOWN`]) answer differently here, so that the answer
    /// rests on [`KernelRules::mapped_any`]. Always false outside TCP.
    pub mapped_any_decides: bool,
}

/// What the running kernel does where kernels are known to differ, as
/// [`crate::kernel_probe`] found it at start. The default knows nothing:
/// answers that depend on it are not confident.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize)]
pub struct KernelRules {
    /// How UDP binds are judged against the port's sockets.
    pub udp_walk: UdpWalk,
    /// Whether TCP sees `::ffff:0.0.0.0` as the IPv4 wildcard everywhere.
    pub mapped_any: MappedAny,
}

impl KernelRules {
    /// Nothing probed.
    pub const UNKNOWN: KernelRules = KernelRules {
        udp_walk: UdpWalk::Unknown,
        mapped_any: MappedAny::Unknown,
    };

    /// The kernel whose answer is reported: the known behaviours, and the
    /// stricter choice where something is unknown.
    fn reported(self) -> Judged {
        Judged {
            udp_walk: self.udp_walk.reported(),
            mapped_check: self.mapped_any.reported_check(),
        }
    }

    /// Every kernel these rules may be, varying only what `space` depends
    /// on (the rest as [`KernelRules::reported`]).
    fn possible(self, space: Space) -> Vec<Judged> {
        let reported = self.reported();
        match space {
            Space::Udp | Space::UdpLite => self
                .udp_walk
                .possible()
                .iter()
                .map(|&udp_walk| Judged {
                    udp_walk,
                    ..reported
                })
                .collect(),
            Space::Tcp => self
                .mapped_any
                .checks()
                .iter()
                .map(|&mapped_check| Judged {
                    mapped_check,
                    ..reported
                })
                .collect(),
            Space::Sctp => vec![reported],
        }
    }
}

/// One kernel, as completely as the rules judge by it: [`KernelRules`]
/// with nothing unknown, and TCP's check of a mapped address spelt out
/// ([`MappedCheck`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Judged {
    udp_walk: UdpWalk,
    mapped_check: MappedCheck,
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

/// Would `req` bind, given the sockets in `existing` (any port, protocol and
/// namespace: the ones that matter are picked out)? `existing` in bind order,
/// oldest first. Without a [`PortHistory`]; see [`predict_bind`].
pub fn can_bind(kernel: KernelRules, existing: &[SocketFacts], req: &BindRequest) -> Verdict {
    predict_bind(kernel, None, existing, req).verdict
}

/// Would `listen` on `sock` (bound, not yet listening) succeed, given the
/// other sockets in `existing` (`sock` itself may be among them)? Without a
/// [`PortHistory`]; see [`predict_listen`].
pub fn can_listen(kernel: KernelRules, existing: &[SocketFacts], sock: &SocketFacts) -> Verdict {
    predict_listen(kernel, None, existing, sock).verdict
}

/// [`can_bind`] with the port's [`PortHistory`] when there is one, and
/// whether the answer is certain.
pub fn predict_bind(
    kernel: KernelRules,
    history: Option<&PortHistory>,
    existing: &[SocketFacts],
    req: &BindRequest,
) -> Prediction {
    predict_bind_in(kernel, history, existing, req, true)
}

/// [`predict_bind`] for sockets whose bind order is not known, as in the
/// daemon's map (`existing` in cookie order, which is not bind order): an
/// answer that hangs on the order is not confident.
pub fn predict_bind_unordered(
    kernel: KernelRules,
    history: Option<&PortHistory>,
    existing: &[SocketFacts],
    req: &BindRequest,
) -> Prediction {
    predict_bind_in(kernel, history, existing, req, false)
}

fn predict_bind_in(
    kernel: KernelRules,
    history: Option<&PortHistory>,
    existing: &[SocketFacts],
    req: &BindRequest,
    ordered: bool,
) -> Prediction {
    let space = Space::of(req.protocol);
    let holders: Vec<&SocketFacts> = existing
        .iter()
        .filter(|f| f.netns == req.netns && Space::of(f.protocol) == space && f.port == req.port)
        .collect();
    let judge = |fill, rules| {
        if let Some(invalid) = invalid_bind(req, fill) {
            return Verdict::invalid(invalid);
        }
        if req.port == 0 {
            return Verdict::Ok;
        }
        let new = View::of_request(req, fill);
        judge(space, rules, history, &new, &holders, fill)
    };
    // UDP's answer may hang on the list's order or on which hash the
    // kernel walks, neither of which the model sees (udp::settled).
    let udp_settled = !space.is_udp()
        || kernel.possible(space).iter().all(|rules| {
            [Fill::Unset, Fill::Set].into_iter().all(|fill| {
                let new = View::of_request(req, fill);
                udp::settled(rules.udp_walk, &new, &holders, fill, ordered)
            })
        });
    let knowable = req.port != 0 && space != Space::Sctp && udp_settled;
    predict(space, kernel, knowable, holders.len(), judge)
}

/// [`can_listen`] with the port's [`PortHistory`] when there is one, and
/// whether the answer is certain.
pub fn predict_listen(
    kernel: KernelRules,
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
    let judge = |fill, rules| {
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
        judge(space, rules, history, &new, &holders, fill)
    };
    let knowable = space != Space::Sctp && sock.port != 0;
    predict(space, kernel, knowable, holders.len(), judge)
}

/// The reported answer (unknowns unset, the rules
/// [`KernelRules::reported`]), confident when `knowable` and the same
/// whatever the unknowns are (both fills, every kernel the rules may be).
fn predict(
    space: Space,
    kernel: KernelRules,
    knowable: bool,
    holders: usize,
    judge: impl Fn(Fill, Judged) -> Verdict,
) -> Prediction {
    let reported = kernel.reported();
    let verdict = judge(Fill::Unset, reported);
    let confident = knowable
        && kernel.possible(space).into_iter().all(|rules| {
            [Fill::Unset, Fill::Set]
                .into_iter()
                .all(|fill| verdict.same_answer(&judge(fill, rules)))
        });
    // Whether the known kinds of kernel differ here, whichever this one is.
    let differ = |possible: KernelRules| {
        let answers: Vec<Verdict> = possible
            .possible(space)
            .into_iter()
            .map(|rules| judge(Fill::Unset, rules))
            .collect();
        answers.windows(2).any(|w| !w[0].same_answer(&w[1]))
    };
    let udp_walk_decides = space.is_udp()
        && differ(KernelRules {
            udp_walk: UdpWalk::Unknown,
            ..kernel
        });
    let mapped_any_decides = space == Space::Tcp
        && differ(KernelRules {
            mapped_any: MappedAny::Unknown,
            ..kernel
        });
    // 6.1's quirk was measured with one other socket on the port. With
    // more, its bind hash gave answers no rule here explains (a listen on
    // ::ffff:127.0.0.1 refused beside a listener on ::ffff:0.0.0.0 and a
    // bound 0.0.0.0, found by the predictor in `cargo xtask vm`).
    let beyond_measured =
        kernel.mapped_any == MappedAny::Quirk && mapped_any_decides && holders > 1;
    Prediction {
        verdict,
        confident: confident && !beyond_measured,
        udp_walk_decides,
        mapped_any_decides,
    }
}

/// Why `a` and `b`, which both hold a port, may do so: a reason that holds
/// for the pair alone, whatever else holds the port. `None` if there is none:
/// an inconsistent model, or one of the history effects the module
/// documentation describes (TCP's `SO_REUSEPORT` shortcut;
/// [`UdpWalk::FirstMatch`], under which a socket can join past one it does
/// not share with when its walk stops at an earlier one;
/// [`MappedAny::Quirk`], under which an IPv6 TCP socket on `::ffff:a.b.c.d`
/// joins one on `::ffff:0.0.0.0` that would have refused it the other way
/// round). Under
/// [`UdpWalk::EveryMatch`] every UDP bind is checked against each holder
/// alone, so two UDP sockets that hold a port always have a reason here.
/// Unknown options are first taken as not set and, if that finds no reason,
/// as set: the kernel let both in, so that is the likelier story. Symmetric
/// in `a` and `b`.
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

/// One socket as the rules see it, unknowns filled in.
#[derive(Clone, Copy, Debug)]
struct View {
    family: Family,
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
            family: facts.family,
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
            family: req.family,
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
    rules: Judged,
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
            Verdict::conflict(udp_blockers(rules.udp_walk, new, holders, fill))
        }
        Space::Tcp | Space::Sctp => {
            if space == Space::Tcp && shortcut_applies(history, new, fill) {
                return Verdict::Ok;
            }
            // SCTP is only judged by TCP's rules, not its quirks.
            let check = match space {
                Space::Tcp => rules.mapped_check.given(history),
                _ => MappedCheck::Everyone,
            };
            Verdict::conflict(
                holders
                    .iter()
                    .filter_map(|old| tcp_blocker(check, new, old, holders, fill))
                    .collect(),
            )
        }
    }
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
