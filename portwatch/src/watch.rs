//! The live pipeline: kernel events, the start-up snapshot and periodic
//! reconciliation, kept in one shared [`State`] that the HTTP API and the
//! metrics read.
//!
//! Start-up has no race: the programs are attached first, then the snapshot
//! is taken and merged; a socket that changes in between is seen by both, and
//! merging never forgets what an event said. Reconciliation runs every
//! `reconcile_every` and whenever the kernel counted a lost record.
//!
//! The state's lock is only held to apply a batch or to answer a reader;
//! never across an await, a snapshot or a ring-buffer wait.

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc, RwLock, RwLockReadGuard, RwLockWriteGuard,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use tokio::sync::{Notify, broadcast};

use crate::{
    capture::{Capture, CaptureConfig, CaptureError, ConnectCounter, OutcomePath},
    event::{BootClock, Errno, ErrnoSource, EventKind, PortEvent, Protocol, Source},
    explain,
    failures::{self, Agreement, EarlyChecks, Failure},
    health::ListingFailure,
    kernel_probe,
    map::{Correction, Drift, Observed, Reconciled},
    rules::{self, KernelRules},
    snapshot::{
        self, SnapshotConfig, SnapshotError, Unowned,
        owners::{Place, PlaceCache},
        workload::{WorkloadRoots, Workloads},
    },
    socket::SocketFacts,
    state::{EarlyBind, ExpectedListener, State},
};

/// How the pipeline runs.
#[derive(Clone, Debug)]
pub struct WatchConfig {
    pub capture: CaptureConfig,
    pub snapshot: SnapshotConfig,
    /// How often the map is checked against sock_diag (default 30 s).
    pub reconcile_every: Duration,
    /// How often ephemeral port use is listed (default 15 s).
    pub ephemeral_every: Duration,
    /// How many failures are kept (default 10,000).
    pub failure_log: usize,
    /// How many distinct explicit ports the per-port failure counter keeps
    /// before counting the rest as `other` (default 1,000).
    pub port_label_cap: usize,
    /// Ports whose listeners in the daemon's namespace are always reported.
    pub expected: Vec<ExpectedListener>,
    /// Where the node's files name containers and pods.
    pub workloads: WorkloadRoots,
}

