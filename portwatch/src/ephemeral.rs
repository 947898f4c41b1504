//! Ephemeral ports, one network namespace at a time: how many ports of the
//! range outgoing connections can still use, which destinations use the
//! most, and what takes ports out of the range. Pure: the listing
//! ([`crate::snapshot::ephemeral`]) and the live map in, the answer out.
//!
//! The arithmetic is the kernel's (`__inet_hash_connect`):
//! - a TCP connect may take any port of the range that is neither reserved
//!   (`ip_local_reserved_ports`) nor held by a bind(): a listener, or a
//!   socket bound and not listening. Such a port is skipped for every
//!   destination: that is `usable`;
//! - a usable port is free for a destination unless a connection from it
//!   already goes to the same (local address, remote address, remote port).
//!   Each destination has `usable` ports of its own, so the busiest one runs
//!   out first: its share is the namespace's `utilization`;
//! - UDP's autobind (bind to port 0, or connect or sendto on an unbound
//!   socket) takes a port for every destination: UDP counts the distinct
//!   ports its sockets hold against the range less the reserved ports.

use std::{sync::Arc, time::SystemTime};

use serde::Serialize;

use crate::{
    event::PortEvent,
    map::{Entry, Holder, PortMap},
    snapshot::{
        ephemeral::{Destination, NetnsUsage, PortRange, Trend, folded},
        owners::Place,
    },
    socket::{NetnsCookie, Protocol, SockState},
    state::{EarlyBind, State},
};

/// How many held ports a namespace's answer lists (all are counted).
pub const HELD_SHOWN: usize = 50;

/// How many listeners inside the range a namespace's answer lists as
/// anti-patterns (all are counted). A host with 50k listeners in its range
/// gets the same few KiB as one with 50, not a line per listener built for
/// every scrape.
pub const IN_RANGE_SHOWN: usize = 50;

/// One namespace's ephemeral ports.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct NetnsEphemeral {
    pub netns: NetnsCookie,
    /// The machine's own namespace.
    pub host: bool,
    /// `host`, the pod (`namespace/name`), the container's name or id, its
    /// name under /run/netns, or `netns-<cookie>`: what the metrics'
    /// `netns` label says.
    pub name: String,
    /// Where the processes of its busiest destination live, when known.
    #[serde(flatten)]
    pub place: Place,
    pub range: PortRange,
    /// Ports in the range.
    pub size: u32,
    /// Ports of the range that are reserved.
    pub reserved: u32,
    /// Distinct ports of the range that TCP binds hold (listeners and bound
    /// sockets): no outgoing connection can use them.
    pub held: u32,
    /// The first [`HELD_SHOWN`] TCP sockets holding a port in the range,
    /// with their processes, by port.
    pub held_by: Vec<HeldPort>,
    /// `size - reserved - held`: the ports each destination may use.
    pub usable: u32,
    /// Sockets to the busiest destination (0 without connections).
    pub in_use: u32,
    /// `in_use / usable`, 0 to 1 (1 when nothing is usable).
    pub utilization: f64,
    /// The busiest destinations, busiest first.
    pub destinations: Vec<DestinationUse>,
    /// How many destinations there are in all.
    pub destinations_total: usize,
    pub udp: UdpUse,
    /// Listeners inside the range.
    pub listeners_in_range: u32,
    /// New outgoing TCP connections per second since the previous listing.
    pub connect_rate: Option<f64>,
    /// The busiest destination's net change per second since the previous
    /// listing (new sockets less those gone).
    pub busiest_growth: Option<f64>,
    /// At that pace, seconds until the busiest destination has no usable
    /// port left (0 when it has none now); `None` while it does not grow.
    pub exhaustion_seconds: Option<f64>,
    /// What takes ports from the range and should not: listeners inside it
    /// (the first [`IN_RANGE_SHOWN`] by port), then the processes that bind
    /// before they connect.
    pub anti_patterns: Vec<AntiPattern>,
    /// How many anti-patterns there are, listed or not.
    pub anti_patterns_total: usize,
}

