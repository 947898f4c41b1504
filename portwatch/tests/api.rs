//! The HTTP API without root and without sockets: a hand-built [`State`]
//! holding the seed scenarios, and the router driven in-process with
//! `oneshot`.
//!
//! The fixture: on port 8000 node's IPv4 `0.0.0.0` (pid 2001) and IPv6 `[::]`
//! with `IPV6_V6ONLY` (pid 2002, a systemd unit), and python3 (pid 3003)
//! failing to bind `0.0.0.0:8000` with EADDRINUSE; on 5353 one process with
//! a UDP and a TCP socket; on 9000 two nginx workers in an `SO_REUSEPORT`
//! group; a failed bind of port 80 with EACCES. Every time is fixed, so the
//! JSON is snapshot-tested with insta.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::{
        Arc, RwLock,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, SystemTime},
};

use axum::{
    Router,
    body::{Body, Bytes},
    http::{HeaderMap, Method, Request, StatusCode, header},
};
use futures_util::StreamExt;
use portwatch::{
    api::{self, ApiContext},
    event::{BootClock, Errno, EventKind, Options, PortEvent, Protocol, Source},
    failures::{self, Failure},
    health::ListingFailure,
    snapshot::owners::Place,
    state::State,
    watch::SharedState,
};
use proptest::prelude::*;
use serde_json::{Value, json};
use tokio::sync::broadcast;
use tower::ServiceExt;

/// 2024-05-01T12:00:00Z: the fixture's time zero.
const T0_SECS: u64 = 1_714_564_800;
/// The host's network namespace.
const HOST: u64 = 4_026_531_840;
/// Boot time 0 is T0.
const CLOCK: BootClock = BootClock::from_offset_ns(T0_SECS as i128 * 1_000_000_000);

fn at(secs: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(T0_SECS + secs)
}

/// A socket event of the fixture.
struct Sock {
    pid: u32,
    process: &'static str,
    protocol: Protocol,
    address: &'static str,
    port: u16,
    cookie: u64,
    uid: u32,
    reuse_port: bool,
    v6only: Option<bool>,
}

impl Sock {
    fn event(&self, kind: EventKind, boot_secs: u64) -> PortEvent {
        let address: IpAddr = self.address.parse().unwrap();
        PortEvent {
            boot_ns: boot_secs * 1_000_000_000,
            pid: self.pid,
            tid: self.pid,
            uid: self.uid,
            sock_uid: Some(self.uid),
            process: self.process.into(),
            cgroup_id: 100 + u64::from(self.pid),
            netns: Some(HOST),
            bound_port: Some(self.port),
            options: Options {
                reuse_addr: Some(false),
                reuse_port: Some(self.reuse_port),
                v6only: self.v6only,
                freebind: Some(false),
                transparent: Some(false),
                bind_address_no_port: Some(false),
            },
            backlog: kind.is_listen().then_some(511),
            source: Source::PostBind,
            ..PortEvent::example(kind, self.protocol, address, self.port, self.cookie)
        }
    }
}

const NODE_V4: Sock = Sock {
    pid: 2001,
    process: "node",
    protocol: Protocol::Tcp,
    address: "0.0.0.0",
    port: 8000,
    cookie: 11,
    uid: 1000,
    reuse_port: false,
    v6only: None,
};
const NODE_V6: Sock = Sock {
    pid: 2002,
    address: "::",
    cookie: 12,
    v6only: Some(true),
    ..NODE_V4
};
const DNS_UDP: Sock = Sock {
    pid: 2003,
    process: "dnsmasq",
    protocol: Protocol::Udp,
    address: "127.0.0.1",
    port: 5353,
    cookie: 21,
    uid: 0,
    reuse_port: false,
    v6only: None,
};
const DNS_TCP: Sock = Sock {
    protocol: Protocol::Tcp,
    cookie: 22,
    ..DNS_UDP
};
const NGINX_A: Sock = Sock {
    pid: 2004,
    process: "nginx",
    protocol: Protocol::Tcp,
    address: "127.0.0.1",
    port: 9000,
    cookie: 31,
    uid: 1000,
    reuse_port: true,
    v6only: None,
};
const NGINX_B: Sock = Sock {
    pid: 2005,
    cookie: 32,
    ..NGINX_A
};
const PYTHON: Sock = Sock {
    pid: 3003,
    process: "python3",
    cookie: 40,
    ..NODE_V4
};

/// The seed scenarios as the daemon would hold them.
fn fixture() -> State {
    let mut state = State::new(100, 1000);
    state.host_netns = HOST;
    state.localhost = vec![
        IpAddr::V6(Ipv6Addr::LOCALHOST),
        IpAddr::V4(Ipv4Addr::LOCALHOST),
    ];
    state.ready = true;
    let mut second = 0;
    for sock in [&NODE_V4, &NODE_V6, &DNS_TCP, &NGINX_A, &NGINX_B] {
        second += 1;
        state
            .map
            .apply(&sock.event(EventKind::Bind, second), at(second));
        state
            .map
            .apply(&sock.event(EventKind::Listen, second), at(second));
    }
    state.map.apply(&DNS_UDP.event(EventKind::Bind, 0), at(0));
    state.map.set_place(
        NODE_V6.cookie,
        Place::from_cgroups("0::/system.slice/app.service\n"),
    );
    let mut in_use = PYTHON.event(EventKind::BindFailed, 10);
    in_use.bound_port = None;
    let blocked_by = failures::attribute(state.kernel, &in_use, &state.map);
    assert_eq!(blocked_by.len(), 1, "node's IPv4 listener blocks python3");
    state.failures.push(Failure {
        time: at(10),
        event: in_use,
        blocked_by,
        place: Place::from_cgroups("0::/system.slice/python-app.service\n"),
        cause: None,
    });
    let mut denied = Sock {
        port: 80,
        cookie: 41,
        ..PYTHON
    }
    .event(EventKind::BindFailed, 20);
    denied.bound_port = None;
    denied.errno = Some(Errno::EACCES);
    state.failures.push(Failure {
        time: at(20),
        event: denied,
        blocked_by: Vec::new(),
        // The process had exited before its failure was read.
        place: Place::default(),
        cause: None,
    });
    state
}

