//! Who holds a socket: descriptors found under `/proc/<pid>/fd`, and what the
//! holding process is (name, uid, cgroup, systemd unit, container, and the
//! workload's names).
//!
//! The parsers ([`socket_inode`], [`effective_uid`], [`cgroup_path`],
//! [`systemd_unit`], [`container_id`]) are pure and public: the event side,
//! which knows a cgroup path, names units and containers the same way. The
//! workload's names come from the node's files ([`Workloads`]), read by the
//! daemon for the places it keeps, not by every snapshot.
//!
//! Only the group leader's descriptor table is read (`/proc/<pid>/fd`); a
//! thread made with its own table (clone without CLONE_FILES) is not. Paths
//! are as this process's cgroup namespace shows them.

use std::{
    collections::{HashMap, HashSet},
    ffi::CString,
    fs::{self, File},
    io,
    os::{
        fd::AsRawFd,
        unix::{ffi::OsStringExt, fs::MetadataExt as _},
    },
    path::{Path, PathBuf},
    sync::Arc,
};

use super::{
    SnapshotError,
    workload::{Workload, Workloads},
};

/// One descriptor that refers to a wanted socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FdRef {
    pub pid: u32,
    pub fd: i32,
}

/// The result of one pass over `/proc/<pid>/fd`.
#[derive(Debug, Default)]
pub(crate) struct FdScan {
    pub by_inode: HashMap<u64, Vec<FdRef>>,
    /// Processes whose descriptors we may not read.
    pub unreadable: u64,
}

/// Finds every descriptor of every process that refers to a socket inode in
/// `wanted`. Fails only if /proc itself cannot be listed.
pub(crate) fn scan_fds(wanted: &HashSet<u64>) -> Result<FdScan, SnapshotError> {
    let mut scan = FdScan::default();
    let entries = fs::read_dir("/proc").map_err(|source| SnapshotError::Proc {
        path: "/proc".into(),
        source,
    })?;
    let mut link = [0u8; 64];
    for entry in entries.flatten() {
        let Some(pid) = pid_of(&entry) else {
            continue;
        };
        match scan_process(pid, wanted, &mut link, &mut scan.by_inode) {
            Ok(()) => {}
            Err(error) if error.kind() == io::ErrorKind::PermissionDenied => scan.unreadable += 1,
            // ENOENT/ESRCH: the process exited meanwhile.
            Err(_) => {}
        }
    }
    Ok(scan)
}

fn scan_process(
    pid: u32,
    wanted: &HashSet<u64>,
    link: &mut [u8; 64],
    by_inode: &mut HashMap<u64, Vec<FdRef>>,
) -> io::Result<()> {
    let path = format!("/proc/{pid}/fd");
    let dir = File::open(&path)?;
    for entry in fs::read_dir(&path)? {
        let name = entry?.file_name();
        let Some(fd) = name.to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(name) = CString::new(name.into_vec()) else {
            continue;
        };
        // SAFETY: `name` is NUL-terminated and the kernel writes at most
        // `link.len()` bytes into `link`.
        let len = unsafe {
            libc::readlinkat(
                dir.as_raw_fd(),
                name.as_ptr(),
                link.as_mut_ptr().cast(),
                link.len(),
            )
        };
        let Ok(len) = usize::try_from(len) else {
            let error = io::Error::last_os_error();
            // Without ptrace access to the process, no link reads: the
            // process is unreadable. Otherwise it closed meanwhile: skipped.
            if matches!(error.raw_os_error(), Some(libc::EACCES | libc::EPERM)) {
                return Err(io::Error::from(io::ErrorKind::PermissionDenied));
            }
            continue;
        };
        if let Some(inode) = socket_inode(&link[..len])
            && wanted.contains(&inode)
        {
            by_inode.entry(inode).or_default().push(FdRef { pid, fd });
        }
    }
    Ok(())
}

/// What a snapshot tells about a process holding a socket.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ProcInfo {
    /// Process name (`comm`).
    pub process: String,
    /// Effective uid.
    pub uid: u32,
    /// Its cgroup v2 path and the systemd unit and container found in it
    /// (workload names come later, from the container runtime).
    pub place: Place,
}

/// Where a process lives: its cgroup v2 path, the systemd unit and
/// container found in that path, and the workload's names.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, serde::Serialize)]
pub struct Place {
    pub cgroup: Option<String>,
    pub unit: Option<String>,
    pub container: Option<String>,
    #[serde(flatten)]
    pub workload: Workload,
}

impl Place {
    /// The place `/proc/<pid>/cgroup` (its text, `cgroups`) names.
    pub fn from_cgroups(cgroups: &str) -> Place {
        let cgroup = cgroup_path(cgroups);
        Place {
            cgroup: cgroup.map(str::to_owned),
            unit: cgroup.and_then(systemd_unit).map(str::to_owned),
            container: cgroup.and_then(container_id).map(str::to_owned),
            workload: Workload::default(),
        }
    }

