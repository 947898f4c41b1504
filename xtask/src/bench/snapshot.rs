//! Figure 4: how long portwatch's start-up snapshot and merge take with
//! 100k listening sockets, against `ss -tlnH` listing the same sockets.
//!
//! The listeners live in a private network namespace made by a
//! `bench-worker hold-listeners` process, so they cost the rest of the
//! machine nothing and vanish with it. The file-descriptor limit cannot be
//! raised past its hard limit here (no CAP_SYS_RESOURCE), so the holder
//! spreads the sockets over as many processes as it needs, all in its
//! namespace. The API figure ([`super::api`]) uses the same holder.
//!
//! Each round starts the daemon afresh and reads
//! `portwatch_snapshot_duration_seconds{kind="startup"}` (the listing of
//! every namespace and its merge into the map: what ready waits for), then
//! `{kind="owners"}` (the owners and SO_REUSE* options read after ready),
//! and times `ss -tlnH` and `ss -tlnpH` (with owners) run in the holder's
//! namespace. Both sides are checked to have seen every listener, so the
//! times mean what they say.

use std::{
    io::{self, BufRead as _, BufReader, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddrV4},
    ops::Range,
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use super::{BenchDaemon, Ctx, Goal, Row, Stats, Worker, alternate, rig::tcp_socket};
use crate::cmd;

/// The first port of every address's range.
const FIRST_PORT: u16 = 10_000;
/// Ports per loopback address: 100k listeners take two addresses, so a
/// port has at most two listeners, as with a typical IPv4 + IPv6 pair.
const PORTS_PER_ADDRESS: u32 = 50_000;
/// Addresses 127.0.0.1 to 127.0.0.254.
const ADDRESSES: u32 = 254;
/// Descriptors each holder process keeps free besides its listeners.
const FD_RESERVE: u64 = 64;
/// How long a holder keeps its listeners if nobody closes its stdin (the
/// namespaces figure's holder too).
pub(super) const HOLD_LIMIT: Duration = Duration::from_secs(15 * 60);
/// How long opening the listeners may take.
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// The listen(2) backlog of each socket (nothing connects to most of them).
const BACKLOG: i32 = 16;

/// `cargo xtask bench --only snapshot`.
pub fn run(ctx: &Ctx) -> Result<Vec<Row>> {
    let count = ctx.pick(100_000, 10_000);
    let listeners = Listeners::hold(ctx, count)?;
    let mut with_owners = Vec::new();
    let mut complete = Vec::new();
    let (portwatch, ss) = alternate(ctx.rounds(), |with| {
        if with {
            let daemon = BenchDaemon::start(ctx, "")?;
            let (ready, owners) = startup_seconds(&daemon)?;
            listeners.check_seen_by(&daemon)?;
            daemon.stop()?;
            println!(
                "  portwatch listing + merge (ready): {:.1} ms, then owners and options: {:.1} ms",
                ready * 1e3,
                owners * 1e3
            );
            complete.push(ready + owners);
            Ok(ready)
        } else {
            let plain = listeners.time_ss("-tlnH")?;
            let owners = listeners.time_ss("-tlnpH")?;
            println!(
                "  ss -tlnH: {:.1} ms, ss -tlnpH: {:.1} ms",
                plain * 1e3,
                owners * 1e3
            );
            with_owners.push(owners);
            Ok(plain)
        }
    })?;
    let ms = |samples: &[f64]| Stats::median_of(samples).map(|median| median * 1e3);
    let (portwatch_ms, ss_ms, ss_owners_ms) = (ms(&portwatch)?, ms(&ss)?, ms(&with_owners)?);
    let complete_ms = ms(&complete)?;
    Ok(vec![
        Row::ratio(
            format!("snapshot: portwatch ready / `ss -tlnH` ({count} listeners)"),
            &portwatch,
            &ss,
            Goal::AtMost(1.5),
        )?
        .detail(format!(
            "medians: portwatch {portwatch_ms:.0} ms until ready (every namespace listed and \
             merged; owners and options follow, shown as pending), ss {ss_ms:.0} ms (one \
             namespace, no owners)"
        )),
        Row::ratio(
            format!("snapshot: portwatch with owners / `ss -tlnpH` ({count} listeners)"),
            &complete,
            &with_owners,
            Goal::None,
        )?
        .detail(format!(
            "medians: portwatch {complete_ms:.0} ms until owners and SO_REUSE* options are \
             read, ss with owners {ss_owners_ms:.0} ms"
        )),
    ])
}

/// What the daemon says its start-up listing and merge took (what ready
/// waits for), and reading that listing's owners and options after, in
/// seconds. [`BenchDaemon::start`] waited for both.
pub(super) fn startup_seconds(daemon: &BenchDaemon) -> Result<(f64, f64)> {
    let ready = startup_snapshot_seconds(daemon)?;
    let owners = daemon.metric("portwatch_snapshot_duration_seconds", &["kind=\"owners\""])?;
    if owners <= 0.0 {
        bail!("the daemon reports no portwatch_snapshot_duration_seconds{{kind=\"owners\"}}");
    }
    Ok((ready, owners))
}

/// What the daemon says its start-up listing and merge took, in seconds.
pub(super) fn startup_snapshot_seconds(daemon: &BenchDaemon) -> Result<f64> {
    let seconds = daemon.metric("portwatch_snapshot_duration_seconds", &["kind=\"startup\""])?;
    if seconds <= 0.0 {
        bail!("the daemon reports no portwatch_snapshot_duration_seconds{{kind=\"startup\"}}");
    }
    Ok(seconds)
}

/// Where listener number `index` of a holder listens: `PORTS_PER_ADDRESS`
/// consecutive ports from [`FIRST_PORT`] on 127.0.0.1, then on 127.0.0.2...
/// Explicit ports make every run open the same sockets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    count: u32,
}

