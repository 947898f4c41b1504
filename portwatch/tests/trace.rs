//! Root integration tests: the real kernel programs, attached by the real
//! `portwatch trace --json` to a child cgroup each test creates, observing
//! real sockets made by a worker process inside that cgroup.
//!
//! They need root, BTF and cgroup2, so they are `#[ignore]`d with that reason
//! and `cargo xtask test` runs them (`--ignored`) where it can.

mod support;

use std::time::Duration;

use serde_json::Value;
use support::{CgroupGuard, NetnsGuard, Op, Tracer, Worker};

const ROOT: &str = "needs root, BTF and cgroup2; run by `cargo xtask test`";

const EADDRINUSE: i64 = -(libc::EADDRINUSE as i64);

fn is(event: &Value, kind: &str, pid: u32) -> bool {
    event["kind"] == kind && event["pid"] == pid
}

fn is_bind_of(event: &Value, kind: &str, pid: u32, address: &str, port: u16) -> bool {
    is(event, kind, pid) && event["address"] == address && event["port"] == port
}

/// What `port_alloc` must say for a TCP bind or listen whose allocation ran
/// with `verdict`: the verdict where the tracer attached fexit on
/// `inet_csk_get_port`, null where it did not (this machine refuses fexit).
fn expected_port_alloc(tracer: &Tracer, verdict: &str) -> Value {
    let stderr = tracer.stderr.lock().expect("stderr").clone();
    if stderr.contains("port allocation via fexit") {
        Value::from(verdict)
    } else {
        assert!(
            stderr.contains("port allocation via post_bind"),
            "the tracer names its port allocation path: {stderr}"
        );
        Value::Null
    }
}

fn assert_common(event: &Value, worker: &Worker) {
    assert_eq!(event["pid"], worker.pid, "{event}");
    assert_eq!(event["uid"], 0, "{event}");
    assert!(
        event["cookie"].as_u64().is_some_and(|c| c > 0),
        "cookie: {event}"
    );
    assert!(
        event["process"].as_str().is_some_and(|p| !p.is_empty()),
        "process: {event}"
    );
    assert!(event["time"].as_str().is_some(), "time: {event}");
}

#[test]
#[ignore = "needs root, BTF and cgroup2; run by `cargo xtask test`"]
fn tcp_binds_ok_on_v4_and_v6_and_port_zero_gets_its_real_port() {
    let cgroup = CgroupGuard::new("tcpok");
    let tracer = Tracer::start(&cgroup.path, &[]);
    let mut worker = Worker::spawn(
        &cgroup.path,
        None,
        &[
            Op::tcp(false),
            Op::bind(0, "127.0.0.1:0"),
            Op::LocalPort { sock: 0 },
            Op::tcp(true),
            Op::bind(1, "[::1]:0"),
            Op::LocalPort { sock: 1 },
        ],
    );
    let results = worker.results(6);
    assert_eq!((results[1], results[4]), (0, 0), "binds: {results:?}");
    let (port4, port6) = (results[2] as u64, results[5] as u64);
    assert!(port4 > 0 && port6 > 0);

    let v4 = tracer.expect("tcp v4 bind", |e| {
        is_bind_of(e, "bind", worker.pid, "127.0.0.1", 0)
    });
    assert_common(&v4, &worker);
    assert_eq!(v4["protocol"], "tcp");
    assert_eq!(v4["family"], "ipv4");
    assert_eq!(v4["bound_port"], port4, "ephemeral port: {v4}");
    assert_eq!(v4["errno"], Value::Null);
    assert_eq!(v4["endpoint"], format!("127.0.0.1:{port4}"));

    let v6 = tracer.expect("tcp v6 bind", |e| {
        is_bind_of(e, "bind", worker.pid, "::1", 0)
    });
    assert_common(&v6, &worker);
    assert_eq!(v6["family"], "ipv6");
    assert_eq!(v6["bound_port"], port6);
    assert_eq!(v6["v6only"], false, "{v6}");
    assert_eq!(v6["endpoint"], format!("[::1]:{port6}"));
    assert_ne!(v4["cookie"], v6["cookie"]);
    worker.wait();
}

