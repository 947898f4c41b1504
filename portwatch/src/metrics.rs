//! Prometheus metrics: what the pipeline counted as events happened, and
//! gauges computed from the live map when Prometheus scrapes.
//!
//! One custom collector reads the shared [`State`]: under the read lock it
//! only copies the counters and the listeners' facts out (one pass); the
//! per-port counts and the sharing reasons are worked out after the lock is
//! released, and the families are built directly, not through the crate's
//! metric vectors, which would hash every label set. The daemon's own
//! `process_*` metrics come from the `prometheus` crate's process collector.
//!
//! No label carries a pid or a process name: every restart would start new
//! series. Every per-port family is bounded: the failure counter is capped
//! (see [`PortLabel`]), and `portwatch_listeners` and `portwatch_port_shared`
//! name only ports outside the host's ephemeral range, expected ports and
//! shared ports, at most `port_label_cap` of them (see [`PortLabels`]), so
//! that bind(0) and connected UDP sockets, one random port each, add no
//! series. The ephemeral families name at most [`NETNS_LABEL_CAP`]
//! namespaces.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    sync::PoisonError,
    time::Duration,
};

use prometheus::{
    Registry, TextEncoder,
    core::{Collector, Desc},
    process_collector::ProcessCollector,
    proto::{self, LabelPair, Metric, MetricFamily, MetricType},
};

use crate::{
    ephemeral::{self, NetnsEphemeral},
    event::{Errno, EventKind},
    failures::Agreement,
    health::DIAG_MODULES,
    map::Drift,
    rules::{self, CoexistReason},
    snapshot::ephemeral::PortRange,
    socket::{Family, NetnsCookie, Protocol, SocketFacts},
    state::{Counters, ExpectedListener, PortLabel, State, WatchStats},
    watch::SharedState,
};

/// What `portwatch_build_info` says about this build and the machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BuildInfo {
    pub version: String,
    /// The git commit built from.
    pub revision: String,
    /// The running kernel's release (`uname -r`).
    pub kernel: String,
}

impl BuildInfo {
    /// This binary's version and revision, and the running kernel.
    pub fn current() -> BuildInfo {
        BuildInfo {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            revision: env!("PORTWATCH_REVISION").to_owned(),
            kernel: kernel_release(),
        }
    }
}

/// The release `uname -r` prints, which the kernel also publishes in procfs.
fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|release| release.trim().to_owned())
        .ok()
        .filter(|release| !release.is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}

/// Why the metrics could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The registry refused a collector: a metric name, help string or label
    /// set that is invalid or collides with another.
    #[error("registering the metrics")]
    Register(#[from] prometheus::Error),
}

/// The daemon's metrics. Cheap to clone: clones share one registry.
#[derive(Clone, Debug)]
pub struct Metrics {
    registry: Registry,
}

impl Metrics {
    /// Metrics that read `state` at every scrape.
    pub fn new(state: SharedState, build: BuildInfo) -> Result<Metrics, MetricsError> {
        let registry = Registry::new();
        registry.register(Box::new(StateCollector::new(state, build)?))?;
        registry.register(Box::new(ProcessCollector::for_self()))?;
        Ok(Metrics { registry })
    }

    /// The text exposition format. Holds the state's read
    /// lock only to copy the counters and listeners out; the rest is CPU work
    /// that grows with the listeners (about 150 ms for 100,000 in a release
    /// build), which an async caller may hand to `spawn_blocking`.
    pub fn render(&self) -> String {
        let encoder = TextEncoder::new();
        let mut text = String::new();
        for family in self.registry.gather() {
            // Only a malformed family fails (checked before anything is
            // written); the others are still worth serving.
            if let Err(err) = encoder.encode_utf8(std::slice::from_ref(&family), &mut text) {
                tracing::error!(metric = family.name(), %err, "cannot encode a metric");
            }
        }
        text
    }

    /// The registry, for collectors other subsystems add.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }
}

/// Whether a metric only goes up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
}

/// One metric family the state collector produces.
#[derive(Debug)]
struct Spec {
    name: &'static str,
    help: &'static str,
    labels: &'static [&'static str],
    kind: Kind,
}

