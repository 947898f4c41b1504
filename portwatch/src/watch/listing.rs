//! The sock_diag listings after start-up: the owners and options of the
//! start-up listing, read after ready, and reconciliation, which corrects
//! the map from a fresh listing.

use std::time::{Instant, SystemTime};

use super::{WatchError, Watcher, release_freed_memory};
use crate::{
    map::{Correction, Drift, Observed, Reconciled},
    snapshot::{self, SnapshotConfig, SnapshotError, workload::Workloads},
};

impl Watcher {
    /// Reads the owners and options of the start-up listing's sockets into
    /// the map, if they are still pending. [`Watcher::run`] does it beside
    /// the pipeline; this is for callers that drive [`Watcher::step`].
    pub async fn read_owners(&mut self) {
        if let Some(reading) = self.owners_reader() {
            reading.await;
        }
    }

    /// The reading of the start-up listing's owners, on a blocking thread,
    /// merged into the state when done; it borrows nothing from the
    /// watcher, so the pipeline goes on meanwhile.
    pub(super) fn owners_reader(&mut self) -> Option<impl Future<Output = ()> + use<>> {
        let unowned = self.unowned.take()?;
        let state = self.state.clone();
        let workloads = self.workloads.clone();
        Some(async move {
            let started = Instant::now();
            let read = match tokio::task::spawn_blocking(move || unowned.read()).await {
                Ok(Ok(mut owned)) => {
                    workloads.name_shared(owned.observed.iter_mut().map(|seen| &mut seen.place));
                    Ok(owned)
                }
                Ok(Err(err)) => Err(err.to_string()),
                Err(err) => Err(err.to_string()),
            };
            let mut state = state
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let observed = match read {
                Ok(owned) => {
                    tracing::info!(
                        sockets = owned.observed.len(),
                        phases = ?owned.phases,
                        "owners of the start-up listing read"
                    );
                    for limit in owned.limits() {
                        tracing::warn!("{limit}");
                    }
                    state.stats.startup_owners = Some(started.elapsed());
                    owned.observed
                }
                Err(err) => {
                    // Said in /readyz until a reconciliation reads them;
                    // meanwhile the sockets' owners are unknown, as with
                    // read_owners = false.
                    tracing::warn!(
                        %err,
                        "cannot read the owners of the sockets found at start-up; the next reconciliation reads them"
                    );
                    state.owners_failure = Some(err);
                    Vec::new()
                }
            };
            state.map.attach_owners(observed);
            state.owners_pending = None;
            drop(state);
            release_freed_memory();
        })
    }

    /// Compares the map with a fresh sock_diag listing and corrects it.
    pub async fn reconcile(&mut self) -> Result<Drift, WatchError> {
        // Events already waiting describe changes from before the listing:
        // apply them first, so that only real drift is counted.
        self.apply_pending();
        let config = SnapshotConfig {
            read_owners: false,
            read_options: false,
            holders_only: true,
        };
        let started = Instant::now();
        // A start-up whose owners could not be read has them read here.
        let refresh = self.reconciles_without_owners + 1 >= OWNERS_REFRESH_EVERY
            || self.read_guard().owners_failure.is_some();
        let state = self.state.clone();
        let workloads = self.workloads.clone();
        let first_listing = !self.merged;
        let bound_tcp_listed = self.bound_tcp_listed;
        let listed = tokio::task::spawn_blocking(move || {
            let mut snapshot = snapshot::take(&config)?;
            let read = || {
                state
                    .read()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
            };
            // The owners scan reads every descriptor of every process, the
            // dearest part of a listing: only a socket the map does not
            // know needs it, and the holders of known ones are refreshed
            // every OWNERS_REFRESH_EVERY reconciliations.
            // `fresh`: listening or bound sockets new to the map, which the
            // kernel must start tracking; `unknown`: any other socket the
            // map does not have where the listing has it.
            let (fresh, unknown) = {
                let state = read();
                let mut fresh = Vec::new();
                let mut unknown = false;
                for socket in &snapshot.sockets {
                    match state.map.get(socket.facts.cookie) {
                        None if socket.facts.state.is_listening_or_bound() => {
                            fresh.push(socket.facts.cookie);
                        }
                        None => unknown = true,
                        Some(entry) => unknown |= entry.facts.port != socket.facts.port,
                    }
                }
                (fresh, unknown)
            };
            let owners_read = refresh || unknown || !fresh.is_empty();
            if owners_read {
                snapshot.attach_owners()?;
            }
            let observed = observed(&workloads, &mut snapshot);
            // Compared under the read lock, here: the API keeps answering,
            // and only what differs is written. The pipeline, which applies
            // events, waits for this listing meanwhile; should anything else
            // change the map first, the correction is refused (below).
            let correction = if first_listing {
                // The start-up listing failed: this is the first look at
                // what existed before portwatch started, not drift.
                read().map.plan_merge(observed)
            } else {
                read()
                    .map
                    .plan(observed, &snapshot.listed_netns(), bound_tcp_listed)
            };
            Ok::<_, SnapshotError>(Listed {
                correction,
                taken_at: snapshot.taken_at,
                owners_read,
                fresh,
            })
        })
        .await??;
        let owners_read = listed.owners_read;
        self.reconciles_without_owners = if owners_read {
            0
        } else {
            self.reconciles_without_owners + 1
        };
        self.listing_works();
        let untracked = self.capture.track_all(&listed.fresh);
        self.merged = true;
        let mut state = self.write();
        let done = state
            .map
            .correct(listed.correction, listed.taken_at)
            .unwrap_or_else(|| {
                tracing::warn!(
                    "the map changed while it was compared with a listing; that listing is set aside and the next reconciliation corrects what differs"
                );
                Reconciled::default()
            });
        let drift = done.drift;
        if owners_read {
            state.owners_failure = None;
        }
        let stats = &mut state.stats;
        stats.reconcile_snapshot = Some(started.elapsed());
        stats.untracked += untracked as u64;
        stats.reconciliations += 1;
        stats.drift.missing += drift.missing;
        stats.drift.stale += drift.stale;
        stats.drift.changed += drift.changed;
        drop(state);
        // Gone without a release the hooks saw (outside a `--cgroup`
        // subtree, kernel-owned, closed before it was tracked): the kernel
        // forgets them too, so TRACKED holds only live sockets.
        for cookie in done.removed {
            self.capture.untrack(cookie);
        }
        let lost = std::mem::take(&mut self.write().untrack_later);
        for cookie in lost {
            self.capture.untrack(cookie);
        }
        release_freed_memory();
        self.next_reconcile = Instant::now() + self.config.reconcile_every;
        if drift.total() > 0 {
            tracing::info!(?drift, "reconciliation corrected the map");
        }
        Ok(drift)
    }
}

/// Every this many reconciliations, the owners of every socket are read
/// again (a process that inherited a listener is seen as a holder); the
/// others read them only when the listing has a socket the map does not
/// know.
const OWNERS_REFRESH_EVERY: u32 = 10;

/// What a reconciliation's listing found, compared with the map on the
/// blocking thread that took it.
struct Listed {
    correction: Correction,
    taken_at: SystemTime,
    /// Whether the owners were read (then the refresh count starts again).
    owners_read: bool,
    /// Listening or bound sockets new to the map, for the kernel to track.
    fresh: Vec<u64>,
}

/// A listing's sockets as the map keeps them, their workloads named.
pub(super) fn observed(workloads: &Workloads, snapshot: &mut snapshot::Snapshot) -> Vec<Observed> {
    let mut observed = snapshot.take_observed();
    workloads.name_shared(observed.iter_mut().map(|seen| &mut seen.place));
    observed
}
