//! UDP's conflict check (`udp_lib_get_port`, `udp_lib_lport_inuse`): which
//! of the port's sockets the kernel looks at, and in which order. Kernels
//! differ here ([`UdpWalk`]), so the walk is an input, not an assumption.

use serde::Serialize;

use super::{
    Blocker, Fill, View,
    address::{Endpoint, overlap},
    blocker, devices_compatible, same_owner,
};
use crate::socket::{Family, SocketFacts};

/// How the kernel judges a UDP bind against the overlapping sockets on the
/// port that both-`SO_REUSEADDR` does not skip. Two kernels that both called
/// themselves 6.18.44 were measured to differ (see `KERNEL.md`, "Machines of
/// this kind differ"): with A (`SO_REUSEADDR`), then B (`SO_REUSEADDR` and
/// `SO_REUSEPORT`) on one address, C (`SO_REUSEPORT` only) binds under
/// [`FirstMatch`](UdpWalk::FirstMatch) and is refused under
/// [`EveryMatch`](UdpWalk::EveryMatch). [`crate::kernel_probe`] finds out
/// which one the running kernel takes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UdpWalk {
    /// The first such socket decides, newest first, IPv6 sockets with
    /// `SO_REUSEPORT` at the end of the list: a `SO_REUSEPORT` match there
    /// lets the bind through whatever comes after it (upstream Linux;
    /// measured on 6.18.44-fc-v657).
    FirstMatch,
    /// Every such socket must share with the request (`SO_REUSEPORT` on
    /// both, same owner); the order does not matter (measured on
    /// 6.18.44-fc-v1252).
    EveryMatch,
    /// Not probed, or the probe saw neither: an answer is confident only
    /// when both walks give it.
    #[default]
    Unknown,
}

impl UdpWalk {
    /// Every value.
    pub const ALL: [UdpWalk; 3] = [Self::FirstMatch, Self::EveryMatch, Self::Unknown];

    /// The walks that are known to exist.
    pub const KNOWN: [UdpWalk; 2] = [Self::FirstMatch, Self::EveryMatch];

    /// The name logs, metrics and the API use (`first_match`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Self::FirstMatch => "first_match",
            Self::EveryMatch => "every_match",
            Self::Unknown => "unknown",
        }
    }

    /// What the kernel does, in a few words that complete "the kernel ...".
    pub fn description(self) -> &'static str {
        match self {
            Self::FirstMatch => {
                "stops at the first overlapping UDP socket on the port (newest first), and a SO_REUSEPORT match there lets the bind through"
            }
            Self::EveryMatch => {
                "checks every overlapping UDP socket on the port, and each one must share SO_REUSEPORT with the same owner (or SO_REUSEADDR)"
            }
            Self::Unknown => "was not probed for how it walks the UDP sockets on a port",
        }
    }

    /// The walk whose answer is reported: itself when known; when not,
    /// the stricter [`UdpWalk::EveryMatch`], whose blockers include
    /// [`UdpWalk::FirstMatch`]'s (what the first walk refuses, the second
    /// refuses too).
    pub(super) fn reported(self) -> UdpWalk {
        match self {
            Self::Unknown => Self::EveryMatch,
            known => known,
        }
    }

    /// The walks the kernel may take.
    pub(super) fn possible(self) -> &'static [UdpWalk] {
        match self {
            Self::FirstMatch => &[Self::FirstMatch],
            Self::EveryMatch => &[Self::EveryMatch],
            Self::Unknown => &Self::KNOWN,
        }
    }
}

impl std::fmt::Display for UdpWalk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// `udp_lib_lport_inuse` under `walk`: the sockets that refuse `new`, in
/// `holders` order (bind order, oldest first). [`UdpWalk::FirstMatch`] names
/// at most the one its walk stops at; [`UdpWalk::EveryMatch`] names every
/// one, as each alone refuses the bind. [`UdpWalk::Unknown`] is judged as
/// [`UdpWalk::reported`] says.
pub(super) fn udp_blockers(
    walk: UdpWalk,
    new: &View,
    holders: &[&SocketFacts],
    fill: Fill,
) -> Vec<Blocker> {
    match walk.reported() {
        UdpWalk::FirstMatch => first_match(new, holders, fill).into_iter().collect(),
        _ => every_match(new, holders, fill),
    }
}

/// Whether `old` takes part in the check at all, and how it overlaps.
fn meets(new: &View, old: &View) -> Option<super::Overlap> {
    if (new.reuse_addr && old.reuse_addr) || !devices_compatible(new.dev, old.dev) {
        return None;
    }
    overlap(new.end, old.end)
}

