//! Lists each namespace's ephemeral port use into the state, beside the
//! pipeline: every `ephemeral_interval`, and soon after a failure that
//! found no free port.

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tokio::sync::Notify;

use super::SharedState;
use crate::{
    capture::ConnectCounter,
    snapshot::{self, workload::Workloads},
};

/// The least time between two ephemeral listings, however many failures
/// ask for one.
const EPHEMERAL_MIN_GAP: Duration = Duration::from_secs(1);

/// Lists every namespace's ephemeral port use into the state: once at
/// start, then every interval and when `wake` is notified (at most once per
/// [`EPHEMERAL_MIN_GAP`]). Runs beside the pipeline, on a blocking thread,
/// so a long listing never holds up events.
#[derive(Clone)]
pub(super) struct EphemeralLister {
    state: SharedState,
    workloads: Arc<Workloads>,
    /// The kernel's count of new connections per namespace.
    connects: Arc<ConnectCounter>,
    /// Asks for a listing before the interval ends (a failure did).
    wake: Arc<Notify>,
    /// Whether the last listing failed (said once, until one works).
    failing: Arc<AtomicBool>,
}

impl EphemeralLister {
    pub(super) fn new(
        state: SharedState,
        workloads: Arc<Workloads>,
        connects: Arc<ConnectCounter>,
    ) -> EphemeralLister {
        EphemeralLister {
            state,
            workloads,
            connects,
            wake: Arc::new(Notify::new()),
            failing: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Asks for a listing now, not an interval later.
    pub(super) fn wake(&self) {
        self.wake.notify_one();
    }

    /// Lists every `every`, or sooner when woken, forever.
    pub(super) async fn run(self, every: Duration) {
        loop {
            let listed = tokio::time::Instant::now();
            tokio::select! {
                () = tokio::time::sleep_until(listed + every) => {}
                () = self.wake.notified() => {
                    // Only a wake waits out the gap, so a timed listing
                    // costs one wakeup.
                    tokio::time::sleep_until(listed + EPHEMERAL_MIN_GAP).await;
                }
            }
            self.list_once().await;
        }
    }

    /// One listing into the state; `/ephemeral` keeps the last that worked.
    pub(super) async fn list_once(&self) {
        let (state, failing) = (&self.state, &self.failing);
        // The sockets bound before they connected: the listing says which
        // still exist, since a lost close would keep one forever.
        // And each namespace's TCP listening ports, whose accepted
        // connections take no port from the range.
        let (wanted, listening) = {
            let state = state
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let wanted: HashSet<u64> = state
                .map
                .connected_binds()
                .map(|entry| entry.facts.cookie)
                .collect();
            (wanted, state.map.tcp_listening_ports())
        };
        match tokio::task::spawn_blocking(move || snapshot::ephemeral::list(&wanted, &listening))
            .await
        {
            Ok(Ok(mut listing)) => {
                self.workloads
                    .name_all(listing.namespaces.iter_mut().map(|ns| &mut ns.place));
                if failing.swap(false, Ordering::Relaxed) {
                    tracing::info!("the ephemeral port listing works again");
                }
                // The kernel counts in every namespace: one it has no entry
                // for has made no connection yet.
                let counts = self.connects.read();
                for ns in &mut listing.namespaces {
                    ns.connects = Some(counts.get(&ns.netns).copied().unwrap_or(0));
                }
                let mut state = state
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if let Some(previous) = &state.ephemeral {
                    let seconds = listing
                        .taken_at
                        .duration_since(previous.taken_at)
                        .map_or(0.0, |gap| gap.as_secs_f64());
                    let before: HashMap<u64, &snapshot::ephemeral::NetnsUsage> = previous
                        .namespaces
                        .iter()
                        .map(|ns| (ns.netns, ns))
                        .collect();
                    for ns in &mut listing.namespaces {
                        if let Some(before) = before.get(&ns.netns) {
                            ns.trend = ns.trend_since(before, seconds);
                        }
                    }
                }
                for ns in &listing.namespaces {
                    let gone = state.map.forget_connected_binds(ns.netns, &ns.seen);
                    state.untrack_later.extend(gone);
                }
                state.ephemeral = Some(listing);
                state.explain_connect_failures();
            }
            Ok(Err(err)) => {
                if !failing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(error = %err, "the ephemeral port listing failed; /ephemeral keeps the last one, and it is tried again every ephemeral_interval");
                }
            }
            Err(err) => tracing::warn!(error = %err, "the ephemeral port listing stopped"),
        }
    }
}
