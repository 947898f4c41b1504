//! What `portwatch trace` and `portwatch daemon` say when the environment
//! or the daemon's configuration is wrong: one line on stderr that names the
//! problem (and the fix), and an exit status that says whether a restart
//! can help (`portwatch::app::Exit`: 78 configuration, 77 privileges, 69 an
//! unsupported kernel, 1 anything that may pass); or, for tracefs, that
//! they mount the file system themselves and go on.
//!
//! The broken environments are made in a private mount namespace
//! (`unshare --mount`), so the machine itself is never touched. Every command
//! that could load programs is given a child cgroup of the test's own, and
//! a deadline, should it start after all.

mod support;

use std::{
    os::unix::{fs::PermissionsExt, process::CommandExt},
    path::Path,
    process::{Command, Output},
};

use portwatch::app::Exit;
use support::{CgroupGuard, DEADLINE, TempDir, Tracer, daemon::Daemon};

fn portwatch() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_portwatch"));
    command.env("RUST_LOG", "error");
    command
}

/// The commands that load the kernel programs. The daemon reads an empty
/// configuration (the defaults, whatever /etc holds) and takes any free
/// loopback port.
const LOADERS: [&[&str]; 2] = [
    &["trace"],
    &["daemon", "--config", "/dev/null", "--listen", "127.0.0.1:0"],
];

/// `timeout ... portwatch ARGS EXTRA`, as a command line: should portwatch
/// still run at the deadline, it is stopped with SIGTERM (a clean exit,
/// which `one_line` then rejects).
fn until_deadline(args: &[&str], extra: &[&str]) -> Vec<String> {
    let deadline = DEADLINE.as_secs().to_string();
    ["timeout", "--preserve-status", "--signal=TERM", &deadline]
        .into_iter()
        .chain([env!("CARGO_BIN_EXE_portwatch")])
        .chain(args.iter().chain(extra).copied())
        .map(str::to_owned)
        .collect()
}

