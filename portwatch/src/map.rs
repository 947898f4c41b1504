//! The live per-port map: every socket that holds a port for receiving, keyed
//! by its cookie, indexed by port. Pure logic: it is fed decoded events and
//! snapshots and never does I/O itself.
//!
//! Identity follows the kernel: (network namespace, protocol, local address,
//! port), with one socket cookie per socket, so one port holds many entries:
//! TCP and UDP, IPv4 and IPv6, different addresses, SO_REUSEPORT groups and
//! different network namespaces.
//!
//! What counts as a listener: a TCP socket once it listens; a UDP socket once
//! it is bound and not connected. TCP sockets that are bound but not (yet)
//! listening are kept apart: they are not listeners, but they do block binds,
//! so failure attribution needs them.

use std::{
    borrow::Borrow,
    collections::{BTreeSet, HashMap, HashSet},
    hash::Hash,
    net::IpAddr,
    num::NonZeroU64,
    sync::{Arc, LazyLock},
    time::SystemTime,
};

use serde::Serialize;

use crate::{
    event::{EventKind, PortEvent},
    rules,
    snapshot::owners::Place,
    socket::{Family, NetnsCookie, Protocol, ShareOptions, SockState, SocketFacts},
};

/// A process holding a socket.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct Holder {
    pub pid: u32,
    /// Process name (`comm`).
    pub process: String,
}

/// One socket in the map.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Entry {
    /// What the conflict rules need: address, port, state, options, uid.
    #[serde(flatten)]
    pub facts: SocketFacts,
    /// Every process known to hold the socket (fork, socket activation), by
    /// pid: shared by every socket with the same holders (see [`Interned`]).
    pub holders: Arc<[Holder]>,
    /// Socket inode, when a snapshot saw it.
    pub inode: Option<u64>,
    /// cgroup v2 id of the task that bound it, when an event saw it.
    pub cgroup_id: Option<u64>,
    /// cgroup path, systemd unit, container and workload names, when known:
    /// shared by every socket of the same place (see [`Interned`]).
    #[serde(flatten)]
    pub place: Arc<Place>,
    /// When portwatch first saw the socket in its current state (for sockets
    /// found by the start-up snapshot: when the snapshot ran).
    pub since: SystemTime,
    /// Whether `since` is the real moment (seen by an event) or only the
    /// snapshot time (the socket is older).
    pub since_exact: bool,
    /// Found by the start-up listing, whose holders, place and options are
    /// still being read: unknown for now, not absent.
    pub owners_pending: bool,
}

impl Entry {
    /// Whether this socket counts as a listener.
    fn is_listener(&self) -> bool {
        match (self.facts.protocol, self.facts.state) {
            (Protocol::Tcp | Protocol::Mptcp | Protocol::Sctp, state) => {
                state == SockState::Listening
            }
            (Protocol::Udp | Protocol::UdpLite, state) => state == SockState::Bound,
        }
    }
}

impl Entry {
    /// A socket first seen through `event`.
    fn seen(
        event: &PortEvent,
        cookie: u64,
        port: u16,
        state: SockState,
        options: ShareOptions,
        at: SystemTime,
    ) -> Entry {
        Entry {
            facts: SocketFacts {
                cookie,
                netns: event.netns.unwrap_or(0),
                protocol: event.protocol,
                family: event.family,
                address: event.address,
                port,
                state,
                options,
                uid: event.sock_uid,
                bound_dev_if: 0,
            },
            holders: Arc::new([holder(event)]),
            inode: None,
            cgroup_id: Some(event.cgroup_id),
            place: NOWHERE.clone(),
            since: at,
            since_exact: true,
            owners_pending: false,
        }
    }
}

/// What the map holds about one socket before it is known to the map, as a
/// snapshot or reconciliation reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observed {
    pub facts: SocketFacts,
    /// Shared with the other sockets of the same holders.
    pub holders: Arc<[Holder]>,
    pub inode: Option<NonZeroU64>,
    /// Shared with the other sockets of its process.
    pub place: Arc<Place>,
}

/// Differences found by a reconciliation, by kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Drift {
    /// In the kernel but not in the map (added).
    pub missing: u64,
    /// In the map but no longer in the kernel (removed).
    pub stale: u64,
    /// In both, but the map had the wrong state or address (corrected).
    pub changed: u64,
}

impl Drift {
    pub fn total(&self) -> u64 {
        self.missing + self.stale + self.changed
    }
}

/// What a reconciliation did: the drift it counted, and the sockets it
/// removed, whose cookies the kernel must stop tracking (a socket whose
/// release no watched hook saw would otherwise hold its `TRACKED` entry
/// for as long as the daemon runs).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reconciled {
    pub drift: Drift,
    pub removed: Vec<u64>,
}

/// A reconciliation's plan ([`PortMap::plan`]): the drift, the entries the
/// listing no longer has, and the listed sockets that would change the map.
#[derive(Clone, Debug, Default)]
pub struct Correction {
    /// The map's `generation` when the plan was made.
    generation: u64,
    pub drift: Drift,
    gone: Vec<u64>,
    changes: Vec<Observed>,
}

/// The place of a socket nobody has placed yet, shared (by the listings'
/// ownerless sockets too).
pub(crate) static NOWHERE: LazyLock<Arc<Place>> = LazyLock::new(Arc::default);

/// The holders of a socket whose holders are not known yet, shared.
pub(crate) static NOBODY: LazyLock<Arc<[Holder]>> = LazyLock::new(|| Arc::new([]));

/// One shared copy of each value the map's sockets repeat: a host's sockets
/// belong to few processes, so a few holder lists and places (cgroup path,
/// unit, container, workload names: the largest part of an entry) serve
/// 100k sockets. Values no entry uses any more are dropped as they pile up.
#[derive(Debug)]
struct Interned<T: ?Sized> {
    known: HashSet<Arc<T>>,
    /// How many values may be known before those no entry uses any more
    /// are dropped (twice what was left at the last pruning).
    prune_at: usize,
}

impl<T: ?Sized> Default for Interned<T> {
    fn default() -> Self {
        Interned {
            known: HashSet::new(),
            prune_at: 0,
        }
    }
}

impl<T: ?Sized + Eq + Hash> Interned<T> {
    /// The shared copy of `value`: a known equal one, or `value` itself,
    /// made shared.
    fn intern<V: Borrow<T> + Into<Arc<T>>>(&mut self, value: V) -> Arc<T> {
        if let Some(known) = self.known.get(value.borrow()) {
            return known.clone();
        }
        if self.known.len() >= self.prune_at {
            self.known.retain(|known| Arc::strong_count(known) > 1);
            self.prune_at = (self.known.len() * 2).max(1024);
        }
        let shared = value.into();
        self.known.insert(shared.clone());
        shared
    }
}

