//! UDP's conflict check (`udp_lib_get_port`, `udp_lib_lport_inuse`): which
//! of the port's sockets the kernel looks at, and in which order.

use super::{Blocker, Fill, View, address::overlap, blocker, devices_compatible, same_owner};
use crate::socket::{Family, SocketFacts};

/// With more than 10 sockets in the port's UDP hash slot (which other ports
/// share) the kernel checks a specific address through the (address, port)
/// hash instead (`udp_lib_get_port`); from 10 sockets on the port itself that
/// may be the case.
pub(super) const UDP_HASH2_THRESHOLD: usize = 10;

/// `udp_lib_lport_inuse`: the first overlapping socket in the port's list
/// that both-`SO_REUSEADDR` does not skip decides.
pub(super) fn udp_blocker(new: &View, holders: &[&SocketFacts], fill: Fill) -> Option<Blocker> {
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
        if (new.reuse_addr && old.reuse_addr) || !devices_compatible(new.dev, old.dev) {
            continue;
        }
        let Some(overlap) = overlap(new.end, old.end) else {
            continue;
        };
        if new.reuse_port && old.reuse_port && same_owner(new.uid, old.uid, fill) {
            return None;
        }
        return Some(blocker(new, &old, old_facts, overlap));
    }
    None
}
