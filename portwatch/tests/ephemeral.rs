//! Ephemeral port exhaustion, for real and cheaply: a private network
//! namespace whose `ip_local_port_range` has 10 ports, workers in a test
//! cgroup that connect and bind until the kernel says no, and the `portwatch
//! daemon` binary read over HTTP and through `portwatch ephemeral`, the way
//! an operator would.

mod support;

use serde_json::Value;
use support::{CgroupGuard, NetnsGuard, Op, Worker, daemon::Daemon};

/// The namespace's range: 10 ports.
const LOW: u16 = 40000;
const HIGH: u16 = 40009;

/// A namespace with the 10-port range.
fn tiny_range(label: &str) -> NetnsGuard {
    let netns = NetnsGuard::new(label);
    netns.run_in(|| {
        std::fs::write(
            "/proc/sys/net/ipv4/ip_local_port_range",
            format!("{LOW} {HIGH}"),
        )
        .expect("set the namespace's port range")
    });
    netns
}

/// The daemon's configuration: ranges listed every second.
const CONFIG: &str = "reconcile_interval = \"1h\"\nephemeral_interval = \"1s\"\n";

/// The daemon, listing ranges every second.
fn daemon(cgroup: &CgroupGuard) -> Daemon {
    Daemon::start_with(cgroup, CONFIG, &[])
}

/// `/ephemeral`'s answer for one namespace, once `done` holds for it.
fn namespace_until(
    daemon: &Daemon,
    netns: &NetnsGuard,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let path = format!("/ephemeral?netns={}", netns.cookie());
    let body = daemon.json_until(&path, what, |body| {
        body["namespaces"]
            .as_array()
            .is_some_and(|all| all.len() == 1 && done(&all[0]))
    });
    body["namespaces"][0].clone()
}

fn destination<'a>(ns: &'a Value, endpoint: &str) -> &'a Value {
    ns["destinations"]
        .as_array()
        .and_then(|all| all.iter().find(|d| d["destination"] == endpoint))
        .unwrap_or_else(|| panic!("no destination {endpoint} in {ns}"))
}

/// `n` TCP sockets, each connecting to `to`.
fn connects(n: usize, to: &str, first_sock: usize) -> Vec<Op> {
    (0..n)
        .flat_map(|i| {
            [
                Op::tcp(false),
                Op::Connect {
                    sock: first_sock + i,
                    addr: to.parse().unwrap(),
                },
            ]
        })
        .collect()
}

