//! The shipped deployment files, read the way their consumers read them. No
//! root needed.
//!
//! - `deploy/grafana/portwatch.json`: every metric a panel or variable
//!   queries is one the daemon exports (rendered from a populated state by
//!   the real [`Metrics`]), counters are only read through `rate()` or
//!   `increase()`, every query parses as PromQL (`promtool check rules`),
//!   and the panels operators need are there.
//! - `deploy/kubernetes/`: the DaemonSet shares what the daemon needs with
//!   the host (PID and network namespaces, the cgroup2 root, tracefs, BTF),
//!   with exactly the capabilities listed here; its ConfigMap is a valid
//!   `portwatch.toml`; scrape annotations, the `metrics` port, the probes and
//!   `metrics_listen` agree; the Prometheus scrape job keeps these pods and
//!   passes `promtool check config`.
//!
//! promtool comes from Debian's `prometheus` package, which `cargo xtask
//! setup` installs; without it those tests fail rather than skip.

mod support;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use portwatch::config::{Config, Overrides};
use serde::Deserialize as _;
use serde_json::{Value as Json, json};
use serde_yaml_ng::Value as Yaml;

/// The repository's top level.
fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace above portwatch/")
        .to_path_buf()
}

fn read(relative: &str) -> String {
    let path = repo().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|err| panic!("{}: {err}", path.display()))
}

// ---------------------------------------------------------------------------
// What the daemon exports.

/// Every family the daemon serves, name -> type (`counter`, `gauge`).
fn exported() -> BTreeMap<String, String> {
    support::exported::exported()
        .into_iter()
        .map(|(name, family)| (name, family.kind))
        .collect()
}

// ---------------------------------------------------------------------------
// Reading PromQL well enough to name its metrics.

