//! Loads portwatch's kernel programs, attaches them, and streams their
//! records.
//!
//! Attach order matters: the outcome hooks (fexit or `sys_exit_*`) and the
//! LISTEN tracepoint go first, the cgroup bind hooks last, so that every
//! attempt the bind hooks park already has a hook to complete it.
//! Dropping a [`Capture`] detaches everything: every attachment is a BPF link
//! owned by this process, so even SIGKILL leaves nothing attached.

pub mod btf;
pub mod system;
mod tracked;

use std::{
    collections::HashSet,
    fs::File,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use aya::{
    Btf, Ebpf, EbpfLoader,
    maps::{Array, CgroupArray, HashMap, MapData, MapError, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::{CgroupAttachMode, CgroupSock, CgroupSockAddr, FExit, ProgramError, TracePoint},
};
use portwatch_ebpf::{
    ERRNO_UNKNOWN, KernelOffsets, PendingBind, WatchedCgroup, bind_state, hook, outcome, source,
    tracepoint,
};
use tokio::io::unix::AsyncFd;

use crate::event::{DecodeError, PortEvent, decode};

/// The compiled kernel programs, built by `build.rs`.
static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/portwatch-programs"));

/// How long the reader waits after a wakeup before it drains the ring.
///
/// The kernel wakes the reader only for a record written while the reader
/// had caught up, so the records of a burst that arrive during this linger
/// cost no wakeup: one wakeup per burst, none at rest (no timer), and no
/// record waits longer than this before the map and `portwatch trace` show
/// it. A wakeup per record cost about 1.2 µs of every bind (an irq_work
/// self-IPI, measured by `cargo xtask bench`), more than the programs' own
/// work. At the 4 MiB default ring, filling it within a linger would take
/// over seven million records a second.
pub const LINGER: Duration = Duration::from_millis(5);

/// Default size of the ring buffer: 4 MiB holds about 37,000 records.
pub const DEFAULT_RING_BYTES: u32 = 4 * 1024 * 1024;

/// Default capacity of `TRACKED`, the sockets whose release is reported: a
/// busy host's listeners and bound sockets with room to spare (100,000
/// listeners fit). The map is preallocated (see the kernel side): about
/// 64 bytes of kernel memory per entry, 8 MiB at this size.
pub const DEFAULT_TRACKED_SOCKETS: u32 = 131_072;

/// Default capacity of `PENDING_BIND` and `PENDING_LISTEN`, the binds and
/// listens in progress, one per thread: more than a host runs at once.
/// Both maps are preallocated, about 3 MiB each at this size.
pub const DEFAULT_IN_FLIGHT_CALLS: u32 = 16_384;

/// Whether the kernel takes `bytes` as a ring buffer size: a power of two
/// and at least a page.
pub fn ring_size_ok(bytes: u32) -> bool {
    bytes >= 4096 && bytes.is_power_of_two()
}

/// How bind and listen outcomes (the errno) reach portwatch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OutcomePath {
    /// fexit on `inet_bind`/`inet6_bind`/`inet_listen`: no per-syscall cost.
    Fexit,
    /// `syscalls/sys_exit_bind` and `sys_exit_listen`: works everywhere, but
    /// puts every syscall on the machine on the slow path while attached.
    Tracepoint,
    /// No outcome hook: a success is what post_bind, the LISTEN transition
    /// or a tracked socket's connect show; a failure is a bind post_bind did
    /// not see succeed, a listen that fell back to CLOSE at once, a connect
    /// that left SYN_SENT with no port; the daemon infers the errno of the
    /// first two. No per-syscall cost, on any kernel.
    Inferred,
}

impl OutcomePath {
    /// The name used in logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            OutcomePath::Fexit => "fexit",
            OutcomePath::Tracepoint => "tracepoint",
            OutcomePath::Inferred => "inferred",
        }
    }
}

/// Where the bind hooks read SO_REUSEADDR and SO_REUSEPORT from (see the
/// header of `portwatch-ebpf/src/bind.rs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OptionsPath {
    /// `bpf_getsockopt`, where the kernel gives it to cgroup bind hooks
    /// (not in 5.10).
    Getsockopt,
    /// The socket's own `skc_reuse`/`skc_reuseport` bits, through the BTF
    /// offsets.
    SockBits,
}

impl OptionsPath {
    /// The name used in logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            OptionsPath::Getsockopt => "getsockopt",
            OptionsPath::SockBits => "sock_bits",
        }
    }
}

/// Which bind hook variant to use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum OptionsChoice {
    /// Try the `bpf_getsockopt` variant, fall back to the socket's bits when
    /// the kernel refuses to load it.
    #[default]
    Auto,
    /// Read the socket's bits without trying `bpf_getsockopt`.
    SockBits,
}

/// Where TCP's port allocation verdict (`port_alloc`) comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortAllocPath {
    /// fexit on `inet_csk_get_port`.
    Fexit,
    /// Not attached: `post_bind` and the outcome hooks alone, and
    /// `port_alloc` is unknown.
    PostBind,
}

impl PortAllocPath {
    /// The name used in logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            PortAllocPath::Fexit => "fexit",
            PortAllocPath::PostBind => "post_bind",
        }
    }
}