/// A TCP socket that holds a port inside the range.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HeldPort {
    pub port: u16,
    pub address: std::net::IpAddr,
    /// `listening`, `bound` (bound and not listening), or `bound,
    /// connected` (bound before it connected: its bind holds the port).
    pub state: &'static str,
    pub cookie: u64,
    /// The map's list, shared.
    pub holders: Arc<[Holder]>,
}

/// The connections to one destination, against the usable ports.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DestinationUse {
    #[serde(flatten)]
    pub destination: Destination,
    /// Every socket to it: established, SYN_SENT, TIME_WAIT and closing.
    pub in_use: u32,
    /// `in_use / usable`.
    pub utilization: f64,
}

/// UDP's share of the range.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct UdpUse {
    /// Distinct ports of the range UDP sockets hold.
    pub in_use: u32,
    /// `size - reserved`.
    pub usable: u32,
    pub utilization: f64,
}

/// Something that takes ports from every outgoing connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AntiPattern {
    /// `listener_in_range` or `bind_before_connect` (the last such
    /// socket's address and port).
    pub kind: &'static str,
    pub port: u16,
    pub protocol: Protocol,
    pub address: std::net::IpAddr,
    pub holders: Arc<[Holder]>,
    /// What it costs, in a sentence.
    pub detail: String,
}

/// `part / whole`, 1 when nothing is usable but something is asked for.
fn ratio(part: u32, whole: u32) -> f64 {
    match (part, whole) {
        (0, _) => 0.0,
        (_, 0) => 1.0,
        (part, whole) => f64::from(part) / f64::from(whole),
    }
}

/// The metrics' and tables' name of a namespace: `host`, its pod, its
/// container, its name under /run/netns, or `netns-<cookie>`.
pub fn netns_name(netns: NetnsCookie, host: bool, place: &Place, names: &[String]) -> String {
    let workload = &place.workload;
    if host {
        "host".to_owned()
    } else if let (Some(namespace), Some(pod)) = (&workload.pod_namespace, &workload.pod) {
        format!("{namespace}/{pod}")
    } else if let Some(name) = &workload.container_name {
        name.clone()
    } else if let Some(id) = &place.container {
        format!("{id:.12}")
    } else if let Some(name) = names.first() {
        name.clone()
    } else {
        format!("netns-{netns}")
    }
}

/// TCP sockets the map has holding a port of `range` in `netns`: listeners,
/// bound sockets, and sockets bound before they connected.
fn holding(map: &PortMap, netns: NetnsCookie, range: PortRange) -> Vec<&Entry> {
    let mut found: Vec<&Entry> = map
        .in_ports(range.low..=range.high)
        .filter(|entry| entry.facts.state.is_listening_or_bound())
        .chain(map.connected_binds())
        .filter(|entry| {
            let facts = &entry.facts;
            facts.netns == netns
                && matches!(facts.protocol, Protocol::Tcp | Protocol::Mptcp)
                && range.contains(facts.port)
        })
        .collect();
    found.sort_by_key(|entry| (entry.facts.port, entry.facts.cookie));
    found
}