impl Interned<[Holder]> {
    /// Adds to `known` the holders of `more` whose pid it lacks, by pid.
    /// A socket with no holder yet takes `more` as it is shared.
    fn add(&mut self, known: &mut Arc<[Holder]>, more: &Arc<[Holder]>) {
        if known.is_empty() {
            *known = self.intern(more.clone());
            return;
        }
        let mut all: Option<Vec<Holder>> = None;
        for holder in more.iter() {
            let current = all.as_deref().unwrap_or(known);
            if !current.iter().any(|h| h.pid == holder.pid) {
                all.get_or_insert_with(|| known.to_vec())
                    .push(holder.clone());
            }
        }
        if let Some(mut all) = all {
            all.sort_by_key(|h| h.pid);
            *known = self.intern(all);
        }
    }
}

impl Interned<Place> {
    /// The shared copy of `place`; the empty place is always [`NOWHERE`].
    fn place<V: Borrow<Place> + Into<Arc<Place>>>(&mut self, place: V) -> Arc<Place> {
        if *place.borrow() == Place::default() {
            return NOWHERE.clone();
        }
        self.intern(place)
    }
}

/// A map keyed by socket cookie. foldhash, not std's SipHash: a
/// reconciliation at 100k listeners hashes every cookie three times (the
/// listing's set, the comparison, the owners check), and SipHash was a
/// tenth of its userspace time. Cookies are numbers the kernel hands out in
/// order, which nobody chooses, and the hasher is seeded per map anyway.
type CookieMap<V> = HashMap<u64, V, foldhash::fast::RandomState>;
/// A set of socket cookies; see [`CookieMap`].
type CookieSet = HashSet<u64, foldhash::fast::RandomState>;

/// The live map.
#[derive(Debug, Default)]
pub struct PortMap {
    entries: CookieMap<Entry>,
    /// (port, cookie) of every entry: one tree, not a set per port, which
    /// at 50k ports cost a node each.
    by_port: BTreeSet<(u16, u64)>,
    /// Sockets whose bind asked for port 0 (the kernel chose theirs), as
    /// their bind event said: one that then connects held a port of the
    /// range for every destination.
    bound_to_any: CookieSet,
    /// TCP sockets that were bound and then connected: no listeners, but
    /// their bind keeps the port from every other connect (and from binds
    /// without SO_REUSEADDR) until they close. Kept apart from `entries`,
    /// which reconciliation checks against a listing of listening and bound
    /// sockets only.
    connected_binds: CookieMap<Entry>,
    places: Interned<Place>,
    holders: Interned<[Holder]>,
    /// Counts the calls that may change `entries`: a [`Correction`] planned
    /// at one count is applied only at the same count.
    generation: u64,
}

impl PortMap {
    /// Applies one decoded event seen at `at`. Failures are not stored here
    /// (see the failure log); they leave the map unchanged.
    pub fn apply(&mut self, event: &PortEvent, at: SystemTime) {
        self.generation += 1;
        let Some(cookie) = event.cookie else { return };
        match event.kind {
            EventKind::Bind => {
                let Some(port) = event.bound_port else {
                    // IP_BIND_ADDRESS_NO_PORT: no port reserved yet.
                    return;
                };
                if event.port == 0 {
                    self.bound_to_any.insert(cookie);
                }
                self.insert(Entry::seen(
                    event,
                    cookie,
                    port,
                    SockState::Bound,
                    event.options.into(),
                    at,
                ));
            }
            EventKind::Listen => {
                if let Some(entry) = self.entries.get_mut(&cookie) {
                    entry.facts.state = SockState::Listening;
                    entry.since = at;
                    entry.since_exact = true;
                    let holder: Arc<[Holder]> = Arc::new([holder(event)]);
                    self.holders.add(&mut entry.holders, &holder);
                } else {
                    // Listening without a bind we saw: autobind at listen(),
                    // or bound before portwatch started.
                    let port = event.bound_port.unwrap_or(event.port);
                    let options = ShareOptions::default();
                    self.insert(Entry::seen(
                        event,
                        cookie,
                        port,
                        SockState::Listening,
                        options,
                        at,
                    ));
                }
            }
            EventKind::ListenStop => {
                if let Some(entry) = self.entries.get_mut(&cookie) {
                    entry.facts.state = SockState::Bound;
                    entry.since = at;
                }
            }
            EventKind::Connected => {
                let bound_tcp = rules::same_port_space(event.protocol, Protocol::Tcp);
                if let Some(mut entry) = self.remove(cookie)
                    && bound_tcp
                {
                    entry.facts.state = SockState::Connected;
                    entry.since = at;
                    self.connected_binds.insert(cookie, entry);
                }
            }
            EventKind::Close => {
                self.remove(cookie);
                self.connected_binds.remove(&cookie);
            }
            EventKind::BindFailed | EventKind::ListenFailed | EventKind::ConnectFailed => {}
        }
    }

    /// Merges what a snapshot saw, without forgetting anything: sockets the
    /// map lacks are added (since = `at`, not exact), known ones get the
    /// facts only a snapshot has (inode, holders, unit, options it read).
    pub fn merge(&mut self, observed: Vec<Observed>, at: SystemTime) {
        self.generation += 1;
        for seen in observed {
            self.upsert(seen, at);
        }
    }

    /// [`PortMap::merge`] for a listing taken without owners: its sockets'
    /// holders, places and options come later ([`PortMap::attach_owners`]),
    /// and are pending until then.
    pub fn merge_unowned(&mut self, observed: Vec<Observed>, at: SystemTime) {
        self.generation += 1;
        if self.entries.is_empty() {
            // The start-up listing: sized once, not grown by doublings.
            self.entries.reserve(observed.len());
        }
        for seen in observed {
            let cookie = seen.facts.cookie;
            self.upsert(seen, at);
            if let Some(entry) = self.entries.get_mut(&cookie) {
                entry.owners_pending = true;
            }
        }
    }

