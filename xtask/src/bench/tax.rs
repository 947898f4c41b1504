//! Figure 2, the machine-wide syscall tax: what every other process on the
//! machine pays while portwatch runs, though it never binds anything.
//!
//! The load is `bench-worker getppid-loop N`, the cheapest syscall, timed
//! after a warm-up. In each round, in rotating order: nothing attached; the
//! daemon with each outcome hook path this kernel offers (fexit is probed
//! with `outcome = "auto"`; the syscall tracepoints are always offered),
//! and with none (`outcome = "inferred"`); and,
//! to isolate the cause, bpftrace with one empty program on
//! `syscalls/sys_exit_bind` (a syscall tracepoint puts every syscall of every
//! task on the slow path while attached) and one on the non-syscall
//! tracepoint `sock/inet_sock_set_state` that portwatch also uses (which
//! should cost nothing outside socket state changes).

use std::{collections::BTreeSet, process::Command};

use anyhow::{Context as _, Result, bail};

use super::{
    BenchDaemon, Ctx, Goal, Row, Stats, Worker,
    rig::{Bpftrace, ns_per_op, output_field, rotate, worker_arg},
};
use crate::cmd;

/// What runs during a sample.
#[derive(Clone, Copy, Debug)]
enum Load {
    Nothing,
    /// The daemon with this `outcome` setting; `path` is what it attaches.
    Daemon {
        outcome: &'static str,
        path: &'static str,
    },
    /// bpftrace with an empty program on this tracepoint.
    EmptyProgram(&'static str),
}

impl Load {
    fn name(self) -> String {
        match self {
            Load::Nothing => "nothing".to_owned(),
            Load::Daemon { path, .. } => format!("daemon, outcomes via {path}"),
            Load::EmptyProgram(tracepoint) => format!("empty {tracepoint} program"),
        }
    }