/// `expr` with the inside of every string literal blanked (byte offsets
/// kept), so that label values are never taken for metric names.
fn blank_strings(expr: &str) -> String {
    let mut out = String::with_capacity(expr.len());
    let mut quote: Option<char> = None;
    let mut escaped = false;
    for c in expr.chars() {
        match quote {
            None => {
                if matches!(c, '"' | '\'' | '`') {
                    quote = Some(c);
                }
                out.push(c);
            }
            Some(q) => {
                if escaped {
                    escaped = false;
                } else if c == '\\' && q != '`' {
                    escaped = true;
                } else if c == q {
                    quote = None;
                    out.push(c);
                    continue;
                }
                out.extend(std::iter::repeat_n(' ', c.len_utf8()));
            }
        }
    }
    out
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// Each portwatch or process metric `expr` names, with its byte offset in
/// `expr`. Grafana `$variables`, label names and functions are not metrics.
fn metrics_in(expr: &str) -> Vec<(usize, String)> {
    let blanked = blank_strings(expr);
    let mut found = Vec::new();
    let mut start = None;
    // A trailing space ends the last name.
    for (i, c) in blanked.char_indices().chain([(blanked.len(), ' ')]) {
        match (start, is_name_char(c)) {
            (None, true) => start = Some(i),
            (Some(s), false) => {
                let name = &blanked[s..i];
                let variable = blanked[..s].ends_with(['$', '{']);
                if !variable && (name.starts_with("portwatch_") || name.starts_with("process_")) {
                    found.push((s, name.to_owned()));
                }
                start = None;
            }
            _ => {}
        }
    }
    found
}

/// The labels of every `by (...)` clause in `expr`.
fn grouped_by(expr: &str) -> BTreeSet<String> {
    let blanked = blank_strings(expr);
    let mut labels = BTreeSet::new();
    let mut rest = blanked.as_str();
    while let Some(at) = rest.find("by") {
        let word_start = at == 0 || !is_name_char(rest[..at].chars().last().unwrap_or(' '));
        let after = rest[at + 2..].trim_start();
        if word_start && let Some(list) = after.strip_prefix('(') {
            let list = &list[..list.find(')').unwrap_or(list.len())];
            labels.extend(list.split(',').map(|l| l.trim().to_owned()));
        }
        rest = &rest[at + 2..];
    }
    labels
}

#[test]
fn promql_reading_finds_metrics_and_groupings() {
    let expr = r#"sum by (port, errno) (rate(portwatch_x_total{instance=~"$instance",kind="portwatch_not_a_metric"}[$__rate_interval])) and on (job) process_y"#;
    let names: Vec<String> = metrics_in(expr).into_iter().map(|(_, n)| n).collect();
    assert_eq!(names, ["portwatch_x_total", "process_y"]);
    assert_eq!(
        grouped_by(expr),
        BTreeSet::from(["port".to_owned(), "errno".to_owned()])
    );
    assert!(metrics_in("label_values($portwatch_var, instance)").is_empty());
    assert!(metrics_in("${portwatch_var}").is_empty());
}

// ---------------------------------------------------------------------------
// The dashboard.

fn dashboard() -> Json {
    serde_json::from_str(&read("deploy/grafana/portwatch.json")).expect("the dashboard is JSON")
}

/// Every panel, rows' nested panels included.
fn panels(dashboard: &Json) -> Vec<&Json> {
    fn walk<'a>(list: &'a Json, out: &mut Vec<&'a Json>) {
        for panel in list.as_array().into_iter().flatten() {
            out.push(panel);
            walk(&panel["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

/// One query of the dashboard: where it is (for messages) and its text.
#[derive(Debug)]
struct Query {
    place: String,
    expr: String,
    /// PromQL (a panel target) rather than a Grafana variable query such as
    /// `label_values(...)`.
    promql: bool,
}

fn queries(dashboard: &Json) -> Vec<Query> {
    let mut out = Vec::new();
    for panel in panels(dashboard) {
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = target["expr"].as_str() {
                out.push(Query {
                    place: format!("panel {:?} target {}", panel["title"], target["refId"]),
                    expr: expr.to_owned(),
                    promql: true,
                });
            }
        }
    }
    let variables = dashboard["templating"]["list"].as_array().into_iter();
    for variable in variables.flatten().filter(|v| v["type"] == "query") {
        // Grafana keeps the query as text, or in an object, or both.
        let query = &variable["query"];
        let texts = [
            &variable["definition"],
            query,
            &query["query"],
            &query["expr"],
        ];
        for text in texts.into_iter().filter_map(Json::as_str) {
            out.push(Query {
                place: format!("variable {:?}", variable["name"]),
                expr: text.to_owned(),
                promql: false,
            });
        }
    }
    out
}

#[test]
fn the_dashboard_queries_only_metrics_the_daemon_exports() {
    let exported = exported();
    let queries = queries(&dashboard());
    assert!(queries.len() >= 10, "{queries:?}");
    let mut used = BTreeSet::new();
    for query in &queries {
        let names = metrics_in(&query.expr);
        assert!(
            !names.is_empty(),
            "{}: no metric in {:?}",
            query.place,
            query.expr
        );
        for (_, name) in names {
            assert!(
                exported.contains_key(&name),
                "{}: {name} is not exported by the daemon (exported: {:?})",
                query.place,
                exported.keys().collect::<Vec<_>>()
            );
            used.insert(name);
        }
    }
    assert!(used.len() >= 12, "{used:?}");
}

#[test]
fn the_dashboard_reads_counters_as_rates_and_gauges_as_values() {
    let exported = exported();
    for query in queries(&dashboard()) {
        for (at, name) in metrics_in(&query.expr) {
            let before = query.expr[..at].trim_end();
            let rated = ["rate(", "increase("].iter().any(|f| before.ends_with(f));
            match exported.get(&name).map(String::as_str) {
                Some("counter") => assert!(
                    rated,
                    "{}: counter {name} outside rate()/increase(): {}",
                    query.place, query.expr
                ),
                Some(_) => assert!(
                    !rated,
                    "{}: gauge {name} in rate()/increase(): {}",
                    query.place, query.expr
                ),
                None => {}
            }
        }
    }
}

#[test]
fn the_dashboard_has_the_panels_operators_need() {
    let dashboard = dashboard();
    let panels = panels(&dashboard);
    // (what, metric, a label the query must group by)
    let needs = [
        ("listeners per port", "portwatch_listeners", Some("port")),
        ("shared ports", "portwatch_shared_ports", None),
        (
            "why ports are shared",
            "portwatch_port_shared",
            Some("kind"),
        ),
        (
            "failed binds by errno",
            "portwatch_bind_failures_total",
            Some("errno"),
        ),
        (
            "failed binds by port",
            "portwatch_port_bind_failures_total",
            Some("port"),
        ),
        (
            "failed listens",
            "portwatch_listen_failures_total",
            Some("errno"),
        ),
        (
            "lost event records",
            "portwatch_events_dropped_total",
            Some("hook"),
        ),
        (
            "reconciliation drift",
            "portwatch_reconcile_drift_total",
            Some("kind"),
        ),
        ("readiness", "portwatch_ready", None),
        (
            "programs attached",
            "portwatch_program_attached",
            Some("path"),
        ),
        ("build info", "portwatch_build_info", Some("version")),
        (
            "ephemeral port utilization",
            "portwatch_ephemeral_utilization_ratio",
            Some("netns"),
        ),
        (
            "ephemeral ports in use",
            "portwatch_ephemeral_ports_in_use",
            Some("netns"),
        ),
        (
            "usable ephemeral ports",
            "portwatch_ephemeral_ports_usable",
            Some("netns"),
        ),
        (
            "listeners inside the ephemeral range",
            "portwatch_ephemeral_range_listeners",
            Some("netns"),
        ),
        ("every listener", "portwatch_listeners_by_protocol", None),
        (
            "failed connects",
            "portwatch_connect_failures_total",
            Some("errno"),
        ),
    ];
    for (what, metric, label) in needs {
        let found = panels.iter().any(|panel| {
            panel["targets"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|target| target["expr"].as_str())
                .any(|expr| {
                    metrics_in(expr).iter().any(|(_, name)| name == metric)
                        && label.is_none_or(|label| grouped_by(expr).contains(label))
                })
        });
        assert!(found, "no panel shows {what} ({metric} by {label:?})");
    }
    let titles: Vec<&str> = panels.iter().filter_map(|p| p["title"].as_str()).collect();
    for title in [
        "Listeners per port",
        "Shared ports",
        "Failed binds by errno",
    ] {
        assert!(
            titles.contains(&title),
            "no panel titled {title:?}: {titles:?}"
        );
    }
}

#[test]
fn every_panel_uses_the_datasource_variable() {
    let dashboard = dashboard();
    let variable = json!({"type": "prometheus", "uid": "${datasource}"});
    let variables = dashboard["templating"]["list"]
        .as_array()
        .expect("templating.list");
    let named = |name: &str| {
        variables
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no {name} variable"))
    };
    let datasource = named("datasource");
    assert_eq!(datasource["type"], "datasource");
    assert_eq!(datasource["query"], "prometheus");
    let instance = named("instance");
    assert_eq!(instance["datasource"], variable);
    assert_eq!(
        instance["definition"],
        "label_values(portwatch_build_info, instance)"
    );

    let panels = panels(&dashboard);
    let mut ids = BTreeSet::new();
    for panel in &panels {
        let title = &panel["title"];
        assert!(
            ids.insert(panel["id"].as_u64()),
            "{title}: id repeated or missing"
        );
        assert!(
            panel["gridPos"]["w"].as_u64().is_some(),
            "{title}: no gridPos"
        );
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(panel["datasource"], variable, "{title}");
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title}: no query");
        for target in targets {
            if !target["datasource"].is_null() {
                assert_eq!(target["datasource"], variable, "{title}");
            }
            let expr = target["expr"].as_str().expect("expr");
            assert!(
                expr.contains(r#"instance=~"$instance""#),
                "{title}: the query ignores the instance variable: {expr}"
            );
        }
    }
    assert!(dashboard["schemaVersion"].as_u64() >= Some(36));
    assert_eq!(dashboard["uid"], "portwatch");
    assert!(
        dashboard["id"].is_null(),
        "an exported id collides on import"
    );
}

/// `expr` with Grafana's variables replaced by values PromQL accepts.
fn substitute_variables(expr: &str) -> String {
    let mut out = String::new();
    let mut rest = expr;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        let (name, len) = match after.strip_prefix('{') {
            Some(braced) => {
                let end = braced.find('}').expect("a closing brace");
                (&braced[..end], end + 2)
            }
            None => {
                let end = after.find(|c| !is_name_char(c)).unwrap_or(after.len());
                (&after[..end], end)
            }
        };
        out.push_str(match name {
            "__rate_interval" | "__interval" | "__range" => "5m",
            _ => "x",
        });
        rest = &after[len..];
    }
    out.push_str(rest);
    out
}

/// Each panel query as a recording rule, which `promtool check rules`
/// parses with Prometheus's own PromQL parser.
fn promtool_check_queries(queries: &[Query]) -> (bool, String) {
    let rules: Vec<Json> = queries
        .iter()
        .filter(|query| query.promql)
        .enumerate()
        .map(|(i, query)| {
            json!({"record": format!("dashboard:query_{i}"), "expr": substitute_variables(&query.expr)})
        })
        .collect();
    // JSON is YAML.
    let file = json!({"groups": [{"name": "dashboard", "rules": rules}]});
    let dir = support::TempDir::new("dashboard");
    let path = dir.file("dashboard-rules.yml", file.to_string());
    support::promtool(
        &["check", "rules", path.to_str().expect("a UTF-8 path")],
        b"",
    )
}

#[test]
fn every_dashboard_query_parses_as_promql() {
    let queries = queries(&dashboard());
    let (ok, said) = promtool_check_queries(&queries);
    let listed: Vec<String> = queries
        .iter()
        .filter(|q| q.promql)
        .enumerate()
        .map(|(i, q)| format!("query_{i}: {}: {}", q.place, q.expr))
        .collect();
    assert!(ok, "promtool: {said}\n{}", listed.join("\n"));
}

#[test]
fn promtool_rejects_a_broken_query() {
    let broken = [Query {
        place: "test".into(),
        expr:
            r#"sum by (port (rate(portwatch_binds_total{instance=~"$instance"}[$__rate_interval]))"#
                .into(),
        promql: true,
    }];
    let (ok, said) = promtool_check_queries(&broken);
    assert!(!ok, "promtool accepted a broken query: {said}");
}

// ---------------------------------------------------------------------------
// Kubernetes.

const KUBERNETES: &str = "deploy/kubernetes";

/// The capabilities the DaemonSet adds, and no others: the systemd unit's,
/// which tests/service.rs finds both sufficient and each necessary.
fn capabilities() -> BTreeSet<String> {
    let unit = include_str!("../../deploy/systemd/portwatch.service");
    let line = unit
        .lines()
        .find_map(|line| line.strip_prefix("AmbientCapabilities="))
        .expect("the unit's AmbientCapabilities=");
    line.split_whitespace()
        .map(|cap| cap.trim_start_matches("CAP_").to_owned())
        .collect()
}

/// Every document of a YAML file.
fn documents(relative: &str) -> Vec<Yaml> {
    let text = read(relative);
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|document| {
            Yaml::deserialize(document).unwrap_or_else(|err| panic!("{relative}: {err}"))
        })
        .filter(|document| !document.is_null())
        .collect()
}

/// The value at `path` under `value`, or a panic naming the path.
#[track_caller]
fn at<'a>(value: &'a Yaml, path: &[&str]) -> &'a Yaml {
    path.iter().fold(value, |value, key| {
        value
            .get(key)
            .unwrap_or_else(|| panic!("no {} in {value:?}", path.join(".")))
    })
}

