//! Finds out, at start, what the running kernel's conflict rules do where
//! kernels are known to differ ([`KernelRules`]), by trying it: kernels that
//! report the same release have been measured to walk a UDP port's sockets
//! differently (`KERNEL.md`, "Machines of this kind differ"), and Linux
//! 6.1's TCP treats `::ffff:0.0.0.0` differently from older and newer
//! kernels ([`MappedAny`]), a bug stable updates may or may not fix, so
//! nothing is assumed from the version string.
//!
//! The probe runs on a thread of its own that moves itself into a new,
//! empty network namespace (`unshare(CLONE_NEWNET)` moves only the calling
//! thread; the caller's namespace is never touched), brings `lo` up there
//! with an ioctl, binds the UDP scenarios of [`UDP_WALK_SCENARIOS`] and the
//! TCP ones of [`MAPPED_ANY_SCENARIOS`] on 127.0.0.1, and exits; the
//! namespace goes with the thread's last socket. It takes a few
//! milliseconds; [`TIMEOUT`] bounds it. It needs `CAP_SYS_ADMIN` for the
//! namespace; without it, or on any error, what it could not find out is
//! unknown ([`UdpWalk::Unknown`], [`MappedAny::Unknown`]) and answers that
//! depend on it are not confident. Without IPv6 only the TCP question stays
//! unknown.
//!
//! What the scenarios mean is decided by the rules themselves
//! ([`classify_udp_walk`], [`classify_mapped_any`], pure): the kernel
//! behaviour whose predictions match every observation, if exactly one
//! does.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::mpsc,
    time::{Duration, Instant},
};

use crate::{
    event::Errno,
    rules::{self, KernelRules, MappedAny, UdpWalk},
    socket::{BindRequest, Family, Protocol, ShareOptions, SockState, SocketFacts},
};

/// The longest the probe may take before its answer is given up on.
pub const TIMEOUT: Duration = Duration::from_secs(2);

/// Why the probe could not answer.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// No new network namespace: `CAP_SYS_ADMIN` is missing, or a sandbox
    /// (seccomp, `RestrictNamespaces=`) forbids it.
    #[error("cannot probe: unshare(CLONE_NEWNET): {0}")]
    Unshare(#[source] nix::Error),
    /// A socket call of the probe (not the probed bind itself) failed.
    #[error("cannot probe: {call}: {source}")]
    Socket {
        call: &'static str,
        #[source]
        source: io::Error,
    },
    /// The probe's thread could not be started.
    #[error("cannot probe: starting its thread: {0}")]
    Spawn(#[source] io::Error),
    /// The probe did not answer within [`TIMEOUT`].
    #[error("cannot probe: no answer within {0:?}")]
    Timeout(Duration),
    /// The probe's thread ended without an answer.
    #[error("cannot probe: its thread ended without an answer")]
    Lost,
}

/// One socket of a probe scenario: its protocol and family, the sharing
/// options it sets and the address it binds. `IPV6_V6ONLY` is off on IPv6
/// ones; all belong to the probe's owner.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbeSocket {
    /// How the log names it.
    pub name: &'static str,
    pub protocol: Protocol,
    pub family: Family,
    pub address: IpAddr,
    pub reuse_addr: bool,
    pub reuse_port: bool,
}

const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// A UDP socket on 127.0.0.1 with these options.
const fn udp(name: &'static str, reuse_addr: bool, reuse_port: bool) -> ProbeSocket {
    ProbeSocket {
        name,
        protocol: Protocol::Udp,
        family: Family::Ipv4,
        address: LOOPBACK,
        reuse_addr,
        reuse_port,
    }
}

/// A TCP socket of `family` on `address`, no sharing option.
const fn tcp(name: &'static str, family: Family, address: IpAddr) -> ProbeSocket {
    ProbeSocket {
        name,
        protocol: Protocol::Tcp,
        family,
        address,
        reuse_addr: false,
        reuse_port: false,
    }
}

