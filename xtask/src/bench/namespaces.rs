//! Figure 6: a container host (issue 14): 500 network namespaces, each with
//! one process listening on TCP 80, 443 and 8080, as a host running 500
//! containers of one web image has.
//!
//! The namespaces come from a `bench-worker hold-namespaces` process, like
//! the snapshot figure's listener holder ([`super::snapshot::Listeners`]):
//! it forks one child per namespace; each child moves into an anonymous
//! network namespace of its own (`unshare(CLONE_NEWNET)`, nothing to name or
//! clean up: it vanishes with the process), listens on the wildcard address
//! (`0.0.0.0` in even namespaces, dual-stack `[::]` in odd ones, so that both
//! families are on every port), and waits for its stdin to close, for at
//! most [`HOLD_LIMIT`]. The host's own namespace is never touched and
//! nothing connects to the listeners.
//!
//! What is measured, each row with its goal:
//! 1. the start-up snapshot (`portwatch_snapshot_duration_seconds{kind=
//!    "startup"}`, until ready, plus `{kind="owners"}`, the owners and
//!    options read after) of a fresh daemon per round, each checked to have
//!    every namespace's listeners in its map (`portwatch_listeners`);
//! 2. the size of the body of `GET /ports/8080` with no parameters;
//! 3. the lines `portwatch explain 8080` prints;
//! 4. what one periodic reconciliation of the map against the kernel takes
//!    (`portwatch_snapshot_duration_seconds{kind="reconcile"}`, sampled
//!    after each increment of `portwatch_reconciliations_total`), with
//!    `reconcile_interval = "1s"` so that several run within seconds.

