//! What the daemon knows at any moment: the live map, recent failures and
//! the counters behind the metrics. Pure data and logic; the pipeline
//! ([`crate::watch`]) feeds it and the HTTP API and metrics read it, each
//! under a short lock.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    net::{IpAddr, SocketAddr},
    time::{Duration, SystemTime},
};

use serde::Serialize;

use crate::{
    event::{Errno, EventKind, Family, PortEvent, Protocol},
    explain::{self, PortExplanation},
    failures::{Agreement, FailureLog},
    health::ListingFailure,
    map::{Drift, PortMap},
    rules::KernelRules,
    snapshot::ephemeral::{EphemeralListing, PortRange},
    socket::NetnsCookie,
};

/// Counters for metrics and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct WatchStats {
    /// Reconciliations run, and the drift they corrected in total.
    pub reconciliations: u64,
    pub drift: Drift,
    /// Records the kernel lost (all hooks), as last read.
    pub dropped: u64,
    /// Cookies that could not be handed to the kernel's TRACKED map.
    pub untracked: u64,
    /// How long the start-up listing and its merge into the map took: what
    /// the daemon waits for before it is ready.
    pub startup_snapshot: Option<Duration>,
    /// How long reading that listing's owners and options, after ready,
    /// took (none until done).
    pub startup_owners: Option<Duration>,
    /// How long the latest reconciliation's snapshot and merge took (none
    /// before the first).
    pub reconcile_snapshot: Option<Duration>,
}

/// A port label of the per-port failure counter: explicit ports up to a cap,
/// then everything else under one label, so the series stay bounded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PortLabel {
    Port(u16),
    Other,
}

/// Event counters, updated as events happen (not computed at scrape).
#[derive(Clone, Debug, Default)]
pub struct Counters {
    /// By kind name (`bind`, `bind_failed`, ...).
    pub events: BTreeMap<&'static str, u64>,
    /// Successful binds by (protocol, family).
    pub binds: BTreeMap<(Protocol, Family), u64>,
    /// Failed binds by (errno name, protocol, family).
    pub bind_failures: BTreeMap<(String, Protocol, Family), u64>,
    /// Failed binds by (port, protocol, errno name), ports capped.
    pub port_bind_failures: HashMap<(PortLabel, Protocol, String), u64>,
    /// Failed listens by (errno name, protocol).
    pub listen_failures: BTreeMap<(String, Protocol), u64>,
    /// Connects that found no local port, by (errno name, protocol, family).
    pub connect_failures: BTreeMap<(String, Protocol, Family), u64>,
    /// Failed binds and listens whose errno the kernel reported, by how the
    /// rules' replay compared (see [`crate::failures::infer_errno`]).
    pub inference_checks: BTreeMap<Agreement, u64>,
    /// Distinct explicit ports in `port_bind_failures`, and the cap.
    ports_seen: std::collections::HashSet<u16>,
    pub port_cap: usize,
}

impl Counters {
    /// Counters with at most `port_cap` explicit ports per-port.
    pub fn new(port_cap: usize) -> Counters {
        Counters {
            port_cap,
            ..Counters::default()
        }
    }

    /// Counts one event.
    pub fn count(&mut self, event: &PortEvent) {
        *self.events.entry(event.kind.name()).or_default() += 1;
        let errno = || event.errno.unwrap_or(Errno::UNKNOWN).name().into_owned();
        match event.kind {
            EventKind::Bind => {
                *self
                    .binds
                    .entry((event.protocol, event.family))
                    .or_default() += 1;
            }
            EventKind::BindFailed => {
                *self
                    .bind_failures
                    .entry((errno(), event.protocol, event.family))
                    .or_default() += 1;
                let label = self.port_label(event.port);
                *self
                    .port_bind_failures
                    .entry((label, event.protocol, errno()))
                    .or_default() += 1;
            }
            EventKind::ListenFailed => {
                *self
                    .listen_failures
                    .entry((errno(), event.protocol))
                    .or_default() += 1;
            }
            EventKind::ConnectFailed => {
                *self
                    .connect_failures
                    .entry((errno(), event.protocol, event.family))
                    .or_default() += 1;
            }
            EventKind::Listen | EventKind::ListenStop | EventKind::Close | EventKind::Connected => {
            }
        }
    }

    /// Counts one comparison of an inferred errno with the kernel's.
    pub fn check_inference(&mut self, agreement: Agreement) {
        *self.inference_checks.entry(agreement).or_default() += 1;
    }

    /// Port 0 (an ephemeral request) is never an explicit label.
    fn port_label(&mut self, port: u16) -> PortLabel {
        if port == 0 {
            return PortLabel::Other;
        }
        if self.ports_seen.contains(&port) {
            return PortLabel::Port(port);
        }
        if self.ports_seen.len() < self.port_cap {
            self.ports_seen.insert(port);
            return PortLabel::Port(port);
        }
        PortLabel::Other
    }
}