#[test]
#[ignore = "needs root, BTF and cgroup2; run by `cargo xtask test`"]
fn udp_bind_ok_and_udp_close() {
    let cgroup = CgroupGuard::new("udp");
    let tracer = Tracer::start(&cgroup.path, &[]);
    let mut worker = Worker::spawn(
        &cgroup.path,
        None,
        &[
            Op::udp(false),
            Op::bind(0, "127.0.0.1:0"),
            Op::LocalPort { sock: 0 },
            Op::Close { sock: 0 },
        ],
    );
    let results = worker.results(4);
    assert_eq!(results[1], 0);
    let bind = tracer.expect("udp bind", |e| is(e, "bind", worker.pid));
    assert_common(&bind, &worker);
    assert_eq!(bind["protocol"], "udp");
    assert_eq!(bind["bound_port"], results[2] as u64);
    let close = tracer.expect("udp close", |e| is(e, "close", worker.pid));
    assert_eq!(
        close["cookie"], bind["cookie"],
        "close names the bound socket"
    );
    assert_eq!(close["protocol"], "udp");
    worker.wait();
}

#[test]
#[ignore = "needs root, BTF and cgroup2; run by `cargo xtask test`"]
fn eaddrinuse_keeps_the_requested_address_and_port() {
    let cgroup = CgroupGuard::new("inuse");
    let netns = NetnsGuard::new("inuse");
    let tracer = Tracer::start(&cgroup.path, &[]);
    let mut worker = Worker::spawn(
        &cgroup.path,
        Some(&netns),
        &[
            Op::tcp(false),
            Op::bind(0, "127.0.0.1:8000"),
            Op::tcp(false),
            Op::bind(1, "127.0.0.1:8000"),
        ],
    );
    let results = worker.results(4);
    assert_eq!((results[1], results[3]), (0, EADDRINUSE), "{results:?}");
    let first = tracer.expect("first bind", |e| {
        is_bind_of(e, "bind", worker.pid, "127.0.0.1", 8000)
    });
    let failed = tracer.expect("failed bind", |e| {
        is_bind_of(e, "bind_failed", worker.pid, "127.0.0.1", 8000)
    });
    assert_common(&failed, &worker);
    assert_eq!(failed["errno"], "EADDRINUSE");
    assert_eq!(failed["bound_port"], Value::Null);
    assert_eq!(failed["endpoint"], "127.0.0.1:8000");
    assert_ne!(failed["cookie"], first["cookie"]);
    assert_eq!(
        first["port_alloc"],
        expected_port_alloc(&tracer, "allocated")
    );
    assert_eq!(
        failed["port_alloc"],
        expected_port_alloc(&tracer, "refused")
    );
    // The two records came from different sockets in one network namespace.
    assert_eq!(failed["netns"], first["netns"]);
    worker.wait();
}

#[test]
#[ignore = "needs root, BTF and cgroup2; run by `cargo xtask test`"]
fn eaddrnotavail_for_an_address_the_host_does_not_have() {
    let cgroup = CgroupGuard::new("notavail");
    let tracer = Tracer::start(&cgroup.path, &[]);
    // 192.0.2.0/24 is TEST-NET-1: never configured, and a bind sends nothing.
    let mut worker = Worker::spawn(
        &cgroup.path,
        None,
        &[Op::tcp(false), Op::bind(0, "192.0.2.1:8000")],
    );
    assert_eq!(worker.results(2)[1], -(libc::EADDRNOTAVAIL as i64));
    let failed = tracer.expect("EADDRNOTAVAIL", |e| is(e, "bind_failed", worker.pid));
    assert_eq!(failed["errno"], "EADDRNOTAVAIL");
    assert_eq!(failed["address"], "192.0.2.1");
    assert_eq!(failed["port"], 8000);
    worker.wait();
}

