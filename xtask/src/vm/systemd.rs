//! `cargo xtask vm --systemd`: the Debian package under a real systemd.
//!
//! portwatch's main use is a systemd service on servers, and the shipped
//! unit's sandbox (DynamicUser, ProtectSystem=strict, the system call filter,
//! RestrictNamespaces) can break a feature only under a real systemd. Each
//! run boots one of Debian 12's stock kernels with a Debian 12 userspace
//! whose PID 1 is systemd:
//!
//! - the userspace is made once by mmdebstrap from Debian's packages, with
//!   the machine's own apt sources, and cached under `target/vm/systemd`;
//! - the kernel's own modules are copied in (Debian builds the sock_diag
//!   families as modules) and indexed with depmod;
//! - the `.deb` of `cargo xtask package` is installed with `dpkg -i`, which
//!   enables the unit exactly as shipped;
//! - the sock_diag modules are blocked at boot, as on a hardened server, so
//!   the daemon first runs degraded;
//! - a oneshot unit runs `guest/systemd-checks.sh` once multi-user is
//!   reached, prints one console line per check, and powers off.
//!
//! The whole tree is the initramfs (systemd runs from it as the root file
//! system), so no disk image or loop device is needed. The guest has no
//! network device.

use std::{
    fmt::Write as _,
    fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use serde::Serialize;

use super::{
    Accel, cache, choose_accel,
    kernel::{self, KERNELS, Kernel, Release},
    qemu,
};
use crate::{build::target_dir, cmd, package};

const README_BEGIN: &str = "<!-- vm-systemd:begin (cargo xtask vm --systemd --write-readme) -->";
const README_END: &str = "<!-- vm-systemd:end -->";

/// The checks, run in the guest in this order (`guest/systemd-checks.sh`
/// prints each name). One that never reports counts as failed.
pub const CHECKS: &[&str] = &[
    "the package's unit is active (running) through Type=notify READY",
    "systemctl status shows the STATUS= line",
    "without the sock_diag modules it runs on live events and says what it cannot see",
    "once the modules can load, reconciliation resumes by itself",
    "a unit's listener is attributed to demo-listener.service",
    "a systemd-run unit's failed bind is in /failures with its unit, blocked_by demo-listener.service",
    "systemd-analyze security portwatch.service",
    "systemctl restart rebuilds the same map",
    "after a restart, a namespaced unit's listener and existing sockets' options are read (setns, pidfd_getfd)",
    "over TLS with basic auth and the key from LoadCredential=, 401 without the password and the CLI with it",
    "systemctl reload serves a renewed certificate in the same process, the map unchanged",
    "systemctl stop leaves no program loaded or attached (bpftool)",
    "a configuration error stops the start at ExecStartPre with one journal line, and no restart loop",
    "the watchdog restarts a SIGSTOPped daemon",
    "dpkg --purge removes the package, its unit, config and programs",
];

/// The guest's check script.
const CHECK_SCRIPT: &str = include_str!("guest/systemd-checks.sh");

/// What mmdebstrap installs besides the minimal base: systemd as PID 1, the
/// tools the checks use (curl, openssl for the remote-access certificates,
/// python3 for the demo listener and JSON,
/// bpftool, procps), and kmod to load the kernel's modules.
const PACKAGES: &[&str] = &[
    "systemd",
    "systemd-sysv",
    "dbus",
    "udev",
    "kmod",
    "iproute2",
    "procps",
    "curl",
    "openssl",
    "python3",
    "bpftool",
];

/// The port the demo listener holds and the transient unit fails to bind.
const DEMO_PORT: u16 = 8080;

/// A demo service: the seeds' `python3 -m http.server`.
fn demo_unit() -> String {
    format!(
        "[Unit]\nDescription=portwatch VM check: a listener owned by a unit\n\n[Service]\nExecStart=/usr/bin/python3 -m http.server {DEMO_PORT} --bind 127.0.0.1\n"
    )
}

/// The unit that runs the checks once the daemon has started (or failed to).
/// Not ordered after multi-user.target, which wants it: a target orders
/// itself after what it wants, and the two would form a cycle.
const CHECK_UNIT: &str = "[Unit]
Description=portwatch VM checks (cargo xtask vm --systemd)
After=portwatch.service

[Service]
Type=exec
ExecStart=/bin/bash /usr/local/lib/portwatch-vmtest/checks.sh

[Install]
WantedBy=multi-user.target
";

/// The transient unit's program: writes its pid, then binds the port the
/// demo listener holds (and fails with EADDRINUSE). The daemon reads where
/// a failing process lives when its event arrives, and one gone by then is
/// reported without a unit (never with a guessed one); so, as a service
/// busy logging its error would, it stays until `/failures` lists it (for
/// 60 s at most), and the check reads what was recorded, not a race.
const CLASH: &str = "import json, os, socket, sys, time, urllib.request
port, pid_file = int(sys.argv[1]), sys.argv[2]
with open(pid_file, 'w') as f:
    f.write(str(os.getpid()))
s = socket.socket()
try:
    s.bind(('127.0.0.1', port))
except OSError as err:
    print('bind failed:', err)
    for _ in range(600):
        with urllib.request.urlopen('http://127.0.0.1:7464/failures') as answer:
            if any(f['pid'] == os.getpid() for f in json.load(answer)['failures']):
                break
        time.sleep(0.1)
    sys.exit(1)
print('bind succeeded')
";

/// Blocks the sock_diag modules the way a hardened host lacks them; the
/// check script removes this file to let them load.
const BLOCK_DIAG: &str = "# cargo xtask vm --systemd: boot without sock_diag, as a hardened host\n\
install inet_diag /bin/false\ninstall tcp_diag /bin/false\ninstall udp_diag /bin/false\n";

pub struct Options<'a> {
    pub kernels: &'a [String],
    pub accel: Accel,
    pub write_readme: bool,
    pub limit: Duration,
}