const BIND_FAILURES: Spec = Spec {
    name: "portwatch_bind_failures_total",
    help: "Failed binds, by errno name, protocol and address family.",
    labels: &["errno", "protocol", "family"],
    kind: Kind::Counter,
};
const PORT_BIND_FAILURES: Spec = Spec {
    name: "portwatch_port_bind_failures_total",
    help: "Failed binds, by requested port, protocol and errno name. Ports past the \
           configured number of distinct ports, and requests for an ephemeral port, \
           count under port=other.",
    labels: &["port", "protocol", "errno"],
    kind: Kind::Counter,
};
const LISTEN_FAILURES: Spec = Spec {
    name: "portwatch_listen_failures_total",
    help: "Failed listen() calls, by errno name and protocol.",
    labels: &["errno", "protocol"],
    kind: Kind::Counter,
};
const CONNECT_FAILURES: Spec = Spec {
    name: "portwatch_connect_failures_total",
    help: "Connects that found no free local port, by errno name (EADDRNOTAVAIL: TCP, \
           every usable port to that destination in use; EAGAIN: UDP autobind, the \
           range full), protocol and address family.",
    labels: &["errno", "protocol", "family"],
    kind: Kind::Counter,
};
const INFERENCE_CHECKS: Spec = Spec {
    name: "portwatch_errno_inference_checks_total",
    help: "Failed binds and listens whose errno the kernel reported, by how the conflict \
           rules' replay of the failure (the errno portwatch infers where no outcome hook \
           runs) compared with it: agree, disagree, or undecided (the replay names none).",
    labels: &["result"],
    kind: Kind::Counter,
};
const BINDS: Spec = Spec {
    name: "portwatch_binds_total",
    help: "Successful binds, by protocol and address family.",
    labels: &["protocol", "family"],
    kind: Kind::Counter,
};
const EVENTS: Spec = Spec {
    name: "portwatch_events_total",
    help: "Socket events received from the kernel programs, by kind.",
    labels: &["kind"],
    kind: Kind::Counter,
};
const EVENTS_DROPPED: Spec = Spec {
    name: "portwatch_events_dropped_total",
    help: "Event records the kernel programs could not deliver, by hook. Each drop \
           triggers a reconciliation of the map.",
    labels: &["hook"],
    kind: Kind::Counter,
};
const DECODE_ERRORS: Spec = Spec {
    name: "portwatch_decode_errors_total",
    help: "Event records from the kernel programs that did not decode.",
    labels: &[],
    kind: Kind::Counter,
};
const RECONCILE_DRIFT: Spec = Spec {
    name: "portwatch_reconcile_drift_total",
    help: "Differences between the map and the kernel's socket table that \
           reconciliation corrected: missing (added), stale (removed), changed \
           (state or address corrected).",
    labels: &["kind"],
    kind: Kind::Counter,
};
const RECONCILIATIONS: Spec = Spec {
    name: "portwatch_reconciliations_total",
    help: "Reconciliations of the map against the kernel's socket table.",
    labels: &[],
    kind: Kind::Counter,
};
const UNTRACKED: Spec = Spec {
    name: "portwatch_untracked_sockets_total",
    help: "Sockets the kernel programs could not be told to track: their close is \
           found by the next reconciliation instead of an event.",
    labels: &[],
    kind: Kind::Counter,
};
const LISTENERS: Spec = Spec {
    name: "portwatch_listeners",
    help: "Listening sockets (TCP in LISTEN, bound unconnected UDP) in all network \
           namespaces, by port, protocol and address family; for ports outside the \
           host's ephemeral range, expected ports and shared ports only, at most \
           port_label_cap ports, the rest under port=other. \
           portwatch_listeners_by_protocol counts them all.",
    labels: &["port", "protocol", "family"],
    kind: Kind::Gauge,
};
const LISTENERS_TOTAL: Spec = Spec {
    name: "portwatch_listeners_by_protocol",
    help: "Every listening socket (TCP in LISTEN, bound unconnected UDP) in all \
           network namespaces, by protocol and address family.",
    labels: &["protocol", "family"],
    kind: Kind::Gauge,
};
const SHARED_PORTS: Spec = Spec {
    name: "portwatch_shared_ports",
    help: "Ports held by more than one listener in one network namespace (one port \
           table); the same port in separate namespaces is not sharing.",
    labels: &[],
    kind: Kind::Gauge,
};
const PORT_SHARED: Spec = Spec {
    name: "portwatch_port_shared",
    help: "1 for each reason (kind) the listeners of a shared port coexist within \
           a network namespace, as /ports/{port} explains them; ports past \
           port_label_cap under port=other.",
    labels: &["port", "protocol", "kind"],
    kind: Kind::Gauge,
};
const PORT_NAMESPACES: Spec = Spec {
    name: "portwatch_port_namespaces",
    help: "How many network namespaces have a listener on the port, by protocol; for \
           ports below the host's ephemeral range (net.ipv4.ip_local_port_range) only, \
           so that the series stay few.",
    labels: &["port", "protocol"],
    kind: Kind::Gauge,
};
const EPHEMERAL_USABLE: Spec = Spec {
    name: "portwatch_ephemeral_ports_usable",
    help: "Ports of the namespace's ephemeral range each destination may use: the \
           range less reserved ports and ports held by TCP binds. netns is host, the \
           pod (namespace/name) or container, at most 50 names, the rest under \
           netns=other (its fewest).",
    labels: &["netns"],
    kind: Kind::Gauge,
};
const EPHEMERAL_IN_USE: Spec = Spec {
    name: "portwatch_ephemeral_ports_in_use",
    help: "TCP: sockets to the namespace's busiest destination, each holding a local \
           port of the range; UDP: distinct ports of the range UDP sockets hold (UDP \
           takes a port for every destination). netns=other: the most.",
    labels: &["netns", "protocol"],
    kind: Kind::Gauge,
};
const EPHEMERAL_UTILIZATION: Spec = Spec {
    name: "portwatch_ephemeral_utilization_ratio",
    help: "The fuller of: the busiest TCP destination's share of the usable ports, and \
           UDP's share of the unreserved range; 1 means the next connect or bind(0) \
           fails. netns=other: the fullest.",
    labels: &["netns"],
    kind: Kind::Gauge,
};
const EPHEMERAL_RANGE_LISTENERS: Spec = Spec {
    name: "portwatch_ephemeral_range_listeners",
    help: "TCP listeners on ports inside the namespace's ephemeral range: each takes \
           its port from every outgoing connection. netns=other: their sum.",
    labels: &["netns"],
    kind: Kind::Gauge,
};
const PROGRAM_ATTACHED: Spec = Spec {
    name: "portwatch_program_attached",
    help: "1 for each hook and the kernel attach path it uses.",
    labels: &["hook", "path"],
    kind: Kind::Gauge,
};
const BUILD_INFO: Spec = Spec {
    name: "portwatch_build_info",
    help: "1, labelled with portwatch's version and git revision and the running \
           kernel's release.",
    labels: &["version", "revision", "kernel"],
    kind: Kind::Gauge,
};
const READY: Spec = Spec {
    name: "portwatch_ready",
    help: "1 once the kernel programs are attached and the start-up snapshot is \
           merged (or failed, and live events alone fill the map), else 0.",
    labels: &[],
    kind: Kind::Gauge,
};

const SNAPSHOT_DURATION: Spec = Spec {
    name: "portwatch_snapshot_duration_seconds",
    help: "How long the last sock_diag snapshot and its merge into the map took: \
           at start-up until ready (kind=startup), the start-up sockets' owners \
           and SO_REUSE* options read after ready (kind=owners), and at the \
           latest reconciliation (kind=reconcile). Each series appears once its \
           snapshot has run.",
    labels: &["kind"],
    kind: Kind::Gauge,
};
const EXPECTED_LISTENERS: Spec = Spec {
    name: "portwatch_expected_listeners",
    help: "Listeners in the daemon's own network namespace on each port the \
           configuration's expected_listeners names, 0 included.",
    labels: &["port", "protocol"],
    kind: Kind::Gauge,
};

const SOCK_DIAG_AVAILABLE: Spec = Spec {
    name: "portwatch_sock_diag_available",
    help: "1 while the sock_diag listing works; 0 while it fails and the map \
           comes from live events alone (sockets made before the daemon \
           started are not listed, and the map is not checked against the \
           kernel). /readyz says why.",
    labels: &[],
    kind: Kind::Gauge,
};
const KERNEL_MODULE_MISSING: Spec = Spec {
    name: "portwatch_kernel_module_missing",
    help: "1 for each sock_diag kernel module (inet_diag, tcp_diag, udp_diag) \
           whose absence makes the listing fail; load it to recover.",
    labels: &["module"],
    kind: Kind::Gauge,
};

/// Every family the state collector produces.
const SPECS: [&Spec; 28] = [
    &BIND_FAILURES,
    &PORT_BIND_FAILURES,
    &LISTEN_FAILURES,
    &CONNECT_FAILURES,
    &INFERENCE_CHECKS,
    &BINDS,
    &EVENTS,
    &EVENTS_DROPPED,
    &DECODE_ERRORS,
    &RECONCILE_DRIFT,
    &RECONCILIATIONS,
    &UNTRACKED,
    &LISTENERS,
    &LISTENERS_TOTAL,
    &SHARED_PORTS,
    &PORT_SHARED,
    &PORT_NAMESPACES,
    &EPHEMERAL_USABLE,
    &EPHEMERAL_IN_USE,
    &EPHEMERAL_UTILIZATION,
    &EPHEMERAL_RANGE_LISTENERS,
    &PROGRAM_ATTACHED,
    &BUILD_INFO,
    &READY,
    &SNAPSHOT_DURATION,
    &EXPECTED_LISTENERS,
    &SOCK_DIAG_AVAILABLE,
    &KERNEL_MODULE_MISSING,
];

/// The names of the families the state collector produces. The process
/// collector's `process_*` families come on top.
pub fn family_names() -> impl Iterator<Item = &'static str> {
    SPECS.iter().map(|spec| spec.name)
}

/// The protocols and families whose bind series exist from the first scrape.
const COMMON_PROTOCOLS: [Protocol; 2] = [Protocol::Tcp, Protocol::Udp];
const FAMILIES: [Family; 2] = [Family::Ipv4, Family::Ipv6];

