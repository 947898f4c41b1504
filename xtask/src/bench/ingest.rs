//! Figure 3, ingest: the highest bind rate the daemon absorbs with no record
//! lost, on this machine, and what happens above it.
//!
//! The load is `bench-worker bind-storm THREADS BINDS RATE`: threads doing
//! socket + bind 127.0.0.1:0 + close, paced to RATE binds/s in all (0: as
//! fast as they can). Each bind makes two records (the bind from post_bind,
//! the close from sock_release), and the daemon applies both to its map.
//!
//! The search offers a rising rate, one fresh daemon per step, until the
//! daemon drops records or the load generator cannot go faster (it shares
//! the two cores with the daemon), then bisects between the last clean rate
//! and the first lossy one. Above capacity, a daemon with the smallest ring
//! buffer (4 KiB) takes an unpaced storm and must still account for every
//! bind: seen + dropped = issued, exactly, or the bench fails. Every step is
//! checked the same way.

use std::{
    fmt::Write as _,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use super::{
    BenchDaemon, Ctx, Goal, Row, Stats, Worker, bindpath,
    rig::{output_field, worker_arg},
};

/// A paced thread sleeps only when it is this far ahead of its schedule, so
/// that pacing costs no more than a clock read per bind.
const PACE_SLACK: Duration = Duration::from_millis(1);

/// The smallest ring buffer the daemon accepts, for the overflow run.
const SMALLEST_RING: u32 = 4096;

/// How the search proceeds.
struct Plan {
    /// The first offered rate, binds/s.
    start: f64,
    /// Each clean step offers this many times the previous rate.
    factor: f64,
    /// Seconds of load per paced step.
    seconds: f64,
    /// Binds in an unpaced step.
    unpaced_binds: u64,
    /// Bisection steps after the first lossy one.
    refinements: usize,
}

/// A rate to offer.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Offer {
    Paced(f64),
    Unpaced,
}

/// What one step measured.
#[derive(Clone, Copy, Debug)]
struct Step {
    offer: Offer,
    /// binds/s actually issued.
    achieved: f64,
    issued: u64,
    dropped: u64,
}

impl Step {
    /// The rate the step stands for: what was asked, or for an unpaced step
    /// what was reached.
    fn rate(&self) -> f64 {
        match self.offer {
            Offer::Paced(rate) => rate,
            Offer::Unpaced => self.achieved,
        }
    }
}

/// The next rate to offer after `steps`, or `None` when the search is over.
///
/// While nothing was dropped the rate rises by `factor`; once the generator
/// falls short of the offered rate by more than 10% (it cannot go faster),
/// one unpaced step finds its ceiling. After the first lossy step, up to
/// `refinements` steps bisect between the highest clean and lowest lossy
/// rates, while they are more than 10% apart.
fn next_offer(steps: &[Step], plan: &Plan) -> Option<Offer> {
    let Some(last) = steps.last() else {
        return Some(Offer::Paced(plan.start));
    };
    if let Some(first_lossy) = steps.iter().position(|step| step.dropped > 0) {
        let refined = steps.len() - 1 - first_lossy;
        let clean = steps
            .iter()
            .filter(|step| step.dropped == 0)
            .map(Step::rate)
            .fold(0.0, f64::max);
        let lossy = steps
            .iter()
            .filter(|step| step.dropped > 0)
            .map(Step::rate)
            .fold(f64::INFINITY, f64::min);
        return (refined < plan.refinements && lossy > clean * 1.1)
            .then_some(Offer::Paced((clean + lossy) / 2.0));
    }
    match last.offer {
        Offer::Unpaced => None,
        Offer::Paced(rate) if last.achieved < rate * 0.9 => Some(Offer::Unpaced),
        Offer::Paced(rate) => Some(Offer::Paced(rate * plan.factor)),
    }
}

/// The highest issued rate with nothing dropped, if any step was clean.
fn highest_clean(steps: &[Step]) -> Option<f64> {
    steps
        .iter()
        .filter(|step| step.dropped == 0)
        .map(|step| step.achieved)
        .reduce(f64::max)
}