/// `SO_REUSEADDR` only.
const RA: ProbeSocket = udp("RA", true, false);
/// `SO_REUSEADDR` and `SO_REUSEPORT`.
const BOTH: ProbeSocket = udp("BOTH", true, true);
/// `SO_REUSEPORT` only.
const RP: ProbeSocket = udp("RP", false, true);

/// An IPv6 TCP socket on `::ffff:0.0.0.0`.
const MAPPED_ANY: ProbeSocket = tcp(
    "M0",
    Family::Ipv6,
    IpAddr::V6(Ipv4Addr::UNSPECIFIED.to_ipv6_mapped()),
);
/// An IPv6 TCP socket on `::ffff:127.0.0.1`.
const MAPPED_ONE: ProbeSocket = tcp(
    "M1",
    Family::Ipv6,
    IpAddr::V6(Ipv6Addr::new(0, 0, 0, 0, 0, 0xffff, 0x7f00, 1)),
);
/// An IPv4 TCP socket on 127.0.0.1.
const V4_ONE: ProbeSocket = tcp("V1", Family::Ipv4, LOOPBACK);

/// UDP sockets bound one after the other on 127.0.0.1, one port per
/// scenario. The first two always bind (`SO_REUSEADDR` on both); whether
/// the last one does depends on the walk.
pub const UDP_WALK_SCENARIOS: &[&[ProbeSocket]] = &[&[RA, BOTH, RP], &[BOTH, RA, RP]];

/// TCP sockets without sharing options, one port per scenario. The second
/// bind of the first one depends on [`MappedAny`]; the other two are refused
/// on every kernel measured, and a kernel that lets them through is neither.
pub const MAPPED_ANY_SCENARIOS: &[&[ProbeSocket]] = &[
    &[MAPPED_ANY, MAPPED_ONE],
    &[MAPPED_ONE, MAPPED_ANY],
    &[MAPPED_ANY, V4_ONE],
];

/// What each bind of one scenario returned, in order.
pub type Outcomes = Vec<Result<(), Errno>>;

/// What the scenarios gave, one [`Outcomes`] per scenario.
#[derive(Debug)]
pub struct Seen {
    /// [`UDP_WALK_SCENARIOS`].
    pub udp_walk: Vec<Outcomes>,
    /// [`MAPPED_ANY_SCENARIOS`], or why they could not run (no IPv6).
    pub mapped_any: Result<Vec<Outcomes>, ProbeError>,
}

/// What the probe found.
#[derive(Debug)]
pub struct ProbeReport {
    /// The rules to judge by: what was found, unknown where nothing was.
    pub rules: KernelRules,
    /// What the scenarios gave, when the probe ran.
    pub seen: Option<Seen>,
    /// Why it could not run.
    pub error: Option<ProbeError>,
    pub took: Duration,
}

impl ProbeReport {
    /// What the UDP walk scenarios gave (`RA ok, BOTH ok, RP EADDRINUSE;
    /// BOTH ok, RA ok, RP EADDRINUSE`), or the error.
    pub fn udp_walk_text(&self) -> String {
        match (&self.seen, &self.error) {
            (Some(seen), _) => describe(UDP_WALK_SCENARIOS, &seen.udp_walk),
            (None, Some(err)) => err.to_string(),
            (None, None) => "nothing".to_owned(),
        }
    }

    /// What the mapped wildcard scenarios gave (`M0 ok, M1 EADDRINUSE;
    /// ...`), or the error.
    pub fn mapped_any_text(&self) -> String {
        match (&self.seen, &self.error) {
            (Some(seen), _) => match &seen.mapped_any {
                Ok(outcomes) => describe(MAPPED_ANY_SCENARIOS, outcomes),
                Err(err) => err.to_string(),
            },
            (None, Some(err)) => err.to_string(),
            (None, None) => "nothing".to_owned(),
        }
    }

    /// Both, as the log line has them: `udp_walk = every_match (...),
    /// mapped_any = wildcard (...)`.
    pub fn summary(&self) -> String {
        format!(
            "udp_walk = {} ({}), mapped_any = {} ({})",
            self.rules.udp_walk,
            self.udp_walk_text(),
            self.rules.mapped_any,
            self.mapped_any_text()
        )
    }
}

