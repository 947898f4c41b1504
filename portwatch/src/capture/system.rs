//! The environment the kernel programs need, checked before loading them:
//! privileges, BTF, tracefs and the cgroup2 mount. Each failure is one line
//! that says what is wrong and how to fix it.

use std::{
    fs,
    path::{Path, PathBuf},
};

use crate::snapshot::owners::effective_capabilities as parse_cap_eff;

/// Where the kernel publishes its own BTF.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";
/// Where tracefs is mounted on current kernels.
pub const TRACEFS: &str = "/sys/kernel/tracing";

/// Capabilities, as numbered in `linux/capability.h`.
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// What is missing from the environment.
#[derive(Debug, thiserror::Error)]
pub enum EnvError {
    /// The process lacks a capability needed to load and attach programs.
    #[error(
        "missing capability {0}: run portwatch as root, or grant CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN"
    )]
    MissingCapability(&'static str),
    /// The kernel does not expose BTF.
    #[error("no BTF at {VMLINUX_BTF}: portwatch needs a kernel built with CONFIG_DEBUG_INFO_BTF=y")]
    NoBtf,
    /// tracefs is not mounted and could not be mounted.
    #[error(
        "tracefs is not mounted at {TRACEFS} and mounting it failed ({0}): run `mount -t tracefs nodev {TRACEFS}`"
    )]
    NoTracefs(#[source] std::io::Error),
    /// tracefs is there but this process may not look into it.
    #[error(
        "cannot read {TRACEFS} (permission denied): outside root, the tracepoints need CAP_DAC_READ_SEARCH"
    )]
    TracefsDenied,
    /// No cgroup2 file system is mounted.
    #[error(
        "no cgroup2 mount found in /proc/self/mounts: mount one (`mount -t cgroup2 none /sys/fs/cgroup`) or pass --cgroup PATH"
    )]
    NoCgroup2,
    /// The cgroup given is not a cgroup2 directory.
    #[error("{0} is not a cgroup2 directory (no cgroup.procs in it)")]
    NotACgroup(PathBuf),
    /// Reading a file under /proc failed.
    #[error("reading {path}: {source}")]
    Read {
        path: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// Checks every requirement; mounts tracefs if it is missing and we may.
pub fn check() -> Result<(), EnvError> {
    check_capabilities()?;
    if !Path::new(VMLINUX_BTF).exists() {
        return Err(EnvError::NoBtf);
    }
    ensure_tracefs()
}

fn check_capabilities() -> Result<(), EnvError> {
    let status = fs::read_to_string("/proc/self/status").map_err(|source| EnvError::Read {
        path: "/proc/self/status",
        source,
    })?;
    let effective = parse_cap_eff(&status).unwrap_or(0);
    missing_capability(effective).map_or(Ok(()), |cap| Err(EnvError::MissingCapability(cap)))
}

/// The first required capability absent from `effective`. CAP_SYS_ADMIN
/// stands in for CAP_BPF and CAP_PERFMON, as it does in the kernel.
fn missing_capability(effective: u64) -> Option<&'static str> {
    let has = |cap: u32| effective & (1 << cap) != 0;
    let admin = has(CAP_SYS_ADMIN);
    if !(has(CAP_BPF) || admin) {
        return Some("CAP_BPF");
    }
    if !(has(CAP_PERFMON) || admin) {
        return Some("CAP_PERFMON");
    }
    if !has(CAP_NET_ADMIN) {
        return Some("CAP_NET_ADMIN");
    }
    None
}