#[test]
#[ignore = "needs root, BTF and cgroup2; run by `cargo xtask test`"]
fn eacces_for_a_low_port_without_cap_net_bind_service() {
    let cgroup = CgroupGuard::new("eacces");
    let netns = NetnsGuard::new("eacces");
    let tracer = Tracer::start(&cgroup.path, &[]);
    let mut worker = Worker::spawn(
        &cgroup.path,
        Some(&netns),
        &[
            Op::DropNetBindService,
            Op::tcp(false),
            Op::bind(0, "127.0.0.1:80"),
        ],
    );
    let results = worker.results(3);
    assert_eq!(results[0], 0, "capset");
    assert_eq!(results[2], -(libc::EACCES as i64));
    let failed = tracer.expect("EACCES", |e| is(e, "bind_failed", worker.pid));
    assert_eq!(failed["errno"], "EACCES");
    assert_eq!(failed["port"], 80);
    worker.wait();
}

#[test]
#[ignore = "needs root, BTF and cgroup2; run by `cargo xtask test`"]
fn so_reuseport_twice_both_succeed_with_the_flag_seen() {
    let cgroup = CgroupGuard::new("reuseport");
    let netns = NetnsGuard::new("reuseport");
    let tracer = Tracer::start(&cgroup.path, &[]);
    let mut worker = Worker::spawn(
        &cgroup.path,
        Some(&netns),
        &[
            Op::tcp(false),
            Op::reuseport(0),
            Op::bind(0, "127.0.0.1:8000"),
            Op::tcp(false),
            Op::reuseport(1),
            Op::bind(1, "127.0.0.1:8000"),
        ],
    );
    let results = worker.results(6);
    assert_eq!((results[2], results[5]), (0, 0), "{results:?}");
    let first = tracer.expect("first", |e| {
        is_bind_of(e, "bind", worker.pid, "127.0.0.1", 8000)
    });
    let second = tracer.expect("second", |e| {
        is_bind_of(e, "bind", worker.pid, "127.0.0.1", 8000)
    });
    for event in [&first, &second] {
        assert_eq!(event["reuse_port"], true, "{event}");
        assert_eq!(event["reuse_addr"], false, "{event}");
        assert_eq!(event["bound_port"], 8000);
    }
    assert_ne!(first["cookie"], second["cookie"]);
    worker.wait();
}

#[test]
#[ignore = "needs root, BTF and cgroup2; run by `cargo xtask test`"]
fn ipv6_v6only_wildcard_beside_ipv4_wildcard() {
    let cgroup = CgroupGuard::new("v6only");
    let netns = NetnsGuard::new("v6only");
    let tracer = Tracer::start(&cgroup.path, &[]);
    let mut worker = Worker::spawn(
        &cgroup.path,
        Some(&netns),
        &[
            Op::tcp(false),
            Op::bind(0, "0.0.0.0:8000"),
            Op::listen(0),
            // Without V6ONLY this one would collide with 0.0.0.0:8000.
            Op::tcp(true),
            Op::bind(1, "[::]:8000"),
            Op::tcp(true),
            Op::v6only(2),
            Op::bind(2, "[::]:8000"),
        ],
    );
    let results = worker.results(8);
    assert_eq!(results[1..3], [0, 0]);
    assert_eq!(
        results[4], EADDRINUSE,
        "dual-stack [::] collides with 0.0.0.0"
    );
    assert_eq!(results[7], 0, "v6only [::] coexists");
    let v4 = tracer.expect("0.0.0.0", |e| {
        is_bind_of(e, "bind", worker.pid, "0.0.0.0", 8000)
    });
    assert_eq!(v4["v6only"], Value::Null, "v6only is not an IPv4 option");
    let clash = tracer.expect("dual-stack clash", |e| {
        is_bind_of(e, "bind_failed", worker.pid, "::", 8000)
    });
    assert_eq!(clash["v6only"], false);
    assert_eq!(clash["errno"], "EADDRINUSE");
    let v6 = tracer.expect("[::] v6only", |e| {
        is_bind_of(e, "bind", worker.pid, "::", 8000)
    });
    assert_eq!(v6["v6only"], true, "{v6}");
    assert_eq!(v6["endpoint"], "[::]:8000");
    worker.wait();
}

