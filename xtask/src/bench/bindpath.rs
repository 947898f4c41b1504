//! Figure 1, the bind path: what portwatch adds to a socket's life, and how
//! that compares with the usual ad-hoc tool.
//!
//! The load is `bench-worker bind-loop N`: N cycles of socket + bind
//! 127.0.0.1:0 + listen + close, each a raw libc call, after a warm-up. Four
//! sides are measured in each round, in rotating order: nothing attached,
//! the daemon attached (a fresh one per sample, watching the bench cgroup),
//! bpftrace on the syscall tracepoints the daemon uses, printing the fields
//! it can get to a file, and the daemon with `outcome = "exact"` (the
//! default's other choice where the kernel refuses fexit: the syscall
//! tracepoints instead of inferred outcomes; where fexit is allowed both
//! take it). Ratios are paired per round.
//!
//! Each daemon sample also checks that the daemon accounted for every bind
//! (seen + dropped = issued), so the comparison is with a daemon that really
//! did the work; each bpftrace sample checks that bpftrace printed.
//!
//! Then where the attached time goes: one more daemon sample per round with
//! the kernel's BPF run-time statistics on ([`programs`]), which gives each
//! of the daemon's programs its nanoseconds and runs per cycle. The
//! statistics time every run with two clock reads, so they are kept out of
//! the timed comparison.

use std::{
    io,
    net::{Ipv4Addr, SocketAddrV4},
};

use anyhow::{Context as _, Result, bail};

use super::{
    BenchDaemon, Ctx, Goal, Row, Stats, Worker, programs,
    rig::{Bpftrace, ns_per_op, output_field, rotate, tcp_socket, worker_arg},
};

/// The sides, in the order of `rotate`'s indices.
const DETACHED: usize = 0;
const PORTWATCH: usize = 1;
const BPFTRACE: usize = 2;
/// The daemon with `outcome = "exact"`.
const EXACT: usize = 3;
const SIDES: usize = 4;

pub fn run(ctx: &Ctx) -> Result<Vec<Row>> {
    let iterations: u64 = ctx.pick(100_000, 10_000);
    let script = bpftrace_script(&ctx.cgroup.path().display().to_string());
    let mut bpftrace_lines = Vec::new();
    println!(
        "bind path: {} rounds of {iterations} socket+bind(0)+listen+close cycles: detached, portwatch, bpftrace, portwatch with exact outcomes",
        ctx.rounds()
    );
    let mut default_path = None;
    let samples = rotate(ctx.rounds(), SIDES, |side| {
        let args = ["bind-loop", &iterations.to_string()];
        let (output, side_name) = match side {
            PORTWATCH | EXACT => {
                let (config, name) = if side == EXACT {
                    ("outcome = \"exact\"", "portwatch, exact outcomes")
                } else {
                    ("", "portwatch")
                };
                let daemon = BenchDaemon::start(ctx, config)?;
                if side == PORTWATCH && default_path.is_none() {
                    default_path = daemon.outcome_path()?;
                }
                let (output, _) = accounted_loop(ctx, &daemon, &args)?;
                daemon.stop()?;
                (output, name)
            }
            BPFTRACE => {
                let bpftrace = Bpftrace::start(ctx, "bpftrace-bind-path", &script)?;
                let output = Worker::run(ctx, &args)?;
                let printed = bpftrace.stop()?;
                let lines = printed
                    .lines()
                    .filter(|line| line.starts_with("bind "))
                    .count();
                if lines == 0 {
                    bail!("bpftrace printed no bind lines: it did not observe the loop");
                }
                bpftrace_lines.push((lines, output_field(&output, "ops")? as u64));
                (output, "bpftrace")
            }
            _ => (Worker::run(ctx, &args)?, "detached"),
        };
        let ns = output_field(&output, "ns_per_op")?;
        println!("  {side_name}: {:.2} µs per cycle", ns / 1000.0);
        Ok(ns)
    })?;

    let median = |side: usize| Stats::median_of(&samples[side]);
    let (detached, portwatch, bpftrace, exact) = (
        median(DETACHED)?,
        median(PORTWATCH)?,
        median(BPFTRACE)?,
        median(EXACT)?,
    );
    let default_path = default_path.context("the daemon named no bind outcome path")?;
    let (printed, issued) = bpftrace_lines
        .iter()
        .fold((0, 0), |(lines, ops), &(l, o)| (lines + l, ops + o));
    let mut rows = vec![
        Row::ratio(
            "bind path: attached / detached",
            &samples[PORTWATCH],
            &samples[DETACHED],
            Goal::AtMost(1.10),
        )?
        .detail(format!(
            "{} → {} µs per socket+bind(0)+listen+close (medians), the daemon as configured by \
             default (outcomes via {default_path} here); it accounted for every bind (seen + \
             dropped = issued)",
            micros(detached),
            micros(portwatch)
        )),
        Row::ratio(
            "bind path: attached / detached, outcome = exact",
            &samples[EXACT],
            &samples[DETACHED],
            Goal::None,
        )?
        .detail(format!(
            "{} → {} µs per cycle (medians), the daemon with outcome = \"exact\" (fexit where \
             the kernel allows it, else the syscall tracepoints); it accounted for every bind",
            micros(detached),
            micros(exact)
        )),
        Row::ratio(
            "bind path: portwatch / bpftrace",
            &samples[PORTWATCH],
            &samples[BPFTRACE],
            Goal::AtMost(1.0),
        )?
        .detail(format!(
            "{} vs {} µs (medians). bpftrace 0.17 on sys_enter/exit_bind and _listen, filtered to \
             the bench cgroup, printing pid, tid, comm, uid, family, address, port, backlog and \
             return value to a file ({printed} of {issued} bind lines arrived); it cannot attach \
             cgroup sock_addr/sock programs, so it lacks portwatch's bound port, socket options, \
             cookies, netns and close records",
            micros(portwatch),
            micros(bpftrace)
        )),
    ];
    let args = ["bind-loop", &iterations.to_string()];
    rows.extend(programs::profile(
        ctx,
        "bind path",
        "socket+bind(0)+listen+close",
        |daemon| Ok(accounted_loop(ctx, daemon, &args)?.1),
    )?);
    Ok(rows)
}