/// Which outcome path to use.
///
/// Where the kernel allows fexit, `Auto` and `Exact` both take it: it is
/// exact and costs nothing per syscall. They differ only on kernels that
/// refuse tracing programs, where the choice is between every syscall on
/// the machine on the slow path (the tracepoints: 1.46x on `getppid` in
/// the README's table) and an errno the conflict rules infer (named alike
/// for 99.7-100% of the kernel's failures in the churn test).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum OutcomeChoice {
    /// Probe for fexit and fall back to inferring outcomes: no per-syscall
    /// cost on any kernel. The daemon's default.
    #[default]
    Auto,
    /// Probe for fexit and fall back to the syscall tracepoints: the
    /// kernel's own errno on every kernel. `portwatch trace`'s default.
    Exact,
    /// Use the syscall tracepoints without probing.
    Tracepoint,
    /// Attach no outcome hook: infer outcomes (see [`OutcomePath::Inferred`]).
    Inferred,
}

/// What to attach and where.
#[derive(Clone, Debug)]
pub struct CaptureConfig {
    /// The cgroup to watch; `None` means the cgroup2 root (the whole machine).
    pub cgroup: Option<PathBuf>,
    /// Ring buffer size in bytes (a power of two, multiple of the page size).
    pub ring_bytes: u32,
    /// Outcome path preference.
    pub outcome: OutcomeChoice,
    /// Bind hook variant preference.
    pub options: OptionsChoice,
    /// Capacity of `TRACKED`: a socket that does not fit has its close
    /// found by the next reconciliation instead of an event (counted as a
    /// drop of the hook that tried to track it).
    pub tracked_sockets: u32,
    /// Capacity of `PENDING_BIND` and of `PENDING_LISTEN`: a call that does
    /// not fit is still allowed, and counted as a drop; a successful bind is
    /// then reported by `post_bind` alone, a failed bind is missing from the
    /// failure log, and a listen is found by the reconciliation the drop
    /// triggers.
    pub in_flight_calls: u32,
}

impl Default for CaptureConfig {
    fn default() -> Self {
        CaptureConfig {
            cgroup: None,
            ring_bytes: DEFAULT_RING_BYTES,
            outcome: OutcomeChoice::Auto,
            options: OptionsChoice::Auto,
            tracked_sockets: DEFAULT_TRACKED_SOCKETS,
            in_flight_calls: DEFAULT_IN_FLIGHT_CALLS,
        }
    }
}

/// Why capture could not start or read.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// The environment lacks something (privileges, BTF, tracefs, cgroup2).
    #[error(transparent)]
    Env(#[from] system::EnvError),
    /// The kernel's BTF could not be read.
    #[error(transparent)]
    Btf(#[from] btf::BtfError),
    /// The ring buffer size is not usable.
    #[error("ring buffer size {0} is not a power of two of at least 4096 bytes")]
    RingSize(u32),
    /// Loading the object into the kernel failed.
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    /// A program failed to load or attach.
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    /// A map is missing or could not be used.
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    /// A tracepoint's record layout differs from what the programs read.
    #[error("tracepoint {tracepoint}: {problem}; portwatch does not support this kernel's layout")]
    TracepointFormat {
        tracepoint: &'static str,
        problem: String,
    },
    /// Opening the cgroup directory or a tracefs file failed.
    #[error("opening {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Waiting on the ring buffer failed.
    #[error("reading the ring buffer: {0}")]
    Ring(#[source] std::io::Error),
}

/// Counters of records that never became events.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CaptureStats {
    /// Records that failed to decode.
    pub decode_errors: u64,
}

/// Attached programs and the stream of their records.
pub struct Capture {
    /// Owns the loaded programs and their links: dropping it detaches them.
    _ebpf: Ebpf,
    ring: AsyncFd<RingBuf<MapData>>,
    drops: PerCpuArray<MapData, u64>,
    tracked: tracked::Tracked,
    /// `PENDING_BIND`, for [`Capture::sweep_parked_binds`].
    pending_binds: HashMap<MapData, u32, PendingBind>,
    connects: Arc<ConnectCounter>,
    cgroup: PathBuf,
    outcome: OutcomePath,
    options: OptionsPath,
    port_alloc: PortAllocPath,
    stats: CaptureStats,
    logged_decode_errors: HashSet<std::mem::Discriminant<DecodeError>>,
    _logger: Option<tokio::task::JoinHandle<()>>,
}

/// New outgoing TCP connections (CLOSE -> SYN_SENT) per network namespace,
/// as the kernel programs count them (per CPU) since they were loaded.
pub struct ConnectCounter(PerCpuHashMap<MapData, u64, u64>);

impl ConnectCounter {
    /// The count of each namespace id, summed over CPUs; id 0 holds what
    /// the kernel could not place (no namespace, or the map full).
    pub fn read(&self) -> std::collections::HashMap<u64, u64> {
        self.0
            .iter()
            .filter_map(Result::ok)
            .map(|(netns, per_cpu)| (netns, per_cpu.iter().sum()))
            .collect()
    }
}

/// Whether `cgroup` is less than the whole machine (not the cgroup2 root).
fn watches_subtree(cgroup: &Path) -> bool {
    let same = |a: &Path, b: &Path| match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    };
    system::cgroup_root(None).map_or(true, |root| !same(&root, cgroup))
}

/// The watched cgroup as the programs know it: its id (the inode number of
/// its directory) and whether it is a subtree.
fn watched_cgroup(cgroup: &Path) -> Result<WatchedCgroup, CaptureError> {
    use std::os::unix::fs::MetadataExt as _;
    let id = std::fs::metadata(cgroup)
        .map_err(|source| CaptureError::Open {
            path: cgroup.to_path_buf(),
            source,
        })?
        .ino();
    Ok(WatchedCgroup {
        id,
        subtree: u8::from(watches_subtree(cgroup)),
        _pad: [0; 7],
    })
}