    /// Adds what the owners of an earlier listing say (holders, place,
    /// inode, and options and uid the map does not know) to the sockets
    /// still on the same port, and ends every pending entry. Nothing known
    /// is replaced: events applied since the listing are newer than it, and
    /// a socket closed since is not brought back.
    pub fn attach_owners(&mut self, observed: Vec<Observed>) {
        self.generation += 1;
        for seen in observed {
            let cookie = seen.facts.cookie;
            // A socket bound then connected since is kept apart, still
            // holding its port.
            let Some(entry) = self
                .entries
                .get_mut(&cookie)
                .or_else(|| self.connected_binds.get_mut(&cookie))
            else {
                continue;
            };
            if entry.facts.port != seen.facts.port {
                continue;
            }
            self.holders.add(&mut entry.holders, &seen.holders);
            // Most sockets had no place yet: theirs is taken as the listing
            // shares it, with no copy.
            if Arc::ptr_eq(&entry.place, &NOWHERE) {
                entry.place = self.places.place(seen.place);
            } else if *seen.place != Place::default() {
                let merged = Place::clone(&entry.place).or(Place::clone(&seen.place));
                if merged != *entry.place {
                    entry.place = self.places.place(merged);
                }
            }
            let (known, read) = (&mut entry.facts, &seen.facts);
            known.options = merge_options(known.options, read.options);
            known.uid = known.uid.or(read.uid);
            entry.inode = entry.inode.or(seen.inode.map(NonZeroU64::get));
        }
        for entry in self
            .entries
            .values_mut()
            .chain(self.connected_binds.values_mut())
        {
            entry.owners_pending = false;
        }
    }

    /// Makes the map equal to `truth`, a complete sock_diag listing of the
    /// namespaces in `listed`, and says what differed: [`PortMap::plan`]
    /// then [`PortMap::correct`] at once (the daemon plans on the listing's
    /// thread, under the read lock, and corrects apart).
    #[cfg(test)]
    pub fn reconcile(
        &mut self,
        truth: Vec<Observed>,
        listed: &BTreeSet<NetnsCookie>,
        bound_tcp_listed: bool,
        at: SystemTime,
    ) -> Reconciled {
        let correction = self.plan(truth, listed, bound_tcp_listed);
        // Planned against this very map: never stale.
        self.correct(correction, at).unwrap_or_default()
    }

    /// What would make the map equal to `truth`, a complete sock_diag
    /// listing of the namespaces in `listed`, found without changing it: a
    /// reconciliation compares under a read lock, so the API keeps
    /// answering, and writes only what differs (at rest, nothing). Entries
    /// in namespaces that could not be listed are left alone: the listing
    /// says nothing about them. Sockets in states that do not hold a port
    /// for receiving (connections, TIME_WAIT) are ignored. Without
    /// `bound_tcp_listed` (a kernel before 6.7, whose sock_diag cannot list
    /// TCP sockets that are bound but not listening) the listing says
    /// nothing about such entries either: they stay, and their close comes
    /// from the release hook.
    pub fn plan(
        &self,
        truth: Vec<Observed>,
        listed: &BTreeSet<NetnsCookie>,
        bound_tcp_listed: bool,
    ) -> Correction {
        let mut drift = Drift::default();
        let (truth, present) = latest_per_cookie(truth);
        // An entry whose namespace is unknown (0) is judged by any listing.
        let gone: Vec<u64> = self
            .entries
            .iter()
            .filter(|(cookie, entry)| {
                let netns = entry.facts.netns;
                let unlistable = !bound_tcp_listed
                    && entry.facts.state == SockState::Bound
                    && rules::same_port_space(entry.facts.protocol, Protocol::Tcp);
                !present.contains(cookie) && !unlistable && (netns == 0 || listed.contains(&netns))
            })
            .map(|(cookie, _)| *cookie)
            .collect();
        drift.stale = gone.len() as u64;
        let mut changes = Vec::new();
        for seen in truth {
            let known = self.entries.get(&seen.facts.cookie);
            match known {
                None => drift.missing += 1,
                Some(entry) => {
                    let (known, real) = (&entry.facts, &seen.facts);
                    if known.state != real.state
                        || known.address != real.address
                        || known.port != real.port
                        || known.protocol != real.protocol
                    {
                        drift.changed += 1;
                    }
                }
            }
            if differs(known, &seen) {
                changes.push(seen);
            }
        }
        Correction {
            generation: self.generation,
            drift,
            gone,
            changes,
        }
    }

    /// [`PortMap::merge`] as a [`Correction`]: what `observed` would add or
    /// change, with nothing removed and no drift (a first look, not a
    /// comparison).
    pub fn plan_merge(&self, observed: Vec<Observed>) -> Correction {
        Correction {
            generation: self.generation,
            changes: latest_per_cookie(observed)
                .0
                .into_iter()
                .filter(|seen| differs(self.entries.get(&seen.facts.cookie), seen))
                .collect(),
            ..Correction::default()
        }
    }

    /// Applies a [`PortMap::plan`] (or [`PortMap::plan_merge`]). `None`,
    /// changing nothing, when the map changed since the plan was made: the
    /// plan may then be wrong, and the next listing plans again.
    pub fn correct(&mut self, correction: Correction, at: SystemTime) -> Option<Reconciled> {
        if correction.generation != self.generation {
            return None;
        }
        self.generation += 1;
        for cookie in &correction.gone {
            self.remove(*cookie);
        }
        for seen in correction.changes {
            self.upsert(seen, at);
        }
        Some(Reconciled {
            drift: correction.drift,
            removed: correction.gone,
        })
    }

    /// [`differs`] makes the same decisions without writing: a change here
    /// is a change there.
    fn upsert(&mut self, seen: Observed, at: SystemTime) {
        if !tracked_state(&seen.facts) {
            return;
        }
        let cookie = seen.facts.cookie;
        match self.entries.get_mut(&cookie) {
            Some(entry) if entry.facts.port == seen.facts.port => {
                let options = merge_options(entry.facts.options, seen.facts.options);
                let uid = entry.facts.uid.or(seen.facts.uid);
                entry.facts = SocketFacts {
                    options,
                    uid,
                    ..seen.facts
                };
                self.holders.add(&mut entry.holders, &seen.holders);
                entry.inode = seen.inode.map(NonZeroU64::get).or(entry.inode);
                // Arc's equality looks at the pointer first: a socket that
                // kept its process's place costs no string comparison.
                if *seen.place != Place::default() && seen.place != entry.place {
                    let merged = Place::clone(&seen.place).or(Place::clone(&entry.place));
                    entry.place = self.places.place(merged);
                }
            }
            _ => {
                self.remove(cookie);
                self.insert(Entry {
                    facts: seen.facts,
                    holders: seen.holders,
                    inode: seen.inode.map(NonZeroU64::get),
                    cgroup_id: None,
                    place: seen.place,
                    since: at,
                    since_exact: false,
                    owners_pending: false,
                });
            }
        }
    }

    fn insert(&mut self, mut entry: Entry) {
        let cookie = entry.facts.cookie;
        if let Some(old) = self.entries.get(&cookie) {
            self.by_port.remove(&(old.facts.port, cookie));
        }
        entry.place = self.places.place(entry.place);
        entry.holders = self.holders.intern(entry.holders);
        self.by_port.insert((entry.facts.port, cookie));
        self.entries.insert(cookie, entry);
    }