    /// `self` with its workload's names, as `workloads` finds them from its
    /// cgroup path and container id.
    pub fn with_workload(mut self, workloads: &Workloads) -> Place {
        self.workload = workloads.of(self.cgroup.as_deref(), self.container.as_deref());
        self
    }

    /// Whether a name its ids promise is still missing (the kubelet writes
    /// a pod's files just after its first container starts).
    fn names_pending(&self) -> bool {
        (self.workload.pod_uid.is_some() && self.workload.pod.is_none())
            || (self.container.is_some() && self.workload.container_name.is_none())
    }

    /// `self`, with what it does not know taken from `other`.
    pub fn or(self, other: Place) -> Place {
        Place {
            cgroup: self.cgroup.or(other.cgroup),
            unit: self.unit.or(other.unit),
            container: self.container.or(other.container),
            workload: self.workload.or(other.workload),
        }
    }
}

/// Where the processes named by events live, remembered per pid so that a
/// burst of binds reads `/proc/<pid>/cgroup` once.
///
/// Every event carries the cgroup id the kernel saw (on cgroup v2, the
/// inode number of the cgroup's directory). A remembered place is used only
/// while the event's id matches it, and a fresh read is kept only if its
/// directory has that inode: a pid reused by another process, a process
/// moved to another cgroup, or one that exited before it was read get no
/// place rather than a wrong one.
///
/// A place is remembered with its workload's names; while a name its ids
/// promise is missing, it is asked of `workloads` again at each call (which
/// lists the kubelet's files at most every few seconds).
pub(crate) struct PlaceCache {
    /// The cgroup2 mount the paths of `/proc/<pid>/cgroup` are under; when
    /// unknown, places are taken as read.
    mount: Option<PathBuf>,
    workloads: Arc<Workloads>,
    known: HashMap<u32, (u64, Place)>,
}

impl PlaceCache {
    /// Pids remembered at most; the cache starts over past this.
    const CAPACITY: usize = 4096;

    pub fn new(mount: Option<PathBuf>, workloads: Arc<Workloads>) -> PlaceCache {
        PlaceCache {
            mount,
            workloads,
            known: HashMap::new(),
        }
    }

    /// Where `pid`, which the kernel saw in cgroup `cgroup_id` (0: not
    /// known), lives.
    pub fn of(&mut self, pid: u32, cgroup_id: u64) -> Place {
        if let Some((id, place)) = self.known.get(&pid)
            && *id == cgroup_id
            && cgroup_id != 0
        {
            let place = place.clone();
            if !place.names_pending() {
                return place;
            }
            let named = place.with_workload(&self.workloads);
            self.known.insert(pid, (cgroup_id, named.clone()));
            return named;
        }
        let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        let place = verified(Place::from_cgroups(&text), cgroup_id, self.mount.as_deref())
            .with_workload(&self.workloads);
        if place.cgroup.is_some() && cgroup_id != 0 {
            if self.known.len() >= Self::CAPACITY {
                self.known.clear();
            }
            self.known.insert(pid, (cgroup_id, place.clone()));
        }
        place
    }
}

/// `place` if its cgroup directory under `mount` is cgroup `cgroup_id`;
/// no place if it is another one or is gone. Taken as read when it cannot
/// be checked: the id or the mount is not known, or the cgroup lies outside
/// the daemon's cgroup namespace (`/../..`, a daemon in a container whose
/// mount shows only its own subtree).
fn verified(place: Place, cgroup_id: u64, mount: Option<&Path>) -> Place {
    let (Some(mount), Some(path)) = (mount, place.cgroup.as_deref()) else {
        return place;
    };
    if cgroup_id == 0 || path.split('/').any(|part| part == "..") {
        return place;
    }
    let dir = mount.join(path.trim_start_matches('/'));
    match fs::metadata(&dir) {
        Ok(meta) if meta.ino() == cgroup_id => place,
        _ => Place::default(),
    }
}

/// Reads `comm`, `status` and `cgroup` of a process.
pub(crate) fn process_info(pid: u32) -> io::Result<ProcInfo> {
    let comm = fs::read_to_string(format!("/proc/{pid}/comm"))?;
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let uid = effective_uid(&status)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no Uid line in status"))?;
    let cgroups = fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
    Ok(ProcInfo {
        process: comm.trim_end_matches('\n').to_owned(),
        uid,
        place: Place::from_cgroups(&cgroups),
    })
}

/// The pid a `/proc` directory entry names, if it names one.
pub(super) fn pid_of(entry: &fs::DirEntry) -> Option<u32> {
    entry.file_name().to_str()?.parse().ok()
}