pub fn run(ctx: &Ctx) -> Result<Vec<Row>> {
    let threads = thread::available_parallelism().map_or(2, usize::from);
    let plan = ctx.pick(
        Plan {
            start: 50_000.0,
            factor: 1.5,
            seconds: 2.0,
            unpaced_binds: 600_000,
            refinements: 2,
        },
        Plan {
            start: 100_000.0,
            factor: 2.0,
            seconds: 0.5,
            unpaced_binds: 100_000,
            refinements: 0,
        },
    );
    println!(
        "ingest: stepping the offered rate up from {} binds/s, {threads} threads, {} s per step",
        plan.start, plan.seconds
    );
    let mut steps = Vec::new();
    while let Some(offer) = next_offer(&steps, &plan) {
        let step = storm(ctx, threads, offer, &plan, "")?;
        println!(
            "  offered {}: issued {} binds at {:.0}/s, dropped {}",
            offer_text(offer),
            step.issued,
            step.achieved,
            step.dropped
        );
        steps.push(step);
    }

    let ring = format!("ring_size = {SMALLEST_RING}");
    let overflow = storm(ctx, threads, Offer::Unpaced, &plan, &ring)?;
    println!(
        "  overflow, {SMALLEST_RING}-byte ring: issued {} binds at {:.0}/s, dropped {}",
        overflow.issued, overflow.achieved, overflow.dropped
    );
    if overflow.dropped == 0 {
        bail!(
            "a {SMALLEST_RING}-byte ring dropped nothing under {:.0} binds/s: the overflow path was not exercised",
            overflow.achieved
        );
    }

    let mut detail = String::new();
    let limit = match steps.last() {
        Some(step) if step.dropped == 0 => {
            "no drops even unpaced: the load generator, sharing the CPUs with the daemon, is the limit"
        }
        _ => "above it the daemon drops records",
    };
    let _ = write!(detail, "{limit}. Steps (offered → issued/s, dropped):");
    for step in &steps {
        let _ = write!(
            detail,
            " {} → {:.0}, {};",
            offer_text(step.offer),
            step.achieved,
            step.dropped
        );
    }
    detail.push_str(" seen + dropped = issued at every step");
    let clean = highest_clean(&steps).unwrap_or(0.0);
    let seen = overflow.issued - overflow.dropped;
    Ok(vec![
        Row::new(
            "ingest: highest bind rate with 0 drops",
            "binds/s",
            Stats::of(vec![clean])?,
            Goal::AtLeast(200_000.0),
        )
        .detail(detail),
        Row::new(
            "ingest: above capacity (4 KiB ring, unpaced)",
            "% dropped",
            Stats::of(vec![
                100.0 * overflow.dropped as f64 / overflow.issued as f64,
            ])?,
            Goal::None,
        )
        .detail(format!(
            "{} binds issued at {:.0}/s: {seen} seen + {} dropped = {} issued, exact",
            overflow.issued, overflow.achieved, overflow.dropped, overflow.issued
        )),
    ])
}

fn offer_text(offer: Offer) -> String {
    match offer {
        Offer::Paced(rate) => format!("{rate:.0}/s"),
        Offer::Unpaced => "unpaced".to_owned(),
    }
}

/// One step: a fresh daemon (with `extra` configuration), one storm, the
/// daemon's settled counts, checked against what the workers issued.
fn storm(ctx: &Ctx, threads: usize, offer: Offer, plan: &Plan, extra: &str) -> Result<Step> {
    let (binds, rate) = match offer {
        Offer::Paced(rate) => ((rate * plan.seconds) as u64, rate),
        Offer::Unpaced => (plan.unpaced_binds, 0.0),
    };
    let daemon = BenchDaemon::start(ctx, extra)?;
    let output = Worker::run(
        ctx,
        &[
            "bind-storm",
            &threads.to_string(),
            &binds.to_string(),
            &format!("{rate:.0}"),
        ],
    )?;
    let issued = output_field(&output, "issued")? as u64;
    let achieved = output_field(&output, "rate")?;
    let counts = daemon.settled_bind_counts(issued)?;
    counts
        .check(issued)
        .with_context(|| format!("the daemon under {} binds/s", offer_text(offer)))?;
    daemon.stop()?;
    Ok(Step {
        offer,
        achieved,
        issued,
        dropped: counts.dropped,
    })
}

