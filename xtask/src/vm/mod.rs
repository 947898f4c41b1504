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

mod cache;
mod guest;
mod initramfs;
mod kernel;
mod qemu;
mod report;
mod systemd;

use std::{
    fs,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

pub use qemu::Accel;

use crate::{arch::Arch, build::target_dir, cmd, readme, setup};
use guest::{Guest, busybox};
use initramfs::Initramfs;
use kernel::Kernel;
use report::{PassReport, Row};

const README_BEGIN: &str = "<!-- vm:begin (cargo xtask vm --write-readme) -->";
const README_END: &str = "<!-- vm:end -->";
const README_ARM64_BEGIN: &str =
    "<!-- vm-arm64:begin (cargo xtask vm --arch arm64 --write-readme) -->";
const README_ARM64_END: &str = "<!-- vm-arm64:end -->";

/// The suites an arm64 guest runs when `--suite` names none: all but the
/// daemon's, which checks /metrics with promtool (not in its userland).
const ARM64_SUITES: [&str; 7] = [
    "trace",
    "map",
    "predictor",
    "snapshot",
    "robustness",
    "exactness",
    "ephemeral",
];

/// An arm64 guest's userland: Debian's own arm64 packages (busybox and the
/// tools the suites call, with their libraries).
const ARM64_USERLAND: &[&str] = &[
    "busybox-static",
    "iproute2",
    "bpftool",
    "libc6",
    "libgcc-s1",
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
        name: "exactness (MPTCP, io_uring, AF_UNIX, UDP-Lite, TRACKED)",
        target: "exactness",
        filters: &[],
        // What the kernel did with a wildcard UDP bind on a crowded slot.
        show_output: true,
    },
    Suite {
        name: "ephemeral (connect failures, early binds, connected UDP)",
        target: "ephemeral",
        filters: &[
            "a_full_range_per_destination_with_a_listener_inside_it_and_time_wait",
            "sockets_bound_to_port_zero_before_connecting_are_named",
            "udp_connects_exhaust_the_range_with_eagain_and_connected_ones_are_no_listeners",
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
    /// The guest's architecture (arm64: Debian's arm64 kernel under
    /// qemu-system-aarch64).
    pub arch: Arch,
}

/// One VM run of the plan.
struct Pass {
    kernel: Kernel,
    outcome: Outcome,
}

impl Pass {
    fn label(&self) -> String {
        let kernel = if self.kernel.arch.is_host() {
            self.kernel.name.to_owned()
        } else {
            format!("{} {}", self.kernel.name, self.kernel.arch.debian())
        };
        match self.outcome {
            Outcome::Auto => kernel,
            Outcome::Tracepoint => format!("{kernel}, tracepoint forced"),
        }
    }
}

pub fn vm(options: &Options) -> Result<()> {
    setup::ensure()?;
    if options.systemd {
        if !options.suites.is_empty() || options.outcome.is_some() {
            bail!("--systemd runs its own checks: leave out --suite and --outcome");
        }
        if !options.arch.is_host() {
            bail!("--systemd boots this machine's architecture only");
        }
        return systemd::run(&systemd::Options {
            kernels: &options.kernels,
            accel: options.accel,
            write_readme: options.write_readme,
            limit: options.limit,
        });
    }
    let arch = options.arch;
    let passes = plan(&options.kernels, options.outcome, arch)?;
    let (suites, all_suites) = match (arch.is_host(), options.suites.is_empty()) {
        (false, true) => (
            select(&ARM64_SUITES.map(str::to_owned))?,
            ARM64_SUITES.len(),
        ),
        _ => (select(&options.suites)?, SUITES.len()),
    };
    if options.write_readme && suites.len() != all_suites {
        bail!("--write-readme needs every suite: leave out --suite");
    }
    let cache = target_dir().join("vm");
    fs::create_dir_all(&cache)?;
    let binaries = build_test_binaries(&suites, arch)?;
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
        let guest = Guest {
            binaries: &binaries,
            suites: &suites,
            modules: &unpacked.modules,
            outcome: pass.outcome,
            arch,
        };
        let image = guest.image(&cache, &work)?;
        let size = image.write(&initrd)?;
        println!("vm: initramfs {} MiB", size >> 20);
        let vm = qemu::Vm {
            arch,
            kernel: &unpacked.vmlinuz,
            initrd: &initrd,
            append: format!("console={} panic=-1 quiet loglevel=3", arch.console()),
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

    let (stem, markers) = if arch.is_host() {
        ("results", (README_BEGIN, README_END))
    } else {
        ("results-arm64", (README_ARM64_BEGIN, README_ARM64_END))
    };
    publish(
        stem,
        &report::markdown(&rows),
        &rows,
        options.write_readme.then_some(markers),
    )?;
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

/// Prints a run's table and keeps it, with its JSON, as
/// `target/vm/<stem>.{md,json}`; with `readme`, also writes it into the
/// README between those two markers.
fn publish(
    stem: &str,
    table: &str,
    runs: &impl serde::Serialize,
    readme: Option<(&str, &str)>,
) -> Result<()> {
    println!("\n{table}");
    let results = target_dir().join("vm");
    fs::write(results.join(format!("{stem}.md")), table)?;
    fs::write(
        results.join(format!("{stem}.json")),
        serde_json::to_string_pretty(runs)?,
    )?;
    if let Some((begin, end)) = readme {
        readme::replace_section(&cmd::workspace_root().join("README.md"), begin, end, table)?;
        println!("vm: README.md's section {begin} replaced");
    }
    Ok(())
}

/// The VM runs `--kernel` and `--outcome` ask for, on `arch`.
fn plan(names: &[String], outcome: Option<Outcome>, arch: Arch) -> Result<Vec<Pass>> {
    let matrix = kernel::kernels(arch);
    let all = names.is_empty() || names.iter().any(|n| n == "all");
    let kernels = kernel::choose(matrix, names)?;
    let mut passes: Vec<Pass> = kernels
        .iter()
        .map(|&kernel| Pass {
            kernel,
            outcome: outcome.unwrap_or(Outcome::Auto),
        })
        .collect();
    if all && outcome.is_none() && arch.is_host() {
        // Both paths on one stock kernel: the newest, forced onto the
        // tracepoints this machine's own kernel uses.
        passes.push(Pass {
            kernel: matrix[matrix.len() - 1],
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

fn build_test_binaries(suites: &[&Suite], arch: Arch) -> Result<Binaries> {
    let mut build = cmd::cargo();
    build.args([
        "test",
        "-p",
        "portwatch",
        "--no-run",
        "--message-format=json-render-diagnostics",
    ]);
    if let Some(target) = arch.cargo_target() {
        build.args(["--target", target]);
    }
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
    if !kernel.arch.is_host() {
        println!("vm: another architecture's guest: TCG");
        return Ok(Accel::Tcg);
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
        arch: kernel.arch,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_whole_matrix_adds_one_forced_tracepoint_run() {
        let labels = |names: &[&str], outcome| -> Vec<String> {
            let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
            plan(&names, outcome, Arch::Amd64)
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
        let err = plan(&["4.19".to_owned()], None, Arch::Amd64)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("known: 5.10, 6.1, 6.12, all"), "{err}");
        // arm64: its own kernel, labelled with the architecture, and no
        // forced-tracepoint pass.
        let arm: Vec<String> = plan(&[], None, Arch::Arm64)
            .unwrap()
            .iter()
            .map(Pass::label)
            .collect();
        assert_eq!(arm, ["6.1 arm64"]);
        assert!(plan(&["5.10".to_owned()], None, Arch::Arm64).is_err());
    }
}
