//! A container host, for real: 200 network namespaces with a listener on
//! 8080 in each, watched by the `portwatch daemon` binary and read the way an
//! operator would, over HTTP and with `portwatch explain`. Separate
//! namespaces are separate port tables, so nothing is shared until a second
//! listener joins one namespace's table.

mod support;

use serde_json::Value;
use support::{CgroupGuard, NetnsGuard, Op, Worker, daemon::Daemon};

/// How many namespaces the host has.
const NAMESPACES: usize = 200;
/// The goal for the default `/ports/{port}` answer (issue 14).
const ANSWER_BYTES: usize = 64 * 1024;
/// The goal for the default `portwatch explain` (issue 14).
const EXPLAIN_LINES: usize = 40;

/// A worker in `netns` holding an SO_REUSEPORT listener on `0.0.0.0:8080`
/// until dropped.
fn listener(cgroup: &CgroupGuard, netns: &NetnsGuard) -> Worker {
    let mut worker = Worker::spawn(
        &cgroup.path,
        Some(netns),
        &[
            Op::tcp(false),
            Op::reuseport(0),
            Op::bind(0, "0.0.0.0:8080"),
            Op::listen(0),
            Op::Pause,
        ],
    );
    let results = worker.results(4);
    assert!(results.iter().all(|&r| r >= 0), "{results:?}");
    worker
}

fn namespaces_of(body: &Value) -> &[Value] {
    body["namespaces"].as_array().map_or(&[], Vec::as_slice)
}

#[test]
#[ignore = "needs root, BTF and cgroup2; run by `cargo xtask test`"]
fn two_hundred_namespaces_on_one_port_share_nothing_until_one_table_does() {
    let cgroup = CgroupGuard::new("netns200");
    let daemon = Daemon::start(&cgroup);
    let namespaces: Vec<NetnsGuard> = (0..NAMESPACES)
        .map(|i| NetnsGuard::new(&format!("n{i}")))
        .collect();
    let _workers: Vec<Worker> = namespaces
        .iter()
        .map(|netns| listener(&cgroup, netns))
        .collect();

    let body = daemon.json_until("/ports/8080", "a listener in every namespace", |body| {
        body["netns_count"] == NAMESPACES
    });
    let (_, text) = daemon.text("/ports/8080");
    assert!(
        text.len() <= ANSWER_BYTES,
        "{} bytes by default for {NAMESPACES} namespaces",
        text.len()
    );
    assert_eq!(body["shared"], false, "{body}");
    assert_eq!(body["sharing"], Value::Array(vec![]), "{body}");
    assert!(!text.contains("different_netns"));
    // Nothing is worth showing by itself: every namespace is counted.
    assert_eq!(body["namespaces_hidden"], NAMESPACES, "{body}");
    assert_eq!(body["summary"]["other"], NAMESPACES, "{body}");

    // Every namespace on request: 200 groups, one listener each, none shared.
    let all = daemon.json("/ports/8080?all=true");
    let groups = namespaces_of(&all);
    assert_eq!(groups.len(), NAMESPACES);
    assert!(
        groups.iter().all(|g| g["shared"] == false
            && g["listeners"].as_array().map(Vec::len) == Some(1)
            && g["sharing"] == Value::Array(vec![])),
        "{all}"
    );
    let mut cookies: Vec<u64> = groups.iter().filter_map(|g| g["netns"].as_u64()).collect();
    cookies.sort_unstable();
    let mut expected: Vec<u64> = namespaces.iter().map(NetnsGuard::cookie).collect();
    expected.sort_unstable();
    assert_eq!(cookies, expected, "one group per namespace, each its own");

    // A second listener joins one namespace's table with SO_REUSEPORT: that
    // namespace alone is shared, for that reason, and it is shown.
    let chosen = &namespaces[NAMESPACES / 2];
    let _second = listener(&cgroup, chosen);
    let body = daemon.json_until("/ports/8080", "the shared namespace", |body| {
        body["shared"] == true
    });
    let shown = namespaces_of(&body);
    assert_eq!(shown.len(), 1, "{body}");
    assert_eq!(shown[0]["netns"], chosen.cookie());
    assert_eq!(shown[0]["shared"], true);
    assert_eq!(shown[0]["sharing"][0]["kind"], "reuse_port_group", "{body}");
    assert_eq!(shown[0]["listeners"].as_array().map(Vec::len), Some(2));
    assert_eq!(body["namespaces_hidden"], NAMESPACES - 1);
    let metrics = daemon.text("/metrics").1;
    assert!(
        metrics.contains(&format!(
            "portwatch_port_namespaces{{port=\"8080\",protocol=\"tcp\"}} {NAMESPACES}"
        )),
        "{metrics}"
    );
    assert!(
        metrics.contains("\nportwatch_shared_ports 1\n"),
        "{metrics}"
    );

    // The operator's view: a summary, then the one namespace that matters.
    let explain = daemon.cli(&["explain", "8080"]);
    assert!(explain.status.success(), "{explain:?}");
    let said = String::from_utf8_lossy(&explain.stdout);
    // Shown with --nocapture: the README's example.
    eprintln!("$ portwatch explain 8080\n{said}");
    let lines: Vec<&str> = said.lines().collect();
    assert!(
        lines.len() <= EXPLAIN_LINES,
        "{} lines:\n{said}",
        lines.len()
    );
    assert!(
        lines[0].starts_with(&format!(
            "Port 8080 is used in {NAMESPACES} network namespaces: {NAMESPACES} with no known pod or container"
        )),
        "{said}"
    );
    assert!(said.contains("2 services listen on port 8080"), "{said}");
    assert!(said.contains("199 more namespaces not shown"), "{said}");
    let every = daemon.cli(&["explain", "8080", "--all"]);
    let every = String::from_utf8_lossy(&every.stdout);
    assert_eq!(every.matches("\nIn netns ").count(), NAMESPACES, "{every}");
    let one = daemon.cli(&["ports", "8080", "--netns", &chosen.cookie().to_string()]);
    let table = String::from_utf8_lossy(&one.stdout);
    assert!(table.starts_with("PROTO"), "{table}");
    assert_eq!(
        table.lines().count(),
        3,
        "a header and two listeners:\n{table}"
    );
}
