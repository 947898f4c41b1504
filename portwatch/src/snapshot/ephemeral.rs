//! The ephemeral-port listing: in every network namespace, the range the
//! kernel takes local ports from for outgoing connections
//! (`net.ipv4.ip_local_port_range`, which IPv6 uses too, minus
//! `net.ipv4.ip_local_reserved_ports`), and how many of its ports each
//! destination's connections use.
//!
//! Why a listing and not events: connections come far faster than binds,
//! and what runs out is a count per destination, which one sock_diag dump
//! gives exactly. A TCP connect needs a local port that is free for its own
//! (local address, remote address, remote port) only, so the same port
//! serves many destinations; the busiest destination runs out first.
//!
//! Both sysctls are per network namespace: they are read by the worker
//! thread while it is inside the namespace (`/proc/sys/net` answers for the
//! reader's namespace). The sockets are tallied on that thread too, so a
//! namespace with 100k connections leaves a map of destinations behind, not
//! 100k records.

use std::{
    collections::{HashMap, HashSet},
    fs, io,
    net::IpAddr,
    ops::RangeInclusive,
    time::{Duration, Instant, SystemTime},
};

use netlink_packet_sock_diag::constants::{
    TCP_ESTABLISHED, TCP_LISTEN, TCP_SYN_SENT, TCP_TIME_WAIT,
};
use serde::Serialize;

use super::{
    SnapshotError,
    addresses::{self, LocalAddresses},
    diag::{Diag, DiagSocket, Dump},
    in_each_namespace, netns, owners,
};
use crate::{
    map::Holder,
    snapshot::owners::Place,
    socket::{NetnsCookie, Protocol},
};

/// The range sysctl, read inside the namespace.
const RANGE_SYSCTL: &str = "/proc/sys/net/ipv4/ip_local_port_range";
/// The reserved-ports sysctl, read inside the namespace.
const RESERVED_SYSCTL: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";
/// The first port a bind needs no CAP_NET_BIND_SERVICE for, read inside
/// the namespace while it is here: the daemon infers EACCES from it where
/// no outcome hook runs.
const UNPRIVILEGED_SYSCTL: &str = "/proc/sys/net/ipv4/ip_unprivileged_port_start";

/// How many destinations per namespace get their processes looked up.
pub const OWNED_DESTINATIONS: usize = 10;
/// How many destinations a namespace's listing keeps (the API shows at most
/// this many); the rest are counted.
pub const KEPT_DESTINATIONS: usize = 1000;
/// How many sockets of a destination are looked up for its processes.
const SAMPLED_SOCKETS: usize = 4;

/// `net.ipv4.ip_local_port_range`: the ports connect() and bind(0) choose
/// from, both ends included.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct PortRange {
    pub low: u16,
    pub high: u16,
}

impl PortRange {
    pub fn contains(&self, port: u16) -> bool {
        (self.low..=self.high).contains(&port)
    }

    /// How many ports the range has.
    pub fn len(&self) -> u32 {
        u32::from(self.high.saturating_sub(self.low)) + 1
    }

    /// Never true: a range has at least one port.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// `LOW<whitespace>HIGH`, as the sysctl reads.
    pub fn parse(text: &str) -> Option<PortRange> {
        let mut words = text.split_ascii_whitespace();
        let low = words.next()?.parse().ok()?;
        let high = words.next()?.parse().ok()?;
        (words.next().is_none() && low <= high).then_some(PortRange { low, high })
    }
}

/// `net.ipv4.ip_local_reserved_ports`: `8080,9000-9010`, or empty.
pub fn parse_reserved(text: &str) -> Option<Vec<RangeInclusive<u16>>> {
    let text = text.trim();
    if text.is_empty() {
        return Some(Vec::new());
    }
    text.split(',')
        .map(|part| match part.split_once('-') {
            Some((low, high)) => {
                let (low, high) = (low.trim().parse().ok()?, high.trim().parse().ok()?);
                (low <= high).then_some(low..=high)
            }
            None => part.trim().parse().ok().map(|port| port..=port),
        })
        .collect()
}

