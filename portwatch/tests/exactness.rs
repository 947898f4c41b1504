//! Root tests for exactness under workloads the other suites do not make:
//! MPTCP, io_uring binds next to other binds on the same thread, AF_UNIX and
//! netlink binds, UDP-Lite, and sockets that go away where no watched hook
//! sees them. Each replays one way portwatch once reported something that
//! did not happen, or missed something that did.
//!
//! They need root, BTF and cgroup2, so they are `#[ignore]`d with that reason
//! and `cargo xtask test` (and `cargo xtask vm`) runs them.

mod support;

use std::{net::TcpListener, os::fd::AsRawFd as _, process::Command};

use serde_json::Value;
use support::{
    CgroupGuard, NetnsGuard, Op, OtherAddr, TempDir, Tracer, Worker,
    daemon::{Daemon, sample},
    deny::DenyPort,
};

const EADDRINUSE: i64 = -(libc::EADDRINUSE as i64);

fn is(event: &Value, kind: &str, pid: u32) -> bool {
    event["kind"] == kind && event["pid"] == pid
}

/// The one record in `events` that `pick` picks.
fn only<'a>(events: &'a [Value], what: &str, pick: impl Fn(&Value) -> bool) -> &'a Value {
    let found: Vec<&Value> = events.iter().filter(|e| pick(e)).collect();
    assert_eq!(found.len(), 1, "one record of {what}: {events:?}");
    found[0]
}

/// A failed bind that kept its own errno (fexit saw its return) or says it
/// is unknown (no outcome hook ran for it), never the result of
/// `other_call`, the thread's next bind.
fn assert_own_failure(record: &Value, errno: &str, other_call: &str) {
    assert_eq!(record["kind"], "bind_failed", "{record}");
    match record["source"].as_str() {
        Some("fexit") => assert_eq!(record["errno"], errno, "{record}"),
        Some("unresolved") => assert_eq!(record["errno"], "UNKNOWN", "{record}"),
        other => panic!("{other_call}'s exit completed it ({other:?}): {record}"),
    }
}

/// Whether the kernel refused an io_uring bind as an unknown opcode (before
/// Linux 6.11); the test then says so and counts as skipped.
fn uring_bind_unsupported(test: &str, result: i64) -> bool {
    let unsupported = result == -(libc::EINVAL as i64) || result == -(libc::EOPNOTSUPP as i64);
    if unsupported {
        support::skip(
            test,
            &format!("io_uring bind (IORING_OP_BIND, Linux 6.11+): this kernel answers {result}"),
        );
    }
    unsupported
}

/// An io_uring bind that fails leaves its attempt parked, since it passes
/// no syscall exit. The thread's next bind(2) is a netlink one, as
/// getaddrinfo makes, and returns 0: that 0 is not the io_uring bind's
/// outcome, which must never be reported as a success.
#[test]
#[ignore = "needs root, BTF and cgroup2; run by `cargo xtask test`"]
fn a_failed_io_uring_bind_is_not_completed_by_a_netlink_bind() {
    let cgroup = CgroupGuard::new("urnl");
    let netns = NetnsGuard::new("urnl");
    let tracer = Tracer::start(&cgroup.path, &[]);
    let mut worker = Worker::spawn(
        &cgroup.path,
        Some(&netns),
        &[
            Op::tcp(false),
            Op::bind(0, "127.0.0.1:8000"),
            Op::tcp(false),
            Op::UringBind {
                sock: 1,
                addr: "127.0.0.1:8000".parse().unwrap(),
            },
            Op::SocketOf {
                family: libc::AF_NETLINK,
                kind: libc::SOCK_RAW,
                protocol: libc::NETLINK_ROUTE,
            },
            Op::BindOther {
                sock: 2,
                addr: OtherAddr::Netlink,
            },
            Op::tcp(false),
            Op::bind(3, "127.0.0.1:8001"),
        ],
    );
    let results = worker.results(8);
    if uring_bind_unsupported(
        "a_failed_io_uring_bind_is_not_completed_by_a_netlink_bind",
        results[3],
    ) {
        return;
    }
    assert_eq!(
        (results[1], results[3], results[5], results[7]),
        (0, EADDRINUSE, 0, 0),
        "{results:?}"
    );
    let first = tracer.expect("the plain bind", |e| {
        is(e, "bind", worker.pid) && e["port"] == 8000
    });
    let (before, _) = tracer.expect_after("the bind after it", |e| {
        is(e, "bind", worker.pid) && e["port"] == 8001
    });
    let uring = only(&before, "the io_uring bind", |e| {
        e["pid"] == worker.pid && e["port"] == 8000 && e["cookie"] != first["cookie"]
    });
    assert_own_failure(uring, "EADDRINUSE", "the netlink bind");
    worker.wait();
}