/// `cargo xtask vm --systemd`.
pub fn run(options: &Options) -> Result<()> {
    let kernels = plan(options.kernels)?;
    if !cmd::is_root() {
        bail!("cargo xtask vm --systemd needs root (the guest's tree is made with chroot)");
    }
    let cache = target_dir().join("vm");
    let deb = package::package(crate::arch::Arch::host())?;
    let rootfs = rootfs(&cache.join("systemd"))?;
    let accel = choose_accel(options.accel, &cache, &kernels[0])?;

    let mut runs = Vec::new();
    for kernel in &kernels {
        let label = format!("{}, systemd", kernel.name);
        println!("\n==== vm: {label} ({}) ====", accel.name());
        let unpacked = kernel::fetch(kernel, &cache)?;
        let work = cache.join("runs").join(format!("systemd-{}", kernel.name));
        let _ = fs::remove_dir_all(&work);
        fs::create_dir_all(&work)?;
        let tree = work.join("tree");
        guest_tree(&rootfs, &unpacked.modules, &deb, &tree)?;
        let initrd = work.join("initramfs.cpio");
        pack(&tree, &initrd)?;
        // The tree is in the initramfs now; 600 MB less on disk.
        fs::remove_dir_all(&tree)?;
        let vm = qemu::Vm {
            arch: kernel.arch,
            kernel: &unpacked.vmlinuz,
            initrd: &initrd,
            append: "console=ttyS0 panic=-1 quiet loglevel=3 systemd.show_status=false \
                     systemd.unit=multi-user.target"
                .to_owned(),
            memory_mib: 3072,
            accel,
            console: work.join("console.log"),
            echo: Some(format!("[{label}] ")),
        };
        let boot = vm.run(options.limit)?;
        let mut report = Report::parse(&boot.console);
        if boot.timed_out {
            report
                .problems
                .push(format!("stopped at the {:?} limit", options.limit));
        }
        println!(
            "vm: {label}: {} in {:.0?}; console in {}",
            if report.ok() { "pass" } else { "FAIL" },
            boot.elapsed,
            vm.console.display()
        );
        runs.push(Run {
            label,
            package: kernel.package.to_owned(),
            seconds: boot.elapsed.as_secs(),
            report,
        });
    }

    super::publish(
        "systemd-results",
        &markdown(&runs),
        &runs,
        options.write_readme.then_some((README_BEGIN, README_END)),
    )?;
    let passed: usize = runs.iter().map(|r| r.report.passed()).sum();
    let failed: usize = runs.iter().map(|r| r.report.failed()).sum();
    println!("vm systemd summary: {passed} passed, {failed} failed");
    let bad: Vec<&str> = runs
        .iter()
        .filter(|r| !r.report.ok())
        .map(|r| r.label.as_str())
        .collect();
    if !bad.is_empty() {
        bail!("systemd VM runs failed: {}", bad.join(", "));
    }
    Ok(())
}

