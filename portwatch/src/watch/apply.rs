//! A batch of kernel events into the state: what each needs from `/proc`
//! read first, then the map, the failures and the counters under one write
//! lock; where outcomes are inferred, failed listens read from their
//! fallback to CLOSE, and errnos inferred from the map.

use std::{sync::Arc, time::Instant};

use super::{
    Watcher,
    resolve::{Awaiting, replay},
};
use crate::{
    capture::OutcomePath,
    event::{Errno, EventKind, PortEvent, Protocol, Source},
    failures::{self, Agreement, EarlyChecks, Failure},
    rules,
    snapshot::{self, owners::Place},
    state::{EarlyBind, State},
};

impl Watcher {
    /// Applies a batch under one write lock, then publishes it (closes
    /// filled in with the endpoint the map knew). What the events need from
    /// `/proc` is read first ([`Watcher::prepare`]), so that no API request
    /// waits on it.
    pub(super) fn apply_all(&mut self, events: &mut [PortEvent]) {
        if events.is_empty() {
            return;
        }
        let prepared = self.prepare(events);
        let state = self.state.clone();
        let mut state = state
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let inferred = self.capture.outcome_path() == OutcomePath::Inferred;
        if inferred && let Some(newest) = events.iter().map(|e| e.boot_ns).max() {
            let since = newest.saturating_sub(LISTEN_FAILURE_WINDOW_NS);
            self.recent_listens.retain(|_, (_, at)| *at >= since);
        }
        for (event, prepared) in events.iter_mut().zip(prepared) {
            if inferred {
                self.read_failed_listen(&mut state, event);
            }
            fill_from_map(&state, event);
            infer_from_map(&state, event, prepared.early);
            self.apply(&mut state, event, prepared);
        }
        drop(state);
        // Copies only for live streams that exist (this runs per event).
        if self.events.receiver_count() == 0 {
            return;
        }
        for event in events.iter() {
            // A subscriber that left in between is not an error.
            let _ = self.events.send(Arc::new(event.clone()));
        }
    }

    /// Reads what `events` need from `/proc`, holding no lock (a writer
    /// queued behind a reader would hold up every API request): the first
    /// checks of a failed bind ([`early_checks`]: the thread's capabilities,
    /// against what the state's latest listing says of its namespace, taken
    /// under the read lock first) and where each process that binds,
    /// listens or fails lives. Read as the batch comes: a process that
    /// failed may exit at once, and its transient unit's cgroup go with it.
    fn prepare(&mut self, events: &[PortEvent]) -> Vec<Prepared> {
        let listed: Vec<Option<Listed>> = {
            let state = self.read_guard();
            events.iter().map(|event| listed(&state, event)).collect()
        };
        events
            .iter()
            .zip(listed)
            .map(|(event, listed)| Prepared {
                early: listed
                    .map_or_else(EarlyChecks::default, |listed| early_checks(event, listed)),
                place: has_place(event).then(|| self.cgroups.of(event.pid, event.cgroup_id)),
            })
            .collect()
    }

    /// Where outcomes are inferred, a listen that fails shows as its LISTEN
    /// transition, then the same socket falling back to CLOSE in the same
    /// thread at once (sent as a listen stop). Such a stop is the failure:
    /// the map takes it (the socket is bound and not listening either way),
    /// and the event becomes the failed listen, unresolved, whose errno the
    /// rules then infer. A `shutdown()` of a listener by the thread that
    /// made it, within [`LISTEN_FAILURE_WINDOW_NS`], reads the same.
    fn read_failed_listen(&mut self, state: &mut State, event: &mut PortEvent) {
        let Some(cookie) = event.cookie else {
            return;
        };
        match event.kind {
            EventKind::Listen => {
                self.recent_listens
                    .insert(cookie, (event.tid, event.boot_ns));
            }
            EventKind::Close => {
                self.recent_listens.remove(&cookie);
            }
            EventKind::ListenStop => {
                let Some((tid, at)) = self.recent_listens.remove(&cookie) else {
                    return;
                };
                if tid != event.tid || event.boot_ns.saturating_sub(at) > LISTEN_FAILURE_WINDOW_NS {
                    return;
                }
                fill_from_map(state, event);
                state
                    .map
                    .apply(event, self.clock.to_system_time(event.boot_ns));
                event.kind = EventKind::ListenFailed;
                event.errno = Some(Errno::UNKNOWN);
                event.source = Source::Unresolved;
            }
            _ => {}
        }
    }

