//! Root integration tests of the live per-port map: the real pipeline
//! ([`Watcher`]: kernel programs on a private cgroup, the start-up snapshot,
//! reconciliation) against real sockets in a private network namespace.
//!
//! They need root, so they are `#[ignore]`d and `cargo xtask test` runs them.

mod support;

use std::time::{Duration, Instant};

use portwatch::{
    capture::CaptureConfig,
    explain::{Flag, PortExplanation},
    failures::Failure,
    map::{Entry, listener_key},
    rules::CoexistReason,
    socket::{Family, Protocol},
    watch::{WatchConfig, Watcher},
};
use support::{
    CgroupGuard, DEADLINE, NetnsGuard, Op, Worker,
    churn::{Churn, Listing, Rng, difference, random_ops, ss_listeners},
};

/// One test at a time: workers are forked from this process and would hold
/// copies of sockets other tests' threads have open. ([`support::serial`]
/// with a tokio mutex, whose guard may be held across `.await`.)
async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    SERIAL.lock().await
}

async fn watcher(cgroup: &CgroupGuard) -> Watcher {
    let config = WatchConfig {
        capture: CaptureConfig {
            cgroup: Some(cgroup.path.clone()),
            ..CaptureConfig::default()
        },
        // Only on demand in these tests, so that each one sees events work.
        reconcile_every: Duration::from_secs(3600),
        ..WatchConfig::default()
    };
    Watcher::start(config).await.expect("watcher starts")
}

/// Runs the pipeline until `done` holds; panics with `what` at the deadline.
async fn until(watcher: &mut Watcher, what: &str, done: impl Fn(&Watcher) -> bool) {
    let deadline = Instant::now() + *DEADLINE;
    while !done(watcher) {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        let _ = tokio::time::timeout(Duration::from_millis(200), watcher.step()).await;
    }
}

/// Listeners on `port` in namespace `netns`.
fn listeners(watcher: &Watcher, netns: u64, port: u16) -> Vec<Entry> {
    watcher.read(|state| {
        state
            .map
            .listeners_on(port)
            .into_iter()
            .filter(|e| e.facts.netns == netns)
            .cloned()
            .collect()
    })
}

/// Recent failures, newest first.
fn failures(watcher: &Watcher) -> Vec<Failure> {
    watcher.read(|state| state.failures.newest().cloned().collect())
}

fn explanation(watcher: &Watcher, port: u16) -> PortExplanation {
    watcher.read(|state| state.explain(port))
}

fn flags(watcher: &Watcher, port: u16) -> Vec<&'static str> {
    explanation(watcher, port).flags().map(Flag::name).collect()
}

fn sharing(watcher: &Watcher, port: u16) -> Vec<CoexistReason> {
    explanation(watcher, port)
        .sharing()
        .map(|s| s.kind)
        .collect()
}

/// A worker in `netns` listening on TCP `addr` until resumed.
fn tcp_listener(cgroup: &CgroupGuard, netns: &NetnsGuard, addr: &str) -> Worker {
    let mut worker = Worker::spawn(
        &cgroup.path,
        Some(netns),
        &[Op::tcp(false), Op::bind(0, addr), Op::listen(0), Op::Pause],
    );
    assert_eq!(worker.results(3)[1..], [0, 0], "bind and listen on {addr}");
    worker
}

/// A worker in `netns` whose TCP bind to `addr` is refused with EADDRINUSE.
fn refused_bind(cgroup: &CgroupGuard, netns: &NetnsGuard, addr: &str) -> Worker {
    let mut worker = Worker::spawn(
        &cgroup.path,
        Some(netns),
        &[Op::tcp(false), Op::bind(0, addr)],
    );
    assert_eq!(
        worker.results(2)[1],
        -i64::from(libc::EADDRINUSE),
        "bind to {addr}"
    );
    worker
}