fn ensure_tracefs() -> Result<(), EnvError> {
    let events = Path::new(TRACEFS).join("events");
    match fs::metadata(&events) {
        Ok(meta) if meta.is_dir() => return Ok(()),
        Err(err) if err.kind() == std::io::ErrorKind::PermissionDenied => {
            return Err(EnvError::TracefsDenied);
        }
        _ => {}
    }
    match nix::mount::mount(
        Some("nodev"),
        TRACEFS,
        Some("tracefs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    ) {
        Ok(()) => {
            tracing::info!("mounted tracefs at {TRACEFS}");
            Ok(())
        }
        // Another process (a second portwatch, systemd's automount) mounted
        // it between the check and the mount.
        Err(nix::errno::Errno::EBUSY) if events.is_dir() => Ok(()),
        Err(errno) => Err(EnvError::NoTracefs(errno.into())),
    }
}

/// The cgroup to watch: `explicit` if given, else the cgroup2 mount's root.
pub fn cgroup_root(explicit: Option<&Path>) -> Result<PathBuf, EnvError> {
    let path = match explicit {
        Some(path) => path.to_path_buf(),
        None => {
            let mounts =
                fs::read_to_string("/proc/self/mounts").map_err(|source| EnvError::Read {
                    path: "/proc/self/mounts",
                    source,
                })?;
            cgroup2_mount(&mounts).ok_or(EnvError::NoCgroup2)?
        }
    };
    if !path.join("cgroup.procs").exists() {
        return Err(EnvError::NotACgroup(path));
    }
    Ok(path)
}

/// The first cgroup2 mount point in the text of `/proc/self/mounts`.
/// Mount points with spaces are octal-escaped there (`\040`).
pub fn cgroup2_mount(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_source, target, fstype) = (fields.next()?, fields.next()?, fields.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(unescape_mount_path(target)))
    })
}

fn unescape_mount_path(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(pos) = rest.find('\\') {
        out.push_str(&rest[..pos]);
        let code = rest.get(pos + 1..pos + 4);
        match code.and_then(|digits| u8::from_str_radix(digits, 8).ok()) {
            Some(byte) => {
                out.push(char::from(byte));
                rest = &rest[pos + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[pos + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0
cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
";

    #[test]
    fn finds_cgroup2_in_hybrid_mode() {
        assert_eq!(
            cgroup2_mount(HYBRID),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn finds_cgroup2_in_unified_mode() {
        let mounts = "cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid 0 0\n";
        assert_eq!(cgroup2_mount(mounts), Some(PathBuf::from("/sys/fs/cgroup")));
    }

    #[test]
    fn no_cgroup2_mount() {
        let mounts = "cgroup /sys/fs/cgroup/cpu cgroup rw 0 0\nproc /proc proc rw 0 0\n";
        assert_eq!(cgroup2_mount(mounts), None);
        assert_eq!(cgroup2_mount(""), None);
    }

    #[test]
    fn unescapes_spaces_in_mount_points() {
        let mounts = "none /mnt/my\\040cgroups cgroup2 rw 0 0\n";
        assert_eq!(
            cgroup2_mount(mounts),
            Some(PathBuf::from("/mnt/my cgroups"))
        );
    }

    #[test]
    fn truncated_mount_lines_are_skipped() {
        assert_eq!(cgroup2_mount("cgroup2 /x\n"), None);
    }

    #[test]
    fn parses_capability_masks() {
        let status = "Name:\tportwatch\nCapEff:\t000001ffffffffff\nCapBnd:\t0\n";
        assert_eq!(parse_cap_eff(status), Some(0x1ff_ffff_ffff));
        assert_eq!(parse_cap_eff("Name: x\n"), None);
        assert_eq!(parse_cap_eff("CapEff:\tzz\n"), None);
    }

    #[test]
    fn names_the_first_missing_capability() {
        let bit = |cap: u32| 1u64 << cap;
        assert_eq!(missing_capability(0), Some("CAP_BPF"));
        assert_eq!(missing_capability(bit(CAP_BPF)), Some("CAP_PERFMON"));
        assert_eq!(
            missing_capability(bit(CAP_BPF) | bit(CAP_PERFMON)),
            Some("CAP_NET_ADMIN")
        );
        assert_eq!(
            missing_capability(bit(CAP_BPF) | bit(CAP_PERFMON) | bit(CAP_NET_ADMIN)),
            None
        );
        assert_eq!(
            missing_capability(bit(CAP_SYS_ADMIN) | bit(CAP_NET_ADMIN)),
            None
        );
    }
}