    /// Applies one event, with what [`Watcher::prepare`] read for it.
    fn apply(&mut self, state: &mut State, event: &PortEvent, prepared: Prepared) {
        let Prepared { early, place } = prepared;
        let at = self.clock.to_system_time(event.boot_ns);
        // A failure whose errno the map could not infer is counted once
        // sock_diag has had its say (`resolve_failures`).
        if !event.errno_unknown() {
            state.counters.count(event);
        }
        match event.kind {
            EventKind::BindFailed | EventKind::ListenFailed | EventKind::ConnectFailed => {
                if event.kind == EventKind::ConnectFailed
                    || (event.errno == Some(Errno::EADDRINUSE) && event.port == 0)
                {
                    // A connect, bind(0) or listen() found no free port in
                    // the range: list the ranges now, not an interval later.
                    self.ephemeral.wake();
                }
                // Read now: a process that failed may exit at once, and its
                // transient unit's cgroup go with it.
                let failure = Failure {
                    time: at,
                    event: event.clone(),
                    blocked_by: failures::attribute(state.kernel, event, &state.map),
                    // A listen failure read from its fallback to CLOSE
                    // (`read_failed_listen`) had none read for it.
                    place: place.unwrap_or_else(|| self.cgroups.of(event.pid, event.cgroup_id)),
                    // The listing this failure asks for names it.
                    cause: None,
                };
                let awaits_listing =
                    event.errno_unknown() || failures::needs_diag(event, &failure.blocked_by);
                // What the map cannot decide, the listing that comes for
                // the failure may.
                let agreement = replay(state, event, None, early);
                let replay_later = awaits_listing && agreement == Some(Agreement::Undecided);
                if let Some(agreement) = agreement.filter(|_| !replay_later) {
                    state.counters.check_inference(agreement);
                }
                if awaits_listing {
                    self.unresolved.push(Awaiting {
                        failure,
                        replay_later,
                        early,
                    });
                } else {
                    state.failures.push(failure);
                }
            }
            EventKind::Connected => {
                if let (Some(cookie), Some(peer)) = (event.cookie, event.peer) {
                    if matches!(event.protocol, Protocol::Tcp | Protocol::Mptcp)
                        && state.map.bound_to_any_port(cookie)
                    {
                        let (address, port) = state
                            .map
                            .get(cookie)
                            .map_or((event.address, event.bound_port.unwrap_or(0)), |entry| {
                                (entry.facts.address, entry.facts.port)
                            });
                        state.record_early_bind(EarlyBind {
                            time: at,
                            netns: event.netns.unwrap_or(0),
                            pid: event.pid,
                            process: event.process.clone(),
                            address,
                            port,
                            peer,
                        });
                    }
                    state.map.apply(event, at);
                    // A connected UDP socket leaves the map, and its close
                    // need not be heard; a bound TCP one stays (its bind
                    // holds the port) until it closes.
                    if !rules::same_port_space(event.protocol, Protocol::Tcp) {
                        self.capture.untrack(cookie);
                    }
                }
            }
            EventKind::Listen if event.cookie.is_none() || event.port == 0 => {
                // A socket that listened without ever binding has no cookie
                // yet (nothing asked the kernel for one), so the map cannot
                // key it; or, where outcomes are inferred, its port, which
                // the kernel picks after the LISTEN transition that sent it:
                // a reconciliation, which knows both, picks it up now.
                self.next_reconcile = Instant::now();
            }
            _ => {
                state.map.apply(event, at);
                if matches!(event.kind, EventKind::Bind | EventKind::Listen)
                    && let Some(cookie) = event.cookie
                {
                    let place =
                        place.unwrap_or_else(|| self.cgroups.of(event.pid, event.cgroup_id));
                    state.map.set_place(cookie, place);
                }
            }
        }
    }