#[track_caller]
fn text<'a>(value: &'a Yaml, path: &[&str]) -> &'a str {
    at(value, path)
        .as_str()
        .unwrap_or_else(|| panic!("{} is not a string", path.join(".")))
}

#[track_caller]
fn list<'a>(value: &'a Yaml, path: &[&str]) -> &'a [Yaml] {
    at(value, path)
        .as_sequence()
        .unwrap_or_else(|| panic!("{} is not a list", path.join(".")))
}

fn flag(value: &Yaml, key: &str) -> Option<bool> {
    value.get(key).and_then(Yaml::as_bool)
}

/// The files `kubectl apply -k` applies, from kustomization.yml.
fn resource_files() -> Vec<String> {
    let kustomization = &documents(&format!("{KUBERNETES}/kustomization.yml"))[0];
    list(kustomization, &["resources"])
        .iter()
        .map(|file| file.as_str().expect("a file name").to_owned())
        .collect()
}

/// Every Kubernetes object shipped, with the file it is in.
fn objects() -> Vec<(String, Yaml)> {
    resource_files()
        .into_iter()
        .flat_map(|file| {
            documents(&format!("{KUBERNETES}/{file}"))
                .into_iter()
                .map(move |object| (file.clone(), object))
        })
        .collect()
}

#[track_caller]
fn object(kind: &str) -> Yaml {
    let mut found: Vec<Yaml> = objects()
        .into_iter()
        .map(|(_, object)| object)
        .filter(|object| object.get("kind").and_then(Yaml::as_str) == Some(kind))
        .collect();
    assert_eq!(found.len(), 1, "one {kind} expected");
    found.remove(0)
}