/// Runs the bind loop `args` with `daemon` attached, and checks that the
/// daemon accounted for every bind (unless its programs are a measuring
/// variant, which sends nothing): the worker's output, and the binds issued.
fn accounted_loop(ctx: &Ctx, daemon: &BenchDaemon, args: &[&str]) -> Result<(String, u64)> {
    let output = Worker::run(ctx, args)?;
    let issued = output_field(&output, "ops")? as u64;
    if ctx.variant.is_some() {
        return Ok((output, issued));
    }
    daemon
        .settled_bind_counts(issued)?
        .check(issued)
        .context("the daemon during the bind loop")?;
    Ok((output, issued))
}

fn micros(ns: f64) -> String {
    format!("{:.2}", ns / 1000.0)
}

/// The bpftrace program for the comparison: the same syscall tracepoints
/// portwatch's outcome hooks use (and their sys_enter partners, since
/// bpftrace has no cgroup hook to see the request), the same cgroup filter,
/// and a line per bind and listen with the fields bpftrace can read there.
fn bpftrace_script(cgroup: &str) -> String {
    format!(
        r#"
tracepoint:syscalls:sys_enter_bind /cgroup == cgroupid("{cgroup}")/ {{
  $sa = (struct sockaddr_in *)args->umyaddr;
  @bind_family[tid] = $sa->sin_family;
  @bind_port[tid] = $sa->sin_port;
  @bind_addr[tid] = $sa->sin_addr.s_addr;
}}
tracepoint:syscalls:sys_exit_bind /@bind_family[tid]/ {{
  printf("bind %d %d %s %d %d %s %d %d\n", pid, tid, comm, uid, @bind_family[tid],
         ntop(@bind_addr[tid]), (@bind_port[tid] >> 8) | ((@bind_port[tid] & 0xff) << 8), args->ret);
  delete(@bind_family[tid]);
  delete(@bind_port[tid]);
  delete(@bind_addr[tid]);
}}
tracepoint:syscalls:sys_enter_listen /cgroup == cgroupid("{cgroup}")/ {{
  @listen_fd[tid] = args->fd;
  @listen_backlog[tid] = args->backlog;
}}
tracepoint:syscalls:sys_exit_listen /@listen_fd[tid]/ {{
  printf("listen %d %d %s %d %d %d %d\n", pid, tid, comm, uid, @listen_fd[tid],
         @listen_backlog[tid], args->ret);
  delete(@listen_fd[tid]);
  delete(@listen_backlog[tid]);
}}
"#
    )
}

/// `bench-worker bind-loop N`: N/10 warm-up cycles, then N timed ones.
/// Prints `ns_per_op <timed ns per cycle> ops <cycles in all>`.
pub fn worker(args: &[String]) -> Result<()> {
    let iterations: u64 = worker_arg(args, 0, "cycles")?;
    let warmup = iterations / 10;
    let ns = ns_per_op(warmup, iterations, || {
        bind_cycle(true).context("socket+bind+listen+close")
    })?;
    println!("ns_per_op {ns:.1} ops {}", warmup + iterations);
    Ok(())
}

/// One cycle on a fresh TCP socket: bind 127.0.0.1:0, `listen` if asked,
/// close. Raw libc calls, so the cycle is exactly these syscalls.
pub fn bind_cycle(listen: bool) -> io::Result<()> {
    let endpoint = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0);
    // Dropping the socket closes it.
    tcp_socket(endpoint, listen.then_some(128)).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bpftrace_script_filters_on_the_bench_cgroup_everywhere_it_starts() {
        let script = bpftrace_script("/sys/fs/cgroup/unified/portwatch-bench-1");
        let filters = script
            .matches(r#"cgroup == cgroupid("/sys/fs/cgroup/unified/portwatch-bench-1")"#)
            .count();
        let enters = script.matches("tracepoint:syscalls:sys_enter_").count();
        assert_eq!((filters, enters), (2, 2));
        assert_eq!(script.matches("tracepoint:syscalls:sys_exit_").count(), 2);
    }
}
