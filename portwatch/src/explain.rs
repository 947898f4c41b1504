//! Why the listeners of one port coexist, and what about them surprises
//! people. Pure logic over the map's entries (the `localhost` resolution
//! order is an input, read once with [`localhost_order`]).

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, ToSocketAddrs},
};

use serde::Serialize;

use crate::{
    map::Entry,
    rules::{self, CoexistReason, Fill, Overlap},
    snapshot::{owners::Place, workload::Workload},
    socket::{Family, NetnsCookie, Protocol, SocketFacts},
};

/// A reason some listeners of a port coexist.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Sharing {
    /// The rule that lets them coexist.
    pub kind: CoexistReason,
    /// Cookies of the listeners it covers: a group on one address, or the
    /// first of each group the reason holds between.
    pub listeners: Vec<u64>,
    /// One plain sentence.
    pub explanation: String,
}

/// Something about a port that surprises people.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "flag", rename_all = "snake_case")]
pub enum Flag {
    /// IPv4 and IPv6 listeners on one port belong to different processes:
    /// which one answers depends on the address family a client picks.
    DualStackSplit {
        ipv4: Vec<u64>,
        ipv6: Vec<u64>,
        explanation: String,
    },
    /// Several sockets share one address with SO_REUSEPORT; the kernel
    /// spreads connections across them.
    ReuseportGroup {
        members: Vec<u64>,
        explanation: String,
    },
    /// A wildcard listener beside a specific one: the specific one gets the
    /// traffic for its address, the wildcard the rest.
    WildcardAndSpecific {
        wildcard: Vec<u64>,
        specific: Vec<u64>,
        explanation: String,
    },
}

impl Flag {
    /// The flag's name, as the API lists it.
    pub fn name(&self) -> &'static str {
        match self {
            Flag::DualStackSplit { .. } => "dual_stack_split",
            Flag::ReuseportGroup { .. } => "reuseport_group",
            Flag::WildcardAndSpecific { .. } => "wildcard_and_specific",
        }
    }
}

/// Which listener a TCP client of `localhost:PORT` on this machine reaches.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Localhost {
    /// Cookie of the listener that accepts the first address tried.
    pub reaches: Option<u64>,
    /// The address it is reached on.
    pub via: Option<IpAddr>,
    /// The order in which clients try the addresses of `localhost`.
    pub order: Vec<IpAddr>,
}

/// The explanation of one port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PortExplanation {
    pub port: u16,
    /// The network namespaces with a listener on the port, the host's first,
    /// then by cookie.
    pub namespaces: Vec<NetnsExplanation>,
    pub localhost: Localhost,
}

impl PortExplanation {
    /// Two or more listeners share one port table: one network namespace.
    pub fn shared(&self) -> bool {
        self.namespaces.iter().any(NetnsExplanation::shared)
    }

    /// In how many network namespaces the port has a listener.
    pub fn netns_count(&self) -> usize {
        self.namespaces.len()
    }

    /// The sharing reasons of every namespace.
    pub fn sharing(&self) -> impl Iterator<Item = &Sharing> {
        self.namespaces.iter().flat_map(|n| &n.sharing)
    }

    /// The flags of every namespace.
    pub fn flags(&self) -> impl Iterator<Item = &Flag> {
        self.namespaces.iter().flat_map(|n| &n.flags)
    }
}

/// The listeners of one port in one network namespace, which is one port
/// table: sharing is judged here and never across namespaces.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NetnsExplanation {
    pub netns: NetnsCookie,
    /// The machine's own namespace.
    pub host: bool,
    /// Cookies of its listeners, in the order given.
    pub listeners: Vec<u64>,
    pub sharing: Vec<Sharing>,
    pub flags: Vec<Flag>,
    /// Where its listeners' owners live, where they all agree (a pod's
    /// containers share its namespace, so `container` is set only when one
    /// container holds every listener).
    pub place: Place,
    /// The distinct process names holding its listeners, ascending.
    pub processes: Vec<String>,
}

impl NetnsExplanation {
    /// Two or more listeners in this one port table.
    pub fn shared(&self) -> bool {
        self.listeners.len() > 1
    }
}