/// The DaemonSet's portwatch container.
fn container(daemonset: &Yaml) -> &Yaml {
    let containers = list(daemonset, &["spec", "template", "spec", "containers"]);
    containers
        .iter()
        .find(|c| c.get("name").and_then(Yaml::as_str) == Some("portwatch"))
        .expect("a container named portwatch")
}

/// The pod volume a container mount at `mount_path` uses, and the mount.
fn mounted<'a>(daemonset: &'a Yaml, mount_path: &str) -> (&'a Yaml, &'a Yaml) {
    let mount = list(container(daemonset), &["volumeMounts"])
        .iter()
        .find(|m| m.get("mountPath").and_then(Yaml::as_str) == Some(mount_path))
        .unwrap_or_else(|| panic!("nothing mounted at {mount_path}"));
    let name = text(mount, &["name"]);
    let volume = list(daemonset, &["spec", "template", "spec", "volumes"])
        .iter()
        .find(|v| v.get("name").and_then(Yaml::as_str) == Some(name))
        .unwrap_or_else(|| panic!("no volume {name} for {mount_path}"));
    (volume, mount)
}

/// The Secret portwatch-web as README.md makes it: `web.yml` (the shipped
/// one, with a real hash for its placeholder), `tls.crt` and `tls.key`, in
/// a directory standing for its mount.
fn web_secret() -> support::pki::Pki {
    let pki = support::pki::Pki::new("k8s-web");
    std::fs::copy(&pki.server_cert, pki.dir.path.join("tls.crt")).unwrap();
    std::fs::copy(&pki.server_key, pki.dir.path.join("tls.key")).unwrap();
    let web = read(&format!("{KUBERNETES}/web.yml"))
        .replace("<bcrypt hash>", &support::pki::bcrypt_hash("scrape"));
    pki.dir.file("web.yml", web);
    pki
}