/// The samples of one family, built at scrape. Each label set appears once.
struct Samples {
    spec: &'static Spec,
    rows: Vec<(Vec<String>, f64)>,
}

impl Samples {
    fn new(spec: &'static Spec) -> Samples {
        Samples {
            spec,
            rows: Vec::new(),
        }
    }

    /// One sample; `labels` in the order of `spec.labels`.
    fn push(&mut self, labels: Vec<String>, value: u64) {
        // Exact as f64 up to 2^53.
        self.rows.push((labels, value as f64));
    }

    fn of(spec: &'static Spec, rows: impl IntoIterator<Item = (Vec<String>, u64)>) -> Samples {
        let mut samples = Samples::new(spec);
        for (labels, value) in rows {
            samples.push(labels, value);
        }
        samples
    }

    /// Durations, in seconds.
    fn of_durations(
        spec: &'static Spec,
        rows: impl IntoIterator<Item = (Vec<String>, Duration)>,
    ) -> Samples {
        Samples {
            spec,
            rows: rows
                .into_iter()
                .map(|(labels, took)| (labels, took.as_secs_f64()))
                .collect(),
        }
    }

    /// The family, with each sample's labels sorted by name, as the
    /// crate's own metrics have them. Names and labels were validated when
    /// the collector registered their [`Desc`].
    fn into_family(self) -> MetricFamily {
        let spec = self.spec;
        // The positions of the label values, in the order of their names.
        let mut by_name: Vec<usize> = (0..spec.labels.len()).collect();
        by_name.sort_by_key(|&i| spec.labels[i]);
        let metrics = self
            .rows
            .into_iter()
            .map(|(mut values, value)| {
                let labels: Vec<LabelPair> = by_name
                    .iter()
                    .map(|&i| {
                        let mut pair = LabelPair::default();
                        pair.set_name(spec.labels[i].to_owned());
                        pair.set_value(std::mem::take(&mut values[i]));
                        pair
                    })
                    .collect();
                let mut metric = Metric::from_label(labels);
                match spec.kind {
                    Kind::Counter => {
                        let mut counter = proto::Counter::default();
                        counter.set_value(value);
                        metric.set_counter(counter);
                    }
                    Kind::Gauge => {
                        let mut gauge = proto::Gauge::default();
                        gauge.set_value(value);
                        metric.set_gauge(gauge);
                    }
                }
                metric
            })
            .collect();
        let mut family = MetricFamily::default();
        family.set_name(spec.name.to_owned());
        family.set_help(spec.help.to_owned());
        family.set_field_type(match spec.kind {
            Kind::Counter => MetricType::COUNTER,
            Kind::Gauge => MetricType::GAUGE,
        });
        family.set_metric(metrics);
        family
    }
}

/// Reads the shared state at each scrape.
struct StateCollector {
    state: SharedState,
    build: BuildInfo,
    descs: Vec<Desc>,
}

impl StateCollector {
    fn new(state: SharedState, build: BuildInfo) -> prometheus::Result<StateCollector> {
        let descs = SPECS
            .iter()
            .map(|spec| {
                Desc::new(
                    spec.name.to_owned(),
                    spec.help.to_owned(),
                    spec.labels.iter().map(|&label| label.to_owned()).collect(),
                    HashMap::new(),
                )
            })
            .collect::<prometheus::Result<_>>()?;
        Ok(StateCollector {
            state,
            build,
            descs,
        })
    }
}

impl Collector for StateCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let reading = {
            let state = self.state.read().unwrap_or_else(PoisonError::into_inner);
            Reading::of(&state)
        };
        reading
            .samples(&self.build)
            .into_iter()
            .map(Samples::into_family)
            .collect()
    }
}

/// What one scrape needs from the state, copied under the read lock.
struct Reading {
    counters: Counters,
    stats: WatchStats,
    drops: Vec<(&'static str, u64)>,
    decode_errors: u64,
    hooks: Vec<(&'static str, &'static str)>,
    ready: bool,
    /// Every listener (a copy of a few dozen bytes each).
    listeners: Vec<SocketFacts>,
    /// Which ports have series of their own.
    labels: PortLabels,
    /// Each namespace's ephemeral ports, the host's first, then the fullest.
    ephemeral: Vec<NetnsEphemeral>,
    expected: Vec<(ExpectedListener, usize)>,
    /// The modules a failing listing lacks; `None` while listings work.
    listing_missing: Option<Vec<&'static str>>,
}

impl Reading {
    fn of(state: &State) -> Reading {
        Reading {
            counters: state.counters.clone(),
            stats: state.stats,
            drops: state.drops.clone(),
            decode_errors: state.decode_errors,
            hooks: state.hooks.clone(),
            ready: state.ready,
            listeners: {
                // Sized once: a collect from a filter doubles its way up,
                // and at 100k listeners the doublings cost more than the copy.
                let mut all = Vec::with_capacity(state.map.len());
                all.extend(state.map.listeners().map(|entry| entry.facts.clone()));
                all
            },
            labels: PortLabels {
                range: state.ephemeral_range,
                expected: state.expected.iter().map(|e| e.port).collect(),
                cap: state.counters.port_cap,
            },
            ephemeral: state.ephemeral.as_ref().map_or_else(Vec::new, |listing| {
                let mut all: Vec<NetnsEphemeral> = listing
                    .namespaces
                    .iter()
                    .map(|usage| ephemeral::explain(usage, &state.map, state.host_netns, 1, []))
                    .collect();
                ephemeral::sort(&mut all);
                all
            }),
            expected: state.expected_counts(),
            listing_missing: state
                .listing
                .as_ref()
                .map(|failure| failure.missing_modules.clone()),
        }
    }

