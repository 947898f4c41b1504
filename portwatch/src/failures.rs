//! Failed binds and listens, each with what blocked it. Pure logic: the
//! sockets to judge against are an input (the map's, plus whatever sock_diag
//! reported at failure time for sockets the map does not keep).

use std::{collections::VecDeque, net::IpAddr, time::SystemTime};

use serde::Serialize;
use utoipa::ToSchema;

use crate::{
    event::{Errno, EventKind, PortEvent},
    map::{Holder, Observed, PortMap},
    rules::{self, KernelRules, MappedAny, Prediction, UdpWalk, Verdict},
    snapshot::{addresses::LocalAddresses, owners::Place, workload::Workload},
    socket::{BindRequest, SockState, SocketFacts},
};

/// A socket that blocked a bind, as users need to see it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Blocker {
    /// The blocking socket.
    #[serde(flatten)]
    pub facts: SocketFacts,
    /// `address:port` as users write it.
    pub endpoint: String,
    /// What the socket is: `listener`, `bound socket (not listening)`,
    /// `connected socket`, `TIME_WAIT`.
    pub what: &'static str,
    /// Processes holding it, with their unit or container when known.
    pub holders: Vec<BlockerHolder>,
    /// Why the kernel says it conflicts, in one sentence.
    pub reason: String,
}

/// A process holding a blocking socket.
// The API serves this type as it is (`BlockerView::holders`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, ToSchema)]
pub struct BlockerHolder {
    pub pid: u32,
    pub process: String,
    pub unit: Option<String>,
    pub container: Option<String>,
    /// The container's and pod's names, where known.
    #[serde(flatten)]
    pub workload: Workload,
}

/// One failed bind or listen.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Failure {
    pub time: SystemTime,
    /// The failed attempt as the kernel reported it.
    pub event: PortEvent,
    /// What the conflict rules name as the cause; empty when the failure is
    /// not a port conflict (EACCES, EADDRNOTAVAIL) or nothing matched.
    pub blocked_by: Vec<Blocker>,
    /// Where the failing process lived (cgroup, systemd unit, container),
    /// read when the event arrived; empty when it had already exited.
    pub place: Place,
    /// For a connect that found no local port: what the ephemeral listing
    /// that followed it (one runs at once) said of its destination, in a
    /// sentence; `None` until then.
    pub cause: Option<String>,
}

impl Failure {
    /// A bind to port 0 (or a listen that had to pick a port) that found no
    /// free port in the ephemeral range: the range is full, rather than one
    /// socket in the way.
    pub fn exhausted_range(&self) -> bool {
        let ev = &self.event;
        is_conflict(ev) && ev.port == 0 && ev.bound_port.unwrap_or(0) == 0
    }
}

/// The request a failed bind event describes.
pub fn request_of(event: &PortEvent) -> BindRequest {
    BindRequest {
        netns: event.netns.unwrap_or(0),
        protocol: event.protocol,
        family: event.family,
        address: event.address,
        port: event.port,
        options: event.options.into(),
        uid: event.sock_uid.unwrap_or(event.uid),
    }
}

/// Whether a failure is a port conflict worth attributing.
fn is_conflict(event: &PortEvent) -> bool {
    matches!(event.kind, EventKind::BindFailed | EventKind::ListenFailed)
        && event.errno == Some(Errno::EADDRINUSE)
}

/// Names the sockets that blocked `event`, judged against what the map holds
/// on that port (in its protocol's port space: an MPTCP listener blocks a TCP
/// bind).
pub fn attribute(kernel: KernelRules, event: &PortEvent, map: &PortMap) -> Vec<Blocker> {
    if !is_conflict(event) {
        return Vec::new();
    }
    let request = request_of(event);
    let existing = map.facts_on(request.netns, request.protocol, request.port);
    attribute_against(kernel, event, existing, map)
}

/// Whether the map alone may not tell the whole story: nothing in it
/// explains the conflict, or a blocker is a bound TCP socket that may have
/// connected since (the map does not follow connections). sock_diag at
/// failure time answers then.
pub fn needs_diag(event: &PortEvent, blocked_by: &[Blocker]) -> bool {
    is_conflict(event)
        && (blocked_by.is_empty() || blocked_by.iter().any(|b| b.facts.state == SockState::Bound))
}