/// The ConfigMap's portwatch.toml, through the daemon's own parser, with
/// the Secret's mount at `web_dir`.
fn configmap_config_with(web_dir: &Path) -> Config {
    let configmap = object("ConfigMap");
    let toml = text(&configmap, &["data", "portwatch.toml"])
        .replace("/etc/portwatch-web", &web_dir.display().to_string());
    Config::parse(&toml, Path::new("deploy/kubernetes/configmap.yml"))
        .and_then(|config| config.apply_flags(&Overrides::default()))
        .unwrap_or_else(|err| panic!("the ConfigMap's portwatch.toml: {err}"))
}

fn configmap_config() -> Config {
    configmap_config_with(&web_secret().dir.path)
}

#[test]
fn kustomization_applies_every_manifest() {
    let mut listed = resource_files();
    listed.sort();
    let dir = repo().join(KUBERNETES);
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .expect("deploy/kubernetes")
        .map(|entry| entry.expect("a directory entry").file_name())
        .map(|name| name.to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".yml") || name.ends_with(".yaml"))
        // Not Kubernetes objects.
        .filter(|name| {
            !["kustomization.yml", "prometheus-scrape.yml", "web.yml"].contains(&name.as_str())
        })
        .collect();
    files.sort();
    assert_eq!(listed, files);
}

#[test]
fn every_object_is_named_and_in_the_portwatch_namespace() {
    let objects = objects();
    let kinds: BTreeSet<&str> = objects.iter().map(|(_, o)| text(o, &["kind"])).collect();
    for kind in ["Namespace", "ConfigMap", "DaemonSet"] {
        assert!(kinds.contains(kind), "no {kind}: {kinds:?}");
    }
    for (file, object) in &objects {
        let kind = text(object, &["kind"]);
        assert!(!text(object, &["apiVersion"]).is_empty(), "{file}");
        let name = text(object, &["metadata", "name"]);
        if kind == "Namespace" {
            assert_eq!(name, "portwatch", "{file}");
            // hostPID, hostNetwork, hostPath and added capabilities are
            // only admitted at the `privileged` Pod Security level.
            let labels = at(object, &["metadata", "labels"]);
            assert_eq!(
                text(labels, &["pod-security.kubernetes.io/enforce"]),
                "privileged"
            );
        } else {
            assert_eq!(
                text(object, &["metadata", "namespace"]),
                "portwatch",
                "{file} {kind}"
            );
        }
    }
}

#[test]
fn the_daemonset_shares_the_hosts_pid_and_network_namespaces() {
    let daemonset = object("DaemonSet");
    assert_eq!(text(&daemonset, &["apiVersion"]), "apps/v1");
    let selector = at(&daemonset, &["spec", "selector", "matchLabels"])
        .as_mapping()
        .expect("matchLabels");
    assert!(!selector.is_empty());
    let labels = at(&daemonset, &["spec", "template", "metadata", "labels"]);
    for (key, value) in selector {
        assert_eq!(labels.get(key), Some(value), "the selector's {key:?}");
    }
    let pod = at(&daemonset, &["spec", "template", "spec"]);
    assert_eq!(flag(pod, "hostPID"), Some(true));
    assert_eq!(flag(pod, "hostNetwork"), Some(true));
    // On every node, whatever its taints.
    let tolerations = list(pod, &["tolerations"]);
    assert!(
        tolerations.iter().any(
            |t| t.get("operator").and_then(Yaml::as_str) == Some("Exists")
                && t.get("key").is_none()
                && t.get("effect").is_none()
        ),
        "{tolerations:?}"
    );
    let container = container(&daemonset);
    assert!(!text(container, &["image"]).is_empty());
    let command: Vec<&str> = list(container, &["command"])
        .iter()
        .filter_map(Yaml::as_str)
        .collect();
    assert_eq!(
        command,
        [
            "portwatch",
            "daemon",
            "--config",
            "/etc/portwatch/portwatch.toml"
        ]
    );
    let resources = at(container, &["resources"]);
    assert!(at(resources, &["limits", "memory"]).as_str().is_some());
    assert!(at(resources, &["requests", "memory"]).as_str().is_some());
    assert!(at(resources, &["requests", "cpu"]).as_str().is_some());
}

