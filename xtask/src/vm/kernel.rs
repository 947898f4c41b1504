//! Stock Debian kernels for the VM runs: fetched from the Debian archive by
//! package name with apt-get, unpacked with `dpkg -x`, and cached under
//! `target/vm/kernels/<package>`, so a second run needs no download.
//!
//! The kernels of Debian 12 (bookworm) come through the machine's own apt
//! sources. Debian 11's (bullseye) come through a private sources list made
//! from the machine's bookworm entries with the suite renamed, used with
//! private list and cache directories: the machine's apt configuration is
//! never changed.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use super::cache;
use crate::{arch::Arch, cmd};

/// One kernel of the matrix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Kernel {
    /// The short name used on the command line and in the table.
    pub name: &'static str,
    /// The Debian package holding `vmlinuz` and the modules.
    pub package: &'static str,
    /// The Debian release the package comes from.
    pub release: Release,
    pub arch: Arch,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Release {
    /// Debian 12: the machine's own apt sources.
    Bookworm,
    /// Debian 11: a private sources list.
    Bullseye,
}

/// The matrix, oldest first. The `-cloud-amd64` flavour boots fastest and
/// has every driver the VM needs built in.
pub const KERNELS: [Kernel; 3] = [
    Kernel {
        name: "5.10",
        package: "linux-image-5.10.0-32-cloud-amd64",
        release: Release::Bullseye,
        arch: Arch::Amd64,
    },
    Kernel {
        name: "6.1",
        package: "linux-image-6.1.0-50-cloud-amd64",
        release: Release::Bookworm,
        arch: Arch::Amd64,
    },
    Kernel {
        name: "6.12",
        package: "linux-image-6.12.111+deb12-cloud-amd64",
        release: Release::Bookworm,
        arch: Arch::Amd64,
    },
];

/// The arm64 kernels: Debian 12's, the same release as amd64's 6.1. Its
/// `-cloud-arm64` flavour has BTF, the PL011 console and virtio built in.
pub const ARM64_KERNELS: [Kernel; 1] = [Kernel {
    name: "6.1",
    package: "linux-image-6.1.0-50-cloud-arm64",
    release: Release::Bookworm,
    arch: Arch::Arm64,
}];

/// The kernels of the matrix for `arch`.
pub fn kernels(arch: Arch) -> &'static [Kernel] {
    match arch {
        Arch::Amd64 => &KERNELS,
        Arch::Arm64 => &ARM64_KERNELS,
    }
}

/// The kernels of `matrix` that `names` pick, each once, in the order
/// named; every one for `all` or no name.
pub fn choose(matrix: &[Kernel], names: &[String]) -> Result<Vec<Kernel>> {
    if names.is_empty() || names.iter().any(|n| n == "all") {
        return Ok(matrix.to_vec());
    }
    let mut chosen: Vec<Kernel> = Vec::new();
    for name in names {
        let Some(kernel) = matrix.iter().find(|k| k.name == name) else {
            let known: Vec<&str> = matrix.iter().map(|k| k.name).collect();
            bail!(
                "no kernel `{name}` in the matrix; known: {}, all",
                known.join(", ")
            );
        };
        if !chosen.contains(kernel) {
            chosen.push(*kernel);
        }
    }
    Ok(chosen)
}

/// A kernel ready to boot.
pub struct Unpacked {
    /// The kernel image.
    pub vmlinuz: PathBuf,
    /// `lib/modules/<version>` of the package.
    pub modules: PathBuf,
}

/// The kernel unpacked in `cache`, downloading it first if it is not there.
pub fn fetch(kernel: &Kernel, cache: &Path) -> Result<Unpacked> {
    let dir = cache.join("kernels").join(kernel.package);
    let tree = dir.join("tree");
    cache::once(&dir.join(".unpacked"), kernel.package, || {
        println!("vm: fetching {} ({})", kernel.name, kernel.package);
        let _ = fs::remove_dir_all(&tree);
        if kernel.arch.is_host() {
            let download = cache.join("downloads");
            fs::create_dir_all(&download)
                .with_context(|| format!("creating {}", download.display()))?;
            let deb = download_deb(kernel, cache, &download)?;
            fs::create_dir_all(&tree).with_context(|| format!("creating {}", tree.display()))?;
            cmd::run(Command::new("dpkg").arg("-x").arg(&deb).arg(&tree))
        } else {
            // Another architecture's package lists: mmdebstrap fetches and
            // unpacks it (with its few dependencies) without touching the
            // machine's apt configuration.
            foreign_extract(kernel.arch, &[kernel.package], cache, &tree)
        }
    })?;
    unpacked(&tree)
}