/// The inode of a `/proc/<pid>/fd/N` link target `socket:[INODE]`.
pub fn socket_inode(target: &[u8]) -> Option<u64> {
    let digits = target.strip_prefix(b"socket:[")?.strip_suffix(b"]")?;
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// The `CapEff:` mask from the text of `/proc/<pid>/status`.
pub fn effective_capabilities(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
}

/// The effective capabilities of thread `tid` of process `pid` (they are
/// per thread); `None` once it has exited.
pub(crate) fn thread_capabilities(pid: u32, tid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).ok()?;
    effective_capabilities(&status)
}

/// The effective uid from `/proc/<pid>/status` (`Uid: real effective saved fs`).
pub fn effective_uid(status: &str) -> Option<u32> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The cgroup path from `/proc/<pid>/cgroup`: the v2 line `0::/...`, else
/// (a v1-only host) the `name=systemd` hierarchy.
pub fn cgroup_path(cgroups: &str) -> Option<&str> {
    cgroups
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .or_else(|| {
            cgroups
                .lines()
                .find_map(|line| line.split_once(":name=systemd:").map(|(_, path)| path))
        })
}

/// Unit types systemd gives a cgroup of their own and that hold processes
/// (slices only group other units).
const UNIT_SUFFIXES: [&str; 5] = [".service", ".scope", ".socket", ".mount", ".swap"];

/// The innermost systemd unit in a cgroup path: `nginx.service` in
/// `/system.slice/nginx.service`, `app-foo.scope` in a user session.
pub fn systemd_unit(path: &str) -> Option<&str> {
    path.rsplit('/').find(|component| {
        UNIT_SUFFIXES
            .iter()
            .any(|suffix| component.len() > suffix.len() && component.ends_with(suffix))
    })
}

/// The innermost container id (64 lowercase hex digits) in a cgroup path, as
/// docker, containerd, CRI-O and podman name their cgroups:
/// `docker-<id>.scope`, `cri-containerd-<id>.scope`, `crio-<id>.scope`,
/// `libpod-<id>.scope`, and with the cgroupfs driver `/docker/<id>` or
/// `/kubepods/<class>/pod<uid>/<id>`. The conmon monitor's own cgroup
/// (`libpod-conmon-<id>.scope`, `crio-conmon-<id>.scope`) is not the
/// container.
pub fn container_id(path: &str) -> Option<&str> {
    path.rsplit('/').find_map(|component| {
        let stem = component.strip_suffix(".scope").unwrap_or(component);
        if stem.contains("-conmon-") {
            return None;
        }
        let id = stem.rsplit('-').next()?;
        is_container_id(id).then_some(id)
    })
}

