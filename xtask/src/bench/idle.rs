//! Figure 8: the daemon at rest on a quiet host: how often it wakes and how
//! much CPU it takes when nothing binds.
//!
//! A daemon with the default configuration (reconciliation every 30 s, the
//! ephemeral listing every 15 s) starts, settles, and is then watched for a
//! window of 60 s (5 s with `--quick`) in which the bench creates no load.
//! Wakeups are its threads' context switches (voluntary and involuntary,
//! from `/proc/<pid>/task/*/status`, sampled every 100 ms so that a thread
//! that ends inside the window is counted up to its last sample); CPU is the
//! process's user + system time from `/proc/<pid>/stat`, which keeps the
//! time of threads that ended.
//!
//! Then the same daemon with 100k listeners held in a private namespace (10k
//! with `--quick`), watched for 5 minutes (20 s): ten reconciliations and
//! twenty ephemeral listings of those sockets, which is what an idle busy
//! host costs.

use std::{
    collections::HashMap,
    fs, thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use super::{BenchDaemon, Ctx, Goal, Row, Stats, snapshot::Listeners};

/// How long the daemon runs before a window starts: its start-up work
/// (snapshot, first ephemeral listing, heap trim) is over by then.
const SETTLE: Duration = Duration::from_secs(5);

/// How often the threads' counters are read.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);

/// `cargo xtask bench --only idle`.
pub fn run(ctx: &Ctx) -> Result<Vec<Row>> {
    let window = Duration::from_secs(ctx.pick(60, 5));
    let rounds = ctx.pick(2, 1);
    let (mut wakeups, mut cpu) = (Vec::new(), Vec::new());
    let mut detail = Vec::new();
    for round in 1..=rounds {
        let daemon = BenchDaemon::start(ctx, "")?;
        thread::sleep(SETTLE);
        let rest = watch(daemon.pid(), window)?;
        daemon.stop()?;
        let per_second = rest.switches as f64 / window.as_secs_f64();
        let percent = rest.cpu_seconds / window.as_secs_f64() * 100.0;
        println!(
            "  round {round}/{rounds}: {} context switches in {} s ({per_second:.2}/s) over {} threads, CPU {:.0} ms ({percent:.3}% of a core)",
            rest.switches,
            window.as_secs(),
            rest.threads,
            rest.cpu_seconds * 1e3
        );
        detail.push(format!(
            "{} switches and {:.0} ms CPU",
            rest.switches,
            rest.cpu_seconds * 1e3
        ));
        wakeups.push(per_second);
        cpu.push(percent);
    }
    let how = format!(
        "a daemon with the default configuration (reconcile 30 s, ephemeral listing 15 s) on this host, no load, {} s windows after {} s to settle: {}; context switches of all its threads (/proc/<pid>/task/*/status, sampled every {} ms), CPU from /proc/<pid>/stat",
        window.as_secs(),
        SETTLE.as_secs(),
        detail.join(", "),
        SAMPLE_EVERY.as_millis()
    );
    let mut rows = vec![
        Row::new(
            "idle: daemon wakeups (context switches) per second",
            "/s",
            Stats::of(wakeups)?,
            Goal::AtMost(1.0),
        )
        .detail(how.clone()),
        Row::new(
            "idle: daemon CPU",
            "% of a core",
            Stats::of(cpu)?,
            Goal::AtMost(0.1),
        )
        .detail(how),
    ];
    rows.push(busy_host(ctx)?);
    Ok(rows)
}

/// The daemon's CPU over a long window with 100k listeners and no load.
fn busy_host(ctx: &Ctx) -> Result<Row> {
    let count = ctx.pick(100_000, 10_000);
    let window = Duration::from_secs(ctx.pick(300, 20));
    let listeners = Listeners::hold(ctx, count)?;
    let daemon = BenchDaemon::start(ctx, "")?;
    listeners.check_seen_by(&daemon)?;
    thread::sleep(SETTLE);
    let reconciled = daemon.metric("portwatch_reconciliations_total", &[])?;
    let rest = watch(daemon.pid(), window)?;
    let reconciliations = daemon.metric("portwatch_reconciliations_total", &[])? - reconciled;
    let took = daemon.metric(
        "portwatch_snapshot_duration_seconds",
        &["kind=\"reconcile\""],
    )?;
    let rss = daemon.rss_bytes()? as f64 / f64::from(1 << 20);
    daemon.stop()?;
    let percent = rest.cpu_seconds / window.as_secs_f64() * 100.0;
    println!(
        "  {count} listeners: CPU {:.0} ms in {} s ({percent:.3}% of a core), {reconciliations} reconciliations (the last {:.0} ms), RSS {rss:.1} MiB",
        rest.cpu_seconds * 1e3,
        window.as_secs(),
        took * 1e3
    );
    Ok(Row::new(
        format!("idle: daemon CPU with {count} listeners"),
        "% of a core",
        Stats::of(vec![percent])?,
        Goal::AtMost(1.0),
    )
    .detail(format!(
        "default configuration, no load, one {} s window after {} s to settle: {:.1} s of CPU, {reconciliations} reconciliations (the last took {:.0} ms), {} context switches; RSS {rss:.1} MiB at the end",
        window.as_secs(),
        SETTLE.as_secs(),
        rest.cpu_seconds,
        took * 1e3,
        rest.switches
    )))
}

/// What a process did during a window.
struct Rest {
    switches: u64,
    threads: usize,
    cpu_seconds: f64,
}

/// Watches `pid` for `window`: its threads' context switches and its CPU.
fn watch(pid: u32, window: Duration) -> Result<Rest> {
    let cpu_before = cpu_seconds(pid)?;
    // Per thread: its count when first seen and when last seen. A thread
    // that exists at the start counts from there; one born later counts
    // from zero.
    let mut seen: HashMap<u32, (u64, u64)> = HashMap::new();
    for (tid, count) in switches(pid)? {
        seen.insert(tid, (count, count));
    }
    let end = Instant::now() + window;
    while Instant::now() < end {
        thread::sleep(SAMPLE_EVERY.min(end.saturating_duration_since(Instant::now())));
        for (tid, count) in switches(pid)? {
            seen.entry(tid).or_insert((0, count)).1 = count;
        }
    }
    let cpu_after = cpu_seconds(pid)?;
    Ok(Rest {
        switches: seen.values().map(|(first, last)| last - first).sum(),
        threads: seen.len(),
        cpu_seconds: cpu_after - cpu_before,
    })
}

/// Every live thread of `pid` and its context switches so far.
fn switches(pid: u32) -> Result<Vec<(u32, u64)>> {
    let dir = format!("/proc/{pid}/task");
    let mut out = Vec::new();
    for entry in fs::read_dir(&dir).with_context(|| format!("reading {dir}"))? {
        let entry = entry?;
        let Some(tid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        // A thread may end between the listing and this read.
        let Ok(status) = fs::read_to_string(entry.path().join("status")) else {
            continue;
        };
        let field = |name: &str| {
            status
                .lines()
                .find_map(|line| line.strip_prefix(name))
                .and_then(|rest| rest.trim().parse::<u64>().ok())
        };
        match (
            field("voluntary_ctxt_switches:"),
            field("nonvoluntary_ctxt_switches:"),
        ) {
            (Some(voluntary), Some(involuntary)) => out.push((tid, voluntary + involuntary)),
            _ => bail!("no context switch counts in {dir}/{tid}/status"),
        }
    }
    Ok(out)
}

/// The process's user + system time so far, in seconds (`/proc/<pid>/stat`
/// fields 14 and 15, in clock ticks).
fn cpu_seconds(pid: u32) -> Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let stat = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // The command name may hold spaces; the fields after it are plain.
    let after_comm = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .with_context(|| format!("no command name in {path}"))?;
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    // After the name, field 3 (state) is index 0, so utime (14) is index 11.
    let ticks = |index: usize| -> Result<u64> {
        fields
            .get(index)
            .and_then(|field| field.parse().ok())
            .with_context(|| format!("no field {} in {path}", index + 3))
    };
    // SAFETY: sysconf with a valid name.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz <= 0 {
        bail!("sysconf(_SC_CLK_TCK) failed");
    }
    Ok((ticks(11)? + ticks(12)?) as f64 / hz as f64)
}
