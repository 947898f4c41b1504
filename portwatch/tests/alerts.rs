//! The shipped Prometheus rules (`deploy/prometheus/`): `promtool` accepts
//! them and passes their unit tests, each firing case really fires, every
//! alert has a firing and a quiet case and a runbook section, and the rules
//! and tests use only metrics and labels portwatch exports (rendered from a
//! real [`Metrics`], not a list kept by hand). No root needed for those.
//!
//! The root tests run Debian's `prometheus` on loopback, scraping the real
//! daemon with the shipped rules: one makes an EADDRINUSE storm with real
//! sockets and waits for `PortwatchEaddrinuseStorm` to fire in Prometheus's
//! own API; the other fills a namespace's 10-port ephemeral range with real
//! connections and waits for `PortwatchEphemeralPortsExhausting`.
//!
//! promtool and prometheus come from Debian's `prometheus` package, which
//! `cargo xtask setup` installs; without them these tests fail, not skip.

mod support;

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::File,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde::Deserialize;
use serde_json::Value as Json;
use serde_yaml_ng::Value as Yaml;
use support::{
    CgroupGuard, DEADLINE, NetnsGuard, Op, Worker,
    daemon::{Daemon, EADDRINUSE_TCP4, sample},
    pki::{Pki, bcrypt_hash},
    until,
};

/// Where every runbook_url points, up to the `#`.
const RUNBOOK: &str = "https://example.invalid/portwatch/blob/main/deploy/prometheus/runbook.md";

/// The shipped rule files, in the order Prometheus is given them.
const RULE_FILES: [&str; 2] = ["rules.yml", "alerts.yml"];

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/prometheus")
}

#[derive(Deserialize)]
struct RuleFile {
    groups: Vec<RuleGroup>,
}

#[derive(Deserialize)]
struct RuleGroup {
    rules: Vec<Rule>,
}

#[derive(Deserialize)]
struct Rule {
    alert: Option<String>,
    record: Option<String>,
    expr: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

/// A promtool unit-test file (only the parts these tests read).
#[derive(Deserialize)]
struct TestFile {
    tests: Vec<TestGroup>,
}

#[derive(Deserialize)]
struct TestGroup {
    input_series: Vec<InputSeries>,
    #[serde(default)]
    alert_rule_test: Vec<AlertTest>,
}

#[derive(Deserialize)]
struct InputSeries {
    series: String,
}

#[derive(Deserialize)]
struct AlertTest {
    alertname: String,
    /// Absent or empty: the alert must not be firing at `eval_time`.
    #[serde(default)]
    exp_alerts: Vec<Yaml>,
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|err| panic!("read {}: {err}", path.display()))
}

fn rules() -> Vec<Rule> {
    RULE_FILES
        .iter()
        .flat_map(|name| {
            let path = deploy().join(name);
            let file: RuleFile = serde_yaml_ng::from_str(&read(&path))
                .unwrap_or_else(|err| panic!("{}: {err}", path.display()));
            file.groups.into_iter().flat_map(|group| group.rules)
        })
        .collect()
}

fn alerts() -> Vec<Rule> {
    rules().into_iter().filter(|r| r.alert.is_some()).collect()
}