struct Api {
    state: SharedState,
    events: broadcast::Sender<Arc<PortEvent>>,
    router: Router,
}

fn context(state: &SharedState, events: &broadcast::Sender<Arc<PortEvent>>) -> ApiContext {
    ApiContext {
        state: state.clone(),
        events: events.clone(),
        metrics: Arc::new(|| "# TYPE portwatch_up gauge\nportwatch_up 1\n".to_owned()),
        clock: CLOCK,
    }
}

fn api() -> Api {
    api_with(fixture(), 64)
}

fn api_with(state: State, capacity: usize) -> Api {
    let state = Arc::new(RwLock::new(state));
    let (events, _) = broadcast::channel(capacity);
    let router = api::router(context(&state, &events));
    Api {
        state,
        events,
        router,
    }
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|err| {
            panic!("not JSON ({err}): {}", String::from_utf8_lossy(&self.body))
        })
    }

    fn content_type(&self) -> &str {
        self.headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Asserts a 200 JSON answer and returns it.
    fn ok_json(&self) -> Value {
        assert_eq!(self.status, StatusCode::OK, "{}", self.text());
        assert_eq!(self.content_type(), "application/json");
        self.json()
    }

    /// Asserts an RFC 9457 problem with `status` and returns it.
    fn problem(&self, status: StatusCode) -> Value {
        assert_eq!(self.status, status, "{}", self.text());
        assert_eq!(self.content_type(), "application/problem+json");
        let body = self.json();
        assert_eq!(body["status"], status.as_u16(), "{body}");
        for field in ["type", "title", "detail"] {
            assert!(
                body[field].as_str().is_some_and(|s| !s.is_empty()),
                "{field} in {body}"
            );
        }
        body
    }
}

async fn send(router: &Router, request: Request<Body>) -> Answer {
    let response = router.clone().oneshot(request).await.expect("infallible");
    let status = response.status();
    let headers = response.headers().clone();
    let body = axum::body::to_bytes(response.into_body(), 1 << 22)
        .await
        .expect("body");
    Answer {
        status,
        headers,
        body,
    }
}

async fn get(router: &Router, uri: &str) -> Answer {
    send(router, Request::get(uri).body(Body::empty()).unwrap()).await
}

fn cookies(listeners: &Value) -> Vec<u64> {
    listeners
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["cookie"].as_u64().unwrap())
        .collect()
}

