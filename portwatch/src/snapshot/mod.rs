//! The start-up snapshot, and the source of truth for reconciliation: every
//! TCP and UDP socket that holds a local port, in every network namespace on
//! the machine, with the processes that hold it.
//!
//! How it is taken, and what each step costs:
//! 1. Namespaces (`netns.rs`): one `stat` of `/proc/<pid>/ns/net` per process,
//!    plus the bind mounts in `/run/netns`; one open file per distinct
//!    namespace pins it until the snapshot is done.
//! 2. Sockets (`diag.rs`): worker threads enter each namespace (`setns` moves
//!    only the calling thread; the caller's thread never moves) and open a
//!    NETLINK_SOCK_DIAG socket there. A netlink socket answers for the
//!    namespace it was created in, and its SO_NETNS_COOKIE names that
//!    namespace. Four dumps per namespace (TCP and UDP, IPv4 and IPv6), about
//!    32 KiB of records per `recv`.
//! 3. Owners ([`owners`]): one pass over `/proc/<pid>/fd` for the whole
//!    machine, one `readlinkat` per descriptor, keeping only the inodes step 2
//!    returned; `comm`, `status` and `cgroup` are read once per holding process.
//! 4. Sharing options (`options.rs`): sock_diag cannot report SO_REUSEADDR or
//!    SO_REUSEPORT, so for listening and bound sockets a copy of an owner's
//!    descriptor is taken with `pidfd_getfd` and asked (five system calls per
//!    socket). Where that is not permitted the options stay unknown.
//!
//! The snapshot is not atomic: a socket opened or closed while it runs may be
//! missed, or seen without an owner. The kernel programs' events cover that
//! window; nothing here is guessed.

pub mod addresses;
mod diag;
pub mod ephemeral;
mod netns;
mod options;
pub mod owners;
pub mod workload;

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    io,
    num::{NonZeroU64, NonZeroUsize},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    thread,
    time::{Duration, Instant, SystemTime},
};

use serde::{Deserialize, Serialize};

pub use self::{
    diag::bound_only_tcp_listed,
    netns::{netns_cookie_of_current_thread, netns_named_by_inode},
};
use self::{
    diag::{Diag, DiagSocket, Dump},
    netns::{Namespace, NetnsKey},
    owners::{Place, ProcInfo},
    workload::Workload,
};
use crate::{
    map::{Holder, NOBODY, NOWHERE, Observed},
    socket::{NetnsCookie, SocketFacts},
};

/// What a snapshot reads beyond the sock_diag listing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct SnapshotConfig {
    /// Map sockets to the processes holding them (a pass over
    /// `/proc/<pid>/fd`). Default true; a periodic reconciliation that only
    /// needs the socket list may turn it off.
    pub read_owners: bool,
    /// Read SO_REUSEADDR/SO_REUSEPORT of listening and bound sockets through
    /// `pidfd_getfd`. Default true; needs `read_owners`.
    pub read_options: bool,
    /// Only sockets that hold a port for receiving (listening, or bound and
    /// unconnected), which is all the map keeps: connections and TIME_WAIT
    /// are neither listed nor looked up in `/proc`. Default false; failure
    /// attribution needs the connections too.
    pub holders_only: bool,
}

impl Default for SnapshotConfig {
    fn default() -> Self {
        SnapshotConfig {
            read_owners: true,
            read_options: true,
            holders_only: false,
        }
    }
}

/// Everything a snapshot found.
#[derive(Debug)]
pub struct Snapshot {
    /// Every TCP and UDP socket holding a local port, namespace by namespace.
    pub sockets: Vec<SnapshotSocket>,
    /// The namespaces that were listed.
    pub namespaces: Vec<NetnsInfo>,
    /// Namespaces that were found but could not be listed, and why.
    pub skipped_netns: Vec<SkippedNetns>,
    /// Listening and bound sockets whose SO_REUSEADDR/SO_REUSEPORT stayed
    /// unknown (no owner, or copying the descriptor was not permitted).
    pub options_unreadable: u64,
    /// Processes whose descriptors could not be read (not root).
    pub processes_unreadable: u64,
    /// When the snapshot started.
    pub taken_at: SystemTime,
    /// How long it took, in total and step by step.
    pub elapsed: Duration,
    pub phases: Phases,
}

