//! What the daemon's `/metrics` serves, rendered by the real [`Metrics`]
//! from a state in which every family has samples (the encoder leaves out a
//! family with none). The tests of shipped files that query metrics (alert
//! rules, the dashboard) check them against this, not a list kept by hand.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

use portwatch::{
    event::{Errno, EventKind, PortEvent, Protocol},
    map::Drift,
    metrics::{BuildInfo, Metrics},
    snapshot::ephemeral::{EphemeralListing, NetnsUsage},
    state::{LINUX_EPHEMERAL_RANGE, State},
};

fn event(
    kind: EventKind,
    cookie: u64,
    protocol: Protocol,
    address: IpAddr,
    port: u16,
) -> PortEvent {
    PortEvent {
        pid: 31337,
        tid: 31337,
        uid: 1000,
        sock_uid: Some(1000),
        process: "web \"server\"".into(),
        cgroup_id: 9,
        ..PortEvent::example(kind, protocol, address, port, cookie)
    }
}

fn record(state: &mut State, event: &PortEvent) {
    state.counters.count(event);
    state.map.apply(event, SystemTime::UNIX_EPOCH);
}

/// A state with something in every family: listeners sharing ports for
/// several reasons, failures past the per-port cap, drops, drift, hooks.
pub fn busy_state() -> State {
    let mut state = State::new(100, 2);
    let any4 = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
    let any6 = IpAddr::V6(Ipv6Addr::UNSPECIFIED);
    let mut cookie = 0;
    let mut listen = |state: &mut State, protocol, address, port, reuse_port, netns| {
        cookie += 1;
        let mut bind = event(EventKind::Bind, cookie, protocol, address, port);
        bind.options.reuse_port = Some(reuse_port);
        bind.netns = Some(netns);
        record(state, &bind);
        if protocol == Protocol::Tcp {
            bind.kind = EventKind::Listen;
            record(state, &bind);
        }
    };
    listen(&mut state, Protocol::Tcp, any4, 8000, true, 1);
    listen(&mut state, Protocol::Tcp, any4, 8000, true, 1);
    listen(&mut state, Protocol::Tcp, any6, 8000, false, 2);
    listen(&mut state, Protocol::Udp, any4, 53, false, 1);
    listen(&mut state, Protocol::Tcp, any4, 53, false, 1);
    listen(&mut state, Protocol::Tcp, any4, 22, false, 1);
    for (port, errno) in [
        (8000, Errno::EADDRINUSE),
        (8000, Errno::EADDRINUSE),
        (80, Errno::EACCES),
        (9000, Errno::EADDRNOTAVAIL),
        (0, Errno::EADDRINUSE),
        (8081, Errno::UNKNOWN),
    ] {
        let mut failed = event(EventKind::BindFailed, 100, Protocol::Tcp, any4, port);
        failed.errno = Some(errno);
        record(&mut state, &failed);
    }
    let mut listen_failed = event(EventKind::ListenFailed, 101, Protocol::Tcp, any4, 8080);
    listen_failed.errno = Some(Errno::EADDRINUSE);
    record(&mut state, &listen_failed);
    state.drops = vec![("bind_outcome", 5), ("release", 0)];
    state.decode_errors = 1;
    state.hooks = vec![("bind_outcome", "tracepoint"), ("release", "cgroup_sock")];
    state.stats.reconciliations = 3;
    state.stats.startup_snapshot = Some(Duration::from_millis(840));
    state.stats.reconcile_snapshot = Some(Duration::from_millis(310));
    state.stats.drift = Drift {
        missing: 2,
        stale: 1,
        changed: 1,
    };
    state.ready = true;
    state.host_netns = 1;
    state.expected = ["8000/tcp", "53/udp", "443/tcp"]
        .map(|text| text.parse().unwrap())
        .to_vec();
    // The host's ephemeral ports, listed.
    state.ephemeral = Some(EphemeralListing {
        namespaces: vec![NetnsUsage {
            netns: 1,
            range: LINUX_EPHEMERAL_RANGE,
            reserved: 0,
            reserved_ranges: vec![],
            unprivileged_port_start: None,
            local_addresses: None,
            destinations: vec![],
            destinations_total: 0,
            udp_ports: 3,
            seen: Default::default(),
            names: Vec::new(),
            connects: None,
            trend: None,
            place: Default::default(),
        }],
        skipped: 0,
        taken_at: SystemTime::UNIX_EPOCH,
        elapsed: Duration::from_millis(4),
    });
    state
}

/// One family as served: its type and every label name its samples carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Family {
    /// `counter`, `gauge`, ...
    pub kind: String,
    pub labels: BTreeSet<String>,
}

/// Every family `/metrics` serves for [`busy_state`], by name.
pub fn exported() -> BTreeMap<String, Family> {
    let text = Metrics::new(Arc::new(RwLock::new(busy_state())), BuildInfo::current())
        .expect("metrics")
        .render();
    let mut families: BTreeMap<String, Family> = text
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split_once(' '))
        .map(|(name, kind)| {
            let family = Family {
                kind: kind.to_owned(),
                labels: BTreeSet::new(),
            };
            (name.to_owned(), family)
        })
        .collect();
    for line in text.lines().filter(|line| !line.starts_with('#')) {
        let (name, labels) = sample_labels(line);
        if let Some(family) = families.get_mut(name) {
            family.labels.extend(labels);
        }
    }
    families
}

/// The name and label names of a sample line, `name{a="x",b="y\"z"} 1`.
pub fn sample_labels(line: &str) -> (&str, Vec<String>) {
    let name_end = line.find(['{', ' ']).unwrap_or(line.len());
    let (name, mut rest) = line.split_at(name_end);
    let mut labels = Vec::new();
    if let Some(inner) = rest.strip_prefix('{') {
        rest = inner;
        while let Some((label, value)) = rest.split_once("=\"") {
            labels.push(label.trim_start_matches(',').to_owned());
            // Skip the quoted value, escapes included.
            let mut escaped = false;
            let end = value
                .char_indices()
                .find(|&(_, c)| {
                    let closes = c == '"' && !escaped;
                    escaped = c == '\\' && !escaped;
                    closes
                })
                .map_or(value.len(), |(i, _)| i + 1);
            rest = &value[end..];
            if rest.starts_with('}') {
                break;
            }
        }
    }
    (name, labels)
}
