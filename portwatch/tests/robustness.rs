//! Robustness of the real `portwatch daemon` under load it cannot keep up
//! with, and with maps too small for the load:
//! - a storm of binds beyond the ring buffer: every record is delivered or
//!   counted as dropped, exactly, and reconciliation brings the map back to
//!   what `ss` shows, then leaves it alone;
//! - random churn from several processes in several network namespaces:
//!   the daemon's `/ports` equals `ss -tuln` in each namespace;
//! - one-entry maps: every bind has exactly the outcome it has without
//!   portwatch (the programs never deny), and what did not fit is counted.
//!
//! Each test watches a child cgroup of its own with private network
//! namespaces, and needs root, so they are `#[ignore]`d and `cargo xtask
//! test` runs them.

mod support;

use std::collections::BTreeMap;

use serde_json::Value;
use support::{
    CgroupGuard, NetnsGuard, Op, OpResult, Worker,
    churn::{Churn, Rng, random_ops},
    daemon::{Daemon, sample},
    serial,
};

/// `name{label="value"}` in a metrics text (0 when absent).
fn counter(metrics: &str, name: &str, label: &str, value: &str) -> u64 {
    sample(metrics, &format!("{name}{{{label}=\"{value}\"}}")) as u64
}

const INFERENCE_CHECKS: &str = "portwatch_errno_inference_checks_total";

/// `portwatch_bind_failures_total`, summed by errno.
fn bind_failures(metrics: &str) -> BTreeMap<String, u64> {
    let mut by_errno = BTreeMap::new();
    for line in metrics.lines() {
        let Some(rest) = line.strip_prefix("portwatch_bind_failures_total{errno=\"") else {
            continue;
        };
        let errno = rest.split('"').next().unwrap_or_default().to_owned();
        let n: f64 = line
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        *by_errno.entry(errno).or_default() += n as u64;
    }
    by_errno.retain(|_, n| *n > 0);
    by_errno
}

fn events(metrics: &str, kind: &str) -> u64 {
    counter(metrics, "portwatch_events_total", "kind", kind)
}

fn dropped(metrics: &str, hook: &str) -> u64 {
    counter(metrics, "portwatch_events_dropped_total", "hook", hook)
}

fn drift(metrics: &str, kind: &str) -> u64 {
    counter(metrics, "portwatch_reconcile_drift_total", "kind", kind)
}

fn reconciliations(metrics: &str) -> u64 {
    sample(metrics, "portwatch_reconciliations_total") as u64
}

/// How many of `ops` match `what`.
fn issued(ops: &[Op], what: impl Fn(&Op) -> bool) -> u64 {
    ops.iter().filter(|op| what(op)).count() as u64
}

/// Results that differ between two runs only in descriptor numbers (every
/// success is 0), so that runs can be compared.
fn outcomes(results: &[OpResult]) -> Vec<OpResult> {
    results.iter().map(|r| (*r).min(0)).collect()
}

/// Runs `ops` in a worker and returns it once every op before the first
/// [`Op::Pause`] (or the end) has succeeded.
fn run_ok(cgroup: &CgroupGuard, netns: &NetnsGuard, ops: &[Op]) -> Worker {
    let mut worker = Worker::spawn(&cgroup.path, Some(netns), ops);
    let before_pause = ops
        .iter()
        .position(|op| matches!(op, Op::Pause))
        .unwrap_or(ops.len());
    let results = worker.results(before_pause);
    assert!(
        results.iter().all(|r| *r >= 0),
        "every op succeeds: {results:?} for {ops:?}"
    );
    worker
}

/// Records per kind of event: how many the workers caused, and the hooks
/// whose drop counters account for those that did not arrive.
struct Tally {
    kind: &'static str,
    hooks: &'static [&'static str],
    issued: u64,
}

impl Tally {
    /// Events received plus records counted as dropped.
    fn accounted(&self, metrics: &str) -> u64 {
        events(metrics, self.kind) + self.hooks.iter().map(|h| dropped(metrics, h)).sum::<u64>()
    }
}