impl Layout {
    pub fn new(count: u32) -> Result<Layout> {
        let most = ADDRESSES * PORTS_PER_ADDRESS;
        if count == 0 || count > most {
            bail!("a listener count from 1 to {most}, not {count}");
        }
        Ok(Layout { count })
    }

    pub fn endpoint(self, index: u32) -> SocketAddrV4 {
        let address = Ipv4Addr::new(127, 0, 0, 1 + (index / PORTS_PER_ADDRESS) as u8);
        SocketAddrV4::new(address, FIRST_PORT + (index % PORTS_PER_ADDRESS) as u16)
    }

    /// The ports that have at least one listener.
    pub fn ports(self) -> Range<u16> {
        FIRST_PORT..FIRST_PORT + self.count.min(PORTS_PER_ADDRESS) as u16
    }

    /// How many listeners `port` has (one per address it is open on).
    pub fn listeners_on(self, port: u16) -> u32 {
        if !self.ports().contains(&port) {
            return 0;
        }
        let offset = u32::from(port - FIRST_PORT);
        let full = self.count / PORTS_PER_ADDRESS;
        full + u32::from(offset < self.count % PORTS_PER_ADDRESS)
    }

    /// Whether `address` is one of the addresses listened on.
    pub fn has_address(self, address: Ipv4Addr) -> bool {
        let [a, b, c, d] = address.octets();
        let addresses = self.count.div_ceil(PORTS_PER_ADDRESS);
        (a, b, c) == (127, 0, 0) && (1..=addresses).contains(&u32::from(d))
    }
}

/// `count` listeners held by a `bench-worker hold-listeners` process in its
/// own network namespace, until this is dropped.
pub struct Listeners {
    child: Child,
    /// The worker that owns the namespace.
    pid: u32,
    layout: Layout,
}

