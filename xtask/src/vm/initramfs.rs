//! The VM's whole userspace, as one initramfs: busybox, the few tools the
//! tests call (`ip`, `ss`, `bpftool`, `promtool`) with the shared libraries
//! they link, the portwatch binary and the test binaries (debug info
//! stripped), the kernel modules the tests need, and an `/init` script.
//!
//! Written as an uncompressed newc cpio archive: the kernel unpacks it
//! without a decompressor, which under TCG is the faster way.

use std::{
    collections::BTreeMap,
    fs::{self, File},
    io::{BufWriter, Read as _, Write as _},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use cpio::NewcBuilder;

use crate::{arch::Arch, cmd};

const DIR: u32 = 0o040_755;
const EXECUTABLE: u32 = 0o100_755;
const REGULAR: u32 = 0o100_644;
const SYMLINK: u32 = 0o120_777;

/// What a guest userland taken whole from Debian packages leaves out.
const UNNEEDED: [&str; 4] = [
    "usr/share/doc",
    "usr/share/man",
    "usr/share/locale",
    "usr/share/info",
];

/// What goes into the archive, by path in the guest (absolute).
#[derive(Default)]
pub struct Initramfs {
    entries: BTreeMap<PathBuf, Entry>,
}

enum Entry {
    Dir,
    File {
        source: Source,
        mode: u32,
    },
    /// A symbolic link to this target.
    Symlink(PathBuf),
}

enum Source {
    Host(PathBuf),
    Bytes(Vec<u8>),
}

impl Initramfs {
    /// Adds `host` at `guest`, and its parent directories.
    pub fn file(&mut self, guest: impl AsRef<Path>, host: impl Into<PathBuf>, mode: u32) {
        self.insert(
            guest.as_ref(),
            Entry::File {
                source: Source::Host(host.into()),
                mode,
            },
        );
    }

    /// Adds `bytes` at `guest`.
    pub fn bytes(&mut self, guest: impl AsRef<Path>, bytes: impl Into<Vec<u8>>, executable: bool) {
        let mode = if executable { EXECUTABLE } else { REGULAR };
        self.insert(
            guest.as_ref(),
            Entry::File {
                source: Source::Bytes(bytes.into()),
                mode,
            },
        );
    }

    /// Adds an empty directory.
    pub fn dir(&mut self, guest: impl AsRef<Path>) {
        self.insert(guest.as_ref(), Entry::Dir);
    }

    /// Adds the program `host` at `guest`, with every shared library it
    /// loads (`ldd`) at the path the dynamic loader looks for it.
    pub fn program(&mut self, guest: impl AsRef<Path>, host: &Path) -> Result<()> {
        for library in shared_libraries(host)? {
            let real = fs::canonicalize(&library)
                .with_context(|| format!("resolving {}", library.display()))?;
            self.file(&library, real, EXECUTABLE);
        }
        self.file(guest, host, EXECUTABLE);
        Ok(())
    }

    /// Adds `host`, a binary for `arch`, at `guest` without its debug
    /// information (a copy in `scratch`): the test binaries shrink about
    /// tenfold. The host's own binaries bring their libraries (`ldd`);
    /// another architecture's come from its userland ([`Initramfs::tree`]).
    pub fn stripped_program(
        &mut self,
        guest: impl AsRef<Path>,
        host: &Path,
        scratch: &Path,
        arch: Arch,
    ) -> Result<()> {
        let name = host
            .file_name()
            .with_context(|| format!("{} has no file name", host.display()))?;
        let copy = scratch.join(name);
        cmd::output(
            Command::new(arch.objcopy())
                .arg("--strip-debug")
                .arg(host)
                .arg(&copy),
        )?;
        if arch.is_host() {
            self.program(guest, &copy)
        } else {
            self.file(guest, copy, EXECUTABLE);
            Ok(())
        }
    }

    /// Adds the tree under `root` (files, directories and symbolic links,
    /// with their modes) at the guest's `/`, but for documentation.
    pub fn tree(&mut self, root: &Path) -> Result<()> {
        let mut dirs = vec![root.to_path_buf()];
        while let Some(dir) = dirs.pop() {
            for entry in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
                let path = entry?.path();
                let inside = path.strip_prefix(root).unwrap_or(&path);
                if UNNEEDED.iter().any(|skip| inside.starts_with(skip)) {
                    continue;
                }
                let guest = Path::new("/").join(inside);
                let meta = fs::symlink_metadata(&path)
                    .with_context(|| format!("reading {}", path.display()))?;
                if meta.file_type().is_symlink() {
                    let target = fs::read_link(&path)?;
                    self.insert(&guest, Entry::Symlink(target));
                } else if meta.is_dir() {
                    self.dir(&guest);
                    dirs.push(path);
                } else if meta.is_file() {
                    let mode = 0o100_000 | (meta.permissions().mode() & 0o7777);
                    self.file(&guest, path, mode);
                }
            }
        }
        Ok(())
    }

    fn insert(&mut self, guest: &Path, entry: Entry) {
        for parent in guest.ancestors().skip(1) {
            if parent != Path::new("/") && !parent.as_os_str().is_empty() {
                self.entries
                    .entry(parent.to_path_buf())
                    .or_insert(Entry::Dir);
            }
        }
        self.entries.insert(guest.to_path_buf(), entry);
    }

    /// Writes the archive to `out`; its size in bytes.
    pub fn write(&self, out: &Path) -> Result<u64> {
        let file = File::create(out).with_context(|| format!("creating {}", out.display()))?;
        let mut writer = BufWriter::new(file);
        // Parents sort before their children, as the kernel needs them.
        for (ino, (path, entry)) in self.entries.iter().enumerate() {
            let name = path.to_string_lossy();
            let name = name.trim_start_matches('/');
            let builder = NewcBuilder::new(name)
                .ino(ino as u32 + 1)
                .uid(0)
                .gid(0)
                .nlink(1);
            match entry {
                Entry::Dir => {
                    builder.mode(DIR).write(&mut writer, 0).finish()?;
                }
                Entry::Symlink(target) => {
                    let target = target.as_os_str().as_encoded_bytes();
                    let size = u32::try_from(target.len()).context("a symlink's target")?;
                    let mut entry = builder.mode(SYMLINK).write(&mut writer, size);
                    entry.write_all(target)?;
                    entry.finish()?;
                }
                Entry::File { source, mode } => {
                    let data = match source {
                        Source::Bytes(bytes) => bytes.clone(),
                        Source::Host(host) => {
                            let mut data = Vec::new();
                            File::open(host)
                                .and_then(|mut f| f.read_to_end(&mut data))
                                .with_context(|| format!("reading {}", host.display()))?;
                            data
                        }
                    };
                    let size = u32::try_from(data.len())
                        .with_context(|| format!("{name} is larger than cpio allows"))?;
                    let mut entry = builder.mode(*mode).write(&mut writer, size);
                    entry.write_all(&data)?;
                    entry.finish()?;
                }
            }
        }
        let writer = cpio::newc::trailer(writer)?;
        let file = writer.into_inner().context("flushing the archive")?;
        Ok(file.metadata()?.len())
    }
}