/// `boot/vmlinuz-*` and `lib/modules/*` of an unpacked package.
fn unpacked(tree: &Path) -> Result<Unpacked> {
    let only = |dir: &Path, prefix: &str| -> Result<PathBuf> {
        let mut found: Vec<PathBuf> = fs::read_dir(dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|path| {
                path.file_name()
                    .is_some_and(|name| name.to_string_lossy().starts_with(prefix))
            })
            .collect();
        match found.len() {
            1 => Ok(found.remove(0)),
            n => bail!(
                "{} holds {n} entries named {prefix}*, expected one",
                dir.display()
            ),
        }
    };
    // Debian's merged /usr puts the modules under usr/lib on newer packages.
    let modules_root = ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|dir| tree.join(dir))
        .find(|dir| dir.is_dir())
        .with_context(|| format!("{} has no lib/modules", tree.display()))?;
    Ok(Unpacked {
        vmlinuz: only(&tree.join("boot"), "vmlinuz-")?,
        modules: only(&modules_root, "")?,
    })
}

/// Downloads the package's .deb into `into`; its path.
fn download_deb(kernel: &Kernel, cache: &Path, into: &Path) -> Result<PathBuf> {
    let mut apt = Command::new("apt-get");
    apt.current_dir(into);
    if kernel.release == Release::Bullseye {
        let private = PrivateApt::bullseye(cache)?;
        private.configure(&mut apt);
        let mut update = Command::new("apt-get");
        private.configure(&mut update);
        update.arg("update");
        cmd::run(&mut update)?;
    }
    apt.args(["download", kernel.package]);
    cmd::run(&mut apt)?;
    let deb = fs::read_dir(into)?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .find(|path| {
            path.file_name().is_some_and(|name| {
                let name = name.to_string_lossy();
                name.starts_with(&format!("{}_", kernel.package.replace('+', "%2b")))
                    || name.starts_with(&format!("{}_", kernel.package))
            })
        })
        .with_context(|| format!("apt-get download left no {}_*.deb", kernel.package))?;
    Ok(deb)
}

/// Debian 12's `packages` for `arch` (with their dependencies) unpacked in
/// `into`, by mmdebstrap's extract variant: nothing is configured and no
/// maintainer script runs, so no emulator is needed.
pub fn foreign_extract(arch: Arch, packages: &[&str], cache: &Path, into: &Path) -> Result<()> {
    let sources = bookworm_sources(cache)?;
    let _ = fs::remove_dir_all(into);
    if let Some(parent) = into.parent() {
        fs::create_dir_all(parent)?;
    }
    cmd::run(
        Command::new("mmdebstrap")
            .args(["--variant=extract", "--quiet"])
            .arg(format!("--architectures={}", arch.debian()))
            .arg(format!("--include={}", packages.join(",")))
            .arg("bookworm")
            .arg(into)
            .arg(&sources),
    )
    .context("mmdebstrap (Debian package mmdebstrap: cargo xtask setup)")
}

/// The machine's Debian 12 apt sources, as one deb822 file in `cache` that
/// mmdebstrap reads.
pub fn bookworm_sources(cache: &Path) -> Result<PathBuf> {
    let mut sources = String::new();
    for path in machine_sources()? {
        let text =
            fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        sources.push_str(&rename_suite(&text, "bookworm", "bookworm"));
    }
    if sources.is_empty() {
        bail!(
            "the machine's apt sources (/etc/apt/sources.list.d/*.sources) name no bookworm suite"
        );
    }
    fs::create_dir_all(cache)?;
    let list = cache.join("bookworm.sources");
    fs::write(&list, sources)?;
    Ok(list)
}

/// apt-get options that point it at a sources list, package lists and a
/// cache of our own.
struct PrivateApt {
    sources: PathBuf,
    lists: PathBuf,
    cache: PathBuf,
}