use std::{
    fs,
    io::{self, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use super::{
    BenchDaemon, Ctx, Goal, Row, Stats, Worker,
    rig::{sum_metric, worker_arg},
    snapshot::{self, HOLD_LIMIT},
};

/// The ports every namespace listens on, as a web container does.
const PORTS: [u16; 3] = [80, 443, 8080];
/// The port asked about with `GET /ports/{port}` and `portwatch explain`.
const ASKED_PORT: u16 = 8080;
/// The most namespaces a holder makes (a bound on the fork loop).
const MAX_NAMESPACES: u32 = 4096;
/// How long the children of a holder may take to open their listeners.
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// How long `portwatch explain` may take.
const EXPLAIN_TIMEOUT: Duration = Duration::from_secs(60);
/// The daemon's reconcile interval here (its minimum), so that the
/// reconciliations come one after another.
const RECONCILE_INTERVAL: &str = "1s";
/// How often the metrics are read while waiting for reconciliations.
const RECONCILE_POLL: Duration = Duration::from_millis(100);

/// Goal of the start-up snapshot: 3 s on this 2-core machine for 500
/// containers, so that a restarted daemon answers within a few seconds.
const STARTUP_GOAL_MS: f64 = 3000.0;
/// Goal of the body of `GET /ports/8080`: 64 KiB, one read for a client.
const BODY_GOAL_BYTES: f64 = 65_536.0;
/// Goal of `portwatch explain 8080`: 40 lines, one screen.
const EXPLAIN_GOAL_LINES: f64 = 40.0;
/// Goal of one reconciliation: 3 s, a generous one. It runs every 30 s by
/// default (`reconcile_interval`), so 3 s keeps the daemon's background
/// work under a tenth of one core; it lists what the start-up snapshot
/// lists, with owners but without SO_REUSE* options, so it should not take
/// longer than the start-up goal.
const RECONCILE_GOAL_MS: f64 = 3000.0;

/// `cargo xtask bench --only namespaces`.
pub fn run(ctx: &Ctx) -> Result<Vec<Row>> {
    let count = ctx.pick(500, 100);
    let namespaces = Namespaces::hold(ctx, count)?;
    let listeners = count as usize * PORTS.len();
    let scale = format!("{count} netns × {} listeners", PORTS.len());

    let mut startup = Vec::with_capacity(ctx.rounds());
    for round in 1..=ctx.rounds() {
        let daemon = BenchDaemon::start(ctx, "")?;
        let (ready, owners) = snapshot::startup_seconds(&daemon)?;
        let took = (ready + owners) * 1e3;
        namespaces.check_seen_by(&daemon)?;
        daemon.stop()?;
        println!(
            "  round {round}/{}: start-up snapshot + merge {:.1} ms, then owners and options {:.1} ms",
            ctx.rounds(),
            ready * 1e3,
            owners * 1e3
        );
        startup.push(took);
    }

    let daemon = BenchDaemon::start(
        ctx,
        &format!("reconcile_interval = \"{RECONCILE_INTERVAL}\""),
    )?;
    namespaces.check_seen_by(&daemon)?;
    let body = ports_body_bytes(&daemon, ASKED_PORT)?;
    println!("  GET /ports/{ASKED_PORT}: {body} bytes");
    let explain = explain_lines(ctx, &daemon, ASKED_PORT)?;
    println!("  portwatch explain {ASKED_PORT}: {explain} lines");
    let wanted = ctx.rounds();
    let reconciles = reconcile_ms(&daemon, wanted)?;
    let drift = daemon.metric("portwatch_reconcile_drift_total", &[])?;
    let rss = daemon.rss_bytes()? as f64 / f64::from(1 << 20);
    // Still all there after the reconciliations.
    namespaces.check_seen_by(&daemon)?;
    daemon.stop()?;

    let mean = reconciles.iter().sum::<f64>() / reconciles.len() as f64;
    let last = reconciles.last().copied().unwrap_or_default();
    Ok(vec![
        Row::new(
            format!("namespaces: start-up snapshot ({scale})"),
            "ms",
            Stats::of(startup)?,
            Goal::AtMost(STARTUP_GOAL_MS),
        )
        .detail(format!(
            "portwatch_snapshot_duration_seconds{{kind=\"startup\"}} + {{kind=\"owners\"}} of \
             a fresh daemon per round (every namespace and the merge until ready, then \
             owners and SO_REUSE* options); each map had all \
             {listeners} listeners (portwatch_listeners); the {count} namespaces took \
             {} ms to open",
            namespaces.opened.as_millis()
        )),
        Row::new(
            format!("namespaces: `GET /ports/{ASKED_PORT}` body ({scale})"),
            "bytes",
            Stats::of(vec![body as f64])?,
            Goal::AtMost(BODY_GOAL_BYTES),
        )
        .detail(format!(
            "no parameters, uncompressed JSON; {count} namespaces listen on the port"
        )),
        Row::new(
            format!("namespaces: `portwatch explain {ASKED_PORT}` ({scale})"),
            "lines",
            Stats::of(vec![explain as f64])?,
            Goal::AtMost(EXPLAIN_GOAL_LINES),
        )
        .detail("lines on stdout, default options, against the daemon's API"),
        Row::new(
            format!("namespaces: one reconciliation ({scale})"),
            "ms",
            Stats::of(reconciles)?,
            Goal::AtMost(RECONCILE_GOAL_MS),
        )
        .detail(format!(
            "portwatch_snapshot_duration_seconds{{kind=\"reconcile\"}} after each of {wanted} \
             reconciliations (reconcile_interval = {RECONCILE_INTERVAL}; every namespace, \
             owners only when a socket is new to the map or at every tenth, no SO_REUSE* \
             options): mean {mean:.0} ms, last {last:.0} ms; drift \
             corrected {drift:.0}; daemon RSS {rss:.1} MiB"
        )),
    ])
}

/// Namespace `index` listens on `[::]` (dual-stack) if odd, `0.0.0.0` if
/// even.
fn is_ipv6(index: u32) -> bool {
    index % 2 == 1
}

/// How many of `count` namespaces listen on IPv4 and on IPv6.
fn per_family(count: u32) -> [(&'static str, u32); 2] {
    let ipv6 = (0..count).filter(|&index| is_ipv6(index)).count() as u32;
    [("ipv4", count - ipv6), ("ipv6", ipv6)]
}

/// `count` network namespaces with their listeners, held by a
/// `bench-worker hold-namespaces` process until this is dropped.
struct Namespaces {
    child: Child,
    count: u32,
    /// How long opening them took.
    opened: Duration,
}

impl Namespaces {
    fn hold(ctx: &Ctx, count: u32) -> Result<Namespaces> {
        println!(
            "  opening {count} network namespaces, each with a process listening on TCP {PORTS:?}"
        );
        let started = Instant::now();
        let mut child = Worker::command(ctx, &["hold-namespaces", &count.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting bench-worker hold-namespaces")?;
        let line = snapshot::read_ready_line(&mut child, "bench-worker hold-namespaces");
        let mut namespaces = Namespaces {
            child,
            count,
            opened: started.elapsed(),
        };
        let line = line?;
        let held = line.split_whitespace().nth(2);
        if held != Some(count.to_string().as_str()) {
            // Dropping `namespaces` ends the holder.
            bail!("bench-worker hold-namespaces said {line:?}, not ready with {count}");
        }
        namespaces.opened = started.elapsed();
        println!("  listening after {} ms", namespaces.opened.as_millis());
        Ok(namespaces)
    }

    /// Fails unless the daemon's map has every namespace's listeners: for
    /// each port and family, `portwatch_listeners` (which sums over all
    /// namespaces, the host's included) at least the namespaces' count.
    fn check_seen_by(&self, daemon: &BenchDaemon) -> Result<()> {
        let metrics = daemon.metrics()?;
        for port in PORTS {
            for (family, expected) in per_family(self.count) {
                let labels = [
                    format!("port=\"{port}\""),
                    "protocol=\"tcp\"".to_owned(),
                    format!("family=\"{family}\""),
                ];
                let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
                let seen = sum_metric(&metrics, "portwatch_listeners", &labels) as u64;
                if seen < u64::from(expected) {
                    bail!(
                        "the daemon's map has {seen} {family} TCP listeners on port {port}, \
                         not the bench namespaces' {expected}"
                    );
                }
            }
        }
        Ok(())
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        // A closed stdin tells the holder to kill its children and exit.
        snapshot::release_holder(&mut self.child, "the namespace holder");
    }
}

/// The size in bytes of the body of `GET /ports/{port}`, with no parameters.
/// Fails unless it is a 200 with a JSON body.
fn ports_body_bytes(daemon: &BenchDaemon, port: u16) -> Result<usize> {
    let path = format!("/ports/{port}");
    let (status, body) = daemon.get(&path)?;
    if status != 200 {
        bail!("GET {path} answered {status}: {body}");
    }
    serde_json::from_str::<serde_json::Value>(&body)
        .with_context(|| format!("GET {path} did not answer JSON: {body}"))?;
    Ok(body.len())
}

/// How many lines `portwatch explain <port>` prints on stdout, run against
/// the daemon's API for at most [`EXPLAIN_TIMEOUT`]. Fails unless it exits
/// with 0 having printed something.
fn explain_lines(ctx: &Ctx, daemon: &BenchDaemon, port: u16) -> Result<usize> {
    let stdout = ctx.run_dir.join("explain.out");
    let stderr = ctx.run_dir.join("explain.err");
    let create = |path: &std::path::Path| {
        fs::File::create(path).with_context(|| format!("creating {}", path.display()))
    };
    let server = format!("http://{}", daemon.addr());
    let mut child = Command::new(&ctx.portwatch)
        .args(["explain", &port.to_string(), "--server", &server])
        .stdin(Stdio::null())
        .stdout(create(&stdout)?)
        .stderr(create(&stderr)?)
        .spawn()
        .with_context(|| format!("starting {} explain", ctx.portwatch.display()))?;
    let deadline = Instant::now() + EXPLAIN_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            child.kill()?;
            child.wait()?;
            bail!("portwatch explain {port} did not finish within {EXPLAIN_TIMEOUT:?}");
        }
        thread::sleep(Duration::from_millis(20));
    };
    let errors = fs::read_to_string(&stderr).unwrap_or_default();
    if !status.success() {
        bail!(
            "portwatch explain {port} failed ({status}): {}",
            errors.trim()
        );
    }
    let text =
        fs::read_to_string(&stdout).with_context(|| format!("reading {}", stdout.display()))?;
    let lines = text.lines().count();
    if lines == 0 {
        bail!(
            "portwatch explain {port} printed nothing on stdout (stderr: {})",
            errors.trim()
        );
    }
    Ok(lines)
}

/// The duration of each of the next `wanted` reconciliations, in ms: the
/// `kind="reconcile"` snapshot duration read each time
/// `portwatch_reconciliations_total` has gone up. Fails if they do not all
/// happen in a bounded time (a failing listing is not counted as one).
fn reconcile_ms(daemon: &BenchDaemon, wanted: usize) -> Result<Vec<f64>> {
    let limit = Duration::from_secs(30) + Duration::from_secs(20) * wanted as u32;
    let deadline = Instant::now() + limit;
    let done = |metrics: &str| sum_metric(metrics, "portwatch_reconciliations_total", &[]) as u64;
    let mut last = done(&daemon.metrics()?);
    let mut samples = Vec::with_capacity(wanted);
    while samples.len() < wanted {
        if Instant::now() > deadline {
            bail!(
                "only {} of {wanted} reconciliations happened within {limit:?} with \
                 reconcile_interval = {RECONCILE_INTERVAL} (see the daemon log)",
                samples.len()
            );
        }
        thread::sleep(RECONCILE_POLL);
        let metrics = daemon.metrics()?;
        let now = done(&metrics);
        if now == last {
            continue;
        }
        let took = sum_metric(
            &metrics,
            "portwatch_snapshot_duration_seconds",
            &["kind=\"reconcile\""],
        );
        if took <= 0.0 {
            bail!(
                "portwatch_reconciliations_total is {now} but there is no \
                 portwatch_snapshot_duration_seconds{{kind=\"reconcile\"}}"
            );
        }
        if now > last + 1 {
            // Only the latest duration is exposed; the others are not guessed.
            println!(
                "  {} reconciliations between two reads; the latest one counts",
                now - last
            );
        }
        println!("  reconciliation {now}: {:.1} ms", took * 1e3);
        samples.push(took * 1e3);
        last = now;
    }
    Ok(samples)
}

/// `bench-worker hold-namespaces <count>`: forks `count` children, each in
/// its own new network namespace listening on [`PORTS`]; prints
/// `ready <pid> <count>` once all are listening, and holds them until stdin
/// closes or [`HOLD_LIMIT`] passes, then kills them.
pub fn worker(args: &[String]) -> Result<()> {
    if args.len() != 1 {
        bail!("usage: bench-worker hold-namespaces <count>");
    }
    let count: u32 = worker_arg(args, 0, "namespaces")?;
    if !(1..=MAX_NAMESPACES).contains(&count) {
        bail!("hold-namespaces: a count from 1 to {MAX_NAMESPACES}, not {count}");
    }
    // fork(2) copies only the calling thread: a child of a process with
    // other threads could find a lock held forever.
    let threads = fs::read_dir("/proc/self/task")
        .context("reading /proc/self/task")?
        .count();
    if threads != 1 {
        bail!("hold-namespaces forks, so it must be single-threaded, but it has {threads} threads");
    }
    let (ready_read, ready_write) = pipe()?;
    let parent = std::process::id() as libc::pid_t;
    let mut children = Children(Vec::with_capacity(count as usize));
    for index in 0..count {
        // SAFETY: this process is single-threaded (checked above); the
        // child runs `hold_namespace`, which never returns.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            bail!(
                "fork (namespace {index} of {count}): {}",
                io::Error::last_os_error()
            );
        }
        if pid == 0 {
            hold_namespace(
                index,
                parent,
                ready_read.as_raw_fd(),
                ready_write.as_raw_fd(),
            );
        }
        children.0.push(pid);
    }
    drop(ready_write);
    wait_until_ready(ready_read, count)?;
    let mut stdout = io::stdout();
    writeln!(stdout, "ready {} {count}", std::process::id())?;
    stdout.flush()?;
    snapshot::wait_for_stdin_to_close(HOLD_LIMIT)?;
    drop(children);
    Ok(())
}

/// The holder's children: killed and reaped on drop, so that they never
/// outlive the holder (they also have PR_SET_PDEATHSIG).
pub(super) struct Children(pub(super) Vec<libc::pid_t>);

impl Drop for Children {
    fn drop(&mut self) {
        for &pid in &self.0 {
            // SAFETY: kill(2) of a child we forked and have not reaped.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        for &pid in &self.0 {
            // SAFETY: waitpid(2) of that child; the status is not wanted.
            unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
        }
    }
}

/// A pipe: (read end, write end), both close-on-exec.
pub(super) fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2(2) writes two descriptors into `fds`.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        bail!("pipe2: {}", io::Error::last_os_error());
    }
    // SAFETY: the descriptors pipe2 just returned, owned by nothing else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// What a child writes on the ready pipe.