/// Runs the pipeline until it has recorded a failure that `which` picks;
/// that failure. Panics with `what` at the deadline.
async fn failure_where(
    watcher: &mut Watcher,
    what: &str,
    which: impl Fn(&Failure) -> bool,
) -> Failure {
    until(watcher, what, |w| failures(w).iter().any(&which)).await;
    failures(watcher)
        .into_iter()
        .find(which)
        .expect("the failure `until` saw")
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root, BTF and cgroup2; run by `cargo xtask test`"]
async fn ipv4_and_ipv6_on_one_port_from_two_processes() {
    let _serial = serial().await;
    let (cgroup, netns) = (CgroupGuard::new("map46"), NetnsGuard::new("map46"));
    let ns = netns.cookie();
    let mut watcher = watcher(&cgroup).await;
    let mut four = tcp_listener(&cgroup, &netns, "0.0.0.0:8000");
    let mut six = Worker::spawn(
        &cgroup.path,
        Some(&netns),
        &[
            Op::tcp(true),
            Op::v6only(0),
            Op::bind(0, "[::]:8000"),
            Op::listen(0),
            Op::Pause,
        ],
    );
    assert!(six.results(4)[1..].iter().all(|r| *r == 0));
    until(&mut watcher, "two listeners", |w| {
        listeners(w, ns, 8000).len() == 2
    })
    .await;
    let found = listeners(&watcher, ns, 8000);
    let v4 = found
        .iter()
        .find(|e| e.facts.family == Family::Ipv4)
        .unwrap();
    let v6 = found
        .iter()
        .find(|e| e.facts.family == Family::Ipv6)
        .unwrap();
    assert_eq!(v4.holders[0].pid, four.pid);
    assert_eq!(v6.holders[0].pid, six.pid);
    assert_eq!(v6.facts.options.v6only, Some(true));
    assert!(sharing(&watcher, 8000).contains(&CoexistReason::V6onlySplit));
    assert!(flags(&watcher, 8000).contains(&"dual_stack_split"));
    four.resume();
    six.resume();
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root, BTF and cgroup2; run by `cargo xtask test`"]
async fn tcp_and_udp_on_one_port_and_two_ipv4_addresses() {
    let _serial = serial().await;
    let (cgroup, netns) = (CgroupGuard::new("mapproto"), NetnsGuard::new("mapproto"));
    let ns = netns.cookie();
    let mut watcher = watcher(&cgroup).await;
    let mut worker = Worker::spawn(
        &cgroup.path,
        Some(&netns),
        &[
            Op::tcp(false),
            Op::bind(0, "127.0.0.1:8000"),
            Op::listen(0),
            Op::udp(false),
            Op::bind(1, "127.0.0.1:8000"),
            Op::tcp(false),
            Op::bind(2, "127.0.0.2:8000"),
            Op::listen(2),
            Op::Pause,
        ],
    );
    let results = worker.results(8);
    assert_eq!(
        [results[1], results[2], results[4], results[6], results[7]],
        [0; 5]
    );
    until(&mut watcher, "three listeners", |w| {
        listeners(w, ns, 8000).len() == 3
    })
    .await;
    let found = listeners(&watcher, ns, 8000);
    let udp = found
        .iter()
        .filter(|e| e.facts.protocol == Protocol::Udp)
        .count();
    assert_eq!(udp, 1, "the UDP socket is a listener once bound");
    let reasons = sharing(&watcher, 8000);
    assert!(
        reasons.contains(&CoexistReason::DifferentProtocol),
        "{reasons:?}"
    );
    assert!(
        reasons.contains(&CoexistReason::DifferentAddress),
        "{reasons:?}"
    );
    worker.resume();
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root, BTF and cgroup2; run by `cargo xtask test`"]
async fn the_same_address_twice_names_the_first_as_the_blocker() {
    let _serial = serial().await;
    let (cgroup, netns) = (CgroupGuard::new("mapinuse"), NetnsGuard::new("mapinuse"));
    let mut watcher = watcher(&cgroup).await;
    let mut first = tcp_listener(&cgroup, &netns, "127.0.0.1:8000");
    // Stays alive after the failure, so where it lives can be read.
    let mut second = Worker::spawn(
        &cgroup.path,
        Some(&netns),
        &[Op::tcp(false), Op::bind(0, "127.0.0.1:8000"), Op::Pause],
    );
    assert_eq!(second.results(2)[1], -i64::from(libc::EADDRINUSE));
    let failure = failure_where(&mut watcher, "the failure", |f| f.event.pid == second.pid).await;
    assert_eq!(failure.blocked_by.len(), 1, "{:?}", failure.blocked_by);
    let blocker = &failure.blocked_by[0];
    assert_eq!(blocker.holders[0].pid, first.pid, "{blocker:?}");
    assert_eq!(blocker.endpoint, "127.0.0.1:8000");
    assert_eq!(blocker.what, "listener");
    // The failing process's cgroup: the test's own, checked against the
    // cgroup id the kernel reported.
    let name = cgroup.path.file_name().unwrap().to_string_lossy();
    let place = failure.place.cgroup.as_deref().unwrap_or_default();
    assert!(place.ends_with(&format!("/{name}")), "{:?}", failure.place);
    first.resume();
    second.resume();
    second.wait();
}

/// Blockers the map does not keep are found through sock_diag at failure
/// time: a connection's local port, and a port in TIME_WAIT.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root, BTF and cgroup2; run by `cargo xtask test`"]
async fn connected_and_time_wait_blockers_are_named() {
    let _serial = serial().await;
    let (cgroup, netns) = (CgroupGuard::new("mapconn"), NetnsGuard::new("mapconn"));
    let mut watcher = watcher(&cgroup).await;
    let mut worker = Worker::spawn(
        &cgroup.path,
        Some(&netns),
        &[
            // 0: a listener on :8000; 1: a client from :9000; 2: the server side.
            Op::tcp(false),
            Op::bind(0, "127.0.0.1:8000"),
            Op::listen(0),
            Op::tcp(false),
            Op::bind(1, "127.0.0.1:9000"),
            Op::Connect {
                sock: 1,
                addr: "127.0.0.1:8000".parse().unwrap(),
            },
            Op::Accept { sock: 0 },
            // 3 wants the client's port while the connection is up.
            Op::tcp(false),
            Op::bind(3, "127.0.0.1:9000"),
            Op::Pause,
            // The server closes first, so its :8000 goes to TIME_WAIT.
            Op::Close { sock: 2 },
            Op::Close { sock: 1 },
            Op::Close { sock: 0 },
            // 4 wants :8000 back.
            Op::tcp(false),
            Op::bind(4, "127.0.0.1:8000"),
            Op::Pause,
        ],
    );
    let results = worker.results(9);
    assert_eq!(results[8], -i64::from(libc::EADDRINUSE), "{results:?}");
    let pid = worker.pid;
    let on = |port: u16| move |f: &Failure| f.event.pid == pid && f.event.port == port;
    let connected = failure_where(&mut watcher, "the failure on :9000", on(9000)).await;
    assert_eq!(connected.blocked_by.len(), 1, "{:?}", connected.blocked_by);
    assert_eq!(connected.blocked_by[0].what, "connected socket");
    assert_eq!(connected.blocked_by[0].holders[0].pid, worker.pid);

    worker.resume();
    let results = worker.results(6);
    assert_eq!(results[5], -i64::from(libc::EADDRINUSE), "{results:?}");
    let time_wait = failure_where(&mut watcher, "the failure on :8000", on(8000)).await;
    assert!(!time_wait.blocked_by.is_empty(), "{time_wait:?}");
    assert!(
        time_wait.blocked_by.iter().all(|b| b.what == "TIME_WAIT"),
        "{:?}",
        time_wait.blocked_by
    );
    worker.resume();
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root, BTF and cgroup2; run by `cargo xtask test`"]
async fn so_reuseport_twice_is_a_named_group() {
    let _serial = serial().await;
    let (cgroup, netns) = (CgroupGuard::new("mapreuse"), NetnsGuard::new("mapreuse"));
    let ns = netns.cookie();
    let mut watcher = watcher(&cgroup).await;
    let ops = [
        Op::tcp(false),
        Op::reuseport(0),
        Op::bind(0, "127.0.0.1:8000"),
        Op::listen(0),
        Op::Pause,
    ];
    let mut a = Worker::spawn(&cgroup.path, Some(&netns), &ops);
    let mut b = Worker::spawn(&cgroup.path, Some(&netns), &ops);
    assert_eq!(a.results(4)[2..], [0, 0]);
    assert_eq!(b.results(4)[2..], [0, 0]);
    until(&mut watcher, "two listeners", |w| {
        listeners(w, ns, 8000).len() == 2
    })
    .await;
    let explanation = explanation(&watcher, 8000);
    let group = explanation
        .flags()
        .find_map(|f| match f {
            Flag::ReuseportGroup {
                members,
                explanation,
            } => Some((members.clone(), explanation.clone())),
            _ => None,
        })
        .expect("a reuseport_group flag");
    assert_eq!(group.0.len(), 2);
    assert!(
        group.1.contains(&a.pid.to_string()) && group.1.contains(&b.pid.to_string()),
        "{}",
        group.1
    );
    assert_eq!(sharing(&watcher, 8000), [CoexistReason::ReusePortGroup]);
    a.resume();
    b.resume();
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root, BTF and cgroup2; run by `cargo xtask test`"]
async fn the_wildcard_with_a_specific_address() {
    let _serial = serial().await;
    let (cgroup, netns) = (CgroupGuard::new("mapwild"), NetnsGuard::new("mapwild"));
    let ns = netns.cookie();
    let mut watcher = watcher(&cgroup).await;
    // Without sharing options the wildcard blocks the specific address...
    let mut wild = tcp_listener(&cgroup, &netns, "0.0.0.0:8000");
    let mut blocked = refused_bind(&cgroup, &netns, "127.0.0.1:8000");
    let failure = failure_where(&mut watcher, "the failure", |f| f.event.pid == blocked.pid).await;
    assert_eq!(failure.blocked_by[0].endpoint, "0.0.0.0:8000");
    assert!(
        failure.blocked_by[0].reason.contains("wildcard"),
        "{}",
        failure.blocked_by[0].reason
    );
    wild.resume();
    blocked.wait();
    // ...and with SO_REUSEPORT on both they coexist, flagged.
    let mut both = Worker::spawn(
        &cgroup.path,
        Some(&netns),
        &[
            Op::tcp(false),
            Op::reuseport(0),
            Op::bind(0, "0.0.0.0:8001"),
            Op::listen(0),
            Op::tcp(false),
            Op::reuseport(1),
            Op::bind(1, "127.0.0.1:8001"),
            Op::listen(1),
            Op::Pause,
        ],
    );
    assert!(both.results(8).iter().all(|r| *r >= 0));
    until(&mut watcher, "two listeners", |w| {
        listeners(w, ns, 8001).len() == 2
    })
    .await;
    assert!(flags(&watcher, 8001).contains(&"wildcard_and_specific"));
    both.resume();
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root, BTF and cgroup2; run by `cargo xtask test`"]
async fn a_listener_from_before_start_appears_with_its_owner_and_goes_when_closed() {
    let _serial = serial().await;
    let (cgroup, netns) = (CgroupGuard::new("mapbefore"), NetnsGuard::new("mapbefore"));
    let ns = netns.cookie();
    let mut worker = Worker::spawn(
        &cgroup.path,
        Some(&netns),
        &[
            Op::tcp(false),
            Op::reuseaddr(0),
            Op::bind(0, "127.0.0.1:9000"),
            Op::listen(0),
            Op::Pause,
            Op::Close { sock: 0 },
            Op::Pause,
        ],
    );
    assert_eq!(worker.results(4)[1..], [0, 0, 0]);
    let mut watcher = watcher(&cgroup).await;
    // Ready with the socket, before its owner and options are read.
    let found = listeners(&watcher, ns, 9000);
    assert_eq!(found.len(), 1, "found by the start-up snapshot");
    assert!(found[0].owners_pending, "{:?}", found[0]);
    assert!(found[0].holders.is_empty(), "not guessed: {:?}", found[0]);
    assert_eq!(found[0].facts.options.reuse_addr, None, "not guessed");
    // The worker's socket among every other this host has.
    assert!(
        watcher
            .read(|state| state.owners_pending)
            .is_some_and(|n| n >= 1)
    );
    watcher.read_owners().await;
    assert_eq!(watcher.read(|state| state.owners_pending), None);
    let found = listeners(&watcher, ns, 9000);
    assert!(!found[0].owners_pending);
    assert_eq!(
        found[0].holders.iter().map(|h| h.pid).collect::<Vec<_>>(),
        [worker.pid]
    );
    assert!(!found[0].since_exact, "older than portwatch");
    assert_eq!(
        found[0].facts.options.reuse_addr,
        Some(true),
        "read through pidfd_getfd"
    );
    worker.resume();
    assert_eq!(worker.results(2), [0, 0], "pause, close");
    until(&mut watcher, "the close", |w| {
        listeners(w, ns, 9000).is_empty()
    })
    .await;
    worker.resume();
    worker.wait();
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root, BTF and cgroup2; run by `cargo xtask test`"]
async fn sigkill_leaves_nothing_stale() {
    let _serial = serial().await;
    let (cgroup, netns) = (CgroupGuard::new("mapkill"), NetnsGuard::new("mapkill"));
    let ns = netns.cookie();
    let mut watcher = watcher(&cgroup).await;
    let mut worker = Worker::spawn(
        &cgroup.path,
        Some(&netns),
        &[
            Op::tcp(false),
            Op::bind(0, "127.0.0.1:9100"),
            Op::listen(0),
            Op::udp(true),
            Op::bind(1, "[::1]:9100"),
            Op::Pause,
        ],
    );
    assert!(worker.results(5).iter().all(|r| *r >= 0));
    until(&mut watcher, "both sockets", |w| {
        listeners(w, ns, 9100).len() == 2
    })
    .await;
    // SAFETY: our own child.
    unsafe { libc::kill(worker.pid as i32, libc::SIGKILL) };
    worker.wait();
    until(&mut watcher, "nothing left", |w| {
        w.read(|state| state.map.on_port(9100).all(|e| e.facts.netns != ns))
    })
    .await;
    assert_eq!(
        watcher.reconcile().await.unwrap().total(),
        0,
        "events alone were exact"
    );
}

/// 10,000 random binds, listens and closes from several processes; then the
/// map equals `ss -tuln` in that namespace, and reconciliation finds nothing.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root, BTF and cgroup2; run by `cargo xtask test`"]
async fn after_ten_thousand_random_operations_the_map_equals_ss() {
    const WORKERS: usize = 4;
    const OPS_PER_WORKER: usize = 2500;
    const MIN_LISTENERS: usize = 10;
    let _serial = serial().await;
    let (cgroup, netns) = (CgroupGuard::new("mapdrift"), NetnsGuard::new("mapdrift"));
    let ns = netns.cookie();
    let mut watcher = watcher(&cgroup).await;
    let mut rng = Rng::from_env("PORTWATCH_DRIFT_SEED");
    let seed = rng.seed();
    let churn = Churn {
        ops: OPS_PER_WORKER,
        first_port: 20000,
        ports: 40,
        sharing_options: false,
    };
    let mut workers = Vec::new();
    for _ in 0..WORKERS {
        let mut ops = random_ops(&mut rng, &churn);
        ops.push(Op::Pause);
        workers.push((
            Worker::spawn(&cgroup.path, Some(&netns), &ops),
            ops.len() - 1,
        ));
    }
    for (worker, count) in &mut workers {
        worker.results(*count);
    }
    let expected = ss_listeners(&netns);
    // Each worker keeps up to 64 sockets open; many bind and listen.
    assert!(
        expected.len() >= MIN_LISTENERS,
        "only {} listeners left (seed {seed}): {expected:?}",
        expected.len()
    );
    let mine = |w: &Watcher| -> Vec<Listing> {
        let mut listing: Vec<Listing> = w.read(|state| {
            state
                .map
                .listeners()
                .filter(|e| e.facts.netns == ns)
                .map(|e| {
                    let (_, protocol, _, address, port) = listener_key(&e.facts);
                    (protocol, address, port)
                })
                .collect()
        });
        listing.sort_unstable();
        listing
    };
    let deadline = Instant::now() + *DEADLINE;
    while mine(&watcher) != expected {
        if Instant::now() > deadline {
            let got = mine(&watcher);
            panic!(
                "the map differs from ss -tuln (seed {seed}):\n{}",
                difference(&got, &expected)
            );
        }
        let _ = tokio::time::timeout(Duration::from_millis(200), watcher.step()).await;
    }
    let drift = watcher.reconcile().await.unwrap();
    assert_eq!(drift.total(), 0, "no drift after the storm: {drift:?}");
    assert_eq!(
        watcher.read(|s| s.stats.dropped),
        0,
        "nothing was lost at this rate"
    );
    for (worker, _) in &mut workers {
        worker.resume();
    }
}
