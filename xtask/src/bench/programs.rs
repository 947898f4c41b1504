//! What each of the daemon's eBPF programs costs, from the kernel's own
//! accounting: with BPF run-time statistics on, every program run adds its
//! duration to `run_time_ns` and one to `run_cnt`, per program, which
//! `bpftool prog show` reports.
//!
//! The statistics are switched on with `BPF_ENABLE_STATS`, which keeps them
//! on only while the returned descriptor is open: a bench that dies does not
//! leave them on (they cost two clock reads per program run, for every
//! program on the machine), and `kernel.bpf_stats_enabled` set by someone
//! else is left as it was. They are on only for the samples that profile,
//! never while a comparison is timed.

use std::{
    collections::{BTreeMap, BTreeSet},
    os::fd::{FromRawFd as _, OwnedFd},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

use super::{BenchDaemon, Ctx, Goal, Row, Stats};
use crate::cmd;

/// `BPF_ENABLE_STATS` and its one stats type, `BPF_STATS_RUN_TIME`, from the
/// uapi `linux/bpf.h` (Linux 5.8+).
const BPF_ENABLE_STATS: libc::c_long = 32;
const BPF_STATS_RUN_TIME: u32 = 0;

/// Run-time statistics, on while this lives.
pub struct RunTimeStats {
    _fd: OwnedFd,
}

impl RunTimeStats {
    pub fn enable() -> Result<RunTimeStats> {
        // `union bpf_attr` for this command is `struct { __u32 type; }`; the
        // kernel requires the bytes after it, up to the size passed, be zero.
        let attr: [u32; 2] = [BPF_STATS_RUN_TIME, 0];
        // SAFETY: bpf(2) reads `size_of_val(&attr)` bytes of `attr`.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_ENABLE_STATS,
                attr.as_ptr(),
                size_of_val(&attr),
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error())
                .context("BPF_ENABLE_STATS (BPF run-time statistics, Linux 5.8+)");
        }
        // SAFETY: a descriptor the kernel just gave us, owned from here.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        Ok(RunTimeStats { _fd: fd })
    }
}

/// One program's counters at one moment.
#[derive(Clone, Debug, PartialEq)]
pub struct Counters {
    pub name: String,
    pub run_time_ns: u64,
    pub run_cnt: u64,
}

/// Every loaded program's counters, by program id (`bpftool -j prog show`).
pub fn loaded() -> Result<BTreeMap<u32, Counters>> {
    let json = cmd::output(Command::new("bpftool").args(["-j", "prog", "show"]))
        .context("bpftool prog show")?;
    parse(&String::from_utf8_lossy(&json))
}

/// The programs in `now` that are not in `before`: the daemon's, when it
/// is the only thing that loads programs in between.
pub fn new_since(before: &BTreeMap<u32, Counters>, now: &BTreeMap<u32, Counters>) -> BTreeSet<u32> {
    now.keys()
        .filter(|id| !before.contains_key(id))
        .copied()
        .collect()
}

fn parse(json: &str) -> Result<BTreeMap<u32, Counters>> {
    let value: Value = serde_json::from_str(json).context("bpftool's JSON")?;
    let Some(programs) = value.as_array() else {
        bail!("bpftool prog show: expected a JSON array");
    };
    let mut out = BTreeMap::new();
    for program in programs {
        let number = |key: &str| program.get(key).and_then(Value::as_u64);
        let Some(id) = number("id").and_then(|id| u32::try_from(id).ok()) else {
            bail!("bpftool prog show: a program without an id: {program}");
        };
        let name = program
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or("(unnamed)")
            .to_owned();
        // bpftool leaves both out while they are zero.
        out.insert(
            id,
            Counters {
                name,
                run_time_ns: number("run_time_ns").unwrap_or(0),
                run_cnt: number("run_cnt").unwrap_or(0),
            },
        );
    }
    Ok(out)
}

/// What one program did between two readings.
#[derive(Clone, Debug, PartialEq)]
pub struct Spent {
    pub name: String,
    pub runs: u64,
    pub ns: u64,
}

/// For each of `ids`, what it did between `before` and `after`: only the
/// programs that ran, by name (a program missing from `after` was unloaded
/// in between, which is a failed measurement).
pub fn spent(
    ids: &BTreeSet<u32>,
    before: &BTreeMap<u32, Counters>,
    after: &BTreeMap<u32, Counters>,
) -> Result<Vec<Spent>> {
    let mut out = Vec::new();
    for id in ids {
        let Some(end) = after.get(id) else {
            bail!("program {id} was unloaded during the measurement");
        };
        let (ns0, runs0) = before
            .get(id)
            .map_or((0, 0), |start| (start.run_time_ns, start.run_cnt));
        let runs = end.run_cnt.saturating_sub(runs0);
        if runs > 0 {
            out.push(Spent {
                name: end.name.clone(),
                runs,
                ns: end.run_time_ns.saturating_sub(ns0),
            });
        }
    }
    Ok(out)
}

/// Below this many runs per cycle (median), a program did not run for the
/// loop: another process ran it.
const STRAY_RUNS_PER_CYCLE: f64 = 0.01;

/// One program's samples, a round each: ns per run, and runs per cycle.
#[derive(Default)]
struct ProgramSamples {
    ns_per_run: Vec<f64>,
    runs_per_cycle: Vec<f64>,
}

