//! `cargo xtask lint`: formatting, clippy with `-D warnings` on every crate
//! for every target it is built for, and shellcheck on the shell scripts.
//! Runs every check, then fails if any failed, so one run shows all the
//! problems.
//!
//! `portwatch-ebpf` is linted separately from the host crates (as
//! aya-template's `test.sh` does): its programs exist only for the bpf target,
//! which needs nightly and `-Z build-std=core`, and its library is also built
//! for the host, with the `user` feature, by `portwatch`.

use std::process::Command;

use anyhow::{Result, bail};

use crate::{
    cmd::{self, display},
    setup,
};

fn checks() -> Vec<Command> {
    let cargo = |args: &[&str]| {
        let mut cmd = cmd::cargo();
        cmd.args(args);
        cmd
    };
    vec![
        cargo(&["fmt", "--all", "--", "--check"]),
        cargo(&[
            "clippy",
            "-p",
            "portwatch",
            "-p",
            "xtask",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]),
        // The wire types as the daemon compiles them: host target, `user` on.
        cargo(&[
            "clippy",
            "-p",
            "portwatch-ebpf",
            "--lib",
            "--features",
            "user",
            "--",
            "-D",
            "warnings",
        ]),
        // The kernel programs, for the target they are built for.
        cargo(&[
            "+nightly",
            "clippy",
            "-p",
            "portwatch-ebpf",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--release",
            "--",
            "-D",
            "warnings",
        ]),
        // The shell scripts: CI's, and the systemd VM's checks.
        shellcheck(),
    ]
}

fn shellcheck() -> Command {
    let root = cmd::workspace_root();
    let mut check = Command::new("shellcheck");
    check
        .arg(root.join(".ci/run"))
        .arg(root.join("xtask/src/vm/guest/systemd-checks.sh"));
    check
}

/// `cargo xtask lint`.
pub fn lint() -> Result<()> {
    // clippy on `portwatch` runs its build script, which builds the eBPF
    // programs; the last check needs nightly's clippy and rust-src.
    setup::ensure()?;
    let mut checks = checks();
    let total = checks.len();
    let mut failed = Vec::new();
    for check in &mut checks {
        if let Err(err) = cmd::run(check) {
            println!("lint: {err:#}");
            failed.push(display(check));
        }
    }
    if failed.is_empty() {
        println!("lint: all {total} checks passed");
        return Ok(());
    }
    println!("lint: {} of {total} checks failed:", failed.len());
    for check in &failed {
        println!("  {check}");
    }
    bail!("lint failed")
}
