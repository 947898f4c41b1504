//! Finding every network namespace on the machine, and entering one.
//!
//! A namespace is named by (device, inode) of its nsfs file. It is found
//! through a process in it (`/proc/<pid>/ns/net`) or a bind mount
//! (`/run/netns/NAME`, what `ip netns add` makes). A namespace kept alive only
//! by an open descriptor or a socket, or entered by a single thread of a
//! process, is not found.
//!
//! Entering moves only the calling thread (`setns(fd, CLONE_NEWNET)`), so it
//! is done from the snapshot's worker threads, never the caller's.

use std::{
    collections::HashMap,
    fs::{self, File},
    io,
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::fs::MetadataExt,
    },
    path::{Path, PathBuf},
};

use super::{SkippedNetns, SnapshotError};
use crate::socket::NetnsCookie;

/// (st_dev, st_ino) of a namespace file: what tells namespaces apart.
pub(crate) type NetnsKey = (u64, u64);

/// The calling thread's namespace file.
pub(crate) const THREAD_NETNS: &str = "/proc/thread-self/ns/net";

/// Where `ip netns` keeps its bind mounts (`/var/run` is often a link to
/// `/run`; duplicates are merged by key).
const NAMED_DIRS: [&str; 2] = ["/run/netns", "/var/run/netns"];

/// `SO_NETNS_COOKIE` from `asm-generic/socket.h` (x86, arm, arm64, riscv...;
/// the `libc` crate does not export it for these targets).
const SO_NETNS_COOKIE: libc::c_int = 71;

/// A namespace found, held open so it cannot go away before it is listed.
pub(crate) struct Namespace {
    pub key: NetnsKey,
    pub file: File,
    /// The path it was first found through.
    pub path: PathBuf,
    /// Its names under /run/netns.
    pub names: Vec<String>,
}

/// The (device, inode) of the calling thread's namespace.
pub(crate) fn current_thread_key() -> io::Result<NetnsKey> {
    let meta = fs::metadata(THREAD_NETNS)?;
    Ok((meta.dev(), meta.ino()))
}

/// The calling thread's namespace, as a listing starts from it.
pub(crate) fn own_key() -> Result<NetnsKey, SnapshotError> {
    current_thread_key().map_err(|source| SnapshotError::Proc {
        path: THREAD_NETNS.into(),
        source,
    })
}

/// Every namespace: the caller's first, then the named ones, then those of
/// processes. Problems with a named file are reported in `skipped`; processes
/// that exit meanwhile are skipped silently.
pub(crate) fn discover(
    own: NetnsKey,
    skipped: &mut Vec<SkippedNetns>,
) -> Result<Vec<Namespace>, SnapshotError> {
    let mut found = Found::default();
    let own_file = File::open(THREAD_NETNS).map_err(|source| SnapshotError::Proc {
        path: THREAD_NETNS.into(),
        source,
    })?;
    found.push(Namespace {
        key: own,
        file: own_file,
        path: THREAD_NETNS.into(),
        names: Vec::new(),
    });
    // Every nsfs file shares one device number.
    let nsfs_dev = own.0;

    for dir in NAMED_DIRS {
        let entries = match fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(error) if error.kind() == io::ErrorKind::NotFound => continue,
            Err(source) => {
                skipped.push(SkippedNetns {
                    path: dir.into(),
                    error: SnapshotError::NetnsOpen {
                        path: dir.into(),
                        source,
                    },
                });
                continue;
            }
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Err(error) = found.add_named(&path, name, nsfs_dev) {
                skipped.push(SkippedNetns { path, error });
            }
        }
    }

    let proc_entries = fs::read_dir("/proc").map_err(|source| SnapshotError::Proc {
        path: "/proc".into(),
        source,
    })?;
    for entry in proc_entries.flatten() {
        let Some(pid) = super::owners::pid_of(&entry) else {
            continue;
        };
        found.add_process(pid);
    }
    Ok(found.namespaces)
}

#[derive(Default)]
struct Found {
    namespaces: Vec<Namespace>,
    by_key: HashMap<NetnsKey, usize>,
}

impl Found {
    fn index(&self, key: NetnsKey) -> Option<usize> {
        self.by_key.get(&key).copied()
    }

    /// Adds a namespace not seen yet; returns its index.
    fn push(&mut self, ns: Namespace) -> usize {
        let index = self.namespaces.len();
        self.by_key.insert(ns.key, index);
        self.namespaces.push(ns);
        index
    }

    fn add_named(&mut self, path: &Path, name: String, nsfs_dev: u64) -> Result<(), SnapshotError> {
        let open_error = |source| SnapshotError::NetnsOpen {
            path: path.to_owned(),
            source,
        };
        let meta = fs::metadata(path).map_err(open_error)?;
        if meta.dev() != nsfs_dev {
            return Err(SnapshotError::NotNetns {
                path: path.to_owned(),
            });
        }
        let key = (meta.dev(), meta.ino());
        let index = match self.index(key) {
            Some(index) => index,
            None => {
                let file = File::open(path).map_err(open_error)?;
                let meta = file.metadata().map_err(open_error)?;
                // Remounted between stat and open: trust what was opened.
                let key = (meta.dev(), meta.ino());
                match self.index(key) {
                    Some(index) => index,
                    None => self.push(Namespace {
                        key,
                        file,
                        path: path.to_owned(),
                        names: Vec::new(),
                    }),
                }
            }
        };
        let names = &mut self.namespaces[index].names;
        if !names.contains(&name) {
            names.push(name);
        }
        Ok(())
    }

