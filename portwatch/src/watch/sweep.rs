//! Where outcomes are inferred: the sweep of `PENDING_BIND` that reports
//! the failed binds whose thread did nothing after them (see
//! [`SWEEP_EVERY`]).

use std::time::{Duration, Instant};

use super::Watcher;
use crate::{
    capture::OutcomePath,
    event::{EventKind, PortEvent},
};

impl Watcher {
    /// Where outcomes are inferred, every [`SWEEP_EVERY`]: the binds a thread
    /// parked and never came back for (it exited, another thread closed the
    /// socket, or it waits on something else) are failures; they join
    /// `events`. The kernel's own copy of one of them, from a thread that
    /// came back just then, is dropped.
    pub(super) fn sweep_parked_binds(&mut self, events: &mut Vec<PortEvent>) {
        let mut swept = Vec::new();
        let inferred = self.capture.outcome_path() == OutcomePath::Inferred;
        if inferred && !events.is_empty() {
            self.records_since_sweep = true;
            // Binds come again: back to the short interval at once.
            self.sweep_every = SWEEP_EVERY;
            self.next_sweep = self.next_sweep.min(Instant::now() + SWEEP_EVERY);
        }
        if inferred && Instant::now() >= self.next_sweep {
            swept = self.capture.sweep_parked_binds(SWEEP_AGE);
            let busy = self.records_since_sweep || !swept.is_empty();
            self.sweep_every = sweep_interval(self.sweep_every, busy);
            self.next_sweep = Instant::now() + self.sweep_every;
            self.records_since_sweep = false;
            // A copy from an earlier sweep has come by now: the kernel sends
            // it as it removes the entry, a sweep ago.
            self.swept = swept.iter().map(|e| (e.tid, e.boot_ns)).collect();
        }
        if !self.swept.is_empty() {
            events.retain(|e| {
                !(e.kind == EventKind::BindFailed && self.swept.contains(&(e.tid, e.boot_ns)))
            });
        }
        events.append(&mut swept);
    }
}

/// Where outcomes are inferred: how often `PENDING_BIND` is swept while
/// records come, and how long a bind must have been parked to be taken. A
/// bind returns within microseconds, so one parked for a second failed
/// (post_bind would have sent a success). A failed bind whose thread does
/// nothing else is reported within `SWEEP_AGE + SWEEP_EVERY` on a host
/// where sockets come and go; on one at rest the interval doubles after
/// each sweep that follows no record and finds nothing, up to
/// [`SWEEP_AT_REST`], so the sweep adds 1/30 wakeups per second there, not
/// 1/5, and such a failure waits up to 31 s.
pub(super) const SWEEP_EVERY: Duration = Duration::from_secs(5);
const SWEEP_AT_REST: Duration = Duration::from_secs(30);
const SWEEP_AGE: Duration = Duration::from_secs(1);

/// The interval to the next sweep of `PENDING_BIND`, after one `every`
/// after the last: the short one while records come or the sweep found
/// something, else twice the last, up to [`SWEEP_AT_REST`].
fn sweep_interval(every: Duration, busy: bool) -> Duration {
    if busy {
        SWEEP_EVERY
    } else {
        (every * 2).min(SWEEP_AT_REST)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sweep_backs_off_at_rest_and_returns_with_records() {
        let mut every = SWEEP_EVERY;
        let mut waits = Vec::new();
        for _ in 0..5 {
            every = sweep_interval(every, false);
            waits.push(every.as_secs());
        }
        assert_eq!(waits, [10, 20, 30, 30, 30]);
        assert_eq!(sweep_interval(SWEEP_AT_REST, true), SWEEP_EVERY);
    }
}