/// The daemon's view of failures no outcome hook completed: an io_uring
/// bind that fails on a listener's port, with no syscall exit to give its
/// errno on the tracepoint path, is reported with the errno the conflict
/// rules infer (EADDRINUSE, `errno_source: "inferred"`) and the listener
/// that blocked it; where fexit saw it return, with the kernel's. Binds whose
/// errno the kernel reported are replayed too, and the replay's agreement
/// is counted: an EADDRINUSE and an EINVAL (a second bind of a bound
/// socket) agree. With `outcome = "exact"`, so that an outcome hook runs
/// on every kernel.
#[test]
#[ignore = "needs root, BTF and cgroup2; run by `cargo xtask test`"]
fn a_failure_no_outcome_hook_saw_gets_the_errno_the_rules_infer() {
    let cgroup = CgroupGuard::new("infer");
    let netns = NetnsGuard::new("infer");
    let config = "reconcile_interval = \"1h\"\noutcome = \"exact\"\n";
    let daemon = Daemon::start_with(&cgroup, config, &[]);
    let mut worker = Worker::spawn(
        &cgroup.path,
        Some(&netns),
        &[
            Op::tcp(false),
            Op::bind(0, "127.0.0.1:8000"),
            Op::listen(0),
            Op::tcp(false),
            Op::UringBind {
                sock: 1,
                addr: "127.0.0.1:8000".parse().unwrap(),
            },
            // bind(2) next: on the tracepoint path its entry sends the
            // io_uring attempt on, unresolved.
            Op::bind(1, "127.0.0.1:8001"),
            Op::bind(0, "127.0.0.1:8002"),
            Op::tcp(false),
            Op::bind(2, "127.0.0.1:8000"),
            Op::Pause,
        ],
    );
    let results = worker.results(9);
    if uring_bind_unsupported(
        "a_failure_no_outcome_hook_saw_gets_the_errno_the_rules_infer",
        results[4],
    ) {
        return;
    }
    let einval = -(libc::EINVAL as i64);
    assert_eq!(
        (results[4], results[5], results[6], results[8]),
        (EADDRINUSE, 0, einval, EADDRINUSE),
        "{results:?}"
    );
    let failures = daemon.json_until("/failures?port=8000", "both failures on 8000", |v| {
        v["failures"]
            .as_array()
            .is_some_and(|f| f.iter().filter(|x| x["pid"] == worker.pid).count() == 2)
    });
    let mine: Vec<&Value> = failures["failures"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["pid"] == worker.pid)
        .collect();
    let sources: Vec<&str> = mine
        .iter()
        .map(|f| f["errno_source"].as_str().unwrap_or("null"))
        .collect();
    for failure in &mine {
        assert_eq!(failure["errno"], "EADDRINUSE", "{failure}");
        let blocker = &failure["blocked_by"][0];
        assert_eq!(blocker["endpoint"], "127.0.0.1:8000", "{failure}");
        assert_eq!(blocker["what"], "listener", "{failure}");
    }
    // The plain bind's errno is the kernel's; the io_uring one's is the
    // kernel's only where fexit saw it return.
    let attached = r#"portwatch_program_attached{hook="bind_outcome",path="fexit"}"#;
    let fexit = sample(&daemon.text("/metrics").1, attached) == 1.0;
    let uring_source = if fexit { "kernel" } else { "inferred" };
    let mut want = vec!["kernel", uring_source];
    want.sort_unstable();
    let mut got = sources.clone();
    got.sort_unstable();
    assert_eq!(got, want, "{mine:?}");
    let again = daemon.json_until("/failures?port=8002", "the second bind", |v| {
        v["failures"]
            .as_array()
            .is_some_and(|f| f.iter().any(|x| x["pid"] == worker.pid))
    });
    let again = &again["failures"][0];
    assert_eq!(
        (again["errno"].as_str(), again["errno_source"].as_str()),
        (Some("EINVAL"), Some("kernel")),
        "{again}"
    );
    let checks =
        |result: &str| format!("portwatch_errno_inference_checks_total{{result=\"{result}\"}}");
    let agreeing = if fexit { 3.0 } else { 2.0 };
    let metrics = daemon.metrics_until("the replays counted", |m| {
        sample(m, &checks("agree")) >= agreeing
    });
    assert_eq!(sample(&metrics, &checks("agree")), agreeing, "{metrics}");
    assert_eq!(sample(&metrics, &checks("disagree")), 0.0, "{metrics}");
    assert_eq!(sample(&metrics, &checks("undecided")), 0.0, "{metrics}");
    worker.resume();
    worker.wait();
}