/// Names the sockets that blocked `event` among `existing` (the sockets on
/// that netns, port space and port: the map's, or sock_diag's at failure time,
/// TIME_WAIT and connections included) under the `kernel`'s rules. `map`
/// names their holders. When the kernel's UDP walk was not probed, the
/// stricter walk names every socket either walk could have stopped at.
pub fn attribute_against(
    kernel: KernelRules,
    event: &PortEvent,
    existing: Vec<SocketFacts>,
    map: &PortMap,
) -> Vec<Blocker> {
    if !is_conflict(event) {
        return Vec::new();
    }
    let prediction = replay(kernel, event, existing, map);
    let walk = if prediction.udp_walk_decides {
        Some(udp_walk_note(kernel.udp_walk))
    } else if prediction.mapped_any_decides {
        Some(mapped_any_note(kernel.mapped_any))
    } else {
        None
    };
    match prediction.verdict {
        Verdict::Ok => Vec::new(),
        Verdict::Refused { blockers, .. } => blockers
            .into_iter()
            .map(|b| {
                let reason = match &walk {
                    Some(note) => format!("{} ({note})", b.why.explanation()),
                    None => b.why.explanation().to_owned(),
                };
                describe(b.socket, reason, map)
            })
            .collect(),
    }
}

/// What the conflict rules answer for the failed bind or listen `event`
/// among `existing` (the failing socket itself left out).
fn replay(
    kernel: KernelRules,
    event: &PortEvent,
    mut existing: Vec<SocketFacts>,
    map: &PortMap,
) -> Prediction {
    let request = request_of(event);
    existing.retain(|f| f.cookie == 0 || Some(f.cookie) != event.cookie);
    // The kernel walks sockets in bind order; cookies grow in that order.
    existing.sort_by_key(|f| f.cookie);
    match event.kind {
        EventKind::ListenFailed => {
            let me = SocketFacts {
                cookie: event.cookie.unwrap_or(0),
                netns: request.netns,
                protocol: request.protocol,
                family: request.family,
                address: request.address,
                port: event.bound_port.unwrap_or(request.port),
                state: SockState::Bound,
                options: map
                    .get(event.cookie.unwrap_or(0))
                    .map_or(request.options, |e| e.facts.options),
                uid: event.sock_uid,
                bound_dev_if: 0,
            };
            rules::predict_listen(kernel, None, &existing, &me)
        }
        _ => rules::predict_bind_unordered(kernel, None, &existing, &request),
    }
}

/// The errno a failed bind or listen returned, as far as replaying the
/// kernel's checks against `existing` (the sockets on its netns, port space
/// and port: the map's, or sock_diag's at failure time) and `map` can tell.
/// For failures no outcome hook reported, and to measure the replay against
/// the errnos the kernel did report.
///
/// Replayed, in the kernel's order (`__inet_bind`, `inet_csk_listen_start`):
/// - a request that fails by itself (an IPv4-mapped address on an
///   `IPV6_V6ONLY` socket, `listen` on UDP): the rules' invalid requests;
/// - a bind of an address the namespace does not have
///   (`early.address_unavailable`, from [`address_unavailable`]):
///   `EADDRNOTAVAIL`;
/// - a bind the privileged-port check refuses (`early.privileged`, from
///   [`refused_as_privileged`]): `EACCES`;
/// - a bind on a socket the map already holds as bound: `EINVAL`, checked
///   before any conflict;
/// - a conflict with a socket on the port: `EADDRINUSE`;
/// - a bind to port 0 of an address every namespace has (the wildcard,
///   loopback) that fails otherwise: no free port in the range,
///   `EADDRINUSE`;
/// - a listen: it failed after its LISTEN transition (that is when
///   portwatch sees one), where only the port check can fail it:
///   `EADDRINUSE` (or an allocation failure, which is not replayed).
///
/// `None` when none of them explains it. Not replayed: a refusal by another
/// tool's cgroup program.
pub fn infer_errno(
    kernel: KernelRules,
    event: &PortEvent,
    existing: Vec<SocketFacts>,
    map: &PortMap,
    early: EarlyChecks,
) -> Option<Errno> {
    let invalid = |verdict: &Verdict| {
        matches!(
            verdict,
            Verdict::Refused {
                invalid: Some(_),
                ..
            }
        )
    };
    match event.kind {
        EventKind::BindFailed => {
            let prediction = replay(kernel, event, existing, map);
            if !invalid(&prediction.verdict) {
                if early.address_unavailable {
                    return Some(Errno(libc::EADDRNOTAVAIL));
                }
                if early.privileged {
                    return Some(Errno::EACCES);
                }
            }
            let already_bound = event.cookie.is_some_and(|c| map.get(c).is_some());
            if already_bound && !invalid(&prediction.verdict) {
                return Some(Errno::EINVAL);
            }
            let surely_local = event.address.is_unspecified() || event.address.is_loopback();
            match prediction.verdict.errno() {
                None if event.port == 0 && surely_local => Some(Errno::EADDRINUSE),
                errno => errno,
            }
        }
        EventKind::ListenFailed => Some(
            replay(kernel, event, existing, map)
                .verdict
                .errno()
                .unwrap_or(Errno::EADDRINUSE),
        ),
        _ => None,
    }
}