/// The kernels `--kernel` names: Debian 12's (its userspace is Debian 12's),
/// both by default.
fn plan(names: &[String]) -> Result<Vec<Kernel>> {
    let bookworm: Vec<Kernel> = KERNELS
        .into_iter()
        .filter(|k| k.release == Release::Bookworm)
        .collect();
    kernel::choose(&bookworm, names)
        .context("--systemd boots Debian 12's userspace on Debian 12's kernels only")
}

/// The Debian 12 userspace as a tar, made once by mmdebstrap (again when
/// the package list changes).
fn rootfs(dir: &Path) -> Result<PathBuf> {
    fs::create_dir_all(dir)?;
    let tar = dir.join("bookworm.tar");
    let packages = PACKAGES.join(",");
    cache::once(&dir.join("bookworm.tar.packages"), &packages, || {
        // The machine's own mirrors, as a deb822 file mmdebstrap reads.
        let list = kernel::bookworm_sources(dir)?;
        let mut strap = Command::new("mmdebstrap");
        strap
            .args(["--variant=minbase", "--quiet"])
            .arg(format!("--include={packages}"))
            .arg("bookworm")
            .arg(&tar)
            .arg(&list);
        cmd::run(&mut strap).context("mmdebstrap (Debian package mmdebstrap: cargo xtask setup)")
    })?;
    Ok(tar)
}

/// The guest's root: the userspace, the kernel's modules, the package
/// installed, the check units, systemd as `/init`.
fn guest_tree(rootfs: &Path, modules: &Path, deb: &Path, tree: &Path) -> Result<()> {
    fs::create_dir_all(tree)?;
    cmd::run(
        Command::new("tar")
            .args(["--extract", "--numeric-owner", "--file"])
            .arg(rootfs)
            .arg("--directory")
            .arg(tree),
    )?;
    // Room in the initramfs: nobody reads these in the guest.
    for dir in [
        "usr/share/doc",
        "usr/share/man",
        "usr/share/locale",
        "usr/share/info",
    ] {
        let _ = fs::remove_dir_all(tree.join(dir));
    }
    install_modules(modules, tree)?;

    let inside = tree.join("tmp").join("portwatch.deb");
    fs::copy(deb, &inside).with_context(|| format!("copying {}", deb.display()))?;
    // In a chroot the maintainer scripts enable the unit but do not start it.
    cmd::run(
        Command::new("chroot")
            .arg(tree)
            .args(["dpkg", "--install", "/tmp/portwatch.deb"])
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    fs::remove_file(&inside)?;

    let write = |path: &str, text: &str| -> Result<()> {
        let path = tree.join(path);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent)?;
        }
        fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
    };
    write("etc/systemd/system/demo-listener.service", &demo_unit())?;
    write("etc/systemd/system/portwatch-vmtest.service", CHECK_UNIT)?;
    write("usr/local/lib/portwatch-vmtest/checks.sh", CHECK_SCRIPT)?;
    write("usr/local/lib/portwatch-vmtest/clash.py", CLASH)?;
    write("etc/modprobe.d/pwsd-block-diag.conf", BLOCK_DIAG)?;
    write("etc/hostname", "portwatch-vm\n")?;
    let link = |target: &str, name: &str| -> Result<()> {
        let name = tree.join(name);
        if let Some(parent) = name.parent() {
            fs::create_dir_all(parent)?;
        }
        let _ = fs::remove_file(&name);
        symlink(target, &name).with_context(|| format!("linking {}", name.display()))
    };
    link(
        "/etc/systemd/system/portwatch-vmtest.service",
        "etc/systemd/system/multi-user.target.wants/portwatch-vmtest.service",
    )?;
    // A login prompt on ttyS0 would take the console the checks write to.
    link("/dev/null", "etc/systemd/system/serial-getty@ttyS0.service")?;
    link("/lib/systemd/systemd", "init")?;
    Ok(())
}

