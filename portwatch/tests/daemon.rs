//! End-to-end: the real `portwatch daemon` binary watching a private
//! cgroup, the seed scenarios made with real sockets in a private network
//! namespace, and everything checked the way a user would: HTTP requests,
//! the metrics text, `promtool`, and the CLI with its exit codes.

mod support;

use std::{
    io::{BufRead, BufReader},
    process::Command,
    sync::mpsc,
    time::{Duration, Instant},
};

use serde_json::Value;
use support::{
    CgroupGuard, DEADLINE, NetnsGuard, Op, Worker,
    daemon::{Daemon, EADDRINUSE_TCP4, sample},
};

#[test]
#[ignore = "needs root, BTF and cgroup2; run by `cargo xtask test`"]
fn a_user_sees_the_seed_scenarios_over_http_metrics_and_the_cli() {
    let (cgroup, netns) = (CgroupGuard::new("daemon"), NetnsGuard::new("daemon"));
    let ns = netns.cookie();
    let daemon = Daemon::start(&cgroup);
    let before = sample(&daemon.text("/metrics").1, EADDRINUSE_TCP4);

    // The seed article: IPv4 and IPv6 on :8000 from two processes, a UDP
    // socket on the same port, and N binds that collide.
    let mut four = Worker::spawn(
        &cgroup.path,
        Some(&netns),
        &[
            Op::tcp(false),
            Op::bind(0, "0.0.0.0:8000"),
            Op::listen(0),
            Op::Pause,
        ],
    );
    let mut six = Worker::spawn(
        &cgroup.path,
        Some(&netns),
        &[
            Op::tcp(true),
            Op::v6only(0),
            Op::bind(0, "[::]:8000"),
            Op::listen(0),
            Op::udp(false),
            Op::bind(1, "0.0.0.0:8000"),
            Op::Pause,
        ],
    );
    assert!(four.results(3).iter().all(|r| *r >= 0));
    assert!(six.results(6).iter().all(|r| *r >= 0));
    const N: usize = 5;
    let mut ops = Vec::new();
    for sock in 0..N {
        ops.extend([Op::tcp(false), Op::bind(sock, "127.0.0.1:8000")]);
    }
    let mut failing = Worker::spawn(&cgroup.path, Some(&netns), &ops);
    let results = failing.results(ops.len());
    assert!(
        results
            .iter()
            .skip(1)
            .step_by(2)
            .all(|r| *r == -i64::from(libc::EADDRINUSE))
    );
    failing.wait();

    // /ports/8000, in that namespace.
    let path = format!("/ports/8000?netns={ns}");
    let port = daemon.json_until(&path, "three listeners", |v| {
        v["listeners"].as_array().is_some_and(|l| l.len() == 3)
    });
    assert_eq!(port["shared"], true);
    let flags: Vec<&str> = port["flags"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(flags.contains(&"dual_stack_split"), "{port}");
    let pids: Vec<u64> = port["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|l| {
            l["pids"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(Value::as_u64)
        })
        .collect();
    assert!(
        pids.contains(&u64::from(four.pid)) && pids.contains(&u64::from(six.pid)),
        "{port}"
    );

    // /failures names the blocker of each of the N failures.
    let failures = daemon.json_until("/failures?port=8000&errno=EADDRINUSE", "N failures", |v| {
        v["failures"]
            .as_array()
            .is_some_and(|f| f.iter().filter(|x| x["pid"] == failing.pid).count() == N)
    });
    for failure in failures["failures"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["pid"] == failing.pid)
    {
        let blocker = &failure["blocked_by"][0];
        assert_eq!(blocker["endpoint"], "0.0.0.0:8000", "{failure}");
        assert_eq!(blocker["holders"][0]["pid"], four.pid, "{failure}");
    }

    // The metric rose by exactly N; promtool accepts the text.
    let metrics = daemon.text("/metrics").1;
    assert_eq!(
        sample(&metrics, EADDRINUSE_TCP4) - before,
        N as f64,
        "{metrics}"
    );
    let (ok, said) = support::promtool(&["check", "metrics"], metrics.as_bytes());
    assert!(ok, "promtool: {said}");

    // /check: the predictor, in that namespace.
    let check = daemon.json(&format!(
        "/check?protocol=tcp&address=127.0.0.1&port=8000&netns={ns}"
    ));
    assert_eq!(
        (check["ok"].clone(), check["errno"].clone()),
        (Value::Bool(false), "EADDRINUSE".into())
    );
    let free = daemon.json(&format!(
        "/check?protocol=tcp&address=127.0.0.1&port=8001&netns={ns}"
    ));
    assert_eq!(free["ok"], true);

    // Bad input: a clear 4xx problem, never a 5xx.
    for bad in [
        "/ports/0",
        "/ports/65536",
        "/ports/abc",
        "/ports/8000?protocol=icmp",
        "/failures?limit=0",
    ] {
        let (status, body) = daemon.text(bad);
        assert!((400..500).contains(&status), "{bad}: {status} {body}");
        assert!(body.contains("\"detail\""), "{bad}: {body}");
    }

    // The CLI: table, JSON, sentences and exit codes.
    let ns_arg = ns.to_string();
    let table = daemon.cli(&["ports", "8000"]);
    let table_text = String::from_utf8_lossy(&table.stdout);
    assert!(table.status.success(), "{table:?}");
    assert!(
        table_text.contains("0.0.0.0:8000") && table_text.contains("[::]:8000"),
        "{table_text}"
    );
    let json = daemon.cli(&["ports", "8000", "-o", "json"]);
    let parsed: Value = serde_json::from_slice(&json.stdout).expect("ports -o json is JSON");
    assert_eq!(parsed["port"], 8000);
    let explain = daemon.cli(&["explain", "8000"]);
    let sentences = String::from_utf8_lossy(&explain.stdout);
    assert!(
        sentences.contains("listen on port 8000") && sentences.contains("EADDRINUSE"),
        "{sentences}"
    );
    let refused = daemon.cli(&["check", "tcp", "127.0.0.1:8000", "--netns", &ns_arg]);
    assert_eq!(refused.status.code(), Some(1), "{refused:?}");
    let allowed = daemon.cli(&["check", "tcp", "127.0.0.1:8001", "--netns", &ns_arg]);
    assert_eq!(allowed.status.code(), Some(0), "{allowed:?}");
    let failures_cli = daemon.cli(&["failures", "--port", "8000", "--errno", "EADDRINUSE"]);
    assert!(
        String::from_utf8_lossy(&failures_cli.stdout).contains("blocked by a listener"),
        "{failures_cli:?}"
    );

    // The other seed experiments, each on its own port: SO_REUSEPORT twice,
    // two IPv4 addresses, and a wildcard beside a specific address.
    let mut group = Vec::new();
    for addr in [
        "127.0.0.1:8002",
        "127.0.0.1:8002",
        "127.0.0.1:8003",
        "127.0.0.2:8003",
        "0.0.0.0:8004",
        "127.0.0.1:8004",
    ] {
        let ops = [
            Op::tcp(false),
            Op::reuseport(0),
            Op::bind(0, addr),
            Op::listen(0),
            Op::Pause,
        ];
        let mut worker = Worker::spawn(&cgroup.path, Some(&netns), &ops);
        assert!(worker.results(4).iter().all(|r| *r >= 0), "{addr}");
        group.push(worker);
    }
    let explained = |port: u16, what: &str| {
        daemon.json_until(&format!("/ports/{port}?netns={ns}"), what, |v| {
            v["listeners"].as_array().is_some_and(|l| l.len() == 2)
        })
    };
    let kinds = |v: &Value| -> Vec<String> {
        v["sharing"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["kind"].as_str().unwrap().to_owned())
            .collect()
    };
    let names = |v: &Value| -> Vec<String> {
        v["flags"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f.as_str().unwrap().to_owned())
            .collect()
    };
    let pair = explained(8002, "the reuseport pair");
    assert!(
        names(&pair).contains(&"reuseport_group".to_owned()),
        "{pair}"
    );
    let two = explained(8003, "two addresses");
    assert_eq!(kinds(&two), ["different_address"], "{two}");
    let wild = explained(8004, "wildcard and specific");
    assert!(
        names(&wild).contains(&"wildcard_and_specific".to_owned()),
        "{wild}"
    );
    for mut worker in group {
        worker.resume();
    }

    four.resume();
    six.resume();
    let (code, stderr) = daemon.stop();
    assert_eq!(code, Some(0), "a clean stop on SIGTERM: {stderr}");
}

#[test]
#[ignore = "needs root, BTF and cgroup2; run by `cargo xtask test`"]
fn events_stream_live_over_sse() {
    let (cgroup, netns) = (CgroupGuard::new("sse"), NetnsGuard::new("sse"));
    let daemon = Daemon::start(&cgroup);
    let url = format!("{}/events?port=8123", daemon.server);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let response = Daemon::agent().get(&url).call().expect("open /events");
        for line in BufReader::new(response.into_body().into_reader())
            .lines()
            .map_while(Result::ok)
        {
            if let Some(data) = line.strip_prefix("data:")
                && tx.send(data.trim().to_owned()).is_err()
            {
                return;
            }
        }
    });
    // Give the stream a moment to be subscribed, then bind until it is seen.
    let deadline = Instant::now() + *DEADLINE;
    loop {
        let mut worker = Worker::spawn(
            &cgroup.path,
            Some(&netns),
            &[Op::tcp(false), Op::bind(0, "127.0.0.1:8123")],
        );
        worker.results(2);
        worker.wait();
        if let Ok(data) = rx.recv_timeout(Duration::from_millis(500)) {
            let event: Value = serde_json::from_str(&data).expect("an event is JSON");
            assert_eq!(event["port"], 8123, "{event}");
            assert!(
                event["kind"] == "bind" || event["kind"] == "close",
                "{event}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "no event arrived on /events");
    }
    daemon.stop();
}

/// With `allow_unauthenticated_remote = true` the API serves an address
/// other than loopback, and the daemon says at start what that exposes.
/// The address is one of a private network namespace's (the daemon runs in
/// it through `nsenter --net`), so nothing outside the test can reach it.
#[test]
#[ignore = "needs root, BTF and cgroup2; run by `cargo xtask test`"]
fn an_api_beyond_loopback_serves_when_allowed_and_warns() {
    let (cgroup, netns) = (CgroupGuard::new("remote"), NetnsGuard::new("remote"));
    netns.ip(&["addr", "add", "192.0.2.7/32", "dev", "lo"]);
    let addr = "192.0.2.7:7464";
    let dir = support::TempDir::new("remote");
    let config = dir.file(
        "portwatch.toml",
        "allow_unauthenticated_remote = true\nreconcile_interval = \"1h\"\n",
    );
    let enter = format!("--net={}", netns.path().display());
    let mut daemon = support::portwatch_command(&["nsenter", &enter])
        .arg("daemon")
        .arg("--config")
        .arg(&config)
        .arg("--cgroup")
        .arg(&cgroup.path)
        .args(["--listen", addr])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start the daemon");
    let url = format!("http://{addr}/ports");
    let deadline = Instant::now() + *DEADLINE;
    let answered = loop {
        let status = netns.run_in(|| Daemon::agent().get(&url).call().map(|r| r.status()));
        if matches!(&status, Ok(status) if status.as_u16() == 200) {
            break true;
        }
        if daemon.try_wait().expect("the daemon's status").is_some() || Instant::now() > deadline {
            break false;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    // SAFETY: signalling our own child.
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    let output = daemon.wait_with_output().expect("wait for the daemon");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        answered,
        "GET {url} from the namespace never answered 200: {stderr}"
    );
    assert!(
        stderr.contains(
            "the API listens on 192.0.2.7:7464, which is not a loopback address, without authentication"
        ),
        "{stderr}"
    );
    assert!(output.status.success(), "{:?}: {stderr}", output.status);
}

/// No root needed: the configuration is only read and checked.
#[test]
fn check_config_validates_without_starting() {
    let dir = support::TempDir::new("cfg");
    let config = dir.file("portwatch.toml", "listen = \"127.0.0.1:7999\"\n");
    let ok = Command::new(env!("CARGO_BIN_EXE_portwatch"))
        .args(["daemon", "--check-config", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(ok.status.success(), "{ok:?}");
    assert!(String::from_utf8_lossy(&ok.stdout).contains("listen 127.0.0.1:7999"));
    std::fs::write(&config, "listen = \"127.0.0.1:7999\"\nbogus = 1\n").unwrap();
    let bad = Command::new(env!("CARGO_BIN_EXE_portwatch"))
        .args(["daemon", "--check-config", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    // EX_CONFIG: the unit keeps it out of the restart loop.
    assert_eq!(bad.status.code(), Some(78));
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(
        stderr.contains("line 2, key bogus: unknown field `bogus`") && stderr.lines().count() == 1,
        "{stderr}"
    );
}

#[test]
fn the_cli_says_when_no_daemon_runs() {
    // Port 1 on loopback: nothing listens there.
    for args in [&["ports"][..], &["explain", "80"], &["failures"]] {
        let output = Command::new(env!("CARGO_BIN_EXE_portwatch"))
            .args(args)
            .args(["--server", "http://127.0.0.1:1"])
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(1), "{args:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(
            stderr.contains("no portwatch daemon answers") && stderr.contains("portwatch daemon"),
            "{stderr}"
        );
    }
    let check = Command::new(env!("CARGO_BIN_EXE_portwatch"))
        .args([
            "check",
            "tcp",
            "0.0.0.0:80",
            "--server",
            "http://127.0.0.1:1",
        ])
        .output()
        .unwrap();
    assert_eq!(check.status.code(), Some(2), "check: 2 on error");
}

/// Runs `bpftool -j ARGS` and parses its JSON (an empty answer is `[]`).
fn bpftool(args: &[&str]) -> Value {
    let out = support::run_tool(Command::new("bpftool").arg("-j").args(args), "bpftool", b"");
    assert!(
        out.status.success(),
        "bpftool {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    if text.trim().is_empty() {
        return Value::Array(Vec::new());
    }
    serde_json::from_str(&text).unwrap_or_else(|err| panic!("bpftool {args:?}: {err}: {text}"))
}

/// The ids of the BPF programs process `pid` holds, from its fdinfo.
fn held_programs(pid: u32) -> std::collections::BTreeSet<u64> {
    let mut ids = std::collections::BTreeSet::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fdinfo")).unwrap() {
        let info = std::fs::read_to_string(entry.unwrap().path()).unwrap_or_default();
        ids.extend(info.lines().filter_map(|line| {
            line.strip_prefix("prog_id:")
                .and_then(|id| id.trim().parse::<u64>().ok())
        }));
    }
    ids
}

/// What the user sees of the listeners in `netns`: (address, port,
/// protocol, pids, reuse_port), sorted.
fn listeners_in(daemon: &Daemon, netns: u64) -> Vec<String> {
    let ports = daemon.json("/ports");
    let mut seen: Vec<String> = ports["ports"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["port"].as_u64())
        .flat_map(|port| {
            let detail = daemon.json(&format!("/ports/{port}?netns={netns}"));
            detail["listeners"].as_array().cloned().unwrap_or_default()
        })
        .map(|l| {
            format!(
                "{} {} {} {} reuse_port={}",
                l["protocol"], l["endpoint"], l["state"], l["pids"], l["reuse_port"]
            )
        })
        .collect();
    seen.sort();
    seen
}

#[test]
#[ignore = "needs root, BTF and cgroup2; run by `cargo xtask test`"]
fn sigkill_leaves_nothing_attached_and_a_restart_rebuilds_the_map() {
    let (cgroup, netns) = (CgroupGuard::new("sigkill"), NetnsGuard::new("sigkill"));
    let mut holder = Worker::spawn(
        &cgroup.path,
        Some(&netns),
        &[
            Op::tcp(false),
            Op::reuseport(0),
            Op::bind(0, "0.0.0.0:7100"),
            Op::listen(0),
            Op::udp(true),
            Op::bind(1, "[::]:7100"),
            Op::Pause,
        ],
    );
    assert!(holder.results(6).iter().all(|r| *r >= 0));

    let daemon = Daemon::start(&cgroup);
    let before = listeners_in(&daemon, netns.cookie());
    assert_eq!(before.len(), 2, "{before:?}");
    let programs = held_programs(daemon.child.id());
    let attached = bpftool(&["cgroup", "show", cgroup.path.to_str().unwrap()]);
    let attached: Vec<u64> = attached
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["id"].as_u64())
        .collect();
    assert!(
        attached.len() >= 4 && attached.iter().all(|id| programs.contains(id)),
        "the cgroup holds the daemon's programs: {attached:?} of {programs:?}"
    );

    // SIGKILL: no chance to detach anything itself.
    let mut daemon = daemon;
    daemon.child.kill().unwrap();
    daemon.child.wait().unwrap();
    // The kernel frees programs after an RCU grace period.
    support::until("nothing attached or loaded after SIGKILL", || {
        let left = bpftool(&["cgroup", "show", cgroup.path.to_str().unwrap()]);
        let loaded: Vec<u64> = bpftool(&["prog", "show"])
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|p| p["id"].as_u64())
            .filter(|id| programs.contains(id))
            .collect();
        if left.as_array().unwrap().is_empty() && loaded.is_empty() {
            Ok(())
        } else {
            Err(format!("still attached: {left}; still loaded: {loaded:?}"))
        }
    });

    // A new daemon finds the same listeners, owners and options.
    let again = Daemon::start(&cgroup);
    assert_eq!(listeners_in(&again, netns.cookie()), before);
    holder.resume();
    let (code, stderr) = again.stop();
    assert_eq!(code, Some(0), "{stderr}");
}

#[test]
#[ignore = "needs root, BTF and cgroup2; run by `cargo xtask test`"]
fn slow_clients_are_cut_off_and_cannot_starve_the_api() {
    use std::{
        io::{ErrorKind, Read as _, Write as _},
        net::TcpStream,
    };
    let cgroup = CgroupGuard::new("slow");
    let daemon = Daemon::start(&cgroup);
    let addr = daemon.server.trim_start_matches("http://").to_owned();
    // More clients than the daemon serves at once, each sending half a
    // request and then nothing (slowloris).
    const SLOW: usize = 300;
    let started = Instant::now();
    let mut slow: Vec<TcpStream> = (0..SLOW)
        .map(|_| {
            let mut stream = TcpStream::connect(&addr).expect("connect");
            stream
                .write_all(b"GET /livez HTTP/1.1\r\nHost: portwatch\r\n")
                .unwrap();
            stream
        })
        .collect();

    // A well-behaved client is still answered, at worst once the slow ones
    // ahead of it time out.
    let mut good = TcpStream::connect(&addr).unwrap();
    good.set_read_timeout(Some(Duration::from_secs(40)))
        .unwrap();
    good.write_all(b"GET /readyz HTTP/1.1\r\nHost: portwatch\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    good.read_to_string(&mut answer).expect("an answer");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    // Every slow connection is closed by the daemon (EOF or reset).
    for stream in &mut slow {
        stream
            .set_read_timeout(Some(Duration::from_secs(40)))
            .unwrap();
        let mut buf = [0u8; 512];
        loop {
            match stream.read(&mut buf) {
                Err(err) if matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    panic!(
                        "a slow connection was held open for {:?}",
                        started.elapsed()
                    )
                }
                Ok(0) | Err(_) => break,
                // A 408 before the close is fine too.
                Ok(_) => continue,
            }
        }
    }
    assert!(
        started.elapsed() < Duration::from_secs(40),
        "slow connections were held for {:?}",
        started.elapsed()
    );
    let (code, stderr) = daemon.stop();
    assert_eq!(code, Some(0), "{stderr}");
}