/// Probes the running kernel, logs what it found (one info line, or a
/// warning when it could not tell something) and returns it. Blocks for at
/// most [`TIMEOUT`]; never fails: what it cannot find out stays unknown.
pub fn probe() -> ProbeReport {
    let started = Instant::now();
    let (seen, error) = match run(TIMEOUT) {
        Ok(seen) => (Some(seen), None),
        Err(err) => (None, Some(err)),
    };
    let rules = seen.as_ref().map_or(KernelRules::UNKNOWN, classify);
    let report = ProbeReport {
        rules,
        seen,
        error,
        took: started.elapsed(),
    };
    let summary = report.summary();
    let (udp_walk, mapped_any) = (rules.udp_walk, rules.mapped_any);
    if udp_walk == UdpWalk::Unknown || mapped_any == MappedAny::Unknown {
        tracing::warn!(
            udp_walk = %udp_walk,
            mapped_any = %mapped_any,
            took = ?report.took,
            "kernel probe: {summary}; answers that depend on what is unknown are not confident"
        );
    } else {
        tracing::info!(
            udp_walk = %udp_walk,
            mapped_any = %mapped_any,
            took = ?report.took,
            "kernel probe: {summary}"
        );
    }
    report
}

/// Runs [`UDP_WALK_SCENARIOS`] and [`MAPPED_ANY_SCENARIOS`] in a private
/// network namespace on a thread of its own; gives up after `timeout` (the
/// thread is then left to end by itself, in its own namespace).
pub fn run(timeout: Duration) -> Result<Seen, ProbeError> {
    let (tx, rx) = mpsc::sync_channel(1);
    std::thread::Builder::new()
        .name("kernel-probe".into())
        .spawn(move || {
            // The receiver may have given up already; nothing to tell then.
            let _ = tx.send(in_private_netns());
        })
        .map_err(ProbeError::Spawn)?;
    match rx.recv_timeout(timeout) {
        Ok(result) => result,
        Err(mpsc::RecvTimeoutError::Timeout) => Err(ProbeError::Timeout(timeout)),
        Err(mpsc::RecvTimeoutError::Disconnected) => Err(ProbeError::Lost),
    }
}

/// The rules the scenarios show, unknown where they do not tell.
pub fn classify(seen: &Seen) -> KernelRules {
    KernelRules {
        udp_walk: classify_udp_walk(&seen.udp_walk),
        mapped_any: seen
            .mapped_any
            .as_ref()
            .map_or(MappedAny::Unknown, |outcomes| classify_mapped_any(outcomes)),
    }
}

/// Which walk explains what [`UDP_WALK_SCENARIOS`] gave: the one whose
/// predictions match every bind, if exactly one does. A scenario whose
/// setup binds failed, or results neither walk (or both) predicts, say
/// nothing.
pub fn classify_udp_walk(seen: &[Outcomes]) -> UdpWalk {
    let explains = |udp_walk| {
        let kernel = KernelRules {
            udp_walk,
            ..KernelRules::UNKNOWN
        };
        predicts_all(kernel, UDP_WALK_SCENARIOS, seen)
    };
    match only(UdpWalk::KNOWN.into_iter().filter(|&walk| explains(walk))) {
        Some(walk) => walk,
        None => UdpWalk::Unknown,
    }
}

/// Which treatment of `::ffff:0.0.0.0` explains what
/// [`MAPPED_ANY_SCENARIOS`] gave, as [`classify_udp_walk`] decides.
pub fn classify_mapped_any(seen: &[Outcomes]) -> MappedAny {
    let explains = |mapped_any| {
        let kernel = KernelRules {
            mapped_any,
            ..KernelRules::UNKNOWN
        };
        predicts_all(kernel, MAPPED_ANY_SCENARIOS, seen)
    };
    match only(MappedAny::KNOWN.into_iter().filter(|&m| explains(m))) {
        Some(mapped_any) => mapped_any,
        None => MappedAny::Unknown,
    }
}

