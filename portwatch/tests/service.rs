//! The systemd service as shipped: `deploy/systemd/portwatch.service` and
//! `deploy/portwatch.toml`.
//!
//! This machine has no systemd as PID 1, so the unit cannot be started for
//! real. What can be checked is checked with the real tools:
//! - `systemd-analyze verify` and `security --offline` on the unit;
//! - the daemon started the way the unit starts it: as an unprivileged user
//!   with exactly the unit's capabilities (setpriv), no new privileges, and
//!   the unit's system call filter expanded by `systemd-analyze
//!   syscall-filter` and loaded with libseccomp; every feature must work;
//! - each capability and each added system call is needed: without it,
//!   the feature it is there for is lost;
//! - sd_notify: READY=1 after the snapshot is merged, watchdog pings,
//!   STOPPING=1 on SIGTERM, read from a real notification socket.
//!
//! The other sandboxing lines (ProtectSystem=, PrivateTmp=, ...) are checked
//! by `systemd-analyze` only.

mod support;

use std::{
    collections::{BTreeMap, BTreeSet},
    os::unix::net::UnixDatagram,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use portwatch::config::{Config, ConfigError, Overrides};
use serde_json::Value;
use support::{CgroupGuard, DEADLINE, NetnsGuard, Op, TempDir, Worker, daemon::Daemon, serial};

const UNIT: &str = include_str!("../../deploy/systemd/portwatch.service");
const DEFAULT_CONFIG: &str = include_str!("../../deploy/portwatch.toml");

/// The `[Service]` settings of a unit: key -> every value given, in order.
fn service_settings(unit: &str) -> BTreeMap<String, Vec<String>> {
    let mut settings: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut section = "";
    for line in unit.lines().map(str::trim) {
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        if line.starts_with('[') {
            section = line;
            continue;
        }
        if section == "[Service]"
            && let Some((key, value)) = line.split_once('=')
        {
            settings
                .entry(key.to_owned())
                .or_default()
                .push(value.to_owned());
        }
    }
    settings
}

/// One setting's single value.
fn setting(key: &str) -> String {
    let settings = service_settings(UNIT);
    let values = settings
        .get(key)
        .unwrap_or_else(|| panic!("the unit sets no {key}="));
    assert_eq!(values.len(), 1, "{key}= set more than once");
    values[0].clone()
}

/// The unit's capabilities, lower case without `CAP_` (setpriv's spelling).
fn unit_capabilities() -> Vec<String> {
    setting("AmbientCapabilities")
        .split_whitespace()
        .map(|cap| cap.trim_start_matches("CAP_").to_lowercase())
        .collect()
}

/// The unit's `SystemCallFilter=` entries (groups and names).
fn unit_syscall_filter() -> Vec<String> {
    setting("SystemCallFilter")
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

/// Runs `systemd-analyze` with `args`: status, stdout, stderr.
fn systemd_analyze(args: &[&str]) -> (bool, String, String) {
    let out = Command::new("systemd-analyze")
        .args(args)
        .output()
        .expect("systemd-analyze (Debian package systemd)");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The shipped unit with its binary paths pointing at the one under test
/// (verify checks that ExecStart= exists).
fn unit_for_this_build(dir: &Path) -> PathBuf {
    let unit = UNIT.replace("/usr/bin/portwatch", env!("CARGO_BIN_EXE_portwatch"));
    assert_ne!(unit, UNIT, "the unit runs /usr/bin/portwatch");
    let path = dir.join("portwatch.service");
    std::fs::write(&path, unit).unwrap();
    path
}

#[test]
fn systemd_analyze_verify_accepts_the_unit() {
    let scratch = TempDir::new("unit");
    let unit = unit_for_this_build(&scratch.path);
    // The man page is checked where it is installed (tests/package.rs).
    let (ok, out, err) = systemd_analyze(&["verify", "--man=no", unit.to_str().unwrap()]);
    assert!(ok && out.is_empty() && err.is_empty(), "{out}{err}");

    // verify is not lenient: a bad value is reported.
    let bad = scratch.path.join("bad.service");
    let text = std::fs::read_to_string(&unit).unwrap();
    std::fs::write(&bad, text.replace("WatchdogSec=30s", "WatchdogSec=often")).unwrap();
    let (_, out, err) = systemd_analyze(&["verify", "--man=no", bad.to_str().unwrap()]);
    assert!(err.contains("often"), "{out}{err}");
}

#[test]
fn the_unit_is_sandboxed_as_the_issue_asks() {
    let settings = service_settings(UNIT);
    let one = |key: &str| setting(key);
    assert_eq!(one("Type"), "notify");
    assert!(one("ExecStartPre").contains("--check-config"));
    assert_eq!(one("CapabilityBoundingSet"), one("AmbientCapabilities"));
    for (key, value) in [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        (
            "RestrictAddressFamilies",
            "AF_UNIX AF_INET AF_INET6 AF_NETLINK",
        ),
    ] {
        assert_eq!(one(key), value, "{key}");
    }
    let filter = unit_syscall_filter();
    for needed in ["@system-service", "bpf", "perf_event_open"] {
        assert!(filter.iter().any(|f| f == needed), "{needed}: {filter:?}");
    }
    assert!(settings.contains_key("WatchdogSec"));

    // systemd's own score of the sandbox (0 = locked down, 10 = exposed).
    let scratch = TempDir::new("unit");
    let unit = unit_for_this_build(&scratch.path);
    let (_, out, err) = systemd_analyze(&["security", "--offline=true", unit.to_str().unwrap()]);
    let exposure: f64 = out
        .lines()
        .find_map(|line| line.split("portwatch.service: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|score| score.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in: {out}{err}"));
    assert!(exposure <= 3.5, "exposure {exposure}: {out}");
}

#[test]
fn the_default_config_documents_every_key_commented_out() {
    let path = Path::new("deploy/portwatch.toml");
    // As the daemon reads it: the file, checked whole.
    let parse = |text: &str| -> Result<Config, ConfigError> {
        Config::parse(text, path)?.apply_flags(&Overrides::default())
    };
    assert_eq!(
        parse(DEFAULT_CONFIG).unwrap(),
        Config::default(),
        "everything commented out: the defaults"
    );
    // Uncommented, every example parses (`# key = value` lines).
    let uncommented: String = DEFAULT_CONFIG
        .lines()
        .filter_map(|line| line.strip_prefix("# "))
        .filter(|line| {
            line.split_once(" = ")
                .is_some_and(|(key, _)| !key.contains(' '))
        })
        .map(|line| match line.split_once(" = ") {
            // The web configurations are read whole: the shipped example.
            Some(("web_config" | "metrics_web_config", _)) => {
                let key = line.split_once(' ').map_or(line, |(key, _)| key);
                format!(
                    "{key} = \"{}/../deploy/web.yml\"\n",
                    env!("CARGO_MANIFEST_DIR")
                )
            }
            _ => format!("{line}\n"),
        })
        .collect();
    let config = parse(&uncommented).unwrap_or_else(|err| panic!("{err}"));
    assert_ne!(config, Config::default());
    // Every key the parser knows is in the file: the parser names them all
    // when it rejects an unknown one.
    let err = parse("no_such_key = 1").unwrap_err().to_string();
    let known: Vec<&str> = err.split('`').skip(3).step_by(2).collect();
    assert!(known.len() >= 10, "{err}");
    let documented: BTreeSet<&str> = uncommented
        .lines()
        .filter_map(|line| line.split_once(" = ").map(|(key, _)| key))
        .collect();
    for key in known {
        assert!(
            documented.contains(key),
            "{key} is not in deploy/portwatch.toml"
        );
    }
}

/// Every system call `filter` allows, systemd's groups expanded the way
/// `systemd-analyze syscall-filter` lists them.
fn expand_syscall_filter(filter: &[String]) -> BTreeSet<String> {
    let (ok, listing, err) = systemd_analyze(&["syscall-filter"]);
    assert!(ok, "{err}");
    let mut groups: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut current = None;
    for line in listing.lines() {
        if let Some(group) = line.strip_prefix('@') {
            current = Some(format!("@{}", group.trim()));
            continue;
        }
        let item = line.trim();
        if item.is_empty() || item.starts_with('#') {
            continue;
        }
        if let Some(group) = &current {
            groups
                .entry(group.clone())
                .or_default()
                .push(item.to_owned());
        }
    }
    fn expand(item: &str, groups: &BTreeMap<String, Vec<String>>, out: &mut BTreeSet<String>) {
        match groups.get(item) {
            Some(members) => members.iter().for_each(|m| expand(m, groups, out)),
            None => {
                assert!(!item.starts_with('@'), "unknown group {item}");
                out.insert(item.to_owned());
            }
        }
    }
    let mut allowed = BTreeSet::new();
    for item in filter {
        expand(item, &groups, &mut allowed);
    }
    allowed
}

#[test]
fn the_syscall_filter_expands_to_what_the_daemon_needs() {
    let allowed = expand_syscall_filter(&unit_syscall_filter());
    for call in [
        "bpf",
        "perf_event_open",
        "setns",
        "pidfd_open",
        "pidfd_getfd",
        "socket",
        "execve",
    ] {
        assert!(allowed.contains(call), "{call}");
    }
    for call in ["mount", "kexec_load", "init_module", "reboot"] {
        assert!(!allowed.contains(call), "{call} should not be allowed");
    }
}

/// A sandbox like the unit's: `setpriv` to an unprivileged user with
/// `caps` (ambient, inheritable and bounding), no new privileges, then the
/// system call filter `allowed` with `errno` for everything else.
struct Sandbox {
    _scratch: TempDir,
    wrapper: Vec<String>,
}

impl Sandbox {
    fn new(caps: &[String], allowed: &BTreeSet<String>, errno: &str) -> Sandbox {
        let scratch = TempDir::new("sandbox");
        let names = scratch.path.join("syscalls");
        let joined: Vec<&str> = allowed.iter().map(String::as_str).collect();
        std::fs::write(&names, joined.join("\n")).unwrap();
        let script = scratch.path.join("seccomp_exec.py");
        std::fs::write(&script, include_str!("support/seccomp_exec.py")).unwrap();
        let set = format!(
            "-all{}",
            caps.iter()
                .map(|cap| format!(",+{cap}"))
                .collect::<String>()
        );
        let wrapper = vec![
            "setpriv".into(),
            "--reuid=65534".into(),
            "--regid=65534".into(),
            "--clear-groups".into(),
            format!("--inh-caps={set}"),
            format!("--ambient-caps={set}"),
            format!("--bounding-set={set}"),
            "--no-new-privs".into(),
            // Debian's python, where python3-seccomp is installed.
            "/usr/bin/python3".into(),
            script.to_str().unwrap().into(),
            names.to_str().unwrap().into(),
            errno.into(),
        ];
        Sandbox {
            _scratch: scratch,
            wrapper,
        }
    }

    fn wrapper(&self) -> Vec<&str> {
        self.wrapper.iter().map(String::as_str).collect()
    }
}

/// What one sandboxed run could do.
#[derive(Debug, Default)]
struct Seen {
    /// Why it did not start (stderr), if it did not.
    refused: Option<String>,
    /// The pre-existing listener in the other namespace, with its holder.
    listed_other_netns: bool,
    holder_found: bool,
    reuse_port_read: bool,
    /// A live EADDRINUSE reported with its blocker.
    failure_attributed: bool,
    stderr: String,
}

/// Starts the daemon in `sandbox` beside a SO_REUSEPORT listener made
/// before it, in a private netns; then makes a bind fail; reports what the
/// daemon could see.
fn run_in(sandbox: &Sandbox) -> Seen {
    let cgroup = CgroupGuard::new("service");
    let netns = NetnsGuard::new("service");
    let mut holder = Worker::spawn(
        &cgroup.path,
        Some(&netns),
        &[
            Op::tcp(false),
            Op::reuseport(0),
            Op::bind(0, "0.0.0.0:7070"),
            Op::listen(0),
            Op::Pause,
        ],
    );
    assert!(holder.results(4).iter().all(|r| *r >= 0));
    let daemon = match Daemon::try_start_with(
        &cgroup,
        "reconcile_interval = \"1h\"\n",
        &sandbox.wrapper(),
    ) {
        Ok(daemon) => daemon,
        Err((_, stderr)) => {
            holder.resume();
            return Seen {
                refused: Some(stderr),
                ..Seen::default()
            };
        }
    };
    let mut seen = Seen::default();
    let port = daemon.json("/ports/7070");
    if let Some(listener) = port["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["netns"] == netns.cookie())
    {
        seen.listed_other_netns = true;
        seen.holder_found = listener["pids"]
            .as_array()
            .is_some_and(|pids| pids.contains(&Value::from(holder.pid)));
        seen.reuse_port_read = listener["reuse_port"] == true;
    }
    let mut failing = Worker::spawn(
        &cgroup.path,
        Some(&netns),
        &[Op::tcp(false), Op::bind(0, "0.0.0.0:7070")],
    );
    assert_eq!(failing.results(2)[1], -i64::from(libc::EADDRINUSE));
    failing.wait();
    let deadline = Instant::now() + *DEADLINE;
    while Instant::now() < deadline && !seen.failure_attributed {
        let failures = daemon.json("/failures?port=7070");
        seen.failure_attributed = failures["failures"].as_array().is_some_and(|all| {
            all.iter().any(|f| {
                f["pid"] == failing.pid && f["blocked_by"][0]["endpoint"] == "0.0.0.0:7070"
            })
        });
        std::thread::sleep(Duration::from_millis(50));
    }
    holder.resume();
    let (code, stderr) = daemon.stop();
    assert_eq!(code, Some(0), "a clean stop: {stderr}");
    seen.stderr = stderr;
    seen
}

#[test]
#[ignore = "needs root, BTF and cgroup2; run by `cargo xtask test`"]
fn the_daemon_works_with_exactly_the_units_privileges() {
    let _serial = serial();
    let caps = unit_capabilities();
    let filter = unit_syscall_filter();
    let errno = setting("SystemCallErrorNumber");
    let allowed = expand_syscall_filter(&filter);
    let seen = run_in(&Sandbox::new(&caps, &allowed, &errno));
    assert!(seen.refused.is_none(), "{seen:?}");
    assert!(
        seen.listed_other_netns
            && seen.holder_found
            && seen.reuse_port_read
            && seen.failure_attributed,
        "{seen:?}"
    );
    // Every namespace was listed. (This machine's PID 1, its sandbox
    // supervisor, refuses ptrace to anything but full root, so a warning
    // about one unreadable process and its socket's options is expected
    // here; it names the capabilities, which the unit has.)
    assert!(
        !seen.stderr.contains("could not be listed"),
        "{}",
        seen.stderr
    );
}

#[test]
#[ignore = "needs root, BTF and cgroup2; run by `cargo xtask test`"]
fn every_capability_and_added_syscall_is_needed() {
    let _serial = serial();
    let caps = unit_capabilities();
    let filter = unit_syscall_filter();
    let errno = setting("SystemCallErrorNumber");
    // Each capability, and what is lost without it. CAP_SYS_ADMIN implies
    // CAP_BPF and CAP_PERFMON in the kernel, so those two are tried without
    // it as well (as with a drop-in that removes CAP_SYS_ADMIN).
    for cap in &caps {
        let implied = matches!(cap.as_str(), "bpf" | "perfmon");
        let fewer: Vec<String> = caps
            .iter()
            .filter(|c| *c != cap && !(implied && *c == "sys_admin"))
            .cloned()
            .collect();
        let seen = run_in(&Sandbox::new(
            &fewer,
            &expand_syscall_filter(&filter),
            &errno,
        ));
        let name = format!("CAP_{}", cap.to_uppercase());
        // A refusal must say why: the capability it found missing.
        let refused_for = |why: &str| seen.refused.as_ref().is_some_and(|s| s.contains(why));
        let lost = match cap.as_str() {
            "bpf" | "perfmon" | "net_admin" => refused_for(&format!("missing capability {name}")),
            "dac_read_search" => refused_for(&format!("need {name}")),
            "sys_ptrace" => {
                seen.refused.is_none()
                    && !seen.holder_found
                    && seen.stderr.contains("CAP_SYS_PTRACE")
            }
            "sys_admin" => {
                seen.refused.is_none()
                    && !seen.listed_other_netns
                    && seen.stderr.contains("CAP_SYS_ADMIN")
            }
            other => panic!("no expectation for CAP_{other}: add one here"),
        };
        assert!(lost, "without {name}: {seen:?}");
    }
    // Each system call added to @system-service, and what is lost. A refused
    // call fails with the unit's errno, which the refusal must carry.
    assert_eq!(errno, "EPERM", "the refusals below look for EPERM's text");
    let eperm = std::io::Error::from_raw_os_error(libc::EPERM).to_string();
    for call in filter.iter().filter(|f| !f.starts_with('@')) {
        let fewer: Vec<String> = filter.iter().filter(|f| *f != call).cloned().collect();
        let seen = run_in(&Sandbox::new(&caps, &expand_syscall_filter(&fewer), &errno));
        let lost = match call.as_str() {
            "bpf" | "perf_event_open" => seen
                .refused
                .as_ref()
                .is_some_and(|stderr| stderr.contains(&eperm)),
            "pidfd_getfd" => seen.refused.is_none() && seen.holder_found && !seen.reuse_port_read,
            other => panic!("no expectation for {other}: add one here"),
        };
        assert!(lost, "without {call}: {seen:?}");
    }
}

#[test]
#[ignore = "needs root, BTF and cgroup2; run by `cargo xtask test`"]
fn systemd_hears_ready_watchdog_and_stopping() {
    let _serial = serial();
    let scratch = TempDir::new("notify");
    let path = scratch.path.join("notify.sock");
    let socket = UnixDatagram::bind(&path).unwrap();
    socket.set_read_timeout(Some(*DEADLINE)).unwrap();
    let cgroup = CgroupGuard::new("notify");
    // As systemd sets them: the socket, and a 1 s watchdog for this pid
    // (the shell's, which exec keeps).
    let script = format!(
        "NOTIFY_SOCKET={} WATCHDOG_USEC=1000000 WATCHDOG_PID=$$ exec \"$0\" \"$@\"",
        path.display()
    );
    let daemon = Daemon::start_with(
        &cgroup,
        "reconcile_interval = \"1h\"\n",
        &["sh", "-c", &script],
    );
    let mut buf = [0u8; 4096];
    let mut receive = || {
        let n = socket.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    // READY=1 came once /readyz was up (the fixture waited for it), with a
    // status line.
    let first = receive();
    assert!(first.contains("READY=1\n"), "{first:?}");
    assert!(first.contains("STATUS=watching "), "{first:?}");
    // Pings at half the watchdog interval.
    let started = Instant::now();
    let mut pings = 0;
    while pings < 3 && started.elapsed() < Duration::from_secs(10) {
        if receive().contains("WATCHDOG=1\n") {
            pings += 1;
        }
    }
    assert_eq!(pings, 3, "three pings within 10 s of a 1 s watchdog");
    let (code, stderr) = daemon.stop();
    assert_eq!(code, Some(0), "{stderr}");
    let mut last = String::new();
    while let Ok(n) = socket.recv(&mut buf) {
        last = String::from_utf8_lossy(&buf[..n]).into_owned();
        if last.contains("STOPPING=1") {
            break;
        }
    }
    assert!(last.contains("STOPPING=1\n"), "{last:?}");
    drop(scratch);
}