/// One namespace's answer: its listing, the live map's binds in its range,
/// the bind-before-connect sockets seen there, and at most `top`
/// destinations.
pub fn explain<'a>(
    usage: &NetnsUsage,
    map: &PortMap,
    host: NetnsCookie,
    top: usize,
    early_binds: impl IntoIterator<Item = &'a EarlyBind>,
) -> NetnsEphemeral {
    let range = usage.range;
    let size = range.len();
    let is_host = usage.netns == host;
    let mut held_ports: Vec<u16> = Vec::new();
    let mut held_by = Vec::new();
    let mut anti_patterns = Vec::new();
    let mut listeners_in_range = 0;
    for entry in holding(map, usage.netns, range) {
        let facts = &entry.facts;
        // Reserved ports are counted as reserved, once.
        if !usage.is_reserved(facts.port) {
            held_ports.push(facts.port);
        }
        let listening = facts.state == SockState::Listening;
        if held_by.len() < HELD_SHOWN {
            held_by.push(HeldPort {
                port: facts.port,
                address: facts.address,
                state: match facts.state {
                    SockState::Listening => "listening",
                    SockState::Connected => "bound, connected",
                    _ => "bound",
                },
                cookie: facts.cookie,
                holders: entry.holders.clone(),
            });
        }
        if listening {
            listeners_in_range += 1;
        }
        if listening && anti_patterns.len() < IN_RANGE_SHOWN {
            anti_patterns.push(AntiPattern {
                kind: "listener_in_range",
                port: facts.port,
                protocol: facts.protocol,
                address: facts.address,
                holders: entry.holders.clone(),
                detail: format!(
                    "port {} is inside the ephemeral range {}-{}: no outgoing connection can \
                     use it, and the listener fails to start whenever a connection holds it \
                     first; move it below {} or add it to net.ipv4.ip_local_reserved_ports",
                    facts.port, range.low, range.high, range.low
                ),
            });
        }
    }
    let early = bind_before_connect(usage.netns, early_binds);
    let anti_patterns_total = listeners_in_range as usize + early.len();
    anti_patterns.extend(early);
    held_ports.dedup();
    let held = held_ports.len() as u32;
    let usable = size.saturating_sub(usage.reserved).saturating_sub(held);
    let destinations: Vec<DestinationUse> = usage
        .destinations
        .iter()
        .take(top)
        .map(|destination| {
            let in_use = destination.states.total();
            DestinationUse {
                destination: destination.clone(),
                in_use,
                utilization: ratio(in_use, usable),
            }
        })
        .collect();
    let in_use = usage
        .destinations
        .first()
        .map_or(0, |busiest| busiest.states.total());
    let udp_usable = size.saturating_sub(usage.reserved);
    NetnsEphemeral {
        netns: usage.netns,
        host: is_host,
        name: netns_name(usage.netns, is_host, &usage.place, &usage.names),
        place: usage.place.clone(),
        range,
        size,
        reserved: usage.reserved,
        held,
        held_by,
        usable,
        in_use,
        utilization: ratio(in_use, usable),
        destinations,
        destinations_total: usage.destinations_total,
        udp: UdpUse {
            in_use: usage.udp_ports,
            usable: udp_usable,
            utilization: ratio(usage.udp_ports, udp_usable),
        },
        listeners_in_range,
        anti_patterns,
        anti_patterns_total,
        connect_rate: usage.trend.and_then(|trend| trend.connect_rate),
        busiest_growth: usage.trend.map(|trend| trend.busiest_growth),
        exhaustion_seconds: exhaustion(in_use, usable, usage.trend),
    }
}

/// Seconds until `in_use` reaches `usable` at the trend's pace.
fn exhaustion(in_use: u32, usable: u32, trend: Option<Trend>) -> Option<f64> {
    if in_use >= usable {
        return Some(0.0);
    }
    let growth = trend?.busiest_growth;
    (growth > 0.0).then(|| f64::from(usable - in_use) / growth)
}

/// The bind-before-connect sightings in `netns`, one anti-pattern per
/// process, the most frequent first.
fn bind_before_connect<'a>(
    netns: NetnsCookie,
    early_binds: impl IntoIterator<Item = &'a EarlyBind>,
) -> Vec<AntiPattern> {
    let mut by_process: Vec<(u32, &str, u32, &EarlyBind)> = Vec::new();
    for early in early_binds.into_iter().filter(|e| e.netns == netns) {
        match by_process.iter_mut().find(|(pid, ..)| *pid == early.pid) {
            Some((_, _, count, last)) => {
                *count += 1;
                *last = early;
            }
            None => by_process.push((early.pid, &early.process, 1, early)),
        }
    }
    by_process.sort_by_key(|(pid, _, count, _)| (std::cmp::Reverse(*count), *pid));
    by_process
        .into_iter()
        .map(|(pid, process, count, last)| AntiPattern {
            kind: "bind_before_connect",
            port: last.port,
            protocol: Protocol::Tcp,
            address: last.address,
            holders: Arc::new([Holder {
                pid,
                process: process.to_owned(),
            }]),
            detail: format!(
                "{count} TCP {} of {process} {} bound to port 0 before connect() (the last \
                 took port {} to reach {}): each takes its port from the range for every \
                 destination; set IP_BIND_ADDRESS_NO_PORT before bind(), or do not bind, so \
                 that connect() picks a port per destination",
                if count == 1 { "socket" } else { "sockets" },
                if count == 1 { "was" } else { "were" },
                last.port,
                last.peer
            ),
        })
        .collect()
}

