//! Addresses as the conflict rules compare them (`inet_rcv_saddr_equal`,
//! `ipv4_rcv_saddr_equal`, `ipv6_rcv_saddr_equal`): IPv4-mapped addresses,
//! wildcards and `IPV6_V6ONLY`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::{CoexistReason, Fill, Overlap};

/// A bound address as the conflict rules see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Endpoint {
    /// An IPv4 address, from an IPv4 socket or an IPv4-mapped IPv6 one.
    V4(Ipv4Addr),
    /// `[::]`.
    V6Any { v6only: bool },
    /// A specific IPv6 address (the kernel makes these sockets v6-only).
    V6(Ipv6Addr),
}

pub(crate) fn endpoint(address: IpAddr, v6only: Option<bool>, fill: Fill) -> Endpoint {
    match address {
        IpAddr::V4(v4) => Endpoint::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => Endpoint::V4(v4),
            None if v6.is_unspecified() => Endpoint::V6Any {
                v6only: fill.flag(v6only),
            },
            None => Endpoint::V6(v6),
        },
    }
}

/// The endpoint when nothing about it is unknown.
pub(super) fn known_endpoint(address: IpAddr, v6only: Option<bool>) -> Option<Endpoint> {
    let end = endpoint(address, v6only, Fill::Unset);
    (end == endpoint(address, v6only, Fill::Set)).then_some(end)
}

/// How `new`'s address overlaps `old`'s, if at all (`inet_rcv_saddr_equal`
/// with wildcards matching on both sides).
pub(crate) fn overlap(new: Endpoint, old: Endpoint) -> Option<Overlap> {
    use Endpoint::{V4, V6, V6Any};
    match (new, old) {
        (V4(n), V4(o)) if n == o => Some(Overlap::SameAddress),
        (V4(_), V4(o)) if o.is_unspecified() => Some(Overlap::ExistingWildcard),
        (V4(n), V4(_)) if n.is_unspecified() => Some(Overlap::RequestWildcard),
        (V4(_), V6Any { v6only: false }) => Some(Overlap::ExistingDualStack),
        (V6Any { v6only: false }, V4(_)) => Some(Overlap::RequestDualStack),
        (V6Any { .. }, V6Any { .. }) => Some(Overlap::SameAddress),
        (V6(_), V6Any { .. }) => Some(Overlap::ExistingWildcard),
        (V6Any { .. }, V6(_)) => Some(Overlap::RequestWildcard),
        (V6(n), V6(o)) if n == o => Some(Overlap::SameAddress),
        _ => None,
    }
}

/// Why two endpoints that do not overlap do not.
pub(super) fn split_reason(a: Endpoint, b: Endpoint) -> CoexistReason {
    use Endpoint::{V4, V6, V6Any};
    match (a, b) {
        (V4(_), V6Any { .. }) | (V6Any { .. }, V4(_)) => CoexistReason::V6onlySplit,
        (V4(_), V6(_)) | (V6(_), V4(_)) => CoexistReason::DifferentFamilyNoOverlap,
        _ => CoexistReason::DifferentAddress,
    }
}

/// `0.0.0.0`, `[::]` or `::ffff:0.0.0.0` (`inet_use_hash2_on_bind` is false).
pub(crate) fn is_wildcard(address: IpAddr) -> bool {
    match endpoint(address, None, Fill::Unset) {
        Endpoint::V4(v4) => v4.is_unspecified(),
        Endpoint::V6Any { .. } => true,
        Endpoint::V6(_) => false,
    }
}