    fn remove(&mut self, cookie: u64) -> Option<Entry> {
        self.bound_to_any.remove(&cookie);
        let entry = self.entries.remove(&cookie)?;
        self.by_port.remove(&(entry.facts.port, cookie));
        Some(entry)
    }

    /// The listeners on `port`, in a stable order (netns, protocol, family,
    /// address, cookie).
    pub fn listeners_on(&self, port: u16) -> Vec<&Entry> {
        let mut found: Vec<&Entry> = self
            .on_port(port)
            .filter(|entry| entry.is_listener())
            .collect();
        found.sort_by_key(|e| {
            (
                e.facts.netns,
                e.facts.protocol,
                e.facts.family,
                e.facts.address,
                e.facts.cookie,
            )
        });
        found
    }

    /// Every socket on `port` that holds it, listeners and bound-only ones.
    pub fn on_port(&self, port: u16) -> impl Iterator<Item = &Entry> {
        self.in_ports(port..=port)
    }

    /// Every socket holding a port in `ports` (listeners and bound-only
    /// ones), by port.
    pub fn in_ports(&self, ports: std::ops::RangeInclusive<u16>) -> impl Iterator<Item = &Entry> {
        self.by_port
            .range((*ports.start(), 0)..=(*ports.end(), u64::MAX))
            .filter_map(|(_, cookie)| self.entries.get(cookie))
    }

    /// Ports from `first` on that have at least one listener, ascending.
    pub fn ports_from(&self, first: u16) -> impl Iterator<Item = u16> + '_ {
        let mut last = None;
        self.by_port
            .range((first, 0)..)
            .filter(move |(port, cookie)| {
                // A port once, at its first listener.
                let first_listener =
                    last != Some(*port) && self.entries.get(cookie).is_some_and(Entry::is_listener);
                if first_listener {
                    last = Some(*port);
                }
                first_listener
            })
            .map(|(port, _)| *port)
    }

    /// Ports that have at least one listener, ascending.
    #[cfg(test)]
    pub fn ports(&self) -> Vec<u16> {
        self.ports_from(0).collect()
    }

    /// The ports TCP sockets listen on, per network namespace.
    pub fn tcp_listening_ports(&self) -> HashMap<NetnsCookie, HashSet<u16>> {
        let mut ports: HashMap<NetnsCookie, HashSet<u16>> = HashMap::new();
        for entry in self.entries.values() {
            let facts = &entry.facts;
            if facts.state == SockState::Listening
                && rules::same_port_space(facts.protocol, Protocol::Tcp)
            {
                ports.entry(facts.netns).or_default().insert(facts.port);
            }
        }
        ports
    }

    /// Every listener, for exports and comparisons.
    pub fn listeners(&self) -> impl Iterator<Item = &Entry> {
        self.entries.values().filter(|e| e.is_listener())
    }

    /// Records where the socket's owner lives, where the map does not know yet.
    pub fn set_place(&mut self, cookie: u64, place: Place) {
        self.generation += 1;
        if let Some(entry) = self.entries.get_mut(&cookie) {
            let merged = Place::clone(&entry.place).or(place);
            if merged != *entry.place {
                entry.place = self.places.place(merged);
            }
        }
    }

    /// TCP sockets bound before they connected, which hold their port
    /// against every connect until they close.
    pub fn connected_binds(&self) -> impl Iterator<Item = &Entry> {
        self.connected_binds.values()
    }

    /// Forgets the connected binds in namespace `netns` that `seen` (a
    /// listing of it) does not have: their close was lost. Their cookies.
    pub fn forget_connected_binds(&mut self, netns: NetnsCookie, seen: &HashSet<u64>) -> Vec<u64> {
        let gone: Vec<u64> = self
            .connected_binds
            .iter()
            .filter(|(cookie, entry)| entry.facts.netns == netns && !seen.contains(cookie))
            .map(|(cookie, _)| *cookie)
            .collect();
        for cookie in &gone {
            self.connected_binds.remove(cookie);
        }
        gone
    }

    /// Whether the socket's bind asked for port 0 (as its bind event said;
    /// false when unknown).
    pub fn bound_to_any_port(&self, cookie: u64) -> bool {
        self.bound_to_any.contains(&cookie)
    }

    /// The socket with this cookie, listener or not.
    pub fn get(&self, cookie: u64) -> Option<&Entry> {
        self.entries.get(&cookie)
    }

    /// Sockets on `port` in `netns` that share `protocol`'s port space (TCP
    /// and MPTCP share one), as the conflict rules see them.
    pub fn facts_on(&self, netns: NetnsCookie, protocol: Protocol, port: u16) -> Vec<SocketFacts> {
        self.on_port(port)
            .filter(|e| {
                e.facts.netns == netns && rules::same_port_space(e.facts.protocol, protocol)
            })
            .map(|e| e.facts.clone())
            .collect()
    }

    /// How many sockets the map holds (listeners and bound-only).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// A key that identifies a listener the way `ss -tuln` shows it, for
/// comparisons in tests: (netns, protocol, address, port).
pub fn listener_key(facts: &SocketFacts) -> (NetnsCookie, Protocol, Family, IpAddr, u16) {
    (
        facts.netns,
        facts.protocol,
        facts.family,
        facts.address,
        facts.port,
    )
}

/// The sockets of a listing the map keeps, the last of each cookie (a dump
/// is not atomic: a socket whose state changed may be listed twice, and the
/// later one is the newer), and their cookies.
fn latest_per_cookie(listing: Vec<Observed>) -> (Vec<Observed>, CookieSet) {
    let mut cookies = CookieSet::with_capacity_and_hasher(listing.len(), Default::default());
    let mut kept: Vec<Observed> = listing
        .into_iter()
        .rev()
        .filter(|seen| tracked_state(&seen.facts) && cookies.insert(seen.facts.cookie))
        .collect();
    kept.reverse();
    (kept, cookies)
}

/// Whether [`PortMap::upsert`] of `seen` would change the map, where `known`
/// is the map's entry of the same cookie: the same decisions, made without
/// writing.
fn differs(known: Option<&Entry>, seen: &Observed) -> bool {
    if !tracked_state(&seen.facts) {
        return false;
    }
    let Some(entry) = known else {
        return true;
    };
    if entry.facts.port != seen.facts.port {
        return true;
    }
    let facts = SocketFacts {
        options: merge_options(entry.facts.options, seen.facts.options),
        uid: entry.facts.uid.or(seen.facts.uid),
        ..seen.facts.clone()
    };
    let new_holder = seen
        .holders
        .iter()
        .any(|holder| !entry.holders.iter().any(|known| known.pid == holder.pid));
    let new_inode = seen
        .inode
        .is_some_and(|inode| entry.inode != Some(inode.get()));
    let new_place = *seen.place != Place::default()
        && seen.place != entry.place
        && Place::clone(&seen.place).or(Place::clone(&entry.place)) != *entry.place;
    facts != entry.facts || new_holder || new_inode || new_place
}

