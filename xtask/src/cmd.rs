//! Running external programs. Every command that changes something is printed
//! first as `$ cmd args`, the way a shell transcript would show it, and a
//! failure names the command. Probes (is X installed?) run silently.

use std::{
    ffi::OsStr,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
};

use anyhow::{Context as _, Result, bail};

/// The workspace root; every command runs from here, whatever directory
/// `cargo xtask` was started in.
pub fn workspace_root() -> PathBuf {
    let xtask_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    xtask_dir.parent().unwrap_or(xtask_dir).to_path_buf()
}

/// `cargo` (the rustup proxy on PATH, so `+nightly` works), run from the
/// workspace root.
pub fn cargo() -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(workspace_root());
    cmd
}

/// Prints `$ cmd`, runs it with inherited stdio, fails unless it exits 0.
pub fn run(cmd: &mut Command) -> Result<()> {
    println!("$ {}", display(cmd));
    run_unannounced(cmd)
}

/// Runs `cmd` with inherited stdio, fails unless it exits 0. For callers that
/// already printed the command in their own words.
pub fn run_unannounced(cmd: &mut Command) -> Result<()> {
    let status = status(cmd)?;
    if !status.success() {
        bail!("`{}` failed ({status})", display(cmd));
    }
    Ok(())
}

/// Runs `cmd` with inherited stdio and returns how it ended.
fn status(cmd: &mut Command) -> Result<ExitStatus> {
    cmd.status()
        .with_context(|| format!("could not start `{}`", display(cmd)))
}

/// Runs `cmd` with its output captured, failing unless it exits 0 (naming
/// it, with its stderr); its stdout.
pub fn output(cmd: &mut Command) -> Result<Vec<u8>> {
    let out = cmd
        .output()
        .with_context(|| format!("could not start `{}`", display(cmd)))?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            display(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out.stdout)
}

/// Runs `cmd` quietly; its stdout if it started and exited 0, else `None`.
pub fn probe(cmd: &mut Command) -> Option<String> {
    let out = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether this process runs with effective uid 0.
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let ids = status.lines().find_map(|line| line.strip_prefix("Uid:"))?;
            // Real, effective, saved, filesystem uid: the effective one decides.
            ids.split_whitespace().nth(1).map(|euid| euid == "0")
        })
        .unwrap_or(false)
}

/// The first executable file called `name` in PATH.
pub fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|file| {
            file.metadata()
                .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
        })
}

/// Sets PATH for `cmd` to `dir` followed by this process's PATH.
pub fn prepend_path(cmd: &mut Command, dir: &str) -> Result<()> {
    let current = std::env::var_os("PATH").unwrap_or_default();
    let rest = std::env::split_paths(&current).filter(|dir| !dir.as_os_str().is_empty());
    let dirs = std::iter::once(PathBuf::from(dir)).chain(rest);
    let joined = std::env::join_paths(dirs).context("building PATH")?;
    cmd.env("PATH", joined);
    Ok(())
}

/// `cmd` as a shell would read it: explicitly set variables first, arguments
/// quoted where needed, and a PATH that extends ours shown as `dir:$PATH`.
pub fn display(cmd: &Command) -> String {
    let mut words = Vec::new();
    for (key, value) in cmd.get_envs() {
        let Some(value) = value else { continue };
        words.push(format!(
            "{}={}",
            key.to_string_lossy(),
            env_value(key, value)
        ));
    }
    words.push(quote(cmd.get_program()));
    words.extend(cmd.get_args().map(quote));
    words.join(" ")
}

fn env_value(key: &OsStr, value: &OsStr) -> String {
    if key == "PATH"
        && let Some(current) = std::env::var_os("PATH").filter(|path| !path.is_empty())
        && let Some(prefix) = value
            .to_string_lossy()
            .strip_suffix(&*current.to_string_lossy())
        && !prefix.is_empty()
    {
        return format!("{}$PATH", quote(OsStr::new(prefix)));
    }
    quote(value)
}

fn quote(word: &OsStr) -> String {
    let word = word.to_string_lossy();
    let plain = |c: char| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c);
    if !word.is_empty() && word.chars().all(plain) {
        word.into_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_quotes_only_what_a_shell_would_split() {
        let mut cmd = Command::new("dpkg-query");
        cmd.args(["-W", "-f=${Status}", "it's"]);
        assert_eq!(display(&cmd), r"dpkg-query -W '-f=${Status}' 'it'\''s'");
    }

    #[test]
    fn display_shows_a_prepended_path_as_dollar_path() {
        let mut cmd = Command::new("cargo");
        prepend_path(&mut cmd, "/usr/lib/llvm-22/bin").unwrap();
        cmd.env("DEBIAN_FRONTEND", "noninteractive").arg("install");
        let shown = display(&cmd);
        assert!(shown.contains("PATH=/usr/lib/llvm-22/bin:$PATH"), "{shown}");
        assert!(shown.contains("DEBIAN_FRONTEND=noninteractive"), "{shown}");
        assert!(shown.ends_with("cargo install"), "{shown}");
    }
}