/// The shared libraries `program` loads, as `ldd` resolves them (the
/// dynamic loader included); none for a static program.
fn shared_libraries(program: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(program)
        .output()
        .with_context(|| format!("running ldd {}", program.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // ldd exits 1 on a static program.
        if text.contains("not a dynamic executable")
            || String::from_utf8_lossy(&out.stderr).contains("not a dynamic executable")
        {
            return Ok(Vec::new());
        }
        bail!(
            "ldd {} failed: {}",
            program.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(parse_ldd(&text))
}

/// Library paths from `ldd` output: `name => /path (addr)` and the loader's
/// own `/path (addr)`; the vDSO has no file and is skipped.
pub fn parse_ldd(text: &str) -> Vec<PathBuf> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim();
            let path = match line.split_once("=>") {
                Some((_, rest)) => rest.trim(),
                None => line,
            };
            let path = path.split_whitespace().next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

/// The module files the VM loads, dependencies first, found in `modules`
/// (a kernel's `lib/modules/<version>`); `wanted` names that the kernel
/// builds in (`modules.builtin`) are left out. Compressed modules are
/// decompressed into `scratch`, since busybox's insmod takes plain ones.
pub fn kernel_modules(
    modules: &Path,
    wanted: &[&str],
    scratch: &Path,
) -> Result<Vec<(String, PathBuf)>> {
    let builtin = fs::read_to_string(modules.join("modules.builtin")).unwrap_or_default();
    let mut files = BTreeMap::new();
    for dir_entry in walk(modules)? {
        let name = dir_entry
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if let Some(stem) = [".ko", ".ko.xz", ".ko.zst"]
            .iter()
            .find_map(|ext| name.strip_suffix(ext))
        {
            files.insert(stem.replace('-', "_"), dir_entry);
        }
    }
    let mut ordered: Vec<(String, PathBuf)> = Vec::new();
    let mut stack: Vec<(String, bool)> = wanted
        .iter()
        .rev()
        .map(|n| (n.replace('-', "_"), false))
        .collect();
    while let Some((name, deps_done)) = stack.pop() {
        if ordered.iter().any(|(done, _)| *done == name) {
            continue;
        }
        let Some(file) = files.get(&name) else {
            let is_builtin = builtin.lines().any(|line| {
                Path::new(line)
                    .file_stem()
                    .is_some_and(|stem| stem.to_string_lossy().replace('-', "_") == name)
            });
            if is_builtin {
                continue;
            }
            bail!(
                "module {name} is neither in {} nor built in",
                modules.display()
            );
        };
        let plain = plain_module(file, scratch)?;
        if deps_done {
            ordered.push((name, plain));
            continue;
        }
        stack.push((name.clone(), true));
        for dep in module_depends(&plain)? {
            stack.push((dep, false));
        }
    }
    Ok(ordered)
}

fn walk(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                found.push(path);
            }
        }
    }
    Ok(found)
}