/// `BPF_MAP_TYPE_HASH` in a map's fdinfo.
const HASH_MAP: u32 = 1;

/// (key size, value size, max entries) of each hash map process `pid`
/// holds, from its fdinfo: the kernel's own account of the maps it made.
fn hash_maps(pid: u32) -> Vec<(u32, u32, u32)> {
    // By map id: a map may have more than one descriptor.
    let mut maps = BTreeMap::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fdinfo")).expect("read fdinfo") {
        let info = std::fs::read_to_string(entry.expect("fdinfo entry").path()).unwrap_or_default();
        let field = |name: &str| -> Option<u32> {
            info.lines()
                .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
                .and_then(|value| value.trim().parse().ok())
        };
        if field("map_type") == Some(HASH_MAP)
            && let (Some(id), Some(key), Some(value), Some(entries)) = (
                field("map_id"),
                field("key_size"),
                field("value_size"),
                field("max_entries"),
            )
        {
            maps.insert(id, (key, value, entries));
        }
    }
    let mut maps: Vec<(u32, u32, u32)> = maps.into_values().collect();
    maps.sort_unstable();
    maps
}

/// The daemon's listeners in `netns` after two more reconciliations: a map
/// that needs no more correcting stays the same through them.
fn after_two_reconciliations(daemon: &Daemon, netns: u64) -> Vec<Value> {
    let before = reconciliations(&daemon.text("/metrics").1);
    daemon.metrics_until("two more reconciliations", |m| {
        reconciliations(m) >= before + 2
    });
    daemon.listeners(netns)
}