/// `bench-worker bind-storm THREADS BINDS RATE`: BINDS cycles of socket +
/// bind 127.0.0.1:0 + close spread over THREADS threads, paced to RATE
/// binds/s in all (0: unpaced). Prints `issued <binds> rate <binds/s>`.
pub fn worker(args: &[String]) -> Result<()> {
    let threads: u64 = worker_arg(args, 0, "threads")?;
    let binds: u64 = worker_arg(args, 1, "binds")?;
    let rate: f64 = worker_arg(args, 2, "binds/s, 0 for unpaced")?;
    if threads == 0 || !rate.is_finite() || rate < 0.0 {
        bail!("bind-storm needs at least one thread and a rate of 0 or more binds/s");
    }
    let started = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|index| {
            let share = binds / threads + u64::from(index < binds % threads);
            thread::spawn(move || paced_binds(share, rate / threads as f64))
        })
        .collect();
    for handle in handles {
        handle
            .join()
            .map_err(|_| anyhow::anyhow!("a bind-storm thread panicked"))??;
    }
    let elapsed = started.elapsed().as_secs_f64();
    println!("issued {binds} rate {:.1}", binds as f64 / elapsed);
    Ok(())
}

/// `count` bind cycles at `rate` per second (0: as fast as possible).
fn paced_binds(count: u64, rate: f64) -> Result<()> {
    let started = Instant::now();
    for done in 0..count {
        if rate > 0.0 {
            let due = started + Duration::from_secs_f64(done as f64 / rate);
            let now = Instant::now();
            if due > now + PACE_SLACK {
                thread::sleep(due - now);
            }
        }
        bindpath::bind_cycle(false).context("socket+bind+close")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const PLAN: Plan = Plan {
        start: 100.0,
        factor: 2.0,
        seconds: 1.0,
        unpaced_binds: 1000,
        refinements: 1,
    };

    fn step(offer: Offer, achieved: f64, dropped: u64) -> Step {
        Step {
            offer,
            achieved,
            issued: 1000,
            dropped,
        }
    }

    #[test]
    fn the_rate_rises_until_the_generator_falls_short_then_goes_unpaced() {
        assert_eq!(next_offer(&[], &PLAN), Some(Offer::Paced(100.0)));
        let mut steps = vec![step(Offer::Paced(100.0), 99.0, 0)];
        assert_eq!(next_offer(&steps, &PLAN), Some(Offer::Paced(200.0)));
        steps.push(step(Offer::Paced(200.0), 150.0, 0));
        assert_eq!(next_offer(&steps, &PLAN), Some(Offer::Unpaced));
        steps.push(step(Offer::Unpaced, 160.0, 0));
        assert_eq!(next_offer(&steps, &PLAN), None);
        assert_eq!(highest_clean(&steps), Some(160.0));
    }

    #[test]
    fn a_lossy_step_is_bisected_then_the_search_ends() {
        let mut steps = vec![
            step(Offer::Paced(100.0), 100.0, 0),
            step(Offer::Paced(200.0), 198.0, 5),
        ];
        assert_eq!(next_offer(&steps, &PLAN), Some(Offer::Paced(150.0)));
        steps.push(step(Offer::Paced(150.0), 149.0, 0));
        assert_eq!(next_offer(&steps, &PLAN), None, "one refinement only");
        assert_eq!(highest_clean(&steps), Some(149.0));
    }

    #[test]
    fn close_bounds_need_no_bisection_and_an_unpaced_loss_counts_its_rate() {
        let steps = [
            step(Offer::Paced(100.0), 100.0, 0),
            step(Offer::Unpaced, 105.0, 9),
        ];
        assert_eq!(next_offer(&steps, &PLAN), None);
        let all_lossy = [step(Offer::Paced(100.0), 100.0, 1)];
        assert_eq!(highest_clean(&all_lossy), None);
        assert_eq!(next_offer(&all_lossy, &PLAN), Some(Offer::Paced(50.0)));
    }
}
