//! UDP's conflict check (`udp_lib_get_port`, `udp_lib_lport_inuse`): which
//! of the port's sockets the kernel looks at, and in which order. Kernels
//! differ here ([`UdpWalk`]), so the walk is an input, not an assumption.

use serde::Serialize;

use super::{Blocker, Fill, View, address::overlap, blocker, devices_compatible, same_owner};
use crate::socket::{Family, SocketFacts};

/// With more than 10 sockets in the port's UDP hash slot (which other ports
/// share) the kernel checks a specific address through the (address, port)
/// hash instead (`udp_lib_get_port`); from 10 sockets on the port itself that
/// may be the case.
pub(super) const UDP_HASH2_THRESHOLD: usize = 10;

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
