//! The bench's equipment: the cgroup the load runs in, the daemon under
//! test, worker processes, and the alternating with/without loop.

use std::{
    fs,
    io::{self, Read as _, Write as _},
    net::{SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    os::fd::{FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    str::FromStr,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use super::Ctx;
use crate::cmd;

/// The environment variable that tells a bench worker which cgroup to join.
pub const CGROUP_ENV: &str = "PORTWATCH_BENCH_CGROUP";

/// How long the daemon may take to become ready (a 100k-listener snapshot
/// included).
const READY_TIMEOUT: Duration = Duration::from_secs(180);

/// A cgroup made for this run under the cgroup2 mount, removed on drop.
pub struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    pub fn create() -> Result<Cgroup> {
        let mounts =
            fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?;
        let Some(root) = mounts.lines().find_map(|line| {
            let mut fields = line.split_whitespace();
            let (_, dir, kind) = (fields.next()?, fields.next()?, fields.next()?);
            (kind == "cgroup2").then(|| PathBuf::from(dir))
        }) else {
            bail!("no cgroup2 file system is mounted (see /proc/self/mounts)");
        };
        let path = root.join(format!("portwatch-bench-{}", std::process::id()));
        fs::create_dir(&path).with_context(|| format!("creating cgroup {}", path.display()))?;
        Ok(Cgroup { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Moves the calling process into the cgroup named by [`CGROUP_ENV`], if
    /// any (a bench worker's first step).
    pub fn join_from_env() -> Result<()> {
        let Some(path) = std::env::var_os(CGROUP_ENV) else {
            return Ok(());
        };
        let procs = Path::new(&path).join("cgroup.procs");
        fs::write(&procs, "0").with_context(|| format!("joining {}", procs.display()))
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // The workers have exited, but the kernel may take a moment to see
        // the cgroup empty.
        for _ in 0..50 {
            if fs::remove_dir(&self.path).is_ok() || !self.path.exists() {
                return;
            }
            thread::sleep(Duration::from_millis(100));
        }
        eprintln!("bench: could not remove cgroup {}", self.path.display());
    }
}

/// The resident memory (VmRSS) of process `pid`, in bytes.
pub fn rss_of(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().strip_suffix("kB"))
        .and_then(|kb| kb.trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .with_context(|| format!("no VmRSS in {path}"))
}

/// The daemon under test: the release build, watching the bench cgroup,
/// serving HTTP on a free loopback port, its log in the run's directory.
pub struct BenchDaemon {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
}

impl BenchDaemon {
    /// Starts it with `extra` appended to its configuration file (TOML keys
    /// such as `ring_size = 4096`) and waits until `/readyz` says ready with
    /// nothing pending.
    pub fn start(ctx: &Ctx, extra: &str) -> Result<BenchDaemon> {
        let addr = free_loopback_port()?;
        let config = ctx.run_dir.join("daemon.toml");
        fs::write(
            &config,
            format!(
                "listen = \"{addr}\"\ncgroup = \"{}\"\n{extra}\n",
                ctx.cgroup.path().display()
            ),
        )
        .with_context(|| format!("writing {}", config.display()))?;
        let log = ctx.run_dir.join("daemon.log");
        let log_file =
            fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let child = Command::new(&ctx.portwatch)
            .arg("daemon")
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("starting {}", ctx.portwatch.display()))?;
        let mut daemon = BenchDaemon { child, addr, log };
        let started = Instant::now();
        loop {
            if let Some(status) = daemon.child.try_wait()? {
                bail!(
                    "the daemon exited ({status}) before it was ready:\n{}",
                    daemon.log_tail()
                );
            }
            // Ready, and done reading the owners of what it found at
            // start-up: a figure measures the daemon at work, not that.
            if matches!(daemon.get("/readyz"), Ok((200, body)) if !body.contains("\npending:")) {
                return Ok(daemon);
            }
            if started.elapsed() > READY_TIMEOUT {
                bail!(
                    "the daemon was not ready after {READY_TIMEOUT:?}:\n{}",
                    daemon.log_tail()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `GET path`: the status and body.
    pub fn get(&self, path: &str) -> Result<(u16, String)> {
        http_get(self.addr, path)
    }

    /// `GET /metrics`: the text exposition.
    pub fn metrics(&self) -> Result<String> {
        let (status, text) = self.get("/metrics")?;
        if status != 200 {
            bail!("/metrics answered {status}");
        }
        Ok(text)
    }

    /// The sum of every sample of metric `name` whose labels include all of
    /// `labels` (as `key="value"`).
    pub fn metric(&self, name: &str, labels: &[&str]) -> Result<f64> {
        Ok(sum_metric(&self.metrics()?, name, labels))
    }

    /// The path its bind outcome hook is attached through (`fexit`,
    /// `tracepoint` or `inferred`), from
    /// `portwatch_program_attached{hook="bind_outcome",path=...}`.
    pub fn outcome_path(&self) -> Result<Option<&'static str>> {
        for path in ["fexit", "tracepoint", "inferred"] {
            let labels = ["hook=\"bind_outcome\"", &format!("path=\"{path}\"")];
            if self.metric("portwatch_program_attached", &labels)? == 1.0 {
                return Ok(Some(path));
            }
        }
        Ok(None)
    }

    /// The daemon's resident memory (VmRSS), in bytes.
    pub fn rss_bytes(&self) -> Result<u64> {
        rss_of(self.pid())
    }

    /// SIGTERM, then waits for the exit (the programs are detached by then).
    pub fn stop(mut self) -> Result<()> {
        self.terminate()
    }

    fn terminate(&mut self) -> Result<()> {
        stop_child(&mut self.child, libc::SIGTERM, "the daemon")
    }

    /// The daemon's log so far (its stderr).
    pub fn log(&self) -> Result<String> {
        fs::read_to_string(&self.log).with_context(|| format!("reading {}", self.log.display()))
    }

    /// How many of the workers' successful binds the daemon has counted, now.
    pub fn bind_counts(&self) -> Result<BindCounts> {
        Ok(BindCounts::from_metrics(&self.metrics()?))
    }

    /// [`BenchDaemon::bind_counts`] once the daemon has caught up: when they
    /// account for all `issued` binds, or else when they have stopped
    /// changing for half a second (the ring buffer is drained). The caller
    /// checks them with [`BindCounts::check`].
    pub fn settled_bind_counts(&self, issued: u64) -> Result<BindCounts> {
        const POLL: Duration = Duration::from_millis(50);
        const STILL_POLLS: u32 = 10;
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut last = self.bind_counts()?;
        let mut still = 0;
        while last.seen + last.dropped != issued && still < STILL_POLLS {
            if Instant::now() > deadline {
                bail!("the daemon's bind counts were still changing after 60 s: {last:?}");
            }
            thread::sleep(POLL);
            let now = self.bind_counts()?;
            still = if now == last { still + 1 } else { 0 };
            last = now;
        }
        Ok(last)
    }

    fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for BenchDaemon {
    fn drop(&mut self) {
        if let Err(err) = self.terminate() {
            eprintln!("bench: stopping the daemon: {err:#}");
        }
    }
}

/// How long a child asked to stop may take: bpftrace detaching its probes
/// took over 20 s once on a slow machine.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// Sends `signal` to `child` (`what`, for the message) and waits up to
/// [`STOP_TIMEOUT`] for it to exit, then kills it.
fn stop_child(child: &mut Child, signal: i32, what: &str) -> Result<()> {
    if child.try_wait()?.is_some() {
        return Ok(());
    }
    let pid = i32::try_from(child.id()).context("pid out of range")?;
    // SAFETY: kill(2) with a pid we spawned and have not reaped.
    unsafe { libc::kill(pid, signal) };
    let deadline = Instant::now() + STOP_TIMEOUT;
    while child.try_wait()?.is_none() {
        if Instant::now() > deadline {
            child.kill()?;
            child.wait()?;
            bail!(
                "{what} did not stop within {} s of signal {signal}",
                STOP_TIMEOUT.as_secs()
            );
        }
        thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// The daemon's account of successful binds: each one is either seen
/// (`portwatch_binds_total`) or counted as lost by the post_bind hook, which
/// is the one that emits a successful bind's record
/// (`portwatch_events_dropped_total{hook="post_bind"}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BindCounts {
    pub seen: u64,
    pub dropped: u64,
}

impl BindCounts {
    fn from_metrics(text: &str) -> BindCounts {
        // Counters are integers; the text format prints them as floats.
        let count = |name, labels: &[&str]| sum_metric(text, name, labels) as u64;
        BindCounts {
            seen: count("portwatch_binds_total", &[]),
            dropped: count("portwatch_events_dropped_total", &["hook=\"post_bind\""]),
        }
    }

    /// Every issued bind is accounted for exactly once: seen + dropped =
    /// issued. A failure is a correctness bug, never noise.
    pub fn check(self, issued: u64) -> Result<()> {
        if self.seen + self.dropped != issued {
            bail!(
                "bind accounting is off: {issued} binds issued, but the daemon saw {} and counted {} dropped (sum {})",
                self.seen,
                self.dropped,
                self.seen + self.dropped
            );
        }
        Ok(())
    }
}

/// bpftrace running a script (the comparison on the bind path, and empty
/// programs that isolate what one tracepoint costs). Its output goes to
/// `<name>.out` in the run's directory; it is interrupted on drop.
pub struct Bpftrace {
    child: Child,
    output: PathBuf,
}

impl Bpftrace {
    /// Starts `bpftrace -e <script>` and waits until it has attached its
    /// probes (it prints "Attaching N probes..." then).
    pub fn start(ctx: &Ctx, name: &str, script: &str) -> Result<Bpftrace> {
        let output = ctx.run_dir.join(format!("{name}.out"));
        let errors = ctx.run_dir.join(format!("{name}.err"));
        let create = |path: &Path| {
            fs::File::create(path).with_context(|| format!("creating {}", path.display()))
        };
        let child = Command::new("bpftrace")
            .arg("-e")
            .arg(script)
            .stdin(Stdio::null())
            .stdout(create(&output)?)
            .stderr(create(&errors)?)
            .spawn()
            .context("starting bpftrace (`cargo xtask setup` installs it)")?;
        let mut bpftrace = Bpftrace { child, output };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if bpftrace.output()?.contains("Attaching ") {
                return Ok(bpftrace);
            }
            let problem = if let Some(status) = bpftrace.child.try_wait()? {
                format!("bpftrace exited ({status}) before attaching")
            } else if Instant::now() > deadline {
                "bpftrace had not attached after 60 s".to_owned()
            } else {
                thread::sleep(Duration::from_millis(10));
                continue;
            };
            let stderr = fs::read_to_string(&errors).unwrap_or_default();
            bail!("{problem}; its stderr:\n{}", stderr.trim());
        }
    }

    /// What it has printed so far.
    pub fn output(&self) -> Result<String> {
        fs::read_to_string(&self.output)
            .with_context(|| format!("reading {}", self.output.display()))
    }

    /// Interrupts it (its probes are detached when it exits); its output.
    pub fn stop(mut self) -> Result<String> {
        stop_child(&mut self.child, libc::SIGINT, "bpftrace")?;
        self.output()
    }
}

impl Drop for Bpftrace {
    fn drop(&mut self) {
        if let Err(err) = stop_child(&mut self.child, libc::SIGINT, "bpftrace") {
            eprintln!("bench: stopping bpftrace: {err:#}");
        }
    }
}

/// A loopback address with a port nobody listens on right now.
pub fn free_loopback_port() -> Result<SocketAddr> {
    let probe = TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(probe.local_addr()?)
}

/// A minimal HTTP/1.1 GET with `Connection: close`: the status and body.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let timeout = Duration::from_secs(10);
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .with_context(|| format!("GET {path}: no end of headers"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("GET {path}: no status in {head:?}"))?;
    let chunked = head
        .lines()
        .any(|line| line.eq_ignore_ascii_case("transfer-encoding: chunked"));
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_owned()
    };
    Ok((status, body))
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].trim_start_matches("\r\n");
    }
    out
}

/// The sum of the samples of `name` (exactly that name, no suffix) whose
/// label set contains every one of `labels`.
pub fn sum_metric(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let rest = series.strip_prefix(name)?;
            let label_text = match rest.chars().next() {
                None => "",
                Some('{') => rest,
                Some(_) => return None,
            };
            labels
                .iter()
                .all(|label| label_text.contains(label))
                .then(|| value.parse::<f64>().ok())
                .flatten()
        })
        .sum()
}

/// Bench worker processes: `cargo xtask bench-worker <args>` (this same
/// binary), inside the bench cgroup.
pub struct Worker;

impl Worker {
    /// A worker started by the bench: it joins the bench cgroup first.
    pub fn command(ctx: &Ctx, args: &[&str]) -> Command {
        let mut command = Self::nested(args);
        command.env(CGROUP_ENV, ctx.cgroup.path());
        command
    }

    /// A worker started by a worker, which it inherits the cgroup (and
    /// [`CGROUP_ENV`]) and network namespace from.
    pub fn nested(args: &[&str]) -> Command {
        // The running binary itself, not its path: another build in the
        // shared target directory may replace target/debug/xtask mid-run.
        let mut command = Command::new("/proc/self/exe");
        command.arg("bench-worker").args(args).stdin(Stdio::null());
        command
    }

    /// Runs a worker to its end; its stdout.
    pub fn run(ctx: &Ctx, args: &[&str]) -> Result<String> {
        let out = cmd::output(&mut Self::command(ctx, args))?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    }
}

/// A TCP socket bound to `endpoint`, listening with `backlog` if one is
/// given. Raw libc calls, so a timed loop makes exactly these syscalls.
pub fn tcp_socket(endpoint: SocketAddrV4, backlog: Option<i32>) -> io::Result<OwnedFd> {
    let fail = |call: &str| {
        let err = io::Error::last_os_error();
        io::Error::new(err.kind(), format!("{call}: {err}"))
    };
    // SAFETY: socket(2) with constant arguments.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(fail("socket"));
    }
    // SAFETY: a descriptor socket(2) just returned, owned by nothing else.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let address = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: endpoint.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*endpoint.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: bind(2) reads `address`, a valid sockaddr_in of the given size.
    let bound = unsafe {
        libc::bind(
            fd,
            (&raw const address).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if bound != 0 {
        return Err(fail("bind"));
    }
    // SAFETY: listen(2) on a socket we own.
    if let Some(backlog) = backlog
        && unsafe { libc::listen(fd, backlog) } != 0
    {
        return Err(fail("listen"));
    }
    Ok(socket)
}

/// `rounds` rounds of `measure(true)` ("with") and `measure(false)`
/// ("without"), alternating which goes first so that a drift in the
/// machine's speed does not favour one side. Returns (with, without).
pub fn alternate(
    rounds: usize,
    mut measure: impl FnMut(bool) -> Result<f64>,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let mut samples = rotate(rounds, 2, |side| measure(side == 0))?.into_iter();
    let (Some(with), Some(without)) = (samples.next(), samples.next()) else {
        bail!("rotate returned fewer than two sides");
    };
    Ok((with, without))
}

/// `rounds` rounds of `measure(side)` for each side in `0..sides`, starting
/// each round one side later, so that a drift in the machine's speed does not
/// favour one side. Returns the samples of each side, in round order.
pub fn rotate(
    rounds: usize,
    sides: usize,
    mut measure: impl FnMut(usize) -> Result<f64>,
) -> Result<Vec<Vec<f64>>> {
    let mut samples = vec![Vec::with_capacity(rounds); sides];
    for round in 0..rounds {
        for step in 0..sides {
            let side = (round + step) % sides;
            samples[side].push(measure(side)?);
        }
    }
    Ok(samples)
}

/// Argument `index` of a bench worker (`name` for the message), parsed.
pub fn worker_arg<T: FromStr>(args: &[String], index: usize, name: &str) -> Result<T>
where
    T::Err: std::error::Error + Send + Sync + 'static,
{
    let text = args
        .get(index)
        .with_context(|| format!("missing argument {} ({name})", index + 1))?;
    text.parse().with_context(|| {
        format!(
            "argument {} ({name}): {text:?} is not a valid value",
            index + 1
        )
    })
}

/// Runs `op` `warmup` times, then times `iterations` more: nanoseconds per
/// timed op. What a loop worker prints as `ns_per_op`.
pub fn ns_per_op(warmup: u64, iterations: u64, mut op: impl FnMut() -> Result<()>) -> Result<f64> {
    if iterations == 0 {
        bail!("nothing to time: 0 iterations");
    }
    for _ in 0..warmup {
        op()?;
    }
    let started = Instant::now();
    for _ in 0..iterations {
        op()?;
    }
    Ok(started.elapsed().as_nanos() as f64 / iterations as f64)
}

/// The number after `key` in a worker's output, which is whitespace-separated
/// `key value` pairs such as `ns_per_op 3412.5 ops 110000`.
pub fn output_field(output: &str, key: &str) -> Result<f64> {
    let words: Vec<&str> = output.split_whitespace().collect();
    let value = words
        .chunks(2)
        .find_map(|pair| match pair {
            [found, value] if *found == key => Some(*value),
            _ => None,
        })
        .with_context(|| format!("no `{key}` in the worker's output {:?}", output.trim()))?;
    value
        .parse()
        .with_context(|| format!("`{key}` in the worker's output is {value:?}, not a number"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_sums_match_the_name_exactly_and_every_label() {
        let text = "# HELP x\nportwatch_events_total{hook=\"bind\"} 3\nportwatch_events_total{hook=\"listen\"} 4\nportwatch_events_total_extra 100\nportwatch_ready 1\n";
        assert_eq!(sum_metric(text, "portwatch_events_total", &[]), 7.0);
        assert_eq!(
            sum_metric(text, "portwatch_events_total", &["hook=\"bind\""]),
            3.0
        );
        assert_eq!(sum_metric(text, "portwatch_ready", &[]), 1.0);
        assert_eq!(sum_metric(text, "portwatch_missing", &[]), 0.0);
    }

    #[test]
    fn alternation_swaps_the_order_every_round() {
        let mut order = Vec::new();
        let (with, without) = alternate(3, |side| {
            order.push(side);
            Ok(if side { 2.0 } else { 1.0 })
        })
        .unwrap();
        assert_eq!(order, [true, false, false, true, true, false]);
        assert_eq!((with, without), (vec![2.0; 3], vec![1.0; 3]));
    }

    #[test]
    fn rotation_starts_each_round_one_side_later() {
        let mut order = Vec::new();
        let samples = rotate(3, 3, |side| {
            order.push(side);
            Ok(side as f64 * 10.0 + order.len() as f64)
        })
        .unwrap();
        assert_eq!(order, [0, 1, 2, 1, 2, 0, 2, 0, 1]);
        assert_eq!(samples[0], [1.0, 6.0, 8.0]);
        assert_eq!(samples[2], [23.0, 25.0, 27.0]);
    }

    #[test]
    fn worker_output_fields_are_found_by_key() {
        let output = "ns_per_op 3412.5 ops 110000\n";
        assert_eq!(output_field(output, "ns_per_op").unwrap(), 3412.5);
        assert_eq!(output_field(output, "ops").unwrap(), 110_000.0);
        // A value is never taken for a key.
        assert!(output_field(output, "3412.5").is_err());
        assert!(output_field("ops many", "ops").is_err());
        assert!(output_field("", "ops").is_err());
    }

    #[test]
    fn worker_arguments_are_parsed_or_named_in_the_error() {
        let args = ["12".to_owned(), "x".to_owned()];
        assert_eq!(worker_arg::<u64>(&args, 0, "cycles").unwrap(), 12);
        let bad = worker_arg::<u64>(&args, 1, "rate").unwrap_err().to_string();
        assert!(bad.contains("rate"), "{bad}");
        assert!(worker_arg::<u64>(&args, 2, "threads").is_err());
    }

    #[test]
    fn bind_accounting_adds_every_family_and_only_post_bind_drops() {
        let text = "portwatch_binds_total{family=\"ipv4\",protocol=\"tcp\"} 7\nportwatch_binds_total{family=\"ipv6\",protocol=\"udp\"} 1\nportwatch_events_dropped_total{hook=\"post_bind\"} 2\nportwatch_events_dropped_total{hook=\"release\"} 5\n";
        let counts = BindCounts::from_metrics(text);
        assert_eq!(
            counts,
            BindCounts {
                seen: 8,
                dropped: 2
            }
        );
        assert!(counts.check(10).is_ok());
        assert!(counts.check(11).is_err());
        assert!(counts.check(9).is_err());
    }

    #[test]
    fn chunked_bodies_are_joined() {
        assert_eq!(dechunk("3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"), "abcde");
    }
}