/// `file` itself, or its decompressed copy in `scratch`.
fn plain_module(file: &Path, scratch: &Path) -> Result<PathBuf> {
    let name = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tool = if name.ends_with(".xz") {
        "xz"
    } else if name.ends_with(".zst") {
        "zstd"
    } else {
        return Ok(file.to_path_buf());
    };
    let plain = scratch.join(
        name.rsplit_once('.')
            .map_or(name.as_str(), |(stem, _)| stem),
    );
    let bytes = cmd::output(Command::new(tool).arg("-dc").arg(file))?;
    fs::write(&plain, bytes)?;
    Ok(plain)
}

/// The `depends=` entry of a module's `.modinfo` strings.
fn module_depends(module: &Path) -> Result<Vec<String>> {
    let data = fs::read(module).with_context(|| format!("reading {}", module.display()))?;
    Ok(modinfo_depends(&data))
}

pub fn modinfo_depends(data: &[u8]) -> Vec<String> {
    data.split(|b| *b == 0)
        .find_map(|field| field.strip_prefix(b"depends="))
        .map(|list| {
            String::from_utf8_lossy(list)
                .split(',')
                .filter(|dep| !dep.is_empty())
                .map(|dep| dep.replace('-', "_"))
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_gives_the_library_paths() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f)\n\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        assert_eq!(
            parse_ldd(text),
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libgcc_s.so.1"),
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            ]
        );
        assert!(parse_ldd("\tstatically linked\n").is_empty());
    }

    #[test]
    fn modinfo_names_the_dependencies() {
        let data = b"\x7fELF junk\0license=GPL\0depends=inet_diag,sock-diag\0vermagic=6.1\0";
        assert_eq!(modinfo_depends(data), ["inet_diag", "sock_diag"]);
        assert!(modinfo_depends(b"\0depends=\0name=veth\0").is_empty());
        assert!(modinfo_depends(b"no modinfo here").is_empty());
    }

    #[test]
    fn an_archive_lists_parents_before_children() {
        let dir = std::env::temp_dir().join(format!("xtask-initramfs-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let mut initramfs = Initramfs::default();
        initramfs.bytes("/a/b/init", b"#!/bin/sh\n".to_vec(), true);
        initramfs.dir("/tmp");
        let out = dir.join("test.cpio");
        let size = initramfs.write(&out).unwrap();
        let mut names = Vec::new();
        let mut file = File::open(&out).unwrap();
        loop {
            let reader = cpio::NewcReader::new(file).unwrap();
            if reader.entry().is_trailer() {
                break;
            }
            names.push((reader.entry().name().to_owned(), reader.entry().mode()));
            file = reader.finish().unwrap();
        }
        fs::remove_dir_all(&dir).unwrap();
        assert!(size > 0);
        assert_eq!(
            names,
            [
                ("a".to_owned(), DIR),
                ("a/b".to_owned(), DIR),
                ("a/b/init".to_owned(), EXECUTABLE),
                ("tmp".to_owned(), DIR),
            ]
        );
    }
}
