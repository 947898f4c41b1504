//! Figure 7, ephemeral ports: what watching them costs.
//!
//! 1. The connect path: `bench-worker connect-loop N`: N cycles of socket +
//!    connect to a loopback listener + accept + close of both ends (the
//!    client with SO_LINGER 0, so no TIME_WAIT fills the range), attached vs
//!    detached, in rotating order, the daemon as configured by default.
//!    Attached, each connect passes the cgroup `connect4` hook and, with
//!    an outcome hook, that hook too: `connect4` parks the attempt and the
//!    outcome (fexit or `sys_exit_connect`) drops it, since a successful
//!    connect of an untracked socket sends no record; where outcomes are
//!    inferred, `connect4` looks the socket up and stops there. On top come
//!    the hooks every socket passes (creation, state changes, destruction,
//!    release). Then, as for
//!    the bind path, one more daemon sample per round with BPF run-time
//!    statistics on gives each program's share ([`programs::profile`]).
//! 2. The listing: `bench-worker hold-connections N` holds N loopback
//!    connections (spread over eight listeners) in a network namespace of
//!    its own whose range is 1024-65535; the daemon lists every namespace's
//!    ephemeral ports each second. Each round reads the duration of a fresh
//!    listing (`listing_ms` of `/ephemeral`) and times `ss -tanpH` in that
//!    namespace, which does the same work for an operator (the sockets, and
//!    the processes from `/proc`); the ratio is per round.