/// The one item, if there is exactly one.
fn only<T>(mut items: impl Iterator<Item = T>) -> Option<T> {
    let first = items.next()?;
    items.next().is_none().then_some(first)
}

/// Whether `kernel`'s rules predict every scenario as `seen` has it.
fn predicts_all(kernel: KernelRules, scenarios: &[&[ProbeSocket]], seen: &[Outcomes]) -> bool {
    scenarios.len() == seen.len()
        && scenarios
            .iter()
            .zip(seen)
            .all(|(scenario, outcomes)| predicts(kernel, scenario, outcomes))
}

/// Whether the rules of `kernel` predict each bind of `scenario` as
/// `outcomes` has it, every prediction confident.
fn predicts(kernel: KernelRules, scenario: &[ProbeSocket], outcomes: &Outcomes) -> bool {
    const PORT: u16 = 1;
    if outcomes.len() != scenario.len() {
        return false;
    }
    let mut holders: Vec<SocketFacts> = Vec::new();
    for (n, (sock, outcome)) in scenario.iter().zip(outcomes).enumerate() {
        let options = ShareOptions {
            reuse_addr: Some(sock.reuse_addr),
            reuse_port: Some(sock.reuse_port),
            v6only: (sock.family == Family::Ipv6).then_some(false),
        };
        let request = BindRequest {
            netns: 1,
            protocol: sock.protocol,
            family: sock.family,
            address: sock.address,
            port: PORT,
            options,
            uid: 0,
        };
        let prediction = rules::predict_bind(kernel, None, &holders, &request);
        if !prediction.confident || prediction.verdict.errno() != outcome.err() {
            return false;
        }
        if outcome.is_ok() {
            holders.push(SocketFacts {
                cookie: n as u64 + 1,
                netns: 1,
                protocol: sock.protocol,
                family: sock.family,
                address: sock.address,
                port: PORT,
                state: SockState::Bound,
                options,
                uid: Some(0),
                bound_dev_if: 0,
            });
        }
    }
    true
}

/// `RA ok, BOTH ok, RP EADDRINUSE; BOTH ok, ...`.
fn describe(scenarios: &[&[ProbeSocket]], seen: &[Outcomes]) -> String {
    scenarios
        .iter()
        .zip(seen)
        .map(|(scenario, outcomes)| {
            scenario
                .iter()
                .zip(outcomes)
                .map(|(sock, outcome)| match outcome {
                    Ok(()) => format!("{} ok", sock.name),
                    Err(errno) => format!("{} {errno}", sock.name),
                })
                .collect::<Vec<_>>()
                .join(", ")
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// On the probe's own thread: leaves the process's network namespace for a
/// new one, and runs the scenarios there. The thread must end afterwards
/// (it never returns to the old namespace).
fn in_private_netns() -> Result<Seen, ProbeError> {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).map_err(ProbeError::Unshare)?;
    loopback_up()?;
    // The namespace is new and empty: any port is free; one per scenario.
    Ok(Seen {
        udp_walk: run_scenarios(UDP_WALK_SCENARIOS, 40000)?,
        mapped_any: run_scenarios(MAPPED_ANY_SCENARIOS, 40100),
    })
}

/// Binds each scenario's sockets in order on a port of its own from
/// `first_port` on, keeping them open until the scenario ends.
fn run_scenarios(
    scenarios: &[&[ProbeSocket]],
    first_port: u16,
) -> Result<Vec<Outcomes>, ProbeError> {
    let mut seen = Vec::with_capacity(scenarios.len());
    for (n, scenario) in scenarios.iter().enumerate() {
        let port = first_port + n as u16;
        let mut open = Vec::with_capacity(scenario.len());
        let mut outcomes = Outcomes::with_capacity(scenario.len());
        for sock in *scenario {
            let fd = probe_socket(sock)?;
            outcomes.push(bind_to(&fd, sock.address, port));
            open.push(fd);
        }
        seen.push(outcomes);
    }
    Ok(seen)
}

fn last_error(call: &'static str) -> ProbeError {
    ProbeError::Socket {
        call,
        source: io::Error::last_os_error(),
    }
}

/// `ip link set lo up`, by ioctl on this thread's namespace.
fn loopback_up() -> Result<(), ProbeError> {
    // SAFETY: plain socket(2); the descriptor is owned right away.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(last_error("socket for the lo ioctl"));
    }
    // SAFETY: a fresh descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: all-zero is a valid ifreq.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(b"lo") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS fills ifr_ifru.ifru_flags of the named device.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::SIOCGIFFLAGS, &raw mut ifr) } < 0 {
        return Err(last_error("SIOCGIFFLAGS lo"));
    }
    // SAFETY: SIOCGIFFLAGS wrote the flags member of the union.
    unsafe { ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    // SAFETY: SIOCSIFFLAGS reads the name and flags it was given.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::SIOCSIFFLAGS, &raw const ifr) } < 0 {
        return Err(last_error("SIOCSIFFLAGS lo"));
    }
    Ok(())
}

