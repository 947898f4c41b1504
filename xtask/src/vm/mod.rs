//! `cargo xtask vm`: portwatch's root test suites inside stock Debian
//! kernels, booted under QEMU.
//!
//! This machine's own kernel refuses fexit and has no kprobes; servers run
//! distribution kernels that allow both. Each VM run boots one of Debian's
//! `-cloud-amd64` kernels ([`kernel::KERNELS`]) with an initramfs holding
//! the test binaries ([`initramfs`]), whose `/init` starts the daemon once
//! to record which hook paths it attached and what it warned about, runs
//! each suite, prints a marker line per fact on the serial console, and
//! powers off. The console is all that comes back ([`report`]); a VM that
//! says nothing, or stops early, fails.
//!
//! The guest has no network device, and traffic stays on its loopback and
//! in namespaces the tests make. Timings inside a TCG guest mean nothing, so
//! nothing here measures time.

mod initramfs;
mod kernel;
mod qemu;
mod report;
mod systemd;

use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

pub use qemu::Accel;

use crate::{build::target_dir, cmd, readme, setup};
use initramfs::Initramfs;
use kernel::{KERNELS, Kernel};
use report::{PassReport, Row};

const README_BEGIN: &str = "<!-- vm:begin (cargo xtask vm --write-readme) -->";
const README_END: &str = "<!-- vm:end -->";

/// The kernel modules the suites need that Debian builds as modules: the
/// sock_diag families (the daemon's snapshot and `ss`) and veth (the
/// predictor's second device). Built-in ones are skipped.
const MODULES: &[&str] = &["inet_diag", "tcp_diag", "udp_diag", "veth"];

/// The tools the suites run, found on this machine's PATH, and the Debian
/// package `cargo xtask setup` installs each from.
const TOOLS: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("ss", "iproute2"),
    ("bpftool", "bpftool"),
    ("promtool", "prometheus"),
];

/// One test binary's share of a VM run.
struct Suite {
    /// The name in the table and on the console.
    name: &'static str,
    /// The cargo test target (`portwatch/tests/<target>.rs`).
    target: &'static str,
    /// Only the root tests whose names contain one of these; all if empty.
    filters: &'static [&'static str],
    /// Show what passing tests printed (the predictor's agreement line).
    show_output: bool,
}

const SUITES: &[Suite] = &[
    Suite {
        name: "trace",
        target: "trace",
        filters: &[],
        show_output: false,
    },
    Suite {
        name: "map",
        target: "map",
        filters: &[],
        show_output: false,
    },
    Suite {
        name: "predictor",
        target: "predictor",
        filters: &[],
        show_output: true,
    },
    Suite {
        name: "snapshot (a private namespace listed)",
        target: "snapshot",
        filters: &["snapshot_lists_a_private_netns_with_states_options_and_owners"],
        show_output: false,
    },
    Suite {
        name: "robustness (storm, one-entry maps)",
        target: "robustness",
        filters: &[
            "a_storm_beyond_the_ring_is_counted_exactly_and_reconciled",
            "every_bind_has_its_outcome_with_one_entry_maps",
        ],
        show_output: false,
    },
    Suite {
        name: "daemon (seed scenarios over HTTP)",
        target: "daemon",
        filters: &["a_user_sees_the_seed_scenarios_over_http_metrics_and_the_cli"],
        show_output: false,
    },
];

/// Which outcome path the daemon and `trace` take in a VM run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Outcome {
    /// What the kernel offers (fexit on every kernel of the matrix).
    Auto,
    /// The syscall tracepoints, forced with `PORTWATCH_OUTCOME=tracepoint`.
    Tracepoint,
}

pub struct Options {
    /// `5.10`, `6.1`, `6.12` or `all`.
    pub kernels: Vec<String>,
    /// `None`: the kernel's own path, plus one forced-tracepoint run on the
    /// newest kernel when the whole matrix runs.
    pub outcome: Option<Outcome>,
    pub accel: Accel,
    pub write_readme: bool,
    /// The most one VM may run before it is stopped and failed.
    pub limit: Duration,
    /// Only the suites whose name contains one of these; all if empty.
    pub suites: Vec<String>,
    /// The package under a real systemd instead of the suites.
    pub systemd: bool,
}

