//! What the daemon knows at any moment: the live map, recent failures and
//! the counters behind the metrics. Pure data and logic; the pipeline
//! ([`crate::watch`]) feeds it and the HTTP API and metrics read it, each
//! under a short lock.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
};

use serde::Serialize;

use crate::{
    event::{Errno, EventKind, Family, PortEvent, Protocol},
    explain::{self, PortExplanation},
    failures::FailureLog,
    map::{Drift, PortMap},
    socket::NetnsCookie,
};

/// Counters for metrics and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct WatchStats {
    /// Events applied.
    pub events: u64,
    /// Reconciliations run, and the drift they corrected in total.
    pub reconciliations: u64,
    pub drift: Drift,
    /// What the last reconciliation corrected (0 once the map is exact).
    pub last_drift: Drift,
    /// Records the kernel lost (all hooks), as last read.
    pub dropped: u64,
    /// Cookies that could not be handed to the kernel's TRACKED map.
    pub untracked: u64,
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
            EventKind::Listen | EventKind::ListenStop | EventKind::Close => {}
        }
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
}

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
        }
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
}
