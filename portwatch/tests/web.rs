//! The listeners' TLS and basic auth (web_config), end to end over real
//! sockets on loopback, without root: the daemon's own accept loop and
//! gate serve a small router, and rustls clients made for each case talk
//! to it. Certificates are made by each test (support/pki.rs).

mod support;

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use axum::{Router, routing::get};
use portwatch::web::{Gate, Reloaded, Settings, WebMetrics, serve::serve};
use rustls::{
    pki_types::pem::PemObject as _,
    version::{TLS12, TLS13},
};
use support::{
    DEADLINE,
    pki::{Pki, basic, bcrypt_hash, tls_get},
};

/// One listener served on a runtime of its own, stopped on drop.
struct Served {
    addr: SocketAddr,
    gate: Arc<Gate>,
    registry: prometheus::Registry,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Served {
    fn start(web_yml: &Path) -> Served {
        Served::start_as(web_yml, false)
    }

    /// `must_authenticate`: as the API beyond loopback.
    fn start_as(web_yml: &Path, must_authenticate: bool) -> Served {
        let settings = Settings::load(web_yml).unwrap_or_else(|err| panic!("{err}"));
        let metrics = WebMetrics::new().unwrap();
        let registry = prometheus::Registry::new();
        metrics.register(&registry).unwrap();
        let gate = Gate::new("api", settings, must_authenticate, &metrics);
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let serving = gate.clone();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                addr_tx.send(listener.local_addr().unwrap()).unwrap();
                let hangup =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).unwrap();
                tokio::spawn(portwatch::web::reload::run(
                    vec![serving.clone()],
                    hangup,
                    std::future::pending(),
                ));
                let router = serving
                    .guard(Router::new().route("/ports/{port}", get(|| async { "listeners" })));
                serve(listener, router, serving, async {
                    let _ = stopped.await;
                })
                .await;
            });
        });
        Served {
            addr: addr_rx.recv().unwrap(),
            gate,
            registry,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    fn metric(&self, name: &str) -> f64 {
        let text = prometheus::TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap();
        support::daemon::sample(&text, name)
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.stop.take().map(|stop| stop.send(()));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn web_yml(pki: &Pki, extra: &str) -> std::path::PathBuf {
    pki.dir.file(
        "web.yml",
        format!("tls_server_config:\n  cert_file: server.pem\n  key_file: server.key\n{extra}"),
    )
}

#[test]
fn basic_auth_over_tls_refuses_until_the_right_password() {
    let pki = Pki::new("web-auth");
    let path = web_yml(
        &pki,
        &format!(
            "http_server_config:\n  headers:\n    X-Frame-Options: deny\nbasic_auth_users:\n  alice: {}\n",
            bcrypt_hash("s3cret")
        ),
    );
    let served = Served::start(&path);
    let client = pki.client(&[&TLS13, &TLS12], false);
    let get =
        |auth: Option<&str>| tls_get(served.addr, client.clone(), "/ports/8080", auth).unwrap();

    let none = get(None);
    assert_eq!(none.status(), 401, "{}", none.response);
    assert!(
        none.response
            .to_lowercase()
            .contains("www-authenticate: basic"),
        "{}",
        none.response
    );
    assert!(
        none.response
            .to_lowercase()
            .contains("x-frame-options: deny")
    );
    assert_eq!(get(Some(&basic("alice", "wrong"))).status(), 401);
    assert_eq!(get(Some(&basic("mallory", "s3cret"))).status(), 401);

    let right = get(Some(&basic("alice", "s3cret")));
    assert_eq!(right.status(), 200, "{}", right.response);
    assert!(right.response.ends_with("listeners"), "{}", right.response);
    assert!(
        right
            .response
            .to_lowercase()
            .contains("x-frame-options: deny")
    );
    // CVE-2022-46146: a right login is remembered; a wrong one after it
    // must still be refused.
    for wrong in ["s3cre", "s3cret2", "S3cret"] {
        assert_eq!(get(Some(&basic("alice", wrong))).status(), 401, "{wrong}");
    }
    assert_eq!(get(Some(&basic("alice", "s3cret"))).status(), 200);
    assert_eq!(
        served.metric("portwatch_http_auth_failures_total{listener=\"api\"}"),
        6.0
    );
}

#[test]
fn plain_http_to_the_tls_port_gets_no_answer() {
    let pki = Pki::new("web-plain");
    let served = Served::start(&web_yml(&pki, ""));
    let mut tcp = TcpStream::connect(served.addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    tcp.write_all(b"GET /ports/8080 HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut answer = Vec::new();
    let _ = tcp.read_to_end(&mut answer);
    let text = String::from_utf8_lossy(&answer);
    assert!(
        !text.contains("HTTP/1.1"),
        "plain HTTP got an answer: {text:?}"
    );
    assert!(!text.contains("listeners"), "{text:?}");
    // The listener still serves TLS.
    let ok = tls_get(
        served.addr,
        pki.client(&[&TLS13], false),
        "/ports/8080",
        None,
    )
    .unwrap();
    assert_eq!(ok.status(), 200);
}

#[test]
fn tls12_is_refused_under_min_version_tls13() {
    let pki = Pki::new("web-tls13");
    let served = Served::start(&web_yml(&pki, "  min_version: TLS13\n"));
    let refused = tls_get(served.addr, pki.client(&[&TLS12], false), "/ports/1", None);
    assert!(refused.is_err(), "a TLS 1.2 client was served");
    let served13 = tls_get(served.addr, pki.client(&[&TLS13], false), "/ports/1", None).unwrap();
    assert_eq!(served13.status(), 200);

    // By default both are served.
    let pki = Pki::new("web-tls12");
    let served = Served::start(&web_yml(&pki, ""));
    let ok = tls_get(served.addr, pki.client(&[&TLS12], false), "/ports/1", None).unwrap();
    assert_eq!(ok.status(), 200);
}

#[test]
fn mutual_tls_needs_a_certificate_from_the_ca() {
    let pki = Pki::new("web-mtls");
    let served = Served::start(&web_yml(
        &pki,
        "  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: ca.pem\n",
    ));
    for versions in [&[&TLS13][..], &[&TLS12][..]] {
        let without = tls_get(served.addr, pki.client(versions, false), "/ports/1", None);
        assert!(without.is_err(), "served without a client certificate");
        let with = tls_get(served.addr, pki.client(versions, true), "/ports/1", None).unwrap();
        assert_eq!(with.status(), 200, "{}", with.response);
    }
    // A certificate from another CA is refused: give the client the other
    // CA's client pair, trusting our server.
    let other = Pki::new("web-mtls-other");
    std::fs::copy(&pki.ca_file, &other.ca_file).unwrap();
    let foreign = tls_get(served.addr, other.client(&[&TLS13], true), "/ports/1", None);
    assert!(
        foreign.is_err(),
        "a certificate from another CA was accepted"
    );
}

#[test]
fn a_reload_serves_the_new_certificate_and_a_broken_file_keeps_the_old() {
    let mut pki = Pki::new("web-reload");
    let path = web_yml(&pki, "");
    let served = Served::start(&path);
    let client = pki.client(&[&TLS13], false);
    let first = tls_get(served.addr, client.clone(), "/ports/1", None).unwrap();

    let second_der = pki.issue_server();
    assert_ne!(first.server_cert, second_der);
    // The file watch may already have picked it up; either way, after a
    // reload the new certificate is what a new connection sees.
    let reloaded = served.gate.reload();
    assert!(
        matches!(reloaded, Reloaded::Changed | Reloaded::Unchanged),
        "{reloaded:?}"
    );
    let second = tls_get(served.addr, client.clone(), "/ports/1", None).unwrap();
    assert_eq!(second.server_cert, second_der);

    // A broken file: the old settings stay, and the gauge says so.
    std::fs::write(
        &path,
        "tls_server_config:\n  cert_file: missing.pem\n  key_file: server.key\n",
    )
    .unwrap();
    assert!(matches!(served.gate.reload(), Reloaded::Failed(err) if err.contains("missing.pem")));
    let still = tls_get(served.addr, client, "/ports/1", None).unwrap();
    assert_eq!(still.server_cert, second_der);
    assert_eq!(
        served.metric("portwatch_web_config_last_reload_successful{listener=\"api\"}"),
        0.0
    );
}

#[test]
fn a_reload_cannot_turn_authentication_or_tls_off() {
    let pki = Pki::new("web-downgrade");
    let users = format!("basic_auth_users:\n  alice: {}\n", bcrypt_hash("s3cret"));
    let path = web_yml(&pki, &users);
    let served = Served::start_as(&path, true);
    let client = pki.client(&[&TLS13], false);
    // An edit that drops the users (or a file read half-written, empty):
    // refused on a listener that must authenticate.
    for without_users in ["tls", "empty"] {
        if without_users == "tls" {
            web_yml(&pki, "");
        } else {
            pki.dir.file("web.yml", "");
        }
        let reloaded = served.gate.reload();
        let why = if without_users == "tls" {
            "no password"
        } else {
            "TLS off"
        };
        assert!(
            matches!(&reloaded, Reloaded::Failed(err) if err.contains(why)),
            "{without_users}: {reloaded:?}"
        );
        let answer = tls_get(served.addr, client.clone(), "/ports/1", None).unwrap();
        assert_eq!(answer.status(), 401, "{}", answer.response);
    }
    // Plain HTTP with the users kept: TLS is not turned off by a reload.
    pki.dir.file("web.yml", &users);
    assert!(matches!(served.gate.reload(), Reloaded::Failed(err) if err.contains("TLS off")));
    let answer = tls_get(
        served.addr,
        client,
        "/ports/1",
        Some(&basic("alice", "s3cret")),
    )
    .unwrap();
    assert_eq!(answer.status(), 200);
}

#[test]
fn a_rotated_certificate_is_picked_up_without_a_signal() {
    let mut pki = Pki::new("web-watch");
    let served = Served::start(&web_yml(&pki, ""));
    let client = pki.client(&[&TLS13], false);
    let before = tls_get(served.addr, client.clone(), "/ports/1", None).unwrap();
    let rotated = pki.issue_server();
    assert_ne!(before.server_cert, rotated);
    let deadline = Instant::now() + *DEADLINE;
    loop {
        let now = tls_get(served.addr, client.clone(), "/ports/1", None).unwrap();
        if now.server_cert == rotated {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the rotated certificate was not served within {:?}",
            *DEADLINE
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until a new connection gets `cert`.
fn until_served(served: &Served, client: &Arc<rustls::ClientConfig>, cert: &[u8], what: &str) {
    let deadline = Instant::now() + *DEADLINE;
    while tls_get(served.addr, client.clone(), "/ports/1", None)
        .unwrap()
        .server_cert
        != cert
    {
        assert!(
            Instant::now() < deadline,
            "{what}: not served within {:?}",
            *DEADLINE
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_directory_swapped_whole_is_watched_again() {
    // Some rotation tools write a new directory and rename it over the old.
    let mut pki = Pki::new("web-swap");
    let served = Served::start(&web_yml(&pki, ""));
    let client = pki.client(&[&TLS13], false);
    // Served, so the watches are in place.
    tls_get(served.addr, client.clone(), "/ports/1", None).unwrap();
    let dir = pki.dir.path.clone();
    let fresh = dir.with_extension("new");
    let old = dir.with_extension("old");
    // Removed however the test ends, as the TempDir is.
    struct Siblings([std::path::PathBuf; 2]);
    impl Drop for Siblings {
        fn drop(&mut self) {
            for dir in &self.0 {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }
    let _siblings = Siblings([fresh.clone(), old.clone()]);
    std::fs::create_dir(&fresh).unwrap();
    for name in ["web.yml", "ca.pem"] {
        std::fs::copy(dir.join(name), fresh.join(name)).unwrap();
    }
    let (cert, key) = pki.issue("swapped", vec!["localhost".into()]);
    std::fs::write(fresh.join("server.key"), key).unwrap();
    std::fs::write(fresh.join("server.pem"), &cert).unwrap();
    std::fs::rename(&dir, &old).unwrap();
    std::fs::rename(&fresh, &dir).unwrap();
    let swapped = rustls::pki_types::CertificateDer::from_pem_slice(cert.as_bytes())
        .unwrap()
        .to_vec();
    until_served(
        &served,
        &client,
        &swapped,
        "the swapped directory's certificate",
    );
    // The new directory is watched: a rotation inside it is seen too.
    let rotated = pki.issue_server();
    until_served(
        &served,
        &client,
        &rotated,
        "a rotation in the swapped directory",
    );
    std::fs::remove_dir_all(&old).unwrap();
}

#[test]
fn web_configs_portwatch_cannot_honour_are_refused_by_name() {
    let pki = Pki::new("web-refused");
    let hash = bcrypt_hash("x");
    for (extra, named) in [
        ("  min_version: TLS10\n", "min_version"),
        ("  max_version: TLS11\n", "max_version"),
        (
            "  client_auth_type: RequestClientCert\n",
            "client_auth_type",
        ),
        (
            "  client_auth_type: RequireAndVerifyClientCert\n",
            "client_ca_file",
        ),
        ("  client_ca_file: ca.pem\n", "client_auth_type"),
        ("  client_allowed_sans: [a]\n", "client_allowed_sans"),
        (
            "  cipher_suites: [TLS_RSA_WITH_AES_128_CBC_SHA]\n",
            "TLS_RSA_WITH_AES_128_CBC_SHA",
        ),
        ("  curve_preferences: [CurveP521]\n", "CurveP521"),
        ("  cert_fle: x\n", "cert_fle"),
        ("http_server_config:\n  http2: true\n", "http2"),
        ("http_server_config:\n  headers:\n    Server: x\n", "Server"),
        (
            "http_server_config:\n  headers:\n    X-Frame-Options: allow\n",
            "X-Frame-Options",
        ),
        ("rate_limit:\n  interval: 1s\n", "rate_limit"),
        ("basic_auth_users:\n  bob: plain\n", "bob"),
    ] {
        let path = web_yml(&pki, extra);
        let err = Settings::load(&path).unwrap_err().to_string();
        assert!(err.contains(named), "{extra:?}: {err}");
        assert!(!err.contains('\n'), "{err}");
    }
    // What it can honour loads, hash included.
    let path = web_yml(
        &pki,
        &format!(
            "  min_version: TLS12\n  max_version: TLS13\n  cipher_suites: [TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256, TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305, TLS_AES_128_GCM_SHA256]\n  curve_preferences: [X25519, CurveP256]\n  prefer_server_cipher_suites: true\nhttp_server_config:\n  http2: false\n  headers:\n    Strict-Transport-Security: max-age=31536000\nbasic_auth_users:\n  bob: {hash}\n"
        ),
    );
    let settings = Settings::load(&path).unwrap_or_else(|err| panic!("{err}"));
    assert!(settings.authenticates());
    // A key that is not the certificate's.
    let (_, other_key) = pki.issue("other", vec!["localhost".into()]);
    pki.dir.file("other.key", other_key);
    let path = pki.dir.file(
        "web.yml",
        "tls_server_config:\n  cert_file: server.pem\n  key_file: other.key\n",
    );
    let err = Settings::load(&path).unwrap_err().to_string();
    assert!(err.contains("key_file"), "{err}");
}

/// `deploy/web.yml` uncommented: the example lines (a top-level key, or an
/// indented line under one), not the prose.
fn uncommented_example(text: &str) -> String {
    text.lines()
        .map(|line| match line.strip_prefix("# ") {
            Some(rest)
                if rest.starts_with(' ')
                    || rest.split_once(':').is_some_and(|(key, _)| {
                        !key.is_empty() && key.chars().all(|c| c.is_ascii_lowercase() || c == '_')
                    }) =>
            {
                rest.to_owned()
            }
            _ => line.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn the_shipped_example_loads_as_shipped_and_uncommented() {
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/web.yml");
    let as_shipped = Settings::load(&shipped).unwrap_or_else(|err| panic!("{err}"));
    assert!(as_shipped.tls.is_none() && !as_shipped.authenticates());

    let pki = Pki::new("web-example");
    let text = uncommented_example(&std::fs::read_to_string(&shipped).unwrap())
        .replace(
            "/etc/portwatch/tls/portwatch.crt",
            &pki.server_cert.display().to_string(),
        )
        .replace(
            "/run/credentials/portwatch.service/portwatch.key",
            &pki.server_key.display().to_string(),
        )
        .replace(
            "/etc/portwatch/tls/clients-ca.crt",
            &pki.ca_file.display().to_string(),
        )
        .replace("<bcrypt hash>", &bcrypt_hash("x"));
    assert!(text.contains("\ntls_server_config:\n"), "{text}");
    let path = pki.dir.file("example.yml", text);
    let settings = Settings::load(&path).unwrap_or_else(|err| panic!("{err}"));
    assert!(settings.tls.is_some());
    assert!(settings.users.required());
    assert_eq!(settings.headers.len(), 5);
    assert_eq!(
        settings.describe(),
        "TLS, client certificates required with basic auth (2 users)"
    );
}

#[test]
fn hash_password_makes_a_hash_web_config_takes() {
    let run = |stdin: &[u8], args: &[&str]| {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_portwatch"))
            .arg("hash-password")
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // A usage error exits before reading: its stdin may be gone.
        let _ = child.stdin.take().unwrap().write_all(stdin);
        child.wait_with_output().unwrap()
    };
    let made = run(b"s3cret\n", &["--cost", "4"]);
    assert!(made.status.success(), "{}", support::said(&made));
    let hash = String::from_utf8(made.stdout).unwrap().trim().to_owned();
    assert!(hash.starts_with("$2b$04$"), "{hash}");
    assert!(bcrypt::verify("s3cret", &hash).unwrap());
    assert!(!bcrypt::verify("s3cret\n", &hash).unwrap());
    let dir = support::TempDir::new("web-hash");
    let path = dir.file("web.yml", format!("basic_auth_users:\n  alice: {hash}\n"));
    assert!(Settings::load(&path).unwrap().authenticates());
    // Nothing to hash: one line, no hash.
    let empty = run(b"", &[]);
    assert!(!empty.status.success() && empty.stdout.is_empty());
    assert_eq!(
        String::from_utf8_lossy(&empty.stderr)
            .trim()
            .lines()
            .count(),
        1
    );
    // A cost bcrypt does not have: clap's usage error (exit 2), naming it.
    let cost = run(b"x\n", &["--cost", "3"]);
    assert_eq!(cost.status.code(), Some(2));
    assert!(cost.stdout.is_empty() && String::from_utf8_lossy(&cost.stderr).contains("--cost"));
}
