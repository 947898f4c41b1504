//! The CPU architectures portwatch is built, packaged and booted for, and
//! every fact that differs between them, in one place: the Rust target,
//! Debian's name, the cross tools, the QEMU machine and its console.
//!
//! The host is amd64 (x86_64); arm64 (aarch64) is cross-built with Debian's
//! gcc-aarch64-linux-gnu and booted under qemu-system-aarch64 (TCG).

use std::path::PathBuf;

use crate::build::target_dir;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Arch {
    /// x86_64.
    Amd64,
    /// aarch64 (Graviton, Ampere).
    Arm64,
}

impl Arch {
    /// The machine this runs on.
    pub fn host() -> Arch {
        if cfg!(target_arch = "aarch64") {
            Arch::Arm64
        } else {
            Arch::Amd64
        }
    }

    pub fn is_host(self) -> bool {
        self == Arch::host()
    }

    /// Debian's name (package file names, `--architectures`).
    pub fn debian(self) -> &'static str {
        match self {
            Arch::Amd64 => "amd64",
            Arch::Arm64 => "arm64",
        }
    }

    pub const fn rust_target(self) -> &'static str {
        match self {
            Arch::Amd64 => "x86_64-unknown-linux-gnu",
            Arch::Arm64 => "aarch64-unknown-linux-gnu",
        }
    }

    /// `--target` for cargo: none for the host, so its builds stay where
    /// they always were (`target/release`).
    pub fn cargo_target(self) -> Option<&'static str> {
        (!self.is_host()).then(|| self.rust_target())
    }

    /// Where cargo puts this architecture's build with `profile`.
    pub fn profile_dir(self, profile: &str) -> PathBuf {
        match self.cargo_target() {
            Some(target) => target_dir().join(target).join(profile),
            None => target_dir().join(profile),
        }
    }

    /// The objcopy that understands this architecture's binaries.
    pub fn objcopy(self) -> &'static str {
        if self.is_host() {
            "objcopy"
        } else {
            match self {
                Arch::Amd64 => "x86_64-linux-gnu-objcopy",
                Arch::Arm64 => "aarch64-linux-gnu-objcopy",
            }
        }
    }

    /// The CPU QEMU emulates under TCG: every feature it has. On arm64 that
    /// includes pointer authentication, which Debian's kernel uses in every
    /// function; QEMU's default QARMA algorithm for it is slow to emulate
    /// (a suite's boot took 60 s against 20 s), so the guest gets QEMU's
    /// cheap implementation-defined one: the same instructions, still
    /// checked, as on Graviton or Ampere.
    pub fn tcg_cpu(self) -> &'static str {
        match self {
            Arch::Amd64 => "max",
            Arch::Arm64 => "max,pauth-impdef=on",
        }
    }

    pub fn qemu(self) -> &'static str {
        match self {
            Arch::Amd64 => "qemu-system-x86_64",
            Arch::Arm64 => "qemu-system-aarch64",
        }
    }

    /// QEMU's machine for this architecture, beyond CPU and memory.
    pub fn qemu_machine(self) -> &'static [&'static str] {
        match self {
            // The PC's own serial port.
            Arch::Amd64 => &[],
            // The generic virtual board, whose PL011 UART is its console.
            Arch::Arm64 => &["-machine", "virt"],
        }
    }

    /// The kernel's name for the first serial port.
    pub fn console(self) -> &'static str {
        match self {
            Arch::Amd64 => "ttyS0",
            Arch::Arm64 => "ttyAMA0",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_builds_where_it_always_did_and_arm64_beside_it() {
        assert_eq!(Arch::host(), Arch::Amd64, "these tasks run on amd64");
        assert_eq!(Arch::Amd64.cargo_target(), None);
        assert_eq!(
            Arch::Arm64.cargo_target(),
            Some("aarch64-unknown-linux-gnu")
        );
        assert_eq!(
            Arch::Amd64.profile_dir("release"),
            target_dir().join("release")
        );
        assert_eq!(
            Arch::Arm64.profile_dir("release"),
            target_dir().join("aarch64-unknown-linux-gnu/release")
        );
        assert_eq!(Arch::Arm64.objcopy(), "aarch64-linux-gnu-objcopy");
        assert_eq!(Arch::Arm64.console(), "ttyAMA0");
        assert_eq!(Arch::Arm64.debian(), "arm64");
    }
}