/// Explains the listeners of `port`, one network namespace at a time.
/// `host_netns` is the namespace whose `localhost` the answer is about (the
/// machine's own).
pub fn explain(
    port: u16,
    listeners: &[&Entry],
    host_netns: NetnsCookie,
    localhost: &[IpAddr],
) -> PortExplanation {
    let mut by_netns: BTreeMap<(bool, NetnsCookie), Vec<&Entry>> = BTreeMap::new();
    for entry in listeners {
        let netns = entry.facts.netns;
        by_netns
            .entry((netns != host_netns, netns))
            .or_default()
            .push(entry);
    }
    let namespaces: Vec<NetnsExplanation> = by_netns
        .into_iter()
        .map(|((_, netns), members)| NetnsExplanation {
            netns,
            host: netns == host_netns,
            listeners: cookies(&members),
            sharing: sharing(&members),
            flags: flags(&members),
            place: common_place(&members),
            processes: processes(&members),
        })
        .collect();
    PortExplanation {
        port,
        namespaces,
        localhost: reach(listeners, host_netns, localhost),
    }
}

/// How many namespaces a port's answer shows unless asked for all: every
/// one when there are no more than this, otherwise the host's and those
/// where something is shared or failed, up to this many.
pub const NAMESPACES_SHOWN: usize = 8;

/// Which of `namespaces` an answer shows by default (see
/// [`NAMESPACES_SHOWN`]), as one flag each; `failed` are the namespaces
/// with a recent failure on the port.
pub fn worth_showing(namespaces: &[NetnsExplanation], failed: &BTreeSet<NetnsCookie>) -> Vec<bool> {
    if namespaces.len() <= NAMESPACES_SHOWN {
        return vec![true; namespaces.len()];
    }
    let mut shown = vec![false; namespaces.len()];
    let ranks: [&dyn Fn(&NetnsExplanation) -> bool; 3] =
        [&|n| n.host, &|n| n.shared(), &|n| failed.contains(&n.netns)];
    let mut left = NAMESPACES_SHOWN;
    for rank in ranks {
        for (i, namespace) in namespaces.iter().enumerate() {
            if left > 0 && !shown[i] && rank(namespace) {
                shown[i] = true;
                left -= 1;
            }
        }
    }
    shown
}

/// What the namespaces of a port are, counted: the summary an operator of a
/// node with hundreds of pods reads first.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct NamespaceSummary {
    /// The host's own namespace is one of them.
    pub host: bool,
    /// Namespaces whose listeners all belong to one Kubernetes pod.
    pub pods: usize,
    /// Namespaces whose listeners all belong to one container outside a
    /// known pod.
    pub containers: usize,
    /// Other namespaces (no single pod or container is known).
    pub other: usize,
    /// The Kubernetes namespaces of those pods, most namespaces first (at
    /// most [`SUMMARY_NAMES`]).
    pub pod_namespaces: Vec<NameCount>,
    /// The processes holding the port, by how many namespaces they hold it
    /// in, most first (at most [`SUMMARY_NAMES`]).
    pub processes: Vec<NameCount>,
}

/// How many names a summary lists at most.
pub const SUMMARY_NAMES: usize = 10;

/// A name and in how many namespaces it appears.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NameCount {
    pub name: String,
    pub namespaces: usize,
}

/// Counts the kinds of `namespaces`.
pub fn summarize(namespaces: &[NetnsExplanation]) -> NamespaceSummary {
    let mut summary = NamespaceSummary::default();
    let mut pod_namespaces: BTreeMap<&str, usize> = BTreeMap::new();
    let mut processes: BTreeMap<&str, usize> = BTreeMap::new();
    for namespace in namespaces {
        let workload = &namespace.place.workload;
        if namespace.host {
            summary.host = true;
        } else if workload.pod_uid.is_some() {
            summary.pods += 1;
            if let Some(name) = &workload.pod_namespace {
                *pod_namespaces.entry(name).or_default() += 1;
            }
        } else if namespace.place.container.is_some() {
            summary.containers += 1;
        } else {
            summary.other += 1;
        }
        for process in &namespace.processes {
            *processes.entry(process).or_default() += 1;
        }
    }
    summary.pod_namespaces = most_first(pod_namespaces);
    summary.processes = most_first(processes);
    summary
}