#[test]
fn the_daemonset_has_exactly_the_capabilities_it_needs() {
    let daemonset = object("DaemonSet");
    let security = at(container(&daemonset), &["securityContext"]);
    let names = |key: &str| -> BTreeSet<&str> {
        list(security, &["capabilities", key])
            .iter()
            .map(|c| c.as_str().expect("a capability name"))
            .collect()
    };
    assert_eq!(names("drop"), BTreeSet::from(["ALL"]));
    let added = list(security, &["capabilities", "add"]);
    assert_eq!(added.len(), capabilities().len(), "{added:?}");
    let expected = capabilities();
    assert_eq!(names("add"), expected.iter().map(String::as_str).collect());
    assert_eq!(flag(security, "allowPrivilegeEscalation"), Some(false));
    assert_ne!(flag(security, "privileged"), Some(true));
    assert_eq!(flag(security, "readOnlyRootFilesystem"), Some(true));
    let pod = at(&daemonset, &["spec", "template", "spec"]);
    assert_ne!(
        pod.get("securityContext")
            .and_then(|s| flag(s, "privileged")),
        Some(true)
    );
}

#[test]
fn the_daemonset_mounts_what_the_kernel_programs_need() {
    let daemonset = object("DaemonSet");
    // (path on the host and in the container, read-only required)
    for (path, read_only) in [
        ("/sys/fs/bpf", false),
        ("/sys/kernel/tracing", true),
        ("/sys/kernel/btf", true),
        // The cgroup2 root, found in /proc/self/mounts.
        ("/sys/fs/cgroup", true),
        ("/run/netns", true),
        // The kubelet's log directories: the pods' and containers' names.
        ("/var/log/pods", true),
        ("/var/log/containers", true),
    ] {
        let (volume, mount) = mounted(&daemonset, path);
        assert_eq!(text(volume, &["hostPath", "path"]), path, "{volume:?}");
        if read_only {
            assert_eq!(flag(mount, "readOnly"), Some(true), "{path}");
        }
    }
    let (_, netns) = mounted(&daemonset, "/run/netns");
    assert_eq!(text(netns, &["mountPropagation"]), "HostToContainer");

    // --config names a key of the ConfigMap, mounted where it says.
    let configmap = object("ConfigMap");
    let command = list(container(&daemonset), &["command"]);
    let config_at = command
        .iter()
        .position(|arg| arg.as_str() == Some("--config"))
        .and_then(|i| command.get(i + 1))
        .and_then(Yaml::as_str)
        .expect("--config PATH");
    let config_path = Path::new(config_at);
    let dir = config_path
        .parent()
        .and_then(Path::to_str)
        .expect("a directory");
    let (volume, _) = mounted(&daemonset, dir);
    assert_eq!(
        text(volume, &["configMap", "name"]),
        text(&configmap, &["metadata", "name"])
    );
    let key = config_path
        .file_name()
        .and_then(|n| n.to_str())
        .expect("a file name");
    assert!(
        at(&configmap, &["data"]).get(key).is_some(),
        "no {key} in the ConfigMap"
    );
}

#[test]
fn the_configmap_is_a_valid_portwatch_config() {
    let config = configmap_config();
    let metrics = config.metrics_listen.expect("metrics_listen is set");
    // On the host network: reachable by Prometheus and the kubelet.
    assert!(metrics.ip().is_unspecified(), "{metrics}");
    // The full API shows process details: it stays on the node's loopback.
    assert!(config.listen.ip().is_loopback(), "{}", config.listen);
}

