//! `cargo xtask setup`: installs what a fresh Debian machine lacks to build
//! portwatch's eBPF programs, lint them, run the tests (promtool) and the
//! benchmarks (wrk, bpftrace), and nothing else. Idempotent:
//! each item is checked first and only a missing one is installed, with one
//! line per item saying which.

use std::process::Command;

use anyhow::{Context as _, Result, bail};

use crate::cmd::{self, display};

/// bpf-linker links against LLVM 22, the LLVM of the Rust toolchains used
/// here; its build must find LLVM 22's `llvm-config` first on PATH.
const LLVM_BIN: &str = "/usr/lib/llvm-22/bin";

/// The bpf-linker release verified with LLVM 22 and rustc 1.95. Pinned so a
/// later release (new LLVM feature names, newer MSRV) cannot break a fresh
/// machine's setup.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// The cargo-deb release known to build with this machine's Rust (1.95).
const CARGO_DEB_VERSION: &str = "3.8.0";

#[derive(Clone, Copy)]
enum Item {
    /// A Debian package, installed with apt-get (needs root).
    Apt(&'static str),
    /// The nightly toolchain, which builds the eBPF crate (`-Z build-std`).
    Nightly,
    /// A component of the nightly toolchain.
    NightlyComponent(&'static str),
    /// A component of the toolchain that builds the host crates.
    HostComponent(&'static str),
    /// A target of that toolchain (the standard library for it).
    HostTarget(&'static str),
    /// bpf-linker, which links the eBPF object.
    BpfLinker,
    /// cargo-deb, which builds the .deb (`cargo xtask package`).
    CargoDeb,
}

/// Everything setup manages, in install order: bpf-linker builds last, against
/// the LLVM packages.
const ITEMS: [Item; 23] = [
    Item::Apt("llvm-22-dev"),
    // LLVM 22 links against it; bpf-linker's build fails without it.
    Item::Apt("libzstd-dev"),
    // `promtool check metrics` checks the daemon's /metrics output in the
    // tests, and later `promtool check rules` the alert rules.
    Item::Apt("prometheus"),
    // tests/service.rs loads the systemd unit's system call filter with
    // libseccomp to run the daemon as the unit would (Debian's python3).
    Item::Apt("python3-seccomp"),
    // The robustness tests check the kernel's own lists of programs and
    // cgroup attachments after the daemon is killed.
    Item::Apt("bpftool"),
    // `cargo xtask bench`: the HTTP load generator, and the bindsnoop-style
    // tool portwatch's bind path is compared with.
    Item::Apt("wrk"),
    Item::Apt("bpftrace"),
    // `cargo xtask vm`: stock kernels under QEMU, and the guest's shell and
    // core tools (static, so the initramfs needs no libraries for them).
    Item::Apt("qemu-system-x86"),
    Item::Apt("busybox-static"),
    // `cargo xtask vm --systemd`: a Debian 12 userspace made from Debian's
    // packages, packed as the guest's initramfs.
    Item::Apt("mmdebstrap"),
    Item::Apt("cpio"),
    // `cargo xtask lint` checks the shell scripts (CI's, the VM's checks).
    Item::Apt("shellcheck"),
    // arm64: `cargo xtask build|package --arch arm64` link with Debian's
    // cross gcc (and strip the VM's binaries with its objcopy), and
    // `cargo xtask vm --arch arm64` boots Debian's arm64 kernel.
    Item::Apt("gcc-aarch64-linux-gnu"),
    Item::Apt("libc6-dev-arm64-cross"),
    Item::Apt("qemu-system-arm"),
    Item::Nightly,
    // `-Z build-std=core`: there is no prebuilt core for the bpf targets.
    Item::NightlyComponent("rust-src"),
    // `cargo xtask lint` runs clippy on the eBPF crate for its bpf target.
    Item::NightlyComponent("clippy"),
    // `cargo xtask lint` on the host crates.
    Item::HostComponent("rustfmt"),
    Item::HostComponent("clippy"),
    Item::HostTarget(crate::arch::Arch::Arm64.rust_target()),
    Item::BpfLinker,
    Item::CargoDeb,
];

impl Item {
    fn name(self) -> String {
        match self {
            Item::Apt(package) => package.to_owned(),
            Item::Nightly => "nightly toolchain".to_owned(),
            Item::NightlyComponent(component) => format!("{component} (nightly)"),
            Item::HostComponent(component) => component.to_owned(),
            Item::HostTarget(target) => format!("{target} (rust target)"),
            Item::BpfLinker => "bpf-linker".to_owned(),
            Item::CargoDeb => "cargo-deb".to_owned(),
        }
    }

    fn is_installed(self) -> bool {
        match self {
            Item::Apt(package) => {
                cmd::probe(Command::new("dpkg-query").args(["-W", "-f=${Status}", package]))
                    .is_some_and(|status| status.trim() == "install ok installed")
            }
            Item::Nightly => cmd::probe(Command::new("rustup").args(["toolchain", "list"]))
                .is_some_and(|list| list.lines().any(is_plain_nightly)),
            Item::NightlyComponent(component) => cmd::probe(Command::new("rustup").args([
                "component",
                "list",
                "--toolchain",
                "nightly",
                "--installed",
            ]))
            .is_some_and(|list| lists_component(&list, component)),
            Item::HostComponent(component) => cmd::probe(
                Command::new("rustup")
                    .args(["component", "list", "--installed"])
                    .current_dir(cmd::workspace_root()),
            )
            .is_some_and(|list| lists_component(&list, component)),
            Item::HostTarget(target) => cmd::probe(
                Command::new("rustup")
                    .args(["target", "list", "--installed"])
                    .current_dir(cmd::workspace_root()),
            )
            .is_some_and(|list| list.lines().any(|line| line.trim() == target)),
            Item::BpfLinker => cmd::probe(Command::new("bpf-linker").arg("--version")).is_some(),
            Item::CargoDeb => cmd::probe(Command::new("cargo-deb").arg("--version"))
                .is_some_and(|version| version.contains(CARGO_DEB_VERSION)),
        }
    }

    fn install_command(self) -> Result<Command> {
        let mut cmd;
        match self {
            Item::Apt(package) => {
                cmd = apt_get();
                // Recommends would add services (prometheus recommends the
                // node exporter) that the project does not need.
                cmd.args(["install", "-y", "--no-install-recommends", package]);
            }
            Item::Nightly => {
                cmd = Command::new("rustup");
                cmd.args(["toolchain", "install", "nightly", "--profile", "minimal"]);
            }
            Item::NightlyComponent(component) => {
                cmd = Command::new("rustup");
                cmd.args(["component", "add", component, "--toolchain", "nightly"]);
            }
            Item::HostComponent(component) => {
                cmd = Command::new("rustup");
                cmd.args(["component", "add", component])
                    .current_dir(cmd::workspace_root());
            }
            Item::HostTarget(target) => {
                cmd = Command::new("rustup");
                cmd.args(["target", "add", target])
                    .current_dir(cmd::workspace_root());
            }
            Item::BpfLinker => {
                cmd = cmd::cargo();
                cmd::prepend_path(&mut cmd, LLVM_BIN)?;
                cmd.args([
                    "install",
                    "bpf-linker",
                    "--version",
                    BPF_LINKER_VERSION,
                    "--no-default-features",
                    "--features",
                    "llvm-22",
                ]);
            }
            Item::CargoDeb => {
                cmd = cmd::cargo();
                cmd.args([
                    "install",
                    "cargo-deb",
                    "--locked",
                    "--version",
                    CARGO_DEB_VERSION,
                ]);
            }
        }
        Ok(cmd)
    }

    /// What to look at when the item is still missing after its install ran.
    fn hint(self) -> &'static str {
        match self {
            Item::BpfLinker | Item::CargoDeb => {
                "; cargo installs into $CARGO_HOME/bin (~/.cargo/bin): is that directory on PATH?"
            }
            _ => "",
        }
    }
}

/// `rustup toolchain list` names the plain nightly `nightly-<host triple>`;
/// dated ones (`nightly-2025-01-01-...`) are not what `+nightly` selects.
fn is_plain_nightly(line: &str) -> bool {
    let name = line.split_whitespace().next().unwrap_or_default();
    name == "nightly"
        || name
            .strip_prefix("nightly-")
            .is_some_and(|rest| !rest.starts_with(|c: char| c.is_ascii_digit()))
}

/// `rustup component list --installed` prints `clippy-x86_64-unknown-linux-gnu`
/// for host components and plain `rust-src` for target-independent ones.
fn lists_component(list: &str, component: &str) -> bool {
    list.lines().map(str::trim).any(|line| {
        line == component
            || line
                .strip_prefix(component)
                .is_some_and(|rest| rest.starts_with('-'))
    })
}

fn apt_get() -> Command {
    let mut cmd = Command::new("apt-get");
    cmd.env("DEBIAN_FRONTEND", "noninteractive");
    cmd
}

/// `cargo xtask setup [--check]`.
pub fn setup(check_only: bool) -> Result<()> {
    let statuses = ITEMS.map(|item| (item, item.is_installed()));
    if check_only {
        return report(&statuses);
    }
    install(&statuses)
}

/// Before a build, test or lint: installs missing items, one line when none is.
pub fn ensure() -> Result<()> {
    let statuses = ITEMS.map(|item| (item, item.is_installed()));
    if statuses.iter().all(|&(_, installed)| installed) {
        println!("setup: all {} items already installed", ITEMS.len());
        return Ok(());
    }
    println!("setup: something is missing, running `cargo xtask setup`");
    install(&statuses)
}

fn report(statuses: &[(Item, bool)]) -> Result<()> {
    let mut missing = 0;
    for &(item, installed) in statuses {
        if installed {
            println!("{}: installed", item.name());
        } else {
            missing += 1;
            let fix = display(&item.install_command()?);
            println!("{}: missing (setup runs `{fix}`)", item.name());
        }
    }
    if missing > 0 {
        bail!(
            "{missing} of {} setup items missing; run `cargo xtask setup`",
            statuses.len()
        );
    }
    Ok(())
}

fn install(statuses: &[(Item, bool)]) -> Result<()> {
    let apt_missing: Vec<&str> = statuses
        .iter()
        .filter_map(|&(item, installed)| match item {
            Item::Apt(package) if !installed => Some(package),
            _ => None,
        })
        .collect();
    // Fail before anything else is installed: bpf-linker cannot build without
    // these packages anyway.
    if !apt_missing.is_empty() && !cmd::is_root() {
        bail!(
            "{} missing and apt-get needs root: run `sudo apt-get install -y {}`, then `cargo xtask setup` again",
            apt_missing.join(", "),
            apt_missing.join(" ")
        );
    }

    let mut apt_updated = false;
    for &(item, installed) in statuses {
        if installed {
            println!("{}: already installed", item.name());
            continue;
        }
        if matches!(item, Item::Apt(_)) && !apt_updated {
            let mut update = apt_get();
            update.arg("update");
            println!("apt package lists: updating ({})", display(&update));
            cmd::run_unannounced(&mut update)?;
            apt_updated = true;
        }
        let mut install = item.install_command()?;
        println!("{}: installing ({})", item.name(), display(&install));
        cmd::run_unannounced(&mut install)
            .with_context(|| format!("installing {}", item.name()))?;
        if let Item::Apt(package) = item {
            stop_service_started_by(package);
        }
        if !item.is_installed() {
            bail!(
                "{}: still missing after `{}`{}",
                item.name(),
                display(&install),
                item.hint()
            );
        }
    }
    Ok(())
}

/// Debian starts the service a package ships (prometheus: a server on
/// :9090) where systemd runs. portwatch only needs the package's tools, so
/// the service is stopped and disabled again.
fn stop_service_started_by(package: &str) {
    const SERVICES: [(&str, &str); 1] = [("prometheus", "prometheus.service")];
    let Some((_, service)) = SERVICES.iter().find(|(p, _)| *p == package) else {
        return;
    };
    if !std::path::Path::new("/run/systemd/system").exists() {
        return; // no systemd: nothing was started
    }
    let mut stop = Command::new("systemctl");
    stop.args(["disable", "--now", service]);
    println!(
        "{package}: stopping the service it started ({})",
        display(&stop)
    );
    if let Err(err) = cmd::run_unannounced(&mut stop) {
        println!("{package}: could not stop {service}: {err:#}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_plain_nightly_only() {
        assert!(is_plain_nightly("nightly-x86_64-unknown-linux-gnu"));
        assert!(is_plain_nightly(
            "nightly-x86_64-unknown-linux-gnu (active)"
        ));
        assert!(is_plain_nightly("nightly"));
        assert!(!is_plain_nightly(
            "nightly-2025-01-01-x86_64-unknown-linux-gnu"
        ));
        assert!(!is_plain_nightly(
            "stable-x86_64-unknown-linux-gnu (default)"
        ));
    }

    #[test]
    fn finds_components_with_and_without_a_target() {
        let list = "cargo-x86_64-unknown-linux-gnu\nclippy-x86_64-unknown-linux-gnu\nrust-src\nrust-std-x86_64-unknown-linux-gnu\n";
        assert!(lists_component(list, "rust-src"));
        assert!(lists_component(list, "clippy"));
        assert!(!lists_component(list, "rustfmt"));
    }
}
