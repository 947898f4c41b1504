//! `cargo xtask package`: the Debian package, built by cargo-deb from the
//! metadata in `portwatch/Cargo.toml`. The man page and shell completions
//! come from the release binary itself (`portwatch man`, `portwatch
//! completions`), so they match its arguments.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::{
    arch::Arch,
    build::{self, target_dir},
    cmd::{self, display, output},
};

/// Generated files the package metadata lists under target/release.
const ASSETS: &str = "deb-assets";

/// `cargo xtask package [--arch arm64]`: builds the release binary,
/// generates the man page and completions, then the .deb; prints and
/// returns its path.
pub fn package(arch: Arch) -> Result<PathBuf> {
    build::build(true, arch)?;
    // The man page and completions come from running the binary: for
    // another architecture, the host's build of the same source, whose
    // arguments are the same.
    if !arch.is_host() {
        build::build(true, Arch::host())?;
    }
    let binary = Arch::host().profile_dir("release").join("portwatch");
    // cargo-deb reads `target/release/...` assets from the target's own
    // directory when given --target.
    let assets = arch.profile_dir("release").join(ASSETS);
    if assets.exists() {
        fs::remove_dir_all(&assets).with_context(|| format!("removing {}", assets.display()))?;
    }
    fs::create_dir_all(&assets).with_context(|| format!("creating {}", assets.display()))?;

    let man = assets.join("portwatch.1");
    fs::write(&man, output(Command::new(&binary).arg("man"))?)?;
    // Debian's policy: man pages gzipped, without a timestamp (-n).
    cmd::run(Command::new("gzip").args(["-9", "-n", "-f"]).arg(&man))?;
    for (shell, file) in [
        ("bash", "portwatch.bash"),
        ("zsh", "_portwatch"),
        ("fish", "portwatch.fish"),
    ] {
        let script = output(Command::new(&binary).args(["completions", shell]))?;
        fs::write(assets.join(file), script)?;
    }

    let out_dir = target_dir().join("debian");
    let mut deb = cmd::cargo();
    deb.args(["deb", "-p", "portwatch", "--no-build", "--output"])
        .arg(&out_dir);
    if let Some(target) = arch.cargo_target() {
        deb.args(["--target", target]);
    }
    println!("$ {}", display(&deb));
    let built = String::from_utf8_lossy(&output(&mut deb)?).into_owned();
    // cargo-deb prints the package's path last.
    let path = built
        .lines()
        .map(str::trim)
        .rfind(|line| line.ends_with(".deb"))
        .map(PathBuf::from)
        .with_context(|| format!("cargo deb did not name the package it built: {built}"))?;
    if !Path::new(&path).is_file() {
        bail!("cargo deb named {} but it is not there", path.display());
    }
    println!("built {}", path.display());
    Ok(path)
}