/// `outcome = "inferred"`: no outcome hook and no syscall tracepoint. The
/// daemon still reports what the exit hooks would have: a failed listen
/// (two SO_REUSEADDR sockets bound, one listens, the other's listen falls
/// back to CLOSE at once), a failed bind sent when its thread closes a
/// socket, and one whose thread then only waits, which the sweep takes;
/// an IP_BIND_ADDRESS_NO_PORT bind to port 0, which no post_bind reports,
/// is no failure.
/// Each has the errno the rules infer (EADDRINUSE, `errno_source:
/// "inferred"`) and the listener that blocked it.
#[test]
#[ignore = "needs root, BTF and cgroup2; run by `cargo xtask test`"]
fn inferred_outcomes_report_what_the_exit_hooks_would() {
    let cgroup = CgroupGuard::new("inferred");
    let netns = NetnsGuard::new("inferred");
    let daemon = Daemon::start_with(&cgroup, "outcome = \"inferred\"\n", &[]);
    let mut ops = Op::listen_conflict("127.0.0.1:8000").to_vec();
    ops.extend([
        Op::tcp(false),
        Op::bind(2, "127.0.0.1:8000"),
        Op::Close { sock: 2 },
        // IP_BIND_ADDRESS_NO_PORT, port 0: the address only, no post_bind,
        // yet a success.
        Op::tcp(false),
        Op::SetOpt {
            sock: 3,
            level: libc::IPPROTO_IP,
            name: libc::IP_BIND_ADDRESS_NO_PORT,
            value: 1,
        },
        Op::bind(3, "127.0.0.1:0"),
        Op::Close { sock: 3 },
        Op::tcp(false),
        Op::bind(4, "127.0.0.1:8000"),
        Op::Pause,
    ]);
    let mut worker = Worker::spawn(&cgroup.path, Some(&netns), &ops);
    let results = worker.results(ops.len() - 1);
    assert_eq!(
        (
            results[5],
            results[6],
            results[7],
            results[9],
            results[13],
            results[16]
        ),
        (0, 0, EADDRINUSE, EADDRINUSE, 0, EADDRINUSE),
        "{results:?}"
    );
    let metrics = daemon.text("/metrics").1;
    let attached = r#"portwatch_program_attached{hook="bind_outcome",path="inferred"}"#;
    assert_eq!(sample(&metrics, attached), 1.0, "{metrics}");
    // The sweep takes the last one within seconds of its thread's pause.
    let failures = daemon.json_until("/failures?port=8000", "three failures on 8000", |v| {
        v["failures"]
            .as_array()
            .is_some_and(|f| f.iter().filter(|x| x["pid"] == worker.pid).count() == 3)
    });
    let mut kinds = Vec::new();
    for failure in failures["failures"].as_array().unwrap() {
        if failure["pid"] != worker.pid {
            continue;
        }
        kinds.push(failure["kind"].as_str().unwrap_or_default().to_owned());
        assert_eq!(failure["errno"], "EADDRINUSE", "{failure}");
        assert_eq!(failure["errno_source"], "inferred", "{failure}");
        // The listener blocks each; a failed bind is also blocked by the
        // SO_REUSEADDR socket whose listen failed (bound, not listening),
        // named first or second as the listings order them.
        let blockers = failure["blocked_by"].as_array().unwrap();
        assert!(
            blockers.iter().any(|b| b["what"] == "listener"),
            "{failure}"
        );
        for blocker in blockers {
            assert_eq!(blocker["endpoint"], "127.0.0.1:8000", "{failure}");
            assert_eq!(blocker["holders"][0]["pid"], worker.pid, "{failure}");
        }
    }
    kinds.sort();
    assert_eq!(kinds, ["bind_failed", "bind_failed", "listen_failed"]);
    // The address-only bind, sent before the swept one, is no failure.
    let all = daemon.json("/failures");
    let mine = all["failures"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["pid"] == worker.pid)
        .count();
    assert_eq!(mine, 3, "{all}");
    // One listener: the socket whose listen failed is bound, not listening.
    let listeners = daemon.listeners(netns.cookie());
    assert_eq!(listeners.len(), 1, "{listeners:?}");
    worker.resume();
    worker.wait();
}

/// `outcome = "inferred"`, and binds the kernel refuses at its first
/// checks, before it looks at the port's holders, though a listener on
/// 0.0.0.0:80 conflicts with each (so the conflict rules alone would say
/// EADDRINUSE): an address the namespace lacks (EADDRNOTAVAIL), and port
/// 80 asked for by a thread without CAP_NET_BIND_SERVICE (EACCES; on an
/// address the namespace lacks, still EADDRNOTAVAIL, checked first). The
/// daemon infers both from what its listing read in the namespace (the
/// addresses, `ip_unprivileged_port_start`) and the thread's capabilities.
/// Where those checks pass (a root thread on 127.0.0.1, an IP_FREEBIND
/// socket on the absent address), the conflict's EADDRINUSE stays.
#[test]
#[ignore = "needs root, BTF and cgroup2; run by `cargo xtask test`"]
fn the_address_and_privilege_checks_are_inferred_before_the_port_holders() {
    let cgroup = CgroupGuard::new("early-checks");
    let netns = NetnsGuard::new("early-checks");
    let daemon = Daemon::start_with(
        &cgroup,
        "outcome = \"inferred\"\nephemeral_interval = \"1s\"\n",
        &[],
    );
    // The namespace's addresses and sysctls are read by the ephemeral
    // listing.
    let path = format!("/ephemeral?netns={}", netns.cookie());
    daemon.json_until(&path, "the namespace listed", |body| {
        body["namespaces"]
            .as_array()
            .is_some_and(|all| all.len() == 1)
    });
    const ABSENT: &str = "192.0.2.1";
    // Each failed bind is sent on by its thread's next bind.
    let mut holder = Worker::spawn(
        &cgroup.path,
        Some(&netns),
        &[
            Op::tcp(false),
            Op::bind(0, "0.0.0.0:80"),
            Op::listen(0),
            Op::tcp(false),
            Op::bind(1, "127.0.0.1:80"),
            Op::bind(1, &format!("{ABSENT}:80")),
            Op::tcp(false),
            Op::SetOpt {
                sock: 2,
                level: libc::IPPROTO_IP,
                name: libc::IP_FREEBIND,
                value: 1,
            },
            Op::bind(2, &format!("{ABSENT}:80")),
            Op::bind(1, "127.0.0.1:0"),
            Op::Pause,
        ],
    );
    let held = holder.results(10);
    let eaddrnotavail = -(libc::EADDRNOTAVAIL as i64);
    assert_eq!(
        (held[1], held[2], held[4], held[5], held[8], held[9]),
        (0, 0, EADDRINUSE, eaddrnotavail, EADDRINUSE, 0),
        "{held:?}"
    );
    let mut worker = Worker::spawn(
        &cgroup.path,
        Some(&netns),
        &[
            Op::DropNetBindService,
            Op::tcp(false),
            Op::bind(0, "127.0.0.1:80"),
            Op::bind(0, &format!("{ABSENT}:80")),
            Op::bind(0, "127.0.0.1:0"),
            Op::Pause,
        ],
    );
    let results = worker.results(5);
    assert_eq!(results[0], 0, "capset");
    assert_eq!(
        (results[2], results[3], results[4]),
        (-(libc::EACCES as i64), eaddrnotavail, 0),
        "{results:?}"
    );
    let failures = daemon.json_until("/failures?port=80", "five failures on 80", |v| {
        v["failures"].as_array().is_some_and(|f| {
            f.iter()
                .filter(|x| x["pid"] == holder.pid || x["pid"] == worker.pid)
                .count()
                == 5
        })
    });
    let mut got: Vec<(String, String, String)> = Vec::new();
    for failure in failures["failures"].as_array().unwrap() {
        let who = if failure["pid"] == worker.pid {
            "without the capability"
        } else if failure["pid"] == holder.pid {
            "root"
        } else {
            continue;
        };
        assert_eq!(failure["errno_source"], "inferred", "{failure}");
        got.push((
            who.to_owned(),
            failure["address"].as_str().unwrap_or_default().to_owned(),
            failure["errno"].as_str().unwrap_or_default().to_owned(),
        ));
    }
    got.sort();
    let want = |who: &str, address: &str, errno: &str| {
        (who.to_owned(), address.to_owned(), errno.to_owned())
    };
    assert_eq!(
        got,
        [
            want("root", "127.0.0.1", "EADDRINUSE"),
            // The IP_FREEBIND socket's, then the plain one's.
            want("root", ABSENT, "EADDRINUSE"),
            want("root", ABSENT, "EADDRNOTAVAIL"),
            want("without the capability", "127.0.0.1", "EACCES"),
            want("without the capability", ABSENT, "EADDRNOTAVAIL"),
        ]
    );
    worker.resume();
    worker.wait();
    holder.resume();
    holder.wait();
}