    fn add_process(&mut self, pid: u32) {
        let path = PathBuf::from(format!("/proc/{pid}/ns/net"));
        // Gone, or a kernel thread we may not look at: either way, skipped.
        let Ok(meta) = fs::metadata(&path) else {
            return;
        };
        if self.index((meta.dev(), meta.ino())).is_some() {
            return;
        }
        let Ok(file) = File::open(&path) else {
            return;
        };
        // The pid may have been reused between stat and open: trust what
        // was opened.
        let Ok(meta) = file.metadata() else {
            return;
        };
        let key = (meta.dev(), meta.ino());
        if self.index(key).is_none() {
            self.push(Namespace {
                key,
                file,
                path,
                names: Vec::new(),
            });
        }
    }
}

/// Moves the calling thread into `ns`.
pub(crate) fn enter(ns: &Namespace) -> Result<(), SnapshotError> {
    // SAFETY: setns on a descriptor we hold; it changes only this thread's
    // network namespace, which the caller (a worker thread) owns.
    let rc = unsafe { libc::setns(ns.file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(SnapshotError::Setns {
            path: ns.path.clone(),
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// `SIOCGSKNS` from `linux/sockios.h`: a descriptor of the socket's
/// network namespace (Linux 4.9+).
const SIOCGSKNS: libc::c_ulong = 0x894C;

/// The id of the namespace a socket lives in: its cookie (SO_NETNS_COOKIE,
/// Linux 5.14+), or on an older kernel its inode number (the namespace
/// file's, through SIOCGSKNS), which the kernel programs then report too
/// (`KernelOffsets::net_ns_inum`).
pub(crate) fn socket_netns_cookie(fd: BorrowedFd<'_>) -> io::Result<NetnsCookie> {
    match super::options::socket_option(fd, SO_NETNS_COOKIE) {
        Err(err) if err.raw_os_error() == Some(libc::ENOPROTOOPT) => socket_netns_inode(fd),
        other => other,
    }
}

/// The inode number of the namespace a socket lives in.
fn socket_netns_inode(fd: BorrowedFd<'_>) -> io::Result<NetnsCookie> {
    // SAFETY: SIOCGSKNS takes no argument and returns a new descriptor.
    let ns = unsafe { libc::ioctl(fd.as_raw_fd(), SIOCGSKNS as _) };
    if ns < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nobody else owns.
    let ns = File::from(unsafe { OwnedFd::from_raw_fd(ns) });
    Ok(ns.metadata()?.ino())
}

/// Whether this kernel names network namespaces by inode number for
/// portwatch: it has no SO_NETNS_COOKIE (before Linux 5.14).
pub fn netns_named_by_inode() -> bool {
    // SAFETY: socket(2) has no memory preconditions.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return false;
    }
    // SAFETY: a fresh descriptor nobody else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    matches!(
        super::options::socket_option::<u64>(socket.as_fd(), SO_NETNS_COOKIE),
        Err(err) if err.raw_os_error() == Some(libc::ENOPROTOOPT)
    )
}

/// The cookie of the calling thread's network namespace (the value the kernel
/// programs read with `bpf_get_netns_cookie`), from a throwaway UDP socket.
pub fn netns_cookie_of_current_thread() -> Result<NetnsCookie, SnapshotError> {
    // SAFETY: socket(2) has no memory preconditions.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(SnapshotError::Cookie(io::Error::last_os_error()));
    }
    // SAFETY: a fresh descriptor nobody else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    socket_netns_cookie(socket.as_fd()).map_err(SnapshotError::Cookie)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fallback of kernels before 5.14, tried on any kernel: a socket's
    /// namespace inode is the thread's namespace file's.
    #[test]
    #[ignore = "needs CAP_NET_ADMIN (SIOCGSKNS); run by `cargo xtask test`"]
    fn a_sockets_namespace_inode_is_the_namespace_files() {
        // SAFETY: socket(2) has no memory preconditions.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        assert!(fd >= 0);
        // SAFETY: a fresh descriptor nobody else owns.
        let socket = unsafe { OwnedFd::from_raw_fd(fd) };
        let inode = socket_netns_inode(socket.as_fd()).expect("SIOCGSKNS");
        assert_eq!(inode, fs::metadata(THREAD_NETNS).expect("ns file").ino());
        // This kernel has cookies, so they name namespaces here.
        assert!(!netns_named_by_inode());
        assert_ne!(socket_netns_cookie(socket.as_fd()).unwrap(), inode);
    }

    #[test]
    fn own_namespace_comes_first_and_has_a_cookie() {
        let own = current_thread_key().expect("own netns");
        let mut skipped = Vec::new();
        let found = discover(own, &mut skipped).expect("discover");
        assert_eq!(found[0].key, own);
        let mut keys: Vec<NetnsKey> = found.iter().map(|ns| ns.key).collect();
        keys.sort_unstable();
        keys.dedup();
        assert_eq!(keys.len(), found.len(), "each namespace once");
        let cookie = netns_cookie_of_current_thread().expect("SO_NETNS_COOKIE");
        assert_ne!(cookie, 0);
        assert_eq!(netns_cookie_of_current_thread().expect("again"), cookie);
    }
}