const READY: u8 = b'+';
const FAILED: u8 = b'-';

/// Reads one byte per child from the ready pipe, for at most
/// [`READY_TIMEOUT`]: fails at the first child that failed (it said why on
/// stderr), or if they all closed the pipe before `count` were ready.
pub(super) fn wait_until_ready(ready: OwnedFd, count: u32) -> Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    let mut listening = 0;
    let mut buffer = [0u8; 512];
    while listening < count {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("{listening} of {count} children were ready after {READY_TIMEOUT:?}");
        }
        let mut poll = libc::pollfd {
            fd: ready.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let timeout = i32::try_from(left.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: poll(2) on one pollfd we own.
        if unsafe { libc::poll(&mut poll, 1, timeout) } < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            bail!("poll(ready pipe): {err}");
        }
        // SAFETY: read(2) into a buffer of the given length.
        let read =
            unsafe { libc::read(ready.as_raw_fd(), buffer.as_mut_ptr().cast(), buffer.len()) };
        match read {
            0 => bail!(
                "only {listening} of {count} children are ready: the others exited (see above)"
            ),
            read if read < 0 => {
                let err = io::Error::last_os_error();
                if err.kind() != io::ErrorKind::Interrupted {
                    bail!("reading the ready pipe: {err}");
                }
            }
            read => {
                for &byte in &buffer[..read as usize] {
                    if byte != READY {
                        bail!("a child could not get ready (see above)");
                    }
                    listening += 1;
                }
            }
        }
    }
    Ok(())
}