/// 1,000 binds and closes from four processes while the daemon is stopped,
/// so that a 4 KiB ring overflows for certain; some listeners close and
/// others open once the ring is full, so only reconciliation can get them
/// right.
#[test]
#[ignore = "needs root, BTF and cgroup2; run by `cargo xtask test`"]
fn a_storm_beyond_the_ring_is_counted_exactly_and_reconciled() {
    const STORM_WORKERS: usize = 4;
    const STORM_SOCKETS: usize = 250;
    let _serial = serial();
    let (cgroup, netns) = (CgroupGuard::new("storm"), NetnsGuard::new("storm"));
    let ns = netns.cookie();
    // 4096 bytes, the smallest ring: 34 records of 120 bytes.
    let daemon = Daemon::start_with(
        &cgroup,
        "ring_size = 4096\nreconcile_interval = \"1s\"\n",
        &[],
    );

    // Listeners from before the storm: three stay, two close once the ring
    // is full (their close records are lost).
    let holder_ops = [
        Op::tcp(false),
        Op::bind(0, "127.0.0.1:7200"),
        Op::listen(0),
        Op::tcp(true),
        Op::v6only(1),
        Op::bind(1, "[::1]:7200"),
        Op::listen(1),
        Op::udp(false),
        Op::bind(2, "127.0.0.1:7201"),
        Op::tcp(false),
        Op::bind(3, "127.0.0.1:7202"),
        Op::listen(3),
        Op::udp(true),
        Op::bind(4, "[::]:7203"),
        Op::Pause,
        Op::Close { sock: 3 },
        Op::Close { sock: 4 },
        Op::Pause,
    ];
    let mut holder = run_ok(&cgroup, &netns, &holder_ops);
    let before = daemon.until_listing_is_ss(&netns, "before the storm");
    assert_eq!(before.len(), 5, "{before:?}");

    let storm_ops: Vec<Op> = (0..STORM_SOCKETS)
        .flat_map(|sock| {
            [
                Op::udp(false),
                Op::bind(sock, "127.0.0.1:0"),
                Op::Close { sock },
            ]
        })
        .collect();
    // Opened once the ring is full: their bind and listen records are lost.
    let late_ops = [
        Op::tcp(false),
        Op::bind(0, "127.0.0.1:7204"),
        Op::listen(0),
        Op::tcp(true),
        Op::v6only(1),
        Op::bind(1, "[::]:7204"),
        Op::listen(1),
        Op::udp(true),
        Op::bind(2, "[::1]:7205"),
        Op::Pause,
    ];

    // SAFETY: pausing our own child so that nothing drains the ring.
    unsafe { libc::kill(daemon.child.id() as i32, libc::SIGSTOP) };
    let mut storm: Vec<Worker> = (0..STORM_WORKERS)
        .map(|_| Worker::spawn(&cgroup.path, Some(&netns), &storm_ops))
        .collect();
    for worker in &mut storm {
        let results = worker.results(storm_ops.len());
        assert!(results.iter().all(|r| *r >= 0), "{results:?}");
        worker.wait();
    }
    holder.resume();
    assert_eq!(holder.results(3), [0, 0, 0], "pause, close, close");
    let mut late = run_ok(&cgroup, &netns, &late_ops);
    // SAFETY: as above.
    unsafe { libc::kill(daemon.child.id() as i32, libc::SIGCONT) };

    // Every successful bind is one post_bind record, every listen one
    // listen record, every close of a bound socket one release record.
    let all_ops: Vec<&[Op]> = std::iter::repeat_n(&storm_ops[..], STORM_WORKERS)
        .chain([&holder_ops[..], &late_ops[..]])
        .collect();
    let count = |what: fn(&Op) -> bool| all_ops.iter().map(|ops| issued(ops, what)).sum();
    let tallies = [
        Tally {
            kind: "bind",
            hooks: &["post_bind"],
            issued: count(|op| matches!(op, Op::Bind { .. })),
        },
        Tally {
            kind: "listen",
            hooks: &["listen", "listen_outcome"],
            issued: count(|op| matches!(op, Op::Listen { .. })),
        },
        Tally {
            kind: "close",
            hooks: &["release"],
            issued: count(|op| matches!(op, Op::Close { .. })),
        },
    ];
    let check_tallies = |metrics: &str| {
        for tally in &tallies {
            assert_eq!(
                tally.accounted(metrics),
                tally.issued,
                "{}: {} received + dropped by {:?} must be the {} issued; metrics:\n{metrics}",
                tally.kind,
                events(metrics, tally.kind),
                tally.hooks,
                tally.issued
            );
        }
    };
    let metrics = daemon.metrics_until("every record received or counted as dropped", |m| {
        tallies.iter().all(|t| t.accounted(m) >= t.issued)
    });
    check_tallies(&metrics);
    let lost: u64 = tallies
        .iter()
        .flat_map(|t| t.hooks.iter().map(|h| dropped(&metrics, h)))
        .sum();
    assert!(
        lost > 0,
        "a 4 KiB ring held everything; metrics:\n{metrics}"
    );

    // Reconciliation adds the late sockets and removes the two closed ones.
    let after = daemon.until_listing_is_ss(&netns, "after the storm");
    let ports: Vec<u16> = after.iter().map(|(_, _, port)| *port).collect();
    assert!(
        ports.contains(&7204) && ports.contains(&7205) && !ports.contains(&7202),
        "{after:?}"
    );
    let metrics = daemon.text("/metrics").1;
    // Lower bounds: other namespaces on this machine may add drift of their own.
    assert!(drift(&metrics, "missing") >= 3, "{metrics}");
    assert!(drift(&metrics, "stale") >= 2, "{metrics}");

    // Then the map is left alone: nothing in this namespace changes across
    // reconciliations (not even `since`, which a remove and re-add would
    // reset), and no record is counted twice.
    let settled = after_two_reconciliations(&daemon, ns);
    let later = after_two_reconciliations(&daemon, ns);
    assert_eq!(settled, later, "the namespace's listeners changed");
    assert_eq!(daemon.until_listing_is_ss(&netns, "at the end"), after);
    check_tallies(&daemon.text("/metrics").1);
    for worker in [&mut late, &mut holder] {
        worker.resume();
        worker.wait();
    }
}

