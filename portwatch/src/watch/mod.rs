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
//!
//! Here: start-up and the loop. Beside it, by concern:
//! - `apply.rs`: a batch of kernel events into the state;
//! - `resolve.rs`: failures attributed against a sock_diag listing;
//! - `listing.rs`: owners after ready, and reconciliation;
//! - `sweep.rs`: where outcomes are inferred, the failed binds no later
//!   record reports;
//! - `ephemeral.rs`: the ephemeral port listing, beside the pipeline.

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc, RwLock, RwLockReadGuard, RwLockWriteGuard,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::sync::broadcast;

use crate::{
    capture::{Capture, CaptureConfig, CaptureError, OutcomePath},
    event::{BootClock, PortEvent},
    explain,
    health::ListingFailure,
    kernel_probe,
    rules::KernelRules,
    snapshot::{
        self, SnapshotConfig, SnapshotError, Unowned,
        owners::PlaceCache,
        workload::{WorkloadRoots, Workloads},
    },
    state::{ExpectedListener, State},
};

mod apply;
mod ephemeral;
mod listing;
mod resolve;
mod sweep;

use self::{
    ephemeral::EphemeralLister,
    listing::observed,
    resolve::{Awaiting, DIAG_INTERVAL},
    sweep::SWEEP_EVERY,
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

/// How often the kernel's drop counters are read when no records arrive (a
/// batch of records reads them at once, and so does every reconciliation).
/// Only drops of a full bookkeeping map can come without records (a storm of
/// connects that all succeed); this check finds them within its period.
const DROP_CHECK: Duration = Duration::from_secs(30);

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
    /// the last `LISTEN_FAILURE_WINDOW_NS` (`apply.rs`), with the thread and time.
    recent_listens: HashMap<u64, (u32, u64)>,
    /// Where outcomes are inferred: when `PENDING_BIND` is next swept, how
    /// long after the last sweep (`sweep_interval`, `sweep.rs`), and whether records
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
            ephemeral: EphemeralLister::new(
                state_handle.clone(),
                Arc::clone(&lister_workloads),
                connects,
            ),
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

    fn read_guard(&self) -> RwLockReadGuard<'_, State> {
        self.state
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
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
