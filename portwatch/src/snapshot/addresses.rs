//! The addresses of the network namespace the calling thread is in, as the
//! kernel's first check of a bind looks at them (`inet_addr_valid_or_nonlocal`
//! for IPv4, `ipv6_chk_addr` for IPv6): an address no interface has fails
//! with EADDRNOTAVAIL before anything else is checked, unless
//! `ip_nonlocal_bind` (or IP_FREEBIND, IP_TRANSPARENT) allows it.
//!
//! Read by the ephemeral listing's thread while it is inside each namespace
//! (getifaddrs and `/proc/sys/net` answer for the caller's namespace), so
//! the daemon can infer that errno where no outcome hook runs. What it does
//! not see: routes that make a whole range local (`ip route add local
//! 10.0.0.0/8 dev lo`, "AnyIP"), and IPv6 addresses still in duplicate
//! address detection (which fail like absent ones).

use std::{
    fs,
    net::{IpAddr, Ipv4Addr},
};

use nix::{ifaddrs::getifaddrs, net::if_::InterfaceFlags};

/// `net.ipv4.ip_nonlocal_bind` and `net.ipv6.ip_nonlocal_bind`, inside the
/// namespace.
const NONLOCAL_V4: &str = "/proc/sys/net/ipv4/ip_nonlocal_bind";
const NONLOCAL_V6: &str = "/proc/sys/net/ipv6/ip_nonlocal_bind";

/// One namespace's local addresses.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LocalAddresses {
    /// Every interface's addresses, both families.
    pub addresses: Vec<IpAddr>,
    /// The IPv4 prefixes of loopback interfaces (`127.0.0.0/8`): the kernel
    /// makes the whole prefix local, not only the address.
    pub loopback_prefixes: Vec<(Ipv4Addr, u8)>,
    /// The interfaces' IPv4 broadcast addresses (a bind to one is allowed).
    pub broadcast: Vec<Ipv4Addr>,
    /// `net.ipv4.ip_nonlocal_bind`: any IPv4 address may be bound.
    pub nonlocal_v4: bool,
    /// `net.ipv6.ip_nonlocal_bind`.
    pub nonlocal_v6: bool,
}

impl LocalAddresses {
    /// Whether an IPv4 address passes the kernel's address check: one an
    /// interface has, in a loopback prefix, a broadcast or multicast one.
    pub fn has_v4(&self, address: Ipv4Addr) -> bool {
        address.is_multicast()
            || address.is_broadcast()
            || self.broadcast.contains(&address)
            || self.addresses.contains(&IpAddr::V4(address))
            || self
                .loopback_prefixes
                .iter()
                .any(|&(prefix, len)| same_prefix(address, prefix, len))
    }
}

/// Whether `a` and `b` share their first `len` bits.
fn same_prefix(a: Ipv4Addr, b: Ipv4Addr, len: u8) -> bool {
    let mask = u32::MAX
        .checked_shl(32 - u32::from(len.min(32)))
        .unwrap_or(0);
    u32::from(a) & mask == u32::from(b) & mask
}

/// The calling thread's namespace's addresses; `None` when getifaddrs
/// fails (the namespace's addresses are then unknown, and nothing is
/// inferred from them).
pub fn read_here() -> Option<LocalAddresses> {
    let mut local = LocalAddresses::default();
    for interface in getifaddrs().ok()? {
        let loopback = interface.flags.contains(InterfaceFlags::IFF_LOOPBACK);
        let Some(address) = interface.address else {
            continue;
        };
        if let Some(v4) = address.as_sockaddr_in() {
            local.addresses.push(IpAddr::V4(v4.ip()));
            let prefix = interface.netmask.and_then(|mask| {
                mask.as_sockaddr_in()
                    .map(|m| u32::from(m.ip()).count_ones())
            });
            if let (true, Some(len)) = (loopback, prefix) {
                local.loopback_prefixes.push((v4.ip(), len as u8));
            }
            if let Some(broadcast) = interface
                .broadcast
                .and_then(|b| b.as_sockaddr_in().map(|b| b.ip()))
            {
                local.broadcast.push(broadcast);
            }
        } else if let Some(v6) = address.as_sockaddr_in6() {
            local.addresses.push(IpAddr::V6(v6.ip()));
        }
    }
    let enabled = |path: &str| fs::read_to_string(path).is_ok_and(|text| text.trim() != "0");
    local.nonlocal_v4 = enabled(NONLOCAL_V4);
    local.nonlocal_v6 = enabled(NONLOCAL_V6);
    Some(local)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loopback_prefix_is_local_whole() {
        let local = LocalAddresses {
            addresses: vec!["127.0.0.1".parse().unwrap(), "10.1.2.3".parse().unwrap()],
            loopback_prefixes: vec![("127.0.0.1".parse().unwrap(), 8)],
            broadcast: vec!["10.1.2.255".parse().unwrap()],
            ..LocalAddresses::default()
        };
        for yes in [
            "127.0.0.1",
            "127.9.9.9",
            "10.1.2.3",
            "10.1.2.255",
            "224.0.0.1",
            "255.255.255.255",
        ] {
            assert!(local.has_v4(yes.parse().unwrap()), "{yes}");
        }
        for no in ["10.1.2.4", "192.0.2.1", "128.0.0.1"] {
            assert!(!local.has_v4(no.parse().unwrap()), "{no}");
        }
        assert!(same_prefix(
            "1.2.3.4".parse().unwrap(),
            "9.9.9.9".parse().unwrap(),
            0
        ));
        assert!(!same_prefix(
            "1.2.3.4".parse().unwrap(),
            "1.2.3.5".parse().unwrap(),
            32
        ));
    }

    #[test]
    fn this_namespace_has_its_loopback_prefix() {
        // The host's lo is up with 127.0.0.1/8: the whole prefix is local,
        // an address no interface has is not.
        let local = read_here().expect("getifaddrs");
        assert!(
            local.addresses.contains(&IpAddr::V4(Ipv4Addr::LOCALHOST)),
            "{local:?}"
        );
        assert!(local.has_v4("127.0.0.2".parse().unwrap()), "{local:?}");
        assert!(!local.has_v4("192.0.2.1".parse().unwrap()), "{local:?}");
    }
}