/// Random binds, listens and closes (TCP and UDP, IPv4 and IPv6, wildcard
/// and loopback, SO_REUSEADDR, SO_REUSEPORT, IPV6_V6ONLY) from two processes
/// in each of three namespaces at once; then each namespace's `/ports`
/// equals `ss -tuln` there, before and after the processes exit. Every
/// failed bind's errno, as the kernel reported it, is also what the
/// conflict rules infer where no outcome hook runs: how often they agree is
/// printed, and a disagreement fails. With `outcome = "exact"` (an outcome
/// hook on every kernel): the errnos reported are the kernel's.
#[test]
#[ignore = "needs root, BTF and cgroup2; run by `cargo xtask test`"]
fn random_churn_across_processes_and_namespaces_matches_ss() {
    churn_matches_ss("exact");
}

/// The same churn with `outcome = "inferred"`, the default where the kernel
/// refuses fexit: the map still equals `ss`, every failed bind is reported,
/// and at least 90% of their errnos are the ones the kernel returned
/// (measured: 358 of 359, and 464 of 464).
#[test]
#[ignore = "needs root, BTF and cgroup2; run by `cargo xtask test`"]
fn random_churn_with_inferred_outcomes_matches_ss() {
    churn_matches_ss("inferred");
}

fn churn_matches_ss(outcome: &str) {
    const NAMESPACES: usize = 3;
    const WORKERS_PER_NAMESPACE: usize = 2;
    const OPS_PER_WORKER: usize = 1500;
    const MIN_LISTENERS: usize = 10;
    let _serial = serial();
    let cgroup = CgroupGuard::new("churn");
    let namespaces: Vec<NetnsGuard> = (0..NAMESPACES)
        .map(|i| NetnsGuard::new(&format!("churn{i}")))
        .collect();
    // Reconciliation only when something asks for it (a lost record, a
    // listen without a bind): the events have to be right.
    let config = format!("reconcile_interval = \"1h\"\noutcome = \"{outcome}\"\n");
    let daemon = Daemon::start_with(&cgroup, &config, &[]);
    let mut rng = Rng::from_env("PORTWATCH_CHURN_SEED");
    let seed = format!("seed {}", rng.seed());
    let churn = Churn {
        ops: OPS_PER_WORKER,
        first_port: 20000,
        ports: 24,
        sharing_options: true,
    };
    let mut workers = Vec::new();
    for netns in &namespaces {
        for _ in 0..WORKERS_PER_NAMESPACE {
            let mut ops = random_ops(&mut rng, &churn);
            ops.push(Op::Pause);
            workers.push((Worker::spawn(&cgroup.path, Some(netns), &ops), ops));
        }
    }
    // The errno of each failed bind, as the kernel returned it.
    let mut returned: BTreeMap<String, u64> = BTreeMap::new();
    for (worker, ops) in &mut workers {
        let results = worker.results(ops.len() - 1);
        for (_, r) in ops
            .iter()
            .zip(&results)
            .filter(|(op, r)| matches!(op, Op::Bind { .. }) && **r < 0)
        {
            let errno = portwatch::event::Errno(-*r as i32);
            *returned.entry(errno.name().into_owned()).or_default() += 1;
        }
    }
    let failed_binds: u64 = returned.values().sum();
    let listeners: usize = namespaces
        .iter()
        .map(|netns| daemon.until_listing_is_ss(netns, &seed).len())
        .sum();
    println!("{listeners} listeners, {failed_binds} failed binds");
    assert!(
        listeners >= MIN_LISTENERS && failed_binds > 0,
        "too little churn to test ({seed}): {listeners} listeners, {failed_binds} failed binds"
    );
    // Every failed bind reached the daemon, with the kernel's errno, or
    // where outcomes are inferred with the errno the rules name; the
    // failures a thread left parked while it pauses come with the sweep.
    let inferred = sample(
        &daemon.text("/metrics").1,
        r#"portwatch_program_attached{hook="bind_outcome",path="inferred"}"#,
    ) == 1.0;
    assert_eq!(inferred, outcome == "inferred", "{outcome}");
    let metrics = daemon.metrics_until("every failed bind reported", |m| {
        bind_failures(m).values().sum::<u64>() >= failed_binds
    });
    let reported = bind_failures(&metrics);
    let same: u64 = returned
        .iter()
        .map(|(errno, n)| (*n).min(reported.get(errno).copied().unwrap_or(0)))
        .sum();
    println!(
        "errnos of the {failed_binds} failed binds as reported ({}): {same} as the kernel returned them; kernel {returned:?}, reported {reported:?} ({seed})",
        if inferred {
            "inferred"
        } else {
            "from the outcome hooks"
        }
    );
    if inferred {
        // The floor leaves room for a blocker whose record came late.
        assert!(
            same * 10 >= failed_binds * 9,
            "{seed}: {same} of {failed_binds}"
        );
    } else {
        assert_eq!(reported, returned, "{seed}");
    }
    // Every failure the kernel gave an errno for was replayed by the rules
    // (what the daemon infers where no outcome hook runs), once.
    let checked = |m: &str, result: &str| counter(m, INFERENCE_CHECKS, "result", result);
    let metrics = daemon.metrics_until("every kernel errno replayed", |m| {
        let replayed: u64 = ["agree", "disagree", "undecided"]
            .iter()
            .map(|r| checked(m, r))
            .sum();
        let kernel_errnos = events(m, "bind_failed") + events(m, "listen_failed");
        replayed == if inferred { 0 } else { kernel_errnos }
    });
    let (agree, disagree, undecided) = (
        checked(&metrics, "agree"),
        checked(&metrics, "disagree"),
        checked(&metrics, "undecided"),
    );
    let replayed = agree + disagree + undecided;
    if !inferred {
        println!(
            "errno inference against the kernel's: {agree} of {replayed} agree ({:.1}%), {disagree} disagree, {undecided} undecided ({seed})",
            100.0 * agree as f64 / replayed.max(1) as f64
        );
    }
    assert!(inferred || replayed >= failed_binds, "{metrics}");
    // Measured at 99.7-100% over five seeds; the floor leaves room for a
    // blocker whose record comes late. A disagreement is a rules bug.
    assert_eq!(disagree, 0, "{seed}: the replay named another errno");
    assert!(
        agree * 10 >= replayed * 9,
        "{seed}: {agree} of {replayed} agree"
    );

    for (worker, _) in &mut workers {
        worker.resume();
        worker.wait();
    }
    for netns in &namespaces {
        let left = daemon.until_listing_is_ss(netns, &seed);
        assert!(left.is_empty(), "ss still lists {left:?}");
    }
    let (code, stderr) = daemon.stop();
    assert_eq!(code, Some(0), "{stderr}");
}