#[tokio::test]
async fn ports_lists_every_port_with_its_listeners() {
    let api = api();
    let body = get(&api.router, "/ports").await.ok_json();
    let ports: Vec<u64> = body["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["port"].as_u64().unwrap())
        .collect();
    assert_eq!(ports, [5353, 8000, 9000]);
    insta::assert_json_snapshot!("ports", body);

    let udp = get(&api.router, "/ports?protocol=udp").await.ok_json();
    assert_eq!(udp["ports"].as_array().unwrap().len(), 1);
    assert_eq!(cookies(&udp["ports"][0]["listeners"]), [DNS_UDP.cookie]);
    assert_eq!(udp["ports"][0]["shared"], false);

    let v6 = get(&api.router, "/ports?family=ipv6&netns=host")
        .await
        .ok_json();
    assert_eq!(cookies(&v6["ports"][0]["listeners"]), [NODE_V6.cookie]);
    let elsewhere = get(&api.router, "/ports?netns=1").await.ok_json();
    assert_eq!(
        elsewhere,
        json!({"host_netns": HOST, "ports": [], "next": null})
    );
}

fn port_numbers(page: &Value) -> Vec<u64> {
    page["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["port"].as_u64().unwrap())
        .collect()
}

#[tokio::test]
async fn ports_come_in_pages_that_link_to_the_next() {
    let api = api();
    let first = get(&api.router, "/ports?limit=2").await.ok_json();
    assert_eq!(port_numbers(&first), [5353, 8000]);
    assert_eq!(first["next"], "/ports?limit=2&after=8000");
    let second = get(&api.router, first["next"].as_str().unwrap())
        .await
        .ok_json();
    assert_eq!(port_numbers(&second), [9000]);
    assert_eq!(second["next"], Value::Null);

    // A page that ends exactly at the last port says there is no more.
    let exact = get(&api.router, "/ports?limit=3").await.ok_json();
    assert_eq!(port_numbers(&exact), [5353, 8000, 9000]);
    assert_eq!(exact["next"], Value::Null);

    // The link keeps the filters; `after` counts ports, not listeners.
    let tcp = get(&api.router, "/ports?protocol=udp&limit=1")
        .await
        .ok_json();
    assert_eq!(port_numbers(&tcp), [5353]);
    // Only one UDP port: the page is full, and nothing follows.
    assert_eq!(tcp["next"], Value::Null);
    let tcp = get(&api.router, "/ports?protocol=tcp&limit=2")
        .await
        .ok_json();
    assert_eq!(port_numbers(&tcp), [5353, 8000]);
    assert_eq!(tcp["next"], "/ports?protocol=tcp&limit=2&after=8000");
    let tcp = get(&api.router, tcp["next"].as_str().unwrap())
        .await
        .ok_json();
    assert_eq!(port_numbers(&tcp), [9000]);
    assert_eq!(tcp["next"], Value::Null);

    let from_start = get(&api.router, "/ports?after=0").await.ok_json();
    assert_eq!(port_numbers(&from_start), [5353, 8000, 9000]);
    let last = get(&api.router, "/ports?after=65535").await.ok_json();
    assert_eq!(port_numbers(&last), Vec::<u64>::new());
    assert_eq!(last["next"], Value::Null);
}

#[tokio::test]
async fn an_unbounded_list_gets_a_default_page() {
    let mut state = fixture();
    let ports = api::PORTS_PAGE as u64 + 50;
    for i in 0..ports {
        let sock = Sock {
            port: 20_000 + i as u16,
            cookie: 300_000 + i,
            ..NODE_V4
        };
        listen_in(&mut state, &sock, HOST, 30);
    }
    let api = api_with(state, 64);
    let mut seen = Vec::new();
    let mut next = Some("/ports".to_owned());
    let mut pages = 0;
    while let Some(uri) = next {
        let page = get(&api.router, &uri).await.ok_json();
        let numbers = port_numbers(&page);
        assert!(numbers.len() <= api::PORTS_PAGE, "{uri}");
        seen.extend(numbers);
        next = page["next"].as_str().map(str::to_owned);
        pages += 1;
    }
    assert_eq!(pages, 2);
    // Every port once, in order: the fixture's three and the added ones.
    assert_eq!(seen.len() as u64, ports + 3);
    assert!(seen.windows(2).all(|pair| pair[0] < pair[1]));
}

#[tokio::test]
async fn a_dual_stack_split_port_is_explained() {
    let api = api();
    let body = get(&api.router, "/ports/8000").await.ok_json();
    assert_eq!(
        cookies(&body["listeners"]),
        [NODE_V4.cookie, NODE_V6.cookie]
    );
    assert_eq!(body["shared"], true);
    assert_eq!(body["flags"], json!(["dual_stack_split"]));
    assert_eq!(body["flag_details"][0]["flag"], "dual_stack_split");
    assert_eq!(body["sharing"][0]["kind"], "v6only_split");
    assert_eq!(
        body["sharing"][0]["listeners"],
        json!([NODE_V4.cookie, NODE_V6.cookie])
    );
    // The resolver tries ::1 first, and the v6only [::] listener takes it.
    assert_eq!(body["localhost"]["reaches"]["cookie"], NODE_V6.cookie);
    assert_eq!(body["localhost"]["reaches"]["unit"], "app.service");
    assert_eq!(body["localhost"]["via"], "::1");
    assert_eq!(body["localhost"]["order"], json!(["::1", "127.0.0.1"]));
    let failures = body["recent_failures"].as_array().unwrap();
    assert_eq!(failures.len(), 1);
    assert_eq!(failures[0]["errno"], "EADDRINUSE");
    assert_eq!(failures[0]["blocked_by"][0]["cookie"], NODE_V4.cookie);
    assert_eq!(failures[0]["blocked_by"][0]["holders"][0]["pid"], 2001);
    let listener = &body["listeners"][1];
    for key in [
        "protocol",
        "family",
        "address",
        "port",
        "endpoint",
        "pids",
        "process",
        "uid",
        "unit",
        "container",
        "cgroup",
        "netns",
        "cookie",
        "inode",
        "state",
        "reuse_addr",
        "reuse_port",
        "v6only",
        "since",
        "since_exact",
    ] {
        assert!(listener.get(key).is_some(), "{key} missing from {listener}");
    }
    assert_eq!(listener["endpoint"], "[::]:8000");
    assert_eq!(listener["since"], "2024-05-01T12:00:02.000000000Z");
    assert_eq!(body["listeners"][0]["v6only"], Value::Null, "IPv4");
    insta::assert_json_snapshot!("port_8000", body);
}

#[tokio::test]
async fn filters_narrow_the_listeners_but_not_who_localhost_reaches() {
    let api = api();
    let body = get(&api.router, "/ports/8000?family=ipv4&protocol=TCP")
        .await
        .ok_json();
    assert_eq!(cookies(&body["listeners"]), [NODE_V4.cookie]);
    assert_eq!(body["shared"], false);
    assert_eq!(body["flags"], json!([]));
    assert_eq!(body["localhost"]["reaches"]["cookie"], NODE_V6.cookie);
    let udp = get(&api.router, "/ports/8000?protocol=udp").await.ok_json();
    assert_eq!(udp["listeners"], json!([]));
    assert_eq!(udp["recent_failures"], json!([]), "the failure was TCP");
}

#[tokio::test]
async fn reuseport_groups_and_tcp_beside_udp_are_explained() {
    let api = api();
    let group = get(&api.router, "/ports/9000").await.ok_json();
    assert_eq!(group["flags"], json!(["reuseport_group"]));
    assert_eq!(group["sharing"][0]["kind"], "reuse_port_group");
    assert_eq!(
        group["flag_details"][0]["members"],
        json!([NGINX_A.cookie, NGINX_B.cookie])
    );
    insta::assert_json_snapshot!("port_9000", group);
    let mixed = get(&api.router, "/ports/5353").await.ok_json();
    assert_eq!(mixed["shared"], true);
    assert_eq!(mixed["sharing"][0]["kind"], "different_protocol");
    assert_eq!(mixed["localhost"]["reaches"]["cookie"], DNS_TCP.cookie);
    assert_eq!(mixed["localhost"]["via"], "127.0.0.1");
}

#[tokio::test]
async fn a_port_nobody_holds_is_empty_not_missing() {
    let api = api();
    let body = get(&api.router, "/ports/1234").await.ok_json();
    assert_eq!(
        body,
        json!({
            "port": 1234,
            "host_netns": HOST,
            "listeners": [],
            "shared": false,
            "netns_count": 0,
            "namespaces": [],
            "namespaces_hidden": 0,
            "namespaces_hidden_eventful": 0,
            "summary": {"host": false, "pods": 0, "containers": 0, "other": 0, "pod_namespaces": [], "processes": []},
            "sharing": [],
            "flags": [],
            "flag_details": [],
            "localhost": {"reaches": null, "via": null, "order": ["::1", "127.0.0.1"]},
            "recent_failures": [],
        })
    );
}

/// `sock` bound and listening in network namespace `netns`.
fn listen_in(state: &mut State, sock: &Sock, netns: u64, secs: u64) {
    for kind in [EventKind::Bind, EventKind::Listen] {
        let mut event = sock.event(kind, secs);
        event.netns = Some(netns);
        state.map.apply(&event, at(secs));
    }
}

/// A container host: `pods` network namespaces, each with one pod's process
/// listening on `0.0.0.0:8080`, besides the fixture's host namespace.
fn pod_host(pods: u64) -> State {
    let mut state = fixture();
    for i in 0..pods {
        let sock = Sock {
            pid: 10_000 + i as u32,
            process: "python3",
            port: 8080,
            cookie: 100_000 + i,
            ..NODE_V4
        };
        listen_in(&mut state, &sock, HOST + 1 + i, 30);
        let namespace = if i % 3 == 0 { "shop" } else { "web" };
        let uid = format!("6b1e4f2a-3c1d-4e5f-9a8b-{:012x}", i);
        let mut place = Place::from_cgroups(&format!(
            "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/cri-containerd-{:064x}.scope\n",
            uid.replace('-', "_"),
            i
        ));
        place.workload.pod = Some(format!("app-{i}"));
        place.workload.pod_namespace = Some(namespace.into());
        place.workload.pod_uid = Some(uid);
        place.workload.container_name = Some("app".into());
        state.map.set_place(100_000 + i, place);
    }
    state
}

#[tokio::test]
async fn two_hundred_pods_on_one_port_are_two_hundred_port_tables_not_sharing() {
    let api = api_with(pod_host(200), 64);
    let response = get(&api.router, "/ports/8080").await;
    let body = response.ok_json();
    assert!(
        response.body.len() <= 64 * 1024,
        "{} bytes by default",
        response.body.len()
    );
    assert_eq!(body["netns_count"], 200);
    assert_eq!(body["shared"], false);
    assert_eq!(body["sharing"], json!([]));
    // Past 8 namespaces, only those worth showing (none here: no host
    // listener, nothing shared or failed); the rest are counted.
    assert_eq!(body["namespaces"], json!([]));
    assert_eq!(body["namespaces_hidden"], 200);
    assert_eq!(body["summary"]["pods"], 200);
    assert_eq!(
        body["summary"]["pod_namespaces"],
        json!([{"name": "web", "namespaces": 133}, {"name": "shop", "namespaces": 67}])
    );
    assert_eq!(
        body["summary"]["processes"],
        json!([{"name": "python3", "namespaces": 200}])
    );

    // Every namespace on request: one group each, none shared.
    let all = get(&api.router, "/ports/8080?all=true").await.ok_json();
    let groups = all["namespaces"].as_array().unwrap();
    assert_eq!(groups.len(), 200);
    assert_eq!(all["listeners"].as_array().unwrap().len(), 200);
    assert_eq!(all["namespaces_hidden"], 0);
    for group in groups {
        assert_eq!(group["shared"], false, "{group}");
        assert_eq!(group["sharing"], json!([]), "{group}");
        assert_eq!(group["host"], false, "{group}");
        assert!(
            group["pod"].as_str().unwrap().starts_with("app-"),
            "{group}"
        );
        assert_eq!(group["container_name"], "app", "{group}");
    }
    // `/ports` says the same of 8080.
    let list = get(&api.router, "/ports").await.ok_json();
    let summary = list["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["port"] == 8080)
        .unwrap();
    assert_eq!(
        (summary["shared"].clone(), summary["netns_count"].clone()),
        (json!(false), json!(200))
    );

    // One pod adds a second listener to its own port table: that namespace
    // alone is shared, and it is shown with its reuseport reason.
    {
        let mut state = api.state.write().unwrap();
        // The first listener of the pod's process is replaced by two with
        // SO_REUSEPORT; the second one's place is not known yet.
        let place = state.map.get(100_007).unwrap().place.clone();
        state.map.apply(
            &Sock {
                pid: 10_007,
                port: 8080,
                cookie: 100_007,
                ..NODE_V4
            }
            .event(EventKind::Close, 40),
            at(40),
        );
        for cookie in [300_007, 200_007] {
            let sock = Sock {
                pid: 10_007,
                process: "python3",
                port: 8080,
                cookie,
                reuse_port: true,
                ..NODE_V4
            };
            listen_in(&mut state, &sock, HOST + 1 + 7, 40);
        }
        state.map.set_place(300_007, Place::clone(&place));
        state.map.set_place(200_007, Place::clone(&place));
    }
    let body = get(&api.router, "/ports/8080").await.ok_json();
    assert_eq!(body["shared"], true);
    assert_eq!(body["netns_count"], 200);
    let shown = body["namespaces"].as_array().unwrap();
    assert_eq!(shown.len(), 1, "{shown:?}");
    assert_eq!(shown[0]["netns"], HOST + 8);
    assert_eq!(shown[0]["shared"], true);
    assert_eq!(shown[0]["sharing"][0]["kind"], "reuse_port_group");
    assert_eq!(
        shown[0]["sharing"][0]["listeners"],
        json!([200_007, 300_007])
    );
    assert_eq!(body["sharing"].as_array().unwrap().len(), 1);
    assert_eq!(body["namespaces_hidden"], 199);
    assert_eq!(body["listeners"].as_array().unwrap().len(), 2);

    // `portwatch explain 8080` reads it as a summary, then the one namespace
    // where something is shared.
    let text = portwatch::client::render_explanation(&body);
    eprintln!("{text}");
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines.len() <= 40, "{} lines:\n{text}", lines.len());
    assert!(
        lines[0].starts_with(
            "Port 8080 is used in 200 network namespaces: 200 pods (by Kubernetes namespace: web 133, shop 67); held by python3 in 200."
        ),
        "{text}"
    );
    assert!(
        text.contains(
            "\nIn pod web/app-7 (container app), netns 4026531848:\n2 services listen on port 8080:"
        ),
        "{text}"
    );
    assert!(text.contains("199 more namespaces not shown"), "{text}");

    // A pod by name, alone or with its namespace.
    let pod = get(&api.router, "/ports/8080?pod=shop/app-9")
        .await
        .ok_json();
    assert_eq!(pod["netns_count"], 1);
    assert_eq!(pod["listeners"][0]["pod"], "app-9");
    assert_eq!(pod["listeners"][0]["pod_namespace"], "shop");
    let wrong = get(&api.router, "/ports/8080?pod=web/app-9")
        .await
        .ok_json();
    assert_eq!(wrong["netns_count"], 0);
    let bad = get(&api.router, "/ports/8080?pod=App_9").await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST, "{}", bad.text());
}

#[tokio::test]
async fn failures_are_newest_first_and_filtered() {
    let api = api();
    let all = get(&api.router, "/failures").await.ok_json();
    let errnos = |body: &Value| -> Vec<String> {
        body["failures"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["errno"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(errnos(&all), ["EACCES", "EADDRINUSE"]);
    insta::assert_json_snapshot!("failures", all);
    let cases = [
        ("/failures?port=8000", vec!["EADDRINUSE"]),
        ("/failures?port=80", vec!["EACCES"]),
        ("/failures?errno=eaddrinuse", vec!["EADDRINUSE"]),
        ("/failures?errno=13", vec!["EACCES"]),
        ("/failures?errno=UNKNOWN", vec![]),
        ("/failures?since=2024-05-01T12:00:15Z", vec!["EACCES"]),
        ("/failures?since=1714564810", vec!["EACCES", "EADDRINUSE"]),
        ("/failures?since=1714564810.5", vec!["EACCES"]),
        (
            "/failures?since=2024-05-01T14:00:10%2B02:00",
            vec!["EACCES", "EADDRINUSE"],
        ),
        ("/failures?limit=1", vec!["EACCES"]),
        ("/failures?limit=10000&protocol=udp", vec![]),
    ];
    for (uri, expected) in cases {
        assert_eq!(
            errnos(&get(&api.router, uri).await.ok_json()),
            expected,
            "{uri}"
        );
    }
}

#[tokio::test]
async fn check_predicts_with_blockers_and_explanations() {
    let api = api();
    let refused = get(&api.router, "/check?protocol=tcp&address=0.0.0.0&port=8000&reuse_port=false&reuse_addr=false&v6only=false").await.ok_json();
    assert_eq!(refused["ok"], false);
    assert_eq!(refused["errno"], "EADDRINUSE");
    assert_eq!(refused["confident"], true);
    assert_eq!(refused["blocked_by"][0]["cookie"], NODE_V4.cookie);
    assert_eq!(refused["blocked_by"][0]["holders"][0]["process"], "node");
    assert_eq!(refused["request"]["v6only"], Value::Null, "IPv4");
    assert!(
        refused["explanation"]
            .as_str()
            .unwrap()
            .starts_with("EADDRINUSE: 0.0.0.0:8000 is held by a listener of node (pid 2001)"),
        "{refused}"
    );
    insta::assert_json_snapshot!("check_refused", refused);

    let v6 = get(&api.router, "/check?address=[::1]&port=8000&v6only=true")
        .await
        .ok_json();
    assert_eq!(v6["errno"], "EADDRINUSE");
    assert_eq!(v6["blocked_by"][0]["cookie"], NODE_V6.cookie);

    let free = get(&api.router, "/check?address=0.0.0.0&port=8001")
        .await
        .ok_json();
    assert_eq!(free["ok"], true);
    assert_eq!(free["errno"], Value::Null);
    assert_eq!(free["blocked_by"], json!([]));
    insta::assert_json_snapshot!("check_free", free);

    // nginx's owner joins its SO_REUSEPORT group; root may not.
    let join = "/check?address=127.0.0.1&port=9000&reuse_port=true";
    let joined = get(&api.router, &format!("{join}&uid=1000"))
        .await
        .ok_json();
    assert_eq!(joined["ok"], true, "{joined}");
    let other = get(&api.router, join).await.ok_json();
    assert_eq!(other["ok"], false);
    assert_eq!(
        other["blocked_by"][0]["conflict"],
        "reuse_port_uid_mismatch"
    );

    let udp = get(&api.router, "/check?protocol=udp&address=0.0.0.0&port=5353")
        .await
        .ok_json();
    assert_eq!(udp["errno"], "EADDRINUSE");
    assert_eq!(udp["blocked_by"][0]["cookie"], DNS_UDP.cookie);

    let other_netns = get(&api.router, "/check?address=0.0.0.0&port=8000&netns=1")
        .await
        .ok_json();
    assert_eq!(other_netns["ok"], true);

    let mapped = get(
        &api.router,
        "/check?address=::ffff:127.0.0.1&port=7000&v6only=1",
    )
    .await
    .ok_json();
    assert_eq!(mapped["errno"], "EINVAL");
    assert_eq!(mapped["invalid"], "v6only_mapped_address");
}

#[tokio::test]
async fn events_stream_as_server_sent_events() {
    let api = api();
    let response = api
        .router
        .clone()
        .oneshot(Request::get("/events").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers()[header::CONTENT_TYPE],
        "text/event-stream"
    );
    let mut body = response.into_body().into_data_stream();
    api.events
        .send(Arc::new(PYTHON.event(EventKind::Bind, 30)))
        .unwrap();
    let frame = next_frame(&mut body).await;
    let data = frame
        .strip_prefix("data: ")
        .and_then(|f| f.strip_suffix("\n\n"))
        .unwrap_or_else(|| panic!("one data line: {frame:?}"));
    let event: Value = serde_json::from_str(data).unwrap();
    assert_eq!(event["kind"], "bind");
    assert_eq!(event["pid"], 3003);
    assert_eq!(event["endpoint"], "0.0.0.0:8000");
    assert_eq!(event["time"], "2024-05-01T12:00:30.000000000Z");

    // The stream ends when the pipeline's sender is gone.
    drop(api.events);
    let end = tokio::time::timeout(Duration::from_secs(5), body.next()).await;
    assert!(matches!(end, Ok(None)), "{end:?}");
    // And no new stream starts.
    get(&api.router, "/events")
        .await
        .problem(StatusCode::SERVICE_UNAVAILABLE);
}

async fn next_frame(
    body: &mut (impl futures_util::Stream<Item = Result<Bytes, axum::Error>> + Unpin),
) -> String {
    let frame = tokio::time::timeout(Duration::from_secs(5), body.next())
        .await
        .expect("an event within 5 s")
        .expect("the stream goes on")
        .expect("no body error");
    String::from_utf8(frame.to_vec()).unwrap()
}

#[tokio::test]
async fn events_filter_by_port_and_follow_closes() {
    let api = api();
    let response = api
        .router
        .clone()
        .oneshot(
            Request::get("/events?port=8000")
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    let mut body = response.into_body().into_data_stream();
    api.events
        .send(Arc::new(NGINX_A.event(EventKind::Bind, 31)))
        .unwrap();
    // A close carries only the cookie: node's was on 8000 when the stream began.
    let mut close = NODE_V4.event(EventKind::Close, 32);
    close.port = 0;
    close.bound_port = None;
    close.address = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
    api.events.send(Arc::new(close)).unwrap();
    let frame = next_frame(&mut body).await;
    assert!(frame.contains("\"kind\":\"close\""), "{frame}");
    assert!(frame.contains("\"cookie\":11"), "{frame}");
}

#[tokio::test]
async fn a_slow_client_is_told_how_many_events_it_missed() {
    let api = api_with(fixture(), 4);
    let response = api
        .router
        .clone()
        .oneshot(Request::get("/events").body(Body::empty()).unwrap())
        .await
        .unwrap();
    let mut body = response.into_body().into_data_stream();
    for second in 0..10 {
        api.events
            .send(Arc::new(NODE_V4.event(EventKind::Listen, second)))
            .unwrap();
    }
    let frame = next_frame(&mut body).await;
    assert_eq!(frame, "event: lagged\ndata: {\"missed\":6}\n\n");
    let frame = next_frame(&mut body).await;
    assert!(frame.starts_with("data: {"), "{frame}");
}

#[tokio::test]
async fn metrics_pass_the_renderer_through() {
    let api = api();
    let answer = get(&api.router, "/metrics").await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(
        answer.content_type(),
        "text/plain; version=0.0.4; charset=utf-8"
    );
    assert_eq!(answer.text(), "# TYPE portwatch_up gauge\nportwatch_up 1\n");
}

#[tokio::test]
async fn concurrent_scrapes_share_a_rendering_and_none_is_stale() {
    let state = Arc::new(RwLock::new(fixture()));
    let (events, _) = broadcast::channel(64);
    let renders = Arc::new(AtomicUsize::new(0));
    let counted = renders.clone();
    let router = api::router(ApiContext {
        // Slow enough that every scrape below arrives during the first.
        metrics: Arc::new(move || {
            let n = counted.fetch_add(1, Ordering::SeqCst) + 1;
            std::thread::sleep(Duration::from_millis(200));
            format!("portwatch_renders {n}\n")
        }),
        ..context(&state, &events)
    });
    let first = {
        let router = router.clone();
        tokio::spawn(async move { get(&router, "/metrics").await.text() })
    };
    // The first rendering has started; these 15 wait for it to end.
    while renders.load(Ordering::SeqCst) == 0 {
        tokio::task::yield_now().await;
    }
    let waiting: Vec<_> = (0..15)
        .map(|_| {
            let router = router.clone();
            tokio::spawn(async move { get(&router, "/metrics").await.text() })
        })
        .collect();
    assert_eq!(first.await.unwrap(), "portwatch_renders 1\n");
    // They arrived after the first rendering started, so it may miss what
    // they expect: one more rendering serves them all.
    for scrape in waiting {
        assert_eq!(scrape.await.unwrap(), "portwatch_renders 2\n");
    }
    assert_eq!(renders.load(Ordering::SeqCst), 2);
    // A scrape after those gets a rendering of its own, never an older one.
    assert_eq!(
        get(&router, "/metrics").await.text(),
        "portwatch_renders 3\n"
    );
}

#[tokio::test]
async fn health_and_readiness() {
    let api = api();
    let live = get(&api.router, "/livez").await;
    assert_eq!((live.status, live.text().as_str()), (StatusCode::OK, "ok"));
    let ready = get(&api.router, "/readyz").await;
    assert_eq!(
        (ready.status, ready.text().as_str()),
        (StatusCode::OK, "ready")
    );
    // Serving from live events alone: still ready, and says what it lacks.
    api.state.write().unwrap().listing = Some(ListingFailure {
        error: "the kernel refused the tcp ipv4 sock_diag dump".into(),
        missing_modules: vec!["tcp_diag"],
    });
    let degraded = get(&api.router, "/readyz").await;
    assert_eq!(degraded.status, StatusCode::OK);
    let text = degraded.text();
    assert!(
        text.starts_with("ready\ndegraded: the sock_diag listing fails"),
        "{text}"
    );
    assert!(
        text.ends_with("load the kernel modules tcp_diag (modprobe -a tcp_diag)"),
        "{text}"
    );
    api.state.write().unwrap().ready = false;
    let body = get(&api.router, "/readyz")
        .await
        .problem(StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["type"], "urn:portwatch:problem:not-ready");
    assert_eq!(get(&api.router, "/livez").await.status, StatusCode::OK);
}

#[tokio::test]
async fn the_landing_page_links_every_endpoint() {
    let api = api();
    let page = get(&api.router, "/").await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.content_type().starts_with("text/html"));
    let html = page.text();
    for link in [
        "/ports",
        "/ports/8000",
        "/failures",
        "/check?",
        "/events",
        "/metrics",
        "/livez",
        "/readyz",
        "/openapi.json",
    ] {
        assert!(html.contains(&format!("href=\"{link}")), "{link}");
    }
}

#[tokio::test]
async fn openapi_describes_every_route() {
    let api = api();
    let doc = get(&api.router, "/openapi.json").await.ok_json();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let paths = doc["paths"].as_object().unwrap();
    for path in [
        "/",
        "/ports",
        "/ports/{port}",
        "/failures",
        "/check",
        "/events",
        "/metrics",
        "/livez",
        "/readyz",
        "/openapi.json",
    ] {
        assert!(paths.contains_key(path), "{path}");
    }
    let mut ids: Vec<&str> = paths
        .values()
        .filter_map(|item| item["get"]["operationId"].as_str())
        .collect();
    assert_eq!(ids.len(), paths.len(), "every route has an operationId");
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), paths.len(), "operationIds are unique");
    let schemas = doc["components"]["schemas"].as_object().unwrap();
    for schema in [
        "Listener",
        "PortDetail",
        "FailureView",
        "CheckResponse",
        "Problem",
    ] {
        assert!(schemas.contains_key(schema), "{schema}");
    }
}

#[tokio::test]
async fn the_metrics_router_serves_only_metrics_and_health() {
    let state = Arc::new(RwLock::new(fixture()));
    let (events, _) = broadcast::channel(4);
    let router = api::metrics_router(context(&state, &events));
    assert_eq!(get(&router, "/metrics").await.status, StatusCode::OK);
    assert_eq!(get(&router, "/livez").await.status, StatusCode::OK);
    assert_eq!(get(&router, "/readyz").await.status, StatusCode::OK);
    for hidden in [
        "/ports",
        "/ports/8000",
        "/failures",
        "/check",
        "/events",
        "/",
        "/openapi.json",
    ] {
        get(&router, hidden).await.problem(StatusCode::NOT_FOUND);
    }
}

#[tokio::test]
async fn bad_input_gets_a_problem_naming_the_parameter() {
    let api = api();
    let bad = [
        ("/ports/0", "port"),
        ("/ports/65536", "port"),
        ("/ports/abc", "port"),
        ("/ports/-1", "port"),
        ("/ports/%FF", "port"),
        ("/ports/8000?protocol=icmp", "protocol"),
        ("/ports/8000?family=inet", "family"),
        ("/ports/8000?netns=abc", "netns"),
        ("/ports/8000?prot=udp", "prot"),
        ("/ports?protocol=tcp&protocol=udp", "protocol"),
        ("/ports/8000?pod=Web_1", "pod"),
        ("/ports/8000?all=maybe", "all"),
        // The list shows every namespace: `all` is not one of its parameters.
        ("/ports?all=true", "all"),
        ("/ports?limit=0", "limit"),
        ("/ports?limit=5001", "limit"),
        ("/ports?after=x", "after"),
        ("/ports/8000?limit=5", "limit"),
        ("/failures?pod=shop/", "pod"),
        ("/failures?port=0", "port"),
        ("/failures?port=70000", "port"),
        ("/failures?errno=EFOO", "errno"),
        ("/failures?errno=0", "errno"),
        ("/failures?since=yesterday", "since"),
        ("/failures?since=2024-13-01T00:00:00Z", "since"),
        ("/failures?limit=0", "limit"),
        ("/failures?limit=10001", "limit"),
        ("/failures?limit=99999999999999999999999", "limit"),
        ("/failures?limit=-1", "limit"),
        ("/failures?bogus=1", "bogus"),
        ("/check?port=8000", "address"),
        ("/check?address=0.0.0.0", "port"),
        ("/check?address=localhost&port=80", "address"),
        ("/check?address=0.0.0.0&port=0", "port"),
        ("/check?address=0.0.0.0&port=80&protocol=icmp", "protocol"),
        (
            "/check?address=0.0.0.0&port=80&reuse_port=maybe",
            "reuse_port",
        ),
        ("/check?address=0.0.0.0&port=80&uid=-1", "uid"),
        ("/events?port=abc", "port"),
        ("/events?pid=1", "pid"),
    ];
    for (uri, parameter) in bad {
        let body = get(&api.router, uri).await.problem(StatusCode::BAD_REQUEST);
        assert_eq!(body["parameter"], parameter, "{uri}: {body}");
        assert!(
            body["type"]
                .as_str()
                .unwrap()
                .starts_with("urn:portwatch:problem:"),
            "{uri}"
        );
    }
    let problem = get(&api.router, "/ports/65536").await.json();
    insta::assert_json_snapshot!("problem_bad_port", problem);
    let unknown = get(&api.router, "/failures?bogus=1").await.json();
    assert_eq!(unknown["type"], "urn:portwatch:problem:unknown-parameter");
    assert_eq!(
        unknown["detail"],
        "unknown query parameter `bogus`; this endpoint takes port, errno, since, protocol, pod, limit"
    );
}

#[tokio::test]
async fn unknown_paths_and_methods_get_problems() {
    let api = api();
    let missing = get(&api.router, "/nope")
        .await
        .problem(StatusCode::NOT_FOUND);
    assert_eq!(missing["type"], "urn:portwatch:problem:not-found");
    get(&api.router, "/ports/")
        .await
        .problem(StatusCode::NOT_FOUND);
    get(&api.router, "/ports/8000/extra")
        .await
        .problem(StatusCode::NOT_FOUND);
    let post = send(
        &api.router,
        Request::post("/ports").body(Body::empty()).unwrap(),
    )
    .await;
    let body = post.problem(StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(body["type"], "about:blank");
    assert!(post.headers.contains_key(header::ALLOW));
    let head = send(
        &api.router,
        Request::builder()
            .method(Method::HEAD)
            .uri("/ports")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(head.status, StatusCode::OK);
}

#[tokio::test]
async fn requests_are_bounded_in_size() {
    let api = api();
    let huge = format!("/failures?errno={}", "E".repeat(10_000));
    let body = get(&api.router, &huge)
        .await
        .problem(StatusCode::URI_TOO_LONG);
    assert_eq!(body["type"], "urn:portwatch:problem:uri-too-long");
    let long_path = format!("/{}", "a".repeat(5000));
    get(&api.router, &long_path)
        .await
        .problem(StatusCode::URI_TOO_LONG);
    // Long but under the limit: refused for its content, quoted short.
    let long_value = format!("/ports/{}", "9".repeat(3000));
    let body = get(&api.router, &long_value)
        .await
        .problem(StatusCode::BAD_REQUEST);
    assert!(body["detail"].as_str().unwrap().len() < 200, "{body}");
    let announced = Request::get("/ports")
        .header(header::CONTENT_LENGTH, 1 << 30)
        .body(Body::empty())
        .unwrap();
    send(&api.router, announced)
        .await
        .problem(StatusCode::PAYLOAD_TOO_LARGE);
    let sent = Request::builder()
        .method(Method::GET)
        .uri("/ports")
        .body(Body::from(vec![b'x'; 100_000]))
        .unwrap();
    let answer = send(&api.router, sent).await;
    assert!(answer.status.is_success() || answer.status.is_client_error());
}

#[tokio::test]
async fn a_panic_is_a_500_problem_not_a_dropped_connection() {
    let state = Arc::new(RwLock::new(fixture()));
    let (events, _) = broadcast::channel(4);
    let ctx = ApiContext {
        metrics: Arc::new(|| panic!("renderer bug")),
        ..context(&state, &events)
    };
    let router = api::router(ctx);
    let body = get(&router, "/metrics")
        .await
        .problem(StatusCode::INTERNAL_SERVER_ERROR);
    assert!(!body["detail"].as_str().unwrap().contains("renderer bug"));
    // The router still answers.
    get(&router, "/ports").await.ok_json();
}

/// Paths that reach every route, and some that reach none.
const PREFIXES: &[&str] = &[
    "/",
    "/ports",
    "/ports/",
    "/ports/8000",
    "/failures",
    "/check",
    "/events",
    "/metrics",
    "/livez",
    "/readyz",
    "/openapi.json",
    "/x",
];
const KEYS: &[&str] = &[
    "port",
    "protocol",
    "family",
    "netns",
    "errno",
    "since",
    "limit",
    "address",
    "reuse_port",
    "reuse_addr",
    "v6only",
    "uid",
    "x",
    "",
];

fn random_request() -> impl Strategy<Value = String> {
    let segment = "[a-zA-Z0-9%._~:+\\-\\[\\]]{0,12}";
    let value = prop_oneof![
        "[0-9]{0,7}",
        "-?[0-9]{1,25}",
        "[a-zA-Z0-9%:.+\\-\\[\\]]{0,20}",
        Just("0.0.0.0".to_owned()),
        Just("::".to_owned()),
        Just("tcp".to_owned()),
        Just("EADDRINUSE".to_owned()),
        Just("2024-05-01T12:00:00Z".to_owned()),
        Just("%FF%FE".to_owned()),
    ];
    let pair = (proptest::sample::select(KEYS), value).prop_map(|(k, v)| format!("{k}={v}"));
    (
        proptest::sample::select(PREFIXES),
        segment,
        prop::collection::vec(pair, 0..6),
        0..4u8,
    )
        .prop_map(|(prefix, tail, pairs, how)| {
            let mut uri = prefix.to_owned();
            // Mostly the route as it is, else a segment more or a longer name.
            match how {
                0 => uri.push_str(&format!("/{tail}")),
                1 => uri.push_str(&tail),
                _ => {}
            }
            if !pairs.is_empty() {
                uri.push('?');
                uri.push_str(&pairs.join("&"));
            }
            uri
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    /// No request is answered with a 5xx, and every error is a problem.
    #[test]
    fn random_requests_never_get_a_server_error(uri in random_request()) {
        let Ok(request) = Request::get(uri.as_str()).body(Body::empty()) else {
            // Not a URI http accepts: no server would see it.
            return Ok(());
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (status, content_type) = runtime.block_on(async {
            let api = api();
            let response = api.router.clone().oneshot(request).await.unwrap();
            let content_type = response
                .headers()
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned();
            (response.status(), content_type)
        });
        prop_assert!(!status.is_server_error(), "{uri}: {status}");
        if status.is_client_error() {
            prop_assert_eq!(content_type, "application/problem+json", "{}", uri);
        }
    }
}
