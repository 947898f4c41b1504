//! TCP's conflict check (`inet_bind_conflict`), what its bind bucket
//! remembers between binds (`sk_reuseport_match`,
//! `inet_csk_update_fastreuse`), and where kernels differ in it
//! ([`MappedAny`]).

use std::net::Ipv4Addr;

use serde::Serialize;

use super::{
    Blocker, Fill, Overlap, Space, View,
    address::{Endpoint, known_endpoint, overlap},
    blocker, devices_compatible, same_owner,
};
use crate::socket::{Family, SocketFacts};

/// How the kernel's TCP check treats an IPv6 socket bound to the IPv4-mapped
/// wildcard `::ffff:0.0.0.0`. Measured with two TCP sockets, no sharing
/// option, both orders, against every other kind of address (IPv4, mapped,
/// `[::]` with and without `IPV6_V6ONLY`, `::1`), then `listen` on each:
/// Debian's 6.1.176 differs from 5.10.223, 6.12.111 and 6.18.44-fc-v1252 in
/// exactly one place, which [`MappedAny::Quirk`] describes.
/// [`crate::kernel_probe`] finds out which one the running kernel does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MappedAny {
    /// `::ffff:0.0.0.0` is the IPv4 wildcard for every check: it covers
    /// every IPv4 address, mapped or not (measured on 5.10.223, 6.12.111
    /// and 6.18.44-fc-v1252).
    Wildcard,
    /// Linux 6.1's bhash2 (measured on Debian's 6.1.176): an IPv6 socket
    /// that binds, or listens on, a specific IPv4-mapped address
    /// `::ffff:a.b.c.d` does not see the IPv6 sockets on `::ffff:0.0.0.0`,
    /// whatever their options (its check looks for wildcards through
    /// bhash2, the (address, port) table added in 6.1, which does not take
    /// the mapped wildcard for one).
    /// Every other check still sees them as the IPv4 wildcard: an IPv4
    /// socket's, and that of the `::ffff:0.0.0.0` socket itself against the
    /// mapped one (which walks the port's list of sockets), so the order
    /// decides: mapped address after the mapped wildcard binds, the
    /// reverse is refused, and the wildcard's own `listen` then fails.
    /// With `::ffff:0.0.0.0` and `0.0.0.0` both held, the mapped address
    /// was seen to bind past `0.0.0.0` too, which alone refuses it: which
    /// other wildcards the check then skips is not pinned down, and those
    /// answers are not confident ([`MappedCheck`]). Upstream later fixed this ("bind() regression for v4-mapped-v6
    /// wildcard address").
    Quirk,
    /// Not probed, or the probe saw neither: an answer is confident only
    /// when both give it.
    #[default]
    Unknown,
}

impl MappedAny {
    /// Every value.
    pub const ALL: [MappedAny; 3] = [Self::Wildcard, Self::Quirk, Self::Unknown];

    /// The behaviours that are known to exist.
    pub const KNOWN: [MappedAny; 2] = [Self::Wildcard, Self::Quirk];

    /// The name logs and the API use (`wildcard`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Self::Wildcard => "wildcard",
            Self::Quirk => "quirk",
            Self::Unknown => "unknown",
        }
    }

    /// What the kernel does, in a few words that complete "the kernel ...".
    pub fn description(self) -> &'static str {
        match self {
            Self::Wildcard => {
                "treats a TCP socket on ::ffff:0.0.0.0 as the IPv4 wildcard, which covers every IPv4 address, mapped or not"
            }
            Self::Quirk => {
                "does not see a TCP socket on ::ffff:0.0.0.0 when an IPv6 socket binds or listens on a specific IPv4-mapped address (Linux 6.1's bhash2), though every other bind still treats it as the IPv4 wildcard"
            }
            Self::Unknown => "was not probed for how it treats a TCP socket on ::ffff:0.0.0.0",
        }
    }

    /// The check whose answer is reported: the wildcard's, or the quirk's
    /// as measured with `::ffff:0.0.0.0` the only wildcard on the port;
    /// when unknown, [`MappedCheck::Everyone`], whose blockers include the
    /// quirk's (what the quirk refuses, the wildcard refuses too).
    pub(super) fn reported_check(self) -> MappedCheck {
        match self {
            Self::Quirk => MappedCheck::SkipMappedAny,
            Self::Wildcard | Self::Unknown => MappedCheck::Everyone,
        }
    }

    /// The checks the kernel may make.
    pub(super) fn checks(self) -> &'static [MappedCheck] {
        match self {
            Self::Wildcard => &[MappedCheck::Everyone],
            Self::Quirk => &[
                MappedCheck::SkipMappedAny,
                MappedCheck::SkipWildcards,
                MappedCheck::SkipWildcardsAfterMappedAny,
            ],
            Self::Unknown => &[
                MappedCheck::Everyone,
                MappedCheck::SkipMappedAny,
                MappedCheck::SkipWildcards,
                MappedCheck::SkipWildcardsAfterMappedAny,
            ],
        }
    }
}