/// The binds of [`every_bind_has_its_outcome_with_one_entry_maps`]: a holder
/// keeps two sockets, then six processes start together, each binding
/// rounds of sockets that share or fight over a port of its own, and two
/// that fight over the holder's.
struct Contest {
    holder: Worker,
    contenders: Vec<Worker>,
    /// Per process, the holder first: the outcome of each op.
    outcomes: Vec<Vec<OpResult>>,
    binds_ok: u64,
    binds_failed: u64,
    /// Sockets bound and still open while the processes pause.
    held: u64,
}

impl Contest {
    const CONTENDERS: usize = 6;
    const ROUNDS: usize = 30;

    fn holder_ops() -> Vec<Op> {
        vec![
            Op::tcp(false),
            Op::bind(0, "127.0.0.1:7300"),
            Op::listen(0),
            Op::udp(true),
            Op::bind(1, "[::]:7301"), // dual-stack: covers 127.0.0.1:7301 too
            Op::Pause,
        ]
    }

    fn contender_ops(index: usize) -> Vec<Op> {
        let mut ops = vec![Op::Pause];
        let mut sock = 0;
        let mut next = || {
            sock += 1;
            sock - 1
        };
        for round in 0..Contest::ROUNDS {
            let port = 20000 + index * Contest::ROUNDS + round;
            let (v4, v6, any6) = (
                format!("127.0.0.1:{port}"),
                format!("[::1]:{port}"),
                format!("[::]:{port}"),
            );
            // Two SO_REUSEPORT listeners share the port...
            for _ in 0..2 {
                let s = next();
                ops.extend([
                    Op::tcp(false),
                    Op::reuseport(s),
                    Op::bind(s, &v4),
                    Op::listen(s),
                ]);
            }
            // ...which a third socket without it cannot join.
            let s = next();
            ops.extend([Op::tcp(false), Op::bind(s, &v4), Op::Close { sock: s }]);
            // UDP has a port space of its own.
            let s = next();
            ops.extend([Op::udp(false), Op::bind(s, &v4)]);
            // IPv6 only does not overlap IPv4...
            let s = next();
            ops.extend([
                Op::tcp(true),
                Op::v6only(s),
                Op::bind(s, &v6),
                Op::listen(s),
            ]);
            // ...a dual-stack wildcard does.
            let s = next();
            ops.extend([Op::tcp(true), Op::bind(s, &any6), Op::Close { sock: s }]);
            // The holder's ports, from another process.
            let s = next();
            ops.extend([
                Op::tcp(false),
                Op::bind(s, "127.0.0.1:7300"),
                Op::Close { sock: s },
            ]);
            let s = next();
            ops.extend([
                Op::udp(false),
                Op::bind(s, "127.0.0.1:7301"),
                Op::Close { sock: s },
            ]);
        }
        ops.push(Op::Pause);
        ops
    }