/// The unit-test files, sorted.
fn test_files() -> Vec<PathBuf> {
    let dir = deploy().join("tests");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|err| panic!("{}: {err}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "yml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no unit tests in {}", dir.display());
    files
}

fn unit_tests() -> Vec<(PathBuf, TestFile)> {
    test_files()
        .into_iter()
        .map(|path| {
            let file = serde_yaml_ng::from_str(&read(&path))
                .unwrap_or_else(|err| panic!("{}: {err}", path.display()));
            (path, file)
        })
        .collect()
}

/// Runs promtool in `deploy/`; panics with the setup command if it is not
/// installed.
fn promtool(args: &[&Path]) -> (bool, String) {
    let out = support::run_tool(
        Command::new("promtool").args(args).current_dir(deploy()),
        "prometheus",
        b"",
    );
    (out.status.success(), support::said(&out))
}

#[test]
fn promtool_checks_the_shipped_rules() {
    let mut args = vec![Path::new("check"), Path::new("rules")];
    args.extend(RULE_FILES.iter().map(Path::new));
    let (ok, said) = promtool(&args);
    assert!(ok, "promtool check rules: {said}");
    let found: usize = said
        .lines()
        .filter_map(|line| line.trim().strip_prefix("SUCCESS: ")?.split(' ').next())
        .map(|n| n.parse::<usize>().expect("a rule count"))
        .sum();
    assert_eq!(found, rules().len(), "{said}");
}

#[test]
fn promtool_passes_the_unit_tests() {
    let files = test_files();
    let mut args = vec![Path::new("test"), Path::new("rules")];
    args.extend(files.iter().map(PathBuf::as_path));
    let (ok, said) = promtool(&args);
    assert!(ok, "promtool test rules: {said}");
    assert_eq!(said.matches("SUCCESS").count(), files.len(), "{said}");
}

/// Each case that expects an alert, turned into one that expects none, must
/// fail: the firing cases fire, rather than passing on a typo'd name or an
/// eval_time where nothing happens.
#[test]
fn each_firing_case_really_fires() {
    let dir = support::TempDir::new("alert-mutants");
    let mut mutants = 0;
    for path in test_files() {
        let original: Yaml = serde_yaml_ng::from_str(&read(&path)).expect("YAML");
        let cases = firing_cases(&original);
        for &(group, case) in &cases {
            let mut mutant = original.clone();
            // Absolute rule paths: the mutant lives elsewhere.
            for file in mutant["rule_files"]
                .as_sequence_mut()
                .expect("rule_files")
                .iter_mut()
            {
                let relative = file.as_str().expect("a path").to_owned();
                let absolute = path.parent().expect("tests/").join(relative);
                *file = Yaml::from(absolute.to_str().expect("UTF-8 path"));
            }
            let alertname = mutant["tests"][group]["alert_rule_test"][case]["alertname"]
                .as_str()
                .expect("alertname")
                .to_owned();
            mutant["tests"][group]["alert_rule_test"][case]["exp_alerts"] =
                Yaml::Sequence(Vec::new());
            let file = dir.path.join(format!("mutant-{mutants}.yml"));
            std::fs::write(&file, serde_yaml_ng::to_string(&mutant).expect("YAML"))
                .expect("write mutant");
            mutants += 1;
            let (ok, said) = promtool(&[Path::new("test"), Path::new("rules"), &file]);
            assert!(
                !ok && said.contains(&alertname),
                "{} (group {group}, case {case}) expects {alertname} to fire, yet \
                 expecting nothing also passes: {said}",
                path.display()
            );
        }
    }
    assert!(mutants > 0, "no firing cases at all");
}

/// (group, case) of each alert_rule_test that expects alerts.
fn firing_cases(file: &Yaml) -> Vec<(usize, usize)> {
    let groups = file["tests"].as_sequence().expect("tests");
    let mut cases = Vec::new();
    for (g, group) in groups.iter().enumerate() {
        let Some(tests) = group["alert_rule_test"].as_sequence() else {
            continue;
        };
        for (c, test) in tests.iter().enumerate() {
            if test["exp_alerts"]
                .as_sequence()
                .is_some_and(|alerts| !alerts.is_empty())
            {
                cases.push((g, c));
            }
        }
    }
    cases
}

#[test]
fn every_alert_has_a_firing_and_a_quiet_unit_test() {
    let names: BTreeSet<String> = alerts().into_iter().filter_map(|r| r.alert).collect();
    assert!(!names.is_empty(), "alerts.yml has no alerts");
    let mut firing = BTreeSet::new();
    let mut quiet = BTreeSet::new();
    for (path, file) in unit_tests() {
        for test in file.tests.iter().flat_map(|g| &g.alert_rule_test) {
            assert!(
                names.contains(&test.alertname),
                "{} tests {}, which alerts.yml does not have",
                path.display(),
                test.alertname
            );
            if test.exp_alerts.is_empty() {
                quiet.insert(test.alertname.clone());
            } else {
                firing.insert(test.alertname.clone());
            }
        }
    }
    let never_fired: Vec<_> = names.difference(&firing).collect();
    let never_quiet: Vec<_> = names.difference(&quiet).collect();
    assert!(
        never_fired.is_empty(),
        "no unit test where these fire: {never_fired:?}"
    );
    assert!(
        never_quiet.is_empty(),
        "no unit test where these stay quiet (exp_alerts: []): {never_quiet:?}"
    );
}

/// GitHub's anchor for a heading: lowercase; letters, digits, `-` and `_`
/// kept; spaces become `-`; everything else dropped.
fn github_slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

#[test]
fn github_slugs_are_computed_as_github_does() {
    assert_eq!(
        github_slug("PortwatchListenerGone"),
        "portwatchlistenergone"
    );
    assert_eq!(
        github_slug("Ports: who holds `N`?"),
        "ports-who-holds-n",
        "punctuation dropped"
    );
}

#[test]
fn every_alert_links_its_runbook_section_and_says_how_bad_it_is() {
    let runbook = read(&deploy().join("runbook.md"));
    let sections: BTreeSet<String> = runbook
        .lines()
        .filter_map(|line| line.strip_prefix("## "))
        .map(github_slug)
        .collect();
    for rule in alerts() {
        let name = rule.alert.as_deref().expect("an alert");
        let url = rule
            .annotations
            .get("runbook_url")
            .unwrap_or_else(|| panic!("{name} has no runbook_url"));
        let anchor = url
            .strip_prefix(RUNBOOK)
            .and_then(|rest| rest.strip_prefix('#'))
            .unwrap_or_else(|| panic!("{name}: {url} is not {RUNBOOK}#<section>"));
        assert!(
            sections.contains(anchor),
            "{name}: runbook.md has no heading with anchor #{anchor}; it has {sections:?}"
        );
        assert_eq!(
            anchor,
            github_slug(name),
            "{name} links another alert's section"
        );
        let severity = rule.labels.get("severity").map(String::as_str);
        assert!(
            matches!(severity, Some("critical" | "warning" | "info")),
            "{name}: severity {severity:?}"
        );
        for key in ["summary", "description"] {
            let text = rule
                .annotations
                .get(key)
                .unwrap_or_else(|| panic!("{name} has no {key}"));
            assert!(
                text.contains("{{ $labels.instance }}"),
                "{name}'s {key} does not say which host: {text}"
            );
        }
    }
}

// --- Metric names --------------------------------------------------------

/// Each family `/metrics` serves, with the label names its samples carry.
fn exported() -> BTreeMap<String, BTreeSet<String>> {
    support::exported::exported()
        .into_iter()
        .map(|(name, family)| (name, family.labels))
        .collect()
}

/// The metric name and label names of `name{a="x",b="y"} ...` (the series
/// syntax of the exposition format and of promtool's input_series).
fn selector(text: &str) -> (String, BTreeSet<String>) {
    let tokens = lex(text);
    let name = match tokens.first() {
        Some(Token::Ident(name)) => name.clone(),
        other => panic!("no metric name in {text:?}: {other:?}"),
    };
    let labels = if tokens.get(1) == Some(&Token::Punct('{')) {
        matcher_labels(&tokens[2..]).0
    } else {
        BTreeSet::new()
    };
    (name, labels)
}

#[derive(Debug, PartialEq)]
enum Token {
    Ident(String),
    Str,
    Number,
    Punct(char),
}

/// A PromQL lexer good enough to find metric names and label matchers.
fn lex(text: &str) -> Vec<Token> {
    let mut tokens = Vec::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            c if c.is_whitespace() => {}
            '#' => {
                // A comment, to the end of the line.
                for c in chars.by_ref() {
                    if c == '\n' {
                        break;
                    }
                }
            }
            '"' | '\'' | '`' => {
                let mut escaped = false;
                for next in chars.by_ref() {
                    match next {
                        _ if escaped => escaped = false,
                        '\\' if c != '`' => escaped = true,
                        next if next == c => break,
                        _ => {}
                    }
                }
                tokens.push(Token::Str);
            }
            c if c.is_ascii_alphabetic() || c == '_' || c == ':' => {
                let mut ident = String::from(c);
                while let Some(&next) = chars.peek() {
                    if next.is_ascii_alphanumeric() || next == '_' || next == ':' {
                        ident.push(next);
                        chars.next();
                    } else {
                        break;
                    }
                }
                tokens.push(Token::Ident(ident));
            }
            c if c.is_ascii_digit() || c == '.' => {
                // Numbers and durations: 1, 0.5, 1e3, 10m, 1h30m.
                while chars
                    .peek()
                    .is_some_and(|next| next.is_ascii_alphanumeric() || *next == '.')
                {
                    chars.next();
                }
                tokens.push(Token::Number);
            }
            c => tokens.push(Token::Punct(c)),
        }
    }
    tokens
}