#[test]
fn scraping_and_probes_use_the_metrics_listener() {
    let daemonset = object("DaemonSet");
    let metrics_port = configmap_config()
        .metrics_listen
        .expect("metrics_listen")
        .port();
    let container = container(&daemonset);
    let port = list(container, &["ports"])
        .iter()
        .find(|p| p.get("name").and_then(Yaml::as_str) == Some("metrics"))
        .expect("a port named metrics");
    assert_eq!(
        at(port, &["containerPort"]).as_u64(),
        Some(u64::from(metrics_port))
    );

    let annotations = at(&daemonset, &["spec", "template", "metadata", "annotations"]);
    assert_eq!(text(annotations, &["prometheus.io/scrape"]), "true");
    assert_eq!(text(annotations, &["prometheus.io/path"]), "/metrics");
    assert_eq!(
        text(annotations, &["prometheus.io/port"]),
        metrics_port.to_string()
    );
}

#[test]
fn probes_ask_the_api_on_the_nodes_loopback() {
    // The metrics port asks for the scrape user's password; the API on the
    // node's loopback (shared with the host network) does not.
    let daemonset = object("DaemonSet");
    let container = container(&daemonset);
    let listen = configmap_config().listen;
    for (probe, path) in [
        ("livenessProbe", "/livez"),
        ("readinessProbe", "/readyz"),
        ("startupProbe", "/livez"),
    ] {
        let Some(probe) = container.get(probe) else {
            assert_ne!(probe, "livenessProbe", "no liveness probe");
            assert_ne!(probe, "readinessProbe", "no readiness probe");
            continue;
        };
        let get = at(probe, &["httpGet"]);
        assert_eq!(text(get, &["path"]), path);
        assert_eq!(text(get, &["host"]), listen.ip().to_string(), "{probe:?}");
        assert_eq!(
            at(get, &["port"]).as_u64(),
            Some(u64::from(listen.port())),
            "{probe:?} does not use the API's port"
        );
    }
}

#[test]
fn metrics_are_served_over_tls_to_the_scrape_user_only() {
    let secret = web_secret();
    let config = configmap_config_with(&secret.dir.path);
    let web = config.metrics_web().unwrap_or_else(|err| panic!("{err}"));
    assert!(
        web.tls.is_some() && web.users.required(),
        "{}",
        web.describe()
    );
    // The API on loopback stays plain, for the probes and the node's CLI.
    assert!(config.api_web().unwrap().tls.is_none());
    // The Secret is mounted where metrics_web_config looks.
    let daemonset = object("DaemonSet");
    let (volume, mount) = mounted(&daemonset, "/etc/portwatch-web");
    assert_eq!(text(volume, &["secret", "secretName"]), "portwatch-web");
    assert_eq!(flag(mount, "readOnly"), Some(true));
    let configmap = object("ConfigMap");
    assert!(
        text(&configmap, &["data", "portwatch.toml"])
            .contains("metrics_web_config = \"/etc/portwatch-web/web.yml\""),
    );
    // Prometheus scrapes with TLS and the user web.yml names.
    let scrape = scrape_config();
    let job = portwatch_job(&scrape);
    assert_eq!(text(job, &["scheme"]), "https");
    assert_eq!(text(job, &["tls_config", "server_name"]), "portwatch");
    assert!(!text(job, &["tls_config", "ca_file"]).is_empty());
    let user = text(job, &["basic_auth", "username"]);
    let shipped = read(&format!("{KUBERNETES}/web.yml"));
    assert!(
        shipped.contains(&format!("  {user}: ")),
        "{user} is not in web.yml"
    );
    assert!(!text(job, &["basic_auth", "password_file"]).is_empty());
}

// ---------------------------------------------------------------------------
// The Prometheus scrape job.

fn scrape_config() -> Yaml {
    documents(&format!("{KUBERNETES}/prometheus-scrape.yml")).remove(0)
}

/// The job that discovers pods through the Kubernetes API.
fn portwatch_job(config: &Yaml) -> &Yaml {
    list(config, &["scrape_configs"])
        .iter()
        .find(|job| {
            job.get("kubernetes_sd_configs")
                .and_then(Yaml::as_sequence)
                .is_some_and(|sd| sd.iter().any(|sd| sd.get("role") == Some(&"pod".into())))
        })
        .expect("a job with kubernetes_sd_configs role: pod")
}

/// The job's relabel rules that `pick` selects.
fn rules(job: &Yaml, pick: impl Fn(&Yaml) -> bool) -> Vec<&Yaml> {
    list(job, &["relabel_configs"])
        .iter()
        .filter(|r| pick(r))
        .collect()
}