    /// Runs the contest in `netns` and leaves every process paused, holding
    /// its sockets.
    fn run(cgroup: &CgroupGuard, netns: &NetnsGuard) -> Contest {
        let holder_ops = Contest::holder_ops();
        let mut holder = Worker::spawn(&cgroup.path, Some(netns), &holder_ops);
        let mut per_process = vec![outcomes(&holder.results(holder_ops.len() - 1))];
        let mut all_ops = vec![holder_ops];
        let mut contenders: Vec<Worker> = (0..Contest::CONTENDERS)
            .map(|index| {
                let ops = Contest::contender_ops(index);
                let worker = Worker::spawn(&cgroup.path, Some(netns), &ops);
                all_ops.push(ops);
                worker
            })
            .collect();
        // Every process waits at its first op (a pause, whose result comes
        // once it is over), then all go at once.
        for worker in &mut contenders {
            worker.resume();
        }
        for (worker, ops) in contenders.iter_mut().zip(&all_ops[1..]) {
            let results = worker.results(ops.len() - 1);
            per_process.push(outcomes(&results[1..]));
        }
        let (mut binds_ok, mut binds_failed, mut held) = (0, 0, 0);
        for (ops, results) in all_ops.iter().zip(&per_process) {
            let ops = ops.iter().filter(|op| !matches!(op, Op::Pause));
            let closed: Vec<usize> = ops
                .clone()
                .filter_map(|op| match op {
                    Op::Close { sock } => Some(*sock),
                    _ => None,
                })
                .collect();
            for (op, result) in ops.zip(results) {
                if let Op::Bind { sock, .. } = op {
                    match *result {
                        0 => binds_ok += 1,
                        _ => binds_failed += 1,
                    }
                    held += u64::from(*result == 0 && !closed.contains(sock));
                }
            }
        }
        Contest {
            holder,
            contenders,
            outcomes: per_process,
            binds_ok,
            binds_failed,
            held,
        }
    }

    fn finish(mut self) {
        for worker in self.contenders.iter_mut().chain([&mut self.holder]) {
            worker.resume();
            worker.wait();
        }
    }
}