/// A child of the holder: a new network namespace, a listener on each of
/// [`PORTS`], one byte on the ready pipe, then held until stdin closes.
fn hold_namespace(index: u32, parent: libc::pid_t, ready_read: RawFd, ready_write: RawFd) -> ! {
    hold_in_child(parent, ready_read, ready_write, || {
        open_listeners(index).map_err(|err| format!("namespace {index}: {err}"))
    })
}

/// The life of a holder's child: dies with the holder, runs `hold`, says on
/// the ready pipe whether it worked (`hold`'s error on stderr if not),
/// keeps what `hold` made until stdin closes or [`HOLD_LIMIT`] passes, and
/// leaves with `_exit`, running no destructor of the holder's state.
pub(super) fn hold_in_child<T>(
    parent: libc::pid_t,
    ready_read: RawFd,
    ready_write: RawFd,
    hold: impl FnOnce() -> Result<T, String>,
) -> ! {
    // SAFETY: plain system calls on this process's own descriptors.
    unsafe {
        libc::close(ready_read);
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        // The holder may have died before the line above.
        if libc::getppid() != parent {
            libc::_exit(1);
        }
    }
    let said = |byte: u8| {
        // SAFETY: write(2) of one byte from a local, on the pipe we hold.
        unsafe { libc::write(ready_write, (&raw const byte).cast(), 1) }
    };
    let held = hold();
    let code = match &held {
        Ok(_) => {
            said(READY);
            // SAFETY: closing our copy of the write end, so the holder sees
            // end of file once every child has answered.
            unsafe { libc::close(ready_write) };
            match snapshot::wait_for_stdin_to_close(HOLD_LIMIT) {
                Ok(()) => 0,
                Err(_) => 1,
            }
        }
        Err(err) => {
            let _ = writeln!(io::stderr(), "bench-worker: {err}");
            said(FAILED);
            1
        }
    };
    // SAFETY: _exit(2) ends the child at once; the kernel closes what it
    // held (and a namespace of its own goes with it).
    unsafe { libc::_exit(code) }
}