/// An AF_UNIX bind that fails with EADDRINUSE (its path exists) after an
/// io_uring inet bind that failed for another reason: the inet failure keeps
/// its own errno (or says it is unknown), never the AF_UNIX one.
#[test]
#[ignore = "needs root, BTF and cgroup2; run by `cargo xtask test`"]
fn an_af_unix_bind_failure_is_not_an_inet_failure() {
    let cgroup = CgroupGuard::new("unix");
    let netns = NetnsGuard::new("unix");
    let dir = TempDir::new("unix");
    let path = dir.path.join("taken.sock");
    let tracer = Tracer::start(&cgroup.path, &[]);
    let unix = || Op::SocketOf {
        family: libc::AF_UNIX,
        kind: libc::SOCK_STREAM,
        protocol: 0,
    };
    let mut worker = Worker::spawn(
        &cgroup.path,
        Some(&netns),
        &[
            unix(),
            Op::BindOther {
                sock: 0,
                addr: OtherAddr::Unix(path.clone()),
            },
            Op::tcp(false),
            // Not an address of this namespace: EADDRNOTAVAIL.
            Op::UringBind {
                sock: 1,
                addr: "192.0.2.1:8000".parse().unwrap(),
            },
            unix(),
            Op::BindOther {
                sock: 2,
                addr: OtherAddr::Unix(path.clone()),
            },
            Op::tcp(false),
            Op::bind(3, "127.0.0.1:8001"),
        ],
    );
    let results = worker.results(8);
    if uring_bind_unsupported("an_af_unix_bind_failure_is_not_an_inet_failure", results[3]) {
        return;
    }
    assert_eq!(
        (results[1], results[3], results[5], results[7]),
        (0, -(libc::EADDRNOTAVAIL as i64), EADDRINUSE, 0),
        "{results:?}"
    );
    let (before, _) = tracer.expect_after("the bind after it", |e| {
        is(e, "bind", worker.pid) && e["port"] == 8001
    });
    let failed = only(&before, "the io_uring bind", |e| {
        e["pid"] == worker.pid && e["port"] == 8000
    });
    assert_eq!(failed["address"], "192.0.2.1", "{failed}");
    assert_own_failure(failed, "EADDRNOTAVAIL", "the AF_UNIX bind");
    worker.wait();
}

/// Another tool's cgroup program refuses binds to one port after the
/// kernel reserved it (post_bind4, in the test's own child cgroup, beside
/// portwatch's): the bind fails with EPERM, and portwatch reports that
/// failure, never a success and a socket that does not exist.
#[test]
#[ignore = "needs root, BTF and cgroup2; run by `cargo xtask test`"]
fn a_bind_another_program_refuses_is_a_failure() {
    let cgroup = CgroupGuard::new("deny");
    let netns = NetnsGuard::new("deny");
    let tracer = Tracer::start(&cgroup.path, &[]);
    let _deny = DenyPort::attach(&cgroup.path, 8000);
    let mut worker = Worker::spawn(
        &cgroup.path,
        Some(&netns),
        &[
            Op::tcp(false),
            Op::bind(0, "127.0.0.1:8000"),
            Op::tcp(false),
            Op::bind(1, "127.0.0.1:8001"),
        ],
    );
    let results = worker.results(4);
    assert_eq!(
        (results[1], results[3]),
        (-(libc::EPERM as i64), 0),
        "{results:?}"
    );
    let (before, _) = tracer.expect_after("the bind it allows", |e| {
        is(e, "bind", worker.pid) && e["port"] == 8001
    });
    let refused = only(&before, "the refused bind", |e| {
        e["pid"] == worker.pid && e["port"] == 8000
    });
    assert_eq!(refused["kind"], "bind_failed", "{refused}");
    assert_eq!(refused["errno"], "EPERM", "{refused}");
    worker.wait();
}