    fn samples(self, build: &BuildInfo) -> Vec<Samples> {
        let Counters {
            events,
            binds,
            bind_failures,
            port_bind_failures,
            listen_failures,
            connect_failures,
            inference_checks,
            ..
        } = self.counters;
        let names = |protocol: Protocol, family: Family| {
            (protocol.name().to_owned(), family.name().to_owned())
        };

        // The series alerts watch exist at 0 from the first scrape: a series
        // that first appears at N hides those N from increase() and rate().
        let mut bind_failures = bind_failures;
        let mut binds = binds;
        let in_use = Errno::EADDRINUSE.name().into_owned();
        for protocol in COMMON_PROTOCOLS {
            for family in FAMILIES {
                bind_failures
                    .entry((in_use.clone(), protocol, family))
                    .or_insert(0);
                binds.entry((protocol, family)).or_insert(0);
            }
        }
        // What PortwatchConnectAddressUnavailable watches, from 0.
        let mut connect_failures = connect_failures;
        for family in FAMILIES {
            for (errno, protocol) in [
                (Errno::EADDRNOTAVAIL, Protocol::Tcp),
                (Errno::EAGAIN, Protocol::Udp),
            ] {
                connect_failures
                    .entry((errno.name().into_owned(), protocol, family))
                    .or_insert(0);
            }
        }
        let connect_failures = Samples::of(
            &CONNECT_FAILURES,
            connect_failures
                .into_iter()
                .map(|((errno, protocol, family), n)| {
                    let (protocol, family) = names(protocol, family);
                    (vec![errno, protocol, family], n)
                }),
        );
        let mut events = events;
        // Every kind has a series from the first scrape.
        for kind in EventKind::ALL {
            events.entry(kind.name()).or_insert(0);
        }

        let bind_failures = Samples::of(
            &BIND_FAILURES,
            bind_failures
                .into_iter()
                .map(|((errno, protocol, family), n)| {
                    let (protocol, family) = names(protocol, family);
                    (vec![errno, protocol, family], n)
                }),
        );
        let port_bind_failures = Samples::of(
            &PORT_BIND_FAILURES,
            port_bind_failures
                .into_iter()
                .map(|((port, protocol, errno), n)| {
                    let port = match port {
                        PortLabel::Port(port) => port.to_string(),
                        PortLabel::Other => "other".to_owned(),
                    };
                    (vec![port, protocol.name().to_owned(), errno], n)
                }),
        );
        let listen_failures = Samples::of(
            &LISTEN_FAILURES,
            listen_failures
                .into_iter()
                .map(|((errno, protocol), n)| (vec![errno, protocol.name().to_owned()], n)),
        );
        // Every result from 0, so that a ratio of them is defined from the start.
        let inference_checks = Samples::of(
            &INFERENCE_CHECKS,
            Agreement::ALL.into_iter().map(|agreement| {
                let n = inference_checks.get(&agreement).copied().unwrap_or(0);
                (vec![agreement.name().to_owned()], n)
            }),
        );
        let binds = Samples::of(
            &BINDS,
            binds.into_iter().map(|((protocol, family), n)| {
                let (protocol, family) = names(protocol, family);
                (vec![protocol, family], n)
            }),
        );
        let events = Samples::of(
            &EVENTS,
            events
                .into_iter()
                .map(|(kind, n)| (vec![kind.to_owned()], n)),
        );
        let mut drops: BTreeMap<&str, u64> = BTreeMap::new();
        for (hook, n) in self.drops {
            *drops.entry(hook).or_default() += n;
        }
        let dropped = Samples::of(
            &EVENTS_DROPPED,
            drops
                .into_iter()
                .map(|(hook, n)| (vec![hook.to_owned()], n)),
        );
        let Drift {
            missing,
            stale,
            changed,
        } = self.stats.drift;
        let drift = Samples::of(
            &RECONCILE_DRIFT,
            [("missing", missing), ("stale", stale), ("changed", changed)]
                .map(|(kind, n)| (vec![kind.to_owned()], n)),
        );

        let [
            listeners,
            listeners_total,
            shared_ports,
            port_shared,
            port_namespaces,
        ] = listener_samples(self.listeners, &self.labels);
        let [usable, in_use, utilization, range_listeners] = ephemeral_samples(&self.ephemeral);
        let hooks: BTreeSet<(&str, &str)> = self.hooks.into_iter().collect();
        let attached = Samples::of(
            &PROGRAM_ATTACHED,
            hooks
                .into_iter()
                .map(|(hook, path)| (vec![hook.to_owned(), path.to_owned()], 1)),
        );
        let build_info = vec![
            build.version.clone(),
            build.revision.clone(),
            build.kernel.clone(),
        ];
        let snapshot_durations = [
            ("startup", self.stats.startup_snapshot),
            ("owners", self.stats.startup_owners),
            ("reconcile", self.stats.reconcile_snapshot),
        ]
        .into_iter()
        .filter_map(|(kind, took)| Some((vec![kind.to_owned()], took?)));

        vec![
            bind_failures,
            port_bind_failures,
            listen_failures,
            connect_failures,
            inference_checks,
            binds,
            events,
            dropped,
            Samples::of(&DECODE_ERRORS, [(vec![], self.decode_errors)]),
            drift,
            Samples::of(&RECONCILIATIONS, [(vec![], self.stats.reconciliations)]),
            Samples::of(&UNTRACKED, [(vec![], self.stats.untracked)]),
            listeners,
            listeners_total,
            shared_ports,
            port_shared,
            port_namespaces,
            usable,
            in_use,
            utilization,
            range_listeners,
            attached,
            Samples::of(&BUILD_INFO, [(build_info, 1)]),
            Samples::of(&READY, [(vec![], u64::from(self.ready))]),
            Samples::of_durations(&SNAPSHOT_DURATION, snapshot_durations),
            Samples::of(
                &EXPECTED_LISTENERS,
                self.expected.into_iter().map(|(expected, n)| {
                    let labels = vec![
                        expected.port.to_string(),
                        expected.protocol.name().to_owned(),
                    ];
                    (labels, n as u64)
                }),
            ),
            Samples::of(
                &SOCK_DIAG_AVAILABLE,
                [(vec![], u64::from(self.listing_missing.is_none()))],
            ),
            // Every module from the first scrape, so an alert sees 0 -> 1.
            Samples::of(
                &KERNEL_MODULE_MISSING,
                DIAG_MODULES.map(|module| {
                    let missing = self
                        .listing_missing
                        .as_ref()
                        .is_some_and(|m| m.contains(&module));
                    (vec![module.to_owned()], u64::from(missing))
                }),
            ),
        ]
    }
}

/// Which ports have per-port series: those outside the host's ephemeral
/// range (the ones services choose), expected ones and shared ones; at most
/// `cap` of them, lowest first, the rest under `port="other"`. A busy host's
/// bind(0) and connected UDP sockets would otherwise add a series each.
#[derive(Clone, Debug)]
struct PortLabels {
    range: PortRange,
    expected: BTreeSet<u16>,
    cap: usize,
}

/// `portwatch_listeners`, `portwatch_listeners_by_protocol`,
/// `portwatch_shared_ports`, `portwatch_port_shared` and
/// `portwatch_port_namespaces` from every listener, port by port.
fn listener_samples(mut all: Vec<SocketFacts>, labels: &PortLabels) -> [Samples; 5] {
    let mut listeners = Samples::new(&LISTENERS);
    let mut shared_ports = 0;
    let mut port_shared = Samples::new(&PORT_SHARED);
    let mut port_namespaces = Samples::new(&PORT_NAMESPACES);
    let mut totals: BTreeMap<(Protocol, Family), u64> = BTreeMap::new();
    let mut other_counts: BTreeMap<(Protocol, Family), u64> = BTreeMap::new();
    let mut other_kinds: HashSet<(Protocol, CoexistReason)> = HashSet::new();
    let mut named = 0;
    let names =
        |protocol: Protocol, family: Family| [protocol.name().to_owned(), family.name().to_owned()];
    // Within a port, the order `explain` sees (`PortMap::listeners_on`).
    all.sort_unstable_by_key(|f| (f.port, f.netns, f.protocol, f.family, f.address, f.cookie));
    for on_port in all.chunk_by(|a, b| a.port == b.port) {
        let port_number = on_port[0].port;
        let port = port_number.to_string();
        let mut counts: BTreeMap<(Protocol, Family), u64> = BTreeMap::new();
        let mut namespaces: BTreeMap<Protocol, BTreeSet<NetnsCookie>> = BTreeMap::new();
        for facts in on_port {
            *counts.entry((facts.protocol, facts.family)).or_default() += 1;
            namespaces
                .entry(facts.protocol)
                .or_default()
                .insert(facts.netns);
        }
        for (key, n) in &counts {
            *totals.entry(*key).or_default() += n;
        }
        let shared = on_port
            .chunk_by(|a, b| a.netns == b.netns)
            .any(|n| n.len() > 1);
        if shared {
            shared_ports += 1;
        }
        let outside = !labels.range.contains(port_number);
        if !(outside || shared || labels.expected.contains(&port_number)) {
            continue;
        }
        let kinds = sharing_kinds(on_port);
        if named >= labels.cap {
            for (key, n) in counts {
                *other_counts.entry(key).or_default() += n;
            }
            other_kinds.extend(kinds);
            continue;
        }
        named += 1;
        for ((protocol, family), n) in counts {
            let [protocol, family] = names(protocol, family);
            listeners.push(vec![port.clone(), protocol, family], n);
        }
        if outside {
            for (protocol, netns) in namespaces {
                let labels = vec![port.clone(), protocol.name().to_owned()];
                port_namespaces.push(labels, netns.len() as u64);
            }
        }
        for (protocol, kind) in kinds {
            let labels = vec![
                port.clone(),
                protocol.name().to_owned(),
                kind.name().to_owned(),
            ];
            port_shared.push(labels, 1);
        }
    }
    for ((protocol, family), n) in other_counts {
        let [protocol, family] = names(protocol, family);
        listeners.push(vec!["other".to_owned(), protocol, family], n);
    }
    let mut other_kinds: Vec<(Protocol, CoexistReason)> = other_kinds.into_iter().collect();
    other_kinds.sort_by_key(|(protocol, kind)| (*protocol, kind.name()));
    for (protocol, kind) in other_kinds {
        let labels = vec![
            "other".to_owned(),
            protocol.name().to_owned(),
            kind.name().to_owned(),
        ];
        port_shared.push(labels, 1);
    }
    let listeners_total = Samples::of(
        &LISTENERS_TOTAL,
        totals
            .into_iter()
            .map(|((protocol, family), n)| (names(protocol, family).to_vec(), n)),
    );
    let shared_ports = Samples::of(&SHARED_PORTS, [(vec![], shared_ports)]);
    [
        listeners,
        listeners_total,
        shared_ports,
        port_shared,
        port_namespaces,
    ]
}

/// How many namespaces the ephemeral metrics name; the rest are `other`.
pub const NETNS_LABEL_CAP: usize = 50;

/// The ephemeral families, one series per namespace name (the host's and
/// the fullest first, at most [`NETNS_LABEL_CAP`]), the rest folded into
/// `netns="other"` at their worst: the fewest usable, the most in use, the
/// fullest, and every listener in a range. Namespaces that share a name
/// (two containers called alike) fold the same way.
fn ephemeral_samples(namespaces: &[NetnsEphemeral]) -> [Samples; 4] {
    #[derive(Default)]
    struct Worst {
        usable: Option<u32>,
        tcp: u32,
        udp: u32,
        ratio: f64,
        listeners: u32,
    }
    let mut by_name: Vec<(String, Worst)> = Vec::new();
    for ns in namespaces {
        let name = if by_name.iter().any(|(n, _)| *n == ns.name) || by_name.len() < NETNS_LABEL_CAP
        {
            ns.name.clone()
        } else {
            "other".to_owned()
        };
        let index = match by_name.iter().position(|(n, _)| *n == name) {
            Some(index) => index,
            None => {
                by_name.push((name, Worst::default()));
                by_name.len() - 1
            }
        };
        let worst = &mut by_name[index].1;
        worst.usable = Some(worst.usable.map_or(ns.usable, |u| u.min(ns.usable)));
        worst.tcp = worst.tcp.max(ns.in_use);
        worst.udp = worst.udp.max(ns.udp.in_use);
        worst.ratio = worst.ratio.max(ns.worst());
        worst.listeners += ns.listeners_in_range;
    }
    let mut usable = Samples::new(&EPHEMERAL_USABLE);
    let mut in_use = Samples::new(&EPHEMERAL_IN_USE);
    let mut utilization = Samples::new(&EPHEMERAL_UTILIZATION);
    let mut listeners = Samples::new(&EPHEMERAL_RANGE_LISTENERS);
    for (name, worst) in by_name {
        usable.push(vec![name.clone()], u64::from(worst.usable.unwrap_or(0)));
        in_use.push(vec![name.clone(), "tcp".to_owned()], u64::from(worst.tcp));
        in_use.push(vec![name.clone(), "udp".to_owned()], u64::from(worst.udp));
        utilization.rows.push((vec![name.clone()], worst.ratio));
        listeners.push(vec![name], u64::from(worst.listeners));
    }
    [usable, in_use, utilization, listeners]
}

/// The reasons `explain` gives for the listeners of one port to coexist, with
/// the protocols of the listeners each covers: the same set as its `sharing`
/// lists. Only listeners of one network namespace are compared (separate
/// namespaces are separate port tables), so that 500 containers on one port
/// cost 500 steps, not 125,000 comparisons.
/// `listeners` must be in the map's order ([`crate::map::PortMap::listeners_on`]).
fn sharing_kinds(listeners: &[SocketFacts]) -> HashSet<(Protocol, CoexistReason)> {
    // In the map's order, the listeners of one (netns, protocol, family,
    // address) are adjacent, oldest first: `explain`'s groups.
    let key = |f: &SocketFacts| (f.netns, f.protocol, f.family, f.address);
    let groups = || listeners.chunk_by(|a, b| key(a) == key(b));
    let mut kinds = HashSet::new();
    for group in groups().filter(|group| group.len() > 1) {
        if let Some(kind) = rules::why_coexist(&group[0], &group[1]) {
            kinds.insert((group[0].protocol, kind));
        }
    }
    // Groups are ordered by namespace first: each one's peers in its own
    // namespace follow it.
    let firsts: Vec<&SocketFacts> = groups().map(|group| &group[0]).collect();
    for (i, a) in firsts.iter().enumerate() {
        for b in firsts[i + 1..].iter().take_while(|b| b.netns == a.netns) {
            if let Some(kind) = rules::why_coexist(a, b) {
                kinds.insert((a.protocol, kind));
                kinds.insert((b.protocol, kind));
            }
        }
    }
    kinds
}

#[cfg(test)]
mod tests {
    use std::{
        net::{IpAddr, Ipv4Addr, Ipv6Addr},
        sync::{Arc, RwLock},
        time::SystemTime,
    };

