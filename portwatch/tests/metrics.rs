//! The metrics as Prometheus tooling sees them: `promtool check metrics`
//! (which parses the exposition format and lints names, types and help)
//! accepts what [`Metrics::render`] serves. No root needed.
//!
//! promtool comes from Debian's `prometheus` package, which `cargo xtask
//! setup` installs; without it these tests fail rather than skip, so that a
//! machine that lacks it is noticed.

mod support;

use std::{
    collections::BTreeSet,
    process::Command,
    sync::{Arc, RwLock},
};

use axum::{
    body::Body,
    http::{Request, StatusCode, header},
};
use portwatch::{
    api::{self, ApiContext},
    event::BootClock,
    metrics::{self, BuildInfo, Metrics},
    state::State,
};
use support::exported::{busy_state, exported, sample_labels};
use tower::ServiceExt as _;

fn render(state: State, build: BuildInfo) -> String {
    Metrics::new(Arc::new(RwLock::new(state)), build)
        .expect("metrics")
        .render()
}

/// Runs `promtool check metrics` on `text`: its exit code and what it said.
fn promtool_check(text: &str) -> (bool, String) {
    support::promtool(&["check", "metrics"], text.as_bytes())
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

/// What the API's `/metrics` serves, rendered by the real [`Metrics`]:
/// the header Prometheus reads the format from, and the text.
#[tokio::test]
async fn served_as_the_text_format() {
    let state = Arc::new(RwLock::new(busy_state()));
    let metrics = Metrics::new(state.clone(), BuildInfo::current()).expect("metrics");
    let (events, _) = tokio::sync::broadcast::channel(1);
    let router = api::metrics_router(ApiContext {
        state,
        events,
        metrics: Arc::new(move || metrics.render()),
        clock: BootClock::now(),
    });
    let response = router
        .oneshot(Request::get("/metrics").body(Body::empty()).unwrap())
        .await
        .expect("infallible");
    assert_eq!(response.status(), StatusCode::OK);
    let content_type = response.headers()[header::CONTENT_TYPE]
        .to_str()
        .expect("an ASCII header")
        .to_owned();
    // The text exposition format 0.0.4, in UTF-8 (which its label values use).
    let mut parts = content_type.split(';').map(str::trim);
    assert_eq!(parts.next(), Some("text/plain"), "{content_type}");
    let parameters: BTreeSet<String> = parts.map(str::to_ascii_lowercase).collect();
    assert_eq!(
        parameters,
        BTreeSet::from(["version=0.0.4".to_owned(), "charset=utf-8".to_owned()]),
        "{content_type}"
    );
    let body = axum::body::to_bytes(response.into_body(), 1 << 22)
        .await
        .expect("body");
    let text = std::str::from_utf8(&body).expect("UTF-8");
    assert!(text.contains("portwatch_build_info{"), "{text}");
    assert_promtool_accepts(text);
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
    // Every family the state collector produces has samples in the busy
    // state, which the tests of shipped files check queries against; so do
    // the crate's process_* ones. No family of ours is unaccounted for.
    let families = exported();
    let specs: BTreeSet<&str> = metrics::family_names().collect();
    assert!(!specs.is_empty());
    let ours: BTreeSet<&str> = families
        .keys()
        .map(String::as_str)
        .filter(|name| name.starts_with("portwatch_"))
        .collect();
    assert_eq!(ours, specs, "{families:?}");
    for name in ["process_cpu_seconds_total", "process_resident_memory_bytes"] {
        assert!(families.contains_key(name), "{name} not in {families:?}");
    }
    assert!(families.values().all(|family| !family.kind.is_empty()));
    assert!(families["portwatch_listeners"].labels.contains("port"));
}