/// A TCP socket bound to 127.0.0.1 by this test's own process (outside
/// every test cgroup): its fd, and its port.
fn bound_outside() -> (std::os::fd::OwnedFd, u16) {
    let socket = made_outside();
    let (addr, len) = portwatch::socket::sockaddr("127.0.0.1".parse().unwrap(), 0);
    // SAFETY: bind(2) on a descriptor we own, with a sockaddr of `len` bytes.
    let bound = unsafe { libc::bind(socket.as_raw_fd(), (&raw const addr).cast(), len) };
    assert_eq!(bound, 0, "bind");
    let listener = TcpListener::from(socket);
    let port = listener.local_addr().expect("local address").port();
    (listener.into(), port)
}

/// No record in `events` names `port` (a socket the watched cgroup does not own).
fn assert_nothing_on(events: &[Value], port: impl Into<i64>, what: &str) {
    let port: i64 = port.into();
    let named: Vec<&Value> = events
        .iter()
        .filter(|e| e["port"] == port || e["bound_port"] == port)
        .collect();
    assert!(named.is_empty(), "nothing of {what}: {named:?}");
}

/// A TCP socket made by this process, outside the watched cgroup.
fn made_outside() -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd;
    // SAFETY: socket(2); the new descriptor is ours.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
    assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh descriptor nobody else owns.
    unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }
}

/// Takes descriptor `fd` of process `pid` (pidfd_getfd), as a TCP socket.
fn take_fd(pid: u32, fd: i32) -> TcpListener {
    use std::os::fd::FromRawFd;
    // SAFETY: pidfd_open and pidfd_getfd on our own child; the new
    // descriptor is ours.
    unsafe {
        let pidfd = libc::syscall(libc::SYS_pidfd_open, pid, 0) as i32;
        assert!(pidfd >= 0, "pidfd_open");
        let pidfd = std::os::fd::OwnedFd::from_raw_fd(pidfd);
        let taken = libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) as i32;
        assert!(
            taken >= 0,
            "pidfd_getfd: {}",
            std::io::Error::last_os_error()
        );
        TcpListener::from_raw_fd(taken)
    }
}

/// listen(2) on a socket we hold.
fn listen_on(socket: &TcpListener) {
    // SAFETY: listen(2) on a descriptor we own.
    let ret = unsafe { libc::listen(socket.as_raw_fd(), 8) };
    assert_eq!(ret, 0, "listen: {}", std::io::Error::last_os_error());
}

/// The cgroup hooks judge a socket by the cgroup it was made in, and the
/// listen hook must too. A socket made and bound outside the watched
/// cgroup, handed to a process inside (here by fork, as SCM_RIGHTS would)
/// and listened on there, is not the watched cgroup's: no listen, no
/// listen_stop. The reverse, a socket bound inside and listened on by a
/// process outside, is: its listen is reported.
#[test]
#[ignore = "needs root, BTF and cgroup2; run by `cargo xtask test`"]
fn a_listen_belongs_to_the_cgroup_the_socket_was_made_in() {
    let cgroup = CgroupGuard::new("handed");
    let tracer = Tracer::start(&cgroup.path, &[]);
    let (outside, outside_port) = bound_outside();
    let mut worker = Worker::spawn(
        &cgroup.path,
        None,
        &[
            Op::Adopt {
                fd: outside.as_raw_fd(),
            },
            Op::listen(0),
            Op::Close { sock: 0 },
            Op::tcp(false),
            Op::bind(1, "127.0.0.1:0"),
            Op::LocalPort { sock: 1 },
            Op::Pause,
        ],
    );
    drop(outside);
    let results = worker.results(6);
    assert!(results.iter().all(|r| *r >= 0), "{results:?}");
    let inside_port = results[5];
    let (before, bind) = tracer.expect_after("the inside socket's bind", |e| {
        is(e, "bind", worker.pid) && e["bound_port"] == inside_port
    });
    assert_nothing_on(&before, outside_port, "the socket made outside");

    // Now the other way: this process, outside the cgroup, takes the
    // worker's socket and listens on it.
    let taken = take_fd(worker.pid, results[3] as i32);
    listen_on(&taken);
    let listen = tracer.expect("the listen from outside", |e| {
        e["kind"] == "listen" && e["cookie"] == bind["cookie"]
    });
    assert_eq!(listen["port"], inside_port, "{listen}");
    drop(taken);
    worker.resume();
    worker.wait();
    tracer.expect("its close", |e| {
        e["kind"] == "close" && e["cookie"] == bind["cookie"]
    });
}

/// The same for a socket that listens without ever binding (listen()
/// picks its port): no bind hook saw it, so only the cgroup it was made in
/// can tell. Made outside and listened on inside: nothing is reported.
/// Made inside and listened on outside: its listen and its close are.
#[test]
#[ignore = "needs root, BTF and cgroup2; run by `cargo xtask test`"]
fn a_socket_that_never_bound_belongs_to_the_cgroup_it_was_made_in() {
    let cgroup = CgroupGuard::new("unbound");
    let tracer = Tracer::start(&cgroup.path, &[]);
    let outside = made_outside();
    let mut worker = Worker::spawn(
        &cgroup.path,
        None,
        &[
            Op::Adopt {
                fd: outside.as_raw_fd(),
            },
            Op::listen(0),
            Op::LocalPort { sock: 0 },
            // Made inside, never bound: the test takes it below.
            Op::tcp(false),
            // A bind after the listen, to know the listen's record came.
            Op::tcp(false),
            Op::bind(2, "127.0.0.1:0"),
            Op::LocalPort { sock: 2 },
            Op::Pause,
        ],
    );
    drop(outside);
    let results = worker.results(7);
    assert!(results.iter().all(|r| *r >= 0), "{results:?}");
    let handed_port = results[2];
    let (before, _) = tracer.expect_after("the marker bind", |e| {
        is(e, "bind", worker.pid) && e["bound_port"] == results[6]
    });
    assert_nothing_on(
        &before,
        handed_port,
        "the socket made outside, listened on inside",
    );

    let taken = take_fd(worker.pid, results[3] as i32);
    listen_on(&taken);
    let port = taken.local_addr().expect("local address").port();
    let listen = tracer.expect("the listen from outside", |e| {
        e["kind"] == "listen" && e["port"] == port
    });
    assert_ne!(listen["cookie"], 0, "{listen}");
    drop(taken);
    worker.resume();
    worker.wait();
    tracer.expect("its close", |e| {
        e["kind"] == "close" && e["cookie"] == listen["cookie"]
    });
}