/// A socket of `sock`'s protocol and family with its options
/// (`IPV6_V6ONLY` off on IPv6, whatever `net.ipv6.bindv6only` says).
fn probe_socket(sock: &ProbeSocket) -> Result<OwnedFd, ProbeError> {
    let domain = match sock.family {
        Family::Ipv4 => libc::AF_INET,
        Family::Ipv6 => libc::AF_INET6,
    };
    let kind = match sock.protocol {
        Protocol::Udp => libc::SOCK_DGRAM,
        _ => libc::SOCK_STREAM,
    };
    // SAFETY: plain socket(2); the descriptor is owned right away.
    let raw = unsafe { libc::socket(domain, kind | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(last_error("socket"));
    }
    // SAFETY: a fresh descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut options = vec![
        (
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            "setsockopt SO_REUSEADDR",
            sock.reuse_addr,
        ),
        (
            libc::SOL_SOCKET,
            libc::SO_REUSEPORT,
            "setsockopt SO_REUSEPORT",
            sock.reuse_port,
        ),
    ];
    if sock.family == Family::Ipv6 {
        options.push((
            libc::IPPROTO_IPV6,
            libc::IPV6_V6ONLY,
            "setsockopt IPV6_V6ONLY",
            false,
        ));
    }
    for (level, name, call, on) in options {
        let value = libc::c_int::from(on);
        // SAFETY: a 4-byte int option on our own socket.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                level,
                name,
                (&raw const value).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(last_error(call));
        }
    }
    Ok(fd)
}