#[test]
#[ignore = "needs root, BTF and cgroup2; run by `cargo xtask test`"]
fn listen_start_and_close() {
    let cgroup = CgroupGuard::new("listen");
    let tracer = Tracer::start(&cgroup.path, &[]);
    let mut worker = Worker::spawn(
        &cgroup.path,
        None,
        &[
            Op::tcp(false),
            Op::bind(0, "127.0.0.1:0"),
            Op::LocalPort { sock: 0 },
            Op::Listen {
                sock: 0,
                backlog: 77,
            },
            Op::Pause,
            Op::Close { sock: 0 },
        ],
    );
    // The fifth op (the pause) reports only once resumed.
    let results = worker.results(4);
    let port = results[2] as u64;
    let bind = tracer.expect("bind", |e| is(e, "bind", worker.pid));
    let listen = tracer.expect("listen", |e| is(e, "listen", worker.pid));
    assert_common(&listen, &worker);
    assert_eq!(listen["address"], "127.0.0.1");
    assert_eq!(listen["bound_port"], port);
    assert_eq!(listen["backlog"], 77);
    assert_eq!(listen["cookie"], bind["cookie"], "same socket");
    assert_eq!(listen["netns"], bind["netns"]);
    worker.resume();
    assert_eq!(worker.results(2), [0, 0], "pause and close");
    let close = tracer.expect("close", |e| is(e, "close", worker.pid));
    assert_eq!(close["cookie"], bind["cookie"]);
    assert_eq!(close["protocol"], "tcp");
    worker.wait();
}

/// listen() on a socket that was never bound picks an ephemeral port after
/// the LISTEN transition; the event must carry the port it got, not 0.
#[test]
#[ignore = "needs root, BTF and cgroup2; run by `cargo xtask test`"]
fn listen_without_bind_reports_the_port_it_got() {
    let cgroup = CgroupGuard::new("autobind");
    let tracer = Tracer::start(&cgroup.path, &[]);
    let mut worker = Worker::spawn(
        &cgroup.path,
        None,
        &[Op::tcp(false), Op::listen(0), Op::LocalPort { sock: 0 }],
    );
    let results = worker.results(3);
    assert_eq!(results[1], 0);
    let port = results[2] as u64;
    assert!(port > 0);
    let listen = tracer.expect("autobound listen", |e| is(e, "listen", worker.pid));
    assert_eq!(listen["bound_port"], port, "{listen}");
    assert_eq!(listen["port"], port, "{listen}");
    assert_eq!(listen["address"], "0.0.0.0");
    assert_eq!(
        listen["port_alloc"],
        expected_port_alloc(&tracer, "allocated")
    );
    worker.wait();
}

/// The two bind hook variants (`portwatch-ebpf/src/bind.rs`) report the same
/// options: one tracer loads the `bpf_getsockopt` one, the other the one
/// that reads the socket's bits, and both watch the same binds, each made
/// with a different set of options. Every option is known in both.
#[test]
#[ignore = "needs root, BTF and cgroup2; run by `cargo xtask test`"]
fn options_from_sock_bits_match_getsockopt() {
    let cgroup = CgroupGuard::new("optvariants");
    let auto = Tracer::start(&cgroup.path, &[]);
    let sock_bits = Tracer::start(&cgroup.path, &["--socket-options", "sock-bits"]);
    let auto_path = auto.stderr.lock().expect("stderr").clone();
    assert!(
        auto_path.contains("socket options via getsockopt")
            || auto_path.contains("socket options via sock_bits"),
        "{auto_path}"
    );
    let forced = sock_bits.stderr.lock().expect("stderr").clone();
    assert!(forced.contains("socket options via sock_bits"), "{forced}");
    let ip = |sock, name| Op::SetOpt {
        sock,
        level: libc::IPPROTO_IP,
        name,
        value: 1,
    };
    let mut worker = Worker::spawn(
        &cgroup.path,
        None,
        &[
            Op::tcp(false),
            Op::reuseaddr(0),
            ip(0, libc::IP_FREEBIND),
            Op::bind(0, "127.0.0.1:0"),
            Op::tcp(false),
            Op::reuseport(1),
            ip(1, libc::IP_TRANSPARENT),
            Op::bind(1, "127.0.0.1:0"),
            Op::udp(true),
            Op::v6only(2),
            Op::reuseaddr(2),
            Op::reuseport(2),
            Op::bind(2, "[::1]:0"),
            Op::tcp(false),
            ip(3, libc::IP_BIND_ADDRESS_NO_PORT),
            Op::bind(3, "127.0.0.1:0"),
            Op::tcp(true),
            Op::bind(4, "[::1]:0"),
        ],
    );
    let results = worker.results(18);
    assert!(results.iter().all(|r| *r >= 0), "{results:?}");
    // (reuse_addr, reuse_port, v6only, freebind, transparent, no_port)
    let expected = [
        [true, false, false, true, false, false],
        [false, true, false, false, true, false],
        [true, true, true, false, false, false],
        [false, false, false, false, false, true],
        [false, false, false, false, false, false],
    ];
    const KEYS: [&str; 6] = [
        "reuse_addr",
        "reuse_port",
        "v6only",
        "freebind",
        "transparent",
        "bind_address_no_port",
    ];
    for tracer in [&auto, &sock_bits] {
        for (i, want) in expected.iter().enumerate() {
            let bind = tracer.expect("a bind", |e| is(e, "bind", worker.pid));
            let ipv4 = bind["family"] == "ipv4";
            for (key, want) in KEYS.iter().zip(want) {
                let want = if *key == "v6only" && ipv4 {
                    Value::Null
                } else {
                    Value::from(*want)
                };
                assert_eq!(bind[key], want, "bind {i}, {key}: {bind}");
            }
        }
    }
    worker.wait();
}