/// What the latest listing says of the destination of `event`, a connect
/// that found no local port at `at` (before the listing), in a sentence;
/// `None` without a listing of its namespace.
pub fn connect_failure_cause(state: &State, event: &PortEvent, at: SystemTime) -> Option<String> {
    let listing = state.ephemeral.as_ref()?;
    let netns = event.netns?;
    let peer = event.peer?;
    let usage = listing.namespaces.iter().find(|u| u.netns == netns)?;
    let view = explain(usage, &state.map, state.host_netns, 0, []);
    let after = listing
        .taken_at
        .duration_since(at)
        .map_or(0, |after| after.as_millis());
    let range = format!(
        "range {}-{}, {} reserved, {} held by binds; listed {after} ms after",
        view.range.low, view.range.high, view.reserved, view.held
    );
    if matches!(event.protocol, Protocol::Udp | Protocol::UdpLite) {
        return Some(format!(
            "UDP sockets held {} of the {} unreserved ports of the range ({range})",
            view.udp.in_use, view.udp.usable
        ));
    }
    let remote = folded(peer.ip());
    let in_use = usage
        .destinations
        .iter()
        .filter(|d| d.key.remote_address == remote && d.key.remote_port == peer.port())
        .map(|d| d.states.total())
        .max()
        .unwrap_or(0);
    Some(if in_use >= view.usable {
        format!(
            "all {} usable local ports to {peer} were in use ({range})",
            view.usable
        )
    } else {
        format!(
            "{in_use} of the {} usable local ports to {peer} were in use ({range})",
            view.usable
        )
    })
}

/// Orders namespaces: the host's first, then by utilization (of TCP or
/// UDP, whichever is higher), fullest first, then by cookie.
pub fn sort(namespaces: &mut [NetnsEphemeral]) {
    namespaces.sort_by(|a, b| {
        b.host
            .cmp(&a.host)
            .then(b.worst().total_cmp(&a.worst()))
            .then(a.netns.cmp(&b.netns))
    });
}

