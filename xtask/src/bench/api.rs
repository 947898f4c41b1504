//! Figure 5: the HTTP API under load with 100k listeners in the map:
//! `GET /ports/{p}` latency (p50, p99) and rate measured by wrk on
//! loopback, and the daemon's resident memory afterwards.
//!
//! The listeners come from the same holder as the snapshot figure
//! ([`super::snapshot::Listeners`]). One daemon serves every round; before
//! the load, one GET checks that the answer really lists the port's
//! listeners, and a wrk run that saw errors or non-2xx answers fails the
//! figure instead of reporting a fast error path.

use std::{net::Ipv4Addr, process::Command};

use anyhow::{Context as _, Result, bail};

use super::{BenchDaemon, Ctx, Goal, Row, Stats, snapshot::Listeners};

/// wrk's threads and connections: the two cores, a few requests in flight
/// on each.
const WRK_THREADS: u32 = 2;
const WRK_CONNECTIONS: u32 = 16;

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

    let url = format!("http://{}{path}", daemon.addr());
    let (mut p50, mut p99, mut rate, mut rss) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut requests = 0;
    for round in 1..=ctx.rounds() {
        let run = wrk(&url, seconds)?;
        let resident = daemon.rss_bytes()? as f64 / f64::from(1 << 20);
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
            format!("API: daemon RSS ({count} listeners)"),
            "MiB",
            Stats::of(rss)?,
            Goal::AtMost(64.0),
        )
        .detail(format!("VmRSS after each wrk round{reconciled}")),
    ])
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