/// One VM run of the plan.
struct Pass {
    kernel: Kernel,
    outcome: Outcome,
}

impl Pass {
    fn label(&self) -> String {
        match self.outcome {
            Outcome::Auto => self.kernel.name.to_owned(),
            Outcome::Tracepoint => format!("{}, tracepoint forced", self.kernel.name),
        }
    }
}

pub fn vm(options: &Options) -> Result<()> {
    setup::ensure()?;
    if options.systemd {
        if !options.suites.is_empty() || options.outcome.is_some() {
            bail!("--systemd runs its own checks: leave out --suite and --outcome");
        }
        return systemd::run(&systemd::Options {
            kernels: &options.kernels,
            accel: options.accel,
            write_readme: options.write_readme,
            limit: options.limit,
        });
    }
    let passes = plan(&options.kernels, options.outcome)?;
    let suites = select(&options.suites)?;
    if options.write_readme && suites.len() != SUITES.len() {
        bail!("--write-readme needs every suite: leave out --suite");
    }
    let cache = target_dir().join("vm");
    fs::create_dir_all(&cache)?;
    let binaries = build_test_binaries(&suites)?;
    let accel = choose_accel(options.accel, &cache, &passes[0].kernel)?;

    let mut rows = Vec::new();
    for pass in &passes {
        let label = pass.label();
        println!("\n==== vm: {label} ({}) ====", accel.name());
        let unpacked = kernel::fetch(&pass.kernel, &cache)?;
        let work = cache.join("runs").join(label.replace([' ', ','], "_"));
        let _ = fs::remove_dir_all(&work);
        fs::create_dir_all(&work)?;
        let initrd = work.join("initramfs.cpio");
        let image = guest_image(&binaries, &suites, &unpacked.modules, pass.outcome, &work)?;
        let size = image.write(&initrd)?;
        println!("vm: initramfs {} MiB", size >> 20);
        let vm = qemu::Vm {
            kernel: &unpacked.vmlinuz,
            initrd: &initrd,
            append: "console=ttyS0 panic=-1 quiet loglevel=3".to_owned(),
            memory_mib: 4096,
            accel,
            console: work.join("console.log"),
            echo: Some(format!("[{label}] ")),
        };
        let boot = vm.run(options.limit)?;
        let expected: Vec<&str> = suites.iter().map(|s| s.name).collect();
        let mut report = PassReport::parse(&boot.console, &expected);
        if boot.timed_out {
            report
                .problems
                .push(format!("stopped at the {:?} limit", options.limit));
        }
        if !boot.qemu_stderr.trim().is_empty() && !report.finished {
            report
                .problems
                .push(format!("qemu: {}", boot.qemu_stderr.trim()));
        }
        println!(
            "vm: {label}: {} in {:.0?}; console in {}",
            if report.ok() { "pass" } else { "FAIL" },
            boot.elapsed,
            vm.console.display()
        );
        rows.push(Row {
            label,
            package: pass.kernel.package.to_owned(),
            accel: accel.name().to_owned(),
            seconds: boot.elapsed.as_secs(),
            report,
        });
    }

    let table = report::markdown(&rows);
    println!("\n{table}");
    let results = target_dir().join("vm");
    fs::write(results.join("results.md"), &table)?;
    fs::write(
        results.join("results.json"),
        serde_json::to_string_pretty(&rows)?,
    )?;
    if options.write_readme {
        readme::replace_section(
            &cmd::workspace_root().join("README.md"),
            README_BEGIN,
            README_END,
            &table,
        )?;
        println!("vm: README.md's supported-kernels table replaced");
    }
    let failed: Vec<&str> = rows
        .iter()
        .filter(|row| !row.report.ok())
        .map(|row| row.label.as_str())
        .collect();
    let (passed, failures, skipped) = rows.iter().fold((0, 0, 0), |acc, row| {
        let (p, f, s) = row.report.totals();
        (acc.0 + p, acc.1 + f, acc.2 + s)
    });
    // The plain closing line CI reads.
    println!("vm summary: {passed} passed, {failures} failed, {skipped} skipped");
    if !failed.is_empty() {
        bail!("VM runs failed: {}", failed.join(", "));
    }
    Ok(())
}