/// bind(2) to `address`:`port` (an IPv4 address as such, an IPv6 one as
/// such); the kernel's answer is the observation.
fn bind_to(fd: &OwnedFd, address: IpAddr, port: u16) -> Result<(), Errno> {
    let (storage, len) = crate::socket::sockaddr(address, port);
    // SAFETY: the address lives on this stack frame for the call.
    let rc = unsafe { libc::bind(fd.as_raw_fd(), (&raw const storage).cast(), len) };
    if rc == 0 {
        Ok(())
    } else {
        Err(Errno(
            io::Error::last_os_error().raw_os_error().unwrap_or(0),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: Result<(), Errno> = Ok(());
    const INUSE: Result<(), Errno> = Err(Errno::EADDRINUSE);

    #[test]
    fn the_rules_decide_what_the_scenarios_mean() {
        // Measured on 6.18.44-fc-v1252: RP refused after either order.
        let every = [vec![OK, OK, INUSE], vec![OK, OK, INUSE]];
        assert_eq!(classify_udp_walk(&every), UdpWalk::EveryMatch);
        // Measured on 6.18.44-fc-v657: BOTH, bound last, is met first.
        let first = [vec![OK, OK, OK], vec![OK, OK, INUSE]];
        assert_eq!(classify_udp_walk(&first), UdpWalk::FirstMatch);
        // Anything else is neither.
        for odd in [
            vec![vec![OK, OK, INUSE], vec![OK, OK, OK]],
            vec![vec![OK, OK, OK], vec![OK, OK, OK]],
            vec![vec![OK, INUSE, INUSE], vec![OK, OK, INUSE]],
            vec![vec![OK, OK, Err(Errno::EINVAL)], vec![OK, OK, INUSE]],
            vec![vec![OK, OK], vec![OK, OK, INUSE]],
            vec![vec![], vec![]],
            vec![vec![OK, OK, INUSE]],
        ] {
            assert_eq!(classify_udp_walk(&odd), UdpWalk::Unknown, "{odd:?}");
        }
    }

    #[test]
    fn the_rules_decide_what_the_mapped_wildcard_scenarios_mean() {
        // 5.10.223, 6.12.111, 6.18.44-fc-v1252: the mapped wildcard covers
        // every IPv4 address, in either order.
        let wildcard = [vec![OK, INUSE], vec![OK, INUSE], vec![OK, INUSE]];
        assert_eq!(classify_mapped_any(&wildcard), MappedAny::Wildcard);
        // Debian's 6.1.176: the mapped address after the mapped wildcard
        // binds; the rest is refused.
        let quirk = [vec![OK, OK], vec![OK, INUSE], vec![OK, INUSE]];
        assert_eq!(classify_mapped_any(&quirk), MappedAny::Quirk);
        // Anything else is neither.
        for odd in [
            vec![vec![OK, OK], vec![OK, OK], vec![OK, INUSE]],
            vec![vec![OK, INUSE], vec![OK, OK], vec![OK, INUSE]],
            vec![vec![OK, OK], vec![OK, INUSE], vec![OK, OK]],
            vec![vec![INUSE, INUSE], vec![OK, INUSE], vec![OK, INUSE]],
            vec![vec![OK, OK], vec![OK, INUSE]],
            vec![],
        ] {
            assert_eq!(classify_mapped_any(&odd), MappedAny::Unknown, "{odd:?}");
        }
        // A kernel without IPv6 leaves the TCP question open, not the UDP one.
        let seen = Seen {
            udp_walk: vec![vec![OK, OK, INUSE], vec![OK, OK, INUSE]],
            mapped_any: Err(ProbeError::Timeout(TIMEOUT)),
        };
        assert_eq!(
            classify(&seen),
            KernelRules {
                udp_walk: UdpWalk::EveryMatch,
                mapped_any: MappedAny::Unknown,
            }
        );
    }

    #[test]
    fn what_it_saw_reads_as_a_list() {
        let report = ProbeReport {
            rules: KernelRules {
                udp_walk: UdpWalk::Unknown,
                mapped_any: MappedAny::Quirk,
            },
            seen: Some(Seen {
                udp_walk: vec![vec![OK, OK, INUSE], vec![OK, OK, OK]],
                mapped_any: Ok(vec![vec![OK, OK], vec![OK, INUSE], vec![OK, INUSE]]),
            }),
            error: None,
            took: Duration::ZERO,
        };
        assert_eq!(
            report.udp_walk_text(),
            "RA ok, BOTH ok, RP EADDRINUSE; BOTH ok, RA ok, RP ok"
        );
        assert_eq!(
            report.mapped_any_text(),
            "M0 ok, M1 ok; M1 ok, M0 EADDRINUSE; M0 ok, V1 EADDRINUSE"
        );
        assert_eq!(
            report.summary(),
            "udp_walk = unknown (RA ok, BOTH ok, RP EADDRINUSE; BOTH ok, RA ok, RP ok), \
             mapped_any = quirk (M0 ok, M1 ok; M1 ok, M0 EADDRINUSE; M0 ok, V1 EADDRINUSE)"
        );
        let failed = ProbeReport {
            seen: None,
            error: Some(ProbeError::Timeout(TIMEOUT)),
            ..report
        };
        assert_eq!(failed.udp_walk_text(), "cannot probe: no answer within 2s");
        assert_eq!(
            failed.mapped_any_text(),
            "cannot probe: no answer within 2s"
        );
    }
}