impl Listeners {
    pub fn hold(ctx: &Ctx, count: u32) -> Result<Listeners> {
        let layout = Layout::new(count)?;
        println!("  opening {count} TCP listeners in a private network namespace");
        let started = Instant::now();
        let mut child = Worker::command(ctx, &["hold-listeners", &count.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting bench-worker hold-listeners")?;
        let line = read_ready_line(&mut child, "bench-worker hold-listeners")?;
        let pid = line
            .split_whitespace()
            .nth(1)
            .and_then(|pid| pid.parse().ok())
            .with_context(|| format!("bench-worker hold-listeners said {line:?}"))?;
        println!("  listening after {} ms", started.elapsed().as_millis());
        Ok(Listeners { child, pid, layout })
    }

    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// Runs `ss <flags>` in the holder's namespace, draining its output:
    /// how long it took, in seconds. Fails unless it listed every listener.
    fn time_ss(&self, flags: &str) -> Result<f64> {
        let netns = format!("--net=/proc/{}/ns/net", self.pid);
        let started = Instant::now();
        let mut child = Command::new("nsenter")
            .args([netns.as_str(), "ss", flags])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .context("running nsenter ... ss")?;
        let mut stdout = child.stdout.take().context("no stdout pipe")?;
        let mut lines = 0;
        let mut buffer = [0; 64 * 1024];
        loop {
            let read = stdout.read(&mut buffer).context("reading ss's output")?;
            if read == 0 {
                break;
            }
            lines += buffer[..read].iter().filter(|&&byte| byte == b'\n').count();
        }
        let status = child.wait()?;
        let took = started.elapsed().as_secs_f64();
        if !status.success() {
            bail!("nsenter {netns} ss {flags} failed ({status})");
        }
        if lines != self.layout.count as usize {
            bail!(
                "ss {flags} listed {lines} sockets in the bench namespace, not {}",
                self.layout.count
            );
        }
        Ok(took)
    }

    /// Fails unless the daemon's map has every listener: its count of IPv4
    /// TCP listeners (`portwatch_listeners_by_protocol`, which the
    /// machine's own few listeners add to; the per-port series leave out
    /// the ephemeral range, where most of the bench's ports are).
    pub fn check_seen_by(&self, daemon: &BenchDaemon) -> Result<()> {
        let seen = tcp4_listeners(&daemon.metrics()?);
        if seen < u64::from(self.layout.count) {
            bail!(
                "the daemon's map has {seen} IPv4 TCP listeners on ports {:?}, not {}",
                self.layout.ports(),
                self.layout.count
            );
        }
        Ok(())
    }
}

impl Drop for Listeners {
    fn drop(&mut self) {
        // A closed stdin tells the holder to close everything and exit.
        release_holder(&mut self.child, "the listener holder");
    }
}

/// Closes a holder's stdin, which tells it to close everything and exit,
/// and waits up to 30 s for it to, then kills it (`what`, for the message).
pub(super) fn release_holder(child: &mut Child, what: &str) {
    drop(child.stdin.take());
    let deadline = Instant::now() + Duration::from_secs(30);
    while matches!(child.try_wait(), Ok(None)) {
        if Instant::now() > deadline {
            eprintln!("bench: {what} did not exit; killing it");
            let _ = child.kill();
            let _ = child.wait();
            return;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// `portwatch_listeners_by_protocol{family="ipv4",protocol="tcp"}`, 0 if absent.
fn tcp4_listeners(metrics: &str) -> u64 {
    metrics
        .lines()
        .filter_map(|line| line.strip_prefix("portwatch_listeners_by_protocol{"))
        .filter(|line| line.contains("family=\"ipv4\"") && line.contains("protocol=\"tcp\""))
        .filter_map(|line| line.rsplit_once(' ')?.1.parse::<f64>().ok())
        .map(|value| value as u64)
        .sum()
}

/// Waits for `child`'s first line of output, which must start with
/// `ready`, for at most [`READY_TIMEOUT`]. A child that fails first has
/// said why on its (inherited) stderr.
pub(super) fn read_ready_line(child: &mut Child, what: &str) -> Result<String> {
    let stdout = child.stdout.take().context("no stdout pipe")?;
    let (sender, receiver) = mpsc::channel();
    thread::spawn(move || {
        let mut line = String::new();
        let read = BufReader::new(stdout).read_line(&mut line).map(|_| line);
        // The receiver may have given up.
        let _ = sender.send(read);
    });
    match receiver.recv_timeout(READY_TIMEOUT) {
        Ok(Ok(line)) if line.starts_with("ready") => Ok(line.trim().to_owned()),
        Ok(Ok(line)) if !line.is_empty() => bail!("{what} said {line:?} instead of ready"),
        Ok(read) => {
            let status = child.wait()?;
            let how = read.err().map(|err| format!(": {err}")).unwrap_or_default();
            bail!("{what} exited ({status}) before it was ready{how}")
        }
        Err(_) => {
            child.kill()?;
            child.wait()?;
            bail!("{what} was not ready within {READY_TIMEOUT:?}")
        }
    }
}

/// `bench-worker hold-listeners <count>`: makes a network namespace, opens
/// `count` listeners in it (see [`Layout`]) through as many
/// `hold-listeners --part <first> <count>` processes as the descriptor
/// limit needs, prints `ready <pid> <count>` and holds them until stdin
/// closes or [`HOLD_LIMIT`] passes.
pub fn worker(args: &[String]) -> Result<()> {
    let number = |text: &String| {
        text.parse::<u32>()
            .with_context(|| format!("hold-listeners: {text:?} is not a count"))
    };
    match args {
        [count] => hold_in_new_netns(Layout::new(number(count)?)?),
        [flag, first, count] if flag == "--part" => {
            let (first, count) = (number(first)?, number(count)?);
            let layout = Layout::new(first.saturating_add(count))?;
            hold_part(layout, first..first + count)
        }
        _ => bail!("usage: bench-worker hold-listeners <count>"),
    }
}

fn hold_in_new_netns(layout: Layout) -> Result<()> {
    // SAFETY: unshare(2) moves only this process into a new namespace.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        bail!("unshare(CLONE_NEWNET): {}", io::Error::last_os_error());
    }
    cmd::run_unannounced(Command::new("ip").args(["link", "set", "lo", "up"]))?;
    let per_process = raise_fd_limit(layout.count)?;
    // Each part inherits this namespace and closes its listeners when its
    // stdin (held here) closes, including when this process dies.
    let mut parts = Vec::new();
    for (first, count) in split(layout.count, per_process) {
        let (first, count) = (first.to_string(), count.to_string());
        let part = Worker::nested(&["hold-listeners", "--part", &first, &count])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting a hold-listeners part")?;
        parts.push(part);
    }
    for part in &mut parts {
        read_ready_line(part, "a hold-listeners part")?;
    }
    let mut stdout = io::stdout();
    writeln!(stdout, "ready {} {}", std::process::id(), layout.count)?;
    stdout.flush()?;
    wait_for_stdin_to_close(HOLD_LIMIT)?;
    for part in &mut parts {
        drop(part.stdin.take());
    }
    for part in &mut parts {
        part.wait()?;
    }
    Ok(())
}

/// Opens listeners `indices` of `layout` in the current namespace.
fn hold_part(layout: Layout, indices: Range<u32>) -> Result<()> {
    let mut held = Vec::with_capacity(indices.len());
    for index in indices {
        let endpoint = layout.endpoint(index);
        let listener = tcp_socket(endpoint, Some(BACKLOG))
            .with_context(|| format!("listening on {endpoint}"))?;
        held.push(listener);
    }
    let mut stdout = io::stdout();
    writeln!(stdout, "ready {}", held.len())?;
    stdout.flush()?;
    wait_for_stdin_to_close(HOLD_LIMIT)?;
    drop(held);
    Ok(())
}

/// Raises RLIMIT_NOFILE (inherited by the parts) as far as allowed: to
/// `listeners` plus a reserve if the hard limit and `fs.nr_open` allow,
/// else to the hard limit. Returns how many listeners one process may hold.
fn raise_fd_limit(listeners: u32) -> Result<u32> {
    let nr_open: u64 = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .context("reading /proc/sys/fs/nr_open")?
        .trim()
        .parse()
        .context("parsing /proc/sys/fs/nr_open")?;
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit(2) writes the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        bail!("getrlimit(RLIMIT_NOFILE): {}", io::Error::last_os_error());
    }
    let wanted = (u64::from(listeners) + FD_RESERVE).min(nr_open);
    let raised = libc::rlimit {
        rlim_cur: wanted,
        rlim_max: wanted.max(limit.rlim_max),
    };
    // SAFETY: setrlimit(2) reads the struct it is given.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
        limit = raised;
    } else {
        // Past the hard limit needs CAP_SYS_RESOURCE: use what we may.
        limit.rlim_cur = limit.rlim_max;
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
            bail!("setrlimit(RLIMIT_NOFILE): {}", io::Error::last_os_error());
        }
    }
    let per_process = limit.rlim_cur.saturating_sub(FD_RESERVE);
    if per_process == 0 {
        bail!(
            "the descriptor limit ({}) leaves no room for listeners",
            limit.rlim_cur
        );
    }
    Ok(u32::try_from(per_process).unwrap_or(u32::MAX))
}

/// `count` listeners in runs of at most `per_process`: (first, count) each.
fn split(count: u32, per_process: u32) -> Vec<(u32, u32)> {
    (0..count)
        .step_by(per_process as usize)
        .map(|first| (first, per_process.min(count - first)))
        .collect()
}

/// Returns once stdin reaches end of file (or fails), or after `limit`.
pub(super) fn wait_for_stdin_to_close(limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    let mut stdin = io::stdin().lock();
    let mut buffer = [0; 256];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            eprintln!("bench-worker: held for {limit:?}; closing");
            return Ok(());
        }
        let mut poll = libc::pollfd {
            fd: libc::STDIN_FILENO,
            events: libc::POLLIN,
            revents: 0,
        };
        let timeout = i32::try_from(left.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: poll(2) on one pollfd we own.
        let ready = unsafe { libc::poll(&mut poll, 1, timeout) };
        if ready < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            bail!("poll(stdin): {err}");
        }
        if ready > 0 && matches!(stdin.read(&mut buffer), Ok(0) | Err(_)) {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listeners_fill_fifty_thousand_ports_per_address() {
        let layout = Layout::new(125_000).unwrap();
        assert_eq!(layout.endpoint(0).to_string(), "127.0.0.1:10000");
        assert_eq!(layout.endpoint(49_999).to_string(), "127.0.0.1:59999");
        assert_eq!(layout.endpoint(50_000).to_string(), "127.0.0.2:10000");
        assert_eq!(layout.endpoint(124_999).to_string(), "127.0.0.3:34999");
        assert_eq!(layout.ports(), 10_000..60_000);
        assert_eq!(layout.listeners_on(10_000), 3);
        assert_eq!(layout.listeners_on(34_999), 3);
        assert_eq!(layout.listeners_on(35_000), 2);
        assert_eq!(layout.listeners_on(9_999), 0);
        assert_eq!(layout.listeners_on(60_000), 0);
        assert!(layout.has_address(Ipv4Addr::new(127, 0, 0, 3)));
        assert!(!layout.has_address(Ipv4Addr::new(127, 0, 0, 4)));
        assert!(!layout.has_address(Ipv4Addr::new(10, 0, 0, 1)));
    }

    #[test]
    fn every_endpoint_is_distinct() {
        let layout = Layout::new(100_000).unwrap();
        let endpoints: std::collections::HashSet<_> =
            (0..100_000).map(|index| layout.endpoint(index)).collect();
        assert_eq!(endpoints.len(), 100_000);
        let small = Layout::new(7).unwrap();
        assert_eq!(small.ports(), 10_000..10_007);
        assert_eq!(small.listeners_on(10_006), 1);
    }

    #[test]
    fn counts_out_of_range_are_refused() {
        assert!(Layout::new(0).is_err());
        assert!(Layout::new(ADDRESSES * PORTS_PER_ADDRESS).is_ok());
        let err = Layout::new(ADDRESSES * PORTS_PER_ADDRESS + 1).unwrap_err();
        assert!(err.to_string().contains("12700000"), "{err}");
    }

    #[test]
    fn parts_cover_every_listener_once() {
        assert_eq!(split(100_000, 19_936).len(), 6);
        assert_eq!(
            split(45_000, 20_000),
            [(0, 20_000), (20_000, 20_000), (40_000, 5_000)]
        );
        assert_eq!(split(10, 20_000), [(0, 10)]);
    }

    #[test]
    fn ipv4_tcp_listeners_are_read_from_their_total() {
        let text = "\
# TYPE portwatch_listeners_by_protocol gauge
portwatch_listeners_by_protocol{family=\"ipv4\",protocol=\"tcp\"} 23
portwatch_listeners_by_protocol{family=\"ipv6\",protocol=\"tcp\"} 1
portwatch_listeners_by_protocol{family=\"ipv4\",protocol=\"udp\"} 1
portwatch_listeners{family=\"ipv4\",port=\"22\",protocol=\"tcp\"} 1
";
        assert_eq!(tcp4_listeners(text), 23);
        assert_eq!(tcp4_listeners(""), 0);
    }
}