/// What the kernel's first checks of a bind (`__inet_bind`,
/// `__inet6_bind`: the address, then the port's privilege; before the
/// socket and the port's holders are looked at) refused, as far as the
/// daemon can tell: each is `true` only when known.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EarlyChecks {
    /// The namespace does not have the address: `EADDRNOTAVAIL`.
    pub address_unavailable: bool,
    /// A privileged port without `CAP_NET_BIND_SERVICE`: `EACCES`.
    pub privileged: bool,
}

/// Whether the kernel's address check refused `event`'s bind: a specific
/// address none of the namespace's interfaces has (`local`, from the
/// latest listing of the namespace), on a socket known to have neither
/// IP_FREEBIND nor IP_TRANSPARENT, where `ip_nonlocal_bind` is off. An
/// IPv4-mapped address on an IPv6 socket is judged as IPv4 under either
/// family's `ip_nonlocal_bind`. `false` where anything is unknown.
pub fn address_unavailable(event: &PortEvent, local: Option<&LocalAddresses>) -> bool {
    let Some(local) = local else {
        return false;
    };
    let options = event.options;
    if options.freebind != Some(false) || options.transparent != Some(false) {
        return false;
    }
    match event.address {
        IpAddr::V4(v4) => !(local.nonlocal_v4 || v4.is_unspecified() || local.has_v4(v4)),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => {
                !(local.nonlocal_v4 || local.nonlocal_v6 || v4.is_unspecified() || local.has_v4(v4))
            }
            None => {
                !(local.nonlocal_v6
                    || v6.is_unspecified()
                    || v6.is_multicast()
                    || local.addresses.contains(&IpAddr::V6(v6)))
            }
        },
    }
}

/// `CAP_NET_BIND_SERVICE`, as a bit of a `CapEff:` mask.
const CAP_NET_BIND_SERVICE: u32 = 10;

/// Whether the kernel's privileged-port check (`__inet_bind`, after the
/// address checks and before the socket and the port's holders are looked
/// at) refused a bind to `port`: a port below the namespace's
/// `net.ipv4.ip_unprivileged_port_start`, asked for by a thread whose
/// effective capabilities (`cap_eff`, its `CapEff:` mask) lack
/// `CAP_NET_BIND_SERVICE`. `false` where either is unknown, and where the
/// thread has the capability: the kernel asks for it in the namespace's
/// user namespace, which for a thread in another one may still refuse.
pub fn refused_as_privileged(
    port: u16,
    unprivileged_start: Option<u16>,
    cap_eff: Option<u64>,
) -> bool {
    privileged_port(port, unprivileged_start)
        && cap_eff.is_some_and(|caps| caps & (1 << CAP_NET_BIND_SERVICE) == 0)
}

/// Whether the kernel asks for CAP_NET_BIND_SERVICE to bind `port`: a
/// port other than 0 below `net.ipv4.ip_unprivileged_port_start` (`false`
/// where that is unknown).
pub fn privileged_port(port: u16, unprivileged_start: Option<u16>) -> bool {
    unprivileged_start.is_some_and(|start| port != 0 && port < start)
}

/// Whether a bind no outcome hook completed most likely succeeded: with
/// IP_BIND_ADDRESS_NO_PORT, a bind to port 0 only sets the address, and
/// the kernel neither picks a port nor runs post_bind, which is what
/// reports a success where no outcome hook runs.
pub fn bound_without_a_port(event: &PortEvent) -> bool {
    event.errno_unknown()
        && event.kind == EventKind::BindFailed
        && event.port == 0
        && event.options.bind_address_no_port == Some(true)
}

