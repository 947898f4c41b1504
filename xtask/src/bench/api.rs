//! Figure 5: the HTTP API under load with 100k listeners in the map:
//! `GET /ports/{p}` latency (p50, p99) and rate measured by wrk on
//! loopback, and the daemon's resident memory afterwards.
//!
//! The listeners come from the same holder as the snapshot figure
//! ([`super::snapshot::Listeners`]). One daemon serves every round; before
//! the load, one GET checks that the answer really lists the port's
//! listeners, and a wrk run that saw errors or non-2xx answers fails the
//! figure instead of reporting a fast error path.
//!
//! Then the same load, as many times, on `GET /livez`, which answers "ok"
//! without touching the map: the tail any request has on this machine
//! under that load. It runs after the rounds, which must stay in step with
//! the reconciliations (see [`slow_growth_row`]).

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    os::fd::AsRawFd as _,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

use super::{BenchDaemon, Ctx, Goal, Row, Stats, snapshot::Listeners};

/// wrk's threads and connections: the two cores, a few requests in flight
/// on each.
const WRK_THREADS: u32 = 2;
const WRK_CONNECTIONS: u32 = 16;

/// Slow readers of the two big answers during the second wrk run of each
/// round: each reads 1 KiB every [`SLOW_READ_EVERY`] through a 4 KiB
/// receive buffer.
const SLOW_READERS: usize = 32;
const SLOW_READ_EVERY: Duration = Duration::from_millis(10);

/// `cargo xtask bench --only API`.
pub fn run(ctx: &Ctx) -> Result<Vec<Row>> {
    let count = ctx.pick(100_000, 10_000);
    let seconds = ctx.pick(10, 3);
    let listeners = Listeners::hold(ctx, count)?;
    let daemon = BenchDaemon::start(ctx, "")?;
    listeners.check_seen_by(&daemon)?;
    let port = listeners.layout().ports().start;
    let path = format!("/ports/{port}");
    check_answer(&daemon, &listeners, port)?;
    let page_kib = daemon.get("/ports")?.1.len() as f64 / 1024.0;
    let metrics_kib = daemon.metrics()?.len() as f64 / 1024.0;

    let url = format!("http://{}{path}", daemon.addr());
    let (mut p50, mut p99, mut rate, mut rss) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut slow_p99, mut slow_growth, mut slow_answers) = (Vec::new(), Vec::new(), 0);
    let livez_url = format!("http://{}/livez", daemon.addr());
    let (mut livez_p99, mut livez_requests) = (Vec::new(), 0);
    let mut growth_reconciling = Vec::new();
    let mut requests = 0;
    let mib = |bytes: u64| bytes as f64 / f64::from(1 << 20);
    for round in 1..=ctx.rounds() {
        let reconciled_before = daemon.metric("portwatch_reconciliations_total", &[])?;
        let plain_before = daemon.rss_bytes()?;
        let plain_peak = PeakRss::watch(daemon.pid());
        let run = wrk(&url, seconds)?;
        let plain_growth = mib(plain_peak.stop().saturating_sub(plain_before));
        let resident = mib(daemon.rss_bytes()?);
        println!(
            "  round {round}/{}: p50 {:.3} ms, p99 {:.3} ms, {:.0} req/s, RSS {resident:.1} MiB",
            ctx.rounds(),
            run.p50_ms,
            run.p99_ms,
            run.requests_per_second
        );
        p50.push(run.p50_ms);
        p99.push(run.p99_ms);
        rate.push(run.requests_per_second);
        rss.push(resident);
        requests += run.requests;

        let before = daemon.rss_bytes()?;
        let readers = SlowReaders::start(daemon.addr());
        let peak = PeakRss::watch(daemon.pid());
        let run = wrk(&url, seconds)?;
        let peak = peak.stop();
        let answers = readers.stop()?;
        let growth = mib(peak.saturating_sub(before));
        // The readers' own cost: the growth of the run with them less that
        // of the same load without them, in the same round. A
        // reconciliation lists every socket again (a transient that is not
        // the readers'): a round it fell in is reported apart.
        let extra = growth - plain_growth;
        let reconciled = daemon.metric("portwatch_reconciliations_total", &[])? > reconciled_before;
        println!(
            "  round {round}/{}, {SLOW_READERS} slow readers of /ports and /metrics: p99 {:.3} ms, RSS +{growth:.1} MiB at most (+{plain_growth:.1} without them){}, {answers} answers read whole",
            ctx.rounds(),
            run.p99_ms,
            if reconciled {
                " (a reconciliation ran)"
            } else {
                ""
            },
        );
        slow_p99.push(run.p99_ms);
        if reconciled {
            growth_reconciling.push(extra);
        } else {
            slow_growth.push(extra);
        }
        slow_answers += answers;
    }
    // Apart from the rounds, which compare RSS over two runs in step with
    // the reconciliations.
    for round in 1..=ctx.rounds() {
        let livez = wrk(&livez_url, seconds)?;
        println!(
            "  round {round}/{}, GET /livez: p50 {:.3} ms, p99 {:.3} ms, {:.0} req/s",
            ctx.rounds(),
            livez.p50_ms,
            livez.p99_ms,
            livez.requests_per_second
        );
        livez_p99.push(livez.p99_ms);
        livez_requests += livez.requests;
    }
    let reconcile = daemon.metric(
        "portwatch_snapshot_duration_seconds",
        &["kind=\"reconcile\""],
    )?;
    daemon.stop()?;

    let load = format!(
        "wrk -t{WRK_THREADS} -c{WRK_CONNECTIONS} -d{seconds}s on loopback; listeners on the \
         port: {}; {requests} requests, no errors",
        listeners.layout().listeners_on(port)
    );
    let reconciled = if reconcile > 0.0 {
        format!("; the latest reconciliation took {:.0} ms", reconcile * 1e3)
    } else {
        String::new()
    };
    let figure = |what: &str| format!("API: `GET /ports/{{p}}` {what} ({count} listeners)");
    Ok(vec![
        Row::new(figure("p50"), "ms", Stats::of(p50)?, Goal::None).detail(load.clone()),
        Row::new(figure("p99"), "ms", Stats::of(p99)?, Goal::AtMost(2.0)).detail(load.clone()),
        Row::new(
            figure("rate"),
            "req/s",
            Stats::of(rate)?,
            Goal::AtLeast(20_000.0),
        )
        .detail(load),
        Row::new(
            format!("API: `GET /livez` p99, the same load ({count} listeners)"),
            "ms",
            Stats::of(livez_p99)?,
            Goal::None,
        )
        .detail(format!(
            "the same wrk load, {} runs after the rounds above, on an endpoint that answers \
             \"ok\" without touching the map: the tail any request has here, at a higher \
             request rate ({livez_requests} requests, no errors)",
            ctx.rounds()
        )),
        Row::new(
            format!("API: daemon RSS ({count} listeners)"),
            "MiB",
            Stats::of(rss)?,
            Goal::AtMost(64.0),
        )
        .detail(format!("VmRSS after each wrk round{reconciled}")),
        Row::new(
            figure(&format!("p99 with {SLOW_READERS} slow readers")),
            "ms",
            Stats::of(slow_p99)?,
            Goal::AtMost(2.0),
        )
        .detail(format!(
            "a second wrk run per round (same load) while {SLOW_READERS} clients read `GET /ports` (the default page) and `GET /metrics` by turns, 1 KiB every {} ms through a 4 KiB receive buffer ({slow_answers} answers read whole in all; the page is {page_kib:.0} KiB, /metrics {metrics_kib:.0} KiB)",
            SLOW_READ_EVERY.as_millis()
        )),
        slow_growth_row(count, slow_growth, &growth_reconciling)?,
    ])
}

