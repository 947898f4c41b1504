//! Builds the kernel programs (`portwatch-ebpf`) for the bpf target with the
//! nightly toolchain and bpf-linker, and leaves the object in OUT_DIR for
//! `include_bytes_aligned!`. When that toolchain is missing the build stops
//! with one line that names the command installing it.
use std::process::Command;

use anyhow::{Context as _, anyhow};

const SETUP_HINT: &str = "run `cargo xtask setup`";

/// The build-time choice of a bench variant of the eBPF programs.
const VARIANT: &str = "PORTWATCH_EBPF_VARIANT";

fn main() {
    emit_revision();
    emit_variant();
    if let Err(missing) = check_toolchain() {
        println!("cargo::error=portwatch: {missing}; {SETUP_HINT}");
        return;
    }
    let package = aya_build::Package {
        name: "portwatch-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../portwatch-ebpf"),
        ..Default::default()
    };
    if let Err(err) = aya_build::build_ebpf([package], aya_build::Toolchain::Nightly)
        .context("building the eBPF programs")
    {
        println!("cargo::error=portwatch: {err:#}");
    }
}

/// `cargo xtask bench --ebpf-variant` builds the programs as one of its
/// measuring variants (see `portwatch-ebpf`'s `variant`); the daemon says so
/// at start. Changing it rebuilds the programs, so no later build keeps one.
fn emit_variant() {
    println!("cargo::rerun-if-env-changed={VARIANT}");
    let variant = std::env::var(VARIANT).unwrap_or_default();
    println!("cargo::rustc-env={VARIANT}={variant}");
}

/// Names the first missing piece of the eBPF toolchain.
fn check_toolchain() -> anyhow::Result<()> {
    println!("cargo::rerun-if-env-changed=PATH");
    let linker = Command::new("bpf-linker").arg("--version").output();
    if !linker.is_ok_and(|out| out.status.success()) {
        return Err(anyhow!("bpf-linker is not installed"));
    }
    let sysroot = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--print", "sysroot"])
        .output()
        .ok()
        .filter(|out| out.status.success())
        .ok_or_else(|| anyhow!("the nightly Rust toolchain is not installed"))?;
    let sysroot = String::from_utf8_lossy(&sysroot.stdout).trim().to_owned();
    let rust_src = std::path::Path::new(&sysroot).join("lib/rustlib/src/rust/library/core");
    if !rust_src.is_dir() {
        return Err(anyhow!("nightly's rust-src component is not installed"));
    }
    Ok(())
}

/// `PORTWATCH_REVISION`: the git commit this was built from, for `--version`.
fn emit_revision() {
    let revision = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned())
        .unwrap_or_else(|| "unknown revision".to_owned());
    println!("cargo::rustc-env=PORTWATCH_REVISION={revision}");
    println!("cargo::rerun-if-changed=../.git/HEAD");
    println!("cargo::rerun-if-changed=../.git/refs/heads");
}