    use proptest::prelude::*;

    use super::*;
    use crate::{
        event::PortEvent,
        explain,
        map::{Entry, Holder},
        socket::{ShareOptions, SockState},
    };

    const T0: SystemTime = SystemTime::UNIX_EPOCH;

    fn build() -> BuildInfo {
        BuildInfo {
            version: "0.1.0".into(),
            revision: "abc123".into(),
            kernel: "6.1.0-test".into(),
        }
    }

    fn event(
        kind: EventKind,
        cookie: u64,
        protocol: Protocol,
        address: IpAddr,
        port: u16,
    ) -> PortEvent {
        PortEvent {
            pid: 4242,
            tid: 4242,
            process: "nginx".into(),
            cgroup_id: 5,
            ..PortEvent::example(kind, protocol, address, port, cookie)
        }
    }

    fn failed(port: u16, errno: Errno) -> PortEvent {
        let mut failed = event(
            EventKind::BindFailed,
            99,
            Protocol::Tcp,
            IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            port,
        );
        failed.errno = Some(errno);
        failed
    }

    /// Applies `event` the way the pipeline does for what these tests need.
    fn apply(state: &mut State, event: &PortEvent) {
        state.counters.count(event);
        state.map.apply(event, T0);
    }

    /// A listener: a bind, then (for TCP) a listen.
    fn listen(state: &mut State, mut bind: PortEvent) {
        bind.kind = EventKind::Bind;
        apply(state, &bind);
        if bind.protocol != Protocol::Udp {
            apply(
                state,
                &PortEvent {
                    kind: EventKind::Listen,
                    ..bind
                },
            );
        }
    }