    /// Applies every event already waiting in the ring, without waiting.
    pub fn apply_pending(&mut self) -> usize {
        let mut events = Vec::new();
        self.capture.read_now(|event| events.push(event));
        self.apply_all(&mut events);
        events.len()
    }
}

/// A close (or listen stop) carries only the socket's cookie; the map knows
/// its endpoint, namespace and options.
fn fill_from_map(state: &State, event: &mut PortEvent) {
    if !matches!(event.kind, EventKind::Close | EventKind::ListenStop) {
        return;
    }
    let Some(entry) = event.cookie.and_then(|cookie| state.map.get(cookie)) else {
        return;
    };
    let facts = &entry.facts;
    event.address = facts.address;
    event.port = facts.port;
    event.bound_port = Some(facts.port);
    event.netns = event.netns.or(Some(facts.netns));
    if event.options == crate::event::Options::default() {
        event.options = facts.options.into();
    }
}

/// Where outcomes are inferred, how soon after its LISTEN transition a
/// socket's fall back to CLOSE, in the same thread, is read as its listen
/// failing: the kernel does it within microseconds, right after the port
/// check; the margin is for a preemption in between.
const LISTEN_FAILURE_WINDOW_NS: u64 = 5_000_000;

/// A bind or listen failure that no outcome hook completed gets the errno
/// the conflict rules infer against the map, when they can name one (see
/// [`failures::infer_errno`]); sock_diag is asked about the rest. One that
/// only set its address ([`failures::bound_without_a_port`]) is the success
/// the kernel reported no other way.
fn infer_from_map(state: &State, event: &mut PortEvent, early: EarlyChecks) {
    if failures::bound_without_a_port(event) {
        event.kind = EventKind::Bind;
        event.errno = None;
        event.bound_port = None;
        return;
    }
    if !event.errno_unknown() {
        return;
    }
    let request = failures::request_of(event);
    let existing = state
        .map
        .facts_on(request.netns, request.protocol, request.port);
    if let Some(errno) = failures::infer_errno(state.kernel, event, existing, &state.map, early) {
        event.errno = Some(errno);
    }
}

/// What the latest ephemeral listing read in the namespace of `event`, a
/// failed bind: whether its address is none of the namespace's, and the
/// namespace's `ip_unprivileged_port_start`. `None` for other events, and
/// for a namespace not listed yet.
struct Listed {
    address_unavailable: bool,
    unprivileged_start: Option<u16>,
}

fn listed(state: &State, event: &PortEvent) -> Option<Listed> {
    if event.kind != EventKind::BindFailed {
        return None;
    }
    let usage = state
        .ephemeral
        .as_ref()?
        .namespaces
        .iter()
        .find(|usage| Some(usage.netns) == event.netns)?;
    Some(Listed {
        address_unavailable: failures::address_unavailable(event, usage.local_addresses.as_ref()),
        unprivileged_start: usage.unprivileged_port_start,
    })
}

/// What the first checks of `event`, a failed bind, refused
/// ([`failures::EarlyChecks`]), from what the namespace's listing said and
/// the failing thread's capabilities, read now (only for a port below the
/// unprivileged start). Anything unknown (a thread already gone) leaves the
/// errno to the other checks.
fn early_checks(event: &PortEvent, listed: Listed) -> EarlyChecks {
    let start = listed.unprivileged_start;
    let caps = failures::privileged_port(event.port, start)
        .then(|| snapshot::owners::thread_capabilities(event.pid, event.tid))
        .flatten();
    EarlyChecks {
        address_unavailable: listed.address_unavailable,
        privileged: failures::refused_as_privileged(event.port, start, caps),
    }
}

/// What [`Watcher::prepare`] read for one event.
struct Prepared {
    early: EarlyChecks,
    /// Where the process lives, for the events that name it
    /// ([`has_place`]).
    place: Option<Place>,
}

/// Whether `apply` may record where `event`'s process lives: a failure, a
/// bind, a listen (each pid's place is cached, so one `apply` leaves
/// unused costs a lookup).
fn has_place(event: &PortEvent) -> bool {
    matches!(
        event.kind,
        EventKind::Bind
            | EventKind::Listen
            | EventKind::BindFailed
            | EventKind::ListenFailed
            | EventKind::ConnectFailed
    )
}
