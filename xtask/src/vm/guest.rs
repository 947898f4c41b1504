//! What one VM run boots besides the kernel: the initramfs with the
//! userland, portwatch and the test binaries, the kernel modules the suites
//! need, and the `/init` that runs them.
//!
//! On this machine's architecture the userland is busybox and the tools the
//! suites call, taken from this machine with their libraries (`ldd`). On
//! another (arm64) it is Debian's own packages for that architecture,
//! unpacked by mmdebstrap and cached, and the binaries are cross-built.

use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};

use super::{
    ARM64_USERLAND, Binaries, Outcome, Suite, cache, initramfs, initramfs::Initramfs, kernel,
};
use crate::{arch::Arch, cmd};

/// The kernel modules the suites need that Debian builds as modules: the
/// sock_diag families (the daemon's snapshot and `ss`), veth (the
/// predictor's second device) and vxlan (a kernel-owned UDP socket, in
/// the exactness suite), with what they depend on. Built-in ones are
/// skipped.
const MODULES: &[&str] = &["inet_diag", "tcp_diag", "udp_diag", "veth", "vxlan"];

/// The tools the suites run, found on this machine's PATH, and the Debian
/// package `cargo xtask setup` installs each from.
const TOOLS: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("ss", "iproute2"),
    ("bpftool", "bpftool"),
    ("promtool", "prometheus"),
];

pub(super) fn busybox() -> Result<PathBuf> {
    cmd::find_in_path("busybox")
        .or_else(|| Some(PathBuf::from("/bin/busybox")).filter(|p| p.exists()))
        .context(
            "busybox is not installed (Debian package busybox-static): run `cargo xtask setup`",
        )
}

/// One VM run's guest.
pub struct Guest<'a> {
    pub binaries: &'a Binaries,
    pub suites: &'a [&'a Suite],
    /// The kernel's `lib/modules/<version>`.
    pub modules: &'a Path,
    pub outcome: Outcome,
    pub arch: Arch,
}

impl Guest<'_> {
    /// The whole initramfs; `cache` keeps another architecture's userland,
    /// `work` this run's scratch files.
    pub fn image(&self, cache: &Path, work: &Path) -> Result<Initramfs> {
        let scratch = work.join("scratch");
        fs::create_dir_all(&scratch)?;
        let mut image = Initramfs::default();
        if self.arch.is_host() {
            host_userland(&mut image)?;
        } else {
            image.tree(&foreign_userland(self.arch, cache)?)?;
        }
        // The test binaries run the daemon at the path compiled into them.
        let portwatch = &self.binaries.portwatch;
        image.stripped_program(portwatch, portwatch, &scratch, self.arch)?;
        for (target, path) in &self.binaries.tests {
            image.stripped_program(Path::new("/tests").join(target), path, &scratch, self.arch)?;
        }
        for (n, (name, file)) in initramfs::kernel_modules(self.modules, MODULES, &scratch)?
            .into_iter()
            .enumerate()
        {
            image.file(format!("/modules/{n:02}-{name}.ko"), file, 0o100_644);
        }
        for dir in ["/proc", "/sys", "/dev", "/tmp", "/run", "/root", "/etc"] {
            image.dir(dir);
        }
        image.bytes("/etc/passwd", "root:x:0:0:root:/root:/bin/sh\n", false);
        image.bytes("/etc/group", "root:x:0:\n", false);
        image.bytes(
            "/init",
            init_script(portwatch, self.suites, self.outcome),
            true,
        );
        Ok(image)
    }
}

/// busybox and the tools, from this machine.
fn host_userland(image: &mut Initramfs) -> Result<()> {
    image.program("/bin/busybox", &busybox()?)?;
    for (tool, package) in TOOLS {
        let host = cmd::find_in_path(tool).with_context(|| {
            format!("{tool} is not installed (Debian package {package}): run `cargo xtask setup`")
        })?;
        image.program(Path::new("/bin").join(tool), &host)?;
    }
    Ok(())
}

/// Debian 12's userland packages for `arch`, unpacked once under `cache`
/// (a new list of packages makes a new tree).
fn foreign_userland(arch: Arch, cache: &Path) -> Result<PathBuf> {
    let dir = cache.join(format!("userland-{}", arch.debian()));
    let tree = dir.join("tree");
    let wanted = ARM64_USERLAND.join(",");
    cache::once(&dir.join(".unpacked"), &wanted, || {
        println!("vm: unpacking the {} userland ({wanted})", arch.debian());
        kernel::foreign_extract(arch, ARM64_USERLAND, cache, &tree)
    })?;
    Ok(tree)
}