/// A command line as a command, logging at the default level, so that the
/// one line is all a user would see.
fn command(line: &[String]) -> Command {
    let mut command = Command::new(&line[0]);
    command.args(&line[1..]).env("RUST_LOG", "info");
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

/// Runs each of [`LOADERS`] (then `extra`), which is expected to fail at
/// start-up with `exit`, after `setup` in [`private_mounts`]; the one line
/// each printed.
fn loaders_in_private_mounts(setup: &str, extra: &[&str], exit: Exit) -> Vec<String> {
    LOADERS
        .iter()
        .map(|args| {
            let mut line = private_mounts(setup);
            line.extend(until_deadline(args, extra));
            let output = command(&line).output().expect("run unshare");
            one_line(&args.join(" "), &output, exit)
        })
        .collect()
}

/// The one line the failure of `what` printed, checked to be a single line
/// after exit status `exit`.
fn one_line(what: &str, output: &Output, exit: Exit) -> String {
    assert_eq!(
        output.status.code(),
        Some(i32::from(exit as u8)),
        "{what}: expected a failure ({exit:?}): {output:?}"
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|line| !line.trim().is_empty())
        .collect();
    assert_eq!(lines.len(), 1, "{what}: exactly one line, got:\n{stderr}");
    assert!(lines[0].starts_with("portwatch: "), "{what}: {stderr}");
    lines[0].to_owned()
}

fn path_arg(path: &Path) -> &str {
    path.to_str().expect("a UTF-8 path")
}

#[test]
#[ignore = "needs root, BTF and cgroup2; run by `cargo xtask test`"]
fn without_privileges_it_names_the_missing_capability() {
    let cgroup = CgroupGuard::new("noprivs");
    for args in LOADERS {
        let output = command(&until_deadline(args, &["--cgroup", path_arg(&cgroup.path)]))
            .uid(65534)
            .gid(65534)
            .output()
            .expect("run");
        let line = one_line(&args.join(" "), &output, Exit::NoPermission);
        assert!(line.contains("missing capability CAP_BPF"), "{line}");
        assert!(line.contains("run portwatch as root"), "{line}");
    }
}

#[test]
#[ignore = "needs root, BTF and cgroup2; run by `cargo xtask test`"]
fn without_btf_it_says_which_kernel_option_is_needed() {
    let cgroup = CgroupGuard::new("nobtf");
    let extra = ["--cgroup", path_arg(&cgroup.path)];
    let setup = "mount -t tmpfs none /sys/kernel/btf";
    for line in loaders_in_private_mounts(setup, &extra, Exit::Unsupported) {
        assert!(line.contains("no BTF at /sys/kernel/btf/vmlinux"), "{line}");
        assert!(line.contains("CONFIG_DEBUG_INFO_BTF"), "{line}");
    }
}

#[test]
#[ignore = "needs root, BTF and cgroup2; run by `cargo xtask test`"]
fn without_cgroup2_it_says_how_to_mount_one() {
    let cgroup2 = support::cgroup2_root();
    let setup = format!("umount -l {}", cgroup2.display());
    for line in loaders_in_private_mounts(&setup, &[], Exit::Unsupported) {
        assert!(line.contains("no cgroup2 mount"), "{line}");
        assert!(line.contains("--cgroup"), "{line}");
    }
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
    // The daemon too: ready means its tracepoints are attached.
    let daemon = Daemon::start_with(&cgroup, "", &wrapper);
    let (code, stderr) = daemon.stop();
    assert_eq!(code, Some(0), "{stderr}");
}

#[test]
#[ignore = "needs root, BTF and cgroup2; run by `cargo xtask test`"]
fn when_tracefs_cannot_be_mounted_it_says_how_to_mount_it() {
    let cgroup = CgroupGuard::new("notracefsdir");
    // A /sys/kernel with nothing but the BTF in it: no directory to mount
    // tracefs on.
    let setup = "btf=$(mktemp -d); mount --bind /sys/kernel/btf \"$btf\"; \
        mount -t tmpfs none /sys/kernel; mkdir /sys/kernel/btf; \
        mount --move \"$btf\" /sys/kernel/btf";
    let extra = ["--cgroup", path_arg(&cgroup.path)];
    for line in loaders_in_private_mounts(setup, &extra, Exit::Failure) {
        assert!(line.contains("tracefs is not mounted"), "{line}");
        assert!(line.contains("mount -t tracefs nodev"), "{line}");
    }
}

#[test]
#[ignore = "needs root, BTF and cgroup2; run by `cargo xtask test`"]
fn a_path_that_is_not_a_cgroup_is_refused() {
    let output = portwatch()
        .args(["trace", "--cgroup", "/tmp"])
        .output()
        .expect("run");
    let line = one_line("trace --cgroup /tmp", &output, Exit::Config);
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
    let line = one_line("trace --ring-size 5000", &output, Exit::Config);
    assert!(line.contains("ring buffer size 5000"), "{line}");
}

#[test]
fn bad_arguments_are_refused_before_anything_is_loaded() {
    // No root needed: clap refuses these before any kernel work.
    for args in [
        &["trace", "--port", "0"][..],
        &["trace", "--port", "http"],
        &["trace", "--bogus"],
        &["daemon", "--listen", "nope"],
        &["daemon", "--metrics-listen", "127.0.0.1"],
        &["daemon", "--bogus"],
    ] {
        let output = portwatch().args(args).output().expect("run");
        assert_eq!(output.status.code(), Some(2), "{args:?}: {output:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.starts_with("error:"), "{args:?}: {stderr}");
    }
}

/// A configuration the daemon must refuse, and what the one line must say.
struct BadConfig {
    what: &'static str,
    /// The file's contents; `None`: `--config` names a file that is not there.
    file: Option<&'static [u8]>,
    /// `PORTWATCH_*` variables set on top of the file.
    env: &'static [(&'static str, &'static str)],
    says: &'static [&'static str],
}

const BAD_CONFIGS: &[BadConfig] = &[
    BadConfig {
        what: "bad TOML syntax",
        file: Some(b"listen = \"127.0.0.1:7464\n"),
        env: &[],
        says: &["portwatch.toml: ", "invalid basic string"],
    },
    BadConfig {
        what: "not UTF-8",
        file: Some(b"listen = \"\xff\"\n"),
        env: &[],
        says: &["portwatch.toml: ", "valid UTF-8"],
    },
    BadConfig {
        what: "an unknown key",
        file: Some(b"lisen = \"127.0.0.1:7464\"\n"),
        env: &[],
        says: &["portwatch.toml: ", "unknown field `lisen`", "`listen`"],
    },
    BadConfig {
        what: "a wrong type",
        file: Some(b"ring_size = \"big\"\n"),
        env: &[],
        says: &[
            "portwatch.toml: ",
            "invalid type: string \"big\", expected u32",
        ],
    },
    BadConfig {
        what: "a bad address",
        file: Some(b"listen = \"nope\"\n"),
        env: &[],
        says: &["portwatch.toml: ", "invalid socket address"],
    },
    BadConfig {
        what: "a ring size that is not a power of two",
        file: Some(b"ring_size = 5000\n"),
        env: &[],
        says: &["ring_size", "power of two"],
    },
    BadConfig {
        what: "a bad duration",
        file: Some(b"reconcile_interval = \"soon\"\n"),
        env: &[],
        says: &["portwatch.toml: ", "\"soon\" is not a duration", "\"30s\""],
    },
    BadConfig {
        what: "a bad expected listener",
        file: Some(b"expected_listeners = [\"https\"]\n"),
        env: &[],
        says: &["portwatch.toml: ", "\"443/tcp\""],
    },
    BadConfig {
        what: "a file that is not there",
        file: None,
        env: &[],
        says: &["reading ", "missing.toml", "No such file or directory"],
    },
    BadConfig {
        what: "a bad PORTWATCH_LISTEN",
        file: Some(b""),
        env: &[("PORTWATCH_LISTEN", "nope")],
        says: &["PORTWATCH_LISTEN=\"nope\"", "invalid socket address"],
    },
    BadConfig {
        what: "a PORTWATCH_RING_SIZE that is not a number",
        file: Some(b""),
        env: &[("PORTWATCH_RING_SIZE", "lots")],
        says: &["PORTWATCH_RING_SIZE=\"lots\""],
    },
    BadConfig {
        what: "a PORTWATCH_RING_SIZE that is not a power of two",
        file: Some(b""),
        env: &[("PORTWATCH_RING_SIZE", "5000")],
        says: &["ring_size", "power of two"],
    },
    BadConfig {
        what: "a bad PORTWATCH_RECONCILE_INTERVAL",
        file: Some(b""),
        env: &[("PORTWATCH_RECONCILE_INTERVAL", "soon")],
        says: &["PORTWATCH_RECONCILE_INTERVAL=\"soon\""],
    },
    BadConfig {
        what: "a bad PORTWATCH_EXPECTED_LISTENERS",
        file: Some(b""),
        env: &[("PORTWATCH_EXPECTED_LISTENERS", "22/tcp,https")],
        says: &["PORTWATCH_EXPECTED_LISTENERS=", "\"443/tcp\""],
    },
];

/// No root needed: the configuration is refused before anything else. Each
/// case is run with `--check-config` and as a real start; should a real
/// start accept the configuration, it stops at `--cgroup` (not a cgroup, so
/// nothing is loaded), whose line the check then rejects.
#[test]
fn bad_configurations_are_refused_in_one_line() {
    let dir = TempDir::new("badconfig");
    let not_a_cgroup = path_arg(&dir.path);
    for case in BAD_CONFIGS {
        let path = match case.file {
            Some(text) => dir.file("portwatch.toml", text),
            None => dir.path.join("missing.toml"),
        };
        let config = ["daemon", "--config", path_arg(&path)];
        let modes: [&[&str]; 2] = [
            &["--check-config"],
            &["--listen", "127.0.0.1:0", "--cgroup", not_a_cgroup],
        ];
        for mode in modes {
            let output = command(&until_deadline(&config, mode))
                .envs(case.env.iter().copied())
                .output()
                .expect("run");
            let line = one_line(&format!("{} ({mode:?})", case.what), &output, Exit::Config);
            for needle in case.says {
                assert!(line.contains(needle), "{}: {line}", case.what);
            }
        }
    }
}

/// The API shows every process, uid, unit and container: on an address
/// other than loopback without web_config's authentication, the daemon
/// refuses it, naming the keys that serve it. The address is never bound:
/// the configuration is refused first.
#[test]
fn an_api_beyond_loopback_is_refused_without_the_permission() {
    let dir = TempDir::new("remote");
    let config = dir.file("portwatch.toml", "");
    let not_a_cgroup = path_arg(&dir.path);
    for listen in ["0.0.0.0:7464", "[::]:7464", "192.0.2.1:7464"] {
        let args = ["daemon", "--config", path_arg(&config), "--listen", listen];
        let modes: [&[&str]; 2] = [&["--check-config"], &["--cgroup", not_a_cgroup]];
        for mode in modes {
            let output = command(&until_deadline(&args, mode)).output().expect("run");
            let line = one_line(
                &format!("--listen {listen} {mode:?}"),
                &output,
                Exit::Config,
            );
            assert!(
                line.contains(&format!("listen: {listen} is not a loopback address")),
                "{line}"
            );
            assert!(
                line.contains("set web_config")
                    && line.contains("set allow_unauthenticated_remote = true"),
                "{line}"
            );
        }
        // Said explicitly, the same configuration passes the check.
        let output = command(&until_deadline(&args, &["--check-config"]))
            .env("PORTWATCH_ALLOW_UNAUTHENTICATED_REMOTE", "true")
            .output()
            .expect("run");
        assert!(output.status.success(), "{listen}: {output:?}");
        let said = String::from_utf8_lossy(&output.stdout);
        assert!(
            said.contains(&format!(
                "listen {listen} over plain HTTP and no authentication, as allow_unauthenticated_remote says"
            )),
            "{said}"
        );
    }
}

/// Root reads every file; as `nobody` the daemon meets the permission
/// problem an operator would.
#[test]
#[ignore = "needs root, BTF and cgroup2; run by `cargo xtask test`"]
fn an_unreadable_configuration_is_named() {
    let dir = TempDir::new("unreadable");
    let path = dir.file("portwatch.toml", "listen = \"127.0.0.1:0\"\n");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .expect("chmod the configuration");
    let config = ["daemon", "--config", path_arg(&path)];
    let real_start = ["--listen", "127.0.0.1:0", "--cgroup", path_arg(&dir.path)];
    for mode in [&["--check-config"][..], &real_start] {
        let output = command(&until_deadline(&config, mode))
            .uid(65534)
            .gid(65534)
            .output()
            .expect("run");
        let line = one_line(&format!("unreadable ({mode:?})"), &output, Exit::Config);
        let expected = format!("reading {}: Permission denied", path.display());
        assert!(line.contains(&expected), "{line}");
    }
}

/// The HTTP address: one another process holds may free up, and one this
/// host does not have may come up later (early at boot): both restart.
#[test]
fn a_listen_address_that_may_come_free_is_restarted() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("a loopback port");
    let addr = taken.local_addr().expect("its address").to_string();
    let dir = TempDir::new("listen");
    // TEST-NET-1 is not loopback: the API may listen there only when told so.
    let config = dir.file("portwatch.toml", "allow_unauthenticated_remote = true\n");
    for (listen, exit, says) in [
        (addr.as_str(), Exit::Failure, "Address already in use"),
        // TEST-NET-1: not an address of this host (yet).
        (
            "192.0.2.1:7464",
            Exit::Failure,
            "Cannot assign requested address",
        ),
    ] {
        let args = ["daemon", "--config", path_arg(&config), "--listen", listen];
        let output = command(&until_deadline(&args, &[])).output().expect("run");
        let line = one_line(&format!("--listen {listen}"), &output, exit);
        assert!(
            line.contains(&format!("cannot listen on {listen}")),
            "{line}"
        );
        assert!(line.contains(says), "{line}");
    }
}