use std::{
    io::{self, Write as _},
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

use super::{
    BenchDaemon, Ctx, Goal, Row, Stats, Worker,
    namespaces::{Children, hold_in_child, pipe, wait_until_ready},
    programs,
    rig::{ns_per_op, output_field, rotate, tcp_socket, worker_arg},
    snapshot::{self, HOLD_LIMIT},
};
use crate::cmd;

/// The listeners the held connections go to, in the holder's namespace:
/// eight, so that 100k connections use a fifth of the range per
/// destination. Near a full range every connect() searches long for a free
/// port (the kernel's own cost, not portwatch's), and holding them would
/// take minutes.
const LISTENERS: [u16; 8] = [80, 443, 5432, 6379, 8080, 8443, 9000, 9090];
/// The holder namespace's range: 64,512 ports.
const RANGE: &str = "1024 65535";

/// The sides of the connect path, in `rotate`'s order.
const DETACHED: usize = 0;
const PORTWATCH: usize = 1;

pub fn run(ctx: &Ctx) -> Result<Vec<Row>> {
    let mut rows = connect_path(ctx)?;
    rows.push(listing(ctx)?);
    Ok(rows)
}

fn connect_path(ctx: &Ctx) -> Result<Vec<Row>> {
    let iterations: u64 = ctx.pick(50_000, 5_000);
    println!(
        "ephemeral: {} rounds of {iterations} socket+connect+accept+close cycles to a loopback listener: detached, portwatch",
        ctx.rounds()
    );
    let mut default_path = None;
    let samples = rotate(ctx.rounds(), 2, |side| {
        let args = ["connect-loop", &iterations.to_string()];
        let output = if side == PORTWATCH {
            let daemon = BenchDaemon::start(ctx, "")?;
            if default_path.is_none() {
                default_path = daemon.outcome_path()?;
            }
            let output = Worker::run(ctx, &args)?;
            daemon.stop()?;
            output
        } else {
            Worker::run(ctx, &args)?
        };
        let ns = output_field(&output, "ns_per_op")?;
        println!(
            "  {}: {:.2} µs per cycle",
            if side == PORTWATCH {
                "portwatch"
            } else {
                "detached"
            },
            ns / 1000.0
        );
        Ok(ns)
    })?;
    let micros = |side: usize| Stats::median_of(&samples[side]).map(|ns| ns / 1000.0);
    let ratio = Row::ratio(
        "connect path: attached / detached",
        &samples[PORTWATCH],
        &samples[DETACHED],
        Goal::AtMost(1.05),
    )?
    .detail(format!(
        "{:.2} → {:.2} µs per socket+connect+accept+close to 127.0.0.1 (medians), the daemon \
             as configured by default (outcomes via {}): the connect hook (and its outcome hook, \
             where one is attached) sends no record for a successful connect of an untracked \
             socket; plus the hooks every socket passes (creation, state changes, destruction, \
             release)",
        micros(DETACHED)?,
        micros(PORTWATCH)?,
        default_path.unwrap_or("an unnamed path")
    ));
    let args = ["connect-loop", &iterations.to_string()];
    let profile = programs::profile(
        ctx,
        "connect path",
        "socket+connect+accept+close (two sockets)",
        |_| {
            let output = Worker::run(ctx, &args)?;
            Ok(output_field(&output, "ops")? as u64)
        },
    )?;
    Ok(std::iter::once(ratio).chain(profile).collect())
}

fn listing(ctx: &Ctx) -> Result<Row> {
    let count: u32 = ctx.pick(100_000, 10_000);
    let held = Connections::hold(ctx, count)?;
    let daemon = BenchDaemon::start(ctx, "ephemeral_interval = \"1s\"")?;
    let path = format!("/ephemeral?netns={}", held.netns);
    let mut last = String::new();
    let mut listing_ms = Vec::new();
    let mut ss_ms = Vec::new();
    for round in 0..ctx.rounds() {
        // A listing newer than the last one read, with every connection.
        let deadline = Instant::now() + Duration::from_secs(60);
        let answer = loop {
            let (status, body) = daemon.get(&path)?;
            if status == 200 {
                let answer: Value = serde_json::from_str(&body)
                    .with_context(|| format!("GET {path} did not answer JSON"))?;
                let listed_at = answer["listed_at"].as_str().unwrap_or_default().to_owned();
                if listed_at != last && used(&answer) == u64::from(count) {
                    last = listed_at;
                    break answer;
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "no fresh /ephemeral listing with {count} connections after 60 s: {}",
                    body.chars().take(400).collect::<String>()
                );
            }
            thread::sleep(Duration::from_millis(100));
        };
        let took = answer["listing_ms"]
            .as_f64()
            .context("no listing_ms in /ephemeral")?;
        let ss = held.time_ss()?;
        println!("  round {round}: listing {took:.0} ms, ss -tanpH {ss:.0} ms");
        listing_ms.push(took);
        ss_ms.push(ss);
    }
    let rss = daemon.rss_bytes()? as f64 / (1024.0 * 1024.0);
    daemon.stop()?;
    drop(held);
    let median = Stats::median_of(&listing_ms)?;
    Ok(Row::ratio(
        format!("ephemeral listing: {count} connections / ss -tanpH"),
        &listing_ms,
        &ss_ms,
        Goal::AtMost(1.0),
    )?
    .detail(format!(
        "{median:.0} ms vs {:.0} ms per listing (medians) of every namespace's ranges, with \
         {count} loopback connections in one and their processes named; at the default \
         ephemeral_interval of 15 s that is {:.1}% of one core; every connection counted \
         (the {} destinations' in_use sum to {count}); daemon RSS {rss:.1} MiB",
        Stats::median_of(&ss_ms)?,
        median / 150.0,
        LISTENERS.len(),
    )))
}

/// The sockets to the holder's destinations in an `/ephemeral` answer.
fn used(answer: &Value) -> u64 {
    answer["namespaces"][0]["destinations"]
        .as_array()
        .map_or(0, |all| {
            all.iter().filter_map(|d| d["in_use"].as_u64()).sum::<u64>()
        })
}

/// `count` connections held by a `bench-worker hold-connections` process
/// until this is dropped.
struct Connections {
    child: Child,
    /// The holder's pid: its namespace is `/proc/<pid>/ns/net`.
    pid: u32,
    /// That namespace's cookie.
    netns: u64,
}

impl Connections {
    fn hold(ctx: &Ctx, count: u32) -> Result<Connections> {
        println!("  opening {count} loopback connections in a network namespace of their own");
        let started = Instant::now();
        let mut child = Worker::command(ctx, &["hold-connections", &count.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting bench-worker hold-connections")?;
        let line = snapshot::read_ready_line(&mut child, "bench-worker hold-connections");
        let line = match line {
            Ok(line) => line,
            Err(err) => {
                snapshot::release_holder(&mut child, "the connection holder");
                return Err(err);
            }
        };
        // `ready <pid> <netns cookie>`
        let words: Vec<&str> = line.split_whitespace().collect();
        let parsed = match words.as_slice() {
            ["ready", pid, netns] => pid.parse().ok().zip(netns.parse().ok()),
            _ => None,
        };
        let Some((pid, netns)) = parsed else {
            snapshot::release_holder(&mut child, "the connection holder");
            bail!("bench-worker hold-connections said {line:?}");
        };
        println!("  connected after {} ms", started.elapsed().as_millis());
        Ok(Connections { child, pid, netns })
    }

    /// How long `ss -tanpH` takes in the holder's namespace, in ms.
    fn time_ss(&self) -> Result<f64> {
        let started = Instant::now();
        let out = cmd::output(
            Command::new("nsenter")
                .arg(format!("--net=/proc/{}/ns/net", self.pid))
                .args(["ss", "-tanpH"]),
        )?;
        let took = started.elapsed().as_secs_f64() * 1e3;
        let lines = out.split(|&b| b == b'\n').filter(|l| !l.is_empty()).count();
        if lines < 2 {
            bail!("ss -tanpH listed {lines} sockets in the holder's namespace");
        }
        Ok(took)
    }
}

impl Drop for Connections {
    fn drop(&mut self) {
        snapshot::release_holder(&mut self.child, "the connection holder");
    }
}

/// `bench-worker connect-loop N`: N/10 warm-up cycles, then N timed ones of
/// socket + connect to a listener of its own on 127.0.0.1 + accept + close
/// of both. Prints `ns_per_op <timed ns per cycle> ops <cycles, warm-up
/// included>`.
pub fn connect_worker(args: &[String]) -> Result<()> {
    let iterations: u64 = worker_arg(args, 0, "cycles")?;
    let listener = tcp_socket(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0), Some(128))?;
    let to = local_address(&listener)?;
    let warmup = iterations / 10;
    let ns = ns_per_op(warmup, iterations, || {
        let client = connect(&to)?;
        let accepted = accept(&listener)?;
        drop(accepted);
        drop(client);
        Ok(())
    })?;
    println!("ns_per_op {ns:.1} ops {}", warmup + iterations);
    Ok(())
}

/// Connections per child of the holder: two descriptors each, under the
/// 20,000 descriptors a process may have here (raising the hard limit
/// needs CAP_SYS_RESOURCE, which this machine's root lacks).
const PER_CHILD: u32 = 9_000;

/// `bench-worker hold-connections N`: a network namespace of its own with
/// the range [`RANGE`], listeners on [`LISTENERS`], and N connections spread
/// over them, held by children of at most [`PER_CHILD`] connections (made one
/// child after another, so each accepts its own), until stdin closes or
/// [`HOLD_LIMIT`] passes. Prints `ready <pid> <netns cookie>` once connected.
pub fn hold_worker(args: &[String]) -> Result<()> {
    let count: u32 = worker_arg(args, 0, "connections")?;
    if !(2..=120_000).contains(&count) {
        bail!("hold-connections: 2 to 120000 connections, not {count}");
    }
    // fork(2) copies only the calling thread: a child of a process with
    // other threads could find a lock held forever.
    let threads = std::fs::read_dir("/proc/self/task")
        .context("reading /proc/self/task")?
        .count();
    if threads != 1 {
        bail!(
            "hold-connections forks, so it must be single-threaded, but it has {threads} threads"
        );
    }
    // SAFETY: unshare(2) moves only this process into a new namespace.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        bail!("unshare(CLONE_NEWNET): {}", io::Error::last_os_error());
    }
    cmd::run_unannounced(Command::new("ip").args(["link", "set", "lo", "up"]))?;
    std::fs::write("/proc/sys/net/ipv4/ip_local_port_range", RANGE)
        .context("setting the namespace's ip_local_port_range")?;
    let listeners = LISTENERS
        .iter()
        .map(|&port| tcp_socket(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port), Some(4096)))
        .collect::<io::Result<Vec<OwnedFd>>>()?;
    let netns = netns_cookie(&listeners[0])?;
    let parent = std::process::id() as libc::pid_t;
    let mut children = Children(Vec::new());
    let mut first = 0;
    while first < count {
        let n = PER_CHILD.min(count - first);
        let (ready_read, ready_write) = pipe()?;
        // SAFETY: this process is single-threaded (checked above); the child
        // runs `hold_connections`, which never returns.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            bail!("fork: {}", io::Error::last_os_error());
        }
        if pid == 0 {
            hold_connections(
                &listeners,
                first,
                n,
                parent,
                ready_read.as_raw_fd(),
                ready_write.as_raw_fd(),
            );
        }
        children.0.push(pid);
        drop(ready_write);
        wait_until_ready(ready_read, 1)?;
        first += n;
    }
    let mut stdout = io::stdout();
    writeln!(stdout, "ready {} {netns}", std::process::id())?;
    stdout.flush()?;
    snapshot::wait_for_stdin_to_close(HOLD_LIMIT)?;
    drop(children);
    Ok(())
}