/// The guest's `/init`: mounts, modules, the daemon's hook report, each
/// suite between markers, power off.
/// After the suites, the kernel's own log: a WARN (the verifier's "trace
/// type BPF program uses run-time allocation" is one), an oops or a BPF
/// splat fails the kernel even when every test passed, as libbpf's CI does.
/// Taint bits: 7 (D, an oops), 9 (W, a warning).
const DMESG_CHECK: &str = r#"
dmesg | grep -E 'WARNING:|BUG:|Oops|Call Trace:|run-time allocation' | while read -r line; do mark PROBLEM "dmesg: $line"; done
tainted=$(cat /proc/sys/kernel/tainted)
[ $((tainted & 640)) -eq 0 ] || mark PROBLEM "the kernel is tainted ($tainted)"
mark DMESG "checked (taint $tainted)"
"#;

fn init_script(portwatch: &Path, suites: &[&Suite], outcome: Outcome) -> String {
    let mut script = String::from(
        r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
# Debian arm64 userlands keep ip in /sbin and bpftool in /usr/sbin.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root TMPDIR=/tmp RUST_BACKTRACE=1
# An emulated CPU loads and verifies programs many times slower: the tests
# wait longer for what must happen (never a speed goal).
export PORTWATCH_TEST_DEADLINE_SECS=120
mark() { echo "PWVM-$*"; }
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# /tmp stays the initramfs's own directory: a checkout under /tmp has its
# binaries there, at the paths compiled into the tests.
mount -t tmpfs tmpfs /run
mkdir -p /var && ln -s /run /var/run
mount -t cgroup2 cgroup2 /sys/fs/cgroup || mark PROBLEM "cgroup2 did not mount"
mount -t bpf bpf /sys/fs/bpf || mark PROBLEM "bpffs did not mount"
mount -t tracefs tracefs /sys/kernel/tracing || mark PROBLEM "tracefs did not mount"
mark KERNEL "$(uname -r)"
for m in /modules/*.ko; do
  [ -e "$m" ] || continue
  insmod "$m" || mark PROBLEM "insmod $m failed"
done
ip link set lo up
"#,
    );
    if outcome == Outcome::Tracepoint {
        script.push_str("export PORTWATCH_OUTCOME=tracepoint\n");
    }
    let _ = write!(
        script,
        r#"
# The daemon as a user starts it: which hooks took which path, and what it
# warned about (facts this kernel does not let it read).
RUST_LOG=info {portwatch} daemon --listen 127.0.0.1:7464 2>/tmp/daemon.log &
daemon=$!
ready=
for i in $(seq 1 180); do
  if wget -q -O /tmp/ready http://127.0.0.1:7464/readyz 2>/dev/null; then ready=1; break; fi
  kill -0 $daemon 2>/dev/null || break
  sleep 1
done
if [ -n "$ready" ]; then
  wget -q -O /tmp/metrics http://127.0.0.1:7464/metrics
  grep '^portwatch_program_attached' /tmp/metrics | while read -r line; do mark HOOK "$line"; done
else
  mark PROBLEM "the daemon did not become ready"
  cat /tmp/daemon.log
fi
kill $daemon 2>/dev/null; wait $daemon
grep ' WARN ' /tmp/daemon.log | sed 's/^.* WARN [^ ]* //' | while read -r line; do mark WARN "$line"; done
"#,
        portwatch = portwatch.display()
    );
    for suite in suites {
        let _ = write!(
            script,
            "\nmark BEGIN '{name}'\n/tests/{target} --ignored --test-threads=1{show}{exact} {filters} 2>&1\nmark END '{name}' $?\n",
            name = suite.name,
            target = suite.target,
            show = if suite.show_output {
                " --show-output"
            } else {
                ""
            },
            exact = if suite.filters.is_empty() {
                ""
            } else {
                " --exact"
            },
            filters = suite.filters.join(" "),
        );
    }
    script.push_str(DMESG_CHECK);
    script.push_str("\nmark DONE\npoweroff -f\n");
    script
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::{SUITES, select};

    #[test]
    fn the_init_script_runs_every_suite_between_markers() {
        let all: Vec<&Suite> = SUITES.iter().collect();
        let script = init_script(
            Path::new("/w/target/debug/portwatch"),
            &all,
            Outcome::Tracepoint,
        );
        assert!(script.contains("export PORTWATCH_OUTCOME=tracepoint"));
        assert!(script.contains("/w/target/debug/portwatch daemon"));
        for suite in SUITES {
            assert!(script.contains(&format!("mark BEGIN '{}'\n", suite.name)));
            assert!(script.contains(&format!("mark END '{}' $?\n", suite.name)));
        }
        assert!(script.contains(
            "/tests/daemon --ignored --test-threads=1 --exact a_user_sees_the_seed_scenarios_over_http_metrics_and_the_cli 2>&1"
        ));
        assert!(script.ends_with("mark DONE\npoweroff -f\n"));
        assert!(!init_script(Path::new("/p"), &all, Outcome::Auto).contains("PORTWATCH_OUTCOME"));
        let some = select(&["robustness".to_owned()]).unwrap();
        assert_eq!(some.len(), 1);
        assert!(!init_script(Path::new("/p"), &some, Outcome::Auto).contains("/tests/map"));
        assert!(select(&["nothing".to_owned()]).is_err());
    }
}