/// A port and protocol the operator expects to be listened on in the
/// daemon's own network namespace (`expected_listeners = ["443/tcp"]`),
/// written as in /etc/services. Its listener count is exported even at 0,
/// so that an alert can say when the last listener went away.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ExpectedListener {
    pub port: u16,
    pub protocol: Protocol,
}

impl std::str::FromStr for ExpectedListener {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let wrong = || format!("{text:?} is not a port and protocol; write it like \"443/tcp\"");
        let (port, protocol) = text.trim().split_once('/').ok_or_else(wrong)?;
        let port = port
            .parse::<u16>()
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(wrong)?;
        let protocol = Protocol::from_name(protocol).ok_or_else(wrong)?;
        Ok(ExpectedListener { port, protocol })
    }
}

impl std::fmt::Display for ExpectedListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.port, self.protocol.name())
    }
}

/// Everything the daemon knows.
#[derive(Debug)]
pub struct State {
    pub map: PortMap,
    pub failures: FailureLog,
    pub stats: WatchStats,
    pub counters: Counters,
    /// Records the kernel lost, by hook.
    pub drops: Vec<(&'static str, u64)>,
    /// Records that did not decode.
    pub decode_errors: u64,
    /// Each hook and the path it uses (`bind_outcome` -> `tracepoint`).
    pub hooks: Vec<(&'static str, &'static str)>,
    /// Programs attached and the start-up snapshot merged.
    pub ready: bool,
    /// The namespace whose `localhost` explanations are about.
    pub host_netns: NetnsCookie,
    /// The order in which this machine's clients try `localhost`.
    pub localhost: Vec<IpAddr>,
    /// The host's ephemeral range (`net.ipv4.ip_local_port_range`): the
    /// ports outside it are the ones services choose.
    pub ephemeral_range: PortRange,
    /// Ports that should always have a listener in `host_netns`.
    pub expected: Vec<ExpectedListener>,
    /// What the kernel's conflict rules do where kernels differ, as probed
    /// at start (unknown until then, and when the probe cannot tell).
    pub kernel: KernelRules,
    /// The sock_diag listing's failure while it fails (`None` once one
    /// works): the daemon then sees live events only.
    pub listing: Option<ListingFailure>,
    /// The latest ephemeral port listing (none before the first).
    pub ephemeral: Option<EphemeralListing>,
    /// How many sockets of the start-up listing still wait for their
    /// owners and options (`None` once read, or never asked).
    pub owners_pending: Option<usize>,
    /// Why the start-up sockets' owners could not be read, until a
    /// reconciliation reads them.
    pub owners_failure: Option<String>,
    /// TCP sockets bound to port 0 that then connected, newest last, at
    /// most [`EARLY_BINDS`].
    pub early_binds: VecDeque<EarlyBind>,
    /// Cookies the kernel programs track but the map dropped outside the
    /// pipeline (a connected bind an ephemeral listing found gone): the
    /// pipeline untracks them at its next reconciliation.
    pub untrack_later: Vec<u64>,
}

/// How many bind-before-connect sightings are kept.
pub const EARLY_BINDS: usize = 1000;

/// A TCP socket bound to port 0 (without IP_BIND_ADDRESS_NO_PORT, which
/// defers the choice to connect()) that then connected: its port was taken
/// from the range for every destination, not only the one it went to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EarlyBind {
    pub time: SystemTime,
    pub netns: NetnsCookie,
    pub pid: u32,
    pub process: String,
    /// The local address and port it was bound to.
    pub address: IpAddr,
    pub port: u16,
    pub peer: SocketAddr,
}

/// How long before a listing a failed connect may be for the listing to
/// explain it.
const CAUSE_WINDOW: Duration = Duration::from_secs(60);

impl State {
    /// Gives the connects that failed shortly before the latest ephemeral
    /// listing, and have no cause yet, what that listing says of their
    /// destination. Run after each listing; a failure asks for one at once.
    pub fn explain_connect_failures(&mut self) {
        let Some(listing) = &self.ephemeral else {
            return;
        };
        let since = listing
            .taken_at
            .checked_sub(CAUSE_WINDOW)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let causes: Vec<Option<String>> = self
            .failures
            .newest()
            .take_while(|f| f.time >= since)
            .map(|f| {
                (f.event.kind == EventKind::ConnectFailed && f.cause.is_none())
                    .then(|| crate::ephemeral::connect_failure_cause(self, &f.event, f.time))
                    .flatten()
            })
            .collect();
        for (failure, cause) in self.failures.newest_mut().zip(causes) {
            if cause.is_some() {
                failure.cause = cause;
            }
        }
    }

    /// Remembers a bind-before-connect, forgetting the oldest past
    /// [`EARLY_BINDS`].
    pub fn record_early_bind(&mut self, early: EarlyBind) {
        if self.early_binds.len() == EARLY_BINDS {
            self.early_binds.pop_front();
        }
        self.early_binds.push_back(early);
    }
}