#[test]
#[ignore = "needs root, BTF and cgroup2; run by `cargo xtask test`"]
fn listen_failure_after_two_reuseaddr_binds() {
    let cgroup = CgroupGuard::new("listenfail");
    let netns = NetnsGuard::new("listenfail");
    let tracer = Tracer::start(&cgroup.path, &[]);
    let mut worker = Worker::spawn(
        &cgroup.path,
        Some(&netns),
        &[
            Op::listen_conflict("127.0.0.1:8000").as_slice(),
            // A marker: everything the listens caused comes before it.
            &[Op::udp(false), Op::bind(2, "127.0.0.1:8001")],
        ]
        .concat(),
    );
    let results = worker.results(10);
    assert_eq!(results[2], 0);
    assert_eq!(results[5], 0, "both SO_REUSEADDR binds succeed");
    assert_eq!(results[6], 0);
    assert_eq!(results[7], EADDRINUSE, "the second listen fails");
    assert_eq!(results[9], 0, "the marker");
    let (mut seen, listen) = tracer.expect_after("listen", |e| is(e, "listen", worker.pid));
    let (before_failed, failed) =
        tracer.expect_after("listen_failed", |e| is(e, "listen_failed", worker.pid));
    assert_eq!(failed["errno"], "EADDRINUSE");
    assert_eq!(failed["endpoint"], "127.0.0.1:8000");
    assert_eq!(
        failed["reuse_addr"],
        Value::Null,
        "options are read at bind, not listen"
    );
    assert_ne!(failed["cookie"], listen["cookie"]);
    // Both binds got the port; the listen's second look refused it.
    assert_eq!(
        listen["port_alloc"],
        expected_port_alloc(&tracer, "allocated")
    );
    assert_eq!(
        failed["port_alloc"],
        expected_port_alloc(&tracer, "refused")
    );
    // The failed listen is not also reported as a listener going away:
    // neither as it falls back to CLOSE, before its outcome, nor after.
    let (after_failed, _) = tracer.expect_after("the marker", |e| {
        is_bind_of(e, "bind", worker.pid, "127.0.0.1", 8001)
    });
    seen.extend(before_failed.into_iter().chain(after_failed));
    assert!(
        !seen.iter().any(|e| is(e, "listen_stop", worker.pid)),
        "unexpected listen_stop: {seen:?}"
    );
    worker.wait();
}

