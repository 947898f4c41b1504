//! TCP's conflict check (`inet_bind_conflict`) and what its bind bucket
//! remembers between binds (`sk_reuseport_match`,
//! `inet_csk_update_fastreuse`).

use super::{
    Blocker, Fill, Space, View,
    address::{Endpoint, known_endpoint, overlap},
    blocker, devices_compatible, same_owner,
};
use crate::socket::{Family, SocketFacts};

/// What the kernel remembers about one TCP port between binds: the
/// `SO_REUSEPORT` shortcut of its bind bucket (`tb->fastreuseport`, `fastuid`,
/// `fast_rcv_saddr`, ...). Keep one per (network namespace, TCP port), feed it
/// every successful bind and listen in the order they happened, and start a
/// new one when the port's last holder (TIME_WAIT included) is gone, which is
/// when the kernel frees the bucket.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PortHistory {
    pub(super) shortcut: Shortcut,
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

/// `inet_bind_conflict` (relaxed, reuseport allowed) for one existing socket.
pub(super) fn tcp_blocker(new: &View, old_facts: &SocketFacts, fill: Fill) -> Option<Blocker> {
    let old = View::of_socket(old_facts, fill);
    if !devices_compatible(new.dev, old.dev) {
        return None;
    }
    let overlap = overlap(new.end, old.end)?;
    if new.reuse_addr && old.reuse_addr && !old.listening {
        return None;
    }
    if new.reuse_port && old.reuse_port && (old.time_wait || same_owner(new.uid, old.uid, fill)) {
        return None;
    }
    Some(blocker(new, &old, old_facts, overlap))
}
