//! A container host, for real: 200 pods, each in its own network namespace
//! and its own pod cgroup with a listener on 8080, watched by the `portwatch
//! daemon` binary (pointed at a fake kubelet tree for the pods' names) and
//! read the way an operator would, over HTTP and with `portwatch explain`.
//! Separate namespaces are separate port tables, so nothing is shared until
//! a second listener joins one namespace's table.

mod support;

use serde_json::Value;
use support::{
    CgroupGuard, NetnsGuard, Op, Worker,
    daemon::Daemon,
    kubelet::{Cgroups, FakeNode, ids},
};

/// How many namespaces the host has.
const NAMESPACES: usize = 200;
/// The goal for the default `/ports/{port}` answer (issue 14).
const ANSWER_BYTES: usize = 64 * 1024;
/// The goal for the default `portwatch explain` (issue 14).
const EXPLAIN_LINES: usize = 40;

/// One pod: its network namespace, its container's cgroup, and the
/// kubelet's files naming it.
struct Pod {
    netns: NetnsGuard,
    cgroup: Cgroups,
    name: String,
    namespace: &'static str,
}

impl Pod {
    fn new(node: &FakeNode, cgroup: &CgroupGuard, i: usize) -> Pod {
        let (uid, id) = ids();
        let name = format!("app-{i}");
        // A third of the pods in `shop`, the rest in `web`.
        let namespace = if i.is_multiple_of(3) { "shop" } else { "web" };
        node.pod(namespace, &name, &uid, "app", &id);
        Pod {
            netns: NetnsGuard::new(&format!("n{i}")),
            cgroup: Cgroups::pod_container(&cgroup.path, &uid, &id),
            name,
            namespace,
        }
    }

    /// A worker of the pod listening on `0.0.0.0:8080`, with SO_REUSEPORT
    /// or without, until dropped; and its bind's result.
    fn listen(&self, reuse_port: bool) -> (Worker, i64) {
        let mut ops = vec![Op::tcp(false)];
        if reuse_port {
            ops.push(Op::reuseport(0));
        }
        ops.extend([Op::bind(0, "0.0.0.0:8080"), Op::listen(0), Op::Pause]);
        // Forked from a thread named like a web server's process, which
        // the worker's `comm` inherits.
        let mut worker = std::thread::scope(|scope| {
            std::thread::Builder::new()
                .name("python3".into())
                .spawn_scoped(scope, || {
                    Worker::spawn(&self.cgroup.leaf, Some(&self.netns), &ops)
                })
                .expect("a thread to fork from")
                .join()
                .expect("the fork")
        });
        let results = worker.results(ops.len() - 1);
        let bind = results[results.len() - 2];
        (worker, bind)
    }
}

fn namespaces_of(body: &Value) -> &[Value] {
    body["namespaces"].as_array().map_or(&[], Vec::as_slice)
}

#[test]
#[ignore = "needs root, BTF and cgroup2; run by `cargo xtask test`"]
fn two_hundred_namespaces_on_one_port_share_nothing_until_one_table_does() {
    let cgroup = CgroupGuard::new("netns200");
    let node = FakeNode::new();
    let daemon = Daemon::start_with(&cgroup, &node.config(), &[]);
    let pods: Vec<Pod> = (0..NAMESPACES)
        .map(|i| Pod::new(&node, &cgroup, i))
        .collect();
    let _workers: Vec<Worker> = pods
        .iter()
        .map(|pod| {
            let (worker, bind) = pod.listen(true);
            assert_eq!(bind, 0, "{}", pod.name);
            worker
        })
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
    assert_eq!(body["summary"]["pods"], NAMESPACES, "{body}");
    assert_eq!(
        body["summary"]["pod_namespaces"],
        serde_json::json!([{"name": "web", "namespaces": 133}, {"name": "shop", "namespaces": 67}])
    );

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
    let mut expected: Vec<u64> = pods.iter().map(|pod| pod.netns.cookie()).collect();
    expected.sort_unstable();
    assert_eq!(cookies, expected, "one group per namespace, each its own");

    // A second listener joins one namespace's table with SO_REUSEPORT: that
    // namespace alone is shared, for that reason, and it is shown.
    let chosen = &pods[NAMESPACES / 2];
    let (_second, bind) = chosen.listen(true);
    assert_eq!(bind, 0);
    // And in another pod, a bind without it fails: that namespace is shown
    // for its failure.
    let failing = &pods[7];
    let (refused, bind) = failing.listen(false);
    assert_eq!(bind, -i64::from(libc::EADDRINUSE));
    let body = daemon.json_until(
        "/ports/8080",
        "the shared and the failed namespace",
        |body| body["shared"] == true && namespaces_of(body).len() == 2,
    );
    let shown = namespaces_of(&body);
    let failed = shown
        .iter()
        .find(|n| n["netns"] == failing.netns.cookie())
        .expect("the failed pod");
    assert_eq!(failed["shared"], false, "{body}");
    assert_eq!(failed["recent_failures"], 1, "{body}");
    assert_eq!(failed["pod"], failing.name.as_str());
    let shown: Vec<&Value> = shown.iter().filter(|n| n["shared"] == true).collect();
    assert_eq!(shown.len(), 1, "{body}");
    assert_eq!(shown[0]["netns"], chosen.netns.cookie());
    assert_eq!(shown[0]["pod"], chosen.name.as_str());
    assert_eq!(shown[0]["pod_namespace"], chosen.namespace);
    assert_eq!(shown[0]["container_name"], "app");
    assert_eq!(shown[0]["shared"], true);
    assert_eq!(shown[0]["sharing"][0]["kind"], "reuse_port_group", "{body}");
    assert_eq!(shown[0]["listeners"].as_array().map(Vec::len), Some(2));
    assert_eq!(body["namespaces_hidden"], NAMESPACES - 2);
    let failure = &body["recent_failures"][0];
    assert_eq!(failure["pod"], failing.name.as_str(), "{body}");
    assert_eq!(
        failure["blocked_by"][0]["holders"][0]["pod"],
        failing.name.as_str(),
        "{body}"
    );
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
            "Port 8080 is used in {NAMESPACES} network namespaces: {NAMESPACES} pods (by Kubernetes namespace: web 133, shop 67)"
        )),
        "{said}"
    );
    assert!(said.contains("2 services listen on port 8080"), "{said}");
    assert!(said.contains("held by python3 in 200."), "{said}");
    assert!(said.contains("1 recent failure here (below)."), "{said}");
    assert!(said.contains("198 more namespaces not shown"), "{said}");
    assert!(
        said.contains(&format!(
            "(pid {}, pod web/app-7 (container app)) could not bind tcp 0.0.0.0:8080: EADDRINUSE",
            refused.pid
        )),
        "{said}"
    );
    let every = daemon.cli(&["explain", "8080", "--all"]);
    let every = String::from_utf8_lossy(&every.stdout);
    assert_eq!(every.matches("\nIn pod ").count(), NAMESPACES, "{every}");
    let pod = format!("{}/{}", chosen.namespace, chosen.name);
    for scope in [
        ["--netns".to_owned(), chosen.netns.cookie().to_string()],
        ["--pod".to_owned(), pod.clone()],
    ] {
        let one = daemon.cli(&["ports", "8080", &scope[0], &scope[1]]);
        let table = String::from_utf8_lossy(&one.stdout);
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].starts_with("PROTO"), "{table}");
        assert_eq!(lines.len(), 3, "a header and two listeners:\n{table}");
        assert!(lines[1..].iter().all(|l| l.contains(&pod)), "{table}");
    }
}