#[test]
#[ignore = "needs root, BTF and cgroup2; run by `cargo xtask test`"]
fn filters_keep_only_failures_for_one_port() {
    let cgroup = CgroupGuard::new("filters");
    let netns = NetnsGuard::new("filters");
    let tracer = Tracer::start(&cgroup.path, &["--failures-only", "--port", "8001"]);
    let mut worker = Worker::spawn(
        &cgroup.path,
        Some(&netns),
        &[
            Op::tcp(false),
            Op::bind(0, "127.0.0.1:8000"),
            Op::tcp(false),
            Op::bind(1, "127.0.0.1:8000"),
            Op::tcp(false),
            Op::bind(2, "127.0.0.1:8001"),
            Op::tcp(false),
            Op::bind(3, "127.0.0.1:8001"),
        ],
    );
    let results = worker.results(8);
    assert_eq!(
        [results[1], results[3], results[5], results[7]],
        [0, EADDRINUSE, 0, EADDRINUSE],
        "{results:?}"
    );
    // Its sockets close when it exits: closes on both ports, filtered too.
    worker.wait();
    // A marker after it: a bind of 8001 that succeeds, then one that fails.
    let mut marker = Worker::spawn(
        &cgroup.path,
        Some(&netns),
        &[
            Op::tcp(false),
            Op::bind(0, "127.0.0.1:8001"),
            Op::tcp(false),
            Op::bind(1, "127.0.0.1:8001"),
        ],
    );
    let marker_results = marker.results(4);
    assert_eq!((marker_results[1], marker_results[3]), (0, EADDRINUSE));
    // The ring buffer is one queue: everything the first worker did, and the
    // marker's successful bind, came before the marker's failure.
    let (before, last) =
        tracer.expect_after("the marker's failure", |e| is(e, "bind_failed", marker.pid));
    assert_eq!(last["port"], 8001, "{last}");
    let [failed] = before.as_slice() else {
        panic!("exactly the one failure on 8001 before the marker: {before:#?}");
    };
    assert!(
        is_bind_of(failed, "bind_failed", worker.pid, "127.0.0.1", 8001),
        "{failed}"
    );
    assert_eq!(failed["errno"], "EADDRINUSE");
    marker.wait();
}

/// io_uring binds pass the cgroup hooks but not the bind(2) tracepoint. A
/// success is reported by post_bind at once; a failure, where fexit is not
/// available, is reported (errno unknown) when the thread binds again.
#[test]
#[ignore = "needs root, BTF and cgroup2; run by `cargo xtask test`"]
fn io_uring_binds_are_seen_without_the_syscall_tracepoint() {
    let cgroup = CgroupGuard::new("uring");
    let netns = NetnsGuard::new("uring");
    let tracer = Tracer::start(&cgroup.path, &[]);
    let uring_bind = |sock, addr: &str| Op::UringBind {
        sock,
        addr: addr.parse().unwrap(),
    };
    let mut worker = Worker::spawn(
        &cgroup.path,
        Some(&netns),
        &[
            Op::tcp(false),
            uring_bind(0, "127.0.0.1:8000"),
            Op::tcp(false),
            uring_bind(1, "127.0.0.1:8000"),
            Op::tcp(false),
            Op::bind(2, "127.0.0.1:8001"),
        ],
    );
    let results = worker.results(6);
    if results[1] == -(libc::EINVAL as i64) || results[1] == -(libc::EOPNOTSUPP as i64) {
        // IORING_OP_BIND arrived in Linux 6.11; an older kernel refuses it.
        support::skip(
            "io_uring_binds_are_seen_without_the_syscall_tracepoint",
            &format!(
                "io_uring bind (IORING_OP_BIND, Linux 6.11+): this kernel answers {}",
                results[1]
            ),
        );
        return;
    }
    assert_eq!(results[1], 0, "io_uring bind: {results:?}");
    assert_eq!(results[3], EADDRINUSE, "second io_uring bind: {results:?}");
    let ok = tracer.expect("io_uring bind", |e| {
        is_bind_of(e, "bind", worker.pid, "127.0.0.1", 8000)
    });
    assert_eq!(ok["source"], "post_bind");
    assert_eq!(ok["bound_port"], 8000);
    let failed = tracer.expect("io_uring failure", |e| {
        is_bind_of(e, "bind_failed", worker.pid, "127.0.0.1", 8000)
    });
    match failed["source"].as_str() {
        Some("fexit") => assert_eq!(failed["errno"], "EADDRINUSE"),
        Some("unresolved") => assert_eq!(failed["errno"], "UNKNOWN"),
        other => panic!("unexpected source {other:?}: {failed}"),
    }
    assert_ne!(failed["cookie"], ok["cookie"]);
    tracer.expect("the plain bind after it", |e| {
        is_bind_of(e, "bind", worker.pid, "127.0.0.1", 8001)
    });
    worker.wait();
    if failed["source"] == "unresolved" {
        // The kernel program says so through aya-log, in the tracer's log.
        let stderr = tracer.stop();
        assert!(
            stderr.contains("failed without passing an outcome hook"),
            "{stderr}"
        );
    }
}