/// This process's own network namespace and its listeners on [`PORTS`].
fn open_listeners(index: u32) -> io::Result<Vec<OwnedFd>> {
    // SAFETY: unshare(2) moves only this process into a new namespace.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        let err = io::Error::last_os_error();
        return Err(io::Error::new(
            err.kind(),
            format!("unshare(CLONE_NEWNET): {err}"),
        ));
    }
    PORTS
        .iter()
        .map(|&port| listen_wildcard(is_ipv6(index), port))
        .collect()
}

/// A TCP socket listening on `0.0.0.0:port`, or on `[::]:port` accepting
/// IPv4 too, as most servers' `[::]` does (a new namespace starts with
/// `net.ipv6.bindv6only` = 0).
fn listen_wildcard(ipv6: bool, port: u16) -> io::Result<OwnedFd> {
    let address: IpAddr = if ipv6 {
        Ipv6Addr::UNSPECIFIED.into()
    } else {
        Ipv4Addr::UNSPECIFIED.into()
    };
    let endpoint = SocketAddr::from((address, port));
    TcpListener::bind(endpoint)
        .map(OwnedFd::from)
        .map_err(|err| io::Error::new(err.kind(), format!("listen on {endpoint}: {err}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaces_alternate_families() {
        assert_eq!(per_family(500), [("ipv4", 250), ("ipv6", 250)]);
        assert_eq!(per_family(101), [("ipv4", 51), ("ipv6", 50)]);
        assert_eq!(per_family(1), [("ipv4", 1), ("ipv6", 0)]);
        assert!(!is_ipv6(0) && is_ipv6(1));
    }
}