/// Whether a socket the check meets lets `new` share the port.
fn shares(new: &View, old: &View, fill: Fill) -> bool {
    new.reuse_port && old.reuse_port && same_owner(new.uid, old.uid, fill)
}

/// The first overlapping socket in the port's list that both-`SO_REUSEADDR`
/// does not skip decides.
fn first_match(new: &View, holders: &[&SocketFacts], fill: Fill) -> Option<Blocker> {
    // The list as `sk_add_node_rcu` builds it, bind by bind: at the head,
    // except IPv6 sockets with SO_REUSEPORT, which go to the tail.
    let mut list = std::collections::VecDeque::with_capacity(holders.len());
    for &facts in holders {
        let view = View::of_socket(facts, fill);
        if facts.family == Family::Ipv6 && view.reuse_port {
            list.push_back((facts, view));
        } else {
            list.push_front((facts, view));
        }
    }
    for (old_facts, old) in list {
        let Some(overlap) = meets(new, &old) else {
            continue;
        };
        if shares(new, &old, fill) {
            return None;
        }
        return Some(blocker(new, &old, old_facts, overlap));
    }
    None
}

/// Every overlapping socket that both-`SO_REUSEADDR` does not skip must
/// share with `new`.
fn every_match(new: &View, holders: &[&SocketFacts], fill: Fill) -> Vec<Blocker> {
    holders
        .iter()
        .filter_map(|&old_facts| {
            let old = View::of_socket(old_facts, fill);
            let overlap = meets(new, &old)?;
            (!shares(new, &old, fill)).then(|| blocker(new, &old, old_facts, overlap))
        })
        .collect()
}

/// Whether UDP's answer for `new` is the same whatever the model cannot see:
/// - which hash the kernel walks. With more than 10 sockets in the port's
///   primary slot, which other ports and other namespaces share unseen,
///   `udp_lib_get_port` checks only the sockets in the (address, port)
///   slot of `new`'s address and then the wildcard's
///   (`udp_lib_lport_inuse2`, walked as `walk`): a wildcard request meets no
///   socket on a specific address there. That walk must give the same
///   answer;
/// - with `ordered` false, the order of the port's sockets. Cookies do not
///   give it (since 5.11 each CPU hands out its own batch, and a listing
///   meets sockets in hash order), so a first-match walk is settled only
///   when the overlapping sockets all share the port with `new` or none do.
pub(super) fn settled(
    walk: UdpWalk,
    new: &View,
    holders: &[&SocketFacts],
    fill: Fill,
    ordered: bool,
) -> bool {
    let secondary: Vec<&SocketFacts> = holders
        .iter()
        .copied()
        .filter(|facts| {
            let key = hash_key(View::of_socket(facts, fill).end);
            key == hash_key(new.end) || key == ANY_KEY
        })
        .collect();
    let answer = |walk: UdpWalk, holders: &[&SocketFacts]| -> Option<bool> {
        match walk {
            UdpWalk::EveryMatch => Some(!every_match(new, holders, fill).is_empty()),
            _ if ordered => Some(first_match(new, holders, fill).is_some()),
            _ => unordered_first_match(new, holders, fill),
        }
    };
    // The secondary walk is taken as the primary one is (upstream, both
    // stop at the first match).
    let primary = answer(walk, holders);
    primary.is_some() && primary == answer(walk, &secondary)
}

/// A first-match walk's answer (refused or not) when it is the same in
/// every order: every overlapping socket shares the port with `new`, or
/// none does.
fn unordered_first_match(new: &View, holders: &[&SocketFacts], fill: Fill) -> Option<bool> {
    let (mut met, mut sharing) = (0, 0);
    for &facts in holders {
        let old = View::of_socket(facts, fill);
        if meets(new, &old).is_some() {
            met += 1;
            sharing += usize::from(shares(new, &old, fill));
        }
    }
    if sharing == met {
        Some(false)
    } else if sharing == 0 {
        Some(true)
    } else {
        None
    }
}

/// What the kernel's (address, port) hash is computed from: an IPv4
/// address, IPv4-mapped ones included, or an IPv6 one; `[::]` hashes as
/// `0.0.0.0` does (`ipv6_portaddr_hash`).
#[derive(PartialEq, Eq)]
enum HashKey {
    V4(std::net::Ipv4Addr),
    V6(std::net::Ipv6Addr),
}

const ANY_KEY: HashKey = HashKey::V4(std::net::Ipv4Addr::UNSPECIFIED);

fn hash_key(end: Endpoint) -> HashKey {
    match end {
        Endpoint::V4(v4) => HashKey::V4(v4),
        Endpoint::V6Any { .. } => ANY_KEY,
        Endpoint::V6(v6) => HashKey::V6(v6),
    }
}