/// Whether this kernel makes MPTCP sockets; if not, the test says why and
/// counts as skipped.
fn mptcp_unavailable(test: &str, result: i64) -> bool {
    if result < 0 {
        support::skip(
            test,
            &format!("MPTCP (socket(AF_INET, SOCK_STREAM, IPPROTO_MPTCP)) answers {result}"),
        );
        return true;
    }
    false
}

/// An MPTCP listener, as runtimes that ask for MPTCP by default make it:
/// its bind and listen are reported, a connection to it is accepted, and
/// its close is a close (the port is free), not a listener that stopped
/// while its socket lives on.
#[test]
#[ignore = "needs root, BTF and cgroup2; run by `cargo xtask test`"]
fn an_mptcp_listener_is_reported_and_its_close_frees_the_port() {
    let cgroup = CgroupGuard::new("mptcp");
    let netns = NetnsGuard::new("mptcp");
    let tracer = Tracer::start(&cgroup.path, &[]);
    let mut worker = Worker::spawn(
        &cgroup.path,
        Some(&netns),
        &[
            Op::mptcp(false),
            Op::bind(0, "127.0.0.1:8000"),
            Op::listen(0),
            Op::tcp(false),
            Op::Connect {
                sock: 1,
                addr: "127.0.0.1:8000".parse().unwrap(),
            },
            Op::Accept { sock: 0 },
            // The client closes first, so the TIME_WAIT is on its side.
            Op::Close { sock: 1 },
            Op::Close { sock: 2 },
            Op::Close { sock: 0 },
            // The port is free again: a plain TCP bind to it succeeds.
            Op::tcp(false),
            Op::reuseaddr(3),
            Op::bind(3, "127.0.0.1:8000"),
        ],
    );
    let results = worker.results(1);
    if mptcp_unavailable(
        "an_mptcp_listener_is_reported_and_its_close_frees_the_port",
        results[0],
    ) {
        return;
    }
    let results = [results, worker.results(11)].concat();
    assert!(
        results[1..].iter().all(|r| *r >= 0),
        "every call succeeds: {results:?}"
    );
    let bind = tracer.expect("the MPTCP bind", |e| {
        is(e, "bind", worker.pid) && e["port"] == 8000
    });
    let listen = tracer.expect("the MPTCP listen", |e| {
        is(e, "listen", worker.pid) && e["port"] == 8000
    });
    assert_eq!(listen["cookie"], bind["cookie"], "one socket: {listen}");
    // MPTCP stops its subflow listening (LISTEN -> CLOSE) before it frees
    // it, so a listen_stop may come first; the close must follow, or the
    // socket would stay bound in the map.
    let (_, close) = tracer.expect_after("the listener's close", |e| {
        e["kind"] == "close" && e["cookie"] == bind["cookie"]
    });
    assert_eq!(close["pid"], worker.pid, "{close}");
    let (between, _) = tracer.expect_after("the plain bind after it", |e| {
        is(e, "bind", worker.pid) && e["port"] == 8000 && e["cookie"] != bind["cookie"]
    });
    assert!(
        !between.iter().any(|e| e["kind"] == "listen_failed"),
        "no listen failure that never happened: {between:?}"
    );
    assert!(
        !between.iter().any(|e| e["cookie"] == bind["cookie"]),
        "nothing of the listener after its close: {between:?}"
    );
    worker.wait();
}

/// The cookies in the daemon `pid`'s TRACKED map (keys are u64, native
/// byte order; bpftool prints them as bytes where the map has no BTF).
fn tracked_cookies(pid: u32) -> Vec<u64> {
    tracked_dump(pid)
        .as_array()
        .expect("a dump is an array")
        .iter()
        .map(|entry| {
            if let Some(key) = entry["formatted"]["key"].as_u64() {
                return key;
            }
            let bytes: Vec<u8> = entry["key"]
                .as_array()
                .expect("key bytes")
                .iter()
                .map(|b| {
                    let hex = b.as_str().expect("a hex byte").trim_start_matches("0x");
                    u8::from_str_radix(hex, 16).expect("a hex byte")
                })
                .collect();
            u64::from_ne_bytes(bytes.try_into().expect("8 key bytes"))
        })
        .collect()
}

/// The TRACKED entries of the daemon `pid`.
fn tracked_entries(pid: u32) -> usize {
    tracked_dump(pid)
        .as_array()
        .expect("a dump is an array")
        .len()
}

/// bpftool's dump of the TRACKED map the daemon `pid`'s descriptors hold.
fn tracked_dump(pid: u32) -> Value {
    let mut ids = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fdinfo")).expect("fdinfo") {
        let Ok(text) = std::fs::read_to_string(entry.expect("fdinfo entry").path()) else {
            continue;
        };
        if let Some(id) = text.lines().find_map(|l| l.strip_prefix("map_id:")) {
            ids.push(id.trim().to_owned());
        }
    }
    for id in ids {
        let show = bpftool(&["map", "show", "id", &id]);
        if show["name"] == "TRACKED" {
            return bpftool(&["map", "dump", "id", &id]);
        }
    }
    panic!("the daemon {pid} holds no TRACKED map");
}

