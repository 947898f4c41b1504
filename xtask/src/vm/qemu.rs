//! Booting a kernel and an initramfs under QEMU, with no network device and
//! the serial console written to a file, which is all that comes back.
//!
//! KVM is used where it works. A machine can offer `/dev/kvm` and still fail
//! every KVM boot (ours stop with "failed to set MSR 0x10a"), and QEMU's own
//! fallback (`-accel kvm -accel tcg`) aborts there, so the choice is made by
//! a trial boot, and TCG (`-cpu max`) is used otherwise.

use std::{
    fs::{self, File},
    io::{Read as _, Seek as _, SeekFrom},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

use crate::{arch::Arch, cmd};

/// How the guest's CPU runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Accel {
    /// KVM if a trial boot works, else TCG.
    Auto,
    Kvm,
    /// QEMU's software emulation: slow, works everywhere.
    Tcg,
}

impl Accel {
    pub fn name(self) -> &'static str {
        match self {
            Accel::Auto => "auto",
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }

    fn args(self, arch: Arch) -> [&'static str; 4] {
        match self {
            Accel::Kvm => ["-accel", "kvm", "-cpu", "host"],
            Accel::Auto | Accel::Tcg => ["-accel", "tcg", "-cpu", arch.tcg_cpu()],
        }
    }
}

/// What a boot left behind.
pub struct Boot {
    /// The serial console, `\r` removed.
    pub console: String,
    /// Whether QEMU had to be killed at the time limit.
    pub timed_out: bool,
    /// How long it ran.
    pub elapsed: Duration,
    /// QEMU's own complaints, if it failed.
    pub qemu_stderr: String,
}

/// One VM: a kernel, an initramfs and a command line.
pub struct Vm<'a> {
    pub arch: Arch,
    pub kernel: &'a Path,
    pub initrd: &'a Path,
    pub append: String,
    pub memory_mib: u32,
    pub accel: Accel,
    /// Where the console goes (kept after the run).
    pub console: PathBuf,
    /// Each console line is also printed with this prefix, as it comes.
    pub echo: Option<String>,
}

impl Vm<'_> {
    /// Boots and waits until the guest powers off or `limit` passes.
    pub fn run(&self, limit: Duration) -> Result<Boot> {
        let _ = fs::remove_file(&self.console);
        let mut qemu = Command::new(self.arch.qemu());
        qemu.args(self.arch.qemu_machine())
            .args(self.accel.args(self.arch))
            .args(["-m", &self.memory_mib.to_string(), "-smp", "2"])
            // No default devices (no NIC, no VGA), and no network at all.
            .args(["-nodefaults", "-nic", "none", "-no-reboot"])
            .args(["-display", "none", "-monitor", "none"])
            .arg("-serial")
            .arg(format!("file:{}", self.console.display()))
            .arg("-kernel")
            .arg(self.kernel)
            .arg("-initrd")
            .arg(self.initrd)
            .arg("-append")
            .arg(&self.append)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            // A file, not a pipe: nobody reads a pipe until qemu exits, and
            // a full one would stall it.
            .stderr(File::create(self.console.with_extension("qemu-stderr"))?);
        println!("$ {}", cmd::display(&qemu));
        let started = Instant::now();
        let mut child = qemu
            .spawn()
            .with_context(|| format!("starting {}", self.arch.qemu()))?;
        let mut tail = Tail::default();
        let timed_out = loop {
            if child.try_wait()?.is_some() {
                break false;
            }
            if started.elapsed() > limit {
                let _ = child.kill();
                let _ = child.wait();
                break true;
            }
            std::thread::sleep(Duration::from_millis(250));
            tail.echo(&self.console, self.echo.as_deref());
        };
        tail.echo(&self.console, self.echo.as_deref());
        let qemu_stderr =
            fs::read_to_string(self.console.with_extension("qemu-stderr")).unwrap_or_default();
        let console = fs::read(&self.console).unwrap_or_default();
        Ok(Boot {
            console: String::from_utf8_lossy(&console).replace('\r', ""),
            timed_out,
            elapsed: started.elapsed(),
            qemu_stderr,
        })
    }
}

/// Prints what a growing file gained since the last look, line by line.
#[derive(Default)]
struct Tail {
    offset: u64,
    partial: String,
}

impl Tail {
    fn echo(&mut self, path: &Path, prefix: Option<&str>) {
        let Some(prefix) = prefix else { return };
        let Ok(mut file) = File::open(path) else {
            return;
        };
        if file.seek(SeekFrom::Start(self.offset)).is_err() {
            return;
        }
        let mut fresh = Vec::new();
        if let Ok(n) = file.read_to_end(&mut fresh) {
            self.offset += n as u64;
        }
        self.partial
            .push_str(&String::from_utf8_lossy(&fresh).replace('\r', ""));
        while let Some(end) = self.partial.find('\n') {
            println!("{prefix}{}", &self.partial[..end]);
            self.partial.drain(..=end);
        }
    }
}