impl Capture {
    /// Checks what capture needs (privileges, BTF, tracefs, cgroup2)
    /// without loading anything; the cgroup to watch.
    pub fn check_environment(config: &CaptureConfig) -> Result<PathBuf, CaptureError> {
        system::check()?;
        Ok(system::cgroup_root(config.cgroup.as_deref())?)
    }

    /// Checks the environment, loads the programs and attaches them.
    /// Must run inside a tokio runtime (the ring buffer is polled by it).
    pub fn start(config: &CaptureConfig) -> Result<Capture, CaptureError> {
        let cgroup = Capture::check_environment(config)?;
        // `portwatch trace --ring-size` comes here unchecked; the daemon's
        // values (the ring and the map capacities) were checked with its
        // configuration.
        let ring_bytes = config.ring_bytes;
        if !ring_size_ok(ring_bytes) {
            return Err(CaptureError::RingSize(ring_bytes));
        }
        check_set_state_format()?;
        let variant = env!("PORTWATCH_EBPF_VARIANT");
        if !variant.is_empty() {
            tracing::warn!(
                "these eBPF programs were built as the bench's \"{variant}\" variant (PORTWATCH_EBPF_VARIANT): they record nothing or send nothing; rebuild without it"
            );
        }

        let (mut offsets, missing) = btf::kernel_offsets(Path::new(system::VMLINUX_BTF))?;
        // Namespaces are named by the ids userspace can read too: cookies
        // where SO_NETNS_COOKIE exists (Linux 5.14+), else inode numbers.
        if crate::snapshot::netns_named_by_inode() && offsets.net_ns_inum == 0 {
            tracing::warn!(
                "this kernel has no SO_NETNS_COOKIE and its BTF has no struct net ns.inum: the programs' namespace cookies cannot be matched with the namespaces the daemon lists, so reconciliation will see every socket as gone and back"
            );
        } else if crate::snapshot::netns_named_by_inode() {
            tracing::info!(
                "this kernel has no SO_NETNS_COOKIE (Linux 5.14): network namespaces are named by their inode number (as in /proc/<pid>/ns/net), not their cookie"
            );
        } else {
            offsets.net_ns_inum = 0;
        }
        if !missing.is_empty() {
            tracing::warn!(
                ?missing,
                "kernel BTF lacks some fields; the facts read from them will be reported as unknown"
            );
        }
        raise_memlock_limit();
        let mut ebpf = EbpfLoader::new()
            .override_global("OFFSETS", &offsets, true)
            .override_global("WATCH_CGROUP", &watched_cgroup(&cgroup)?, true)
            .map_max_entries("EVENTS", ring_bytes)
            .map_max_entries("TRACKED", config.tracked_sockets)
            .map_max_entries("PENDING_BIND", config.in_flight_calls)
            .map_max_entries("PENDING_LISTEN", config.in_flight_calls)
            .map_max_entries("PENDING_CONNECT", config.in_flight_calls)
            .load(EBPF_OBJECT)?;
        let logger = start_kernel_logger(&mut ebpf);

        let cgroup_file = File::open(&cgroup).map_err(|source| CaptureError::Open {
            path: cgroup.clone(),
            source,
        })?;
        let mut watched: CgroupArray<_> = take_map(&mut ebpf, "WATCHED")?;
        watched
            .set(0, cgroup_file.as_raw_fd(), 0)
            .map_err(|source| CaptureError::Map {
                name: "WATCHED",
                source,
            })?;
        // The map holds its own reference to the cgroup; keep the handle so
        // the array stays alive with the object.
        std::mem::forget(watched);

        let (outcome, port_alloc) = attach_outcome_hooks(&mut ebpf, config.outcome)?;
        attach_tracepoint(
            &mut ebpf,
            "inet_sock_set_state",
            "sock",
            "inet_sock_set_state",
        )?;
        attach_tracepoint(&mut ebpf, "tcp_destroy_sock", "tcp", "tcp_destroy_sock")?;
        // aya attaches cgroup programs with BPF links, which always coexist
        // with other programs; the kernel refuses the ALLOW_MULTI flag there.
        let mode = CgroupAttachMode::Single;
        for name in ["sock_create", "sock_release", "post_bind4", "post_bind6"] {
            let program: &mut CgroupSock = program_mut(&mut ebpf, name)?;
            program
                .load()
                .map_err(|source| CaptureError::Program { name, source })?;
            program
                .attach(&cgroup_file, mode)
                .map_err(|source| CaptureError::Program { name, source })?;
        }
        let options = load_bind_hooks(&mut ebpf, config.options)?;
        let unknown = unknown_options(&offsets, options);
        if !unknown.is_empty() {
            tracing::warn!(
                ?unknown,
                options = options.name(),
                "this kernel's BTF does not locate these socket options; they will be reported as null"
            );
        }
        for name in bind_programs(options) {
            let program: &mut CgroupSockAddr = program_mut(&mut ebpf, name)?;
            program
                .attach(&cgroup_file, mode)
                .map_err(|source| CaptureError::Program { name, source })?;
        }
        for name in ["connect4", "connect6"] {
            let program: &mut CgroupSockAddr = program_mut(&mut ebpf, name)?;
            program
                .load()
                .map_err(|source| CaptureError::Program { name, source })?;
            program
                .attach(&cgroup_file, mode)
                .map_err(|source| CaptureError::Program { name, source })?;
        }

        let ring: RingBuf<MapData> = take_map(&mut ebpf, "EVENTS")?;
        // SAFETY: the ring buffer owns its map fd until it is dropped, which
        // happens only with the AsyncFd that wraps it.
        let ring =
            unsafe { AsyncFd::register(ring) }.map_err(|err| CaptureError::Ring(err.into()))?;
        let drops = take_map(&mut ebpf, "DROPS")?;
        let tracked = take_map(&mut ebpf, "TRACKED")?;
        let pending_binds = take_map(&mut ebpf, "PENDING_BIND")?;
        let connects = Arc::new(ConnectCounter(take_map(&mut ebpf, "CONNECTS")?));
        tracing::info!(
            cgroup = %cgroup.display(),
            outcome = outcome.name(),
            options = options.name(),
            port_alloc = port_alloc.name(),
            "kernel programs attached"
        );
        Ok(Capture {
            _ebpf: ebpf,
            ring,
            drops,
            tracked,
            pending_binds,
            connects,
            cgroup,
            outcome,
            options,
            port_alloc,
            stats: CaptureStats::default(),
            logged_decode_errors: HashSet::new(),
            _logger: logger,
        })
    }