/// The label names in matchers that start just after a `{`, and how many
/// tokens they take up to and including the `}`.
fn matcher_labels(tokens: &[Token]) -> (BTreeSet<String>, usize) {
    let mut labels = BTreeSet::new();
    let mut expect_label = true;
    for (i, token) in tokens.iter().enumerate() {
        match token {
            Token::Punct('}') => return (labels, i + 1),
            Token::Punct(',') => expect_label = true,
            Token::Ident(label) if expect_label => {
                labels.insert(label.clone());
                expect_label = false;
            }
            _ => {}
        }
    }
    panic!("unclosed label matcher in {tokens:?}")
}

/// Words that are PromQL, not metric names, when not followed by `(`
/// (aggregations can be: `sum without (l) (x)`).
const KEYWORDS: [&str; 26] = [
    "and",
    "or",
    "unless",
    "offset",
    "bool",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "inf",
    "nan",
    "atan2",
    "sum",
    "avg",
    "min",
    "max",
    "count",
    "group",
    "stddev",
    "stdvar",
    "topk",
    "bottomk",
    "quantile",
    "count_values",
];

/// Keywords followed by a parenthesised list of label names.
const LABEL_LISTS: [&str; 6] = [
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

/// Every metric an expression selects, with the label names its matchers
/// use (`by`, `on` and other label lists are skipped).
fn selected(expr: &str) -> BTreeMap<String, BTreeSet<String>> {
    let tokens = lex(expr);
    let mut metrics: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut i = 0;
    while i < tokens.len() {
        match &tokens[i] {
            Token::Ident(word)
                if LABEL_LISTS.contains(&word.as_str())
                    && tokens.get(i + 1) == Some(&Token::Punct('(')) =>
            {
                // Skip the label list to its `)`.
                let close = tokens[i..]
                    .iter()
                    .position(|t| *t == Token::Punct(')'))
                    .expect("a closed label list");
                i += close;
            }
            // A function call: its arguments follow.
            Token::Ident(_) if tokens.get(i + 1) == Some(&Token::Punct('(')) => {}
            Token::Ident(word) if KEYWORDS.contains(&word.as_str()) => {}
            Token::Ident(name) => {
                let labels = metrics.entry(name.clone()).or_default();
                if tokens.get(i + 1) == Some(&Token::Punct('{')) {
                    let (matched, used) = matcher_labels(&tokens[i + 2..]);
                    labels.extend(matched);
                    i += 1 + used;
                }
            }
            Token::Punct('{') => panic!("a selector without a metric name in {expr}"),
            Token::Punct('[') => {
                // A range or subquery: durations only.
                let close = tokens[i..]
                    .iter()
                    .position(|t| *t == Token::Punct(']'))
                    .expect("a closed range");
                i += close;
            }
            _ => {}
        }
        i += 1;
    }
    metrics
}

#[test]
fn the_lexer_finds_metric_names_and_labels() {
    let found = selected(
        r#"sum without (hook) (rate(a_total{job="x",errno!~"E.*"}[5m] offset 10m)) > 0.5
           unless on (job, instance) label_replace(b:c:d, "l", "v", "", "") or max_over_time(e[1h:1m])"#,
    );
    let names: Vec<&str> = found.keys().map(String::as_str).collect();
    assert_eq!(names, ["a_total", "b:c:d", "e"]);
    let labels: Vec<&str> = found["a_total"].iter().map(String::as_str).collect();
    assert_eq!(labels, ["errno", "job"]);
}

#[test]
fn the_rules_read_only_what_portwatch_exports() {
    let exported = exported();
    assert!(
        exported.contains_key("portwatch_bind_failures_total")
            && exported.contains_key("portwatch_expected_listeners"),
        "the rendered metrics lack families: {exported:?}"
    );
    let rules = rules();
    let recorded: BTreeSet<String> = rules.iter().filter_map(|r| r.record.clone()).collect();
    // Labels every scraped series has (target labels), and Prometheus's own
    // `up`, which has only those.
    let target: BTreeSet<String> = ["job", "instance"].map(String::from).into();
    let mut used = BTreeSet::new();
    for rule in &rules {
        let name = rule
            .alert
            .as_ref()
            .or(rule.record.as_ref())
            .expect("a name");
        for (metric, labels) in selected(&rule.expr) {
            used.insert(metric.clone());
            if recorded.contains(&metric) {
                continue;
            }
            let known = if metric == "up" {
                &target
            } else {
                exported.get(&metric).unwrap_or_else(|| {
                    panic!(
                        "{name} reads {metric}, which portwatch does not export; it exports {:?}",
                        exported.keys()
                    )
                })
            };
            let unknown: Vec<_> = labels
                .iter()
                .filter(|l| !known.contains(*l) && !target.contains(*l))
                .collect();
            assert!(
                unknown.is_empty(),
                "{name} matches {metric} on labels it does not have: {unknown:?}"
            );
        }
    }
    let unused: Vec<_> = recorded.difference(&used).collect();
    assert!(unused.is_empty(), "recorded but never used: {unused:?}");

    // The unit tests feed the rules series shaped like the real ones, so
    // that a test cannot pass on a name or label the daemon never produces.
    for (path, file) in unit_tests() {
        for input in file.tests.iter().flat_map(|g| &g.input_series) {
            let (metric, labels) = selector(&input.series);
            let known = if metric == "up" {
                &target
            } else {
                exported.get(&metric).unwrap_or_else(|| {
                    panic!(
                        "{}: input {metric} is not exported by portwatch",
                        path.display()
                    )
                })
            };
            let expected: BTreeSet<String> = known.union(&target).cloned().collect();
            assert_eq!(labels, expected, "{}: {}", path.display(), input.series);
        }
    }
}

// --- End to end ----------------------------------------------------------

/// Debian's `prometheus` on a loopback port, scraping one target every
/// second with the shipped rules; killed (and its data removed) on drop.
struct Prometheus {
    child: Child,
    url: String,
    /// Config, log and data; removed after `drop` has killed the child.
    dir: support::TempDir,
}

impl Prometheus {
    /// Scrapes `target` with `scrape` (more keys of the scrape config,
    /// indented as its members, or "").
    fn start(target: &str, scrape: &str) -> Prometheus {
        let dir = support::TempDir::new("prometheus");
        let rule_files: String = RULE_FILES
            .iter()
            .map(|name| format!("  - {}\n", deploy().join(name).display()))
            .collect();
        // One-second scrapes and evaluations, so that a `for: 1m` alert
        // fires about a minute after its condition starts to hold.
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n{rule_files}\
             scrape_configs:\n  - job_name: portwatch\n{scrape}    static_configs:\n      - targets: ['{target}']\n"
        );
        let config_path = dir.path.join("prometheus.yml");
        std::fs::write(&config_path, config).expect("write prometheus.yml");
        let log = File::create(dir.path.join("prometheus.log")).expect("create the log");
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let child = support::spawn_tool(
            Command::new("prometheus")
                .arg(format!("--config.file={}", config_path.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.path.join("data").display()
                ))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("log"))
                .stderr(log),
            "prometheus",
        );
        let mut prometheus = Prometheus {
            child,
            url: format!("http://127.0.0.1:{port}"),
            dir,
        };
        let deadline = Instant::now() + *DEADLINE;
        while prometheus.status("/-/ready") != Some(200) {
            let exited = prometheus.child.try_wait().ok().flatten();
            assert!(
                exited.is_none() && Instant::now() < deadline,
                "prometheus did not become ready (exit {exited:?}); its log:\n{}",
                prometheus.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        prometheus
    }

    fn status(&self, path: &str) -> Option<u16> {
        Daemon::agent()
            .get(&format!("{}{path}", self.url))
            .call()
            .ok()
            .map(|r| r.status().as_u16())
    }

    /// An API call's `data`; panics unless Prometheus says "success".
    fn api(&self, path: &str, query: &[(&str, &str)]) -> Json {
        let mut request = Daemon::agent().get(&format!("{}{path}", self.url));
        for (key, value) in query {
            request = request.query(*key, *value);
        }
        let mut response = request.call().unwrap_or_else(|err| panic!("{path}: {err}"));
        let body = response
            .body_mut()
            .read_to_string()
            .unwrap_or_else(|err| panic!("{path}: {err}"));
        let json: Json =
            serde_json::from_str(&body).unwrap_or_else(|err| panic!("{path}: {err}: {body}"));
        assert_eq!(json["status"], "success", "{path}: {body}");
        json["data"].clone()
    }

    /// The instant vector of `expr`.
    fn query(&self, expr: &str) -> Vec<Json> {
        let data = self.api("/api/v1/query", &[("query", expr)]);
        data["result"].as_array().cloned().unwrap_or_default()
    }

    /// The alerts named `name` (pending or firing).
    fn alerts(&self, name: &str) -> (Vec<Json>, Json) {
        let data = self.api("/api/v1/alerts", &[]);
        let named = data["alerts"]
            .as_array()
            .expect("alerts")
            .iter()
            .filter(|a| a["labels"]["alertname"] == name)
            .cloned()
            .collect();
        (named, data)
    }

    /// The end of its log, for failure messages.
    fn log(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path.join("prometheus.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const STORM_ALERT: &str = "PortwatchEaddrinuseStorm";

#[test]
#[ignore = "needs root, BTF and cgroup2; run by `cargo xtask test`"]
fn prometheus_fires_the_storm_alert_on_a_real_eaddrinuse_storm() {
    let (cgroup, netns) = (CgroupGuard::new("alerts"), NetnsGuard::new("alerts"));
    // The daemon's defaults, as shipped (reconciliation every 30 s), with a
    // metrics listener served over TLS with basic auth, as a remote
    // Prometheus would scrape it: the alert must fire through that.
    let pki = Pki::new("alerts-pki");
    let web = pki.dir.file(
        "web.yml",
        format!(
            "tls_server_config:\n  cert_file: server.pem\n  key_file: server.key\nbasic_auth_users:\n  prometheus: {}\n",
            bcrypt_hash("scrape-secret")
        ),
    );
    let password_file = pki.dir.file("password", "scrape-secret\n");
    let metrics_port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let target = format!("127.0.0.1:{metrics_port}");
    let daemon = Daemon::start_with(
        &cgroup,
        &format!(
            "metrics_listen = \"{target}\"\nmetrics_web_config = \"{}\"\n",
            web.display()
        ),
        &[],
    );
    let target = target.as_str();
    let prometheus = Prometheus::start(
        target,
        &format!(
            "    scheme: https\n    tls_config:\n      ca_file: {}\n      server_name: localhost\n    basic_auth:\n      username: prometheus\n      password_file: {}\n",
            pki.ca_file.display(),
            password_file.display()
        ),
    );
    let shipped: BTreeMap<String, String> = alerts()
        .into_iter()
        .map(|r| {
            let url = r.annotations["runbook_url"].clone();
            (r.alert.expect("an alert"), url)
        })
        .collect();

    // Before the storm: Prometheus scrapes the daemon, has loaded every
    // shipped alert, evaluates each without error, and the recorded
    // EADDRINUSE rate exists (it needs two scrapes) and is below threshold.
    let rate = "instance_errno:portwatch_bind_failures:rate2m{errno=\"EADDRINUSE\"}";
    let quiet = until("a recorded EADDRINUSE rate", || {
        prometheus
            .query(rate)
            .into_iter()
            .next()
            .ok_or("no sample yet")
    });
    let value: f64 = quiet["value"][1]
        .as_str()
        .and_then(|v| v.parse().ok())
        .expect("a sample value");
    assert!(value < 1.0, "a storm before the storm: {quiet}");
    assert_eq!(quiet["metric"]["job"], "portwatch", "{quiet}");
    let loaded = until("every rule evaluated", || {
        let data = prometheus.api("/api/v1/rules", &[]);
        let rules: Vec<Json> = data["groups"]
            .as_array()
            .expect("groups")
            .iter()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        if rules.iter().all(|r| r["health"] != "unknown") {
            Ok(rules)
        } else {
            Err(data)
        }
    });
    for rule in &loaded {
        assert_eq!(rule["health"], "ok", "{rule}\n{}", prometheus.log());
    }
    let loaded_alerts: BTreeSet<&str> = loaded
        .iter()
        .filter(|r| r["type"] == "alerting")
        .filter_map(|r| r["name"].as_str())
        .collect();
    assert_eq!(
        loaded_alerts,
        shipped.keys().map(String::as_str).collect(),
        "prometheus loaded other alerts than alerts.yml has"
    );
    let (before, all) = prometheus.alerts(STORM_ALERT);
    assert!(before.is_empty(), "{STORM_ALERT} before the storm: {all}");

    // The storm: a listener on 127.0.0.1:8000 in the test's namespace, and a
    // second socket that binds the same address again and again, 10 binds
    // every half second (20/s, twenty times the threshold), from inside the
    // watched cgroup. At most BATCHES batches: 2,000 binds over 100 s.
    const ADDRESS: &str = "127.0.0.1:8000";
    const BATCH: usize = 10;
    const BATCHES: usize = 200;
    const PACE: Duration = Duration::from_millis(500);
    const LIMIT: Duration = Duration::from_secs(150);
    let before_storm = sample(&daemon.text("/metrics").1, EADDRINUSE_TCP4);
    let mut ops = vec![
        Op::tcp(false),
        Op::bind(0, ADDRESS),
        Op::listen(0),
        Op::tcp(false),
    ];
    for _ in 0..BATCHES {
        ops.push(Op::Pause);
        ops.extend(std::iter::repeat_n(Op::bind(1, ADDRESS), BATCH));
    }
    let mut worker = Worker::spawn(&cgroup.path, Some(&netns), &ops);
    let setup = worker.results(4);
    assert!(setup.iter().all(|r| *r >= 0), "listener setup: {setup:?}");

    let start = Instant::now();
    let mut batches = 0;
    let mut pending_after = None;
    let firing = loop {
        if batches < BATCHES && start.elapsed() < LIMIT {
            worker.resume();
            let results = worker.results(BATCH + 1);
            assert!(
                results[1..]
                    .iter()
                    .all(|r| *r == -i64::from(libc::EADDRINUSE)),
                "batch {batches}: {results:?}"
            );
            batches += 1;
        }
        let (alerts, all) = prometheus.alerts(STORM_ALERT);
        if let Some(firing) = alerts.iter().find(|a| a["state"] == "firing") {
            break firing.clone();
        }
        if pending_after.is_none() && !alerts.is_empty() {
            pending_after = Some(start.elapsed());
        }
        assert!(
            start.elapsed() < LIMIT,
            "{STORM_ALERT} did not fire within {LIMIT:?} ({} binds failed; pending after \
             {pending_after:?}); last /api/v1/alerts: {all}\nprometheus log:\n{}",
            batches * BATCH,
            prometheus.log()
        );
        // Keep the pace: the next batch is due PACE after this one.
        let next = PACE * u32::try_from(batches).expect("few batches");
        std::thread::sleep(
            next.saturating_sub(start.elapsed())
                .max(Duration::from_millis(100)),
        );
    };
    let elapsed = start.elapsed();
    drop(worker);

    assert_eq!(firing["labels"]["errno"], "EADDRINUSE", "{firing}");
    assert_eq!(firing["labels"]["job"], "portwatch", "{firing}");
    assert_eq!(firing["labels"]["instance"], target, "{firing}");
    assert_eq!(firing["labels"]["severity"], "warning", "{firing}");
    assert_eq!(
        firing["annotations"]["runbook_url"], shipped[STORM_ALERT],
        "{firing}"
    );
    let rate: f64 = firing["value"]
        .as_str()
        .and_then(|v| v.parse().ok())
        .expect("the alert's value");
    assert!(rate > 1.0, "fired at {rate}/s: {firing}");
    // `for: 1m`: not before a minute of storm.
    assert!(
        elapsed >= Duration::from_secs(60),
        "fired after {elapsed:?}"
    );
    // Prometheus scraped with the right password every time.
    let refused = sample(
        &daemon.text("/metrics").1,
        "portwatch_http_auth_failures_total{listener=\"metrics\"}",
    );
    assert_eq!(refused, 0.0, "the metrics listener refused Prometheus");
    // The daemon counted every failure the worker saw.
    let failed = (batches * BATCH) as f64;
    until("the daemon to count every failure", || {
        let counted = sample(&daemon.text("/metrics").1, EADDRINUSE_TCP4) - before_storm;
        assert!(counted <= failed, "counted {counted} of {failed}");
        if counted == failed {
            Ok(())
        } else {
            Err(format!("counted {counted} of {failed}"))
        }
    });
    eprintln!(
        "{STORM_ALERT} pending after {pending_after:?}, firing after {elapsed:?}, \
         {} failed binds",
        batches * BATCH
    );
}

const EXHAUSTING_ALERT: &str = "PortwatchEphemeralPortsExhausting";

#[test]
#[ignore = "needs root, BTF and cgroup2; run by `cargo xtask test`"]
fn prometheus_fires_the_exhaustion_alert_on_a_real_full_range() {
    // A namespace whose range has 10 ports, all held by connections to one
    // destination, read by the daemon every second.
    let cgroup = CgroupGuard::new("alerts-eph");
    let netns = NetnsGuard::new("alertse");
    netns.run_in(|| {
        std::fs::write("/proc/sys/net/ipv4/ip_local_port_range", "40000 40009")
            .expect("set the namespace's port range")
    });
    let daemon = Daemon::start_with(&cgroup, "ephemeral_interval = \"1s\"\n", &[]);
    let target = daemon.server.strip_prefix("http://").expect("an http URL");
    let prometheus = Prometheus::start(target, "");
    // The namespace is named by its /run/netns name.
    let label = netns.name.clone();
    let (before, all) = prometheus.alerts(EXHAUSTING_ALERT);
    assert!(
        before.is_empty(),
        "{EXHAUSTING_ALERT} before the range filled: {all}"
    );

    let mut ops = vec![
        Op::tcp(false),
        Op::bind(0, "127.0.0.1:8000"),
        Op::Listen {
            sock: 0,
            backlog: 64,
        },
    ];
    for sock in 1..=10 {
        ops.push(Op::tcp(false));
        ops.push(Op::Connect {
            sock,
            addr: "127.0.0.1:8000".parse().unwrap(),
        });
    }
    ops.push(Op::Pause);
    let mut worker = Worker::spawn(&cgroup.path, Some(&netns), &ops);
    let results = worker.results(ops.len() - 1);
    assert!(
        results.iter().all(|&r| r >= 0),
        "listener and 10 connects: {results:?}"
    );
    let start = Instant::now();

    // `for: 5m`, scraped and evaluated every second.
    const LIMIT: Duration = Duration::from_secs(420);
    let mut pending_after = None;
    let firing = loop {
        let (alerts, all) = prometheus.alerts(EXHAUSTING_ALERT);
        let ours: Vec<&Json> = alerts
            .iter()
            .filter(|a| a["labels"]["netns"] == label)
            .collect();
        if let Some(firing) = ours.iter().find(|a| a["state"] == "firing") {
            break (*firing).clone();
        }
        if pending_after.is_none() && !ours.is_empty() {
            pending_after = Some(start.elapsed());
        }
        assert!(
            start.elapsed() < LIMIT,
            "{EXHAUSTING_ALERT} did not fire for {label} within {LIMIT:?} (pending after \
             {pending_after:?}); last /api/v1/alerts: {all}\nprometheus log:\n{}",
            prometheus.log()
        );
        std::thread::sleep(Duration::from_secs(2));
    };
    let elapsed = start.elapsed();
    worker.resume();
    assert_eq!(firing["labels"]["job"], "portwatch", "{firing}");
    assert_eq!(firing["labels"]["severity"], "warning", "{firing}");
    let ratio: f64 = firing["value"]
        .as_str()
        .and_then(|v| v.parse().ok())
        .expect("the alert's value");
    assert_eq!(ratio, 1.0, "{firing}");
    assert!(
        elapsed >= Duration::from_secs(300),
        "fired after {elapsed:?}"
    );
    assert!(
        firing["annotations"]["runbook_url"]
            .as_str()
            .is_some_and(|url| url.ends_with("#portwatchephemeralportsexhausting")),
        "{firing}"
    );
    eprintln!("{EXHAUSTING_ALERT} pending after {pending_after:?}, firing after {elapsed:?}");
}