/// How far the readers raised the daemon's RSS: over the rounds no
/// reconciliation ran in (all rounds when every one had one), the others
/// named in the detail.
fn slow_growth_row(count: u32, quiet: Vec<f64>, reconciling: &[f64]) -> Result<Row> {
    let how = "how far the daemon's highest VmRSS (sampled every 50 ms) rose above where it was at the start of the run with the readers, less the same for the run without them in that round";
    let list = |growths: &[f64]| {
        growths
            .iter()
            .map(|g| format!("{g:.1}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let (samples, detail) = if quiet.is_empty() {
        (
            reconciling.to_vec(),
            format!("{how}; a reconciliation (a listing of every socket) ran in every round"),
        )
    } else if reconciling.is_empty() {
        (quiet, format!("{how}; no reconciliation ran in any round"))
    } else {
        (
            quiet,
            format!(
                "{how}, in the rounds no reconciliation ran in; in the {} rounds one did (it lists every socket again): {} MiB",
                reconciling.len(),
                list(reconciling)
            ),
        )
    };
    Ok(Row::new(
        format!("API: RSS growth with {SLOW_READERS} slow readers ({count} listeners)"),
        "MiB",
        Stats::of(samples)?,
        Goal::AtMost(16.0),
    )
    .detail(detail))
}

/// Clients that ask for `/ports` and `/metrics` by turns and read the
/// answers slowly, until stopped.
struct SlowReaders {
    stop: Arc<AtomicBool>,
    answers: Arc<AtomicU64>,
    threads: Vec<thread::JoinHandle<Result<()>>>,
}

impl SlowReaders {
    fn start(addr: SocketAddr) -> SlowReaders {
        let stop = Arc::new(AtomicBool::new(false));
        let answers = Arc::new(AtomicU64::new(0));
        let threads = (0..SLOW_READERS)
            .map(|i| {
                let (stop, answers) = (stop.clone(), answers.clone());
                thread::spawn(move || {
                    let mut paths = ["/ports", "/metrics"].into_iter().cycle().skip(i % 2);
                    while !stop.load(Ordering::Relaxed) {
                        let path = paths.next().unwrap_or("/ports");
                        if read_slowly(addr, path, &stop)? {
                            answers.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        SlowReaders {
            stop,
            answers,
            threads,
        }
    }

    /// Stops them; how many answers they read whole.
    fn stop(self) -> Result<u64> {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads {
            thread
                .join()
                .map_err(|_| anyhow::anyhow!("a slow reader panicked"))??;
        }
        Ok(self.answers.load(Ordering::Relaxed))
    }
}

/// One request on a fresh connection, read 1 KiB at a time; true when the
/// whole answer was read before `stop`. Fails on an answer that is not 200.
fn read_slowly(addr: SocketAddr, path: &str, stop: &AtomicBool) -> Result<bool> {
    let mut stream = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    let small: libc::c_int = 4096;
    // SAFETY: setsockopt on a socket we own, with a c_int option value.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&raw const small).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut chunk = [0u8; 1024];
    let mut first = true;
    loop {
        if stop.load(Ordering::Relaxed) {
            return Ok(false);
        }
        let n = match stream.read(&mut chunk) {
            Ok(n) => n,
            // The daemon cuts off a client too slow for it: its defence,
            // not a failed measurement.
            Err(err) if !first && err.kind() == std::io::ErrorKind::ConnectionReset => {
                return Ok(false);
            }
            Err(err) => return Err(err).with_context(|| format!("reading GET {path}")),
        };
        if n == 0 {
            return Ok(!first);
        }
        if first {
            if !chunk[..n].starts_with(b"HTTP/1.1 200") {
                bail!(
                    "GET {path} answered {}",
                    String::from_utf8_lossy(&chunk[..n.min(80)])
                );
            }
            first = false;
        }
        thread::sleep(SLOW_READ_EVERY);
    }
}

/// The highest VmRSS of a process, sampled on a thread until stopped.
struct PeakRss {
    stop: Arc<AtomicBool>,
    thread: thread::JoinHandle<u64>,
}

impl PeakRss {
    fn watch(pid: u32) -> PeakRss {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = thread::spawn(move || {
            let mut peak = 0;
            while !flag.load(Ordering::Relaxed) {
                peak = peak.max(super::rig::rss_of(pid).unwrap_or(0));
                thread::sleep(Duration::from_millis(50));
            }
            peak
        });
        PeakRss { stop, thread }
    }

    fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or(0)
    }
}

/// Fails unless `GET /ports/{port}` answers 200 and lists every bench
/// listener on that port.
fn check_answer(daemon: &BenchDaemon, listeners: &Listeners, port: u16) -> Result<()> {
    let (status, body) = daemon.get(&format!("/ports/{port}"))?;
    if status != 200 {
        bail!("GET /ports/{port} answered {status}: {body}");
    }
    let answer: serde_json::Value =
        serde_json::from_str(&body).with_context(|| format!("GET /ports/{port}: {body}"))?;
    let layout = listeners.layout();
    let listed = answer["listeners"]
        .as_array()
        .with_context(|| format!("GET /ports/{port} has no listeners list: {body}"))?
        .iter()
        .filter(|listener| {
            listener["port"] == port
                && listener["protocol"] == "tcp"
                && listener["address"]
                    .as_str()
                    .and_then(|address| address.parse::<Ipv4Addr>().ok())
                    .is_some_and(|address| layout.has_address(address))
        })
        .count();
    let expected = layout.listeners_on(port) as usize;
    if listed < expected {
        bail!("GET /ports/{port} lists {listed} of the bench's {expected} listeners: {body}");
    }
    Ok(())
}

/// What one wrk run reported.
#[derive(Debug, PartialEq)]
struct WrkRun {
    p50_ms: f64,
    p99_ms: f64,
    requests_per_second: f64,
    requests: u64,
}

fn wrk(url: &str, seconds: u32) -> Result<WrkRun> {
    let out = Command::new("wrk")
        .arg(format!("-t{WRK_THREADS}"))
        .arg(format!("-c{WRK_CONNECTIONS}"))
        .arg(format!("-d{seconds}s"))
        .args(["--latency", url])
        .output()
        .context("running wrk (installed by `cargo xtask setup`)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "wrk failed ({}): {}{}",
            out.status,
            text,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    parse_wrk(&text).with_context(|| format!("reading wrk's report:\n{text}"))
}

/// Reads wrk's `--latency` report; fails on any socket error or non-2xx
/// answer, or a report without the numbers.
fn parse_wrk(text: &str) -> Result<WrkRun> {
    let mut p50 = None;
    let mut p99 = None;
    let mut rate = None;
    let mut requests = None;
    for line in text.lines().map(str::trim) {
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some("50%"), Some(latency)) => p50 = Some(latency_ms(latency)?),
            (Some("99%"), Some(latency)) => p99 = Some(latency_ms(latency)?),
            (Some("Requests/sec:"), Some(value)) => {
                rate = Some(value.parse::<f64>().context("Requests/sec")?);
            }
            (Some(n), Some("requests")) => requests = Some(n.parse::<u64>().context("requests")?),
            _ => {}
        }
        if let Some(errors) = line.strip_prefix("Socket errors:") {
            bail!("wrk saw socket errors:{errors}");
        }
        if let Some(answers) = line.strip_prefix("Non-2xx or 3xx responses:") {
            bail!("{} answers were not 2xx or 3xx", answers.trim());
        }
    }
    let (Some(p50_ms), Some(p99_ms), Some(requests_per_second), Some(requests)) =
        (p50, p99, rate, requests)
    else {
        bail!("no 50%, 99%, Requests/sec or request count in wrk's report");
    };
    if requests == 0 {
        bail!("wrk made no requests");
    }
    Ok(WrkRun {
        p50_ms,
        p99_ms,
        requests_per_second,
        requests,
    })
}

/// One of wrk's latencies (`812.00us`, `1.20ms`, `2.00s`, `1.50m`), in ms.
fn latency_ms(text: &str) -> Result<f64> {
    let split = text
        .find(|c: char| c.is_ascii_alphabetic())
        .with_context(|| format!("no unit in latency {text:?}"))?;
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .with_context(|| format!("latency {text:?}"))?;
    // Dividing by an exact 1000 keeps "468.00us" exactly 0.468.
    Ok(match unit {
        "us" => number / 1e3,
        "ms" => number,
        "s" => number * 1e3,
        "m" => number * 60e3,
        "h" => number * 3600e3,
        _ => bail!("unknown unit in latency {text:?}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const REPORT: &str = "\
Running 3s test @ http://127.0.0.1:41234/ports/20000
  2 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   520.11us  301.40us   9.87ms   91.20%
    Req/Sec    15.62k     1.01k   17.80k    70.00%
  Latency Distribution
     50%  468.00us
     75%  590.00us
     90%  750.00us
     99%    1.62ms
  93221 requests in 3.00s, 181.33MB read
Requests/sec:  31073.67
Transfer/sec:     60.44MB
";

    #[test]
    fn a_clean_report_gives_its_numbers() {
        assert_eq!(
            parse_wrk(REPORT).unwrap(),
            WrkRun {
                p50_ms: 0.468,
                p99_ms: 1.62,
                requests_per_second: 31073.67,
                requests: 93221,
            }
        );
    }

    #[test]
    fn errors_and_bad_answers_fail_the_run() {
        let errors = REPORT.replace(
            "Requests/sec",
            "  Socket errors: connect 0, read 2, write 0, timeout 0\nRequests/sec",
        );
        let err = parse_wrk(&errors).unwrap_err().to_string();
        assert!(err.contains("read 2"), "{err}");
        let answers = REPORT.replace(
            "Requests/sec",
            "  Non-2xx or 3xx responses: 93221\nRequests/sec",
        );
        let err = parse_wrk(&answers).unwrap_err().to_string();
        assert!(err.contains("93221"), "{err}");
        let truncated = REPORT.replace("     99%    1.62ms\n", "");
        assert!(parse_wrk(&truncated).is_err());
        assert!(parse_wrk("").is_err());
    }

    #[test]
    fn latencies_are_read_in_every_unit() {
        assert_eq!(latency_ms("250.00us").unwrap(), 0.25);
        assert_eq!(latency_ms("1.62ms").unwrap(), 1.62);
        assert_eq!(latency_ms("2.00s").unwrap(), 2000.0);
        assert_eq!(latency_ms("1.50m").unwrap(), 90_000.0);
        for bad in ["12", "ms", "1.0xs", "-"] {
            assert!(latency_ms(bad).is_err(), "{bad}");
        }
    }
}