    /// The cgroup whose sockets are watched.
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// The active path for bind and listen outcomes.
    pub fn outcome_path(&self) -> OutcomePath {
        self.outcome
    }

    /// Where the bind hooks read SO_REUSEADDR and SO_REUSEPORT.
    pub fn options_path(&self) -> OptionsPath {
        self.options
    }

    /// Where TCP's port allocation verdict comes from, if anywhere.
    pub fn port_alloc_path(&self) -> PortAllocPath {
        self.port_alloc
    }

    /// Every attached hook and the path it uses, for logs and metrics.
    pub fn hooks(&self) -> Vec<(&'static str, &'static str)> {
        // Named as the drop counters are; listen_stop is the listen program.
        // `options` and `get_port` have no drop slot: they only amend
        // records other hooks send.
        let name = |slot: u32| hook::NAMES[slot as usize];
        vec![
            (name(hook::BIND), "cgroup"),
            ("options", self.options.name()),
            ("get_port", self.port_alloc.name()),
            (name(hook::POST_BIND), "cgroup"),
            (name(hook::BIND_OUTCOME), self.outcome.name()),
            (name(hook::LISTEN), "tracepoint"),
            (name(hook::LISTEN_OUTCOME), self.outcome.name()),
            // Only gives sockets their cookie; it sends nothing.
            ("create", "cgroup"),
            (name(hook::RELEASE), "cgroup"),
            // A tracked TCP socket freed where no release hook ran; its
            // records count as `release`'s.
            ("destroy", "tracepoint"),
            (name(hook::CONNECT), "cgroup"),
            (name(hook::CONNECT_OUTCOME), self.outcome.name()),
        ]
    }

    /// Counters of records lost in the kernel, per hook name, summed over CPUs.
    pub fn drops(&self) -> Result<Vec<(&'static str, u64)>, CaptureError> {
        (0..hook::COUNT)
            .map(|slot| {
                let values = self
                    .drops
                    .get(&slot, 0)
                    .map_err(|source| CaptureError::Map {
                        name: "DROPS",
                        source,
                    })?;
                Ok((hook::NAMES[slot as usize], values.iter().sum()))
            })
            .collect()
    }

    /// The kernel's count of new outgoing TCP connections per namespace,
    /// to read from anywhere.
    pub fn connect_counter(&self) -> Arc<ConnectCounter> {
        self.connects.clone()
    }

    /// Counters of records lost in userspace.
    pub fn stats(&self) -> &CaptureStats {
        &self.stats
    }

    /// Asks the kernel to report the release of every socket of `cookies`
    /// (ones that existed before portwatch started, found by a listing), in
    /// one batch where the kernel allows it; how many could not be tracked
    /// (the set is full).
    pub fn track_all(&mut self, cookies: &[u64]) -> usize {
        self.tracked.insert_all(cookies)
    }

    /// Where outcomes are inferred: the binds a thread parked at least `age`
    /// ago and never came back for (it exited, another thread closed the
    /// socket, or it waits on something else), taken out of `PENDING_BIND`
    /// and returned as failures whose errno is unknown, for the rules to
    /// infer. A thread that comes back between the read and the removal has
    /// its record sent by the kernel too; the caller drops the copy.
    pub fn sweep_parked_binds(&mut self, age: Duration) -> Vec<PortEvent> {
        let now = crate::event::boot_ns_now();
        let age = u64::try_from(age.as_nanos()).unwrap_or(u64::MAX);
        let tids: Vec<u32> = self.pending_binds.keys().filter_map(Result::ok).collect();
        let mut swept = Vec::new();
        for tid in tids {
            let Ok(pending) = self.pending_binds.get(&tid, 0) else {
                continue; // sent on by its thread meanwhile
            };
            if pending.state != bind_state::PARKED || now.saturating_sub(pending.event.ts_ns) < age
            {
                continue;
            }
            if self.pending_binds.remove(&tid).is_err() {
                continue;
            }
            let mut raw = pending.event;
            raw.errno = ERRNO_UNKNOWN;
            raw.source = source::UNRESOLVED;
            match PortEvent::try_from(&raw) {
                Ok(event) => swept.push(event),
                Err(err) => {
                    count_decode_error(&mut self.stats, &mut self.logged_decode_errors, &err)
                }
            }
        }
        swept
    }

    /// Stops tracking socket `cookie`, which is gone without a release the
    /// hooks saw. A cookie the kernel already dropped is not an error.
    pub fn untrack(&mut self, cookie: u64) {
        self.tracked.remove(cookie);
    }