fn most_first(counts: BTreeMap<&str, usize>) -> Vec<NameCount> {
    let mut counts: Vec<NameCount> = counts
        .into_iter()
        .map(|(name, namespaces)| NameCount {
            name: name.to_owned(),
            namespaces,
        })
        .collect();
    // Stable: equal counts stay in name order.
    counts.sort_by_key(|count| std::cmp::Reverse(count.namespaces));
    counts.truncate(SUMMARY_NAMES);
    counts
}

/// The place the entries' owners share, field by field: a field is known
/// only when every entry knows it and they all say the same (an entry whose
/// owner is unknown may be anyone's).
fn common_place(entries: &[&Entry]) -> Place {
    fn common<T: Clone + PartialEq>(
        entries: &[&Entry],
        field: impl Fn(&Place) -> &Option<T>,
    ) -> Option<T> {
        let first = field(&entries.first()?.place).clone()?;
        entries
            .iter()
            .all(|e| field(&e.place).as_ref() == Some(&first))
            .then_some(first)
    }
    Place {
        cgroup: common(entries, |p| &p.cgroup),
        unit: common(entries, |p| &p.unit),
        container: common(entries, |p| &p.container),
        workload: Workload {
            container_name: common(entries, |p| &p.workload.container_name),
            pod: common(entries, |p| &p.workload.pod),
            pod_namespace: common(entries, |p| &p.workload.pod_namespace),
            pod_uid: common(entries, |p| &p.workload.pod_uid),
        },
    }
}

fn processes(entries: &[&Entry]) -> Vec<String> {
    let names: BTreeSet<&str> = entries
        .iter()
        .flat_map(|e| e.holders.iter().map(|h| h.process.as_str()))
        .collect();
    names.into_iter().map(str::to_owned).collect()
}

/// The addresses of `localhost` in the order this machine's resolver returns
/// them (getaddrinfo: /etc/hosts, /etc/gai.conf, RFC 6724). Falls back to the
/// RFC 6724 default (`::1` first) if resolution fails.
pub fn localhost_order() -> Vec<IpAddr> {
    let mut order: Vec<IpAddr> = Vec::new();
    if let Ok(addrs) = ("localhost", 0).to_socket_addrs() {
        for addr in addrs {
            if !order.contains(&addr.ip()) {
                order.push(addr.ip());
            }
        }
    }
    if order.is_empty() {
        order = vec![
            IpAddr::V6(Ipv6Addr::LOCALHOST),
            IpAddr::V4(Ipv4Addr::LOCALHOST),
        ];
    }
    order
}

/// Listeners of one namespace that share one (protocol, family, address): a
/// group that can only coexist through SO_REUSEPORT (or UDP SO_REUSEADDR).
type GroupKey = (Protocol, Family, IpAddr);

fn groups<'a>(listeners: &[&'a Entry]) -> BTreeMap<GroupKey, Vec<&'a Entry>> {
    let mut groups: BTreeMap<GroupKey, Vec<&Entry>> = BTreeMap::new();
    for entry in listeners {
        let f = &entry.facts;
        groups
            .entry((f.protocol, f.family, f.address))
            .or_default()
            .push(entry);
    }
    groups
}

/// A reason between groups, and the protocol it is about (none for
/// different protocols).
type BetweenKey = (CoexistReason, Option<Protocol>);