/// How many of `range`'s ports `reserved` takes out of it.
pub fn reserved_in(range: PortRange, reserved: &[RangeInclusive<u16>]) -> u32 {
    // The sysctl prints disjoint, ascending ranges; a set still counts a
    // port twice only once.
    let mut ports = HashSet::new();
    for part in reserved {
        let low = (*part.start()).max(range.low);
        let high = (*part.end()).min(range.high);
        if low <= high {
            ports.extend(low..=high);
        }
    }
    ports.len() as u32
}

/// A destination of outgoing connections: what a TCP connect needs a free
/// local port for. IPv4-mapped IPv6 addresses are folded to IPv4, as the
/// kernel connects them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct DestinationKey {
    pub protocol: Protocol,
    pub local_address: IpAddr,
    pub remote_address: IpAddr,
    pub remote_port: u16,
}

/// How many sockets to a destination are in each state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct StateCounts {
    pub established: u32,
    pub syn_sent: u32,
    /// Closed, but the port stays taken until the timer ends (60 s).
    pub time_wait: u32,
    /// FIN_WAIT, CLOSE_WAIT, LAST_ACK, CLOSING: closing, port still taken.
    pub other: u32,
}

impl StateCounts {
    /// Every socket counted: each holds one local port.
    pub fn total(&self) -> u32 {
        self.established + self.syn_sent + self.time_wait + self.other
    }

    fn count(&mut self, tcp_state: u8) {
        let slot = match tcp_state {
            TCP_ESTABLISHED => &mut self.established,
            TCP_SYN_SENT => &mut self.syn_sent,
            TCP_TIME_WAIT => &mut self.time_wait,
            _ => &mut self.other,
        };
        *slot += 1;
    }
}

/// The outgoing connections to one destination.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Destination {
    #[serde(flatten)]
    pub key: DestinationKey,
    #[serde(flatten)]
    pub states: StateCounts,
    /// Processes holding a few of its sockets (looked up for the busiest
    /// [`OWNED_DESTINATIONS`] only), by pid.
    pub processes: Vec<Holder>,
    /// Inodes of up to [`SAMPLED_SOCKETS`] of its sockets, for that lookup.
    #[serde(skip)]
    sampled: Vec<u64>,
}

impl Destination {
    /// A destination with these counts and no processes.
    pub fn new(key: DestinationKey, states: StateCounts) -> Destination {
        Destination {
            key,
            states,
            processes: Vec::new(),
            sampled: Vec::new(),
        }
    }
}

/// What one namespace's listing found.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct NetnsUsage {
    pub netns: NetnsCookie,
    pub range: PortRange,
    /// How many ports of the range are reserved.
    pub reserved: u32,
    /// The reserved ports, as the sysctl lists them.
    #[serde(skip)]
    pub reserved_ranges: Vec<RangeInclusive<u16>>,
    /// `net.ipv4.ip_unprivileged_port_start`; `None` where unreadable.
    #[serde(skip)]
    pub unprivileged_port_start: Option<u16>,
    /// The namespace's addresses; `None` where unreadable.
    #[serde(skip)]
    pub local_addresses: Option<LocalAddresses>,
    /// The [`KEPT_DESTINATIONS`] busiest destinations with outgoing TCP
    /// connections from a port in the range, busiest first.
    pub destinations: Vec<Destination>,
    /// How many destinations there are in all.
    pub destinations_total: usize,
    /// Distinct ports of the range that UDP sockets hold (bound to port 0,
    /// or autobound by connect or sendto). UDP takes its port for every
    /// destination, so these count against the whole range.
    pub udp_ports: u32,
    /// Where the processes of the busiest destination live, when looked up.
    pub place: Place,
    /// Which of the sockets the listing was asked about it found here.
    #[serde(skip)]
    pub seen: HashSet<u64>,
    /// Its names under /run/netns (`ip netns add NAME`), if any.
    pub names: Vec<String>,
    /// New outgoing TCP connections since the kernel programs were loaded,
    /// as they counted them; `None` where not counted.
    pub connects: Option<u64>,
    /// What changed since the previous listing of the namespace.
    pub trend: Option<Trend>,
}