    /// Waits for records, then hands every decoded event to `sink` until the
    /// ring is empty. Records that fail to decode are counted, and each kind
    /// of failure is logged once.
    ///
    /// The programs wake the reader only for the first record after it
    /// caught up; it then lingers for [`LINGER`] so the rest of a burst is
    /// read in the same batch, without further wakeups. There is no timer:
    /// an idle ring costs nothing. Cancel-safe: records stay in the ring
    /// until a drain hands them over.
    pub async fn read(&mut self, mut sink: impl FnMut(PortEvent)) -> Result<(), CaptureError> {
        loop {
            let mut guard = self.ring.readable_mut().await.map_err(CaptureError::Ring)?;
            tokio::time::sleep(LINGER).await;
            let records = drain(
                guard.get_inner_mut(),
                &mut self.stats,
                &mut self.logged_decode_errors,
                &mut sink,
            );
            // Clears the readiness only if no wakeup came since it was
            // reported (tokio compares the readiness tick), so a record
            // written during the drain still wakes the next read.
            guard.clear_ready();
            if records > 0 {
                return Ok(());
            }
        }
    }

    /// Hands every record already in the ring to `sink`, without waiting;
    /// returns how many records there were (decoded or not).
    pub fn read_now(&mut self, sink: impl FnMut(PortEvent)) -> usize {
        drain(
            self.ring.get_mut(),
            &mut self.stats,
            &mut self.logged_decode_errors,
            sink,
        )
    }
}

/// Decodes every record in `ring` into `sink`; failures are counted, and
/// each kind of failure is logged once. Returns how many records there were.
fn drain(
    ring: &mut RingBuf<MapData>,
    stats: &mut CaptureStats,
    logged: &mut HashSet<std::mem::Discriminant<DecodeError>>,
    mut sink: impl FnMut(PortEvent),
) -> usize {
    let mut records = 0;
    while let Some(record) = ring.next() {
        records += 1;
        match decode(&record) {
            Ok(event) => sink(event),
            Err(err) => count_decode_error(stats, logged, &err),
        }
    }
    records
}

/// Counts a record that did not decode, logging the first of each kind.
fn count_decode_error(
    stats: &mut CaptureStats,
    logged: &mut HashSet<std::mem::Discriminant<DecodeError>>,
    err: &DecodeError,
) {
    stats.decode_errors += 1;
    if logged.insert(std::mem::discriminant(err)) {
        tracing::warn!(
            error = %err,
            "dropping a kernel record that does not decode (logged once per kind)"
        );
    }
}

/// Tries fexit (unless told not to), falling back to inferred outcomes or
/// the syscall tracepoints as `choice` says; with fexit, also tries fexit
/// on `inet_csk_get_port`.
fn attach_outcome_hooks(
    ebpf: &mut Ebpf,
    choice: OutcomeChoice,
) -> Result<(OutcomePath, PortAllocPath), CaptureError> {
    let fallback = match choice {
        OutcomeChoice::Auto | OutcomeChoice::Inferred => OutcomePath::Inferred,
        OutcomeChoice::Exact | OutcomeChoice::Tracepoint => OutcomePath::Tracepoint,
    };
    let fallback_name = match fallback {
        OutcomePath::Inferred => {
            "inferred by the daemon (outcome = \"exact\" takes the syscalls/sys_exit_* tracepoints instead)"
        }
        _ => "from the syscalls/sys_exit_* tracepoints",
    };
    if matches!(choice, OutcomeChoice::Auto | OutcomeChoice::Exact) {
        match Btf::from_sys_fs() {
            Ok(btf) => match attach_fexit(ebpf, &btf) {
                Ok(()) => {
                    // From now on every bind waits for its fexit outcome:
                    // a bind that another tool's cgroup program refuses
                    // after post_bind is then its failure.
                    set_outcome(ebpf, outcome::FEXIT)?;
                    return Ok((OutcomePath::Fexit, attach_get_port(ebpf, &btf)));
                }
                Err(err) => tracing::info!(
                    reason = %err,
                    "fexit is not available; bind and listen outcomes are {fallback_name}"
                ),
            },
            Err(err) => tracing::info!(
                reason = %err,
                "kernel BTF is not readable for fexit; bind and listen outcomes are {fallback_name}"
            ),
        }
    }
    if fallback == OutcomePath::Inferred {
        set_outcome(ebpf, outcome::INFERRED)?;
        return Ok((OutcomePath::Inferred, PortAllocPath::PostBind));
    }
    check_sys_exit_formats()?;
    // The enter hooks first: an exit must never see a call whose start
    // went unseen.
    attach_tracepoint(ebpf, "sys_enter_bind", "syscalls", "sys_enter_bind")?;
    attach_tracepoint(ebpf, "sys_enter_listen", "syscalls", "sys_enter_listen")?;
    attach_tracepoint(ebpf, "sys_enter_connect", "syscalls", "sys_enter_connect")?;
    attach_tracepoint(ebpf, "sys_exit_bind", "syscalls", "sys_exit_bind")?;
    attach_tracepoint(ebpf, "sys_exit_listen", "syscalls", "sys_exit_listen")?;
    attach_tracepoint(ebpf, "sys_exit_connect", "syscalls", "sys_exit_connect")?;
    Ok((OutcomePath::Tracepoint, PortAllocPath::PostBind))
}