fn bpftool(args: &[&str]) -> Value {
    let out = Command::new("bpftool")
        .arg("-j")
        .args(args)
        .output()
        .expect("run bpftool");
    assert!(out.status.success(), "bpftool {args:?}: {out:?}");
    serde_json::from_slice(&out.stdout).expect("bpftool's JSON")
}

/// Waits until the daemon has finished `n` more reconciliations.
fn reconciliations_after(daemon: &Daemon, n: f64) -> f64 {
    let now = sample(
        &daemon.text("/metrics").1,
        "portwatch_reconciliations_total",
    );
    let metrics = daemon.metrics_until("reconciliations", |m| {
        sample(m, "portwatch_reconciliations_total") >= now + n
    });
    sample(&metrics, "portwatch_reconciliations_total")
}

/// Sockets outside a `--cgroup` subtree are found by each reconciliation
/// and tracked, but their release runs no watched hook. Churning them for
/// several reconciliations must leave TRACKED as large as it was: the
/// daemon forgets in the kernel what the listing says is gone.
#[test]
#[ignore = "needs root, BTF and cgroup2; run by `cargo xtask test`"]
fn tracked_stays_flat_while_sockets_churn_outside_the_watched_cgroup() {
    const ROUNDS: usize = 4;
    const SOCKETS: usize = 40;
    let cgroup = CgroupGuard::new("flat");
    let daemon = Daemon::start_with(&cgroup, "reconcile_interval = \"1s\"\n", &[]);
    let pid = daemon.child.id();
    reconciliations_after(&daemon, 1.0);
    let baseline = tracked_entries(pid);
    let mut sizes = Vec::new();
    for _ in 0..ROUNDS {
        // This test's own process is outside the watched cgroup.
        let listeners: Vec<TcpListener> = (0..SOCKETS)
            .map(|_| TcpListener::bind("127.0.0.1:0").expect("listen"))
            .collect();
        reconciliations_after(&daemon, 2.0);
        let with = tracked_entries(pid);
        assert!(
            with >= baseline + SOCKETS / 2,
            "the listing's sockets are tracked: {with} (baseline {baseline})"
        );
        drop(listeners);
        reconciliations_after(&daemon, 2.0);
        sizes.push(tracked_entries(pid));
    }
    let last = *sizes.last().unwrap();
    assert!(
        last < baseline + SOCKETS / 2,
        "TRACKED grew by the churned sockets: baseline {baseline}, after each round {sizes:?}"
    );
}

/// A UDP-Lite socket's bind is recorded, and reconciliations list it too:
/// it stays in the map with no drift. The drift is judged on the socket's
/// own entry (the same cookie, state and address, and still the moment its
/// bind was seen): the drift counters are the whole machine's, which the
/// tests beside this one churn listeners on.
#[test]
#[ignore = "needs root, BTF and cgroup2; run by `cargo xtask test`"]
fn a_udplite_socket_survives_reconciliation_without_drift() {
    let cgroup = CgroupGuard::new("udplite");
    let daemon = Daemon::start_with(&cgroup, "reconcile_interval = \"1s\"\n", &[]);
    let mut worker = Worker::spawn(
        &cgroup.path,
        None,
        &[
            Op::udplite(false),
            Op::bind(0, "127.0.0.1:0"),
            Op::LocalPort { sock: 0 },
            Op::Pause,
        ],
    );
    let results = worker.results(3);
    assert_eq!(results[1], 0, "UDP-Lite bind: {results:?}");
    let port = results[2];
    let path = format!("/ports/{port}");
    let before = daemon.json_until(&path, "the UDP-Lite socket", |v| {
        v["listeners"].as_array().is_some_and(|l| !l.is_empty())
    });
    let before = &before["listeners"][0];
    assert_eq!(before["since_exact"], true, "seen by its bind: {before}");
    reconciliations_after(&daemon, 2.0);
    let listeners = daemon.json(&path);
    let listeners = listeners["listeners"].as_array().expect("listeners");
    assert_eq!(listeners.len(), 1, "{listeners:?}");
    let after = &listeners[0];
    assert_eq!(after["protocol"], "udplite", "{after}");
    // A socket reconciliation found stale and then missing would be a new
    // entry, found at the listing (`since_exact` false); a corrected one
    // would have another state or address.
    for key in ["cookie", "state", "endpoint", "since", "since_exact"] {
        assert_eq!(after[key], before[key], "{key}: {before} then {after}");
    }
    worker.resume();
    worker.wait();
}

/// listen() on a socket never bound picks its port itself, and no bind
/// hook ever asked the kernel for the socket's cookie: the listener must
/// still have its identity, and its close must be reported.
#[test]
#[ignore = "needs root, BTF and cgroup2; run by `cargo xtask test`"]
fn a_listener_that_never_bound_has_a_cookie_and_a_close() {
    let cgroup = CgroupGuard::new("autobind");
    let netns = NetnsGuard::new("autobind");
    let tracer = Tracer::start(&cgroup.path, &[]);
    let mut worker = Worker::spawn(
        &cgroup.path,
        Some(&netns),
        &[
            Op::tcp(false),
            Op::listen(0),
            Op::LocalPort { sock: 0 },
            Op::Close { sock: 0 },
        ],
    );
    let results = worker.results(4);
    assert!(results.iter().all(|r| *r >= 0), "{results:?}");
    let listen = tracer.expect("the listen", |e| {
        is(e, "listen", worker.pid) && e["port"] == results[2]
    });
    assert!(
        listen["cookie"].as_u64().is_some_and(|c| c > 0),
        "the listener has a cookie: {listen}"
    );
    tracer.expect("its close", |e| {
        e["kind"] == "close" && e["cookie"] == listen["cookie"]
    });
    worker.wait();
}