/// How a replayed errno compared with the one the kernel reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Agreement {
    /// The replay named the kernel's errno.
    Agree,
    /// The replay named another errno.
    Disagree,
    /// The replay could not name one.
    Undecided,
}

impl Agreement {
    pub const ALL: [Agreement; 3] = [Self::Agree, Self::Disagree, Self::Undecided];

    /// Its metric label.
    pub fn name(self) -> &'static str {
        match self {
            Self::Agree => "agree",
            Self::Disagree => "disagree",
            Self::Undecided => "undecided",
        }
    }

    /// `inferred` against the errno the kernel reported.
    pub fn of(inferred: Option<Errno>, reported: Errno) -> Agreement {
        match inferred {
            Some(errno) if errno == reported => Self::Agree,
            Some(_) => Self::Disagree,
            None => Self::Undecided,
        }
    }
}

/// Why a UDP blocker counts only on some kernels, for its reason.
fn udp_walk_note(walk: UdpWalk) -> String {
    match walk {
        UdpWalk::Unknown => "a kernel that stops at the first overlapping UDP socket might have let the bind through; how this one walks them was not probed".to_owned(),
        known => format!(
            "this kernel {} (udp_walk = {known}, probed at start); a kernel that walks otherwise would have answered differently",
            known.description()
        ),
    }
}

/// Why a TCP blocker on `::ffff:0.0.0.0` counts only on some kernels, for
/// its reason.
fn mapped_any_note(mapped_any: MappedAny) -> String {
    match mapped_any {
        MappedAny::Unknown => "Linux 6.1 would have let an IPv6 socket bind this IPv4-mapped address past a socket on ::ffff:0.0.0.0; how this kernel treats it was not probed".to_owned(),
        known => format!(
            "this kernel {} (mapped_any = {known}, probed at start); a kernel that treats it otherwise would have answered differently",
            known.description()
        ),
    }
}

/// The holders a snapshot found for a socket the map does not keep.
pub fn holders_of(seen: &Observed) -> Vec<BlockerHolder> {
    blocker_holders(&seen.holders, &seen.place)
}

/// `facts` as a blocker, for the `reason` the rules gave, with its holders
/// from `map` (none for TIME_WAIT, which has no socket).
pub fn describe(facts: SocketFacts, reason: impl Into<String>, map: &PortMap) -> Blocker {
    let holders = map
        .get(facts.cookie)
        .filter(|_| facts.cookie != 0)
        .map(|e| blocker_holders(&e.holders, &e.place))
        .unwrap_or_default();
    Blocker {
        endpoint: crate::event::endpoint(facts.address, facts.port),
        what: what(facts.state),
        facts,
        holders,
        reason: reason.into(),
    }
}

/// What a socket in `state` is, for people.
fn what(state: SockState) -> &'static str {
    match state {
        SockState::Listening => "listener",
        SockState::Bound => "bound socket (not listening)",
        SockState::Connected => "connected socket",
        SockState::TimeWait => "TIME_WAIT",
    }
}

/// `holders` of a socket whose owner lives in `place`.
fn blocker_holders(holders: &[Holder], place: &Place) -> Vec<BlockerHolder> {
    holders
        .iter()
        .map(|h| BlockerHolder {
            pid: h.pid,
            process: h.process.clone(),
            unit: place.unit.clone(),
            container: place.container.clone(),
            workload: place.workload.clone(),
        })
        .collect()
}

/// The most recent failures, bounded.
#[derive(Debug)]
pub struct FailureLog {
    entries: VecDeque<Failure>,
    capacity: usize,
}

impl FailureLog {
    pub fn new(capacity: usize) -> FailureLog {
        FailureLog {
            entries: VecDeque::with_capacity(capacity.min(4096)),
            capacity: capacity.max(1),
        }
    }

    pub fn push(&mut self, failure: Failure) {
        if self.entries.len() == self.capacity {
            self.entries.pop_front();
        }
        self.entries.push_back(failure);
    }

    /// Newest first.
    pub fn newest(&self) -> impl Iterator<Item = &Failure> {
        self.entries.iter().rev()
    }

