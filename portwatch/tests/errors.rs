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

use support::{CgroupGuard, DEADLINE, Tracer};

fn portwatch() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_portwatch"));
    command.env("RUST_LOG", "error");
    command
}

/// A command line that runs `setup` (shell commands that break something)
/// in a private mount namespace, then execs the command appended to it.
fn private_mounts(setup: &str) -> Vec<String> {
    let mut wrapper: Vec<String> = ["unshare", "--mount", "--propagation", "private", "sh", "-c"]
        .map(str::to_owned)
        .to_vec();
    wrapper.push(format!("set -e; {setup}; exec \"$0\" \"$@\""));
    wrapper
}

/// Runs `portwatch trace ARGS`, which is expected to fail at start-up, after
/// `setup` in [`private_mounts`]. Should it still run at the deadline, it is
/// stopped with SIGTERM (a clean exit, which `one_line` then rejects).
fn trace_in_private_mounts(setup: &str) -> Output {
    let wrapper = private_mounts(setup);
    Command::new(&wrapper[0])
        .args(&wrapper[1..])
        .args([
            "timeout",
            "--preserve-status",
            "--signal=TERM",
            &DEADLINE.as_secs().to_string(),
            env!("CARGO_BIN_EXE_portwatch"),
            "trace",
        ])
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
    let output = trace_in_private_mounts("mount -t tmpfs none /sys/kernel/btf");
    let line = one_line(&output);
    assert!(line.contains("no BTF at /sys/kernel/btf/vmlinux"), "{line}");
    assert!(line.contains("CONFIG_DEBUG_INFO_BTF"), "{line}");
}

#[test]
#[ignore = "needs root, BTF and cgroup2; run by `cargo xtask test`"]
fn without_cgroup2_it_says_how_to_mount_one() {
    let cgroup2 = support::cgroup2_root();
    let setup = format!("umount -l {}", cgroup2.display());
    let output = trace_in_private_mounts(&setup);
    let line = one_line(&output);
    assert!(line.contains("no cgroup2 mount"), "{line}");
    assert!(line.contains("--cgroup"), "{line}");
}

#[test]
#[ignore = "needs root, BTF and cgroup2; run by `cargo xtask test`"]
fn without_tracefs_it_mounts_tracefs_and_attaches() {
    let cgroup = CgroupGuard::new("notracefs");
    // Hide tracefs; portwatch must mount it again. It says so once attached
    // (start_with waits for that line); `--port 1` keeps the output empty.
    let wrapper = private_mounts("mount -t tmpfs none /sys/kernel/tracing");
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let tracer = Tracer::start_with(&wrapper, &cgroup.path, &["--port", "1"]);
    let (status, stderr) = tracer.stop_with_status();
    assert!(stderr.contains("portwatch: tracing binds"), "{stderr}");
    assert!(
        status.is_some_and(|status| status.success()),
        "SIGTERM is a clean stop: {status:?}; stderr:\n{stderr}"
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