/// Why the listeners of one network namespace coexist, in at most one entry
/// per group and one per (reason, protocol) between groups: the answer grows
/// with the listeners, not with their pairs.
fn sharing(listeners: &[&Entry]) -> Vec<Sharing> {
    let groups: Vec<Vec<&Entry>> = groups(listeners).into_values().collect();
    let mut out = Vec::new();
    // Inside a group: one reason for the whole group.
    for group in groups.iter().filter(|g| g.len() > 1) {
        if let Some(kind) = rules::why_coexist(&group[0].facts, &group[1].facts) {
            out.push(Sharing {
                explanation: kind.explanation().to_string(),
                kind,
                listeners: cookies(group),
            });
        }
    }
    // Between groups (their first members): the pairs with one reason are
    // one entry. Different protocols are one entry whatever the protocols;
    // any other reason is one entry per protocol.
    let mut between: Vec<(BetweenKey, Vec<u64>, HashSet<u64>)> = Vec::new();
    for (i, a) in groups.iter().enumerate() {
        for b in &groups[i + 1..] {
            let Some(kind) = rules::why_coexist(&a[0].facts, &b[0].facts) else {
                continue;
            };
            let protocol =
                (kind != CoexistReason::DifferentProtocol).then_some(a[0].facts.protocol);
            let at = match between
                .iter()
                .position(|(key, ..)| *key == (kind, protocol))
            {
                Some(at) => at,
                None => {
                    between.push(((kind, protocol), Vec::new(), HashSet::new()));
                    between.len() - 1
                }
            };
            let (_, members, seen) = &mut between[at];
            for cookie in [a[0].facts.cookie, b[0].facts.cookie] {
                if seen.insert(cookie) {
                    members.push(cookie);
                }
            }
        }
    }
    out.extend(
        between
            .into_iter()
            .map(|((kind, _), listeners, _)| Sharing {
                explanation: kind.explanation().to_string(),
                kind,
                listeners,
            }),
    );
    out
}

fn pids(entries: &[&Entry]) -> Vec<u32> {
    let mut pids: Vec<u32> = entries
        .iter()
        .flat_map(|e| e.holders.iter().map(|h| h.pid))
        .collect();
    pids.sort_unstable();
    pids.dedup();
    pids
}

fn cookies(entries: &[&Entry]) -> Vec<u64> {
    entries.iter().map(|e| e.facts.cookie).collect()
}

/// The surprises among one namespace's listeners.
fn flags(listeners: &[&Entry]) -> Vec<Flag> {
    let mut flags = Vec::new();
    // Per protocol (`listeners` are one namespace's): the same port is only
    // comparable there.
    let mut scopes: BTreeMap<Protocol, Vec<&Entry>> = BTreeMap::new();
    for entry in listeners {
        scopes.entry(entry.facts.protocol).or_default().push(entry);
    }
    for scope in scopes.values() {
        let v4: Vec<&Entry> = scope
            .iter()
            .copied()
            .filter(|e| e.facts.family == Family::Ipv4)
            .collect();
        let v6: Vec<&Entry> = scope
            .iter()
            .copied()
            .filter(|e| e.facts.family == Family::Ipv6)
            .collect();
        let (pids4, pids6) = (pids(&v4), pids(&v6));
        if !v4.is_empty() && !v6.is_empty() && pids4.iter().all(|p| !pids6.contains(p)) {
            flags.push(Flag::DualStackSplit {
                explanation: format!(
                    "IPv4 is served by pid {} and IPv6 by pid {}: clients reach one or the other depending on the address they try first",
                    join(&pids4),
                    join(&pids6)
                ),
                ipv4: cookies(&v4),
                ipv6: cookies(&v6),
            });
        }
        for group in groups(scope).values().filter(|g| g.len() > 1) {
            if group
                .iter()
                .all(|e| e.facts.options.reuse_port == Some(true))
            {
                flags.push(Flag::ReuseportGroup {
                    explanation: format!(
                        "{} sockets share {} with SO_REUSEPORT (pids {}); the kernel spreads connections across them",
                        group.len(),
                        crate::event::endpoint(group[0].facts.address, group[0].facts.port),
                        join(&pids(group))
                    ),
                    members: cookies(group),
                });
            }
        }
        let (wild, specific): (Vec<&Entry>, Vec<&Entry>) = scope
            .iter()
            .copied()
            .partition(|e| rules::is_wildcard(e.facts.address));
        let overlapping: Vec<&Entry> = specific
            .into_iter()
            .filter(|s| wild.iter().any(|w| covers(&w.facts, s.facts.address)))
            .collect();
        if !wild.is_empty() && !overlapping.is_empty() {
            flags.push(Flag::WildcardAndSpecific {
                explanation: format!(
                    "a wildcard listener ({}) sits beside specific ones ({}): traffic to those addresses goes to the specific listener, the rest to the wildcard",
                    wild.iter().map(|e| endpoint(&e.facts)).collect::<Vec<_>>().join(", "),
                    overlapping.iter().map(|e| endpoint(&e.facts)).collect::<Vec<_>>().join(", ")
                ),
                wildcard: cookies(&wild),
                specific: cookies(&overlapping),
            });
        }
    }
    flags
}

