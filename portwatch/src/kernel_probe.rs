//! Finds out, at start, what the running kernel's conflict rules do where
//! kernels are known to differ ([`KernelRules`]), by trying it: kernels that
//! report the same release have been measured to walk a UDP port's sockets
//! differently (`KERNEL.md`, "Machines of this kind differ"), so nothing is
//! assumed from the version string.
//!
//! The probe runs on a thread of its own that moves itself into a new,
//! empty network namespace (`unshare(CLONE_NEWNET)` moves only the calling
//! thread; the caller's namespace is never touched), brings `lo` up there
//! with an ioctl, binds the two UDP scenarios of [`UDP_WALK_SCENARIOS`] on
//! 127.0.0.1, and exits; the namespace goes with the thread's last socket.
//! It takes a few milliseconds; [`TIMEOUT`] bounds it. It needs
//! `CAP_SYS_ADMIN` for the namespace; without it, or on any error, the walk
//! is [`UdpWalk::Unknown`] and answers that depend on it are not confident.
//!
//! What the scenarios mean is decided by the rules themselves
//! ([`classify_udp_walk`], pure): the walk whose predictions match every
//! observation, if exactly one does.

use std::{
    io,
    net::{IpAddr, Ipv4Addr},
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

/// One socket of a probe scenario: which sharing options it sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbeSocket {
    /// How the log names it.
    pub name: &'static str,
    pub reuse_addr: bool,
    pub reuse_port: bool,
}

/// `SO_REUSEADDR` only.
const RA: ProbeSocket = ProbeSocket {
    name: "RA",
    reuse_addr: true,
    reuse_port: false,
};
/// `SO_REUSEADDR` and `SO_REUSEPORT`.
const BOTH: ProbeSocket = ProbeSocket {
    name: "BOTH",
    reuse_addr: true,
    reuse_port: true,
};
/// `SO_REUSEPORT` only.
const RP: ProbeSocket = ProbeSocket {
    name: "RP",
    reuse_addr: false,
    reuse_port: true,
};

/// UDP sockets bound one after the other on 127.0.0.1, one port per
/// scenario, all of one owner. The first two always bind (`SO_REUSEADDR` on
/// both); whether the last one does depends on the walk.
pub const UDP_WALK_SCENARIOS: [[ProbeSocket; 3]; 2] = [[RA, BOTH, RP], [BOTH, RA, RP]];

/// What each bind of one scenario returned, in order.
pub type Outcomes = Vec<Result<(), Errno>>;

/// What the probe found.
#[derive(Debug)]
pub struct ProbeReport {
    /// The rules to judge by: what was found, unknown where nothing was.
    pub rules: KernelRules,
    /// What each scenario of [`UDP_WALK_SCENARIOS`] gave, when it ran.
    pub seen: Option<[Outcomes; 2]>,
    /// Why it could not run.
    pub error: Option<ProbeError>,
    pub took: Duration,
}

impl ProbeReport {
    /// `RA ok, BOTH ok, RP EADDRINUSE; BOTH ok, RA ok, RP EADDRINUSE`, or the
    /// error.
    pub fn seen_text(&self) -> String {
        match (&self.seen, &self.error) {
            (Some(seen), _) => describe(seen),
            (None, Some(err)) => err.to_string(),
            (None, None) => "nothing".to_owned(),
        }
    }
}

/// Probes the running kernel, logs what it found (one info line, or a
/// warning when it could not tell) and returns it. Blocks for at most
/// [`TIMEOUT`]; never fails: what it cannot find out stays unknown.
pub fn probe() -> ProbeReport {
    let started = Instant::now();
    let (seen, error) = match run(TIMEOUT) {
        Ok(seen) => (Some(seen), None),
        Err(err) => (None, Some(err)),
    };
    let udp_walk = seen.as_ref().map_or(UdpWalk::Unknown, classify_udp_walk);
    let report = ProbeReport {
        rules: KernelRules {
            udp_walk,
            // Not probed yet.
            mapped_any: MappedAny::Unknown,
        },
        seen,
        error,
        took: started.elapsed(),
    };
    let text = report.seen_text();
    if udp_walk == UdpWalk::Unknown {
        tracing::warn!(
            udp_walk = %udp_walk,
            took = ?report.took,
            "kernel probe: udp_walk = {udp_walk} ({text}); UDP answers that depend on it are not confident"
        );
    } else {
        tracing::info!(
            udp_walk = %udp_walk,
            took = ?report.took,
            "kernel probe: udp_walk = {udp_walk} ({text})"
        );
    }
    report
}