/// The fexit outcome programs, each as (program, kernel function): first
/// the functions that take the `struct sock` (Linux 6.3+ for bind, 6.5+
/// for listen), which MPTCP calls directly for its subflow; else the
/// `proto_ops` functions above them, which every kernel has and which
/// MPTCP on those kernels reaches through its subflow's `struct socket`.
const FEXIT_OUTCOMES: [&[(&str, &str)]; 5] = [
    &[
        ("fexit_inet_bind_sk", "inet_bind_sk"),
        ("fexit_inet_bind", "inet_bind"),
    ],
    &[
        ("fexit_inet6_bind_sk", "inet6_bind_sk"),
        ("fexit_inet6_bind", "inet6_bind"),
    ],
    &[
        ("fexit_inet_listen_sk", "__inet_listen_sk"),
        ("fexit_inet_listen", "inet_listen"),
    ],
    // Connects of both families, stream and datagram.
    &[("fexit_inet_stream_connect", "inet_stream_connect")],
    &[("fexit_inet_dgram_connect", "inet_dgram_connect")],
];

/// Loads and attaches one fexit program per outcome (see
/// [`FEXIT_OUTCOMES`]), or none of them.
fn attach_fexit(ebpf: &mut Ebpf, btf: &Btf) -> Result<(), CaptureError> {
    let mut result = Ok(());
    for choices in FEXIT_OUTCOMES {
        // The last choice's error is the one to report: every kernel has
        // the `proto_ops` function.
        let mut outcome = Ok(());
        for &(name, function) in choices {
            let program: &mut FExit = program_mut(ebpf, name)?;
            outcome = program
                .load(function, btf)
                .and_then(|()| program.attach().map(drop))
                .map_err(|source| {
                    let _ = program.unload();
                    CaptureError::Program { name, source }
                });
            if outcome.is_ok() {
                break;
            }
        }
        if outcome.is_err() {
            result = outcome;
            break;
        }
    }
    if result.is_err() {
        for (name, _) in FEXIT_OUTCOMES.iter().copied().flatten() {
            if let Ok(program) = program_mut::<FExit>(ebpf, name) {
                let _ = program.unload();
            }
        }
    }
    result
}

/// Tells the programs how outcomes come (an [`outcome`] constant).
fn set_outcome(ebpf: &mut Ebpf, mode: u32) -> Result<(), CaptureError> {
    const NAME: &str = "OUTCOME";
    let map = ebpf.map_mut(NAME).ok_or(CaptureError::Map {
        name: NAME,
        source: MapError::InvalidName {
            name: NAME.to_owned(),
        },
    })?;
    let mut flag: Array<&mut MapData, u32> =
        Array::try_from(map).map_err(|source| CaptureError::Map { name: NAME, source })?;
    flag.set(0, mode, 0)
        .map_err(|source| CaptureError::Map { name: NAME, source })
}

/// fexit on `inet_csk_get_port`, once the other fexit programs are in. It
/// only adds `port_alloc` to records, so a kernel that refuses it (the
/// function renamed or inlined) keeps the rest and says so once.
fn attach_get_port(ebpf: &mut Ebpf, btf: &Btf) -> PortAllocPath {
    const NAME: &str = "fexit_inet_csk_get_port";
    let attached = program_mut::<FExit>(ebpf, NAME).and_then(|program| {
        program
            .load("inet_csk_get_port", btf)
            .and_then(|()| program.attach().map(drop))
            .map_err(|source| {
                let _ = program.unload();
                CaptureError::Program { name: NAME, source }
            })
    });
    match attached {
        Ok(()) => PortAllocPath::Fexit,
        Err(err) => {
            tracing::warn!(
                reason = short_reason(&err),
                "fexit on inet_csk_get_port is not available; port_alloc will be null and TCP binds are reported by post_bind alone"
            );
            tracing::debug!(error = %err, "the get_port program's full load error");
            PortAllocPath::PostBind
        }
    }
}

/// The bind programs of each variant, IPv4 then IPv6.
fn bind_programs(options: OptionsPath) -> [&'static str; 2] {
    match options {
        OptionsPath::Getsockopt => ["bind4", "bind6"],
        OptionsPath::SockBits => ["bind4_sk", "bind6_sk"],
    }
}

/// Loads the `bpf_getsockopt` bind programs (unless told not to), or, when
/// the kernel refuses them, the variant that reads the socket's bits.
/// Nothing is attached yet.
fn load_bind_hooks(ebpf: &mut Ebpf, choice: OptionsChoice) -> Result<OptionsPath, CaptureError> {
    if choice == OptionsChoice::Auto {
        match load_pair(ebpf, bind_programs(OptionsPath::Getsockopt)) {
            Ok(()) => return Ok(OptionsPath::Getsockopt),
            // Only the helper's absence is a reason to fall back; any other
            // refusal (privileges, limits, a verifier bug) is the error.
            Err(err) if !short_reason(&err).contains("bpf_getsockopt") => return Err(err),
            Err(err) => {
                tracing::warn!(
                    reason = short_reason(&err),
                    "cgroup bind programs cannot call bpf_getsockopt on this kernel; SO_REUSEADDR and SO_REUSEPORT are read from the socket's own bits"
                );
                tracing::debug!(error = %err, "the getsockopt bind program's full load error");
            }
        }
    }
    load_pair(ebpf, bind_programs(OptionsPath::SockBits))?;
    Ok(OptionsPath::SockBits)
}

