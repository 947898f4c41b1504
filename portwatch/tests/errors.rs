//! What `portwatch trace` says when the environment is wrong: one line that
//! names the problem and the fix, and a non-zero exit; or, for tracefs, that
//! it mounts the file system itself and goes on.
//!
//! The broken environments are made in a private mount namespace
//! (`unshare --mount`), so the machine itself is never touched.

mod support;

use std::{
    os::unix::process::CommandExt,
    process::{Command, Output},
};

use support::CgroupGuard;

fn portwatch() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_portwatch"));
    command.env("RUST_LOG", "error");
    command
}

/// Runs `portwatch trace ARGS` inside a private mount namespace after `setup`
/// (shell commands that break something there). Stopped with SIGTERM after 5 s.
fn trace_in_private_mounts(setup: &str, args: &str) -> Output {
    let script = format!(
        "set -e; {setup}; exec timeout --preserve-status --signal=TERM 5 {} trace {args}",
        env!("CARGO_BIN_EXE_portwatch")
    );
    Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .env("RUST_LOG", "error")
        .output()
        .expect("run unshare")
}

/// The one line the failure printed, checked to be a single line.
fn one_line(output: &Output) -> String {
    assert!(!output.status.success(), "expected a failure: {output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|line| !line.trim().is_empty())
        .collect();
    assert_eq!(lines.len(), 1, "exactly one line, got:\n{stderr}");
    assert!(lines[0].starts_with("portwatch: "), "{stderr}");
    lines[0].to_owned()
}

#[test]
#[ignore = "needs root, BTF and cgroup2; run by `cargo xtask test`"]
fn without_privileges_it_names_the_missing_capability() {
    let output = portwatch()
        .arg("trace")
        .uid(65534)
        .gid(65534)
        .output()
        .expect("run");
    let line = one_line(&output);
    assert!(line.contains("missing capability CAP_BPF"), "{line}");
    assert!(line.contains("run portwatch as root"), "{line}");
}

#[test]
#[ignore = "needs root, BTF and cgroup2; run by `cargo xtask test`"]
fn without_btf_it_says_which_kernel_option_is_needed() {
    let output = trace_in_private_mounts("mount -t tmpfs none /sys/kernel/btf", "");
    let line = one_line(&output);
    assert!(line.contains("no BTF at /sys/kernel/btf/vmlinux"), "{line}");
    assert!(line.contains("CONFIG_DEBUG_INFO_BTF"), "{line}");
}

#[test]
#[ignore = "needs root, BTF and cgroup2; run by `cargo xtask test`"]
fn without_cgroup2_it_says_how_to_mount_one() {
    let cgroup2 = support::cgroup2_root();
    let setup = format!("umount -l {}", cgroup2.display());
    let output = trace_in_private_mounts(&setup, "");
    let line = one_line(&output);
    assert!(line.contains("no cgroup2 mount"), "{line}");
    assert!(line.contains("--cgroup"), "{line}");
}

#[test]
#[ignore = "needs root, BTF and cgroup2; run by `cargo xtask test`"]
fn without_tracefs_it_mounts_tracefs_and_attaches() {
    let cgroup = CgroupGuard::new("notracefs");
    // Hide tracefs; portwatch must mount it again. `--port 1` keeps the
    // output empty; the timeout's TERM is the clean stop.
    let args = format!("--json --port 1 --cgroup {}", cgroup.path.display());
    let output = trace_in_private_mounts("mount -t tmpfs none /sys/kernel/tracing", &args);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("portwatch: tracing binds"), "{stderr}");
    assert!(
        output.status.success(),
        "SIGTERM is a clean stop: {output:?}"
    );
}

#[test]
#[ignore = "needs root, BTF and cgroup2; run by `cargo xtask test`"]
fn a_path_that_is_not_a_cgroup_is_refused() {
    let output = portwatch()
        .args(["trace", "--cgroup", "/tmp"])
        .output()
        .expect("run");
    let line = one_line(&output);
    assert!(line.contains("/tmp is not a cgroup2 directory"), "{line}");
}

#[test]
#[ignore = "needs root, BTF and cgroup2; run by `cargo xtask test`"]
fn a_bad_ring_size_is_refused() {
    let cgroup = CgroupGuard::new("ringsize");
    let output = portwatch()
        .args(["trace", "--ring-size", "5000", "--cgroup"])
        .arg(&cgroup.path)
        .output()
        .expect("run");
    let line = one_line(&output);
    assert!(line.contains("ring buffer size 5000"), "{line}");
}

#[test]
fn bad_arguments_are_refused_before_anything_is_loaded() {
    // No root needed: clap refuses these before any kernel work.
    for args in [
        &["trace", "--port", "0"][..],
        &["trace", "--port", "http"],
        &["trace", "--bogus"],
    ] {
        let output = portwatch().args(args).output().expect("run");
        assert_eq!(output.status.code(), Some(2), "{args:?}: {output:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.starts_with("error:"), "{args:?}: {stderr}");
    }
}