impl Default for WatchConfig {
    fn default() -> Self {
        WatchConfig {
            capture: CaptureConfig::default(),
            snapshot: SnapshotConfig::default(),
            reconcile_every: Duration::from_secs(30),
            ephemeral_every: Duration::from_secs(15),
            failure_log: 10_000,
            port_label_cap: 1_000,
            expected: Vec::new(),
            workloads: WorkloadRoots::default(),
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

/// The state, shared between the pipeline and its readers.
pub type SharedState = Arc<RwLock<State>>;

/// Whether the pipeline is making progress, for the systemd watchdog: it
/// is either waiting for the kernel (healthy however long that lasts) or
/// busy with one step since some instant. A step that never ends (a hung
/// netlink call, a lock never released) shows as a growing [`stuck_for`].
///
/// [`stuck_for`]: Heartbeat::stuck_for
#[derive(Debug)]
pub struct Heartbeat {
    origin: Instant,
    /// Milliseconds after `origin` plus one when the current step began;
    /// 0 while waiting.
    busy_since: AtomicU64,
}

impl Heartbeat {
    fn new() -> Heartbeat {
        Heartbeat {
            origin: Instant::now(),
            busy_since: AtomicU64::new(0),
        }
    }

    fn busy(&self) {
        let ms = self.origin.elapsed().as_millis() as u64;
        self.busy_since.store(ms + 1, Ordering::Relaxed);
    }

    fn idle(&self) {
        self.busy_since.store(0, Ordering::Relaxed);
    }

    /// How long the current step has run; zero while waiting for events.
    pub fn stuck_for(&self) -> Duration {
        match self.busy_since.load(Ordering::Relaxed) {
            0 => Duration::ZERO,
            since => self
                .origin
                .elapsed()
                .saturating_sub(Duration::from_millis(since - 1)),
        }
    }
}

/// How many events a slow live-stream subscriber may fall behind before it
/// misses some (it is told how many).
const EVENT_CHANNEL: usize = 4096;

/// The shortest time between two sock_diag listings made to attribute
/// failures.
const DIAG_INTERVAL: Duration = Duration::from_millis(250);

/// How often the kernel's drop counters are read when no records arrive (a
/// batch of records reads them at once, and so does every reconciliation).
/// Only drops of a full bookkeeping map can come without records (a storm of
/// connects that all succeed); this check finds them within its period.
const DROP_CHECK: Duration = Duration::from_secs(30);

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

/// The pipeline: owns the kernel side, writes the shared state.
pub struct Watcher {
    capture: Capture,
    state: SharedState,
    events: broadcast::Sender<Arc<PortEvent>>,
    clock: BootClock,
    config: WatchConfig,
    next_reconcile: Instant,
    next_drop_check: Instant,
    /// Failures waiting for a sock_diag listing to be attributed, with what
    /// the map said at failure time as their `blocked_by` (kept if the
    /// listing, which comes a little later, no longer shows the blocker).
    unresolved: Vec<Awaiting>,
    /// Where outcomes are inferred: the sockets that entered LISTEN within
    /// the last [`LISTEN_FAILURE_WINDOW_NS`], with the thread and time.
    recent_listens: HashMap<u64, (u32, u64)>,
    /// Where outcomes are inferred: when `PENDING_BIND` is next swept, how
    /// long after the last sweep ([`sweep_interval`]), and whether records
    /// came since.
    next_sweep: Instant,
    sweep_every: Duration,
    records_since_sweep: bool,
    /// The (thread, time) of the binds the last sweep took, whose copy the
    /// kernel may also send (a thread that came back in between).
    swept: HashSet<(u32, u64)>,
    last_diag: Instant,
    cgroups: PlaceCache,
    /// Names the workloads of the places listings report (events' places
    /// are named by `cgroups`, which shares it).
    workloads: Arc<Workloads>,
    heartbeat: Arc<Heartbeat>,
    /// Whether sock_diag lists TCP sockets that are bound but not listening
    /// (Linux 6.7+); without it, reconciliation leaves those entries alone.
    bound_tcp_listed: bool,
    /// The kind of the last sock_diag listing failure, while listings
    /// fail: said once, until the kind changes or listings work again (the
    /// text may name a path that differs each time).
    listing_failed: Option<std::mem::Discriminant<SnapshotError>>,
    /// Whether a listing has been merged (at start-up, or by the first
    /// reconciliation that worked after a failed start).
    merged: bool,
    /// Reconciliations in a row that found every socket known and so did
    /// not look for owners.
    reconciles_without_owners: u32,
    /// Lists ephemeral port use into the state, beside the pipeline.
    ephemeral: EphemeralLister,
    /// The start-up listing's sockets, until their owners are read (after
    /// ready, beside the pipeline: [`Watcher::read_owners`]).
    unowned: Option<Unowned>,
}

/// The cgroup2 mount the paths of `/proc/<pid>/cgroup` are under.
fn cgroup2_mount() -> Option<std::path::PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    crate::capture::system::cgroup2_mount(&mounts)
}

impl Watcher {
    /// Attaches the programs, then takes and merges the listing; the state
    /// is ready when this returns. The listing's owners and options are read
    /// after, by [`Watcher::run`] (or [`Watcher::read_owners`]): until then
    /// its sockets are `owners_pending`. Must run inside a tokio runtime.
    pub async fn start(config: WatchConfig) -> Result<Watcher, WatchError> {
        // What capture needs is checked first, so a broken environment is
        // refused in one line before anything else runs.
        Capture::check_environment(&config.capture)?;
        // The probes make binds of their own (some refused on purpose), so
        // they run before the programs attach: the daemon must not report
        // itself. Bounded (kernel_probe::TIMEOUT), on threads of their own.
        let probed = tokio::task::spawn_blocking(kernel_probe::probe).await;
        let bound_tcp_listed = tokio::task::spawn_blocking(probe_bound_tcp_listing)
            .await
            .unwrap_or(false);
        let capture = Capture::start(&config.capture)?;
        let mut state = State::new(config.failure_log, config.port_label_cap);
        state.kernel = probed.map_or(KernelRules::UNKNOWN, |report| report.rules);
        state.host_netns = snapshot::netns_cookie_of_current_thread().unwrap_or(0);
        state.localhost = explain::localhost_order();
        state.ephemeral_range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|range| snapshot::ephemeral::PortRange::parse(&range))
            .unwrap_or(crate::state::LINUX_EPHEMERAL_RANGE);
        state.hooks = capture.hooks();
        state.expected = config.expected.clone();
        let (events, _) = broadcast::channel(EVENT_CHANNEL);
        let workloads = Arc::new(Workloads::new(config.workloads.clone()));
        let cgroups = PlaceCache::new(cgroup2_mount(), workloads.clone());
        let state_handle: SharedState = Arc::new(RwLock::new(state));
        let lister_workloads = workloads.clone();
        let connects = capture.connect_counter();
        let mut watcher = Watcher {
            capture,
            state: state_handle.clone(),
            events,
            clock: BootClock::now(),
            next_reconcile: Instant::now() + config.reconcile_every,
            next_drop_check: Instant::now(),
            config,
            unresolved: Vec::new(),
            recent_listens: HashMap::new(),
            next_sweep: Instant::now() + SWEEP_EVERY,
            sweep_every: SWEEP_EVERY,
            records_since_sweep: false,
            swept: HashSet::new(),
            last_diag: Instant::now() - DIAG_INTERVAL,
            cgroups,
            workloads,
            heartbeat: Arc::new(Heartbeat::new()),
            bound_tcp_listed,
            listing_failed: None,
            merged: false,
            reconciles_without_owners: 0,
            unowned: None,
            ephemeral: EphemeralLister {
                state: state_handle.clone(),
                workloads: Arc::clone(&lister_workloads),
                connects,
                wake: Arc::new(Notify::new()),
                failing: Arc::new(AtomicBool::new(false)),
            },
        };
        // Ready means every answer is there, `/ephemeral`'s too. The listing
        // needs nothing from the snapshot: held ports are read from the map
        // when asked.
        watcher.ephemeral.list_once().await;
        let wanted = watcher.config.snapshot;
        // Ready needs the sockets, not their processes: the owners (a pass
        // over every descriptor of every process) and the options read
        // through them come after.
        let listing = SnapshotConfig {
            read_owners: false,
            // Without owners, options cannot be read: the listing counts
            // them as unreadable (and says so) only when nothing follows.
            read_options: wanted.read_options && !wanted.read_owners,
            ..wanted
        };
        let started = Instant::now();
        let mut snapshot =
            match tokio::task::spawn_blocking(move || snapshot::take(&listing)).await? {
                Ok(snapshot) => snapshot,
                Err(err) => {
                    // Live events still work: say what is missing and go on.
                    watcher.listing_failed(&err);
                    watcher.write().ready = true;
                    return Ok(watcher);
                }
            };
        let unowned = wanted
            .read_owners
            .then(|| snapshot.unowned(wanted.read_options))
            .filter(|unowned| !unowned.is_empty());
        let observed = observed(&watcher.workloads, &mut snapshot);
        let holding: Vec<u64> = observed
            .iter()
            .filter(|seen| seen.facts.state.is_listening_or_bound())
            .map(|seen| seen.facts.cookie)
            .collect();
        let untracked = watcher.capture.track_all(&holding) as u64;
        drop(holding);
        if watcher.update_drops() {
            // Lost while the listing was taken: check the merge at once.
            watcher.next_reconcile = Instant::now();
        }
        watcher.merged = true;
        let mut state = watcher.write();
        if let Some(unowned) = &unowned {
            state.map.merge_unowned(observed, snapshot.taken_at);
            state.owners_pending = Some(unowned.len());
        } else {
            state.map.merge(observed, snapshot.taken_at);
        }
        let took = started.elapsed();
        state.stats.untracked += untracked;
        state.stats.startup_snapshot = Some(took);
        state.ready = true;
        tracing::info!(
            sockets = state.map.len(),
            namespaces = snapshot.namespaces.len(),
            snapshot = ?snapshot.elapsed,
            phases = ?snapshot.phases,
            with_merge = ?took,
            "start-up snapshot merged"
        );
        for limit in snapshot.limits() {
            tracing::warn!("{limit}");
        }
        drop(state);
        drop(snapshot);
        watcher.unowned = unowned;
        release_freed_memory();
        Ok(watcher)
    }

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
    fn owners_reader(&mut self) -> Option<impl Future<Output = ()> + use<>> {
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

    /// The shared state, for readers (HTTP, metrics).
    pub fn state(&self) -> SharedState {
        self.state.clone()
    }

    /// The pipeline's progress, for the systemd watchdog.
    pub fn heartbeat(&self) -> Arc<Heartbeat> {
        self.heartbeat.clone()
    }

    /// The clock that turns the events' boot times into wall time.
    pub fn clock(&self) -> BootClock {
        self.clock
    }

    /// A sender for the live stream, to subscribe later.
    pub fn event_sender(&self) -> broadcast::Sender<Arc<PortEvent>> {
        self.events.clone()
    }

    /// Reads the state under its lock.
    pub fn read<T>(&self, f: impl FnOnce(&State) -> T) -> T {
        f(&self
            .state
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.state
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Runs the pipeline until `stop` resolves.
    pub async fn run(mut self, stop: impl Future<Output = ()>) -> Result<(), WatchError> {
        let ephemeral = self.ephemeral.clone().run(self.config.ephemeral_every);
        let owners = self.owners_reader();
        let mut owners_read = owners.is_none();
        let owners = async move {
            if let Some(reading) = owners {
                reading.await;
            }
        };
        tokio::pin!(stop);
        tokio::pin!(ephemeral);
        tokio::pin!(owners);
        loop {
            tokio::select! {
                step = self.step() => { step?; }
                () = &mut ephemeral => {}
                () = &mut owners, if !owners_read => owners_read = true,
                () = &mut stop => return Ok(()),
            }
        }
    }

    /// Waits for the next events (or a deadline), applies them, and returns
    /// them. Reconciles when due or after a drop.
    pub async fn step(&mut self) -> Result<Vec<PortEvent>, WatchError> {
        let mut events = Vec::new();
        let mut wake = self.next_reconcile.min(self.drop_check_due());
        if !self.unresolved.is_empty() {
            wake = wake.min(self.last_diag + DIAG_INTERVAL);
        }
        if self.capture.outcome_path() == OutcomePath::Inferred {
            wake = wake.min(self.next_sweep);
        }
        let deadline = tokio::time::Instant::from_std(wake);
        tokio::select! {
            read = self.capture.read(|event| events.push(event)) => read?,
            _ = tokio::time::sleep_until(deadline) => {}
        }
        self.heartbeat.busy();
        let processed = self.process(events).await;
        self.heartbeat.idle();
        processed
    }

    /// One step's work once it woke: apply, attribute, count drops,
    /// reconcile when due.
    async fn process(&mut self, mut events: Vec<PortEvent>) -> Result<Vec<PortEvent>, WatchError> {
        self.sweep_parked_binds(&mut events);
        self.apply_all(&mut events);
        self.resolve_failures().await?;
        let now = Instant::now();
        // Records arrive with the drops of a full ring; other drops (a full
        // bookkeeping map) may come alone, so the counters are also read at
        // each reconciliation and on a slow timer.
        let reconcile_due = now >= self.next_reconcile;
        let lost_something = (!events.is_empty() || reconcile_due || now >= self.drop_check_due())
            && self.update_drops();
        if lost_something || reconcile_due {
            match self.reconcile().await {
                Err(WatchError::Snapshot(err)) => {
                    self.listing_failed(&err);
                    self.next_reconcile = Instant::now() + self.config.reconcile_every;
                }
                other => {
                    other?;
                }
            }
        }
        Ok(events)
    }

    /// Where outcomes are inferred, every [`SWEEP_EVERY`]: the binds a thread
    /// parked and never came back for (it exited, another thread closed the
    /// socket, or it waits on something else) are failures; they join
    /// `events`. The kernel's own copy of one of them, from a thread that
    /// came back just then, is dropped.
    fn sweep_parked_binds(&mut self, events: &mut Vec<PortEvent>) {
        let mut swept = Vec::new();
        let inferred = self.capture.outcome_path() == OutcomePath::Inferred;
        if inferred && !events.is_empty() {
            self.records_since_sweep = true;
            // Binds come again: back to the short interval at once.
            self.sweep_every = SWEEP_EVERY;
            self.next_sweep = self.next_sweep.min(Instant::now() + SWEEP_EVERY);
        }
        if inferred && Instant::now() >= self.next_sweep {
            swept = self.capture.sweep_parked_binds(SWEEP_AGE);
            let busy = self.records_since_sweep || !swept.is_empty();
            self.sweep_every = sweep_interval(self.sweep_every, busy);
            self.next_sweep = Instant::now() + self.sweep_every;
            self.records_since_sweep = false;
            // A copy from an earlier sweep has come by now: the kernel sends
            // it as it removes the entry, a sweep ago.
            self.swept = swept.iter().map(|e| (e.tid, e.boot_ns)).collect();
        }
        if !self.swept.is_empty() {
            events.retain(|e| {
                !(e.kind == EventKind::BindFailed && self.swept.contains(&(e.tid, e.boot_ns)))
            });
        }
        events.append(&mut swept);
    }

    /// A sock_diag listing failed (no SO_NETNS_COOKIE before Linux 5.14, the
    /// diag modules not loaded, ...): the map goes on from live events
    /// alone, and the next listing is tried when it is due. Said once per
    /// distinct reason.
    fn listing_failed(&mut self, err: &SnapshotError) {
        let failure = ListingFailure::of(err);
        let kind = std::mem::discriminant(err);
        if self.listing_failed != Some(kind) {
            let advice = failure
                .advice()
                .map(|a| format!("; {a}"))
                .unwrap_or_default();
            tracing::warn!(
                error = %err,
                "the sock_diag listing failed: portwatch goes on with live events alone, so sockets made before it started are not listed and the map is not checked against the kernel; it tries again every reconcile_interval{advice}"
            );
            self.listing_failed = Some(kind);
        }
        // Kept current (a module may have loaded since), for /readyz, the
        // STATUS= line and the metrics.
        self.write().listing = Some(failure);
    }

    /// A listing worked: says so if earlier ones had failed.
    fn listing_works(&mut self) {
        if self.listing_failed.take().is_some() {
            tracing::info!("the sock_diag listing works again; the map is checked against it");
            self.write().listing = None;
        }
    }

    /// When the drop counters are next read without records: every
    /// reconciliation reads them, so a timer of their own is needed only when
    /// reconciliations are further apart than [`DROP_CHECK`].
    fn drop_check_due(&self) -> Instant {
        if self.config.reconcile_every <= DROP_CHECK {
            self.next_reconcile
        } else {
            self.next_drop_check
        }
    }

    /// Copies the kernel's drop counters and the decode errors into the
    /// state (taking the write lock only when they changed); true when the
    /// kernel lost records since the last look.
    fn update_drops(&mut self) -> bool {
        self.next_drop_check = Instant::now() + DROP_CHECK;
        let drops = self.capture.drops().unwrap_or_default();
        let decode_errors = self.capture.stats().decode_errors;
        {
            let state = self.read_guard();
            if state.drops == drops && state.decode_errors == decode_errors {
                return false;
            }
        }
        let dropped: u64 = drops.iter().map(|(_, n)| n).sum();
        let mut state = self.write();
        let lost = dropped > state.stats.dropped;
        state.stats.dropped = dropped;
        state.drops = drops;
        state.decode_errors = decode_errors;
        lost
    }

    /// Applies a batch under one write lock, then publishes it (closes
    /// filled in with the endpoint the map knew). What the events need from
    /// `/proc` is read first ([`Watcher::prepare`]), so that no API request
    /// waits on it.
    fn apply_all(&mut self, events: &mut [PortEvent]) {
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

    /// Reads, under the read lock, what `events` need from `/proc`: the
    /// first checks of a failed bind ([`early_checks`]: the thread's
    /// capabilities) and where each process that binds, listens or fails
    /// lives. Read as the batch comes: a process that failed may exit at
    /// once, and its transient unit's cgroup go with it.
    fn prepare(&mut self, events: &[PortEvent]) -> Vec<Prepared> {
        let state = self.state.clone();
        let state = state
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        events
            .iter()
            .map(|event| Prepared {
                early: early_checks(&state, event),
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
                    self.ephemeral.wake.notify_one();
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

    /// Attributes the failures the map alone could not explain, against
    /// sock_diag now (TIME_WAIT and connected sockets included). At most one
    /// listing per [`DIAG_INTERVAL`], so an EADDRINUSE storm costs one listing
    /// per interval, not one per failure.
    async fn resolve_failures(&mut self) -> Result<(), WatchError> {
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

    /// Applies every event already waiting in the ring, without waiting.
    pub fn apply_pending(&mut self) -> usize {
        let mut events = Vec::new();
        self.capture.read_now(|event| events.push(event));
        self.apply_all(&mut events);
        events.len()
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

    fn read_guard(&self) -> RwLockReadGuard<'_, State> {
        self.state
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A listing's sockets as the map keeps them, their workloads named.
fn observed(workloads: &Workloads, snapshot: &mut snapshot::Snapshot) -> Vec<Observed> {
    let mut observed = snapshot.take_observed();
    workloads.name_shared(observed.iter_mut().map(|seen| &mut seen.place));
    observed
}

/// The least time between two ephemeral listings, however many failures
/// ask for one.
const EPHEMERAL_MIN_GAP: Duration = Duration::from_secs(1);

/// Lists every namespace's ephemeral port use into the state: once at
/// start, then every interval and when `wake` is notified (at most once per
/// [`EPHEMERAL_MIN_GAP`]). Runs beside the pipeline, on a blocking thread,
/// so a long listing never holds up events.
#[derive(Clone)]
struct EphemeralLister {
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
    /// Lists every `every`, or sooner when woken, forever.
    async fn run(self, every: Duration) {
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
    async fn list_once(&self) {
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

/// glibc's arenas for the daemon's threads. By default glibc gives a thread
/// that meets contention an arena of its own (up to eight per core), and
/// every arena keeps the high-water mark of what it once held: over rounds
/// of API load, reconciliations and `/metrics` renderings at 100k
/// listeners, RSS rose from 48 to 62 MiB with the default and stayed at
/// 52 with two (`cargo xtask bench --only API`, side by side), with no
/// loss of request rate. `MALLOC_ARENA_MAX` or
/// `GLIBC_TUNABLES=glibc.malloc.arena_max=N` in the environment still
/// decides, when set.
const MALLOC_ARENAS: libc::c_int = 2;

/// Applies [`MALLOC_ARENAS`]; called before the runtime starts threads.
pub fn limit_malloc_arenas() {
    let tunables = std::env::var("GLIBC_TUNABLES").unwrap_or_default();
    if std::env::var_os("MALLOC_ARENA_MAX").is_some() || tunables.contains("arena_max") {
        return;
    }
    // SAFETY: mallopt only sets a glibc tunable; called before any thread
    // of ours exists.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, MALLOC_ARENAS) };
}

/// Returns the memory freed by a snapshot (and, at start-up, by loading the
/// programs and parsing the kernel's BTF; and by a `/metrics` rendering) to
/// the system. glibc otherwise keeps freed chunks in its arenas: an idle
/// daemon measured 72 MiB resident, 55 MiB of it heap, until it trimmed.
pub fn release_freed_memory() {
    // SAFETY: malloc_trim only walks glibc's own free lists; no pointers of
    // ours are involved.
    unsafe { libc::malloc_trim(0) };
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

/// Where outcomes are inferred: how often `PENDING_BIND` is swept while
/// records come, and how long a bind must have been parked to be taken. A
/// bind returns within microseconds, so one parked for a second failed
/// (post_bind would have sent a success). A failed bind whose thread does
/// nothing else is reported within `SWEEP_AGE + SWEEP_EVERY` on a host
/// where sockets come and go; on one at rest the interval doubles after
/// each sweep that follows no record and finds nothing, up to
/// [`SWEEP_AT_REST`], so the sweep adds 1/30 wakeups per second there, not
/// 1/5, and such a failure waits up to 31 s.
const SWEEP_EVERY: Duration = Duration::from_secs(5);
const SWEEP_AT_REST: Duration = Duration::from_secs(30);
const SWEEP_AGE: Duration = Duration::from_secs(1);

/// The interval to the next sweep of `PENDING_BIND`, after one `every`
/// after the last: the short one while records come or the sweep found
/// something, else twice the last, up to [`SWEEP_AT_REST`].
fn sweep_interval(every: Duration, busy: bool) -> Duration {
    if busy {
        SWEEP_EVERY
    } else {
        (every * 2).min(SWEEP_AT_REST)
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

/// What the first checks of `event`, a failed bind, refused
/// ([`failures::EarlyChecks`]), from what the latest ephemeral listing read
/// in its namespace (the addresses, `ip_unprivileged_port_start`) and the
/// failing thread's capabilities, read now (only for a port below that
/// start). Anything unknown (a namespace not listed yet, a thread already
/// gone) leaves the errno to the other checks.
fn early_checks(state: &State, event: &PortEvent) -> EarlyChecks {
    if event.kind != EventKind::BindFailed {
        return EarlyChecks::default();
    }
    let Some(usage) = state.ephemeral.as_ref().and_then(|listing| {
        listing
            .namespaces
            .iter()
            .find(|usage| Some(usage.netns) == event.netns)
    }) else {
        return EarlyChecks::default();
    };
    let start = usage.unprivileged_port_start;
    let caps = failures::privileged_port(event.port, start)
        .then(|| snapshot::owners::thread_capabilities(event.pid, event.tid))
        .flatten();
    EarlyChecks {
        address_unavailable: failures::address_unavailable(event, usage.local_addresses.as_ref()),
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

/// Whether `apply` records where `event`'s process lives: for a failure,
/// and for a bind or listen the map takes (one with a cookie and a port).
fn has_place(event: &PortEvent) -> bool {
    match event.kind {
        EventKind::BindFailed | EventKind::ListenFailed | EventKind::ConnectFailed => true,
        EventKind::Bind => event.cookie.is_some(),
        EventKind::Listen => event.cookie.is_some() && event.port != 0,
        _ => false,
    }
}

/// A failure waiting for a sock_diag listing.
struct Awaiting {
    failure: Failure,
    /// The map could not replay its errno: the listing is asked too.
    replay_later: bool,
    /// What the first checks refused ([`early_checks`]).
    early: EarlyChecks,
}

/// For a bind or listen failure whose errno the kernel reported: whether
/// the rules' replay, against `existing` (the sock_diag listing it is
/// attributed against; the map's sockets when `None`), names the same
/// errno, which is what portwatch infers where no outcome hook runs. `None`
/// for other events.
fn replay(
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

/// Whether this kernel's sock_diag lists TCP sockets that are bound but not
/// listening, logged once. Not knowing counts as "no": then reconciliation
/// never removes such a socket for being absent from a listing, and only
/// the release hook reports its close.
fn probe_bound_tcp_listing() -> bool {
    match snapshot::bound_only_tcp_listed() {
        Ok(true) => true,
        Ok(false) => {
            tracing::warn!(
                "this kernel's sock_diag does not list TCP sockets that are bound but not listening (TCP_BOUND_INACTIVE needs Linux 6.7): the start-up snapshot cannot see such sockets made before portwatch started, and reconciliation keeps the ones events reported"
            );
            false
        }
        Err(err) => {
            tracing::warn!(
                error = %err,
                "cannot tell whether sock_diag lists TCP sockets that are bound but not listening; reconciliation keeps the ones events reported"
            );
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sweep_backs_off_at_rest_and_returns_with_records() {
        let mut every = SWEEP_EVERY;
        let mut waits = Vec::new();
        for _ in 0..5 {
            every = sweep_interval(every, false);
            waits.push(every.as_secs());
        }
        assert_eq!(waits, [10, 20, 30, 30, 30]);
        assert_eq!(sweep_interval(SWEEP_AT_REST, true), SWEEP_EVERY);
    }
}