/// Loads both programs, or neither.
fn load_pair(ebpf: &mut Ebpf, names: [&'static str; 2]) -> Result<(), CaptureError> {
    let mut result = Ok(());
    for name in names {
        let program: &mut CgroupSockAddr = program_mut(ebpf, name)?;
        if let Err(source) = program.load() {
            result = Err(CaptureError::Program { name, source });
            break;
        }
    }
    if result.is_err() {
        for name in names {
            if let Ok(program) = program_mut::<CgroupSockAddr>(ebpf, name) {
                let _ = program.unload();
            }
        }
    }
    result
}

/// `err` in one line: a load error keeps the verifier's verdict (its last
/// line before the statistics) instead of the whole log, which runs to
/// hundreds of lines.
fn short_reason(err: &CaptureError) -> String {
    match err {
        CaptureError::Program {
            name,
            source:
                ProgramError::LoadError {
                    io_error,
                    verifier_log,
                },
        } => load_error_line(name, io_error, &verifier_log.to_string()),
        other => other.to_string(),
    }
}

/// A program load error in one line: the errno and the verifier's verdict.
fn load_error_line(name: &str, io_error: &std::io::Error, verifier_log: &str) -> String {
    match verifier_verdict(verifier_log) {
        Some(verdict) => format!("program {name}: {io_error}: {verdict}"),
        None => format!("program {name}: {io_error}"),
    }
}

/// The last line of a verifier log that is not one of the statistics it
/// ends with.
fn verifier_verdict(log: &str) -> Option<&str> {
    const STATISTICS: [&str; 3] = ["verification time", "stack depth", "processed "];
    log.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .rfind(|line| !STATISTICS.iter().any(|stat| line.starts_with(stat)))
}

/// The socket options no bind record will carry, given the offsets found and
/// the bind variant loaded: each is then null in every event.
pub fn unknown_options(offsets: &KernelOffsets, options: OptionsPath) -> Vec<&'static str> {
    let mut unknown = Vec::new();
    if offsets.sk_reuse_byte == 0 {
        if options == OptionsPath::SockBits {
            unknown.extend(["reuse_addr", "reuse_port"]);
        }
        unknown.push("v6only");
    }
    for (name, flag) in [
        ("freebind", offsets.freebind),
        ("transparent", offsets.transparent),
        ("bind_address_no_port", offsets.bind_address_no_port),
    ] {
        if !flag.known() {
            unknown.push(name);
        }
    }
    unknown
}

fn attach_tracepoint(
    ebpf: &mut Ebpf,
    name: &'static str,
    category: &str,
    event: &str,
) -> Result<(), CaptureError> {
    let program: &mut TracePoint = program_mut(ebpf, name)?;
    program
        .load()
        .map_err(|source| CaptureError::Program { name, source })?;
    program
        .attach(category, event)
        .map_err(|source| CaptureError::Program { name, source })?;
    Ok(())
}

fn program_mut<'a, P>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut P, CaptureError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    let program = ebpf.program_mut(name).ok_or(CaptureError::Program {
        name,
        source: ProgramError::UnexpectedProgramType,
    })?;
    program
        .try_into()
        .map_err(|source| CaptureError::Program { name, source })
}

fn take_map<M>(ebpf: &mut Ebpf, name: &'static str) -> Result<M, CaptureError>
where
    M: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(CaptureError::Map {
        name,
        source: MapError::InvalidName {
            name: name.to_owned(),
        },
    })?;
    M::try_from(map).map_err(|source| CaptureError::Map { name, source })
}

/// Checks that `sock/inet_sock_set_state` and `tcp/tcp_destroy_sock` records
/// hold the fields where the programs read them. Both tracepoints are
/// attached on every kernel.
fn check_set_state_format() -> Result<(), CaptureError> {
    let destroy = read_format("tcp", "tcp_destroy_sock")?;
    for (field, offset, size) in tracepoint::DESTROY_FIELDS {
        check_field("tcp/tcp_destroy_sock", &destroy, field, offset, size)?;
    }
    let set_state = read_format("sock", "inet_sock_set_state")?;
    for (field, offset, size) in tracepoint::SET_STATE_FIELDS {
        check_field("sock/inet_sock_set_state", &set_state, field, offset, size)?;
    }
    Ok(())
}

/// Checks that `syscalls/sys_exit_bind` and `sys_exit_listen` hold `ret`
/// where the programs read it. Only the tracepoint fallback needs them: a
/// kernel that allows fexit may lack syscall tracepoints altogether.
fn check_sys_exit_formats() -> Result<(), CaptureError> {
    for event in ["sys_exit_bind", "sys_exit_listen", "sys_exit_connect"] {
        let format = read_format("syscalls", event)?;
        check_field(
            "syscalls/sys_exit_*",
            &format,
            "ret",
            tracepoint::SYS_EXIT_RET,
            8,
        )?;
    }
    Ok(())
}

fn read_format(category: &str, event: &str) -> Result<String, CaptureError> {
    let path = Path::new(system::TRACEFS).join(format!("events/{category}/{event}/format"));
    std::fs::read_to_string(&path).map_err(|source| CaptureError::Open { path, source })
}

fn check_field(
    tracepoint: &'static str,
    format: &str,
    field: &str,
    offset: usize,
    size: usize,
) -> Result<(), CaptureError> {
    match format_field(format, field) {
        Some(found) if found == (offset, size) => Ok(()),
        Some((found_offset, found_size)) => Err(CaptureError::TracepointFormat {
            tracepoint,
            problem: format!(
                "field {field} is at offset {found_offset} size {found_size}, expected offset {offset} size {size}"
            ),
        }),
        None => Err(CaptureError::TracepointFormat {
            tracepoint,
            problem: format!("field {field} is missing"),
        }),
    }
}