fn sources(rule: &Yaml) -> Vec<&str> {
    list(rule, &["source_labels"])
        .iter()
        .filter_map(Yaml::as_str)
        .collect()
}

/// A pod label or annotation as Prometheus's Kubernetes discovery names it.
fn meta_name(prefix: &str, key: &str) -> String {
    let key: String = key
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    format!("{prefix}{key}")
}

#[test]
fn the_scrape_job_keeps_the_annotated_portwatch_pods() {
    let config = scrape_config();
    let job = portwatch_job(&config);
    let daemonset = object("DaemonSet");
    let template = at(&daemonset, &["spec", "template", "metadata"]);

    // What the pods carry, as __meta_kubernetes_pod_* labels.
    let mut meta: BTreeMap<String, String> = BTreeMap::new();
    for (field, prefix) in [
        ("labels", "__meta_kubernetes_pod_label_"),
        ("annotations", "__meta_kubernetes_pod_annotation_"),
    ] {
        let map = at(template, &[field]).as_mapping().expect("a mapping");
        for (key, value) in map {
            let key = key.as_str().expect("a string key");
            meta.insert(
                meta_name(prefix, key),
                value.as_str().unwrap_or("").to_owned(),
            );
        }
    }
    let container = container(&daemonset);
    for port in list(container, &["ports"]) {
        if let Some(name) = port.get("name").and_then(Yaml::as_str) {
            meta.insert(
                "__meta_kubernetes_pod_container_port_name".into(),
                name.into(),
            );
        }
    }

    let keeps = rules(job, |r| r.get("action") == Some(&"keep".into()));
    let scrape = "__meta_kubernetes_pod_annotation_prometheus_io_scrape";
    assert!(
        keeps
            .iter()
            .any(|r| sources(r) == [scrape] && text(r, &["regex"]) == "true"),
        "no keep on {scrape}: {keeps:?}"
    );
    // Every keep rule on a single pod label or annotation lets these pods
    // through (their regexes are plain alternatives of literals).
    for rule in &keeps {
        let [source] = sources(rule)[..] else {
            continue;
        };
        let value = meta
            .get(source)
            .unwrap_or_else(|| panic!("the pods have no {source}"));
        let regex = text(rule, &["regex"]);
        assert!(
            regex.split('|').any(|alt| alt == value),
            "keep {source} =~ {regex} drops the pods ({value:?})"
        );
    }

    let target = |label: &str| rules(job, |r| r.get("target_label") == Some(&label.into()));
    let port_annotation = "__meta_kubernetes_pod_annotation_prometheus_io_port";
    let address = target("__address__");
    assert!(
        !address.is_empty()
            && address
                .iter()
                .all(|r| sources(r).contains(&port_annotation)),
        "__address__ must come from {port_annotation}: {address:?}"
    );
    assert!(
        target("__metrics_path__")
            .iter()
            .any(|r| sources(r) == ["__meta_kubernetes_pod_annotation_prometheus_io_path"])
    );
    // The dashboard's instance variable lists nodes.
    assert!(
        target("instance")
            .iter()
            .any(|r| sources(r) == ["__meta_kubernetes_pod_node_name"])
    );

    let namespace = text(&daemonset, &["metadata", "namespace"]);
    let sd = &list(job, &["kubernetes_sd_configs"])[0];
    if let Some(names) = sd.get("namespaces") {
        let names: Vec<&str> = list(names, &["names"])
            .iter()
            .filter_map(Yaml::as_str)
            .collect();
        assert!(names.contains(&namespace), "{names:?}");
    }
}

#[test]
fn promtool_accepts_the_scrape_job() {
    // Debian's promtool is built without Kubernetes discovery: swap it for a
    // static target, which still checks every relabel rule and its regex.
    let mut config = scrape_config();
    let jobs = config
        .get_mut("scrape_configs")
        .and_then(Yaml::as_sequence_mut)
        .expect("scrape_configs");
    for job in jobs {
        let job = job.as_mapping_mut().expect("a job");
        assert!(job.remove("kubernetes_sd_configs").is_some());
        let static_configs: Yaml =
            serde_yaml_ng::from_str("- targets: ['node-1:7465']").expect("YAML");
        job.insert("static_configs".into(), static_configs);
    }
    let text = serde_yaml_ng::to_string(&config).expect("YAML");
    let dir = support::TempDir::new("scrape");
    let path = dir.file("prometheus.yml", &text);
    let (ok, said) = support::promtool(
        &["check", "config", path.to_str().expect("a UTF-8 path")],
        b"",
    );
    assert!(ok, "promtool: {said}\n{text}");
}