    fn render(state: State) -> String {
        Metrics::new(Arc::new(RwLock::new(state)), build())
            .expect("metrics")
            .render()
    }

    fn has(text: &str, line: &str) -> bool {
        text.lines().any(|l| l == line)
    }

    #[track_caller]
    fn assert_line(text: &str, line: &str) {
        assert!(has(text, line), "no line `{line}` in:\n{text}");
    }

    fn v4(octets: [u8; 4]) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(octets))
    }

    #[test]
    fn n_failed_binds_count_exactly_n() {
        let mut state = State::new(100, 1000);
        for _ in 0..7 {
            apply(&mut state, &failed(8000, Errno::EADDRINUSE));
        }
        apply(&mut state, &failed(80, Errno::EACCES));
        let text = render(state);
        for line in [
            r#"portwatch_bind_failures_total{errno="EADDRINUSE",family="ipv4",protocol="tcp"} 7"#,
            r#"portwatch_bind_failures_total{errno="EACCES",family="ipv4",protocol="tcp"} 1"#,
            r#"portwatch_port_bind_failures_total{errno="EADDRINUSE",port="8000",protocol="tcp"} 7"#,
            r#"portwatch_port_bind_failures_total{errno="EACCES",port="80",protocol="tcp"} 1"#,
            r#"portwatch_events_total{kind="bind_failed"} 8"#,
        ] {
            assert_line(&text, line);
        }
    }

    #[test]
    fn alerting_series_start_at_zero() {
        let text = render(State::new(100, 1000));
        for line in [
            r#"portwatch_bind_failures_total{errno="EADDRINUSE",family="ipv4",protocol="tcp"} 0"#,
            r#"portwatch_bind_failures_total{errno="EADDRINUSE",family="ipv6",protocol="udp"} 0"#,
            r#"portwatch_binds_total{family="ipv6",protocol="tcp"} 0"#,
            r#"portwatch_events_total{kind="close"} 0"#,
            r#"portwatch_reconcile_drift_total{kind="changed"} 0"#,
            "portwatch_decode_errors_total 0",
            "portwatch_shared_ports 0",
            "portwatch_ready 0",
        ] {
            assert_line(&text, line);
        }
    }

    #[test]
    fn ports_past_the_cap_and_ephemeral_requests_count_as_other() {
        let mut state = State::new(100, 1);
        for port in [8000, 8001, 8002, 0] {
            apply(&mut state, &failed(port, Errno::EADDRINUSE));
        }
        let text = render(state);
        assert_line(
            &text,
            r#"portwatch_port_bind_failures_total{errno="EADDRINUSE",port="8000",protocol="tcp"} 1"#,
        );
        assert_line(
            &text,
            r#"portwatch_port_bind_failures_total{errno="EADDRINUSE",port="other",protocol="tcp"} 3"#,
        );
        assert!(!text.contains(r#"port="8001""#));
    }

    #[test]
    fn listeners_are_counted_per_port_protocol_and_family() {
        let mut state = State::new(100, 1000);
        let wildcard4 = v4([0, 0, 0, 0]);
        for cookie in [1, 2] {
            let mut bind = event(EventKind::Bind, cookie, Protocol::Tcp, wildcard4, 8000);
            bind.options.reuse_port = Some(true);
            listen(&mut state, bind);
        }
        let mut v6 = event(
            EventKind::Bind,
            3,
            Protocol::Tcp,
            IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            8000,
        );
        v6.options.v6only = Some(true);
        listen(&mut state, v6);
        listen(
            &mut state,
            event(EventKind::Bind, 4, Protocol::Udp, wildcard4, 8000),
        );
        listen(
            &mut state,
            event(EventKind::Bind, 5, Protocol::Tcp, wildcard4, 9000),
        );
        // Bound, not listening: holds the port but is no listener.
        apply(
            &mut state,
            &event(EventKind::Bind, 6, Protocol::Tcp, wildcard4, 7000),
        );
        let text = render(state);
        for line in [
            r#"portwatch_listeners{family="ipv4",port="8000",protocol="tcp"} 2"#,
            r#"portwatch_listeners{family="ipv6",port="8000",protocol="tcp"} 1"#,
            r#"portwatch_listeners{family="ipv4",port="8000",protocol="udp"} 1"#,
            r#"portwatch_listeners{family="ipv4",port="9000",protocol="tcp"} 1"#,
            "portwatch_shared_ports 1",
            r#"portwatch_port_shared{kind="reuse_port_group",port="8000",protocol="tcp"} 1"#,
            r#"portwatch_port_shared{kind="v6only_split",port="8000",protocol="tcp"} 1"#,
            r#"portwatch_port_shared{kind="different_protocol",port="8000",protocol="tcp"} 1"#,
            r#"portwatch_port_shared{kind="different_protocol",port="8000",protocol="udp"} 1"#,
            r#"portwatch_binds_total{family="ipv4",protocol="tcp"} 4"#,
            r#"portwatch_binds_total{family="ipv6",protocol="tcp"} 1"#,
            r#"portwatch_events_total{kind="listen"} 4"#,
        ] {
            assert_line(&text, line);
        }
        assert_eq!(text.matches("portwatch_port_shared{").count(), 4, "{text}");
        assert!(!text.contains(r#"port="7000""#), "{text}");
        assert!(!text.contains(r#"port="9000",protocol="tcp",kind"#));
    }

    #[test]
    fn one_port_in_many_namespaces_is_counted_not_shared() {
        let mut state = State::new(100, 1000);
        state.ephemeral_range = crate::state::LINUX_EPHEMERAL_RANGE;
        let wildcard4 = v4([0, 0, 0, 0]);
        for (cookie, port) in (1..=3).flat_map(|netns| [(netns, 8080), (netns + 10, 40000)]) {
            let mut bind = event(EventKind::Bind, cookie, Protocol::Tcp, wildcard4, port);
            bind.netns = Some(cookie % 10);
            listen(&mut state, bind);
        }
        let shared = Arc::new(RwLock::new(state));
        let metrics = Metrics::new(shared.clone(), build()).expect("metrics");
        let text = metrics.render();
        for line in [
            "portwatch_shared_ports 0",
            r#"portwatch_port_namespaces{port="8080",protocol="tcp"} 3"#,
        ] {
            assert_line(&text, line);
        }
        assert!(!text.contains("portwatch_port_shared{"), "{text}");
        // In the ephemeral range: no series.
        assert!(
            !text.contains(r#"portwatch_port_namespaces{port="40000""#),
            "{text}"
        );

        // A second listener in one namespace's table is sharing, there alone.
        let mut bind = event(EventKind::Bind, 4, Protocol::Udp, wildcard4, 8080);
        bind.netns = Some(2);
        listen(&mut shared.write().unwrap(), bind);
        let text = metrics.render();
        for line in [
            "portwatch_shared_ports 1",
            r#"portwatch_port_shared{kind="different_protocol",port="8080",protocol="tcp"} 1"#,
            r#"portwatch_port_shared{kind="different_protocol",port="8080",protocol="udp"} 1"#,
            r#"portwatch_port_namespaces{port="8080",protocol="udp"} 1"#,
        ] {
            assert_line(&text, line);
        }
        assert!(!text.contains("different_netns"), "{text}");
    }

    #[test]
    fn ephemeral_ports_add_no_series_unless_shared_expected_or_outside_the_range() {
        let mut state = State::new(100, 2);
        state.expected = vec!["40100/udp".parse().unwrap()];
        let wildcard4 = v4([0, 0, 0, 0]);
        // 40 UDP sockets bound to port 0 got ports in the range.
        for cookie in 0..40 {
            listen(
                &mut state,
                event(
                    EventKind::Bind,
                    100 + cookie,
                    Protocol::Udp,
                    wildcard4,
                    40000 + cookie as u16,
                ),
            );
        }
        // Expected, and shared (two UDP sockets on one port), in the range.
        listen(
            &mut state,
            event(EventKind::Bind, 1, Protocol::Udp, wildcard4, 40100),
        );
        for cookie in [2, 3] {
            let mut bind = event(EventKind::Bind, cookie, Protocol::Udp, wildcard4, 40200);
            bind.options.reuse_port = Some(true);
            listen(&mut state, bind);
        }
        // Outside the range.
        listen(
            &mut state,
            event(EventKind::Bind, 4, Protocol::Tcp, wildcard4, 8000),
        );
        let text = render(state);
        // The cap of 2 names the lowest: 8000 and 40100; 40200 is other.
        for line in [
            r#"portwatch_listeners{family="ipv4",port="8000",protocol="tcp"} 1"#,
            r#"portwatch_listeners{family="ipv4",port="40100",protocol="udp"} 1"#,
            r#"portwatch_listeners{family="ipv4",port="other",protocol="udp"} 2"#,
            r#"portwatch_listeners_by_protocol{family="ipv4",protocol="udp"} 43"#,
            r#"portwatch_listeners_by_protocol{family="ipv4",protocol="tcp"} 1"#,
            r#"portwatch_port_shared{kind="reuse_port_group",port="other",protocol="udp"} 1"#,
            "portwatch_shared_ports 1",
        ] {
            assert_line(&text, line);
        }
        assert_eq!(text.matches("portwatch_listeners{").count(), 3, "{text}");
        assert!(!text.contains(r#"port="40000""#), "{text}");
    }

    fn namespace(name: &str, usable: u32, in_use: u32, udp: u32, listeners: u32) -> NetnsEphemeral {
        NetnsEphemeral {
            netns: 1,
            host: name == "host",
            name: name.to_owned(),
            place: Default::default(),
            range: crate::state::LINUX_EPHEMERAL_RANGE,
            size: 100,
            reserved: 0,
            held: 0,
            held_by: vec![],
            usable,
            in_use,
            utilization: f64::from(in_use) / f64::from(usable),
            destinations: vec![],
            destinations_total: 0,
            udp: ephemeral::UdpUse {
                in_use: udp,
                usable: 100,
                utilization: f64::from(udp) / 100.0,
            },
            listeners_in_range: listeners,
            connect_rate: None,
            busiest_growth: None,
            exhaustion_seconds: None,
            anti_patterns: vec![],
            anti_patterns_total: 0,
        }
    }

    #[test]
    fn namespaces_past_the_cap_fold_into_other_at_their_worst() {
        let mut all = vec![namespace("host", 100, 10, 0, 1)];
        for i in 0..NETNS_LABEL_CAP {
            all.push(namespace(&format!("pod-{i}"), 100, 1, 0, 0));
        }
        all.push(namespace("late-a", 80, 60, 5, 1));
        all.push(namespace("late-b", 90, 2, 70, 2));
        let [usable, in_use, utilization, listeners] = ephemeral_samples(&all);
        assert_eq!(usable.rows.len(), NETNS_LABEL_CAP + 1);
        let other = |samples: &Samples, protocol: Option<&str>| {
            samples
                .rows
                .iter()
                .find(|(labels, _)| labels[0] == "other" && protocol.is_none_or(|p| labels[1] == p))
                .map(|(_, value)| *value)
                .expect("an other series")
        };
        assert_eq!(other(&usable, None), 80.0);
        assert_eq!(other(&in_use, Some("tcp")), 60.0);
        assert_eq!(other(&in_use, Some("udp")), 70.0);
        assert_eq!(other(&utilization, None), 0.75);
        assert_eq!(other(&listeners, None), 3.0);
        assert_eq!(usable.rows[0], (vec!["host".to_owned()], 100.0));
    }

    #[test]
    fn health_of_the_pipeline() {
        let mut state = State::new(100, 1000);
        state.drops = vec![("bind_outcome", 3), ("release", 0)];
        state.decode_errors = 2;
        state.hooks = vec![("bind_outcome", "tracepoint"), ("release", "cgroup_sock")];
        state.stats.reconciliations = 4;
        state.stats.untracked = 1;
        state.stats.drift = Drift {
            missing: 1,
            stale: 2,
            changed: 0,
        };
        state.ready = true;
        let text = render(state);
        for line in [
            r#"portwatch_events_dropped_total{hook="bind_outcome"} 3"#,
            r#"portwatch_events_dropped_total{hook="release"} 0"#,
            "portwatch_decode_errors_total 2",
            r#"portwatch_program_attached{hook="bind_outcome",path="tracepoint"} 1"#,
            r#"portwatch_program_attached{hook="release",path="cgroup_sock"} 1"#,
            "portwatch_reconciliations_total 4",
            "portwatch_untracked_sockets_total 1",
            r#"portwatch_reconcile_drift_total{kind="missing"} 1"#,
            r#"portwatch_reconcile_drift_total{kind="stale"} 2"#,
            r#"portwatch_reconcile_drift_total{kind="changed"} 0"#,
            r#"portwatch_build_info{kernel="6.1.0-test",revision="abc123",version="0.1.0"} 1"#,
            "portwatch_ready 1",
        ] {
            assert_line(&text, line);
        }
    }

    #[test]
    fn snapshot_durations_appear_once_measured() {
        let fresh = render(State::new(100, 1000));
        assert!(
            !fresh.contains("portwatch_snapshot_duration_seconds{"),
            "{fresh}"
        );
        let mut state = State::new(100, 1000);
        state.stats.startup_snapshot = Some(Duration::from_millis(1250));
        let started = render(state);
        assert_line(
            &started,
            r#"portwatch_snapshot_duration_seconds{kind="startup"} 1.25"#,
        );
        assert!(!started.contains(r#"kind="reconcile""#), "{started}");
        assert!(!started.contains(r#"kind="owners""#), "{started}");
        let mut state = State::new(100, 1000);
        state.stats.startup_snapshot = Some(Duration::from_millis(1250));
        state.stats.startup_owners = Some(Duration::from_millis(500));
        state.stats.reconcile_snapshot = Some(Duration::from_micros(40));
        let later = render(state);
        assert_line(
            &later,
            r#"portwatch_snapshot_duration_seconds{kind="owners"} 0.5"#,
        );
        assert_line(
            &later,
            r#"portwatch_snapshot_duration_seconds{kind="reconcile"} 0.00004"#,
        );
    }

    #[test]
    fn label_values_are_escaped() {
        let build = BuildInfo {
            revision: "a\"b\\c\nd".into(),
            ..build()
        };
        let state = Arc::new(RwLock::new(State::new(100, 1000)));
        let text = Metrics::new(state, build).unwrap().render();
        assert_line(
            &text,
            r#"portwatch_build_info{kernel="6.1.0-test",revision="a\"b\\c\nd",version="0.1.0"} 1"#,
        );
    }

    #[test]
    fn no_label_names_a_process() {
        let mut state = State::new(100, 1000);
        listen(
            &mut state,
            event(EventKind::Bind, 1, Protocol::Tcp, v4([0, 0, 0, 0]), 8000),
        );
        apply(&mut state, &failed(8000, Errno::EADDRINUSE));
        let text = render(state);
        let samples = text.lines().filter(|line| !line.starts_with('#'));
        for line in samples {
            assert!(!line.contains("pid="), "{line}");
            assert!(!line.contains("4242") && !line.contains("nginx"), "{line}");
        }
    }

    #[test]
    fn every_family_has_help_and_follows_the_naming_guide() {
        let mut state = State::new(100, 1000);
        state.stats.startup_snapshot = Some(Duration::from_millis(1));
        state.stats.reconcile_snapshot = Some(Duration::from_millis(1));
        // A listener: the per-port families have samples.
        listen(
            &mut state,
            event(EventKind::Bind, 1, Protocol::Tcp, v4([0, 0, 0, 0]), 8000),
        );
        // A namespace's ephemeral listing: so have the ephemeral families.
        state.ephemeral = Some(crate::snapshot::ephemeral::EphemeralListing {
            namespaces: vec![crate::snapshot::ephemeral::NetnsUsage {
                netns: 1,
                range: crate::state::LINUX_EPHEMERAL_RANGE,
                reserved: 0,
                reserved_ranges: vec![],
                unprivileged_port_start: None,
                local_addresses: None,
                destinations: vec![],
                destinations_total: 0,
                udp_ports: 0,
                seen: Default::default(),
                names: Vec::new(),
                connects: None,
                trend: None,
                place: Default::default(),
            }],
            skipped: 0,
            taken_at: T0,
            elapsed: Duration::ZERO,
        });
        let text = render(state);
        assert!(
            text.contains(r#"portwatch_ephemeral_ports_usable{netns="netns-1"} 28232"#),
            "{text}"
        );
        let types: Vec<(&str, &str)> = text
            .lines()
            .filter_map(|line| line.strip_prefix("# TYPE "))
            .filter_map(|rest| rest.split_once(' '))
            .collect();
        assert!(types.len() >= SPECS.len(), "{text}");
        for (name, kind) in types {
            assert!(
                text.lines()
                    .any(|l| l.starts_with(&format!("# HELP {name} "))),
                "{name} has no help"
            );
            assert_eq!(
                kind == "counter",
                name.ends_with("_total"),
                "{name}: {kind}"
            );
            assert!(name.starts_with("portwatch_") || name.starts_with("process_"));
        }
    }

    #[test]
    fn each_scrape_reads_the_state_anew() {
        let state = Arc::new(RwLock::new(State::new(100, 1000)));
        let metrics = Metrics::new(state.clone(), build()).unwrap();
        let series =
            r#"portwatch_bind_failures_total{errno="EADDRINUSE",family="ipv4",protocol="tcp"}"#;
        assert_line(&metrics.render(), &format!("{series} 0"));
        for _ in 0..3 {
            apply(
                &mut state.write().unwrap(),
                &failed(8000, Errno::EADDRINUSE),
            );
        }
        assert_line(&metrics.render(), &format!("{series} 3"));
    }

    #[test]
    fn kind_names_are_the_apis() {
        for kind in CoexistReason::ALL {
            assert_eq!(
                serde_json::to_value(kind).unwrap(),
                serde_json::Value::from(kind.name()),
                "{kind:?}"
            );
        }
    }

    fn entry(facts: SocketFacts) -> Entry {
        Entry {
            facts,
            holders: Arc::new([Holder {
                pid: 1,
                process: "x".into(),
            }]),
            inode: None,
            cgroup_id: None,
            place: Default::default(),
            since: T0,
            since_exact: true,
            owners_pending: false,
        }
    }

    /// One listener on port 8000: (netns, protocol, address, reuse_addr,
    /// reuse_port, v6only, uid).
    fn listener() -> impl Strategy<Value = SocketFacts> {
        let addresses = [
            v4([0, 0, 0, 0]),
            v4([127, 0, 0, 1]),
            v4([10, 0, 0, 1]),
            IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            IpAddr::V6(Ipv6Addr::LOCALHOST),
        ];
        let protocols = [Protocol::Tcp, Protocol::Udp, Protocol::Mptcp];
        let flag = || proptest::option::of(any::<bool>());
        (
            1..4u64,
            0..protocols.len(),
            0..addresses.len(),
            flag(),
            flag(),
            flag(),
            0..2u32,
        )
            .prop_map(
                move |(netns, protocol, address, reuse_addr, reuse_port, v6only, uid)| {
                    let (protocol, address) = (protocols[protocol], addresses[address]);
                    SocketFacts {
                        cookie: 0,
                        netns,
                        protocol,
                        family: if address.is_ipv4() {
                            Family::Ipv4
                        } else {
                            Family::Ipv6
                        },
                        address,
                        port: 8000,
                        state: if protocol == Protocol::Udp {
                            SockState::Bound
                        } else {
                            SockState::Listening
                        },
                        options: ShareOptions {
                            reuse_addr,
                            reuse_port,
                            v6only: v6only.filter(|_| address.is_ipv6()),
                        },
                        uid: Some(uid),
                        bound_dev_if: 0,
                    }
                },
            )
    }

    proptest! {
        #[test]
        fn sharing_kinds_are_what_explain_says(mut listeners in proptest::collection::vec(listener(), 0..12)) {
            for (i, facts) in listeners.iter_mut().enumerate() {
                facts.cookie = i as u64 + 1;
            }
            listeners.sort_by_key(|f| (f.netns, f.protocol, f.family, f.address, f.cookie));
            let entries: Vec<Entry> = listeners.iter().cloned().map(entry).collect();
            let refs: Vec<&Entry> = entries.iter().collect();
            let explained = explain::explain(8000, &refs, 1, &[]);
            let protocol_of = |cookie: u64| listeners.iter().find(|f| f.cookie == cookie).unwrap().protocol;
            let expected: HashSet<(Protocol, CoexistReason)> = explained
                .sharing()
                .flat_map(|sharing| sharing.listeners.iter().map(|&c| (protocol_of(c), sharing.kind)))
                .collect();
            prop_assert_eq!(sharing_kinds(&listeners), expected);
        }
    }
}