fn endpoint(facts: &SocketFacts) -> String {
    crate::event::endpoint(facts.address, facts.port)
}

fn join(pids: &[u32]) -> String {
    pids.iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Whether a listener bound to `facts.address` accepts connections to `to`:
/// the same address (`::ffff:a.b.c.d` is `a.b.c.d`), the wildcard of its
/// family, or `[::]` without IPV6_V6ONLY (taken as unset when unknown) for
/// IPv4.
fn covers(facts: &SocketFacts, to: IpAddr) -> bool {
    let bound = rules::endpoint(facts.address, facts.options.v6only, Fill::Unset);
    let to = rules::endpoint(to, None, Fill::Unset);
    matches!(
        rules::overlap(to, bound),
        Some(Overlap::SameAddress | Overlap::ExistingWildcard | Overlap::ExistingDualStack)
    )
}

/// The first address of `order` some TCP listener in `netns` accepts, and
/// that listener: a specific address beats a wildcard, as in the kernel's
/// lookup.
pub(crate) fn reach(listeners: &[&Entry], netns: NetnsCookie, order: &[IpAddr]) -> Localhost {
    let tcp: Vec<&Entry> = listeners
        .iter()
        .copied()
        .filter(|e| e.facts.netns == netns && e.facts.protocol == Protocol::Tcp)
        .collect();
    for addr in order {
        let mut accepting: Vec<&Entry> = tcp
            .iter()
            .copied()
            .filter(|e| covers(&e.facts, *addr))
            .collect();
        accepting.sort_by_key(|e| {
            (
                rules::is_wildcard(e.facts.address),
                e.facts.family != Family::of(*addr),
            )
        });
        if let Some(first) = accepting.first() {
            return Localhost {
                reaches: Some(first.facts.cookie),
                via: Some(*addr),
                order: order.to_vec(),
            };
        }
    }
    Localhost {
        reaches: None,
        via: None,
        order: order.to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use std::{sync::Arc, time::SystemTime};

    use super::*;
    use crate::{
        map::Holder,
        socket::{ShareOptions, SockState},
    };

    fn entry(
        cookie: u64,
        pid: u32,
        address: &str,
        v6only: Option<bool>,
        reuse_port: bool,
    ) -> Entry {
        let address: IpAddr = address.parse().unwrap();
        Entry {
            facts: SocketFacts {
                cookie,
                netns: 1,
                protocol: Protocol::Tcp,
                family: Family::of(address),
                address,
                port: 8000,
                state: SockState::Listening,
                options: ShareOptions {
                    reuse_addr: Some(false),
                    reuse_port: Some(reuse_port),
                    v6only,
                },
                uid: Some(1000),
                bound_dev_if: 0,
            },
            holders: Arc::new([Holder {
                pid,
                process: format!("p{pid}"),
            }]),
            inode: None,
            cgroup_id: None,
            place: Default::default(),
            since: SystemTime::UNIX_EPOCH,
            since_exact: true,
            owners_pending: false,
        }
    }

    const LOCALHOST: [IpAddr; 2] = [
        IpAddr::V6(Ipv6Addr::LOCALHOST),
        IpAddr::V4(Ipv4Addr::LOCALHOST),
    ];

    #[test]
    fn the_seed_article_case_ipv6_answers_localhost() {
        // node listens 0.0.0.0:8000 (pid 1) and [::]:8000 v6only (pid 2).
        let v4 = entry(1, 1, "0.0.0.0", None, false);
        let v6 = entry(2, 2, "::", Some(true), false);
        let found = explain(8000, &[&v4, &v6], 1, &LOCALHOST);
        assert!(found.shared());
        assert_eq!(found.localhost.reaches, Some(2));
        assert_eq!(found.localhost.via, Some(LOCALHOST[0]));
        assert_eq!(
            found.flags().map(Flag::name).collect::<Vec<_>>(),
            ["dual_stack_split"]
        );
        assert_eq!(found.sharing().count(), 1);
        assert_eq!(found.sharing().next().unwrap().listeners, [1, 2]);
    }

    #[test]
    fn ipv4_first_resolution_reaches_the_ipv4_listener() {
        let v4 = entry(1, 1, "127.0.0.1", None, false);
        let v6 = entry(2, 2, "::1", Some(false), false);
        let order = [LOCALHOST[1], LOCALHOST[0]];
        let found = explain(8000, &[&v4, &v6], 1, &order);
        assert_eq!(found.localhost.reaches, Some(1));
    }

    #[test]
    fn a_dual_stack_wildcard_takes_ipv4_localhost() {
        let v6 = entry(2, 2, "::", Some(false), false);
        let found = explain(8000, &[&v6], 1, &[LOCALHOST[1]]);
        assert_eq!(found.localhost.reaches, Some(2));
        assert!(!found.shared());
        let v6only = entry(3, 2, "::", Some(true), false);
        assert_eq!(
            explain(8000, &[&v6only], 1, &[LOCALHOST[1]])
                .localhost
                .reaches,
            None
        );
    }

    #[test]
    fn specific_beats_wildcard_and_is_flagged() {
        let wild = entry(1, 1, "0.0.0.0", None, false);
        let lo = entry(2, 2, "127.0.0.1", None, false);
        let found = explain(8000, &[&wild, &lo], 1, &[LOCALHOST[1]]);
        assert_eq!(found.localhost.reaches, Some(2));
        let names: Vec<&str> = found.flags().map(Flag::name).collect();
        assert_eq!(names, ["wildcard_and_specific"]);
    }

    #[test]
    fn a_reuseport_group_is_one_sharing_entry_and_a_flag() {
        let a = entry(1, 10, "127.0.0.1", None, true);
        let b = entry(2, 11, "127.0.0.1", None, true);
        let c = entry(3, 12, "127.0.0.1", None, true);
        let found = explain(8000, &[&a, &b, &c], 1, &LOCALHOST);
        assert_eq!(found.sharing().count(), 1);
        assert_eq!(found.sharing().next().unwrap().listeners, [1, 2, 3]);
        match &found.flags().collect::<Vec<_>>()[..] {
            [
                Flag::ReuseportGroup {
                    members,
                    explanation,
                },
            ] => {
                assert_eq!(members, &[1, 2, 3]);
                assert!(explanation.contains("10, 11, 12"), "{explanation}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn same_process_on_both_families_is_not_a_split() {
        let v4 = entry(1, 7, "0.0.0.0", None, false);
        let v6 = entry(2, 7, "::", Some(true), false);
        assert!(
            explain(8000, &[&v4, &v6], 1, &LOCALHOST)
                .flags()
                .next()
                .is_none()
        );
    }

    #[test]
    fn other_namespaces_do_not_answer_localhost() {
        let mut v4 = entry(1, 1, "0.0.0.0", None, false);
        v4.facts.netns = 2;
        assert_eq!(explain(8000, &[&v4], 1, &LOCALHOST).localhost.reaches, None);
    }

    #[test]
    fn mapped_addresses_match_their_ipv4_form() {
        let mapped = entry(1, 1, "::ffff:127.0.0.1", Some(false), false);
        assert!(covers(&mapped.facts, LOCALHOST[1]));
    }

    #[test]
    fn a_mapped_ipv4_wildcard_is_a_wildcard() {
        // `::ffff:0.0.0.0` on an IPv6 socket is the IPv4 wildcard.
        let wild = entry(1, 1, "::ffff:0.0.0.0", Some(false), false);
        let lo = entry(2, 1, "127.0.0.1", None, false);
        let found = explain(8000, &[&wild, &lo], 1, &[LOCALHOST[1]]);
        assert_eq!(found.localhost.reaches, Some(2), "specific beats wildcard");
        match &found.flags().collect::<Vec<_>>()[..] {
            [
                Flag::WildcardAndSpecific {
                    wildcard, specific, ..
                },
            ] => assert_eq!((&wildcard[..], &specific[..]), (&[1][..], &[2][..])),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn this_machine_resolves_localhost() {
        let order = localhost_order();
        assert!(!order.is_empty());
        assert!(order.iter().all(|a| a.is_loopback()), "{order:?}");
    }

    #[test]
    fn namespaces_are_separate_port_tables() {
        // The seed pair in the host, and a lone copy of each in two pods.
        let v4 = entry(1, 1, "0.0.0.0", None, false);
        let v6 = entry(2, 2, "::", Some(true), false);
        let mut pod_a = entry(3, 3, "0.0.0.0", None, false);
        pod_a.facts.netns = 7;
        let place = Arc::make_mut(&mut pod_a.place);
        place.workload.pod_uid = Some("uid-a".into());
        place.workload.pod_namespace = Some("shop".into());
        let mut pod_b = entry(4, 4, "::", Some(true), false);
        pod_b.facts.netns = 5;
        let found = explain(8000, &[&pod_a, &v4, &pod_b, &v6], 1, &LOCALHOST);
        assert!(found.shared());
        assert_eq!(found.netns_count(), 3);
        let netns: Vec<(u64, bool, bool)> = found
            .namespaces
            .iter()
            .map(|n| (n.netns, n.host, n.shared()))
            .collect();
        assert_eq!(
            netns,
            [(1, true, true), (5, false, false), (7, false, false)]
        );
        // Only the host's pair is explained; nothing across namespaces.
        let sharing: Vec<(CoexistReason, Vec<u64>)> = found
            .sharing()
            .map(|s| (s.kind, s.listeners.clone()))
            .collect();
        assert_eq!(sharing, [(CoexistReason::V6onlySplit, vec![1, 2])]);
        let summary = summarize(&found.namespaces);
        assert_eq!(
            (
                summary.host,
                summary.pods,
                summary.containers,
                summary.other
            ),
            (true, 1, 0, 1)
        );
        assert_eq!(summary.pod_namespaces[0].name, "shop");
        let alone = explain(8000, &[&pod_a, &pod_b], 1, &LOCALHOST);
        assert!(
            !alone.shared(),
            "the same port in two namespaces is not shared"
        );
    }

    #[test]
    fn sharing_grows_with_groups_not_pairs() {
        // 40 specific addresses on one port: one `different_address` entry
        // naming all 40, not 780 pairs.
        let entries: Vec<Entry> = (1..=40)
            .map(|i| entry(i, i as u32, &format!("127.0.0.{i}"), None, false))
            .collect();
        let refs: Vec<&Entry> = entries.iter().collect();
        let found = explain(8000, &refs, 1, &LOCALHOST);
        let sharing: Vec<&Sharing> = found.sharing().collect();
        assert_eq!(sharing.len(), 1, "{sharing:?}");
        assert_eq!(sharing[0].kind, CoexistReason::DifferentAddress);
        assert_eq!(sharing[0].listeners, (1..=40).collect::<Vec<u64>>());
    }

    #[test]
    fn past_the_limit_the_host_and_the_eventful_namespaces_are_shown() {
        let mut entries: Vec<Entry> = (1..=20)
            .map(|i| {
                let mut e = entry(i, i as u32, "0.0.0.0", None, false);
                e.facts.netns = i + 100;
                e
            })
            .collect();
        let few: Vec<&Entry> = entries[..NAMESPACES_SHOWN].iter().collect();
        let found = explain(8000, &few, 1, &LOCALHOST);
        assert!(
            worth_showing(&found.namespaces, &BTreeSet::new())
                .iter()
                .all(|&s| s)
        );
        // A host listener, a shared namespace (a reuseport pair in 105) and
        // a failure in 112.
        entries[0].facts.netns = 1;
        let mut twin = entry(99, 5, "0.0.0.0", None, true);
        twin.facts.netns = 105;
        entries[4].facts.options.reuse_port = Some(true);
        entries.push(twin);
        let refs: Vec<&Entry> = entries.iter().collect();
        let found = explain(8000, &refs, 1, &LOCALHOST);
        let shown = worth_showing(&found.namespaces, &BTreeSet::from([112]));
        let names: Vec<u64> = found
            .namespaces
            .iter()
            .zip(&shown)
            .filter(|(_, shown)| **shown)
            .map(|(n, _)| n.netns)
            .collect();
        assert_eq!(names, [1, 105, 112]);
    }
}