/// Sockets the map keeps: listeners and bound-but-not-listening ones.
fn tracked_state(facts: &SocketFacts) -> bool {
    facts.state.is_listening_or_bound()
}

/// Known option values win over unknown ones; a value read later (snapshot
/// through pidfd_getfd) fills what an event could not read.
fn merge_options(known: ShareOptions, seen: ShareOptions) -> ShareOptions {
    ShareOptions {
        reuse_addr: known.reuse_addr.or(seen.reuse_addr),
        reuse_port: known.reuse_port.or(seen.reuse_port),
        v6only: seen.v6only.or(known.v6only),
    }
}

fn holder(event: &PortEvent) -> Holder {
    Holder {
        pid: event.pid,
        process: event.process.clone(),
    }
}

#[cfg(test)]
mod tests {
    use std::{
        net::{Ipv4Addr, Ipv6Addr},
        time::Duration,
    };

    use super::*;
    use crate::event::Errno;

    const T0: SystemTime = SystemTime::UNIX_EPOCH;

    fn event(kind: EventKind, cookie: u64, address: IpAddr, port: u16) -> PortEvent {
        PortEvent {
            pid: 100,
            tid: 100,
            process: "nginx".into(),
            cgroup_id: 5,
            ..PortEvent::example(kind, Protocol::Tcp, address, port, cookie)
        }
    }