    /// Starts the load, runs the getppid loop, stops the load: ns per call.
    fn measure(self, ctx: &Ctx, iterations: u64) -> Result<f64> {
        let args = ["getppid-loop", &iterations.to_string()];
        let output = match self {
            Load::Nothing => Worker::run(ctx, &args)?,
            Load::Daemon { outcome, path } => {
                let daemon = BenchDaemon::start(ctx, &format!("outcome = \"{outcome}\""))?;
                let attached = daemon.outcome_path()?;
                if attached != Some(path) {
                    bail!(
                        "the daemon with outcome = {outcome:?} attached {attached:?}, not {path}"
                    );
                }
                let output = Worker::run(ctx, &args)?;
                daemon.stop()?;
                output
            }
            Load::EmptyProgram(tracepoint) => {
                let bpftrace = Bpftrace::start(
                    ctx,
                    "bpftrace-empty",
                    &format!("tracepoint:{tracepoint} {{}}"),
                )?;
                let output = Worker::run(ctx, &args)?;
                bpftrace.stop()?;
                output
            }
        };
        output_field(&output, "ns_per_op")
    }
}

/// The processes that have a BPF program on a syscall tracepoint now
/// (`bpftool perf list`): while one does, "nothing attached" is not true.
fn syscall_tracepoint_holders() -> Result<Vec<u32>> {
    let out = cmd::output(Command::new("bpftool").args(["-j", "perf", "list"]))
        .context("`cargo xtask setup` installs bpftool")?;
    syscall_holders_in(&String::from_utf8_lossy(&out))
}

/// The pids in `bpftool -j perf list` output whose program sits on a
/// `syscalls` tracepoint (`sys_enter_*`/`sys_exit_*`).
fn syscall_holders_in(json: &str) -> Result<Vec<u32>> {
    #[derive(serde::Deserialize)]
    struct Attachment {
        pid: u32,
        fd_type: String,
        #[serde(default)]
        tracepoint: String,
    }
    let attachments: Vec<Attachment> =
        serde_json::from_str(json).context("parsing `bpftool -j perf list`")?;
    Ok(attachments
        .into_iter()
        .filter(|a| {
            a.fd_type == "tracepoint"
                && (a.tracepoint.starts_with("sys_enter_") || a.tracepoint.starts_with("sys_exit_"))
        })
        .map(|a| a.pid)
        .collect())
}

/// Why the daemon did not use fexit, from its log line.
fn fexit_refusal(log: &str) -> Option<&str> {
    let line = log
        .lines()
        .find(|line| line.contains("fexit is not available"))?;
    let reason = line.split_once("reason=")?.1;
    Some(
        reason
            .split(" Verifier output")
            .next()
            .unwrap_or(reason)
            .trim(),
    )
}

/// The loads of this kernel, and what the detail should say about fexit.
fn offered_loads(ctx: &Ctx) -> Result<(Vec<Load>, String)> {
    let daemon = BenchDaemon::start(ctx, "outcome = \"auto\"")?;
    let auto_path = daemon.outcome_path()?;
    let log = daemon.log()?;
    daemon.stop()?;
    let mut loads = vec![Load::Nothing];
    let fexit_note = match auto_path {
        Some("fexit") => {
            loads.push(Load::Daemon {
                outcome: "auto",
                path: "fexit",
            });
            "fexit is offered by this kernel and measured above".to_owned()
        }
        Some(_) => format!(
            "fexit is not offered by this kernel ({}), so the tracepoints are what outcome = \"exact\" takes here; the default (outcome = \"auto\") infers outcomes",
            fexit_refusal(&log).unwrap_or("its log gave no reason")
        ),
        None => bail!("the daemon reported no bind outcome hook in portwatch_program_attached"),
    };
    loads.push(Load::Daemon {
        outcome: "tracepoint",
        path: "tracepoint",
    });
    loads.push(Load::Daemon {
        outcome: "inferred",
        path: "inferred",
    });
    loads.push(Load::EmptyProgram("syscalls:sys_exit_bind"));
    loads.push(Load::EmptyProgram("sock:inet_sock_set_state"));
    Ok((loads, fexit_note))
}

pub fn run(ctx: &Ctx) -> Result<Vec<Row>> {
    let iterations: u64 = ctx.pick(3_000_000, 500_000);
    let (loads, fexit_note) = offered_loads(ctx)?;
    println!(
        "syscall tax: {} rounds of {iterations} getppid calls with: {}",
        ctx.rounds(),
        loads
            .iter()
            .map(|load| load.name())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let mut tainted_baselines = 0;
    let mut foreign_pids = BTreeSet::new();
    let samples = rotate(ctx.rounds(), loads.len(), |side| {
        let load = loads[side];
        // Only the baseline must run with no syscall tracepoint held.
        let baseline = matches!(load, Load::Nothing);
        let before = if baseline {
            syscall_tracepoint_holders()?
        } else {
            Vec::new()
        };
        let ns = load
            .measure(ctx, iterations)
            .with_context(|| format!("getppid with {}", load.name()))?;
        if baseline {
            let holders: BTreeSet<u32> = before
                .into_iter()
                .chain(syscall_tracepoint_holders()?)
                .collect();
            if !holders.is_empty() {
                tainted_baselines += 1;
                foreign_pids.extend(holders);
            }
        }
        println!("  {}: {ns:.1} ns per getppid", load.name());
        Ok(ns)
    })?;

    let nothing = Stats::median_of(&samples[0])?;
    let empty_syscall_tracepoint = loads
        .iter()
        .position(|load| matches!(load, Load::EmptyProgram(tp) if tp.starts_with("syscalls:")))
        .context("no empty syscall tracepoint load")?;
    let isolated = Stats::of_ratios(&samples[empty_syscall_tracepoint], &samples[0])?.median;
    let baseline_note = if tainted_baselines == 0 {
        "no other process held a syscall tracepoint during the baseline".to_owned()
    } else {
        format!(
            "in {tainted_baselines} of {} baseline samples other processes (pids {foreign_pids:?}) held syscall tracepoints, so the baseline paid the tax too",
            ctx.rounds()
        )
    };
    let mut rows = Vec::new();
    for (side, load) in loads.iter().enumerate().skip(1) {
        let (figure, goal, why) = match *load {
            Load::Nothing => continue,
            Load::Daemon {
                path: "inferred", ..
            } => (
                "syscall tax: daemon, outcomes inferred".to_owned(),
                // Issue 16: on a kernel without fexit, within the noise of
                // the control.
                Goal::AtMost(1.02),
                "no outcome hook and no syscall tracepoint attached (outcome = \"inferred\", \
                 and the default where the kernel refuses fexit)"
                    .to_owned(),
            ),
            Load::Daemon { path, .. } => (
                format!("syscall tax: daemon, outcomes via {path}"),
                Goal::AtMost(1.05),
                format!(
                    "an empty sys_exit_bind program alone costs {isolated:.3}× (below); {fexit_note}"
                ),
            ),
            Load::EmptyProgram(tracepoint) => (
                format!("syscall tax: one empty {tracepoint} program"),
                Goal::None,
                "bpftrace, to isolate the cause".to_owned(),
            ),
        };
        let absolute = format!(
            "{nothing:.1} → {:.1} ns per getppid (medians; {baseline_note})",
            Stats::median_of(&samples[side])?
        );
        rows.push(
            Row::ratio(figure, &samples[side], &samples[0], goal)?
                .detail(format!("{absolute}; {why}")),
        );
    }
    Ok(rows)
}

/// `bench-worker getppid-loop N`: N/10 warm-up calls, then N timed ones,
/// each a raw `syscall(SYS_getppid)`. Prints `ns_per_op <ns per call>`.
pub fn worker(args: &[String]) -> Result<()> {
    let iterations: u64 = worker_arg(args, 0, "calls")?;
    let ns = ns_per_op(iterations / 10, iterations, || {
        // SAFETY: getppid takes no arguments and cannot fail.
        unsafe { libc::syscall(libc::SYS_getppid) };
        Ok(())
    })?;
    println!("ns_per_op {ns:.2}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_syscall_tracepoint_holders_count() {
        let json = r#"[{"pid":7,"fd":7,"prog_id":1,"fd_type":"tracepoint","tracepoint":"sys_exit_bind"},
            {"pid":8,"fd":3,"prog_id":2,"fd_type":"tracepoint","tracepoint":"inet_sock_set_state"},
            {"pid":9,"fd":4,"prog_id":3,"fd_type":"uprobe","filename":"/bin/x","offset":0}]"#;
        assert_eq!(syscall_holders_in(json).unwrap(), [7]);
        assert_eq!(syscall_holders_in("[]").unwrap(), Vec::<u32>::new());
        assert!(syscall_holders_in("not json").is_err());
    }

    #[test]
    fn the_fexit_refusal_is_read_from_the_daemon_log() {
        let log = "2026-11-21T19:04:21Z  INFO portwatch::capture: fexit is not available; bind and listen outcomes come from the syscalls/sys_exit_* tracepoints reason=program fexit_inet_bind: the BPF_PROG_LOAD syscall returned Operation not permitted (os error 1). Verifier output: \n2026-11-21T19:04:22Z  INFO portwatch::capture: kernel programs attached\n";
        assert_eq!(
            fexit_refusal(log),
            Some(
                "program fexit_inet_bind: the BPF_PROG_LOAD syscall returned Operation not permitted (os error 1)."
            )
        );
        assert_eq!(
            fexit_refusal("INFO kernel programs attached outcome=\"fexit\""),
            None
        );
    }
}