    /// Newest first, to amend.
    pub fn newest_mut(&mut self) -> impl Iterator<Item = &mut Failure> {
        self.entries.iter_mut().rev()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use super::*;
    use crate::event::{ErrnoSource, Protocol};

    const ANY: IpAddr = IpAddr::V4(Ipv4Addr::UNSPECIFIED);

    /// A map with one `protocol` listener on 0.0.0.0:8000 (cookie 1).
    fn listening(protocol: Protocol) -> PortMap {
        let mut map = PortMap::default();
        for kind in [EventKind::Bind, EventKind::Listen] {
            let event = PortEvent::example(kind, protocol, ANY, 8000, 1);
            map.apply(&event, SystemTime::UNIX_EPOCH);
        }
        map
    }

    fn blockers(event: &PortEvent, map: &PortMap) -> Vec<u64> {
        attribute(KernelRules::UNKNOWN, event, map)
            .iter()
            .map(|b| b.facts.cookie)
            .collect()
    }

    #[test]
    fn tcp_and_mptcp_block_each_other() {
        let tcp = PortEvent::example(EventKind::BindFailed, Protocol::Tcp, ANY, 8000, 2);
        let mptcp = PortEvent {
            protocol: Protocol::Mptcp,
            ..tcp.clone()
        };
        assert_eq!(blockers(&tcp, &listening(Protocol::Mptcp)), [1]);
        assert_eq!(blockers(&mptcp, &listening(Protocol::Tcp)), [1]);
        let blocker = &attribute(KernelRules::UNKNOWN, &tcp, &listening(Protocol::Mptcp))[0];
        assert_eq!(
            (blocker.what, blocker.endpoint.as_str()),
            ("listener", "0.0.0.0:8000")
        );
        assert_eq!(blocker.holders.len(), 1);
    }

    /// `event` as no outcome hook reported it: errno unknown.
    fn unresolved(event: PortEvent) -> PortEvent {
        PortEvent {
            errno: Some(Errno::UNKNOWN),
            source: crate::event::Source::Unresolved,
            ..event
        }
    }

    fn inferred(event: &PortEvent, map: &PortMap) -> Option<Errno> {
        let request = request_of(event);
        let existing = map.facts_on(request.netns, request.protocol, request.port);
        infer_errno(
            KernelRules::UNKNOWN,
            event,
            existing,
            map,
            EarlyChecks::default(),
        )
    }

    const PRIVILEGED: EarlyChecks = EarlyChecks {
        address_unavailable: false,
        privileged: true,
    };

    #[test]
    fn an_address_the_namespace_lacks_is_eaddrnotavail_before_the_privilege() {
        let local = LocalAddresses {
            addresses: vec!["10.0.0.5".parse().unwrap(), "2001:db8::5".parse().unwrap()],
            loopback_prefixes: vec![("127.0.0.1".parse().unwrap(), 8)],
            ..LocalAddresses::default()
        };
        let plain = crate::event::Options {
            freebind: Some(false),
            transparent: Some(false),
            ..crate::event::Options::default()
        };
        let bind = |address: &str| PortEvent {
            address: address.parse().unwrap(),
            options: plain,
            ..PortEvent::example(EventKind::BindFailed, Protocol::Tcp, ANY, 80, 7)
        };
        for absent in ["192.0.2.1", "2001:db8::6", "::ffff:192.0.2.1"] {
            assert!(address_unavailable(&bind(absent), Some(&local)), "{absent}");
        }
        for present in [
            "10.0.0.5",
            "127.0.0.53",
            "0.0.0.0",
            "::",
            "2001:db8::5",
            "ff02::1",
            "224.0.0.1",
        ] {
            assert!(
                !address_unavailable(&bind(present), Some(&local)),
                "{present}"
            );
        }
        // Unknown: no listing, options unknown or set, nonlocal binds on.
        assert!(!address_unavailable(&bind("192.0.2.1"), None));
        let freebind = PortEvent {
            options: crate::event::Options {
                freebind: Some(true),
                ..plain
            },
            ..bind("192.0.2.1")
        };
        assert!(!address_unavailable(&freebind, Some(&local)));
        let unknown = PortEvent {
            options: crate::event::Options::default(),
            ..bind("192.0.2.1")
        };
        assert!(!address_unavailable(&unknown, Some(&local)));
        let nonlocal = LocalAddresses {
            nonlocal_v4: true,
            ..local.clone()
        };
        assert!(!address_unavailable(&bind("192.0.2.1"), Some(&nonlocal)));
        assert!(address_unavailable(&bind("2001:db8::6"), Some(&nonlocal)));
        // First of the early checks, even on a taken port.
        let map = listening(Protocol::Tcp);
        let event = unresolved(PortEvent {
            port: 8000,
            ..bind("192.0.2.1")
        });
        let request = request_of(&event);
        let existing = map.facts_on(request.netns, request.protocol, request.port);
        let both = EarlyChecks {
            address_unavailable: true,
            privileged: true,
        };
        let errno = infer_errno(KernelRules::UNKNOWN, &event, existing, &map, both);
        assert_eq!(errno, Some(Errno(libc::EADDRNOTAVAIL)));
    }

    #[test]
    fn a_privileged_port_without_the_capability_is_eacces_before_anything_else() {
        let without = Some(0x0000_01ff_ffff_fbff_u64);
        let with = Some(0x0000_01ff_ffff_ffff_u64);
        assert!(refused_as_privileged(80, Some(1024), without));
        assert!(!refused_as_privileged(80, Some(1024), with));
        assert!(!refused_as_privileged(8000, Some(1024), without));
        assert!(
            !refused_as_privileged(80, Some(80), without),
            "the start is unprivileged"
        );
        assert!(
            !refused_as_privileged(0, Some(1024), without),
            "port 0 is never checked"
        );
        assert!(!refused_as_privileged(80, None, without), "unknown sysctl");
        assert!(
            !refused_as_privileged(80, Some(1024), None),
            "unknown thread"
        );
        // Before the socket's state and the port's holders: EACCES even
        // where the port is taken, or the socket already bound.
        let map = listening(Protocol::Tcp);
        let taken = PortEvent::example(EventKind::BindFailed, Protocol::Tcp, ANY, 8000, 2);
        let bound = PortEvent::example(EventKind::BindFailed, Protocol::Tcp, ANY, 8000, 1);
        for event in [taken, bound] {
            let event = unresolved(event);
            let request = request_of(&event);
            let existing = map.facts_on(request.netns, request.protocol, request.port);
            let errno = infer_errno(KernelRules::UNKNOWN, &event, existing, &map, PRIVILEGED);
            assert_eq!(errno, Some(Errno::EACCES));
        }
        // After a request that fails by itself.
        let v6_on_v4 = PortEvent {
            family: crate::event::Family::Ipv4,
            address: IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
            ..PortEvent::example(EventKind::BindFailed, Protocol::Tcp, ANY, 80, 3)
        };
        let errno = infer_errno(
            KernelRules::UNKNOWN,
            &unresolved(v6_on_v4),
            Vec::new(),
            &map,
            PRIVILEGED,
        );
        assert_eq!(errno, Some(Errno(libc::EAFNOSUPPORT)));
    }

    #[test]
    fn a_conflict_is_inferred_as_eaddrinuse() {
        let map = listening(Protocol::Tcp);
        let bind = PortEvent::example(EventKind::BindFailed, Protocol::Tcp, ANY, 8000, 2);
        let bind = unresolved(bind);
        assert!(bind.errno_unknown());
        assert_eq!(bind.errno_source(), None);
        assert_eq!(inferred(&bind, &map), Some(Errno::EADDRINUSE));
        let known = PortEvent {
            errno: Some(Errno::EADDRINUSE),
            ..bind.clone()
        };
        assert_eq!(known.errno_source(), Some(ErrnoSource::Inferred));
        // Nothing on another port, or in another port space: no answer.
        let elsewhere = PortEvent {
            port: 8001,
            ..bind.clone()
        };
        assert_eq!(inferred(&elsewhere, &map), None);
        assert_eq!(inferred(&bind, &listening(Protocol::Udp)), None);
    }

    #[test]
    fn a_second_bind_of_a_bound_socket_is_inferred_as_einval() {
        // The kernel checks the socket before any conflict: even where the
        // port is taken, a bound socket's bind is EINVAL.
        let map = listening(Protocol::Tcp);
        let again = PortEvent::example(EventKind::BindFailed, Protocol::Tcp, ANY, 9000, 1);
        assert_eq!(
            inferred(&unresolved(again.clone()), &map),
            Some(Errno::EINVAL)
        );
        let onto_itself = PortEvent {
            port: 8000,
            ..again
        };
        assert_eq!(
            inferred(&unresolved(onto_itself), &map),
            Some(Errno::EINVAL)
        );
    }

    #[test]
    fn a_request_that_fails_by_itself_keeps_its_own_errno() {
        let map = listening(Protocol::Tcp);
        // An IPv4 socket given an IPv6 address, on a socket already bound:
        // the address check comes first.
        let v6_on_v4 = PortEvent {
            family: crate::event::Family::Ipv4,
            address: IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
            ..PortEvent::example(EventKind::BindFailed, Protocol::Tcp, ANY, 9000, 1)
        };
        assert_eq!(
            inferred(&unresolved(v6_on_v4), &map),
            Some(Errno(libc::EAFNOSUPPORT))
        );
    }

    #[test]
    fn a_failed_listen_is_inferred_from_the_listener_in_its_way() {
        // Two SO_REUSEADDR sockets bound to one address; one listens: the
        // other's listen is EADDRINUSE.
        let mut map = PortMap::default();
        let reuse = crate::event::Options {
            reuse_addr: Some(true),
            reuse_port: Some(false),
            ..crate::event::Options::default()
        };
        for (kind, cookie) in [
            (EventKind::Bind, 1),
            (EventKind::Listen, 1),
            (EventKind::Bind, 2),
        ] {
            let event = PortEvent {
                options: reuse,
                ..PortEvent::example(kind, Protocol::Tcp, ANY, 8000, cookie)
            };
            map.apply(&event, SystemTime::UNIX_EPOCH);
        }
        let listen = PortEvent {
            options: reuse,
            bound_port: Some(8000),
            ..PortEvent::example(EventKind::ListenFailed, Protocol::Tcp, ANY, 8000, 2)
        };
        assert_eq!(inferred(&unresolved(listen), &map), Some(Errno::EADDRINUSE));
    }

    #[test]
    fn a_bind_to_port_zero_that_fails_found_no_free_port() {
        let map = PortMap::default();
        let any = PortEvent::example(EventKind::BindFailed, Protocol::Udp, ANY, 0, 5);
        assert_eq!(
            inferred(&unresolved(any.clone()), &map),
            Some(Errno::EADDRINUSE)
        );
        // An address the namespace may not have: EADDRNOTAVAIL is possible.
        let elsewhere = PortEvent {
            address: "192.0.2.1".parse().unwrap(),
            ..any
        };
        assert_eq!(inferred(&unresolved(elsewhere), &map), None);
    }

    #[test]
    fn a_listen_that_fails_fails_its_port_check() {
        // Nothing in the map explains it (its blocker came and went):
        // still the port check, EADDRINUSE.
        let listen = PortEvent::example(EventKind::ListenFailed, Protocol::Tcp, ANY, 8000, 7);
        assert_eq!(
            inferred(&unresolved(listen), &PortMap::default()),
            Some(Errno::EADDRINUSE)
        );
    }

    #[test]
    fn a_bind_address_no_port_bind_to_port_zero_needs_no_post_bind() {
        let options = crate::event::Options {
            bind_address_no_port: Some(true),
            ..crate::event::Options::default()
        };
        let bind = PortEvent {
            options,
            ..PortEvent::example(EventKind::BindFailed, Protocol::Tcp, ANY, 0, 5)
        };
        assert!(bound_without_a_port(&unresolved(bind.clone())));
        // With a port, post_bind would have run: a failure.
        let with_port = PortEvent {
            port: 8000,
            ..bind.clone()
        };
        assert!(!bound_without_a_port(&unresolved(with_port)));
        // An outcome hook's errno is the kernel's.
        assert!(!bound_without_a_port(&bind));
    }

    #[test]
    fn agreement_with_the_kernels_errno() {
        let e = Errno::EADDRINUSE;
        assert_eq!(Agreement::of(Some(e), e), Agreement::Agree);
        assert_eq!(Agreement::of(Some(Errno::EINVAL), e), Agreement::Disagree);
        assert_eq!(Agreement::of(None, e), Agreement::Undecided);
    }

    #[test]
    fn other_port_spaces_do_not_block() {
        let tcp = PortEvent::example(EventKind::BindFailed, Protocol::Tcp, ANY, 8000, 2);
        for protocol in [Protocol::Udp, Protocol::UdpLite, Protocol::Sctp] {
            assert!(
                blockers(&tcp, &listening(protocol)).is_empty(),
                "{protocol}"
            );
        }
    }
}
