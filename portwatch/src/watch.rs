//! The live pipeline: kernel events, the start-up snapshot and periodic
//! reconciliation, kept in one [`PortMap`] with a [`FailureLog`].
//!
//! Start-up has no race: the programs are attached first, then the snapshot
//! is taken and merged; a socket that changes in between is seen by both, and
//! merging never forgets what an event said. Reconciliation runs every
//! `reconcile_every` and whenever the kernel counted a lost record.

use std::{
    net::IpAddr,
    time::{Duration, Instant, SystemTime},
};

use serde::Serialize;

use crate::{
    capture::{Capture, CaptureConfig, CaptureError},
    event::{BootClock, EventKind, PortEvent},
    explain::{self, PortExplanation},
    failures::{self, Failure, FailureLog},
    map::{Drift, Observed, PortMap},
    snapshot::{self, SnapshotConfig, SnapshotError},
    socket::{NetnsCookie, SockState},
};

/// How the pipeline runs.
#[derive(Clone, Debug)]
pub struct WatchConfig {
    pub capture: CaptureConfig,
    pub snapshot: SnapshotConfig,
    /// How often the map is checked against sock_diag (default 30 s).
    pub reconcile_every: Duration,
    /// How many failures are kept (default 10,000).
    pub failure_log: usize,
}

impl Default for WatchConfig {
    fn default() -> Self {
        WatchConfig {
            capture: CaptureConfig::default(),
            snapshot: SnapshotConfig::default(),
            reconcile_every: Duration::from_secs(30),
            failure_log: 10_000,
        }
    }
}