/// How a namespace's use moved between two listings.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Trend {
    /// Seconds between the listings.
    pub seconds: f64,
    /// New outgoing TCP connections per second (`None` when not counted).
    pub connect_rate: Option<f64>,
    /// The net change per second of the sockets to this listing's busiest
    /// destination (connections opened less those gone, TIME_WAIT ended).
    pub busiest_growth: f64,
}

impl NetnsUsage {
    /// The sockets to the destination `key`, 0 if it has none.
    pub fn in_use_to(&self, key: &DestinationKey) -> u32 {
        self.destinations
            .iter()
            .find(|d| d.key == *key)
            .map_or(0, |d| d.states.total())
    }

    /// This listing's trend against `previous`, an earlier listing of the
    /// same namespace `seconds` before.
    pub fn trend_since(&self, previous: &NetnsUsage, seconds: f64) -> Option<Trend> {
        if seconds <= 0.0 {
            return None;
        }
        let connect_rate = self
            .connects
            .zip(previous.connects)
            .map(|(now, then)| now.saturating_sub(then) as f64 / seconds);
        let busiest_growth = self.destinations.first().map_or(0.0, |busiest| {
            let then = previous.in_use_to(&busiest.key);
            (f64::from(busiest.states.total()) - f64::from(then)) / seconds
        });
        Some(Trend {
            seconds,
            connect_rate,
            busiest_growth,
        })
    }
}

impl NetnsUsage {
    pub fn is_reserved(&self, port: u16) -> bool {
        self.reserved_ranges.iter().any(|r| r.contains(&port))
    }
}

/// Sockets of one namespace, tallied as they are listed.
#[derive(Debug, Default)]
pub(crate) struct Tally {
    /// TCP ports something listens on: connections from them are accepted
    /// ones, which took no port from the range.
    listening: HashSet<u16>,
    /// Outgoing candidates: (local port, destination, TCP state, inode).
    connections: Vec<(u16, DestinationKey, u8, u64)>,
    udp_ports: HashSet<u16>,
    /// The cookies asked about that were listed.
    seen: HashSet<u64>,
}

impl Tally {
    /// Counts one listed socket against `range`; notes it if its cookie is
    /// in `wanted`.
    pub fn add(&mut self, socket: &DiagSocket, range: PortRange, wanted: &HashSet<u64>) {
        let facts = &socket.facts;
        if facts.cookie != 0 && wanted.contains(&facts.cookie) {
            self.seen.insert(facts.cookie);
        }
        match facts.protocol {
            Protocol::Udp | Protocol::UdpLite => {
                if range.contains(facts.port) {
                    self.udp_ports.insert(facts.port);
                }
            }
            _ if socket.tcp_state == TCP_LISTEN => {
                self.listening.insert(facts.port);
            }
            _ if facts.state.is_listening_or_bound() || !range.contains(facts.port) => {}
            _ => {
                let key = DestinationKey {
                    protocol: facts.protocol,
                    local_address: folded(facts.address),
                    remote_address: folded(socket.peer.0),
                    remote_port: socket.peer.1,
                };
                self.connections
                    .push((facts.port, key, socket.tcp_state, socket.inode));
            }
        }
    }