/// Which of the port's TCP sockets the check of an IPv6 socket on a
/// specific IPv4-mapped address meets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum MappedCheck {
    /// All of them ([`MappedAny::Wildcard`]).
    Everyone,
    /// All but the IPv6 sockets on `::ffff:0.0.0.0` ([`MappedAny::Quirk`],
    /// as measured with those the only wildcard on the port).
    SkipMappedAny,
    /// When an IPv6 socket on `::ffff:0.0.0.0` holds the port, none that
    /// cover the address as a wildcard either ([`MappedAny::Quirk`] as
    /// Debian's 6.1.176 was also seen to do: with `::ffff:0.0.0.0` and
    /// `0.0.0.0` held, `::ffff:127.0.0.2` bound, though `0.0.0.0` alone
    /// refuses it). When which of the two 6.1 does is not known, answers
    /// that depend on it are not confident.
    SkipWildcards,
    /// As [`MappedCheck::SkipMappedAny`], and, on a port where a socket on
    /// `::ffff:0.0.0.0` has been since the bucket was made, none that cover
    /// the address as a wildcard. Debian's 6.1.176 bound `::ffff:127.0.0.1`
    /// past a listening `0.0.0.0` beside `::1` and `127.0.0.2`, and
    /// `::ffff:127.0.0.2` past a listening `0.0.0.0` alone, each after a
    /// socket on `::ffff:0.0.0.0` had come and gone (both found by the
    /// predictor, in CI and on arm64). What 6.1's bind hash keeps of that
    /// socket is not pinned down, so answers that depend on it are not
    /// confident; on a port that never saw the mapped wildcard it never
    /// applies ([`MappedCheck::given`]), and there `0.0.0.0` alone was
    /// measured to refuse the mapped address.
    SkipWildcardsAfterMappedAny,
}

impl MappedCheck {
    /// The check for a port with `history`: the after-the-mapped-wildcard
    /// case only where it has been, or the history is not known.
    pub(super) fn given(self, history: Option<&PortHistory>) -> MappedCheck {
        match self {
            Self::SkipWildcardsAfterMappedAny if history.is_some_and(|h| !h.mapped_any_seen) => {
                Self::SkipMappedAny
            }
            other => other,
        }
    }
}

impl std::fmt::Display for MappedAny {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Whether `view` is an IPv6 socket on `::ffff:0.0.0.0`.
fn is_mapped_any(view: &View) -> bool {
    view.family == Family::Ipv6 && view.end == Endpoint::V4(Ipv4Addr::UNSPECIFIED)
}

/// Whether `check` keeps `old` (overlapping as `overlap`) out of `new`'s
/// check, `holders` being the port's sockets ([`MappedCheck`]).
fn hidden(
    check: MappedCheck,
    new: &View,
    old: &View,
    overlap: Overlap,
    holders: &[&SocketFacts],
    fill: Fill,
) -> bool {
    let mapped_request =
        new.family == Family::Ipv6 && matches!(new.end, Endpoint::V4(a) if !a.is_unspecified());
    match check {
        MappedCheck::Everyone => false,
        MappedCheck::SkipMappedAny => mapped_request && is_mapped_any(old),
        MappedCheck::SkipWildcards => {
            mapped_request
                && overlap != Overlap::SameAddress
                && holders
                    .iter()
                    .any(|h| is_mapped_any(&View::of_socket(h, fill)))
        }
        MappedCheck::SkipWildcardsAfterMappedAny => {
            hidden(MappedCheck::SkipMappedAny, new, old, overlap, holders, fill)
                || (mapped_request && overlap != Overlap::SameAddress)
        }
    }
}

/// What the kernel remembers about one TCP port between binds: the
/// `SO_REUSEPORT` shortcut of its bind bucket (`tb->fastreuseport`, `fastuid`,
/// `fast_rcv_saddr`, ...). Keep one per (network namespace, TCP port), feed it
/// every successful bind and listen in the order they happened, and start a
/// new one when the port's last holder (TIME_WAIT included) is gone, which is
/// when the kernel frees the bucket.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PortHistory {
    pub(super) shortcut: Shortcut,
    /// Whether an IPv6 socket on `::ffff:0.0.0.0` took the port since the
    /// bucket was made ([`MappedCheck::SkipWildcardsAfterMappedAny`]).
    pub(super) mapped_any_seen: bool,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) enum Shortcut {
    /// `fastreuseport` 0: every bind is checked.
    #[default]
    Off,
    /// Same-owner `SO_REUSEPORT` sockets that `end` covers skip the check.
    On {
        family: Family,
        end: Endpoint,
        uid: u32,
    },
    /// A recorded socket had an unknown option or owner.
    Unknown,
}