/// How long each step of a snapshot took.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Phases {
    /// Finding namespaces (`/proc/<pid>/ns/net`, `/run/netns`).
    pub discover: Duration,
    /// Entering them and the sock_diag dumps.
    pub listing: Duration,
    /// The `/proc/<pid>/fd` scan and the holders' comm, status and cgroup.
    pub owners: Duration,
    /// pidfd_getfd and getsockopt on listening and bound sockets.
    pub options: Duration,
}

impl Snapshot {
    /// The namespaces whose sockets this snapshot lists completely.
    pub fn listed_netns(&self) -> BTreeSet<NetnsCookie> {
        self.namespaces.iter().map(|ns| ns.cookie).collect()
    }

    /// What this snapshot could not see, one sentence each, with the
    /// capability that would let it (empty when it saw everything).
    pub fn limits(&self) -> Vec<String> {
        let mut limits = Vec::new();
        if let Some(first) = self.skipped_netns.first() {
            limits.push(format!(
                "{} network namespaces could not be listed (first: {}: {}); entering them \
                 needs CAP_SYS_ADMIN, so their sockets are known only from live events",
                self.skipped_netns.len(),
                first.path.display(),
                first.error
            ));
        }
        limits.extend(owner_limits(
            self.processes_unreadable,
            self.options_unreadable,
        ));
        limits
    }

    /// The snapshot's sockets in the form the per-port map merges and
    /// reconciles. They leave the snapshot (its namespaces, times and counts
    /// stay), so that a reconciliation does not hold two lists at once: each
    /// is 9 MiB at 100k sockets. (The start-up keeps one copy more,
    /// [`Snapshot::unowned`], until the owners are read.)
    pub fn take_observed(&mut self) -> Vec<Observed> {
        observe_all(std::mem::take(&mut self.sockets))
    }

    /// A copy of the sockets of this listing, taken without owners, for
    /// [`Unowned::read`] to find their processes and options once the
    /// daemon is ready.
    pub fn unowned(&self, read_options: bool) -> Unowned {
        Unowned {
            sockets: self.sockets.clone(),
            read_options,
        }
    }
}

/// Sockets listed before the daemon was ready, whose processes (and
/// SO_REUSEADDR/SO_REUSEPORT) are read after: the `/proc/*/fd` pass and the
/// descriptor copies cost several times the listing at 100k sockets, and
/// none of it is needed to see every later bind.
#[derive(Debug)]
pub struct Unowned {
    sockets: Vec<SnapshotSocket>,
    read_options: bool,
}

/// What [`Unowned::read`] found.
#[derive(Debug)]
pub struct Owned {
    /// The sockets with their holders, places and options.
    pub observed: Vec<Observed>,
    /// Processes whose descriptors could not be read (not root).
    pub processes_unreadable: u64,
    /// Listening and bound sockets whose options stayed unknown.
    pub options_unreadable: u64,
    /// How long the owners and the options took.
    pub phases: Phases,
}

impl Unowned {
    /// How many sockets wait for their owners.
    pub fn len(&self) -> usize {
        self.sockets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sockets.is_empty()
    }

    /// One pass over `/proc/<pid>/fd`, then the options. Blocking.
    pub fn read(mut self) -> Result<Owned, SnapshotError> {
        let mut phases = Phases::default();
        let (processes_unreadable, options_unreadable) =
            read_owners(&mut self.sockets, self.read_options, &mut phases)?;
        Ok(Owned {
            observed: observe_all(self.sockets),
            processes_unreadable,
            options_unreadable,
            phases,
        })
    }
}

impl Owned {
    /// What the owners and options could not be read for, one line each.
    pub fn limits(&self) -> Vec<String> {
        owner_limits(self.processes_unreadable, self.options_unreadable)
    }
}