    /// The namespace's usage: destinations busiest first (then in key
    /// order, so equal ones keep their place from one listing to the next).
    pub fn finish(
        self,
        netns: NetnsCookie,
        range: PortRange,
        reserved_ranges: Vec<RangeInclusive<u16>>,
    ) -> NetnsUsage {
        let mut by_key: HashMap<DestinationKey, (StateCounts, Vec<u64>)> = HashMap::new();
        for (port, key, tcp_state, inode) in self.connections {
            if self.listening.contains(&port) {
                continue;
            }
            let (states, sampled) = by_key.entry(key).or_default();
            states.count(tcp_state);
            if inode != 0 && sampled.len() < SAMPLED_SOCKETS {
                sampled.push(inode);
            }
        }
        let mut destinations: Vec<Destination> = by_key
            .into_iter()
            .map(|(key, (states, sampled))| Destination {
                key,
                states,
                processes: Vec::new(),
                sampled,
            })
            .collect();
        destinations.sort_unstable_by(|a, b| {
            b.states
                .total()
                .cmp(&a.states.total())
                .then(a.key.cmp(&b.key))
        });
        let destinations_total = destinations.len();
        destinations.truncate(KEPT_DESTINATIONS);
        NetnsUsage {
            netns,
            range,
            reserved: reserved_in(range, &reserved_ranges),
            reserved_ranges,
            unprivileged_port_start: None,
            local_addresses: None,
            destinations,
            destinations_total,
            udp_ports: self.udp_ports.len() as u32,
            place: Place::default(),
            seen: self.seen,
            names: Vec::new(),
            connects: None,
            trend: None,
        }
    }
}

/// `::ffff:a.b.c.d` as `a.b.c.d`.
pub(crate) fn folded(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

/// Every namespace's usage.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EphemeralListing {
    pub namespaces: Vec<NetnsUsage>,
    /// Namespaces that could not be listed.
    pub skipped: usize,
    /// When the listing started.
    pub taken_at: SystemTime,
    /// How long it took, processes included.
    pub elapsed: Duration,
}

/// Lists every namespace's range and connections, and the processes of each
/// namespace's busiest destinations; notes which sockets of `wanted` (by
/// cookie) still exist.
///
/// Fails only when /proc cannot be read or the caller's own namespace cannot
/// be listed.
///
/// `listening` has each namespace's TCP listening ports, from the live map:
/// connections from them are accepted ones, which took no port from the
/// range. Listeners themselves are not dumped (a host may have 100k).
pub fn list(
    wanted: &HashSet<u64>,
    listening: &HashMap<NetnsCookie, HashSet<u16>>,
) -> Result<EphemeralListing, SnapshotError> {
    let started = Instant::now();
    let taken_at = SystemTime::now();
    let own = netns::own_key()?;
    let mut skipped_netns = Vec::new();
    let found = netns::discover(own, &mut skipped_netns)?;
    let listed = in_each_namespace(&found, own, |diag| list_here(diag, wanted, listening))?;
    let mut namespaces = Vec::with_capacity(listed.len());
    let mut skipped = skipped_netns.len();
    for (ns, result) in found.iter().zip(listed) {
        match result {
            Ok(mut usage) => {
                usage.names = ns.names.clone();
                namespaces.push(usage);
            }
            Err(error) if ns.key == own => return Err(error),
            Err(_) => skipped += 1,
        }
    }
    drop(found);
    attach_processes(&mut namespaces)?;
    Ok(EphemeralListing {
        namespaces,
        skipped,
        taken_at,
        elapsed: started.elapsed(),
    })
}

/// The namespace the calling thread is in, through `diag`.
fn list_here(
    diag: &mut Diag,
    wanted: &HashSet<u64>,
    listening: &HashMap<NetnsCookie, HashSet<u16>>,
) -> Result<NetnsUsage, SnapshotError> {
    let netns = diag.netns_cookie()?;
    let sysctl = |path: &str| {
        fs::read_to_string(path).map_err(|source| SnapshotError::Proc {
            path: path.into(),
            source,
        })
    };
    let unreadable = |path: &str, text: &str| SnapshotError::Proc {
        path: path.into(),
        source: io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unexpected contents {:?}", text.trim()),
        ),
    };
    let text = sysctl(RANGE_SYSCTL)?;
    let range = PortRange::parse(&text).ok_or_else(|| unreadable(RANGE_SYSCTL, &text))?;
    // Kernels without reserved ports (none since 2.6.35) reserve none.
    let reserved = match fs::read_to_string(RESERVED_SYSCTL) {
        Ok(text) => parse_reserved(&text).ok_or_else(|| unreadable(RESERVED_SYSCTL, &text))?,
        Err(error) if error.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(source) => {
            return Err(SnapshotError::Proc {
                path: RESERVED_SYSCTL.into(),
                source,
            });
        }
    };
    let mut sockets = Vec::new();
    diag.dump_all(netns, Dump::Connections, &mut sockets)?;
    let mut tally = Tally {
        listening: listening.get(&netns).cloned().unwrap_or_default(),
        ..Tally::default()
    };
    for socket in &sockets {
        tally.add(socket, range, wanted);
    }
    drop(sockets);
    let mut usage = tally.finish(netns, range, reserved);
    usage.unprivileged_port_start = fs::read_to_string(UNPRIVILEGED_SYSCTL)
        .ok()
        .and_then(|text| text.trim().parse().ok());
    usage.local_addresses = addresses::read_here();
    Ok(usage)
}