impl PrivateApt {
    /// Debian 11: the machine's bookworm entries with the suite renamed.
    fn bullseye(cache: &Path) -> Result<PrivateApt> {
        let root = cache.join("apt-bullseye");
        let lists = root.join("lists");
        let apt_cache = root.join("cache");
        fs::create_dir_all(lists.join("partial"))?;
        fs::create_dir_all(apt_cache.join("archives/partial"))?;
        let mut own = String::new();
        for path in machine_sources()? {
            let text =
                fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
            own.push_str(&rename_suite(&text, "bookworm", "bullseye"));
            own.push('\n');
        }
        if !own.contains("bullseye") {
            bail!(
                "the machine's apt sources (/etc/apt/sources.list, /etc/apt/sources.list.d/*.sources) name no bookworm suite to derive Debian 11's from"
            );
        }
        let sources = root.join("bullseye.sources");
        fs::write(&sources, own)?;
        Ok(PrivateApt {
            sources,
            lists,
            cache: apt_cache,
        })
    }

    fn configure(&self, apt: &mut Command) {
        let opt = |key: &str, value: &Path| format!("-o{key}={}", value.display());
        apt.arg(opt("Dir::Etc::SourceList", Path::new("/dev/null")))
            .arg(opt(
                "Dir::Etc::SourceParts",
                self.sources.parent().unwrap_or(Path::new("/")),
            ))
            .arg(opt("Dir::State::Lists", &self.lists))
            .arg(opt("Dir::Cache", &self.cache))
            .env("DEBIAN_FRONTEND", "noninteractive");
    }
}

/// The machine's deb822 source files (`/etc/apt/sources.list.d/*.sources`,
/// Debian 12's default format).
fn machine_sources() -> Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    if let Ok(entries) = fs::read_dir("/etc/apt/sources.list.d") {
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|ext| ext == "sources") {
                found.push(path);
            }
        }
    }
    found.sort();
    Ok(found)
}

/// The stanzas of a deb822 sources file that name suite `from` (or
/// `from-<pocket>`), with those suites renamed to `to`. Other stanzas are
/// left out.
pub fn rename_suite(deb822: &str, from: &str, to: &str) -> String {
    let mut out = String::new();
    for stanza in deb822.split("\n\n") {
        let mut renamed = false;
        let lines: Vec<String> = stanza
            .lines()
            .filter(|line| !line.trim_start().starts_with('#'))
            .map(|line| {
                let Some(suites) = line.strip_prefix("Suites:") else {
                    return line.to_owned();
                };
                let kept: Vec<String> = suites
                    .split_whitespace()
                    .filter_map(|suite| {
                        let rest = suite.strip_prefix(from)?;
                        (rest.is_empty() || rest.starts_with('-')).then(|| format!("{to}{rest}"))
                    })
                    .filter(|suite| !suite.ends_with("-backports"))
                    .collect();
                renamed = !kept.is_empty();
                format!("Suites: {}", kept.join(" "))
            })
            .collect();
        if renamed {
            out.push_str(&lines.join("\n"));
            out.push_str("\n\n");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_private_list_keeps_the_machines_mirrors_and_renames_the_suite() {
        let machine = "Types: deb
# a comment
URIs: http://mirror.invalid/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://mirror.invalid/debian-security
Suites: bookworm-security
Components: main

Types: deb
URIs: https://elsewhere.invalid/apt
Suites: nodistro
Components: main";
        let renamed = rename_suite(machine, "bookworm", "bullseye");
        assert!(
            renamed.contains("Suites: bullseye bullseye-updates\n"),
            "{renamed}"
        );
        assert!(renamed.contains("Suites: bullseye-security\n"), "{renamed}");
        assert!(
            renamed.contains("URIs: http://mirror.invalid/debian\n"),
            "{renamed}"
        );
        assert!(renamed.contains("Signed-By:"), "{renamed}");
        assert!(!renamed.contains("nodistro"), "{renamed}");
        assert!(!renamed.contains("bookworm"), "{renamed}");
        assert!(!renamed.contains('#'), "{renamed}");
    }

    #[test]
    fn names_are_unique_and_oldest_first() {
        let names: Vec<&str> = KERNELS.iter().map(|k| k.name).collect();
        assert_eq!(names, ["5.10", "6.1", "6.12"]);
    }
}