/// The kernel's networking modules (the sock_diag families among them) in
/// the guest's `/lib/modules/<version>`, indexed so modprobe finds them.
fn install_modules(modules: &Path, tree: &Path) -> Result<()> {
    let version = modules
        .file_name()
        .context("a kernel's module directory has no name")?
        .to_string_lossy()
        .into_owned();
    let into = tree.join("lib/modules").join(&version);
    fs::create_dir_all(into.join("kernel"))?;
    cmd::run(
        Command::new("cp")
            .arg("-a")
            .arg(modules.join("kernel/net"))
            .arg(into.join("kernel")),
    )?;
    for entry in fs::read_dir(modules)? {
        let path = entry?.path();
        let is_index = path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("modules."));
        if is_index && path.is_file() {
            fs::copy(&path, into.join(path.file_name().unwrap_or_default()))?;
        }
    }
    // The guest's own depmod (kmod is in its userspace).
    cmd::run(Command::new("chroot").arg(tree).arg("depmod").arg(&version))
}

/// The tree as an uncompressed newc cpio: the kernel unpacks it faster than
/// a compressed one under an emulated CPU.
fn pack(tree: &Path, out: &Path) -> Result<()> {
    let file = fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let mut find = Command::new("find");
    find.args([".", "-print0"])
        .current_dir(tree)
        .stdout(Stdio::piped());
    let mut finder = find.spawn().context("running find")?;
    let names = finder.stdout.take().context("find's output")?;
    let mut cpio = Command::new("cpio");
    cpio.args(["--null", "--create", "--format=newc", "--quiet"])
        .current_dir(tree)
        .stdin(names)
        .stdout(file);
    println!(
        "$ (cd {} && find . -print0 | cpio --null --create --format=newc) > {}",
        tree.display(),
        out.display()
    );
    let status = cpio
        .status()
        .context("running cpio (Debian package cpio)")?;
    let found = finder.wait()?;
    if !status.success() || !found.success() {
        bail!(
            "packing {} failed (find: {found}, cpio: {status})",
            tree.display()
        );
    }
    println!(
        "vm: initramfs {} MiB",
        fs::metadata(out).map(|m| m.len() >> 20).unwrap_or(0)
    );
    Ok(())
}

/// One check's result.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Check {
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

/// What one run's console said.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub kernel: Option<String>,
    pub checks: Vec<Check>,
    /// `PWSD-FACT` lines: the STATUS= text, the exposure score, the hooks.
    pub facts: Vec<(String, String)>,
    pub finished: bool,
    pub problems: Vec<String>,
}

impl Report {
    /// Reads the markers; a check of [`CHECKS`] that never reported is a
    /// failure, as is a console without `PWSD-DONE`.
    pub fn parse(console: &str) -> Report {
        let mut report = Report::default();
        for line in console.lines() {
            let line = line.trim_end();
            // Markers may follow other output on the same console line.
            let Some(at) = line.find("PWSD-") else {
                continue;
            };
            let marker = &line[at + "PWSD-".len()..];
            if let Some(rest) = marker.strip_prefix("CHECK ") {
                let (name, verdict) = rest.split_once(": ").unwrap_or((rest, "FAIL: no verdict"));
                let (ok, detail) = match verdict.split_once(": ") {
                    Some((word, detail)) => (word == "ok", detail),
                    None => (verdict == "ok", ""),
                };
                report.checks.push(Check {
                    name: name.to_owned(),
                    ok,
                    detail: detail.to_owned(),
                });
            } else if let Some(rest) = marker.strip_prefix("FACT ") {
                let (key, value) = rest.split_once(": ").unwrap_or((rest, ""));
                if key == "kernel" {
                    report.kernel = Some(value.to_owned());
                }
                report.facts.push((key.to_owned(), value.to_owned()));
            } else if marker == "DONE" {
                report.finished = true;
            }
        }
        for name in CHECKS {
            if !report.checks.iter().any(|c| c.name == *name) {
                report.checks.push(Check {
                    name: (*name).to_owned(),
                    ok: false,
                    detail: "never reported".to_owned(),
                });
            }
        }
        if !report.finished {
            report
                .problems
                .push("the guest never said PWSD-DONE".to_owned());
        }
        report
    }

    pub fn passed(&self) -> usize {
        self.checks.iter().filter(|c| c.ok).count()
    }

    pub fn failed(&self) -> usize {
        self.checks.len() - self.passed()
    }

    pub fn ok(&self) -> bool {
        self.finished && self.failed() == 0 && self.problems.is_empty()
    }

