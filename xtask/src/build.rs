//! `cargo xtask build` and `cargo xtask run`: the portwatch binary, whose
//! build script compiles the eBPF programs, and running it as root.

use std::{ffi::OsString, os::unix::process::CommandExt as _, path::PathBuf, process::Command};

use anyhow::{Result, bail};

use crate::{
    arch::Arch,
    cmd::{self, display},
    setup,
};

/// `cargo xtask build [--release] [--arch arm64]`. The eBPF object is the
/// same bytecode for every architecture, but aya-build compiles it for the
/// target's `bpf_target_arch`.
pub fn build(release: bool, arch: Arch) -> Result<()> {
    build_programs(release, arch, None)
}

/// [`build`], with the eBPF programs built as the bench's measuring
/// `variant` (`cargo xtask bench --ebpf-variant`); `None` as they ship, even
/// if the environment names one.
pub fn build_programs(release: bool, arch: Arch, variant: Option<&str>) -> Result<()> {
    const VARIANT: &str = "PORTWATCH_EBPF_VARIANT";
    setup::ensure()?;
    let mut build = cmd::cargo();
    build.args(["build", "-p", "portwatch"]);
    match variant {
        Some(variant) => build.env(VARIANT, variant),
        None => build.env_remove(VARIANT),
    };
    if release {
        build.arg("--release");
    }
    if let Some(target) = arch.cargo_target() {
        build.args(["--target", target]);
    }
    cmd::run(&mut build)
}

/// `cargo xtask run [--release] -- <args>`: builds, then replaces this process
/// with `portwatch <args>` (through `sudo -E` when not root), so its exit code
/// and its handling of Ctrl-C are portwatch's own.
pub fn run(release: bool, args: &[OsString]) -> Result<()> {
    build(release, Arch::host())?;
    let binary = target_dir()
        .join(if release { "release" } else { "debug" })
        .join("portwatch");
    let mut portwatch = if cmd::is_root() {
        Command::new(&binary)
    } else if cmd::find_in_path("sudo").is_some() {
        // -E keeps RUST_LOG and the like.
        let mut sudo = Command::new("sudo");
        sudo.arg("-E").arg(&binary);
        sudo
    } else {
        bail!(
            "portwatch needs root (it loads eBPF programs) and sudo is not installed: run `{}` as root",
            binary.display()
        );
    };
    portwatch.args(args).current_dir(cmd::workspace_root());
    println!("$ {}", display(&portwatch));
    let err = portwatch.exec();
    bail!("could not start `{}`: {err}", display(&portwatch))
}

/// Where cargo puts build output: the environment may move it.
pub fn target_dir() -> PathBuf {
    ["CARGO_TARGET_DIR", "CARGO_BUILD_TARGET_DIR"]
        .into_iter()
        .find_map(std::env::var_os)
        .map(PathBuf::from)
        .map(|dir| {
            if dir.is_relative() {
                cmd::workspace_root().join(dir)
            } else {
                dir
            }
        })
        .unwrap_or_else(|| cmd::workspace_root().join("target"))
}