/// (offset, size) of `field` in the text of a tracefs `format` file.
/// Lines look like `field:__u8 saddr[4]; offset:32; size:4; signed:0;`,
/// separated by tabs.
fn format_field(format: &str, field: &str) -> Option<(usize, usize)> {
    format.lines().find_map(|line| {
        let mut parts = line.trim().split(';').map(str::trim);
        let declaration = parts.next()?.strip_prefix("field:")?;
        let name = declaration.rsplit(' ').next()?;
        let name = name.split('[').next()?;
        if name != field {
            return None;
        }
        let offset = parts.next()?.strip_prefix("offset:")?.parse().ok()?;
        let size = parts.next()?.strip_prefix("size:")?.parse().ok()?;
        Some((offset, size))
    })
}

/// BPF memory is charged to the memory cgroup on current kernels; on older
/// ones the memlock limit applies. Failing to raise it is not an error.
fn raise_memlock_limit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads the struct we pass.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        tracing::debug!("could not raise RLIMIT_MEMLOCK; relying on memory cgroup accounting");
    }
}

/// Forwards the programs' aya-log records to our logger, if they log.
fn start_kernel_logger(ebpf: &mut Ebpf) -> Option<tokio::task::JoinHandle<()>> {
    let logger = match aya_log::EbpfLogger::init(ebpf) {
        Ok(logger) => logger,
        Err(err) => {
            tracing::debug!(error = %err, "kernel programs have no log map");
            return None;
        }
    };
    // SAFETY: the logger owns its ring buffer fd for as long as it lives,
    // and it lives inside the AsyncFd.
    let mut logger = unsafe { AsyncFd::register(logger) }.ok()?;
    Some(tokio::spawn(async move {
        while let Ok(mut guard) = logger.readable_mut().await {
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SET_STATE: &str = "name: inet_sock_set_state
ID: 2287
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:const void * skaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:int oldstate;\toffset:16;\tsize:4;\tsigned:1;
\tfield:__u16 sport;\toffset:24;\tsize:2;\tsigned:0;
\tfield:__u8 saddr_v6[16];\toffset:40;\tsize:16;\tsigned:0;
";

    #[test]
    fn parses_tracefs_format_fields() {
        assert_eq!(format_field(SET_STATE, "skaddr"), Some((8, 8)));
        assert_eq!(format_field(SET_STATE, "oldstate"), Some((16, 4)));
        assert_eq!(format_field(SET_STATE, "sport"), Some((24, 2)));
        assert_eq!(format_field(SET_STATE, "saddr_v6"), Some((40, 16)));
        assert_eq!(format_field(SET_STATE, "saddr"), None);
        assert_eq!(format_field(SET_STATE, "common_type"), Some((0, 2)));
        assert_eq!(format_field("", "skaddr"), None);
        assert_eq!(format_field("field:int x;\toffset:zz;\tsize:4;", "x"), None);
    }

    #[test]
    fn the_verifier_verdict_is_its_last_line_before_the_statistics() {
        // The end of Debian 5.10's log for the getsockopt bind4.
        let log = "95: (85) call bpf_getsockopt#57
unknown func bpf_getsockopt#57
verification time 4837 usec
stack depth 240+0+0
processed 178 insns (limit 1000000) max_states_per_insn 1 total_states 7 peak_states 7 mark_read 6

";
        assert_eq!(
            verifier_verdict(log),
            Some("unknown func bpf_getsockopt#57")
        );
        assert_eq!(verifier_verdict(""), None);
        let einval = std::io::Error::from_raw_os_error(libc::EINVAL);
        let reason = load_error_line("bind4", &einval, log);
        assert!(
            reason.starts_with("program bind4: Invalid argument"),
            "{reason}"
        );
        assert!(
            reason.ends_with(": unknown func bpf_getsockopt#57"),
            "{reason}"
        );
        assert!(!load_error_line("bind4", &einval, "").contains("\n"));
    }

    #[test]
    fn unknown_options_follow_the_offsets_and_the_variant() {
        let all = KernelOffsets {
            sk_reuse_byte: 13,
            freebind: portwatch_ebpf::FlagBit::at_bit(801 * 8 + 3),
            transparent: portwatch_ebpf::FlagBit::at_bit(801 * 8 + 7),
            bind_address_no_port: portwatch_ebpf::FlagBit::at_bit(802 * 8 + 2),
            ..KernelOffsets::default()
        };
        for path in [OptionsPath::Getsockopt, OptionsPath::SockBits] {
            assert!(unknown_options(&all, path).is_empty());
        }
        let none = KernelOffsets::default();
        assert_eq!(
            unknown_options(&none, OptionsPath::Getsockopt),
            ["v6only", "freebind", "transparent", "bind_address_no_port"]
        );
        assert_eq!(
            unknown_options(&none, OptionsPath::SockBits),
            [
                "reuse_addr",
                "reuse_port",
                "v6only",
                "freebind",
                "transparent",
                "bind_address_no_port"
            ]
        );
        let no_freebind = KernelOffsets {
            freebind: portwatch_ebpf::FlagBit::default(),
            ..all
        };
        assert_eq!(
            unknown_options(&no_freebind, OptionsPath::SockBits),
            ["freebind"]
        );
    }

    #[test]
    fn a_moved_field_is_reported() {
        let err = check_field("t", SET_STATE, "sport", 26, 2).unwrap_err();
        assert!(err.to_string().contains("offset 24"), "{err}");
        let err = check_field("t", SET_STATE, "family", 28, 2).unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
        assert!(check_field("t", SET_STATE, "skaddr", 8, 8).is_ok());
    }
}