/// More than 10 UDP sockets in one slot of the kernel's port hash make
/// `udp_lib_get_port` walk the (address, port) hash instead, which for a
/// wildcard request holds only wildcard sockets: 11 sockets sharing
/// 127.0.0.1 with SO_REUSEADDR do not stop a plain 0.0.0.0 bind, though
/// every one of them would in the walk over the port. The daemon cannot
/// count a slot (other ports and namespaces share it), so `/check` may
/// answer either way, but never confidently wrong.
#[test]
#[ignore = "needs root, BTF and cgroup2; run by `cargo xtask test`"]
fn check_is_not_confidently_wrong_when_a_udp_slot_is_crowded() {
    const CROWD: usize = 11;
    let cgroup = CgroupGuard::new("crowd");
    let netns = NetnsGuard::new("crowd");
    let daemon = Daemon::start(&cgroup);
    let mut ops = Vec::new();
    for sock in 0..CROWD {
        ops.push(Op::udp(false));
        ops.push(Op::reuseaddr(sock));
        ops.push(Op::bind(sock, "127.0.0.1:8000"));
    }
    ops.push(Op::Pause);
    ops.push(Op::udp(false));
    ops.push(Op::bind(CROWD, "0.0.0.0:8000"));
    let mut worker = Worker::spawn(&cgroup.path, Some(&netns), &ops);
    let results = worker.results(3 * CROWD);
    assert!(results.iter().all(|r| *r >= 0), "{results:?}");
    let path = format!("/ports/8000?netns={}", netns.cookie());
    daemon.json_until(&path, "the crowd in the map", |v| {
        v["listeners"].as_array().is_some_and(|l| l.len() == CROWD)
    });
    let check = daemon.json(&format!(
        "/check?protocol=udp&address=0.0.0.0&port=8000&netns={}",
        netns.cookie()
    ));
    worker.resume();
    // The pause's own result, the socket, the bind.
    let real = worker.results(3)[2];
    let real_ok = real == 0;
    println!(
        "crowded UDP slot: the kernel answers {real}; /check says ok={} confident={}",
        check["ok"], check["confident"]
    );
    if check["confident"] == true {
        assert_eq!(
            check["ok"], real_ok,
            "confidently wrong: the kernel answered {real}: {check}"
        );
    }
    worker.wait();
}

/// Runs `ip -n <netns> args...` as a process of `cgroup`: what the kernel
/// does for it (a tunnel's socket, say) is charged to that cgroup. `ip` is
/// run directly: a busybox shell would run its own applet instead.
fn ip_in(cgroup: &CgroupGuard, netns: &NetnsGuard, args: &str) {
    use std::os::unix::process::CommandExt;
    let procs = std::ffi::CString::new(
        cgroup
            .path
            .join("cgroup.procs")
            .into_os_string()
            .into_encoded_bytes(),
    )
    .expect("a path without NUL");
    let mut command = Command::new("ip");
    command.args(["-n", &netns.name]).args(args.split(' '));
    // SAFETY: between fork and exec the child only opens, writes and
    // closes, with memory prepared before the fork.
    unsafe {
        command.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
            if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                return Err(std::io::Error::last_os_error());
            }
            libc::close(fd);
            Ok(())
        });
    }
    let out = command.output().expect("run ip");
    assert!(
        out.status.success(),
        "ip -n {} {args}: {}: {}",
        netns.name,
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A vxlan device's UDP socket belongs to the kernel: it is bound through
/// the watched cgroup's hooks (charged to the process that set the device
/// up) but released without them (`inet_release` skips kernel sockets).
/// Once the device is gone the map forgets the socket at the next
/// reconciliation, and so does the kernel's TRACKED map.
#[test]
#[ignore = "needs root, BTF and cgroup2; run by `cargo xtask test`"]
fn a_kernel_owned_udp_socket_leaves_nothing_behind() {
    let cgroup = CgroupGuard::new("vxlan");
    let netns = NetnsGuard::new("vxlan");
    let daemon = Daemon::start_with(&cgroup, "reconcile_interval = \"1s\"\n", &[]);
    let pid = daemon.child.id();
    ip_in(
        &cgroup,
        &netns,
        "link add pwvx0 type vxlan id 42 dstport 4789 local 127.0.0.1",
    );
    ip_in(&cgroup, &netns, "link set pwvx0 up");
    let path = format!("/ports/4789?netns={}", netns.cookie());
    let shown = daemon.json_until(&path, "the vxlan socket", |v| {
        v["listeners"].as_array().is_some_and(|l| !l.is_empty())
    });
    assert_eq!(shown["listeners"][0]["protocol"], "udp", "{shown}");
    let cookie = shown["listeners"][0]["cookie"]
        .as_u64()
        .expect("the socket's cookie");
    // Judged by its own cookie: the machine's other sockets come and go.
    reconciliations_after(&daemon, 1.0);
    assert!(
        tracked_cookies(pid).contains(&cookie),
        "the tunnel's socket is tracked"
    );
    netns.ip(&["link", "del", "pwvx0"]);
    daemon.json_until(&path, "the vxlan socket gone", |v| {
        v["listeners"].as_array().is_some_and(Vec::is_empty)
    });
    reconciliations_after(&daemon, 1.0);
    assert!(
        !tracked_cookies(pid).contains(&cookie),
        "nothing of the tunnel's socket stays tracked"
    );
}