/// Runs [`UDP_WALK_SCENARIOS`] in a private network namespace on a thread
/// of its own; gives up after `timeout` (the thread is then left to end by
/// itself, in its own namespace).
pub fn run(timeout: Duration) -> Result<[Outcomes; 2], ProbeError> {
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

/// Which walk explains what the scenarios gave: the one whose predictions
/// match every bind, if exactly one does. A scenario whose setup binds
/// failed, or results neither walk (or both) predicts, say nothing.
pub fn classify_udp_walk(seen: &[Outcomes; 2]) -> UdpWalk {
    let matching: Vec<UdpWalk> = UdpWalk::KNOWN
        .into_iter()
        .filter(|&walk| {
            UDP_WALK_SCENARIOS
                .iter()
                .zip(seen)
                .all(|(scenario, outcomes)| predicts(walk, scenario, outcomes))
        })
        .collect();
    match matching.as_slice() {
        [walk] => *walk,
        _ => UdpWalk::Unknown,
    }
}

/// Whether the rules under `walk` predict each bind of `scenario` as
/// `outcomes` has it, every prediction confident.
fn predicts(walk: UdpWalk, scenario: &[ProbeSocket], outcomes: &Outcomes) -> bool {
    const PORT: u16 = 1;
    if outcomes.len() != scenario.len() {
        return false;
    }
    let kernel = KernelRules {
        udp_walk: walk,
        ..KernelRules::UNKNOWN
    };
    let mut holders: Vec<SocketFacts> = Vec::new();
    for (n, (sock, outcome)) in scenario.iter().zip(outcomes).enumerate() {
        let options = ShareOptions {
            reuse_addr: Some(sock.reuse_addr),
            reuse_port: Some(sock.reuse_port),
            v6only: None,
        };
        let address = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let request = BindRequest {
            netns: 1,
            protocol: Protocol::Udp,
            family: Family::Ipv4,
            address,
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
                protocol: Protocol::Udp,
                family: Family::Ipv4,
                address,
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
fn describe(seen: &[Outcomes; 2]) -> String {
    UDP_WALK_SCENARIOS
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
fn in_private_netns() -> Result<[Outcomes; 2], ProbeError> {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).map_err(ProbeError::Unshare)?;
    loopback_up()?;
    let mut seen: [Outcomes; 2] = Default::default();
    for (n, (scenario, outcomes)) in UDP_WALK_SCENARIOS.iter().zip(&mut seen).enumerate() {
        // The namespace is new and empty: any port is free; one each.
        let port = 40000 + n as u16;
        let mut open = Vec::with_capacity(scenario.len());
        for sock in scenario {
            let fd = udp_socket(sock)?;
            outcomes.push(bind_loopback(&fd, port));
            open.push(fd);
        }
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

/// An IPv4 UDP socket with `sock`'s options.
fn udp_socket(sock: &ProbeSocket) -> Result<OwnedFd, ProbeError> {
    // SAFETY: plain socket(2); the descriptor is owned right away.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(last_error("socket"));
    }
    // SAFETY: a fresh descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    for (name, call, on) in [
        (
            libc::SO_REUSEADDR,
            "setsockopt SO_REUSEADDR",
            sock.reuse_addr,
        ),
        (
            libc::SO_REUSEPORT,
            "setsockopt SO_REUSEPORT",
            sock.reuse_port,
        ),
    ] {
        let value = libc::c_int::from(on);
        // SAFETY: a 4-byte int option on our own socket.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
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

/// bind(2) to 127.0.0.1:`port`; the kernel's answer is the observation.
fn bind_loopback(fd: &OwnedFd, port: u16) -> Result<(), Errno> {
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(Ipv4Addr::LOCALHOST.octets()),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: the address lives on this stack frame for the call.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&raw const addr).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
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
            [vec![OK, OK, INUSE], vec![OK, OK, OK]],
            [vec![OK, OK, OK], vec![OK, OK, OK]],
            [vec![OK, INUSE, INUSE], vec![OK, OK, INUSE]],
            [vec![OK, OK, Err(Errno::EINVAL)], vec![OK, OK, INUSE]],
            [vec![OK, OK], vec![OK, OK, INUSE]],
            [vec![], vec![]],
        ] {
            assert_eq!(classify_udp_walk(&odd), UdpWalk::Unknown, "{odd:?}");
        }
    }

    #[test]
    fn what_it_saw_reads_as_a_list() {
        let report = ProbeReport {
            rules: KernelRules::UNKNOWN,
            seen: Some([vec![OK, OK, INUSE], vec![OK, OK, OK]]),
            error: None,
            took: Duration::ZERO,
        };
        assert_eq!(
            report.seen_text(),
            "RA ok, BOTH ok, RP EADDRINUSE; BOTH ok, RA ok, RP ok"
        );
        let failed = ProbeReport {
            seen: None,
            error: Some(ProbeError::Timeout(TIMEOUT)),
            ..report
        };
        assert_eq!(failed.seen_text(), "cannot probe: no answer within 2s");
    }
}