/// A child of the holder: connections `first..first + n` (spread over the
/// listeners), held until stdin closes.
fn hold_connections(
    listeners: &[OwnedFd],
    first: u32,
    n: u32,
    parent: libc::pid_t,
    ready_read: i32,
    ready_write: i32,
) -> ! {
    hold_in_child(parent, ready_read, ready_write, || {
        let mut held = Vec::with_capacity(n as usize * 2);
        for i in first..first + n {
            let which = i as usize % LISTENERS.len();
            let to = SocketAddrV4::new(Ipv4Addr::LOCALHOST, LISTENERS[which]);
            let made = connect(&to).and_then(|client| Ok([client, accept(&listeners[which])?]));
            held.extend(made.map_err(|err| format!("connection {i}: {err}"))?);
        }
        Ok(held)
    })
}

fn last_error(call: &str) -> io::Error {
    let err = io::Error::last_os_error();
    io::Error::new(err.kind(), format!("{call}: {err}"))
}

/// A TCP socket connected to `to` (blocking), closed with SO_LINGER 0 (a
/// reset, no TIME_WAIT) when dropped.
fn connect(to: &SocketAddrV4) -> io::Result<OwnedFd> {
    // SAFETY: socket(2) with constant arguments.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(last_error("socket"));
    }
    // SAFETY: a descriptor socket(2) just returned, owned by nothing else.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt(2) reads `linger`, of the size given.
    if unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        )
    } != 0
    {
        return Err(last_error("setsockopt(SO_LINGER)"));
    }
    let address = sockaddr(to);
    // SAFETY: connect(2) reads `address`, a valid sockaddr_in.
    if unsafe {
        libc::connect(
            fd,
            (&raw const address).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    } != 0
    {
        return Err(last_error("connect"));
    }
    Ok(socket)
}

fn accept(listener: &OwnedFd) -> io::Result<OwnedFd> {
    // SAFETY: accept4(2) on a listening socket we own; no address wanted.
    let fd = unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(last_error("accept"));
    }
    // SAFETY: a descriptor accept4(2) just returned, owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn sockaddr(to: &SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: to.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*to.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

/// The address a bound socket has.
fn local_address(socket: &OwnedFd) -> io::Result<SocketAddrV4> {
    let mut address = sockaddr(&SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0));
    let mut len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: getsockname(2) writes at most `len` bytes into `address`.
    if unsafe { libc::getsockname(socket.as_raw_fd(), (&raw mut address).cast(), &mut len) } != 0 {
        return Err(last_error("getsockname"));
    }
    Ok(SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(address.sin_addr.s_addr)),
        u16::from_be(address.sin_port),
    ))
}

/// SO_NETNS_COOKIE of a socket: the namespace's cookie, as the daemon
/// names it.
fn netns_cookie(socket: &OwnedFd) -> io::Result<u64> {
    let mut cookie = 0u64;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt(2) writes at most `len` bytes into `cookie`.
    if unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    } != 0
    {
        return Err(last_error("getsockopt(SO_NETNS_COOKIE)"));
    }
    Ok(cookie)
}