/// Per program, what a loop costs in it: a daemon sample per round with
/// run-time statistics on, the daemon's programs being those loaded while
/// it started. `run` runs the loop (`cycle` says what one cycle is) with the
/// daemon attached and returns how many cycles it made. Rows, each named
/// after `path`: the sum per cycle, then each program that ran, dearest
/// first.
pub fn profile(
    ctx: &Ctx,
    path: &str,
    cycle: &str,
    mut run: impl FnMut(&BenchDaemon) -> Result<u64>,
) -> Result<Vec<Row>> {
    let _stats = RunTimeStats::enable()?;
    let mut by_program: BTreeMap<String, ProgramSamples> = BTreeMap::new();
    let mut totals = Vec::new();
    println!(
        "{path}, per program: {} rounds with BPF run-time statistics on",
        ctx.rounds()
    );
    for _ in 0..ctx.rounds() {
        let before_daemon = loaded()?;
        let daemon = BenchDaemon::start(ctx, "")?;
        let start = loaded()?;
        let ids = new_since(&before_daemon, &start);
        if ids.is_empty() {
            bail!("bpftool lists no program loaded by the daemon");
        }
        let cycles = run(&daemon)? as f64;
        let end = loaded()?;
        daemon.stop()?;
        let mut total = 0.0;
        for spent in spent(&ids, &start, &end)? {
            let samples = by_program.entry(spent.name).or_default();
            samples.ns_per_run.push(spent.ns as f64 / spent.runs as f64);
            samples.runs_per_cycle.push(spent.runs as f64 / cycles);
            total += spent.ns as f64 / cycles;
        }
        println!("  all programs: {total:.0} ns per cycle");
        totals.push(total);
    }
    let mut programs = Vec::new();
    let mut strays = Vec::new();
    for (name, samples) in by_program {
        // A program the loop does not run (a connect hook in the bind
        // loop), run by another process meanwhile: named, not given a row.
        if Stats::median_of(&samples.runs_per_cycle)? < STRAY_RUNS_PER_CYCLE {
            strays.push(format!("`{name}` (in {} rounds)", samples.ns_per_run.len()));
            continue;
        }
        let per_cycle: Vec<f64> = samples
            .ns_per_run
            .iter()
            .zip(&samples.runs_per_cycle)
            .map(|(ns, runs)| ns * runs)
            .collect();
        let detail = format!(
            "{:.0} ns per run × {:.2} runs per cycle (medians)",
            Stats::median_of(&samples.ns_per_run)?,
            Stats::median_of(&samples.runs_per_cycle)?
        );
        let row = Row::new(
            format!("{path}, program `{name}`: ns per cycle"),
            "ns",
            Stats::of(per_cycle)?,
            Goal::None,
        )
        .detail(detail);
        programs.push(row);
    }
    programs.sort_by(|a, b| b.value.median.total_cmp(&a.value.median));
    let mut detail = format!(
        "the kernel's BPF run-time statistics (BPF_ENABLE_STATS), on only for one more daemon \
         sample per round: the sum over the daemon's programs of their run time, per \
         {cycle}. Each run is timed with two clock reads, counted in; tracepoint programs \
         fire for the whole machine, so runs by other processes during the loop count too \
         (runs per cycle shows them)",
    );
    if !strays.is_empty() {
        detail += &format!(
            "; also ran, not for the loop (other processes): {}",
            strays.join(", ")
        );
    }
    let total = Row::new(
        format!("{path}, all of the daemon's programs: ns per cycle"),
        "ns",
        Stats::of(totals)?,
        Goal::None,
    )
    .detail(detail);
    Ok(std::iter::once(total).chain(programs).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_absent_from_bpftool_are_zero_and_deltas_keep_only_programs_that_ran() {
        let before = parse(
            r#"[{"id":7,"type":"cgroup_sock_addr","name":"bind4","run_time_ns":100,"run_cnt":2},
                {"id":8,"type":"tracepoint","name":"sys_exit_bind"},
                {"id":9,"type":"tracepoint","name":"other"}]"#,
        )
        .unwrap();
        assert_eq!(before[&8].run_cnt, 0);
        let after = parse(
            r#"[{"id":7,"name":"bind4","run_time_ns":1100,"run_cnt":12},
                {"id":8,"name":"sys_exit_bind"},
                {"id":9,"name":"other","run_time_ns":5,"run_cnt":1}]"#,
        )
        .unwrap();
        let ids = BTreeSet::from([7, 8]);
        assert_eq!(
            spent(&ids, &before, &after).unwrap(),
            vec![Spent {
                name: "bind4".into(),
                runs: 10,
                ns: 1000
            }]
        );
        let gone = BTreeSet::from([7, 10]);
        assert!(spent(&gone, &before, &after).is_err());
        let loaded = parse(r#"[{"id":7,"name":"bind4"},{"id":11,"name":"bind6"}]"#).unwrap();
        assert_eq!(new_since(&before, &loaded), BTreeSet::from([11]));
    }

    #[test]
    fn bpftool_output_that_is_not_a_list_of_programs_is_refused() {
        assert!(parse("{}").is_err());
        assert!(parse(r#"[{"name":"x"}]"#).is_err());
        assert!(parse("not json").is_err());
    }
}