pub(crate) fn is_container_id(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn a_place_is_kept_only_if_its_cgroup_is_the_one_the_kernel_named() {
        let mount = std::env::temp_dir().join(format!("pw-place-{}", std::process::id()));
        let unit = mount.join("system.slice/demo.service");
        fs::create_dir_all(&unit).unwrap();
        let inode = fs::metadata(&unit).unwrap().ino();
        let place = Place::from_cgroups("0::/system.slice/demo.service\n");
        assert_eq!(place.unit.as_deref(), Some("demo.service"));

        assert_eq!(verified(place.clone(), inode, Some(&mount)), place);
        // Another cgroup now: the pid was reused, or the process moved.
        assert_eq!(
            verified(place.clone(), inode + 1, Some(&mount)),
            Place::default()
        );
        // Unknown id or mount: as read.
        assert_eq!(verified(place.clone(), 0, Some(&mount)), place);
        assert_eq!(verified(place.clone(), inode + 1, None), place);
        // Outside the daemon's cgroup namespace: cannot be checked, as read.
        let outside = Place::from_cgroups("0::/../../system.slice/demo.service\n");
        assert_eq!(outside.unit.as_deref(), Some("demo.service"));
        assert_eq!(verified(outside.clone(), inode + 1, Some(&mount)), outside);
        // The cgroup is gone (a transient unit that ended).
        fs::remove_dir_all(&mount).unwrap();
        assert_eq!(verified(place, inode, Some(&mount)), Place::default());
        // An exited process: nothing read, nothing kept.
        assert_eq!(
            verified(Place::default(), inode, Some(&mount)),
            Place::default()
        );
    }

    #[test]
    fn socket_links_give_their_inode() {
        assert_eq!(socket_inode(b"socket:[1234]"), Some(1234));
        assert_eq!(
            socket_inode(b"socket:[18446744073709551615]"),
            Some(u64::MAX)
        );
        for other in [
            &b"socket:[]"[..],
            b"socket:[12a]",
            b"socket:[+12]",
            b"socket:[1234",
            b"pipe:[1234]",
            b"anon_inode:[eventfd]",
            b"/dev/null",
            b"socket:[99999999999999999999]",
        ] {
            assert_eq!(
                socket_inode(other),
                None,
                "{}",
                String::from_utf8_lossy(other)
            );
        }
    }

    #[test]
    fn effective_uid_is_the_second_field() {
        let status = "Name:\tnginx\nUmask:\t0022\nState:\tS (sleeping)\nUid:\t1000\t33\t33\t33\nGid:\t0\t0\t0\t0\n";
        assert_eq!(effective_uid(status), Some(33));
        assert_eq!(effective_uid("Name:\tx\n"), None);
    }

    #[test]
    fn cgroup_path_prefers_the_v2_line() {
        assert_eq!(
            cgroup_path("0::/system.slice/nginx.service\n"),
            Some("/system.slice/nginx.service")
        );
        let hybrid = "12:cpu,cpuacct:/system.slice/a.service\n1:name=systemd:/system.slice/a.service\n0::/system.slice/a.service\n";
        assert_eq!(cgroup_path(hybrid), Some("/system.slice/a.service"));
        let v1 = "12:cpu,cpuacct:/\n1:name=systemd:/system.slice/b.service\n";
        assert_eq!(cgroup_path(v1), Some("/system.slice/b.service"));
        assert_eq!(cgroup_path("0::/\n"), Some("/"));
        assert_eq!(cgroup_path(""), None);
    }

    #[test]
    fn units_and_containers_from_real_cgroup_paths() {
        let docker_scope = format!("/system.slice/docker-{ID}.scope");
        let containerd = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod6b1e4f2a_3c1d_4e5f_9a8b_7c6d5e4f3a2b.slice/cri-containerd-{ID}.scope"
        );
        let crio = format!(
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1234.slice/crio-{ID}.scope"
        );
        let docker_cgroupfs = format!("/docker/{ID}");
        let kube_cgroupfs =
            format!("/kubepods/burstable/pod6b1e4f2a-3c1d-4e5f-9a8b-7c6d5e4f3a2b/{ID}");
        let podman = format!("/machine.slice/libpod-{ID}.scope/container");
        let podman_user =
            format!("/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope");
        let conmon = format!("/machine.slice/libpod-conmon-{ID}.scope");
        let docker_unit = format!("docker-{ID}.scope");
        let containerd_unit = format!("cri-containerd-{ID}.scope");
        let crio_unit = format!("crio-{ID}.scope");
        let podman_unit = format!("libpod-{ID}.scope");
        let conmon_unit = format!("libpod-conmon-{ID}.scope");
        let table: [(&str, Option<&str>, Option<&str>); 14] = [
            ("/system.slice/nginx.service", Some("nginx.service"), None),
            (
                "/user.slice/user-1000.slice/user@1000.service/app.slice/app-foo.scope",
                Some("app-foo.scope"),
                None,
            ),
            (
                "/user.slice/user-1000.slice/session-3.scope",
                Some("session-3.scope"),
                None,
            ),
            (
                "/system.slice/foo.service/payload",
                Some("foo.service"),
                None,
            ),
            (
                "/system.slice/systemd-udevd.service/udev",
                Some("systemd-udevd.service"),
                None,
            ),
            ("/init.scope", Some("init.scope"), None),
            ("/", None, None),
            (&docker_scope, Some(&docker_unit), Some(ID)),
            (&containerd, Some(&containerd_unit), Some(ID)),
            (&crio, Some(&crio_unit), Some(ID)),
            (&docker_cgroupfs, None, Some(ID)),
            (&kube_cgroupfs, None, Some(ID)),
            (&podman, Some(&podman_unit), Some(ID)),
            (&podman_user, Some(&podman_unit), Some(ID)),
        ];
        for (path, unit, container) in table {
            assert_eq!(systemd_unit(path), unit, "unit of {path}");
            assert_eq!(container_id(path), container, "container of {path}");
        }
        assert_eq!(systemd_unit(&conmon), Some(conmon_unit.as_str()));
        assert_eq!(container_id(&conmon), None, "conmon is not the container");
    }

    #[test]
    fn container_ids_are_exactly_64_lowercase_hex() {
        assert_eq!(container_id(&format!("/docker/{}", &ID[1..])), None);
        assert_eq!(container_id(&format!("/docker/{ID}0")), None);
        assert_eq!(
            container_id(&format!("/docker/{}", ID.to_uppercase())),
            None
        );
        assert_eq!(container_id("/system.slice/.service"), None);
        assert_eq!(systemd_unit("/system.slice/.service"), None);
        assert_eq!(systemd_unit("/system.slice"), None);
    }

    #[test]
    fn nested_containers_name_the_innermost() {
        let inner = ID.replace('0', "f");
        let path = format!("/docker/{ID}/docker/{inner}");
        assert_eq!(container_id(&path), Some(inner.as_str()));
    }
}