/// The VM runs `--kernel` and `--outcome` ask for.
fn plan(names: &[String], outcome: Option<Outcome>) -> Result<Vec<Pass>> {
    let all = names.is_empty() || names.iter().any(|n| n == "all");
    let mut kernels = Vec::new();
    if all {
        kernels.extend(KERNELS);
    } else {
        for name in names {
            let Some(kernel) = KERNELS.iter().find(|k| k.name == name) else {
                let known: Vec<&str> = KERNELS.iter().map(|k| k.name).collect();
                bail!(
                    "no kernel `{name}` in the matrix; known: {}, all",
                    known.join(", ")
                );
            };
            if !kernels.contains(kernel) {
                kernels.push(*kernel);
            }
        }
    }
    let mut passes: Vec<Pass> = kernels
        .iter()
        .map(|&kernel| Pass {
            kernel,
            outcome: outcome.unwrap_or(Outcome::Auto),
        })
        .collect();
    if all && outcome.is_none() {
        // Both paths on one stock kernel: the newest, forced onto the
        // tracepoints this machine's own kernel uses.
        passes.push(Pass {
            kernel: KERNELS[KERNELS.len() - 1],
            outcome: Outcome::Tracepoint,
        });
    }
    Ok(passes)
}

/// The suites `--suite` names.
fn select(names: &[String]) -> Result<Vec<&'static Suite>> {
    if names.is_empty() {
        return Ok(SUITES.iter().collect());
    }
    let chosen: Vec<&Suite> = SUITES
        .iter()
        .filter(|suite| names.iter().any(|n| suite.name.contains(n.as_str())))
        .collect();
    if chosen.is_empty() {
        let known: Vec<&str> = SUITES.iter().map(|s| s.name).collect();
        bail!(
            "no suite matches {names:?}; the suites: {}",
            known.join(", ")
        );
    }
    Ok(chosen)
}

/// The built test binaries, by cargo target name, and the portwatch binary
/// they run (whose absolute path is compiled into them).
struct Binaries {
    tests: Vec<(&'static str, PathBuf)>,
    portwatch: PathBuf,
}

fn build_test_binaries(suites: &[&Suite]) -> Result<Binaries> {
    let mut build = cmd::cargo();
    build.args([
        "test",
        "-p",
        "portwatch",
        "--no-run",
        "--message-format=json-render-diagnostics",
    ]);
    for suite in suites {
        build.args(["--test", suite.target]);
    }
    println!("$ {}", cmd::display(&build));
    let out = build
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("running cargo test --no-run")?;
    if !out.status.success() {
        bail!("building the test binaries failed ({})", out.status);
    }
    let mut tests = Vec::new();
    let mut portwatch = None;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(message) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        if message["reason"] != "compiler-artifact" {
            continue;
        }
        let Some(executable) = message["executable"].as_str() else {
            continue;
        };
        let name = message["target"]["name"].as_str().unwrap_or_default();
        let is_test = message["profile"]["test"].as_bool().unwrap_or(false);
        if is_test {
            if let Some(suite) = suites.iter().find(|s| s.target == name) {
                tests.push((suite.target, PathBuf::from(executable)));
            }
        } else if name == "portwatch" {
            portwatch = Some(PathBuf::from(executable));
        }
    }
    for suite in suites {
        if !tests.iter().any(|(target, _)| *target == suite.target) {
            bail!("cargo built no test binary for `{}`", suite.target);
        }
    }
    Ok(Binaries {
        tests,
        portwatch: portwatch.context("cargo built no portwatch binary")?,
    })
}