/// Overflow: with the tracer stopped, a burst overfills a one-page ring.
/// Every record is either delivered or counted as dropped, exactly.
#[test]
#[ignore = "needs root, BTF and cgroup2; run by `cargo xtask test`"]
fn ring_buffer_overflow_is_counted_exactly() {
    const SOCKETS: usize = 300;
    let cgroup = CgroupGuard::new("overflow");
    let tracer = Tracer::start(&cgroup.path, &["--ring-size", "4096"]);
    let tracer_pid = tracer.pid();
    let mut ops = Vec::new();
    for sock in 0..SOCKETS {
        ops.extend([
            Op::udp(false),
            Op::bind(sock, "127.0.0.1:0"),
            Op::Close { sock },
        ]);
    }
    // SAFETY: pausing our own child so that nothing drains the ring.
    unsafe { libc::kill(tracer_pid, libc::SIGSTOP) };
    let mut worker = Worker::spawn(&cgroup.path, None, &ops);
    let results = worker.results(ops.len());
    assert!(results.iter().all(|r| *r >= 0), "every op succeeded");
    worker.wait();
    // SAFETY: as above.
    unsafe { libc::kill(tracer_pid, libc::SIGCONT) };

    let issued = (SOCKETS * 2) as u64; // one bind and one close each
    let delivered = tracer
        .drain(Duration::from_millis(1500))
        .iter()
        .filter(|e| e["pid"] == worker.pid)
        .count() as u64;
    let stderr = tracer.stop();
    let dropped = support::total_dropped(&stderr);
    assert!(
        dropped > 0,
        "a 4 KiB ring cannot hold {issued} records; stderr:\n{stderr}"
    );
    assert_eq!(
        delivered + dropped,
        issued,
        "delivered {delivered} + dropped {dropped}; stderr:\n{stderr}"
    );
}

#[test]
fn every_ignored_test_says_why_in_the_same_words() {
    // The convention of all test files: a test that cannot run without root
    // is ignored with one reason, which `cargo xtask test` acts on. Every
    // file is read, so that a new one cannot be forgotten here.
    let standard = format!("#[ignore = \"{ROOT}\"]");
    let tests = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests");
    let mut dirs = vec![tests.clone()];
    let mut files = Vec::new();
    while let Some(dir) = dirs.pop() {
        for entry in
            std::fs::read_dir(&dir).unwrap_or_else(|err| panic!("{}: {err}", dir.display()))
        {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|ext| ext == "rs") {
                files.push(path);
            }
        }
    }
    let mut with_root_tests = Vec::new();
    for path in &files {
        let source =
            std::fs::read_to_string(path).unwrap_or_else(|err| panic!("{}: {err}", path.display()));
        let file = path
            .strip_prefix(&tests)
            .unwrap_or(path)
            .display()
            .to_string();
        let attributes: Vec<&str> = source
            .lines()
            .map(str::trim)
            .filter(|l| l.starts_with("#[ignore"))
            .collect();
        for attribute in &attributes {
            assert_eq!(*attribute, standard, "{file}");
        }
        if !attributes.is_empty() {
            with_root_tests.push(file);
        }
    }
    // The walk found the test files, this one (with its root tests) among them.
    assert!(
        with_root_tests.iter().any(|file| file == "trace.rs"),
        "{files:?}"
    );
}
