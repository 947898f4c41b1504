//! Remote access end to end: the real daemon serving its API over TLS with
//! basic auth (web_config), used the way an operator would from another
//! machine: raw HTTPS requests, the CLI with the CA and credentials from
//! the environment, the SSE stream over TLS, and a certificate rotated with
//! SIGHUP while the map stays.

mod support;

use std::{
    io::{BufRead, BufReader},
    process::{Command, Output, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use rustls::version::{TLS12, TLS13};
use serde_json::Value;
use support::{
    CgroupGuard, DEADLINE, Worker,
    daemon::Daemon,
    pki::{Pki, TlsAnswer, basic, bcrypt_hash, tls_get},
};

const USER: &str = "operator";
const PASSWORD: &str = "correct horse battery staple";

/// The body of an answer (the API answers with Content-Length).
fn body(answer: &TlsAnswer) -> &str {
    answer
        .response
        .split_once("\r\n\r\n")
        .map_or("", |(_, body)| body)
}

struct Remote {
    pki: Pki,
    daemon: Daemon,
}

impl Remote {
    fn start(cgroup: &CgroupGuard) -> Remote {
        let pki = Pki::new("remote-pki");
        let web = pki.dir.file(
            "web.yml",
            format!(
                "tls_server_config:\n  cert_file: server.pem\n  key_file: server.key\n  min_version: TLS12\nbasic_auth_users:\n  {USER}: {}\n",
                bcrypt_hash(PASSWORD)
            ),
        );
        let client = pki.client(&[&TLS13, &TLS12], false);
        let config = format!(
            "reconcile_interval = \"1h\"\nweb_config = \"{}\"\n",
            web.display()
        );
        let auth = basic(USER, PASSWORD);
        let daemon = Daemon::try_start_until(cgroup, &config, &[], "https", |daemon| {
            let addr = format!("127.0.0.1:{}", daemon.port).parse().unwrap();
            tls_get(addr, client.clone(), "/readyz", Some(&auth))
                .is_ok_and(|answer| answer.status() == 200 && !body(&answer).contains("\npending:"))
        })
        .unwrap_or_else(|(code, stderr)| panic!("the daemon exited with {code:?}: {stderr}"));
        Remote { pki, daemon }
    }

    fn get(&self, path: &str, authorization: Option<&str>) -> TlsAnswer {
        let addr = format!("127.0.0.1:{}", self.daemon.port).parse().unwrap();
        tls_get(addr, self.pki.client(&[&TLS13], false), path, authorization)
            .unwrap_or_else(|err| panic!("GET {path}: {err}"))
    }

    fn json(&self, path: &str) -> Value {
        let answer = self.get(path, Some(&basic(USER, PASSWORD)));
        assert_eq!(answer.status(), 200, "{}", answer.response);
        serde_json::from_str(body(&answer))
            .unwrap_or_else(|err| panic!("{err}: {}", answer.response))
    }

    /// The CLI against this daemon, with the CA, and `credentials` in the
    /// environment as a user would export them.
    fn cli(&self, args: &[&str], credentials: Option<(&str, &str)>, ca: bool) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_portwatch"));
        command
            .args(args)
            .args(["--server", &self.daemon.server])
            .env_remove("PORTWATCH_USER")
            .env_remove("PORTWATCH_PASSWORD")
            .env_remove("PORTWATCH_PASSWORD_FILE")
            .env_remove("PORTWATCH_CA_CERT");
        if ca {
            command.arg("--ca-cert").arg(&self.pki.ca_file);
        }
        if let Some((user, password)) = credentials {
            command
                .env("PORTWATCH_USER", user)
                .env("PORTWATCH_PASSWORD", password);
        }
        command
    }

    fn run(&self, args: &[&str], credentials: Option<(&str, &str)>, ca: bool) -> Output {
        self.cli(args, credentials, ca)
            .output()
            .expect("run the CLI")
    }
}

/// A failed CLI run says what went wrong in one line, naming `what`.
fn one_line_error(output: &Output, what: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "succeeded: {stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "not one line: {stderr}");
    assert!(stderr.contains(what), "{what:?} not in: {stderr}");
}

#[test]
#[ignore = "needs root, BTF and cgroup2; run by `cargo xtask test`"]
fn over_tls_with_basic_auth_the_api_and_the_cli_need_the_right_credentials() {
    let cgroup = CgroupGuard::new("remote-auth");
    let (_listener, port) = Worker::loopback_listener(&cgroup.path);
    let remote = Remote::start(&cgroup);
    let path = format!("/ports/{port}");

    let none = remote.get(&path, None);
    assert_eq!(none.status(), 401, "{}", none.response);
    assert!(
        none.response
            .to_lowercase()
            .contains("www-authenticate: basic")
    );
    assert_eq!(remote.get(&path, Some(&basic(USER, "wrong"))).status(), 401);
    let port_json = remote.json(&path);
    assert_eq!(port_json["port"], port, "{port_json}");
    assert_eq!(remote.get(&path, Some(&basic(USER, "wrong"))).status(), 401);
    // The failures are counted.
    let metrics = remote.get("/metrics", Some(&basic(USER, PASSWORD)));
    let failed = support::daemon::sample(
        body(&metrics),
        "portwatch_http_auth_failures_total{listener=\"api\"}",
    );
    assert_eq!(failed, 3.0, "{}", body(&metrics));

    // The CLI, as an operator runs it with exported credentials.
    let ok = remote.run(&["ports"], Some((USER, PASSWORD)), true);
    assert!(ok.status.success(), "{}", support::said(&ok));
    assert!(
        String::from_utf8_lossy(&ok.stdout).contains(&format!(":{port}")),
        "{}",
        support::said(&ok)
    );
    let explained = remote.run(
        &["explain", &port.to_string()],
        Some((USER, PASSWORD)),
        true,
    );
    assert!(explained.status.success(), "{}", support::said(&explained));
    one_line_error(&remote.run(&["ports"], Some((USER, "wrong")), true), "401");
    one_line_error(&remote.run(&["ports"], None, true), "401");
    // Without the CA the daemon's certificate is not trusted.
    one_line_error(
        &remote.run(&["ports"], Some((USER, PASSWORD)), false),
        "--ca-cert",
    );
}

#[test]
#[ignore = "needs root, BTF and cgroup2; run by `cargo xtask test`"]
fn the_event_stream_works_over_tls() {
    let cgroup = CgroupGuard::new("remote-sse");
    let remote = Remote::start(&cgroup);
    let mut watch = remote
        .cli(&["watch"], Some((USER, PASSWORD)), true)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start portwatch watch");
    let (lines, seen) = mpsc::channel();
    let stdout = watch.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    // Listeners are made until the stream shows one (the stream may connect
    // after the first).
    let deadline = Instant::now() + *DEADLINE;
    let mut workers = Vec::new();
    let found = 'outer: loop {
        let (worker, port) = Worker::loopback_listener(&cgroup.path);
        workers.push(worker);
        let until = Instant::now() + Duration::from_secs(2);
        while let Ok(line) = seen.recv_timeout(until.saturating_duration_since(Instant::now())) {
            if line.contains(&format!(":{port}")) {
                break 'outer true;
            }
        }
        if Instant::now() > deadline {
            break false;
        }
    };
    let _ = watch.kill();
    let output = watch.wait_with_output().expect("wait for watch");
    assert!(
        found,
        "no event over TLS; stderr: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
#[ignore = "needs root, BTF and cgroup2; run by `cargo xtask test`"]
fn sighup_serves_a_rotated_certificate_and_keeps_the_map() {
    let cgroup = CgroupGuard::new("remote-hup");
    let (_listener, port) = Worker::loopback_listener(&cgroup.path);
    let mut remote = Remote::start(&cgroup);
    let path = format!("/ports/{port}");
    let before = remote.json(&path);
    let first_cert = remote.get("/livez", None).server_cert;

    // A SIGHUP with nothing changed: the daemon stays (SIGHUP's default
    // action would end it) and serves the same certificate.
    let pid = remote.daemon.child.id() as i32;
    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid, libc::SIGHUP) };
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        remote.daemon.child.try_wait().unwrap().is_none(),
        "SIGHUP ended the daemon"
    );
    assert_eq!(remote.get("/livez", None).server_cert, first_cert);

    let rotated = remote.pki.issue_server();
    unsafe { libc::kill(pid, libc::SIGHUP) };
    let deadline = Instant::now() + *DEADLINE;
    while remote.get("/livez", None).server_cert != rotated {
        assert!(
            Instant::now() < deadline,
            "the rotated certificate is not served"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        remote.json(&path),
        before,
        "the map changed across the reload"
    );
    assert!(remote.daemon.child.try_wait().unwrap().is_none());
}