impl NetnsEphemeral {
    /// The higher of TCP's and UDP's utilization.
    pub fn worst(&self) -> f64 {
        self.utilization.max(self.udp.utilization)
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use super::*;
    use crate::{
        map::Observed,
        snapshot::ephemeral::{DestinationKey, StateCounts},
        socket::{Family, ShareOptions, SocketFacts},
    };

    const RANGE: PortRange = PortRange {
        low: 40000,
        high: 40009,
    };

    fn usage(busiest: u32, reserved: u32) -> NetnsUsage {
        let destination = |port, established| {
            Destination::new(
                DestinationKey {
                    protocol: Protocol::Tcp,
                    local_address: IpAddr::V4(Ipv4Addr::LOCALHOST),
                    remote_address: IpAddr::V4(Ipv4Addr::LOCALHOST),
                    remote_port: port,
                },
                StateCounts {
                    established,
                    ..StateCounts::default()
                },
            )
        };
        NetnsUsage {
            netns: 7,
            range: RANGE,
            reserved,
            reserved_ranges: if reserved > 0 {
                vec![40009 - (reserved as u16 - 1)..=40009]
            } else {
                vec![]
            },
            unprivileged_port_start: None,
            local_addresses: None,
            destinations: vec![destination(443, busiest), destination(80, 1)],
            destinations_total: 2,
            udp_ports: 3,
            seen: Default::default(),
            names: Vec::new(),
            connects: None,
            trend: None,
            place: Place::default(),
        }
    }

    fn listen(map: &mut PortMap, port: u16, cookie: u64) {
        let seen = Observed {
            facts: SocketFacts {
                cookie,
                netns: 7,
                protocol: Protocol::Tcp,
                family: Family::Ipv4,
                address: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                port,
                state: SockState::Listening,
                options: ShareOptions::default(),
                uid: Some(0),
                bound_dev_if: 0,
            },
            holders: Arc::new([Holder {
                pid: 9,
                process: "server".into(),
            }]),
            inode: std::num::NonZeroU64::new(cookie),
            place: Default::default(),
        };
        map.merge(vec![seen], SystemTime::UNIX_EPOCH);
    }

    #[test]
    fn the_busiest_destination_against_the_usable_ports() {
        let map = PortMap::default();
        let view = explain(&usage(5, 0), &map, 1, 10, []);
        assert_eq!(
            (view.size, view.reserved, view.held, view.usable),
            (10, 0, 0, 10)
        );
        assert_eq!(view.in_use, 5);
        assert_eq!(view.utilization, 0.5);
        assert_eq!(view.destinations.len(), 2);
        assert_eq!(view.destinations[1].utilization, 0.1);
        assert_eq!(view.udp.in_use, 3);
        assert_eq!(view.udp.utilization, 0.3);
        assert_eq!(view.name, "netns-7");
        assert!(!view.host);
        let top = explain(&usage(5, 0), &map, 7, 1, []);
        assert_eq!(top.destinations.len(), 1);
        assert_eq!(top.destinations_total, 2);
        assert_eq!(top.name, "host");
    }

    #[test]
    fn a_listener_in_the_range_takes_a_port_from_every_destination() {
        let mut map = PortMap::default();
        listen(&mut map, 40003, 1);
        // Outside the range: not counted.
        listen(&mut map, 8080, 2);
        let view = explain(&usage(9, 0), &map, 1, 10, []);
        assert_eq!((view.held, view.usable, view.listeners_in_range), (1, 9, 1));
        assert_eq!(view.utilization, 1.0);
        assert_eq!(view.anti_patterns.len(), 1);
        assert_eq!(view.anti_patterns[0].kind, "listener_in_range");
        assert_eq!(view.anti_patterns[0].port, 40003);
        assert_eq!(view.held_by[0].state, "listening");
        // A reserved port is counted once, as reserved.
        listen(&mut map, 40009, 3);
        let view = explain(&usage(9, 1), &map, 1, 10, []);
        assert_eq!((view.reserved, view.held, view.usable), (1, 1, 8));
        assert_eq!(view.listeners_in_range, 2);
    }

    #[test]
    fn listeners_in_the_range_are_all_counted_and_the_first_few_listed() {
        const WIDE: PortRange = PortRange {
            low: 40000,
            high: 40199,
        };
        let mut map = PortMap::default();
        let count = IN_RANGE_SHOWN as u16 + 30;
        for i in 0..count {
            listen(&mut map, WIDE.low + i, u64::from(i) + 1);
        }
        let wide = NetnsUsage {
            range: WIDE,
            ..usage(1, 0)
        };
        let view = explain(&wide, &map, 1, 10, []);
        assert_eq!(view.listeners_in_range, u32::from(count));
        assert_eq!(view.held, u32::from(count));
        assert_eq!(view.anti_patterns_total, usize::from(count));
        assert_eq!(view.anti_patterns.len(), IN_RANGE_SHOWN);
        assert_eq!(view.held_by.len(), HELD_SHOWN);
        // The lowest ports, in order.
        let listed: Vec<u16> = view.anti_patterns.iter().map(|a| a.port).collect();
        let lowest: Vec<u16> = (0..IN_RANGE_SHOWN as u16).map(|i| WIDE.low + i).collect();
        assert_eq!(listed, lowest);
    }

    #[test]
    fn sockets_bound_before_connecting_are_named_per_process() {
        let early = |pid: u32, netns: NetnsCookie, port: u16| EarlyBind {
            time: SystemTime::UNIX_EPOCH,
            netns,
            pid,
            process: format!("client{pid}"),
            address: Ipv4Addr::LOCALHOST.into(),
            port,
            peer: "10.1.2.3:443".parse().unwrap(),
        };
        let seen = [
            early(5, 7, 40001),
            early(6, 7, 40002),
            early(6, 7, 40003),
            early(6, 8, 40004),
        ];
        let view = explain(&usage(1, 0), &PortMap::default(), 1, 10, &seen);
        let kinds: Vec<(&str, u32, u16)> = view
            .anti_patterns
            .iter()
            .map(|a| (a.kind, a.holders[0].pid, a.port))
            .collect();
        assert_eq!(
            kinds,
            [
                ("bind_before_connect", 6, 40003),
                ("bind_before_connect", 5, 40001)
            ]
        );
        assert!(
            view.anti_patterns[0]
                .detail
                .starts_with("2 TCP sockets of client6")
        );
    }

    #[test]
    fn a_growing_destination_runs_out_at_its_pace() {
        let trend = |busiest_growth| {
            Some(Trend {
                seconds: 15.0,
                connect_rate: Some(40.0),
                busiest_growth,
            })
        };
        assert_eq!(exhaustion(4, 10, trend(2.0)), Some(3.0));
        assert_eq!(exhaustion(4, 10, trend(0.0)), None);
        assert_eq!(exhaustion(4, 10, trend(-1.0)), None);
        assert_eq!(exhaustion(4, 10, None), None);
        assert_eq!(exhaustion(10, 10, None), Some(0.0));
        // From two listings: 5 then 8 sockets to the busiest, 3 s apart.
        let (before, mut now) = (usage(5, 0), usage(8, 0));
        now.connects = Some(130);
        let mut before = before;
        before.connects = Some(100);
        now.trend = now.trend_since(&before, 3.0);
        let view = explain(&now, &PortMap::default(), 1, 10, []);
        assert_eq!(view.connect_rate, Some(10.0));
        assert_eq!(view.busiest_growth, Some(1.0));
        assert_eq!(view.exhaustion_seconds, Some(2.0));
    }

    #[test]
    fn nothing_usable_is_full_and_nothing_used_is_empty() {
        assert_eq!(ratio(0, 0), 0.0);
        assert_eq!(ratio(3, 0), 1.0);
        assert_eq!(ratio(1, 4), 0.25);
    }

    #[test]
    fn namespaces_are_named_by_their_workload() {
        let mut place = Place::default();
        assert_eq!(netns_name(9, false, &place, &[]), "netns-9");
        let named = ["blue".to_owned()];
        assert_eq!(netns_name(9, false, &place, &named), "blue");
        place.container = Some("0123456789abcdef0123".to_owned());
        assert_eq!(netns_name(9, false, &place, &named), "0123456789ab");
        place.workload.container_name = Some("redis".to_owned());
        assert_eq!(netns_name(9, false, &place, &named), "redis");
        place.workload.pod = Some("web-1".to_owned());
        place.workload.pod_namespace = Some("shop".to_owned());
        assert_eq!(netns_name(9, false, &place, &named), "shop/web-1");
        assert_eq!(netns_name(9, true, &place, &named), "host");
    }

    #[test]
    fn the_host_comes_first_then_the_fullest() {
        let map = PortMap::default();
        let mut namespaces = vec![
            explain(&usage(1, 0), &map, 1, 10, []),
            explain(&usage(8, 0), &map, 1, 10, []),
            explain(&usage(2, 0), &map, 7, 10, []),
        ];
        namespaces[1].netns = 8;
        sort(&mut namespaces);
        assert!(namespaces[0].host);
        assert_eq!(namespaces[1].in_use, 8);
    }
}