/// KVM when asked or when a trial boot works; TCG otherwise.
fn choose_accel(choice: Accel, cache: &Path, kernel: &Kernel) -> Result<Accel> {
    if choice != Accel::Auto {
        return Ok(choice);
    }
    if fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        println!("vm: /dev/kvm cannot be opened: TCG");
        return Ok(Accel::Tcg);
    }
    let unpacked = kernel::fetch(kernel, cache)?;
    let work = cache.join("kvm-trial");
    fs::create_dir_all(&work)?;
    let mut image = Initramfs::default();
    image.program("/bin/busybox", &busybox()?)?;
    image.bytes(
        "/init",
        "#!/bin/busybox sh\n/bin/busybox echo PWVM-DONE\n/bin/busybox poweroff -f\n",
        true,
    );
    let initrd = work.join("trial.cpio");
    image.write(&initrd)?;
    let trial = qemu::Vm {
        kernel: &unpacked.vmlinuz,
        initrd: &initrd,
        append: "console=ttyS0 panic=-1 quiet".to_owned(),
        memory_mib: 512,
        accel: Accel::Kvm,
        console: work.join("console.log"),
        echo: None,
    };
    let boot = trial.run(Duration::from_secs(60))?;
    if PassReport::parse(&boot.console, &[]).finished {
        println!("vm: a trial KVM boot worked: KVM");
        Ok(Accel::Kvm)
    } else {
        let why = boot.qemu_stderr.lines().last().unwrap_or("no marker");
        println!("vm: a trial KVM boot failed ({why}): TCG");
        Ok(Accel::Tcg)
    }
}

fn busybox() -> Result<PathBuf> {
    cmd::find_in_path("busybox")
        .or_else(|| Some(PathBuf::from("/bin/busybox")).filter(|p| p.exists()))
        .context(
            "busybox is not installed (Debian package busybox-static): run `cargo xtask setup`",
        )
}

/// The whole guest for one VM run.
fn guest_image(
    binaries: &Binaries,
    suites: &[&Suite],
    modules: &Path,
    outcome: Outcome,
    work: &Path,
) -> Result<Initramfs> {
    let scratch = work.join("scratch");
    fs::create_dir_all(&scratch)?;
    let mut image = Initramfs::default();
    image.program("/bin/busybox", &busybox()?)?;
    for (tool, package) in TOOLS {
        let host = cmd::find_in_path(tool).with_context(|| {
            format!("{tool} is not installed (Debian package {package}): run `cargo xtask setup`")
        })?;
        image.program(Path::new("/bin").join(tool), &host)?;
    }
    // The test binaries run the daemon at the path compiled into them.
    image.stripped_program(&binaries.portwatch, &binaries.portwatch, &scratch)?;
    for (target, path) in &binaries.tests {
        image.stripped_program(Path::new("/tests").join(target), path, &scratch)?;
    }
    for (n, (name, file)) in initramfs::kernel_modules(modules, MODULES, &scratch)?
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
        init_script(&binaries.portwatch, suites, outcome),
        true,
    );
    Ok(image)
}

/// The guest's `/init`: mounts, modules, the daemon's hook report, each
/// suite between markers, power off.
fn init_script(portwatch: &Path, suites: &[&Suite], outcome: Outcome) -> String {
    let mut script = String::from(
        r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin HOME=/root TMPDIR=/tmp RUST_BACKTRACE=1
# An emulated CPU loads and verifies programs many times slower: the tests
# wait longer for what must happen (never a speed goal).
export PORTWATCH_TEST_DEADLINE_SECS=120
mark() { echo "PWVM-$*"; }
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
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
    script.push_str("\nmark DONE\npoweroff -f\n");
    script
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_whole_matrix_adds_one_forced_tracepoint_run() {
        let labels = |names: &[&str], outcome| -> Vec<String> {
            let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
            plan(&names, outcome)
                .unwrap()
                .iter()
                .map(Pass::label)
                .collect()
        };
        assert_eq!(
            labels(&["all"], None),
            ["5.10", "6.1", "6.12", "6.12, tracepoint forced"]
        );
        assert_eq!(labels(&[], None), labels(&["all"], None));
        assert_eq!(labels(&["6.1"], None), ["6.1"]);
        assert_eq!(
            labels(&["6.1", "5.10", "6.1"], Some(Outcome::Tracepoint)),
            ["6.1, tracepoint forced", "5.10, tracepoint forced"]
        );
        let err = plan(&["4.19".to_owned()], None).err().unwrap().to_string();
        assert!(err.contains("known: 5.10, 6.1, 6.12, all"), "{err}");
    }

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