/// What could not be read of the owners and options of a listing.
fn owner_limits(processes_unreadable: u64, options_unreadable: u64) -> Vec<String> {
    let mut limits = Vec::new();
    if processes_unreadable > 0 {
        limits.push(format!(
            "{processes_unreadable} processes' descriptors could not be read; owner lookup \
             needs CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH"
        ));
    }
    if options_unreadable > 0 {
        limits.push(format!(
            "SO_REUSEADDR/SO_REUSEPORT of {options_unreadable} existing sockets stay unknown; \
             reading them needs CAP_SYS_PTRACE (pidfd_getfd)"
        ));
    }
    limits
}

/// `sockets` as the map keeps them.
fn observe_all(sockets: Vec<SnapshotSocket>) -> Vec<Observed> {
    let mut shared = Shared::default();
    // Observed is as large as SnapshotSocket (checked below), so std
    // collects this in the listing's buffer rather than a second one: an
    // optimisation it makes, not a promise, hence only a saving.
    sockets
        .into_iter()
        .map(|socket| observe(socket, &mut shared))
        .collect()
}

/// One socket, with what only a snapshot knows about it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SnapshotSocket {
    #[serde(flatten)]
    pub facts: SocketFacts,
    /// Socket inode (`socket:[INODE]`); 0 for TIME_WAIT entries.
    pub inode: u64,
    /// Every process holding a descriptor of the socket, by pid then fd.
    pub owners: Vec<Owner>,
}

/// A process holding a socket.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Owner {
    pub pid: u32,
    /// The descriptor number in that process.
    pub fd: i32,
    /// Its name, uid and place, read once per process and shared by its
    /// sockets: a process with 100k sockets is not copied 100k times.
    pub info: Arc<ProcInfo>,
}

/// A network namespace that was listed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NetnsInfo {
    pub cookie: NetnsCookie,
    /// Inode of the namespace file (what `ip netns identify`, `lsns` show).
    pub inode: u64,
    /// Names under /run/netns, if any.
    pub names: Vec<String>,
}

/// A network namespace that could not be listed.
#[derive(Debug)]
pub struct SkippedNetns {
    /// The file it was found through.
    pub path: PathBuf,
    pub error: SnapshotError,
}

