//! Failures the map alone could not explain, attributed against a
//! sock_diag listing taken for them (at most one per [`DIAG_INTERVAL`]);
//! and the check of inferred errnos against the kernel's.

use std::time::{Duration, Instant};

use super::{WatchError, Watcher, listing::observed};
use crate::{
    event::{ErrnoSource, EventKind, PortEvent},
    failures::{self, Agreement, EarlyChecks, Failure},
    map::Observed,
    rules,
    snapshot::{self, SnapshotConfig},
    socket::SocketFacts,
    state::State,
};

impl Watcher {
    /// Attributes the failures the map alone could not explain, against
    /// sock_diag now (TIME_WAIT and connected sockets included). At most one
    /// listing per [`DIAG_INTERVAL`], so an EADDRINUSE storm costs one listing
    /// per interval, not one per failure.
    pub(super) async fn resolve_failures(&mut self) -> Result<(), WatchError> {
        if self.unresolved.is_empty() || self.last_diag.elapsed() < DIAG_INTERVAL {
            return Ok(());
        }
        self.last_diag = Instant::now();
        // Connections and TIME_WAIT block binds too: the whole table.
        let config = SnapshotConfig {
            read_owners: true,
            read_options: false,
            holders_only: false,
        };
        let mut snapshot =
            match tokio::task::spawn_blocking(move || snapshot::take(&config)).await? {
                Ok(snapshot) => snapshot,
                Err(err) => {
                    // Attributed from the map alone, rather than lost.
                    self.listing_failed(&err);
                    let unresolved = std::mem::take(&mut self.unresolved);
                    let mut state = self.write();
                    for Awaiting {
                        failure,
                        replay_later,
                        ..
                    } in unresolved
                    {
                        if failure.event.errno_unknown() {
                            state.counters.count(&failure.event);
                        }
                        if replay_later {
                            state.counters.check_inference(Agreement::Undecided);
                        }
                        state.failures.push(failure);
                    }
                    return Ok(());
                }
            };
        self.listing_works();
        if !self.merged {
            // The first listing that works since a failed start: merge the
            // map with a full reconciliation now, not a reconcile_interval
            // after the daemon has stopped saying it is degraded.
            self.next_reconcile = Instant::now();
        }
        let observed = observed(&self.workloads, &mut snapshot);
        let unresolved = std::mem::take(&mut self.unresolved);
        let mut state = self.write();
        for Awaiting {
            mut failure,
            replay_later,
            early,
        } in unresolved
        {
            let request = failures::request_of(&failure.event);
            let here: Vec<&Observed> = observed
                .iter()
                .filter(|o| {
                    o.facts.netns == request.netns
                        && rules::same_port_space(o.facts.protocol, request.protocol)
                        && o.facts.port == request.port
                })
                .collect();
            let existing: Vec<_> = here.iter().map(|o| o.facts.clone()).collect();
            if failure.event.errno_unknown() {
                let inferred = failures::infer_errno(
                    state.kernel,
                    &failure.event,
                    existing.clone(),
                    &state.map,
                    early,
                );
                failure.event.errno = inferred.or(failure.event.errno);
                state.counters.count(&failure.event);
            } else if replay_later
                && let Some(agreement) =
                    replay(&state, &failure.event, Some(existing.clone()), early)
            {
                state.counters.check_inference(agreement);
            }
            let event = &failure.event;
            let mut blocked_by =
                failures::attribute_against(state.kernel, event, existing, &state.map);
            for blocker in blocked_by.iter_mut().filter(|b| b.holders.is_empty()) {
                if let Some(seen) = here.iter().find(|o| o.facts == blocker.facts) {
                    blocker.holders = failures::holders_of(seen);
                }
            }
            if !blocked_by.is_empty() {
                failure.blocked_by = blocked_by;
            }
            state.failures.push(failure);
        }
        Ok(())
    }
}

/// The shortest time between two sock_diag listings made to attribute
/// failures.
pub(super) const DIAG_INTERVAL: Duration = Duration::from_millis(250);

/// A failure waiting for a sock_diag listing.
pub(super) struct Awaiting {
    pub(super) failure: Failure,
    /// The map could not replay its errno: the listing is asked too.
    pub(super) replay_later: bool,
    /// What the first checks refused (`early_checks`, in `apply.rs`).
    pub(super) early: EarlyChecks,
}

/// For a bind or listen failure whose errno the kernel reported: whether
/// the rules' replay, against `existing` (the sock_diag listing it is
/// attributed against; the map's sockets when `None`), names the same
/// errno, which is what portwatch infers where no outcome hook runs. `None`
/// for other events.
pub(super) fn replay(
    state: &State,
    event: &PortEvent,
    existing: Option<Vec<SocketFacts>>,
    early: EarlyChecks,
) -> Option<Agreement> {
    let reported = event
        .errno
        .filter(|_| event.errno_source() == Some(ErrnoSource::Kernel))?;
    if !matches!(event.kind, EventKind::BindFailed | EventKind::ListenFailed) {
        return None;
    }
    let existing = existing.unwrap_or_else(|| {
        let request = failures::request_of(event);
        state
            .map
            .facts_on(request.netns, request.protocol, request.port)
    });
    let inferred = failures::infer_errno(state.kernel, event, existing, &state.map, early);
    let agreement = Agreement::of(inferred, reported);
    if agreement == Agreement::Disagree {
        tracing::debug!(
            reported = %reported,
            inferred = ?inferred,
            endpoint = %event.requested_endpoint(),
            cookie = ?event.cookie,
            "the conflict rules' replay of a failure names another errno than the kernel's"
        );
    }
    Some(agreement)
}