impl PortHistory {
    /// The state of a port nobody holds.
    pub fn new() -> PortHistory {
        PortHistory::default()
    }

    /// Records that `sock` took the port: a successful bind, or a successful
    /// listen (with the options it had then). Ignores sockets outside TCP's
    /// port space.
    pub fn record(&mut self, sock: &SocketFacts) {
        if Space::of(sock.protocol) != Space::Tcp {
            return;
        }
        self.mapped_any_seen |= sock.family == Family::Ipv6
            && known_endpoint(sock.address, sock.options.v6only)
                .is_some_and(|end| end == Endpoint::V4(Ipv4Addr::UNSPECIFIED));
        // Mirrors the SO_REUSEPORT half of inet_csk_update_fastreuse: a
        // socket without SO_REUSEPORT turns the shortcut off, one with it
        // replaces what is remembered unless sk_reuseport_match already
        // covered it.
        self.shortcut = match sock.options.reuse_port {
            Some(false) => Shortcut::Off,
            None => Shortcut::Unknown,
            Some(true) => {
                let known = sock
                    .uid
                    .zip(known_endpoint(sock.address, sock.options.v6only));
                match (self.shortcut, known) {
                    (_, None) | (Shortcut::Unknown, _) => Shortcut::Unknown,
                    (Shortcut::On { family, end, uid }, Some((sock_uid, sock_end)))
                        if uid == sock_uid && shortcut_covers(family, end, sock_end) =>
                    {
                        self.shortcut
                    }
                    (_, Some((uid, end))) => Shortcut::On {
                        family: sock.family,
                        end,
                        uid,
                    },
                }
            }
        };
    }
}

/// Whether the remembered `SO_REUSEPORT` socket's address covers `sk`'s, as
/// `sk_reuseport_match` compares them: the remembered side's wildcard
/// matches, `sk`'s does not, and an IPv4 socket's `0.0.0.0` also matches a
/// dual-stack `[::]` (whose IPv4 address is 0) while a mapped `::ffff:0.0.0.0`
/// does not.
pub(super) fn shortcut_covers(family: Family, fast: Endpoint, sk: Endpoint) -> bool {
    use Endpoint::{V4, V6, V6Any};
    match (fast, sk) {
        (V4(f), V4(a)) => f.is_unspecified() || f == a,
        (V4(f), V6Any { v6only: false }) => family == Family::Ipv4 && f.is_unspecified(),
        (V4(_), _) => false,
        (V6Any { v6only }, V4(_)) => !v6only,
        (V6Any { .. }, _) => true,
        (V6(f), V6(a)) => f == a,
        (V6(_), _) => false,
    }
}

/// `sk_reuseport_match`: whether the bucket's shortcut lets `new` skip the
/// conflict check. Without a history, only [`Fill::Set`] assumes it does.
pub(super) fn shortcut_applies(history: Option<&PortHistory>, new: &View, fill: Fill) -> bool {
    if !new.reuse_port {
        return false;
    }
    match history.map_or(Shortcut::Unknown, |h| h.shortcut) {
        Shortcut::Off => false,
        Shortcut::Unknown => fill == Fill::Set,
        Shortcut::On { family, end, uid } => {
            same_owner(Some(uid), new.uid, fill) && shortcut_covers(family, end, new.end)
        }
    }
}

/// `inet_bind_conflict` (relaxed, reuseport allowed) for one existing socket
/// of `holders`, if the check meets it at all ([`MappedCheck`]).
pub(super) fn tcp_blocker(
    check: MappedCheck,
    new: &View,
    old_facts: &SocketFacts,
    holders: &[&SocketFacts],
    fill: Fill,
) -> Option<Blocker> {
    let old = View::of_socket(old_facts, fill);
    if !devices_compatible(new.dev, old.dev) {
        return None;
    }
    let overlap = overlap(new.end, old.end)?;
    if hidden(check, new, &old, overlap, holders, fill) {
        return None;
    }
    if new.reuse_addr && old.reuse_addr && !old.listening {
        return None;
    }
    if new.reuse_port && old.reuse_port && (old.time_wait || same_owner(new.uid, old.uid, fill)) {
        return None;
    }
    Some(blocker(new, &old, old_facts, overlap))
}