/// Why a snapshot, or one namespace of it, failed.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// Reading /proc failed: without it no namespace and no owner is found.
    #[error("reading {path}: {source}")]
    Proc {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A namespace file (or the /run/netns directory) could not be opened.
    #[error("opening network namespace {path}: {source}")]
    NetnsOpen {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A file under /run/netns is not a namespace (left by a failed
    /// `ip netns add`, or the bind mount was undone).
    #[error("{path} is not a network namespace")]
    NotNetns { path: PathBuf },
    /// Entering a namespace failed (setns needs CAP_SYS_ADMIN).
    #[error("entering network namespace {path}: {source}")]
    Setns {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Reading SO_NETNS_COOKIE failed (it needs Linux 5.14 or later).
    #[error("reading the network namespace cookie: {0}")]
    Cookie(#[source] io::Error),
    /// Trying what the kernel's sock_diag lists, in a namespace of its own,
    /// failed (creating the namespace needs CAP_SYS_ADMIN).
    #[error("probing sock_diag in a private network namespace: {0}")]
    Probe(#[source] io::Error),
    /// Opening a NETLINK_SOCK_DIAG socket failed.
    #[error("opening a sock_diag netlink socket: {0}")]
    NetlinkOpen(#[source] io::Error),
    /// Sending a dump request failed.
    #[error("sending a sock_diag request: {0}")]
    NetlinkSend(#[source] io::Error),
    /// Receiving dump records failed.
    #[error("receiving sock_diag records: {0}")]
    NetlinkRecv(#[source] io::Error),
    /// The kernel refused or aborted a dump (ENOENT: no diag support for
    /// that protocol, e.g. udp_diag not built).
    #[error("the kernel refused the {protocol} {} sock_diag dump: {source}", .family.name())]
    DiagRefused {
        protocol: crate::socket::Protocol,
        family: crate::socket::Family,
        #[source]
        source: io::Error,
    },
    /// The kernel has no sock_diag handler for these dumps (ENOENT): the
    /// `inet_diag`, `tcp_diag` or `udp_diag` module is missing and could not
    /// be loaded.
    #[error("the kernel has no sock_diag handler for the {} dumps (No such file or directory)", dump_names(.refused))]
    NoHandler {
        refused: Vec<(crate::socket::Protocol, crate::socket::Family)>,
    },
    /// A record from the kernel could not be decoded.
    #[error("decoding a sock_diag record: {0}")]
    Decode(#[source] netlink_packet_core::DecodeError),
    /// No worker thread could be started to enter the namespaces.
    #[error("starting a namespace worker thread: {0}")]
    Thread(#[source] io::Error),
}

/// `tcp ipv4, udp ipv6`.
fn dump_names(dumps: &[(crate::socket::Protocol, crate::socket::Family)]) -> String {
    let names: Vec<String> = dumps
        .iter()
        .map(|(protocol, family)| format!("{protocol} {}", family.name()))
        .collect();
    names.join(", ")
}

/// Takes a snapshot of every namespace on the machine.
///
/// Fails only when /proc cannot be read or the caller's own namespace cannot
/// be listed; other namespaces that fail are reported in
/// [`Snapshot::skipped_netns`], and processes that exit meanwhile are skipped.
pub fn take(config: &SnapshotConfig) -> Result<Snapshot, SnapshotError> {
    let started = Instant::now();
    let taken_at = SystemTime::now();
    let own = netns::own_key()?;
    let mut skipped_netns = Vec::new();
    let mut phases = Phases::default();
    let mut phase = Instant::now();
    let found = netns::discover(own, &mut skipped_netns)?;
    phases.discover = lap(&mut phase);

    let mut namespaces = Vec::with_capacity(found.len());
    let mut listed = Vec::new();
    let dumps = in_each_namespace(&found, own, |diag| {
        let cookie = diag.netns_cookie()?;
        let mut sockets = Vec::new();
        let dump = if config.holders_only {
            Dump::Holders
        } else {
            Dump::All
        };
        diag.dump_all(cookie, dump, &mut sockets)?;
        Ok(NetnsDump { cookie, sockets })
    })?;
    for (ns, dump) in found.iter().zip(dumps) {
        match dump {
            Ok(dump) => {
                namespaces.push(NetnsInfo {
                    cookie: dump.cookie,
                    inode: ns.key.1,
                    names: ns.names.clone(),
                });
                if listed.is_empty() {
                    // One namespace, or the first: its listing as it is,
                    // not a copy (100k sockets are 9 MiB).
                    listed = dump.sockets;
                } else {
                    listed.extend(dump.sockets);
                }
            }
            Err(error) if ns.key == own => return Err(error),
            Err(error) => skipped_netns.push(SkippedNetns {
                path: ns.path.clone(),
                error,
            }),
        }
    }
    drop(found);
    phases.listing = lap(&mut phase);

    let mut sockets: Vec<SnapshotSocket> = listed
        .into_iter()
        // UDP is dumped whole; its connected sockets go here.
        .filter(|diag| !config.holders_only || diag.facts.state.is_listening_or_bound())
        .map(|DiagSocket { facts, inode, .. }| SnapshotSocket {
            facts,
            inode,
            owners: Vec::new(),
        })
        .collect();
    let (processes_unreadable, options_unreadable) = if config.read_owners {
        read_owners(&mut sockets, config.read_options, &mut phases)?
    } else if config.read_options {
        (
            0,
            sockets.iter().filter(|s| wants_options(s)).count() as u64,
        )
    } else {
        (0, 0)
    };

    Ok(Snapshot {
        sockets,
        namespaces,
        skipped_netns,
        options_unreadable,
        processes_unreadable,
        taken_at,
        elapsed: started.elapsed(),
        phases,
    })
}

impl Snapshot {
    /// Finds the owners of every socket of a snapshot taken without them
    /// (one pass over `/proc/<pid>/fd`), as [`SnapshotConfig::read_owners`]
    /// would have.
    pub fn attach_owners(&mut self) -> Result<(), SnapshotError> {
        let started = Instant::now();
        self.processes_unreadable = attach_owners(&mut self.sockets)?;
        self.phases.owners = started.elapsed();
        self.elapsed += self.phases.owners;
        Ok(())
    }
}

/// The owners of `sockets`, then (with `read_options`) their options, each
/// step timed in `phases`; how many processes and sockets stayed unread.
fn read_owners(
    sockets: &mut [SnapshotSocket],
    read_options: bool,
    phases: &mut Phases,
) -> Result<(u64, u64), SnapshotError> {
    let mut phase = Instant::now();
    let processes_unreadable = attach_owners(sockets)?;
    phases.owners = lap(&mut phase);
    let mut options_unreadable = 0;
    if read_options {
        options_unreadable = read_share_options(sockets);
        phases.options = lap(&mut phase);
    }
    Ok((processes_unreadable, options_unreadable))
}

/// The time since `*since`, restarting it.
fn lap(since: &mut Instant) -> Duration {
    let now = Instant::now();
    let elapsed = now - *since;
    *since = now;
    elapsed
}

/// The sockets of one namespace.
struct NetnsDump {
    cookie: NetnsCookie,
    sockets: Vec<DiagSocket>,
}

/// More threads than this mostly contend: every namespace's dump walks the
/// same machine-wide socket hash tables, skipping other namespaces' sockets.
const MAX_WORKERS: usize = 8;

/// Runs `work` with a sock_diag socket inside every namespace, from worker
/// threads that take them in turn; results come back in the order of
/// `namespaces`.
pub(crate) fn in_each_namespace<T: Send>(
    namespaces: &[Namespace],
    own: NetnsKey,
    work: impl Fn(&mut Diag) -> Result<T, SnapshotError> + Sync,
) -> Result<Vec<Result<T, SnapshotError>>, SnapshotError> {
    let workers = thread::available_parallelism()
        .map_or(1, NonZeroUsize::get)
        .clamp(1, MAX_WORKERS)
        .min(namespaces.len().max(1));
    let next = AtomicUsize::new(0);
    if namespaces.iter().all(|ns| ns.key == own) {
        // Only this thread's own namespace (a host without containers):
        // no namespace to enter, so no thread to start. One worker takes
        // the namespaces in order.
        let done = netns_worker(namespaces, own, &work, &next);
        return Ok(done.into_iter().map(|(_, result)| result).collect());
    }
    let mut results: Vec<Option<Result<T, SnapshotError>>> =
        namespaces.iter().map(|_| None).collect();
    let spawned = thread::scope(|scope| {
        let mut handles = Vec::with_capacity(workers);
        let mut spawn_error = None;
        for _ in 0..workers {
            let spawned = thread::Builder::new()
                .name("portwatch-netns".into())
                .spawn_scoped(scope, || netns_worker(namespaces, own, &work, &next));
            match spawned {
                Ok(handle) => handles.push(handle),
                Err(error) => {
                    spawn_error = Some(error);
                    break;
                }
            }
        }
        let any = !handles.is_empty();
        for handle in handles {
            match handle.join() {
                Ok(done) => {
                    for (index, result) in done {
                        results[index] = Some(result);
                    }
                }
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        match spawn_error {
            // The workers that did start took every namespace between them.
            Some(error) if !any => Err(SnapshotError::Thread(error)),
            _ => Ok(()),
        }
    });
    spawned?;
    Ok(results
        .into_iter()
        .map(|result| result.expect("every namespace is taken by a worker"))
        .collect())
}

/// One worker: takes namespaces off the shared counter until none are left.
/// It starts in its creator's namespace and moves only itself.
fn netns_worker<T>(
    namespaces: &[Namespace],
    own: NetnsKey,
    work: &(impl Fn(&mut Diag) -> Result<T, SnapshotError> + Sync),
    next: &AtomicUsize,
) -> Vec<(usize, Result<T, SnapshotError>)> {
    let mut here = own;
    let mut done = Vec::new();
    loop {
        let index = next.fetch_add(1, Ordering::Relaxed);
        let Some(ns) = namespaces.get(index) else {
            return done;
        };
        let result = (|| {
            if ns.key != here {
                netns::enter(ns)?;
                here = ns.key;
            }
            work(&mut Diag::open()?)
        })();
        done.push((index, result));
    }
}

/// Fills in `owners`; returns how many processes could not be read.
fn attach_owners(sockets: &mut [SnapshotSocket]) -> Result<u64, SnapshotError> {
    let wanted: HashSet<u64> = sockets
        .iter()
        .map(|s| s.inode)
        .filter(|&inode| inode != 0)
        .collect();
    if wanted.is_empty() {
        return Ok(0);
    }
    let scan = owners::scan_fds(&wanted)?;
    let mut processes: HashMap<u32, Option<Arc<ProcInfo>>> = HashMap::new();
    for socket in sockets.iter_mut() {
        let Some(holders) = scan.by_inode.get(&socket.inode) else {
            continue;
        };
        for holder in holders {
            // A process that exited since the fd scan is skipped.
            let info = processes
                .entry(holder.pid)
                .or_insert_with(|| owners::process_info(holder.pid).ok().map(Arc::new));
            if let Some(info) = info {
                socket.owners.push(Owner {
                    pid: holder.pid,
                    fd: holder.fd,
                    info: info.clone(),
                });
            }
        }
        socket.owners.sort_by_key(|owner| (owner.pid, owner.fd));
    }
    Ok(scan.unreadable)
}

/// Sockets whose sharing options matter to binds.
fn wants_options(socket: &SnapshotSocket) -> bool {
    socket.facts.state.is_listening_or_bound()
}

/// Fills in SO_REUSEADDR/SO_REUSEPORT; returns how many stayed unknown.
fn read_share_options(sockets: &mut [SnapshotSocket]) -> u64 {
    let mut reader = options::OptionReader::default();
    let mut unreadable = 0;
    for socket in sockets.iter_mut().filter(|s| wants_options(s)) {
        let holders = socket.owners.iter().map(|owner| (owner.pid, owner.fd));
        match reader.read(holders, socket.facts.cookie) {
            Some(read) => {
                socket.facts.options.reuse_addr = Some(read.reuse_addr);
                socket.facts.options.reuse_port = Some(read.reuse_port);
            }
            None => unreadable += 1,
        }
    }
    unreadable
}

/// `socket` as the map keeps it. The first owner (lowest pid) names the
/// cgroup, unit and container; `places` holds each process's, shared.
fn observe(socket: SnapshotSocket, shared: &mut Shared) -> Observed {
    let SnapshotSocket {
        facts,
        inode,
        owners,
    } = socket;
    let (place, holders) = match owners.as_slice() {
        [] => (NOWHERE.clone(), NOBODY.clone()),
        [first, rest @ ..] => {
            let (place, alone) = shared.process(first);
            if rest.iter().all(|owner| owner.pid == first.pid) {
                (place, alone)
            } else {
                // Owners come by pid, then fd: one holder per process.
                let mut holders: Vec<Holder> = owners.iter().map(Owner::holder).collect();
                holders.dedup_by_key(|holder| holder.pid);
                (place, holders.into())
            }
        }
    };
    Observed {
        facts,
        holders,
        inode: NonZeroU64::new(inode),
        place,
    }
}

// What lets `take_observed` convert the sockets in place.
const _: () = assert!(size_of::<Observed>() == size_of::<SnapshotSocket>());
const _: () = assert!(align_of::<Observed>() == align_of::<SnapshotSocket>());

/// What the sockets of one listing share: each process's place and holder
/// list. Sockets with no known owner (every socket of a listing taken
/// without owners) share the map's empty ones.
#[derive(Default)]
struct Shared {
    processes: HashMap<u32, (Arc<Place>, Arc<[Holder]>)>,
}

impl Shared {
    /// The place of `owner`'s process, and a list of it alone.
    fn process(&mut self, owner: &Owner) -> (Arc<Place>, Arc<[Holder]>) {
        self.processes
            .entry(owner.pid)
            .or_insert_with(|| {
                let place = Place {
                    // Named later, once per place (Workloads::name_shared).
                    workload: Workload::default(),
                    ..owner.info.place.clone()
                };
                (Arc::new(place), Arc::new([owner.holder()]))
            })
            .clone()
    }
}

impl Owner {
    fn holder(&self) -> Holder {
        Holder {
            pid: self.pid,
            process: self.info.process.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use super::*;
    use crate::socket::{Family, Protocol, ShareOptions, SockState};

    fn socket(owners: Vec<Owner>, inode: u64) -> SnapshotSocket {
        SnapshotSocket {
            facts: SocketFacts {
                cookie: 7,
                netns: 4096,
                protocol: Protocol::Tcp,
                family: Family::Ipv4,
                address: IpAddr::V4(Ipv4Addr::LOCALHOST),
                port: 8000,
                state: SockState::Listening,
                options: ShareOptions::default(),
                uid: Some(0),
                bound_dev_if: 0,
            },
            inode,
            owners,
        }
    }

    fn owner(pid: u32, unit: Option<&str>) -> Owner {
        Owner {
            pid,
            fd: 3,
            info: Arc::new(ProcInfo {
                process: format!("p{pid}"),
                uid: 0,
                place: Place {
                    cgroup: Some("/system.slice/nginx.service".into()),
                    unit: unit.map(str::to_owned),
                    ..Place::default()
                },
            }),
        }
    }

    #[test]
    fn observed_keeps_every_holder_and_the_first_owners_unit() {
        let seen = observe(
            socket(
                vec![owner(10, Some("nginx.service")), owner(11, None)],
                1234,
            ),
            &mut Shared::default(),
        );
        assert_eq!(seen.inode, NonZeroU64::new(1234));
        assert_eq!(seen.place.unit.as_deref(), Some("nginx.service"));
        assert_eq!(
            seen.place.cgroup.as_deref(),
            Some("/system.slice/nginx.service")
        );
        let pids: Vec<u32> = seen.holders.iter().map(|h| h.pid).collect();
        assert_eq!(pids, [10, 11]);
    }

    #[test]
    fn observed_without_owner_or_inode_leaves_them_unknown() {
        let seen = observe(socket(Vec::new(), 0), &mut Shared::default());
        assert_eq!(seen.inode, None);
        assert_eq!(seen.place.cgroup, None);
        assert!(seen.holders.is_empty());
    }

    #[test]
    fn sockets_share_their_process_and_one_descriptor_more_is_no_holder_more() {
        let mut shared = Shared::default();
        let mut twice = owner(10, Some("nginx.service"));
        twice.fd = 4;
        let one = observe(socket(vec![owner(10, None), twice], 1), &mut shared);
        let other = observe(socket(vec![owner(10, None)], 2), &mut shared);
        assert_eq!(one.holders.len(), 1);
        assert!(Arc::ptr_eq(&one.holders, &other.holders));
        assert!(Arc::ptr_eq(&one.place, &other.place));
        // Sockets without owners share one empty place: a listing taken
        // without owners names one place, not one per socket.
        let a = observe(socket(Vec::new(), 3), &mut shared);
        let b = observe(socket(Vec::new(), 4), &mut shared);
        assert!(Arc::ptr_eq(&a.place, &b.place));
        assert_eq!(*a.place, Place::default());
    }

    #[test]
    fn config_defaults_read_everything() {
        let config: SnapshotConfig = serde_json::from_str("{}").expect("empty config");
        assert_eq!(config, SnapshotConfig::default());
        assert!(config.read_owners && config.read_options);
        let config: SnapshotConfig =
            serde_json::from_str(r#"{"read_options": false}"#).expect("config");
        assert!(config.read_owners && !config.read_options);
    }
}
