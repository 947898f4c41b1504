//! The kernel stamps records with CLOCK_BOOTTIME; users read wall-clock
//! time. The only I/O of this module: two clocks read.

use std::time::{Duration, SystemTime};

/// Converts CLOCK_BOOTTIME timestamps (what the kernel records) to wall-clock
/// time, with the offset between the two clocks taken once.
///
/// Boot time keeps counting through suspend, so the offset stays right until
/// someone sets the wall clock; take a new one then.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootClock {
    /// CLOCK_REALTIME minus CLOCK_BOOTTIME, in nanoseconds.
    offset_ns: i128,
}

impl BootClock {
    /// Reads CLOCK_REALTIME and CLOCK_BOOTTIME now.
    ///
    /// # Panics
    ///
    /// If `clock_gettime` fails, which it only does for a clock the kernel
    /// lacks (CLOCK_BOOTTIME is older than every kernel portwatch loads on).
    pub fn now() -> Self {
        // Boot time read on both sides of the wall clock, halving the error
        // a preemption between the two reads would add.
        let before = clock_ns(libc::CLOCK_BOOTTIME);
        let real = clock_ns(libc::CLOCK_REALTIME);
        let after = clock_ns(libc::CLOCK_BOOTTIME);
        Self::from_offset_ns(real - (before + after) / 2)
    }

    /// A clock with a fixed offset (wall time minus boot time, nanoseconds).
    pub const fn from_offset_ns(offset_ns: i128) -> Self {
        Self { offset_ns }
    }

    /// The wall-clock time of a CLOCK_BOOTTIME timestamp. Saturates at the
    /// Unix epoch and at the largest time `SystemTime` holds, which only
    /// nonsense timestamps reach.
    pub fn to_system_time(&self, boot_ns: u64) -> SystemTime {
        let wall_ns = i128::from(boot_ns) + self.offset_ns;
        let Ok(wall_ns) = u128::try_from(wall_ns) else {
            return SystemTime::UNIX_EPOCH;
        };
        let secs = u64::try_from(wall_ns / 1_000_000_000).unwrap_or(u64::MAX);
        // The remainder is below 1e9, so it fits.
        let nanos = (wall_ns % 1_000_000_000) as u32;
        let since_epoch = Duration::new(secs, nanos);
        SystemTime::UNIX_EPOCH
            .checked_add(since_epoch)
            .unwrap_or_else(|| largest_system_time(since_epoch))
    }
}

/// The latest `SystemTime` not after `UNIX_EPOCH + want`, found by halving.
fn largest_system_time(want: Duration) -> SystemTime {
    let (mut good, mut bad) = (Duration::ZERO, want);
    while bad - good > Duration::from_secs(1) {
        let mid = good + (bad - good) / 2;
        if SystemTime::UNIX_EPOCH.checked_add(mid).is_some() {
            good = mid;
        } else {
            bad = mid;
        }
    }
    SystemTime::UNIX_EPOCH + good
}

/// CLOCK_BOOTTIME now, in nanoseconds: the clock of the kernel's records.
pub fn boot_ns_now() -> u64 {
    u64::try_from(clock_ns(libc::CLOCK_BOOTTIME)).unwrap_or(0)
}

/// Reads one clock, in nanoseconds.
pub(super) fn clock_ns(clock: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
    let rc = unsafe { libc::clock_gettime(clock, &mut ts) };
    assert_eq!(
        rc,
        0,
        "clock_gettime({clock}) failed: {}",
        std::io::Error::last_os_error()
    );
    i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
}