    fn fact(&self, key: &str) -> Option<&str> {
        self.facts
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Serialize)]
struct Run {
    label: String,
    package: String,
    seconds: u64,
    report: Report,
}

/// One table: a row per check, a column per kernel; then the facts.
fn markdown(runs: &[Run]) -> String {
    let mut out = String::from("| check |");
    for run in runs {
        let _ = write!(out, " {} |", run.label);
    }
    out.push_str("\n|---|");
    out.push_str(&"---|".repeat(runs.len()));
    out.push('\n');
    for name in CHECKS {
        let _ = write!(out, "| {name} |");
        for run in runs {
            let cell = match run.report.checks.iter().find(|c| c.name == *name) {
                Some(check) if check.ok => "pass".to_owned(),
                Some(check) => format!("**FAIL**: {}", check.detail.replace('|', "\\|")),
                None => "**FAIL**".to_owned(),
            };
            let _ = write!(out, " {cell} |");
        }
        out.push('\n');
    }
    out.push('\n');
    for run in runs {
        let _ = writeln!(
            out,
            "- {} (`{}`, {}; {} s under TCG): {} of {} checks pass. `systemd-analyze security`: {}. STATUS: `{}`.",
            run.label,
            run.package,
            run.report.kernel.as_deref().unwrap_or("kernel unknown"),
            run.seconds,
            run.report.passed(),
            run.report.checks.len(),
            run.report.fact("exposure").unwrap_or("not reported"),
            run.report.fact("STATUS").unwrap_or("not reported"),
        );
        for problem in &run.report.problems {
            let _ = writeln!(out, "  - problem: {problem}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_check_the_host_expects_is_printed_by_the_guest_script() {
        for name in CHECKS {
            assert!(
                CHECK_SCRIPT.contains(&format!("\"{name}\"")),
                "the guest script never reports `{name}`"
            );
        }
        assert!(CHECK_SCRIPT.contains("echo \"PWSD-DONE\""));
    }

    #[test]
    fn a_console_is_read_check_by_check_and_silence_fails() {
        let console = format!(
            "[  OK  ] noise\nPWSD-FACT kernel: 6.1.0-50-cloud-amd64\r\nxxPWSD-CHECK {}: ok: active running\n\
             PWSD-CHECK {}: FAIL: no Status: line\nPWSD-FACT exposure: 4.2 OK\n",
            CHECKS[0], CHECKS[1]
        );
        let report = Report::parse(&console);
        assert_eq!(report.kernel.as_deref(), Some("6.1.0-50-cloud-amd64"));
        assert_eq!(report.checks[0].detail, "active running");
        assert!(report.checks[0].ok);
        assert!(!report.checks[1].ok);
        assert_eq!(report.checks.len(), CHECKS.len());
        assert_eq!(report.passed(), 1);
        assert!(!report.finished && !report.ok());
        assert!(
            report
                .checks
                .iter()
                .skip(2)
                .all(|c| c.detail == "never reported")
        );

        let mut all: String = CHECKS
            .iter()
            .map(|name| format!("PWSD-CHECK {name}: ok\n"))
            .collect();
        all.push_str("PWSD-DONE\n");
        let report = Report::parse(&all);
        assert!(report.ok(), "{:?}", report.problems);
        let table = markdown(&[Run {
            label: "6.1, systemd".into(),
            package: "linux-image-x".into(),
            seconds: 90,
            report,
        }]);
        assert!(table.contains("| the watchdog restarts a SIGSTOPped daemon | pass |"));
        assert!(table.contains(&format!("{n} of {n} checks pass", n = CHECKS.len())));
    }

    #[test]
    fn only_debian_12_kernels_boot_its_userspace() {
        let names = |list: &[&str]| -> Result<Vec<&'static str>> {
            let list: Vec<String> = list.iter().map(|s| s.to_string()).collect();
            Ok(plan(&list)?.iter().map(|k| k.name).collect())
        };
        assert_eq!(names(&[]).unwrap(), ["6.1", "6.12"]);
        assert_eq!(names(&["6.12", "6.12"]).unwrap(), ["6.12"]);
        let err = format!("{:#}", names(&["5.10"]).unwrap_err());
        assert!(err.contains("Debian 12's kernels only"), "{err}");
        assert!(err.contains("known: 6.1, 6.12, all"), "{err}");
    }
}