    fn v4(a: [u8; 4]) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(a))
    }

    fn observed(cookie: u64, protocol: Protocol, state: SockState, port: u16) -> Observed {
        Observed {
            facts: SocketFacts {
                cookie,
                netns: 1,
                protocol,
                family: Family::Ipv4,
                address: v4([0, 0, 0, 0]),
                port,
                state,
                options: ShareOptions::default(),
                uid: Some(0),
                bound_dev_if: 0,
            },
            holders: Arc::new([Holder {
                pid: 7,
                process: "old".into(),
            }]),
            inode: NonZeroU64::new(99),
            place: Arc::new(Place {
                cgroup: Some("/system.slice/old.service".into()),
                unit: Some("old.service".into()),
                ..Place::default()
            }),
        }
    }

    #[test]
    fn a_bound_tcp_socket_that_connects_keeps_its_port_until_it_closes() {
        let mut map = PortMap::default();
        let mut bind = PortEvent::example(EventKind::Bind, Protocol::Tcp, v4([127, 0, 0, 1]), 0, 7);
        bind.bound_port = Some(40001);
        map.apply(&bind, T0);
        let udp = PortEvent::example(EventKind::Bind, Protocol::Udp, v4([127, 0, 0, 1]), 5353, 8);
        map.apply(&udp, T0);
        assert!(map.bound_to_any_port(7));
        assert!(!map.bound_to_any_port(8));
        for (cookie, protocol) in [(7, Protocol::Tcp), (8, Protocol::Udp)] {
            let connected = PortEvent {
                peer: Some("10.1.2.3:443".parse().unwrap()),
                ..PortEvent::example(EventKind::Connected, protocol, v4([0, 0, 0, 0]), 0, cookie)
            };
            map.apply(&connected, T0);
        }
        // Neither is a listener or bound socket any more; the TCP one is
        // kept apart, connected, until it closes.
        assert!(map.is_empty());
        let kept: Vec<(u64, u16, SockState)> = map
            .connected_binds()
            .map(|e| (e.facts.cookie, e.facts.port, e.facts.state))
            .collect();
        assert_eq!(kept, [(7, 40001, SockState::Connected)]);
        // A listing of another namespace, or one that has it, keeps it.
        assert_eq!(
            map.forget_connected_binds(2, &HashSet::new()),
            Vec::<u64>::new()
        );
        assert_eq!(
            map.forget_connected_binds(1, &HashSet::from([7])),
            Vec::<u64>::new()
        );
        let close = PortEvent::example(EventKind::Close, Protocol::Tcp, v4([0, 0, 0, 0]), 0, 7);
        map.apply(&close, T0);
        assert_eq!(map.connected_binds().count(), 0);
        // One whose close was lost goes with the first listing without it.
        map.apply(&bind, T0);
        let connected = PortEvent {
            peer: Some("10.1.2.3:443".parse().unwrap()),
            ..PortEvent::example(EventKind::Connected, Protocol::Tcp, v4([0, 0, 0, 0]), 0, 7)
        };
        map.apply(&connected, T0);
        assert_eq!(map.forget_connected_binds(1, &HashSet::new()), [7]);
        assert_eq!(map.connected_binds().count(), 0);
    }

    #[test]
    fn tcp_counts_once_it_listens() {
        let mut map = PortMap::default();
        map.apply(&event(EventKind::Bind, 1, v4([127, 0, 0, 1]), 8000), T0);
        assert_eq!(map.len(), 1, "bound TCP is kept");
        assert!(map.listeners_on(8000).is_empty(), "but is not a listener");
        assert!(map.ports().is_empty());
        map.apply(&event(EventKind::Listen, 1, v4([127, 0, 0, 1]), 8000), T0);
        assert_eq!(map.listeners_on(8000).len(), 1);
        assert_eq!(map.ports(), [8000]);
        map.apply(
            &event(EventKind::ListenStop, 1, v4([127, 0, 0, 1]), 8000),
            T0,
        );
        assert!(map.listeners_on(8000).is_empty());
        map.apply(&event(EventKind::Close, 1, v4([0, 0, 0, 0]), 0), T0);
        assert!(map.is_empty());
    }

    #[test]
    fn udp_counts_once_bound() {
        let mut map = PortMap::default();
        let mut bind = event(EventKind::Bind, 2, v4([0, 0, 0, 0]), 53);
        bind.protocol = Protocol::Udp;
        map.apply(&bind, T0);
        assert_eq!(map.listeners_on(53).len(), 1);
    }

    #[test]
    fn a_port_holds_many_listeners() {
        let mut map = PortMap::default();
        let mut events = vec![
            event(EventKind::Bind, 1, v4([0, 0, 0, 0]), 8000),
            event(EventKind::Bind, 2, IpAddr::V6(Ipv6Addr::UNSPECIFIED), 8000),
            event(EventKind::Bind, 3, v4([127, 0, 0, 2]), 8000),
        ];
        let mut udp = event(EventKind::Bind, 4, v4([0, 0, 0, 0]), 8000);
        udp.protocol = Protocol::Udp;
        events.push(udp);
        for e in &events {
            map.apply(e, T0);
        }
        for cookie in 1..=3 {
            map.apply(
                &event(EventKind::Listen, cookie, v4([0, 0, 0, 0]), 8000),
                T0,
            );
        }
        let listeners = map.listeners_on(8000);
        assert_eq!(listeners.len(), 4);
        assert_eq!(
            listeners
                .iter()
                .filter(|e| e.facts.protocol == Protocol::Udp)
                .count(),
            1
        );
    }

    #[test]
    fn listen_without_a_seen_bind_is_added() {
        let mut map = PortMap::default();
        map.apply(&event(EventKind::Listen, 9, v4([0, 0, 0, 0]), 40000), T0);
        assert_eq!(map.listeners_on(40000).len(), 1);
    }

    #[test]
    fn failures_and_cookieless_events_change_nothing() {
        let mut map = PortMap::default();
        let mut failed = event(EventKind::BindFailed, 3, v4([127, 0, 0, 1]), 80);
        failed.errno = Some(Errno::EACCES);
        failed.bound_port = None;
        map.apply(&failed, T0);
        let mut no_cookie = event(EventKind::Bind, 0, v4([127, 0, 0, 1]), 80);
        no_cookie.cookie = None;
        map.apply(&no_cookie, T0);
        assert!(map.is_empty());
    }

    #[test]
    fn snapshot_merge_adds_and_enriches_without_forgetting() {
        let mut map = PortMap::default();
        map.apply(&event(EventKind::Bind, 1, v4([0, 0, 0, 0]), 8000), T0);
        map.apply(&event(EventKind::Listen, 1, v4([0, 0, 0, 0]), 8000), T0);
        let later = T0 + Duration::from_secs(5);
        let mut known = observed(1, Protocol::Tcp, SockState::Listening, 8000);
        known.facts.options.reuse_port = Some(true);
        map.merge(
            vec![known, observed(2, Protocol::Udp, SockState::Bound, 9000)],
            later,
        );
        let one = map.get(1).unwrap();
        assert_eq!(
            one.holders.iter().map(|h| h.pid).collect::<Vec<_>>(),
            [7, 100]
        );
        assert_eq!(one.place.unit.as_deref(), Some("old.service"));
        assert_eq!(
            one.facts.options.reuse_port,
            Some(true),
            "snapshot filled the unknown"
        );
        assert!(
            one.since_exact && one.since == T0,
            "an event's time is kept"
        );
        let two = map.get(2).unwrap();
        assert!(!two.since_exact && two.since == later);
        assert_eq!(map.ports(), [8000, 9000]);
    }

    #[test]
    fn owners_read_after_ready_fill_in_and_replace_nothing_newer() {
        let mut map = PortMap::default();
        // The start-up listing, taken without owners: two TCP sockets bound
        // and not listening, one UDP socket.
        let unowned = |cookie, protocol, state, port| Observed {
            holders: Arc::new([]),
            place: Arc::default(),
            inode: None,
            ..observed(cookie, protocol, state, port)
        };
        let mut two = unowned(2, Protocol::Tcp, SockState::Bound, 8001);
        two.facts.options.reuse_port = Some(false);
        map.merge_unowned(
            vec![
                unowned(1, Protocol::Tcp, SockState::Bound, 8000),
                two,
                unowned(3, Protocol::Udp, SockState::Bound, 5353),
                unowned(4, Protocol::Tcp, SockState::Bound, 40000),
            ],
            T0,
        );
        for cookie in [1, 2, 3, 4] {
            let entry = map.get(cookie).unwrap();
            assert!(entry.owners_pending && entry.holders.is_empty());
        }
        // Then, before the owners are read: 1 listens, 3 closes, 4 connects.
        map.apply(&event(EventKind::Listen, 1, v4([0, 0, 0, 0]), 8000), T0);
        map.apply(&event(EventKind::Close, 3, v4([0, 0, 0, 0]), 5353), T0);
        map.apply(&event(EventKind::Connected, 4, v4([0, 0, 0, 0]), 40000), T0);
        // The owners, read from the listing as it was.
        let mut read = vec![
            observed(1, Protocol::Tcp, SockState::Bound, 8000),
            observed(2, Protocol::Tcp, SockState::Bound, 8001),
            observed(3, Protocol::Udp, SockState::Bound, 5353),
            observed(4, Protocol::Tcp, SockState::Bound, 40000),
        ];
        for seen in &mut read {
            seen.facts.options.reuse_addr = Some(true);
            seen.facts.options.reuse_port = Some(true);
        }
        map.attach_owners(read);
        let one = map.get(1).unwrap();
        assert_eq!(one.facts.state, SockState::Listening, "the event is newer");
        let pids: Vec<u32> = one.holders.iter().map(|h| h.pid).collect();
        assert_eq!(pids, [7, 100]);
        assert_eq!(one.place.unit.as_deref(), Some("old.service"));
        assert_eq!(one.inode, Some(99));
        let two = map.get(2).unwrap();
        assert_eq!(two.facts.options.reuse_addr, Some(true), "unknown, filled");
        assert_eq!(two.facts.options.reuse_port, Some(false), "known, kept");
        assert!(map.get(3).is_none(), "closed since: not brought back");
        assert!(!one.owners_pending && !two.owners_pending);
        let four = map.connected_binds().find(|e| e.facts.cookie == 4).unwrap();
        assert_eq!(four.facts.state, SockState::Connected);
        assert_eq!(four.holders[0].pid, 7, "a connected bind gets its holder");
        assert!(!four.owners_pending);
    }

    /// A reconciliation writes only the sockets `differs` names: it must
    /// agree with what an upsert does, for every kind of listed socket.
    #[test]
    fn a_plan_writes_exactly_the_sockets_an_upsert_would_change() {
        let base = observed(1, Protocol::Tcp, SockState::Listening, 80);
        let holder = |pid, process: &str| -> Arc<[Holder]> {
            Arc::new([Holder {
                pid,
                process: process.into(),
            }])
        };
        let with = |change: &dyn Fn(&mut Observed)| changed(&base, change);
        let cases: Vec<(&str, Observed, bool)> = vec![
            ("the same socket", base.clone(), false),
            (
                "listed without owners",
                with(&|s| {
                    s.holders = NOBODY.clone();
                    s.place = NOWHERE.clone();
                    s.inode = None;
                }),
                false,
            ),
            (
                "a holder it knows, by pid",
                with(&|s| s.holders = holder(7, "renamed")),
                false,
            ),
            (
                "one more holder",
                with(&|s| s.holders = holder(8, "worker")),
                true,
            ),
            (
                "another inode",
                with(&|s| s.inode = NonZeroU64::new(100)),
                true,
            ),
            (
                "another unit",
                with(&|s| {
                    s.place = Arc::new(Place {
                        unit: Some("new.service".into()),
                        ..Place::default()
                    });
                }),
                true,
            ),
            (
                "a place that adds nothing",
                with(&|s| {
                    s.place = Arc::new(Place {
                        unit: Some("old.service".into()),
                        ..Place::default()
                    });
                }),
                false,
            ),
            (
                "an option it did not know",
                with(&|s| s.facts.options.reuse_port = Some(true)),
                true,
            ),
            (
                "another uid (the known one stays)",
                with(&|s| s.facts.uid = Some(5)),
                false,
            ),
            (
                "another state",
                with(&|s| s.facts.state = SockState::Bound),
                true,
            ),
            (
                "another address",
                with(&|s| s.facts.address = v4([127, 0, 0, 1])),
                true,
            ),
            ("another port", with(&|s| s.facts.port = 81), true),
            (
                "a socket it does not have",
                with(&|s| s.facts.cookie = 2),
                true,
            ),
            (
                "a connection",
                with(&|s| s.facts.state = SockState::Connected),
                false,
            ),
        ];
        let before = assert_differs_as_upsert_does(&base, PortMap::merge, cases);
        // At rest, a plan has nothing to write.
        let correction = before.plan(vec![base.clone()], &BTreeSet::from([1]), true);
        assert!(correction.changes.is_empty() && correction.gone.is_empty());
        assert_eq!(correction.drift.total(), 0);
    }

    /// The same agreement for an entry that knows little (as the start-up
    /// listing leaves it before its owners are read) and some options.
    #[test]
    fn a_plan_writes_what_a_sparse_entry_lacks_and_keeps_what_it_knows() {
        let mut base = observed(1, Protocol::Tcp, SockState::Listening, 80);
        base.holders = NOBODY.clone();
        base.place = NOWHERE.clone();
        base.inode = None;
        base.facts.uid = None;
        base.facts.family = Family::Ipv6;
        base.facts.options = ShareOptions {
            reuse_addr: Some(false),
            reuse_port: None,
            v6only: Some(true),
        };
        let with = |change: &dyn Fn(&mut Observed)| changed(&base, change);
        let cases: Vec<(&str, Observed, bool)> = vec![
            ("the same socket", base.clone(), false),
            (
                "an option it knows, listed otherwise (the known one stays)",
                with(&|s| s.facts.options.reuse_addr = Some(true)),
                false,
            ),
            (
                "v6only listed otherwise (the listing wins)",
                with(&|s| s.facts.options.v6only = Some(false)),
                true,
            ),
            ("a uid", with(&|s| s.facts.uid = Some(3)), true),
            (
                "a first holder",
                with(&|s| {
                    s.holders = Arc::new([Holder {
                        pid: 7,
                        process: "nginx".into(),
                    }]);
                }),
                true,
            ),
            (
                "a first place",
                with(&|s| {
                    s.place = Arc::new(Place {
                        unit: Some("nginx.service".into()),
                        ..Place::default()
                    });
                }),
                true,
            ),
            (
                "a first inode",
                with(&|s| s.inode = NonZeroU64::new(5)),
                true,
            ),
        ];
        assert_differs_as_upsert_does(&base, PortMap::merge_unowned, cases);
    }

    /// `base` as `change` leaves it.
    fn changed(base: &Observed, change: &dyn Fn(&mut Observed)) -> Observed {
        let mut seen = base.clone();
        change(&mut seen);
        seen
    }

    /// Checks, case by case (what, the listed socket, whether it changes
    /// the map), that `differs` says what an upsert does to a map that
    /// `start` gave `base`. That map.
    fn assert_differs_as_upsert_does(
        base: &Observed,
        start: fn(&mut PortMap, Vec<Observed>, SystemTime),
        cases: Vec<(&str, Observed, bool)>,
    ) -> PortMap {
        let map_with = |seen: Option<&Observed>| {
            let mut map = PortMap::default();
            start(&mut map, vec![base.clone()], T0);
            if let Some(seen) = seen {
                map.upsert(seen.clone(), T0);
            }
            map
        };
        let before = map_with(None);
        for (what, seen, changes) in cases {
            let cookie = seen.facts.cookie;
            assert_eq!(
                differs(before.get(cookie), &seen),
                changes,
                "{what}: differs"
            );
            let after = map_with(Some(&seen));
            let changed = after.len() != before.len() || after.get(cookie) != before.get(cookie);
            assert_eq!(changed, changes, "{what}: what an upsert did");
        }
        before
    }

    /// Planning then correcting leaves the map as the old way did: remove
    /// what the listing lacks, upsert every listed socket in order.
    #[test]
    fn a_correction_leaves_the_map_as_upserting_the_whole_listing_would() {
        let start = || {
            let mut map = PortMap::default();
            map.merge(
                vec![
                    observed(1, Protocol::Tcp, SockState::Listening, 80),
                    observed(2, Protocol::Tcp, SockState::Listening, 81),
                    observed(3, Protocol::Udp, SockState::Bound, 53),
                ],
                T0,
            );
            map
        };
        let mut changed = observed(1, Protocol::Tcp, SockState::Listening, 80);
        changed.holders = Arc::new([Holder {
            pid: 8,
            process: "worker".into(),
        }]);
        let listing = vec![
            changed,
            observed(3, Protocol::Udp, SockState::Bound, 53),
            // Listed twice (its state changed during the dump): the later
            // one is the newer.
            observed(4, Protocol::Tcp, SockState::Bound, 82),
            observed(4, Protocol::Tcp, SockState::Listening, 82),
            observed(9, Protocol::Tcp, SockState::Connected, 83),
        ];
        let mut planned = start();
        let done = planned.reconcile(listing.clone(), &BTreeSet::from([1]), true, T0);
        let mut upserted = start();
        upserted.remove(2);
        for seen in listing {
            upserted.upsert(seen, T0);
        }
        assert_eq!(planned.len(), upserted.len());
        for cookie in [1, 2, 3, 4, 9] {
            assert_eq!(planned.get(cookie), upserted.get(cookie), "cookie {cookie}");
        }
        assert_eq!(planned.get(4).unwrap().facts.state, SockState::Listening);
        assert_eq!(done.removed, vec![2]);
        assert_eq!(
            done.drift,
            Drift {
                missing: 1,
                stale: 1,
                changed: 0,
            }
        );
    }

    /// A plan made before the map changed is not applied: it could undo
    /// what changed.
    #[test]
    fn a_plan_older_than_the_map_is_refused() {
        let mut map = PortMap::default();
        map.merge(
            vec![observed(1, Protocol::Tcp, SockState::Listening, 80)],
            T0,
        );
        // The listing lacks socket 1: the plan removes it.
        let correction = map.plan(Vec::new(), &BTreeSet::from([1]), true);
        let mut listen = event(EventKind::Listen, 1, v4([0, 0, 0, 0]), 80);
        listen.netns = Some(1);
        map.apply(&listen, T0);
        assert!(map.correct(correction, T0).is_none());
        assert!(map.get(1).is_some());
        // A fresh plan applies.
        let correction = map.plan(Vec::new(), &BTreeSet::from([1]), true);
        assert_eq!(map.correct(correction, T0).unwrap().removed, vec![1]);
        assert!(map.get(1).is_none());
    }

    #[test]
    fn reconcile_counts_drift_and_converges() {
        let mut map = PortMap::default();
        map.apply(&event(EventKind::Bind, 1, v4([0, 0, 0, 0]), 8000), T0);
        map.apply(&event(EventKind::Listen, 1, v4([0, 0, 0, 0]), 8000), T0);
        map.apply(&event(EventKind::Bind, 2, v4([0, 0, 0, 0]), 8001), T0); // will vanish
        let truth = vec![
            observed(1, Protocol::Tcp, SockState::Bound, 8000), // stopped listening
            observed(3, Protocol::Udp, SockState::Bound, 5353), // missed
            observed(4, Protocol::Tcp, SockState::Connected, 5000), // ignored
        ];
        let listed = BTreeSet::from([1]);
        let done = map.reconcile(truth.clone(), &listed, true, T0);
        assert_eq!(done.removed, [2], "the vanished socket is untracked");
        assert_eq!(
            done.drift,
            Drift {
                missing: 1,
                stale: 1,
                changed: 1
            }
        );
        assert_eq!(
            map.reconcile(truth, &listed, true, T0).drift.total(),
            0,
            "drift returns to 0"
        );
        assert_eq!(map.ports(), [5353]);
        assert!(map.get(4).is_none());
    }

    #[test]
    fn reconcile_leaves_namespaces_it_could_not_list_alone() {
        let mut map = PortMap::default();
        let mut elsewhere = event(EventKind::Bind, 1, v4([0, 0, 0, 0]), 8000);
        elsewhere.netns = Some(2);
        map.apply(&elsewhere, T0);
        map.apply(&event(EventKind::Bind, 2, v4([0, 0, 0, 0]), 8001), T0);
        let done = map.reconcile(Vec::new(), &BTreeSet::from([1]), true, T0);
        assert_eq!(done.drift.stale, 1, "only the listed namespace's entry");
        assert_eq!(done.removed, [2]);
        assert!(map.get(1).is_some() && map.get(2).is_none());
        let done = map.reconcile(Vec::new(), &BTreeSet::from([1, 2]), true, T0);
        assert_eq!((done.drift.stale, done.removed, map.len()), (1, vec![1], 0));
    }

    #[test]
    fn a_listing_that_cannot_see_bound_tcp_sockets_keeps_them() {
        let mut map = PortMap::default();
        map.apply(&event(EventKind::Bind, 1, v4([0, 0, 0, 0]), 8000), T0);
        map.apply(&event(EventKind::Bind, 2, v4([0, 0, 0, 0]), 8001), T0);
        map.apply(&event(EventKind::Listen, 2, v4([0, 0, 0, 0]), 8001), T0);
        let mut udp = event(EventKind::Bind, 3, v4([0, 0, 0, 0]), 5353);
        udp.protocol = Protocol::Udp;
        map.apply(&udp, T0);
        // A kernel before 6.7 lists none of them: only the bound TCP socket
        // is beyond what its listing can tell.
        let done = map.reconcile(Vec::new(), &BTreeSet::from([1]), false, T0);
        assert_eq!(
            done.drift.stale, 2,
            "the listener and the UDP socket are gone"
        );
        assert!(map.get(1).is_some() && map.get(2).is_none() && map.get(3).is_none());
        // A kernel that lists them: its silence means closed.
        let done = map.reconcile(Vec::new(), &BTreeSet::from([1]), true, T0);
        assert_eq!((done.drift.stale, map.len()), (1, 0));
    }

    #[test]
    fn a_cookie_reused_on_another_port_moves() {
        let mut map = PortMap::default();
        map.apply(&event(EventKind::Bind, 1, v4([0, 0, 0, 0]), 8000), T0);
        map.merge(
            vec![observed(1, Protocol::Tcp, SockState::Listening, 8001)],
            T0,
        );
        assert!(map.on_port(8000).next().is_none());
        assert_eq!(map.listeners_on(8001).len(), 1);
    }

    #[test]
    fn sockets_of_one_place_share_it_and_unused_places_are_dropped() {
        let mut map = PortMap::default();
        map.merge(
            (0..3)
                .map(|i| observed(i, Protocol::Tcp, SockState::Listening, 8000 + i as u16))
                .collect(),
            T0,
        );
        let places: Vec<&Arc<Place>> = (0..3).map(|i| &map.get(i).unwrap().place).collect();
        assert!(places.iter().all(|p| Arc::ptr_eq(p, places[0])));
        assert_eq!(places[0].unit.as_deref(), Some("old.service"));
        assert_eq!(map.places.known.len(), 1);

        // Another place for one socket: the others keep theirs.
        let mut moved = Place::clone(&map.get(1).unwrap().place);
        moved.unit = Some("new.service".into());
        let mut seen = observed(1, Protocol::Tcp, SockState::Listening, 8001);
        seen.place = Arc::new(moved);
        map.merge(vec![seen], T0);
        assert_eq!(
            map.get(1).unwrap().place.unit.as_deref(),
            Some("new.service")
        );
        assert_eq!(
            map.get(0).unwrap().place.unit.as_deref(),
            Some("old.service")
        );

        // Places no socket holds any more go at the next pruning, however
        // often a socket changes place.
        for i in 0..3000 {
            let mut seen = observed(10, Protocol::Tcp, SockState::Listening, 9000);
            Arc::make_mut(&mut seen.place).unit = Some(format!("app-{i}.service"));
            map.merge(vec![seen], T0);
        }
        assert!(
            map.places.known.len() <= 1024,
            "{} places kept for 3 in use",
            map.places.known.len()
        );
        // An unplaced socket shares the one empty place.
        let unplaced = event(EventKind::Bind, 5000, v4([0, 0, 0, 0]), 7000);
        map.apply(&unplaced, T0);
        assert!(Arc::ptr_eq(&map.get(5000).unwrap().place, &NOWHERE));
    }
}
