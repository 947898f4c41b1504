//! The metrics as Prometheus tooling sees them: `promtool check metrics`
//! (which parses the exposition format and lints names, types and help)
//! accepts what [`Metrics::render`] serves. No root needed.
//!
//! promtool comes from Debian's `prometheus` package, which `cargo xtask
//! setup` installs; without it these tests fail rather than skip, so that a
//! machine that lacks it is noticed.

use std::{
    io::{ErrorKind, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    process::{Command, Stdio},
    sync::{Arc, RwLock},
    time::SystemTime,
};

use portwatch::{
    event::{Errno, EventKind, PortEvent, Protocol},
    map::Drift,
    metrics::{BuildInfo, CONTENT_TYPE, Metrics},
    state::State,
};

fn event(
    kind: EventKind,
    cookie: u64,
    protocol: Protocol,
    address: IpAddr,
    port: u16,
) -> PortEvent {
    PortEvent {
        pid: 31337,
        tid: 31337,
        uid: 1000,
        sock_uid: Some(1000),
        process: "web \"server\"".into(),
        cgroup_id: 9,
        ..PortEvent::example(kind, protocol, address, port, cookie)
    }
}

fn record(state: &mut State, event: &PortEvent) {
    state.counters.count(event);
    state.map.apply(event, SystemTime::UNIX_EPOCH);
}

/// A state with something in every family: listeners sharing ports for
/// several reasons, failures past the per-port cap, drops, drift, hooks.
fn busy_state() -> State {
    let mut state = State::new(100, 2);
    let any4 = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
    let any6 = IpAddr::V6(Ipv6Addr::UNSPECIFIED);
    let mut cookie = 0;
    let mut listen = |state: &mut State, protocol, address, port, reuse_port, netns| {
        cookie += 1;
        let mut bind = event(EventKind::Bind, cookie, protocol, address, port);
        bind.options.reuse_port = Some(reuse_port);
        bind.netns = Some(netns);
        record(state, &bind);
        if protocol == Protocol::Tcp {
            bind.kind = EventKind::Listen;
            record(state, &bind);
        }
    };
    listen(&mut state, Protocol::Tcp, any4, 8000, true, 1);
    listen(&mut state, Protocol::Tcp, any4, 8000, true, 1);
    listen(&mut state, Protocol::Tcp, any6, 8000, false, 2);
    listen(&mut state, Protocol::Udp, any4, 53, false, 1);
    listen(&mut state, Protocol::Tcp, any4, 53, false, 1);
    listen(&mut state, Protocol::Tcp, any4, 22, false, 1);
    for (port, errno) in [
        (8000, Errno::EADDRINUSE),
        (8000, Errno::EADDRINUSE),
        (80, Errno::EACCES),
        (9000, Errno::EADDRNOTAVAIL),
        (0, Errno::EADDRINUSE),
        (8081, Errno::UNKNOWN),
    ] {
        let mut failed = event(EventKind::BindFailed, 100, Protocol::Tcp, any4, port);
        failed.errno = Some(errno);
        record(&mut state, &failed);
    }
    let mut listen_failed = event(EventKind::ListenFailed, 101, Protocol::Tcp, any4, 8080);
    listen_failed.errno = Some(Errno::EADDRINUSE);
    record(&mut state, &listen_failed);
    state.drops = vec![("bind_outcome", 5), ("release", 0)];
    state.decode_errors = 1;
    state.hooks = vec![("bind_outcome", "tracepoint"), ("release", "cgroup_sock")];
    state.stats.reconciliations = 3;
    state.stats.drift = Drift {
        missing: 2,
        stale: 1,
        changed: 1,
    };
    state.ready = true;
    state.host_netns = 1;
    state.expected = ["8000/tcp", "53/udp", "443/tcp"]
        .map(|text| text.parse().unwrap())
        .to_vec();
    state
}

fn render(state: State, build: BuildInfo) -> String {
    Metrics::new(Arc::new(RwLock::new(state)), build)
        .expect("metrics")
        .render()
}

/// Runs `promtool check metrics` on `text`: its exit code and what it said.
fn promtool_check(text: &str) -> (bool, String) {
    let child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(err) if err.kind() == ErrorKind::NotFound => panic!(
            "promtool is not installed (Debian package `prometheus`): run `cargo xtask setup`"
        ),
        Err(err) => panic!("cannot run promtool: {err}"),
    };
    child
        .stdin
        .take()
        .expect("promtool's stdin")
        .write_all(text.as_bytes())
        .expect("write to promtool");
    let out = child.wait_with_output().expect("wait for promtool");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), said)
}

#[track_caller]
fn assert_promtool_accepts(text: &str) {
    let (ok, said) = promtool_check(text);
    assert!(ok && said.trim().is_empty(), "promtool: {said}\n{text}");
}

#[test]
fn promtool_accepts_a_busy_daemons_metrics() {
    let build = BuildInfo {
        version: "0.1.0".into(),
        revision: "unknown revision \"dirty\"\\".into(),
        kernel: "6.12.0-1-amd64".into(),
    };
    let text = render(busy_state(), build);
    assert!(text.contains("portwatch_port_shared{"), "{text}");
    assert!(text.contains(r#"port="other""#), "{text}");
    assert!(text.contains("process_cpu_seconds_total"), "{text}");
    // Two reuseport listeners in netns 1; the IPv6 one is in netns 2.
    for (labels, n) in [
        (r#"port="8000",protocol="tcp""#, 2),
        (r#"port="53",protocol="udp""#, 1),
        (r#"port="443",protocol="tcp""#, 0),
    ] {
        let line = format!("portwatch_expected_listeners{{{labels}}} {n}\n");
        assert!(text.contains(&line), "{line}: {text}");
    }
    assert_promtool_accepts(&text);
}

#[test]
fn promtool_accepts_a_fresh_daemons_metrics() {
    assert_promtool_accepts(&render(State::new(10, 10), BuildInfo::current()));
}

#[test]
fn promtool_is_not_lenient() {
    let (ok, said) = promtool_check("# TYPE portwatch_binds counter\nportwatch_binds 1\n");
    assert!(!ok, "promtool accepted a counter without _total: {said}");
}

#[test]
fn build_info_is_this_build_on_this_kernel() {
    let build = BuildInfo::current();
    assert_eq!(build.version, env!("CARGO_PKG_VERSION"));
    assert!(!build.revision.is_empty());
    let uname = Command::new("uname").arg("-r").output().expect("uname -r");
    assert_eq!(build.kernel, String::from_utf8_lossy(&uname.stdout).trim());
}

#[test]
fn served_as_the_text_format() {
    assert_eq!(CONTENT_TYPE, "text/plain; version=0.0.4");
}