/// Why the pipeline stopped.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// Capture failed to start or read.
    #[error(transparent)]
    Capture(#[from] CaptureError),
    /// The snapshot (at start-up or for reconciliation) failed.
    #[error("snapshot: {0}")]
    Snapshot(#[from] SnapshotError),
    /// A blocking task was lost.
    #[error("background task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// Counters for metrics and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct WatchStats {
    /// Events applied, by the time they were read.
    pub events: u64,
    /// Reconciliations run, and the drift they corrected in total.
    pub reconciliations: u64,
    pub drift: Drift,
    /// What the last reconciliation corrected (0 once the map is exact).
    pub last_drift: Drift,
    /// Records the kernel lost (all hooks), as last read.
    pub dropped: u64,
    /// Cookies that could not be handed to the kernel's TRACKED map.
    pub untracked: u64,
}

/// The live map and everything that keeps it exact.
pub struct Watcher {
    capture: Capture,
    map: PortMap,
    failures: FailureLog,
    clock: BootClock,
    host_netns: NetnsCookie,
    localhost: Vec<IpAddr>,
    config: WatchConfig,
    stats: WatchStats,
    next_reconcile: Instant,
    /// Failures waiting for a sock_diag listing to be attributed.
    /// With what the map said at failure time, kept if the listing (which
    /// comes a little later) no longer shows the blocker.
    unresolved: Vec<(SystemTime, PortEvent, Vec<failures::Blocker>)>,
    last_diag: Instant,
    cgroups: CgroupCache,
}

/// The shortest time between two sock_diag listings made to attribute
/// failures.
const DIAG_INTERVAL: Duration = Duration::from_millis(250);

impl Watcher {
    /// Attaches the programs, then takes and merges the snapshot.
    /// Must run inside a tokio runtime.
    pub async fn start(config: WatchConfig) -> Result<Watcher, WatchError> {
        let capture = Capture::start(&config.capture)?;
        let host_netns = snapshot::netns_cookie_of_current_thread().unwrap_or(0);
        let mut watcher = Watcher {
            capture,
            map: PortMap::default(),
            failures: FailureLog::new(config.failure_log),
            clock: BootClock::now(),
            host_netns,
            localhost: explain::localhost_order(),
            next_reconcile: Instant::now() + config.reconcile_every,
            config,
            stats: WatchStats::default(),
            unresolved: Vec::new(),
            last_diag: Instant::now() - DIAG_INTERVAL,
            cgroups: CgroupCache::default(),
        };
        let snapshot_config = watcher.config.snapshot;
        let snapshot =
            tokio::task::spawn_blocking(move || snapshot::take(&snapshot_config)).await??;
        let observed = snapshot.observed();
        for seen in &observed {
            if matches!(seen.facts.state, SockState::Listening | SockState::Bound) {
                watcher.track(seen.facts.cookie);
            }
        }
        watcher.map.merge(observed, snapshot.taken_at);
        tracing::info!(
            sockets = watcher.map.len(),
            namespaces = snapshot.namespaces.len(),
            elapsed = ?snapshot.elapsed,
            "start-up snapshot merged"
        );
        Ok(watcher)
    }

    fn track(&mut self, cookie: u64) {
        if self.capture.track(cookie).is_err() {
            self.stats.untracked += 1;
        }
    }

    /// Waits for the next events (or the reconciliation deadline), applies
    /// them, and returns them. Reconciles when due or after a drop.
    pub async fn step(&mut self) -> Result<Vec<PortEvent>, WatchError> {
        let mut events = Vec::new();
        let mut wake = self.next_reconcile;
        if !self.unresolved.is_empty() {
            wake = wake.min(self.last_diag + DIAG_INTERVAL);
        }
        let deadline = tokio::time::Instant::from_std(wake);
        tokio::select! {
            read = self.capture.read(|event| events.push(event)) => read?,
            _ = tokio::time::sleep_until(deadline) => {}
        }
        for event in &events {
            self.apply(event);
        }
        self.stats.events += events.len() as u64;
        self.resolve_failures().await?;
        let dropped = self.dropped_total();
        let lost_something = dropped > self.stats.dropped;
        self.stats.dropped = dropped;
        if lost_something || Instant::now() >= self.next_reconcile {
            self.reconcile().await?;
        }
        Ok(events)
    }

    fn apply(&mut self, event: &PortEvent) {
        let at = self.clock.to_system_time(event.boot_ns);
        match event.kind {
            EventKind::BindFailed | EventKind::ListenFailed => {
                let blocked_by = failures::attribute(event, &self.map);
                if failures::needs_diag(event, &blocked_by) {
                    self.unresolved.push((at, event.clone(), blocked_by));
                    return;
                }
                self.failures.push(Failure {
                    time: at,
                    event: event.clone(),
                    blocked_by,
                });
            }
            EventKind::Listen if event.cookie.is_none() => {
                // A socket that listened without ever binding has no cookie
                // yet (nothing asked the kernel for one), so the map cannot
                // key it: a reconciliation, which does, picks it up now.
                self.next_reconcile = Instant::now();
            }
            _ => {
                self.map.apply(event, at);
                if matches!(event.kind, EventKind::Bind | EventKind::Listen)
                    && let Some(cookie) = event.cookie
                {
                    let place = self.cgroups.of(event.pid);
                    self.map
                        .set_place(cookie, place.cgroup, place.unit, place.container);
                }
            }
        }
    }

    /// Attributes the failures the map alone could not explain, against
    /// sock_diag now (TIME_WAIT and connected sockets included). At most one
    /// listing per [`DIAG_INTERVAL`], so an EADDRINUSE storm costs one listing
    /// per interval, not one per failure.
    async fn resolve_failures(&mut self) -> Result<(), WatchError> {
        if self.unresolved.is_empty() || self.last_diag.elapsed() < DIAG_INTERVAL {
            return Ok(());
        }
        self.last_diag = Instant::now();
        let config = SnapshotConfig {
            read_owners: true,
            read_options: false,
        };
        let snapshot = tokio::task::spawn_blocking(move || snapshot::take(&config)).await??;
        let observed = snapshot.observed();
        for (time, event, from_map) in std::mem::take(&mut self.unresolved) {
            let request = failures::request_of(&event);
            let here: Vec<&Observed> = observed
                .iter()
                .filter(|o| {
                    o.facts.netns == request.netns
                        && o.facts.protocol == request.protocol
                        && o.facts.port == request.port
                })
                .collect();
            let existing = here.iter().map(|o| o.facts.clone()).collect();
            let mut blocked_by = failures::attribute_against(&event, existing, &self.map);
            for blocker in blocked_by.iter_mut().filter(|b| b.holders.is_empty()) {
                if let Some(seen) = here.iter().find(|o| o.facts == blocker.facts) {
                    blocker.holders = failures::holders_of(seen);
                }
            }
            if blocked_by.is_empty() {
                blocked_by = from_map;
            }
            self.failures.push(Failure {
                time,
                event,
                blocked_by,
            });
        }
        Ok(())
    }

    /// Applies every event already waiting in the ring, without waiting.
    pub fn apply_pending(&mut self) -> usize {
        let mut events = Vec::new();
        self.capture.read_now(|event| events.push(event));
        for event in &events {
            self.apply(event);
        }
        self.stats.events += events.len() as u64;
        events.len()
    }

    fn dropped_total(&self) -> u64 {
        self.capture
            .drops()
            .map(|drops| drops.iter().map(|(_, n)| n).sum())
            .unwrap_or(self.stats.dropped)
    }

    /// Compares the map with a fresh sock_diag listing and corrects it.
    pub async fn reconcile(&mut self) -> Result<Drift, WatchError> {
        // Events already waiting describe changes from before the listing:
        // apply them first, so that only real drift is counted.
        self.apply_pending();
        let config = SnapshotConfig {
            read_owners: true,
            read_options: false,
        };
        let snapshot = tokio::task::spawn_blocking(move || snapshot::take(&config)).await??;
        let observed = snapshot.observed();
        for seen in &observed {
            if self.map.get(seen.facts.cookie).is_none()
                && matches!(seen.facts.state, SockState::Listening | SockState::Bound)
            {
                self.track(seen.facts.cookie);
            }
        }
        let drift = self.map.reconcile(observed, snapshot.taken_at);
        self.stats.reconciliations += 1;
        self.stats.last_drift = drift;
        self.stats.drift.missing += drift.missing;
        self.stats.drift.stale += drift.stale;
        self.stats.drift.changed += drift.changed;
        self.next_reconcile = Instant::now() + self.config.reconcile_every;
        if drift.total() > 0 {
            tracing::info!(?drift, "reconciliation corrected the map");
        }
        Ok(drift)
    }

    /// The map.
    pub fn map(&self) -> &PortMap {
        &self.map
    }

    /// Recent failures, newest first.
    pub fn failures(&self) -> impl Iterator<Item = &Failure> {
        self.failures.newest()
    }

    /// Failures still waiting for a sock_diag listing to name their blockers.
    pub fn unresolved_failures(&self) -> usize {
        self.unresolved.len()
    }

    /// The explanation of one port.
    pub fn explain(&self, port: u16) -> PortExplanation {
        explain::explain(
            port,
            &self.map.listeners_on(port),
            self.host_netns,
            &self.localhost,
        )
    }

    pub fn stats(&self) -> WatchStats {
        self.stats
    }

    /// The capture underneath (hook paths, drops).
    pub fn capture(&self) -> &Capture {
        &self.capture
    }

    /// The wall-clock time of a kernel timestamp.
    pub fn time_of(&self, boot_ns: u64) -> SystemTime {
        self.clock.to_system_time(boot_ns)
    }
}

/// Where a process lives (cgroup path, systemd unit, container), remembered
/// per pid so that a burst of binds reads `/proc/<pid>/cgroup` once.
#[derive(Default)]
struct CgroupCache {
    known: std::collections::HashMap<u32, Place>,
}

#[derive(Clone, Default)]
struct Place {
    cgroup: Option<String>,
    unit: Option<String>,
    container: Option<String>,
}

impl CgroupCache {
    /// Pids remembered at most; the cache starts over past this.
    const CAPACITY: usize = 4096;

    fn of(&mut self, pid: u32) -> Place {
        if let Some(place) = self.known.get(&pid) {
            return place.clone();
        }
        let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        let cgroup = snapshot::owners::cgroup_path(&text).map(str::to_owned);
        let place = Place {
            unit: cgroup
                .as_deref()
                .and_then(snapshot::owners::systemd_unit)
                .map(str::to_owned),
            container: cgroup
                .as_deref()
                .and_then(snapshot::owners::container_id)
                .map(str::to_owned),
            cgroup,
        };
        if self.known.len() >= Self::CAPACITY {
            self.known.clear();
        }
        self.known.insert(pid, place.clone());
        place
    }
}
