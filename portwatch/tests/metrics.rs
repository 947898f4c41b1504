//! The metrics as Prometheus tooling sees them: `promtool check metrics`
//! (which parses the exposition format and lints names, types and help)
//! accepts what [`Metrics::render`] serves. No root needed.
//!
//! promtool comes from Debian's `prometheus` package, which `cargo xtask
//! setup` installs; without it these tests fail rather than skip, so that a
//! machine that lacks it is noticed.

mod support;

use std::{
    io::{ErrorKind, Write as _},
    process::{Command, Stdio},
    sync::{Arc, RwLock},
};

use portwatch::{
    metrics::{BuildInfo, CONTENT_TYPE, Metrics},
    state::State,
};
use support::exported::{busy_state, exported, sample_labels};

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

#[test]
fn sample_labels_skip_escaped_quotes() {
    let (name, labels) = sample_labels(r#"m_total{a="x\",b=\"y",c="z"} 1"#);
    assert_eq!(
        (name, labels),
        ("m_total", vec!["a".to_owned(), "c".to_owned()])
    );
}

#[test]
fn the_busy_state_has_every_family() {
    // The state collector's families, plus the crate's process_* ones.
    let families = exported();
    let ours = families
        .keys()
        .filter(|name| name.starts_with("portwatch_"));
    assert_eq!(ours.count(), 17, "{families:?}");
    assert!(families.values().all(|family| !family.kind.is_empty()));
    assert!(families["portwatch_listeners"].labels.contains("port"));
}
