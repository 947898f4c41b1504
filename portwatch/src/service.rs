//! systemd integration for `Type=notify` units (sd_notify(3)): READY=1 once
//! the programs are attached and the snapshot is merged, a STATUS= line
//! saying what is watched, watchdog pings while the pipeline makes progress
//! (when the unit sets `WatchdogSec=`), and STOPPING=1 on the way out.
//! Outside systemd (no `NOTIFY_SOCKET`) every call does nothing.

use std::time::Duration;

use sd_notify::NotifyState;

use crate::{
    health::ListingFailure,
    state::State,
    watch::{Heartbeat, SharedState},
};

/// How often STATUS= is refreshed when no watchdog asks for more (each
/// refresh wakes the daemon).
const STATUS_EVERY: Duration = Duration::from_secs(30);

/// Tells systemd the daemon is ready, with its first status line.
pub fn ready(state: &SharedState) {
    let status = status_line(&read(state));
    send(&[NotifyState::Ready, NotifyState::Status(&status)]);
}

/// Tells systemd the daemon is stopping.
pub fn stopping() {
    send(&[
        NotifyState::Stopping,
        NotifyState::Status("stopping: detaching the programs"),
    ]);
}

/// Until `stop` resolves: refreshes STATUS= and, when the unit has a
/// watchdog, pings it at half its interval as long as the pipeline is not
/// stuck in one step for that long. A stuck pipeline stops the pings, and
/// systemd restarts the daemon (`Restart=on-failure`).
pub async fn supervise(
    state: SharedState,
    heartbeat: std::sync::Arc<Heartbeat>,
    stop: impl Future<Output = ()>,
) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        // Not under systemd: nobody to tell, and no timer to wake for.
        return;
    }
    let mut usec = 0;
    let watchdog =
        sd_notify::watchdog_enabled(false, &mut usec).then(|| Duration::from_micros(usec));
    let period = watchdog.map_or(STATUS_EVERY, |interval| (interval / 2).min(STATUS_EVERY));
    let mut withheld = false;
    tokio::pin!(stop);
    loop {
        tokio::select! {
            () = tokio::time::sleep(period) => {}
            () = &mut stop => return,
        }
        let status = status_line(&read(&state));
        let stuck = heartbeat.stuck_for();
        match watchdog {
            Some(interval) if stuck >= interval / 2 => {
                if !withheld {
                    tracing::error!(stuck_for = ?stuck, "the pipeline is stuck; withholding watchdog pings");
                }
                withheld = true;
                send(&[NotifyState::Status(&format!(
                    "stuck for {}s: {status}",
                    stuck.as_secs()
                ))]);
            }
            Some(_) => {
                withheld = false;
                send(&[NotifyState::Watchdog, NotifyState::Status(&status)]);
            }
            None => send(&[NotifyState::Status(&status)]),
        }
    }
}

/// What `systemctl status portwatch` shows on its Status: line.
pub fn status_line(state: &State) -> String {
    let mut listeners = 0;
    let mut ports = std::collections::BTreeSet::new();
    for entry in state.map.listeners() {
        listeners += 1;
        ports.insert(entry.facts.port);
    }
    let failures: u64 = state.counters.bind_failures.values().sum();
    let degraded = state
        .listing
        .as_ref()
        .map(ListingFailure::status_suffix)
        .unwrap_or_default();
    format!(
        "watching {listeners} listeners on {} ports; {failures} failed binds, {} events dropped{degraded}",
        ports.len(),
        state.stats.dropped
    )
}

fn read(state: &SharedState) -> std::sync::RwLockReadGuard<'_, State> {
    state
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Sends `states`; a failure is logged, never fatal (the unit's timeouts
/// decide what a missing message means).
fn send(states: &[NotifyState]) {
    if let Err(err) = sd_notify::notify(false, states) {
        tracing::warn!(error = %err, "cannot notify systemd");
    }
}

#[cfg(test)]
mod tests {
    use std::{
        net::{IpAddr, Ipv4Addr},
        time::SystemTime,
    };

    use super::*;
    use crate::event::{Errno, EventKind, PortEvent, Protocol};

    #[test]
    fn the_status_line_counts_listeners_ports_failures_and_drops() {
        let mut state = State::new(10, 10);
        assert_eq!(
            status_line(&state),
            "watching 0 listeners on 0 ports; 0 failed binds, 0 events dropped"
        );
        let any = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
        for (cookie, port) in [(1, 8000), (2, 8000), (3, 53)] {
            let event = PortEvent::example(EventKind::Bind, Protocol::Udp, any, port, cookie);
            state.map.apply(&event, SystemTime::UNIX_EPOCH);
        }
        let failed = PortEvent {
            errno: Some(Errno::EADDRINUSE),
            ..PortEvent::example(EventKind::BindFailed, Protocol::Tcp, any, 53, 4)
        };
        state.counters.count(&failed);
        state.stats.dropped = 7;
        assert_eq!(
            status_line(&state),
            "watching 3 listeners on 2 ports; 1 failed binds, 7 events dropped"
        );
        state.listing = Some(ListingFailure {
            error: "the kernel refused the udp ipv4 sock_diag dump".into(),
            missing_modules: vec!["udp_diag"],
        });
        assert_eq!(
            status_line(&state),
            "watching 3 listeners on 2 ports; 1 failed binds, 7 events dropped; degraded: no sock_diag listing (load udp_diag)"
        );
    }
}
