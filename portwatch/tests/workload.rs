//! End-to-end: owners carry their workload's names. A fake kubelet (and
//! Docker) file tree in a temporary directory, the daemon pointed at it, and
//! listeners in cgroups named the way the kubelet's systemd driver and
//! containerd name them, under a private test cgroup. The names must reach
//! `GET /ports/{port}` whether the listener predates the daemon (the
//! start-up snapshot) or follows it (events), and `GET /failures` for a
//! failed bind and its blocker.

mod support;

use serde_json::Value;
use support::{
    CgroupGuard, Op, Worker,
    daemon::Daemon,
    kubelet::{Cgroups, FakeNode, ids},
    serial, until,
};

/// `EADDRINUSE` as a worker reports it.
const EADDRINUSE: i64 = -(libc::EADDRINUSE as i64);

/// The listener of process `pid` on `port`, from the top-level `listeners`
/// of `GET /ports/{port}`, once `done` holds for it.
fn listener_until(
    daemon: &Daemon,
    port: u16,
    pid: u32,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    until(what, || {
        let (status, body) = daemon.text(&format!("/ports/{port}"));
        if status != 200 {
            return Err(format!("{status}: {body}"));
        }
        let detail: Value = serde_json::from_str(&body).expect("JSON");
        let found = detail["listeners"].as_array().and_then(|listeners| {
            listeners
                .iter()
                .find(|l| {
                    l["pids"]
                        .as_array()
                        .is_some_and(|pids| pids.contains(&pid.into()))
                })
                .cloned()
        });
        match found {
            Some(listener) if done(&listener) => Ok(listener),
            _ => Err(body),
        }
    })
}

/// Every workload field of `value` (a listener, failure or holder).
fn workload(value: &Value) -> [&Value; 5] {
    [
        &value["container"],
        &value["container_name"],
        &value["pod"],
        &value["pod_namespace"],
        &value["pod_uid"],
    ]
}

#[test]
#[ignore = "needs root, BTF and cgroup2; run by `cargo xtask test`"]
fn listeners_from_before_the_start_are_named_by_the_snapshot() {
    let _serial = serial();
    let cgroup = CgroupGuard::new("workload-snapshot");
    let node = FakeNode::new();
    let (uid, id) = ids();
    node.pod("shop", "web-0", &uid, "app", &id);
    let pod = Cgroups::pod_container(&cgroup.path, &uid, &id);
    // A Docker container beside it, named by its config.v2.json.
    let (_, docker_id) = ids();
    node.docker(&docker_id, "portwatch-db");
    let docker = Cgroups::new(
        &cgroup.path,
        &format!("system.slice/docker-{docker_id}.scope"),
    );
    let (in_pod, pod_port) = Worker::loopback_listener(&pod.leaf);
    let (in_docker, docker_port) = Worker::loopback_listener(&docker.leaf);

    let daemon = Daemon::start_with(&cgroup, &node.config(), &[]);
    let seen = listener_until(&daemon, pod_port, in_pod.pid, "the pod's listener", |l| {
        !l["pod"].is_null()
    });
    assert_eq!(
        workload(&seen),
        [
            &Value::from(id.as_str()),
            &"app".into(),
            &"web-0".into(),
            &"shop".into(),
            &Value::from(uid.as_str()),
        ],
        "{seen}"
    );
    assert_eq!(seen["since_exact"], false, "found by the snapshot: {seen}");
    let seen = listener_until(
        &daemon,
        docker_port,
        in_docker.pid,
        "the Docker container's listener",
        |l| !l["container_name"].is_null(),
    );
    assert_eq!(
        workload(&seen),
        [
            &Value::from(docker_id.as_str()),
            &"portwatch-db".into(),
            &Value::Null,
            &Value::Null,
            &Value::Null,
        ],
        "{seen}"
    );
    drop((in_pod, in_docker));
}

#[test]
#[ignore = "needs root, BTF and cgroup2; run by `cargo xtask test`"]
fn a_listener_after_the_start_and_a_bind_it_blocks_are_named_by_events() {
    let _serial = serial();
    let cgroup = CgroupGuard::new("workload-events");
    let node = FakeNode::new();
    let (uid, id) = ids();
    node.pod("payments", "api-7d9c5-x2x9q", &uid, "server", &id);
    let pod = Cgroups::pod_container(&cgroup.path, &uid, &id);
    let daemon = Daemon::start_with(&cgroup, &node.config(), &[]);

    let (holder, port) = Worker::loopback_listener(&pod.leaf);
    let expected = [
        &Value::from(id.as_str()),
        &"server".into(),
        &"api-7d9c5-x2x9q".into(),
        &"payments".into(),
        &Value::from(uid.as_str()),
    ];
    let seen = listener_until(&daemon, port, holder.pid, "the pod's listener", |l| {
        !l["pod"].is_null()
    });
    assert_eq!(workload(&seen), expected, "{seen}");
    assert_eq!(seen["since_exact"], true, "seen by events: {seen}");

    // A second process of the same container binds the same address.
    let mut failing = Worker::spawn(
        &pod.leaf,
        None,
        &[
            Op::tcp(false),
            Op::bind(0, &format!("127.0.0.1:{port}")),
            Op::Pause,
        ],
    );
    let results = failing.results(2);
    assert!(results[0] >= 0 && results[1] == EADDRINUSE, "{results:?}");
    let failures = daemon.json_until(
        &format!("/failures?port={port}"),
        "the failed bind with its blocker's holders",
        |v| {
            v["failures"].as_array().is_some_and(|failures| {
                failures
                    .iter()
                    .any(|f| f["pid"] == failing.pid && !f["blocked_by"][0]["holders"][0].is_null())
            })
        },
    );
    let failure = failures["failures"]
        .as_array()
        .and_then(|failures| failures.iter().find(|f| f["pid"] == failing.pid))
        .expect("the failure");
    assert_eq!(failure["errno"], "EADDRINUSE", "{failure}");
    assert_eq!(
        workload(failure),
        expected,
        "the failing process: {failure}"
    );
    let blocker = &failure["blocked_by"][0]["holders"][0];
    assert_eq!(blocker["pid"], holder.pid, "{failure}");
    assert_eq!(
        workload(blocker),
        expected,
        "the blocker's holder: {failure}"
    );
    drop((holder, failing));
}

#[test]
#[ignore = "needs root, BTF and cgroup2; run by `cargo xtask test`"]
fn a_pod_without_a_log_directory_has_only_its_uid() {
    let _serial = serial();
    let cgroup = CgroupGuard::new("workload-nologs");
    let node = FakeNode::new();
    // Another pod's files are there; this pod's are not.
    let (other_uid, other_id) = ids();
    node.pod("shop", "web-0", &other_uid, "app", &other_id);
    let (uid, id) = ids();
    let pod = Cgroups::pod_container(&cgroup.path, &uid, &id);
    let daemon = Daemon::start_with(&cgroup, &node.config(), &[]);

    let (worker, port) = Worker::loopback_listener(&pod.leaf);
    let seen = listener_until(&daemon, port, worker.pid, "the pod's listener", |l| {
        !l["pod_uid"].is_null()
    });
    assert_eq!(
        workload(&seen),
        [
            &Value::from(id.as_str()),
            &Value::Null,
            &Value::Null,
            &Value::Null,
            &Value::from(uid.as_str()),
        ],
        "{seen}"
    );
    drop(worker);
}