/// Names the processes of each namespace's busiest destinations: one pass
/// over `/proc/<pid>/fd` for all of them.
fn attach_processes(namespaces: &mut [NetnsUsage]) -> Result<(), SnapshotError> {
    let wanted: HashSet<u64> = namespaces
        .iter()
        .flat_map(|ns| ns.destinations.iter().take(OWNED_DESTINATIONS))
        .flat_map(|destination| destination.sampled.iter().copied())
        .collect();
    if wanted.is_empty() {
        return Ok(());
    }
    let scan = owners::scan_fds(&wanted)?;
    let mut processes: HashMap<u32, Option<owners::ProcInfo>> = HashMap::new();
    for ns in namespaces.iter_mut() {
        for destination in ns.destinations.iter_mut().take(OWNED_DESTINATIONS) {
            for inode in &destination.sampled {
                for holder in scan.by_inode.get(inode).into_iter().flatten() {
                    let info = processes
                        .entry(holder.pid)
                        .or_insert_with(|| owners::process_info(holder.pid).ok());
                    let Some(info) = info else { continue };
                    if ns.place == Place::default() {
                        ns.place = info.place.clone();
                    }
                    if !destination.processes.iter().any(|p| p.pid == holder.pid) {
                        destination.processes.push(Holder {
                            pid: holder.pid,
                            process: info.process.clone(),
                        });
                    }
                }
            }
            destination.processes.sort_by_key(|p| p.pid);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::socket::{Family, ShareOptions, SockState, SocketFacts};

    const RANGE: PortRange = PortRange {
        low: 40000,
        high: 40009,
    };

    fn socket(protocol: Protocol, port: u16, tcp_state: u8, peer: (IpAddr, u16)) -> DiagSocket {
        let state = crate::snapshot::diag::sock_state(protocol, tcp_state, peer.1)
            .unwrap_or(SockState::TimeWait);
        DiagSocket {
            facts: SocketFacts {
                cookie: u64::from(port),
                netns: 1,
                protocol,
                family: Family::Ipv4,
                address: IpAddr::V4(Ipv4Addr::LOCALHOST),
                port,
                state,
                options: ShareOptions::default(),
                uid: Some(0),
                bound_dev_if: 0,
            },
            // The kernel gives TIME_WAIT entries no inode.
            inode: if tcp_state == TCP_TIME_WAIT {
                0
            } else {
                u64::from(port) + 1000
            },
            peer,
            tcp_state,
        }
    }

    fn to(port: u16) -> (IpAddr, u16) {
        (IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3)), port)
    }

    #[test]
    fn ranges_parse_as_the_sysctls_print_them() {
        assert_eq!(
            PortRange::parse("32768\t60999\n"),
            Some(PortRange {
                low: 32768,
                high: 60999
            })
        );
        assert_eq!(PortRange::parse("32768\t60999\n").unwrap().len(), 28232);
        for bad in ["", "1", "5 4", "1 2 3", "a b", "1 70000"] {
            assert_eq!(PortRange::parse(bad), None, "{bad:?}");
        }
        assert_eq!(parse_reserved("\n"), Some(vec![]));
        assert_eq!(
            parse_reserved("8080,40002-40004\n"),
            Some(vec![8080..=8080, 40002..=40004])
        );
        for bad in ["x", "1-", "5-4", "1,,2"] {
            assert_eq!(parse_reserved(bad), None, "{bad:?}");
        }
        let reserved = parse_reserved("8080,40002-40004,40009-40100").unwrap();
        assert_eq!(reserved_in(RANGE, &reserved), 4);
        assert_eq!(reserved_in(RANGE, &[1..=39999]), 0);
    }

    #[test]
    fn destinations_are_counted_by_state_busiest_first() {
        let mut tally = Tally::default();
        let sockets = [
            socket(Protocol::Tcp, 40000, TCP_ESTABLISHED, to(443)),
            socket(Protocol::Tcp, 40001, TCP_SYN_SENT, to(443)),
            socket(Protocol::Tcp, 40002, TCP_TIME_WAIT, to(443)),
            // The same local port serves another destination.
            socket(Protocol::Tcp, 40000, TCP_ESTABLISHED, to(80)),
            // Outside the range: explicitly bound, not counted.
            socket(Protocol::Tcp, 5000, TCP_ESTABLISHED, to(443)),
        ];
        for s in &sockets {
            tally.add(s, RANGE, &HashSet::new());
        }
        let usage = tally.finish(1, RANGE, vec![]);
        let busiest = &usage.destinations[0];
        assert_eq!(busiest.key.remote_port, 443);
        assert_eq!(
            busiest.states,
            StateCounts {
                established: 1,
                syn_sent: 1,
                time_wait: 1,
                other: 0
            }
        );
        assert_eq!(busiest.sampled.len(), 2, "TIME_WAIT has no inode");
        assert_eq!(usage.destinations[1].key.remote_port, 80);
        assert_eq!(usage.destinations.len(), 2);
    }

    #[test]
    fn accepted_connections_and_listeners_take_nothing_from_the_range() {
        let mut tally = Tally::default();
        // A server listening inside the range, and a client connected to it:
        // the server's side of that connection is an accepted one.
        let peer = (IpAddr::V4(Ipv4Addr::LOCALHOST), 40001);
        for s in [
            socket(
                Protocol::Tcp,
                40005,
                TCP_LISTEN,
                (Ipv4Addr::UNSPECIFIED.into(), 0),
            ),
            socket(
                Protocol::Tcp,
                40005,
                TCP_ESTABLISHED,
                (Ipv4Addr::LOCALHOST.into(), 40001),
            ),
            socket(
                Protocol::Tcp,
                40001,
                TCP_ESTABLISHED,
                (Ipv4Addr::LOCALHOST.into(), 40005),
            ),
        ] {
            tally.add(&s, RANGE, &HashSet::new());
        }
        let usage = tally.finish(1, RANGE, vec![]);
        assert_eq!(usage.destinations.len(), 1);
        assert_eq!(usage.destinations[0].key.remote_port, 40005);
        assert_eq!(usage.destinations[0].key.remote_address, peer.0);
    }

    #[test]
    fn udp_ports_count_once_whatever_their_destinations() {
        let mut tally = Tally::default();
        for s in [
            socket(Protocol::Udp, 40000, 7, (Ipv4Addr::UNSPECIFIED.into(), 0)),
            socket(Protocol::Udp, 40001, TCP_ESTABLISHED, to(53)),
            socket(Protocol::Udp, 40001, TCP_ESTABLISHED, to(54)),
            socket(Protocol::Udp, 53, 7, (Ipv4Addr::UNSPECIFIED.into(), 0)),
        ] {
            tally.add(&s, RANGE, &HashSet::new());
        }
        let usage = tally.finish(1, RANGE, vec![]);
        assert_eq!(usage.udp_ports, 2);
        assert!(usage.destinations.is_empty());
    }

    #[test]
    fn mapped_addresses_fold_to_ipv4() {
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().unwrap();
        assert_eq!(folded(mapped), IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3)));
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        assert_eq!(folded(v6), v6);
    }
}