/// With every map at one entry and the smallest ring, concurrent binds from
/// six processes (sharing, conflicting, across processes) each end exactly
/// as they do with no portwatch at all: nothing is denied. What did not fit
/// is counted, the daemon stays ready, and reconciliation keeps its map
/// equal to `ss`, closes of untracked sockets included.
#[test]
#[ignore = "needs root, BTF and cgroup2; run by `cargo xtask test`"]
fn every_bind_has_its_outcome_with_one_entry_maps() {
    let _serial = serial();
    let cgroup = CgroupGuard::new("tiny");
    let (alone, watched) = (NetnsGuard::new("tinyalone"), NetnsGuard::new("tinywatch"));

    let without = Contest::run(&cgroup, &alone);
    let expected = without.outcomes.clone();
    assert!(
        without.binds_ok > 0 && without.binds_failed > 0,
        "the contest has both outcomes"
    );
    let failures: Vec<OpResult> = expected
        .iter()
        .flatten()
        .copied()
        .filter(|r| *r < 0)
        .collect();
    assert!(
        failures.iter().all(|r| *r == -i64::from(libc::EADDRINUSE)),
        "only EADDRINUSE without portwatch: {failures:?}"
    );
    without.finish();

    let daemon = Daemon::start_with(
        &cgroup,
        "ring_size = 4096\ntracked_sockets = 1\nin_flight_calls = 1\nreconcile_interval = \"1s\"\n",
        &[],
    );
    // TRACKED (cookie -> flag) and PENDING_CONNECT, PENDING_BIND and
    // PENDING_LISTEN (thread id -> destination and socket, record and
    // state, record and socket) as the kernel made them.
    assert_eq!(
        hash_maps(daemon.child.id()),
        [(4, 48, 1), (4, 136, 1), (4, 136, 1), (8, 1, 1)],
        "one entry each"
    );
    let with = Contest::run(&cgroup, &watched);
    for (process, (got, want)) in with.outcomes.iter().zip(&expected).enumerate() {
        assert_eq!(
            got, want,
            "process {process} (0 is the holder): outcomes differ"
        );
    }
    assert_eq!(daemon.status("/readyz"), Some(200));

    // Each successful bind is one post_bind record, which either arrived or
    // was counted; that hook also counts each socket it could not track, and
    // at most one of the sockets held now fits in the map. Each failed bind
    // arrived or was counted by the outcome hook or, when it could not even
    // be parked, by the bind hook.
    let (ok, failed, held) = (with.binds_ok, with.binds_failed, with.held);
    let metrics = daemon.metrics_until("every bind received or counted", |m| {
        events(m, "bind") + dropped(m, "post_bind") >= ok
            && events(m, "bind_failed") + dropped(m, "bind_outcome") + dropped(m, "bind") >= failed
    });
    let post_bind = dropped(&metrics, "post_bind");
    assert!(
        events(&metrics, "bind") <= ok && events(&metrics, "bind_failed") <= failed,
        "more events than binds ({ok} ok, {failed} failed):\n{metrics}"
    );
    assert!(
        post_bind >= held - 1,
        "{held} sockets held, {post_bind} post_bind drops:\n{metrics}"
    );
    println!(
        "{ok} binds ok, {failed} failed; dropped: bind {}, post_bind {post_bind}, bind_outcome {}; untracked {}",
        dropped(&metrics, "bind"),
        dropped(&metrics, "bind_outcome"),
        sample(&metrics, "portwatch_untracked_sockets_total")
    );

    let listing = daemon.until_listing_is_ss(&watched, "while held");
    assert!(!listing.is_empty());
    with.finish();
    // Only one socket could be tracked: the others' closes are found by
    // reconciliation.
    let left = daemon.until_listing_is_ss(&watched, "after every process exited");
    assert!(left.is_empty(), "ss still lists {left:?}");
    assert_eq!(daemon.status("/readyz"), Some(200));
    let (code, stderr) = daemon.stop();
    assert_eq!(code, Some(0), "{stderr}");
}