#[test]
#[ignore = "needs root, BTF and cgroup2; run by `cargo xtask test`"]
fn a_full_range_per_destination_with_a_listener_inside_it_and_time_wait() {
    let cgroup = CgroupGuard::new("ephemeral");
    let netns = tiny_range("eph");
    let daemon = daemon(&cgroup);

    // Two services outside the range, and one listener inside it.
    let mut servers = Worker::spawn(
        &cgroup.path,
        Some(&netns),
        &[
            Op::tcp(false),
            Op::bind(0, "127.0.0.1:8000"),
            Op::Listen {
                sock: 0,
                backlog: 64,
            },
            Op::tcp(false),
            Op::bind(1, "127.0.0.1:8001"),
            Op::listen(1),
            Op::tcp(false),
            Op::bind(2, &format!("0.0.0.0:{HIGH}")),
            Op::listen(2),
            Op::Pause,
        ],
    );
    let started = servers.results(9);
    assert!(started.iter().all(|&r| r >= 0), "servers: {started:?}");

    // The listener took one port from every destination: 9 connects to
    // :8000 succeed and the 10th finds none; :8001 still has all 9.
    let mut ops = connects(10, "127.0.0.1:8000", 0);
    ops.extend(connects(1, "127.0.0.1:8001", 10));
    ops.push(Op::Pause);
    // The client closes first, so its side goes to TIME_WAIT.
    ops.extend((0..9).map(|sock| Op::Close { sock }));
    ops.push(Op::Pause);
    let mut client = Worker::spawn(&cgroup.path, Some(&netns), &ops);
    let results = client.results(22);
    let connected: Vec<i64> = results.iter().skip(1).step_by(2).copied().collect();
    assert_eq!(
        connected,
        [
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            -i64::from(libc::EADDRNOTAVAIL),
            0
        ],
        "connect results (sockets, connects): {results:?}"
    );

    let ns = namespace_until(&daemon, &netns, "9 of 9 ports to :8000 in use", |ns| {
        ns["in_use"] == 9
            && ns["destinations_total"] == 2
            && ns["recent_failures"]
                .as_array()
                .is_some_and(|f| !f.is_empty())
    });
    // The failed connect, with who and where to.
    let failure = &ns["recent_failures"][0];
    assert_eq!(failure["kind"], "connect_failed", "{failure}");
    assert_eq!(failure["errno"], "EADDRNOTAVAIL", "{failure}");
    assert_eq!(failure["pid"], client.pid, "{failure}");
    assert_eq!(failure["destination"], "127.0.0.1:8000", "{failure}");
    assert!(
        failure["cause"].as_str().is_some_and(
            |c| c.starts_with("all 9 usable local ports to 127.0.0.1:8000 were in use")
        ),
        "{failure}"
    );
    let failures = daemon.json("/failures?errno=EADDRNOTAVAIL");
    assert_eq!(
        failures["failures"][0]["destination"], "127.0.0.1:8000",
        "{failures}"
    );
    let metrics = daemon.text("/metrics").1;
    assert_eq!(
        support::daemon::sample(
            &metrics,
            "portwatch_connect_failures_total{errno=\"EADDRNOTAVAIL\",family=\"ipv4\",protocol=\"tcp\"}"
        ),
        1.0,
        "{metrics}"
    );
    assert_eq!(ns["range_low"], LOW);
    assert_eq!(ns["range_high"], HIGH);
    assert_eq!(ns["size"], 10);
    assert_eq!(ns["reserved"], 0);
    assert_eq!(ns["held"], 1, "{ns}");
    assert_eq!(ns["usable"], 9, "{ns}");
    assert_eq!(ns["utilization"], 1.0, "{ns}");
    assert_eq!(ns["exhaustion_seconds"], 0.0, "full now: {ns}");
    assert_eq!(ns["host"], false);
    let busiest = &ns["destinations"][0];
    assert_eq!(busiest["destination"], "127.0.0.1:8000", "{ns}");
    assert_eq!(busiest["established"], 9);
    assert_eq!(busiest["utilization"], 1.0);
    let holders = busiest["holders"].as_array().expect("holders");
    assert!(
        holders.iter().any(|h| h["pid"] == client.pid),
        "the client holds the connections: {busiest}"
    );
    let second = destination(&ns, "127.0.0.1:8001");
    assert_eq!(second["in_use"], 1);
    // The listener inside the range is named, with its process.
    assert_eq!(ns["listeners_in_range"], 1);
    let anti = &ns["anti_patterns"][0];
    assert_eq!(anti["kind"], "listener_in_range", "{ns}");
    assert_eq!(anti["port"], HIGH);
    assert!(
        anti["holders"]
            .as_array()
            .is_some_and(|h| h.iter().any(|h| h["pid"] == servers.pid)),
        "{anti}"
    );
    assert_eq!(ns["held_by"][0]["port"], HIGH);
    assert_eq!(ns["held_by"][0]["state"], "listening");

    // Closed connections keep their ports in TIME_WAIT.
    client.resume();
    let closed = client.results(9);
    assert!(closed.iter().all(|&r| r == 0), "closes: {closed:?}");
    let ns = namespace_until(&daemon, &netns, "the closed ports in TIME_WAIT", |ns| {
        ns["destinations"][0]["time_wait"] == 9
    });
    let busiest = &ns["destinations"][0];
    assert_eq!(busiest["destination"], "127.0.0.1:8000", "{ns}");
    assert_eq!(
        busiest["in_use"], 9,
        "TIME_WAIT still holds the ports: {ns}"
    );
    assert_eq!(busiest["established"], 0);

    // The CLI shows the same, as a table.
    let out = daemon.cli(&["ephemeral", "--netns", &netns.cookie().to_string()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("40000-40009"), "{text}");
    assert!(text.contains("127.0.0.1:8000"), "{text}");
    assert!(
        text.contains("listener_in_range") || text.contains("inside the ephemeral range"),
        "{text}"
    );

    client.resume();
    servers.resume();
}

#[test]
#[ignore = "needs root, BTF and cgroup2; run by `cargo xtask test`"]
fn udp_binds_to_port_zero_exhaust_the_range_and_the_failure_says_so() {
    let cgroup = CgroupGuard::new("ephemeral-udp");
    let netns = tiny_range("ephu");
    let daemon = daemon(&cgroup);

    // 11 UDP sockets bound to port 0: the range has 10 ports.
    let mut ops: Vec<Op> = (0..11)
        .flat_map(|sock| [Op::udp(false), Op::bind(sock, "0.0.0.0:0")])
        .collect();
    ops.push(Op::Pause);
    let mut worker = Worker::spawn(&cgroup.path, Some(&netns), &ops);
    let results = worker.results(22);
    let bound: Vec<i64> = results.iter().skip(1).step_by(2).copied().collect();
    assert_eq!(bound[..10], [0; 10], "{results:?}");
    assert_eq!(bound[10], -i64::from(libc::EADDRINUSE), "{results:?}");

    let ns = namespace_until(
        &daemon,
        &netns,
        "10 UDP ports in use, and the failure",
        |ns| {
            ns["udp"]["in_use"] == 10
                && ns["recent_failures"]
                    .as_array()
                    .is_some_and(|f| !f.is_empty())
        },
    );
    assert_eq!(ns["udp"]["usable"], 10);
    assert_eq!(ns["udp"]["utilization"], 1.0);
    let failure = &ns["recent_failures"][0];
    assert_eq!(failure["errno"], "EADDRINUSE");
    assert_eq!(failure["port"], 0);
    assert_eq!(failure["pid"], worker.pid);
    // A full range, not a conflict with one holder.
    assert_eq!(failure["blocked_by"], Value::Array(vec![]), "{failure}");
    assert_eq!(failure["ephemeral_range_exhausted"], true, "{failure}");
    worker.resume();
}

#[test]
#[ignore = "needs root, BTF and cgroup2; run by `cargo xtask test`"]
fn udp_sockets_on_random_ports_add_no_per_port_series() {
    const EACH: usize = 200;
    let cgroup = CgroupGuard::new("ephemeral-series");
    let netns = NetnsGuard::new("ephs");
    let daemon = daemon(&cgroup);
    let before = daemon.text("/metrics").1;

    // 200 UDP sockets bound to port 0, and 200 bound to port 0 then
    // connected: each gets a random port of the range.
    let mut ops = Vec::new();
    for sock in 0..2 * EACH {
        ops.extend([Op::udp(false), Op::bind(sock, "127.0.0.1:0")]);
        if sock >= EACH {
            ops.push(Op::Connect {
                sock,
                addr: "127.0.0.1:9".parse().unwrap(),
            });
        }
    }
    ops.push(Op::Pause);
    let mut worker = Worker::spawn(&cgroup.path, Some(&netns), &ops);
    let results = worker.results(ops.len() - 1);
    assert!(results.iter().all(|&r| r >= 0), "{results:?}");

    let udp4 = "portwatch_listeners_by_protocol{family=\"ipv4\",protocol=\"udp\"}";
    let baseline = support::daemon::sample(&before, udp4);
    let metrics = daemon.metrics_until("the 200 unconnected sockets counted", |text| {
        support::daemon::sample(text, udp4) >= baseline + EACH as f64
    });
    let per_port: Vec<&str> = metrics
        .lines()
        .filter(|line| {
            line.starts_with("portwatch_listeners{") || line.starts_with("portwatch_port_shared{")
        })
        .filter(|line| {
            let port = line
                .split("port=\"")
                .nth(1)
                .and_then(|rest| rest.split('"').next());
            port.and_then(|p| p.parse::<u16>().ok())
                .is_some_and(|port| (32768..=60999).contains(&port))
        })
        .collect();
    assert!(
        per_port.is_empty(),
        "per-port series in the ephemeral range: {per_port:?}"
    );
    let before_series = before
        .lines()
        .filter(|l| l.starts_with("portwatch_listeners{"))
        .count();
    let after_series = metrics
        .lines()
        .filter(|l| l.starts_with("portwatch_listeners{"))
        .count();
    assert!(
        after_series <= before_series + 1,
        "{before_series} listener series before, {after_series} after"
    );
    // The connected ones are no listeners: /ports is `ss -tuln`.
    let listing = daemon.until_listing_is_ss(&netns, "200 bound and 200 connected UDP sockets");
    assert_eq!(listing.len(), EACH, "{listing:?}");
    // Every one of them is known and counted in the namespace's UDP use.
    let ns = namespace_until(&daemon, &netns, "the 400 UDP ports in use", |ns| {
        ns["udp"]["in_use"] == 2 * EACH
    });
    assert_eq!(ns["udp"]["usable"], 28232);
    worker.resume();
}

#[test]
#[ignore = "needs root, BTF and cgroup2; run by `cargo xtask test`"]
fn sockets_bound_to_port_zero_before_connecting_are_named() {
    let cgroup = CgroupGuard::new("ephemeral-early");
    let netns = tiny_range("ephb");
    let daemon = daemon(&cgroup);
    // Two sockets bound to port 0 then connected, and one connected
    // without a bind (the right way).
    let mut ops = vec![Op::tcp(false), Op::bind(0, "127.0.0.1:8000"), Op::listen(0)];
    for sock in 1..=2 {
        ops.extend([
            Op::tcp(false),
            Op::bind(sock, "127.0.0.1:0"),
            Op::Connect {
                sock,
                addr: "127.0.0.1:8000".parse().unwrap(),
            },
        ]);
    }
    ops.extend(connects(1, "127.0.0.1:8000", 3));
    ops.push(Op::Pause);
    let mut worker = Worker::spawn(&cgroup.path, Some(&netns), &ops);
    let results = worker.results(ops.len() - 1);
    assert!(results.iter().all(|&r| r >= 0), "{results:?}");
    // The kernel counted the 3 new connections: the listing after them
    // has a rate (held until the next listing, a second later).
    namespace_until(&daemon, &netns, "a connection rate", |ns| {
        ns["connect_rate"].as_f64().is_some_and(|rate| rate > 0.0)
    });
    let ns = namespace_until(&daemon, &netns, "the early binds named", |ns| {
        ns["anti_patterns"]
            .as_array()
            .is_some_and(|all| all.iter().any(|a| a["kind"] == "bind_before_connect"))
    });
    let early: Vec<&Value> = ns["anti_patterns"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["kind"] == "bind_before_connect")
        .collect();
    assert_eq!(early.len(), 1, "{ns}");
    assert_eq!(early[0]["holders"][0]["pid"], worker.pid, "{ns}");
    assert!(
        early[0]["detail"]
            .as_str()
            .is_some_and(|d| d.starts_with("2 TCP sockets of")),
        "{ns}"
    );
    // Connected, their binds still hold their ports from every other
    // destination: 8 of the 10 are left.
    assert_eq!(ns["held"], 2, "{ns}");
    assert_eq!(ns["usable"], 8, "{ns}");
    let states: Vec<&Value> = ns["held_by"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| &h["state"])
        .collect();
    assert_eq!(states, ["bound, connected", "bound, connected"], "{ns}");
    // And they are no listeners.
    assert!(
        daemon
            .listing(netns.cookie())
            .iter()
            .all(|(_, _, port)| *port == 8000),
        "{ns}"
    );
    worker.resume();
}

#[test]
#[ignore = "needs root, BTF and cgroup2; run by `cargo xtask test`"]
fn udp_connects_exhaust_the_range_with_eagain_and_connected_ones_are_no_listeners() {
    let cgroup = CgroupGuard::new("ephemeral-udpc");
    let netns = tiny_range("ephc");
    // A UDP connect that finds no port is seen only by an outcome hook:
    // where outcomes are inferred it is not reported.
    let daemon = Daemon::start_with(&cgroup, &format!("{CONFIG}outcome = \"exact\"\n"), &[]);
    // 11 UDP sockets connected without a bind (autobind picks the port),
    // and one bound to 127.0.0.1:5353 then connected.
    let mut ops: Vec<Op> = (0..11)
        .flat_map(|sock| {
            [
                Op::udp(false),
                Op::Connect {
                    sock,
                    addr: "127.0.0.1:53".parse().unwrap(),
                },
            ]
        })
        .collect();
    ops.extend([
        Op::udp(false),
        Op::bind(11, "127.0.0.1:5353"),
        Op::Connect {
            sock: 11,
            addr: "127.0.0.1:53".parse().unwrap(),
        },
        Op::Pause,
    ]);
    let mut worker = Worker::spawn(&cgroup.path, Some(&netns), &ops);
    let results = worker.results(ops.len() - 1);
    let connected: Vec<i64> = results[..22].iter().skip(1).step_by(2).copied().collect();
    assert_eq!(connected[..10], [0; 10], "{results:?}");
    assert_eq!(connected[10], -i64::from(libc::EAGAIN), "{results:?}");
    assert!(results[22..].iter().all(|&r| r >= 0), "{results:?}");

    let failure = daemon.json_until(
        "/failures?errno=EAGAIN",
        "the UDP connect's EAGAIN",
        |body| body["failures"].as_array().is_some_and(|f| !f.is_empty()),
    )["failures"][0]
        .clone();
    assert_eq!(failure["kind"], "connect_failed", "{failure}");
    assert_eq!(failure["protocol"], "udp", "{failure}");
    assert_eq!(failure["destination"], "127.0.0.1:53", "{failure}");
    assert_eq!(failure["pid"], worker.pid, "{failure}");
    // The bound-then-connected socket is no listener: /ports is `ss -tuln`.
    daemon.until_listing_is_ss(&netns, "a bound UDP socket that connected");
    worker.resume();
}