/// Linux's default ephemeral range (`net.ipv4.ip_local_port_range`).
pub const LINUX_EPHEMERAL_RANGE: PortRange = PortRange {
    low: 32768,
    high: 60999,
};

impl State {
    pub fn new(failure_log: usize, port_cap: usize) -> State {
        State {
            map: PortMap::default(),
            failures: FailureLog::new(failure_log),
            stats: WatchStats::default(),
            counters: Counters::new(port_cap),
            drops: Vec::new(),
            decode_errors: 0,
            hooks: Vec::new(),
            ready: false,
            host_netns: 0,
            localhost: Vec::new(),
            ephemeral_range: LINUX_EPHEMERAL_RANGE,
            expected: Vec::new(),
            kernel: KernelRules::UNKNOWN,
            ephemeral: None,
            owners_pending: None,
            owners_failure: None,
            early_binds: VecDeque::new(),
            untrack_later: Vec::new(),
            listing: None,
        }
    }

    /// How many listeners each expected port has in `host_netns`.
    pub fn expected_counts(&self) -> Vec<(ExpectedListener, usize)> {
        self.expected
            .iter()
            .map(|&expected| {
                let n = self
                    .map
                    .listeners_on(expected.port)
                    .iter()
                    .filter(|entry| {
                        // An unknown own namespace (0) counts every one.
                        entry.facts.protocol == expected.protocol
                            && (self.host_netns == 0 || entry.facts.netns == self.host_netns)
                    })
                    .count();
                (expected, n)
            })
            .collect()
    }

    /// The explanation of one port.
    pub fn explain(&self, port: u16) -> PortExplanation {
        explain::explain(
            port,
            &self.map.listeners_on(port),
            self.host_netns,
            &self.localhost,
        )
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn failed(port: u16, errno: Errno) -> PortEvent {
        let localhost = IpAddr::V4(Ipv4Addr::LOCALHOST);
        PortEvent {
            errno: Some(errno),
            ..PortEvent::example(EventKind::BindFailed, Protocol::Tcp, localhost, port, 1)
        }
    }

    #[test]
    fn failures_are_counted_by_errno_and_by_port_up_to_the_cap() {
        let mut counters = Counters::new(2);
        for port in [8000, 8000, 8001, 8002, 8003] {
            counters.count(&failed(port, Errno::EADDRINUSE));
        }
        counters.count(&failed(80, Errno::EACCES));
        let key = ("EADDRINUSE".to_string(), Protocol::Tcp, Family::Ipv4);
        assert_eq!(counters.bind_failures[&key], 5);
        let per_port = |label| {
            counters
                .port_bind_failures
                .get(&(label, Protocol::Tcp, "EADDRINUSE".to_string()))
                .copied()
        };
        assert_eq!(per_port(PortLabel::Port(8000)), Some(2));
        assert_eq!(per_port(PortLabel::Port(8001)), Some(1));
        assert_eq!(per_port(PortLabel::Port(8002)), None, "past the cap");
        assert_eq!(per_port(PortLabel::Other), Some(2));
        assert_eq!(counters.events["bind_failed"], 6);
    }

    #[test]
    fn an_ephemeral_request_is_never_an_explicit_port() {
        let mut counters = Counters::new(10);
        counters.count(&failed(0, Errno::EADDRINUSE));
        assert!(
            counters
                .port_bind_failures
                .keys()
                .all(|(label, _, _)| *label == PortLabel::Other)
        );
    }

    #[test]
    fn expected_listeners_parse_as_in_etc_services() {
        let parsed: ExpectedListener = "443/TCP".parse().unwrap();
        assert_eq!((parsed.port, parsed.protocol), (443, Protocol::Tcp));
        assert_eq!(parsed.to_string(), "443/tcp");
        for bad in ["443", "0/tcp", "70000/udp", "53/icmp", "/tcp", ""] {
            let err = bad.parse::<ExpectedListener>().unwrap_err();
            assert!(err.contains("443/tcp"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn expected_listeners_count_only_the_own_namespace_and_protocol() {
        let mut state = State::new(10, 10);
        state.host_netns = 1;
        state.expected = vec!["8000/tcp".parse().unwrap(), "8000/udp".parse().unwrap()];
        let any = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
        let mut listen = |cookie, netns| {
            let mut event = PortEvent::example(EventKind::Bind, Protocol::Tcp, any, 8000, cookie);
            event.netns = Some(netns);
            state.map.apply(&event, SystemTime::UNIX_EPOCH);
            event.kind = EventKind::Listen;
            state.map.apply(&event, SystemTime::UNIX_EPOCH);
        };
        listen(1, 1);
        listen(2, 2);
        let counts: Vec<usize> = state
            .expected_counts()
            .into_iter()
            .map(|(_, n)| n)
            .collect();
        assert_eq!(counts, [1, 0], "tcp in netns 1 only; no udp");
        state.host_netns = 0;
        assert_eq!(state.expected_counts()[0].1, 2, "unknown namespace: all");
    }
}
