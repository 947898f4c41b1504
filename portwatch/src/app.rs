//! What each command does: the I/O around the pure modules.

use std::io::{self, BufRead as _, Write};

use tokio::signal::unix::{SignalKind, signal};

use crate::{
    capture::{Capture, CaptureConfig, CaptureError, system::EnvError},
    cli::{DaemonArgs, HashPasswordArgs, TraceArgs},
    config::{Config, ConfigError, DEFAULT_CONFIG_PATH, Overrides},
    daemon::{self, DaemonError},
    event::BootClock,
    trace::{self, SocketBook, TraceFilter},
    watch::WatchError,
};

/// Why a command stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// Capture could not start or read.
    #[error(transparent)]
    Capture(#[from] CaptureError),
    /// Writing the output failed (other than the reader going away).
    #[error("writing output: {0}")]
    Output(#[source] io::Error),
    /// Installing a signal handler failed.
    #[error("installing the signal handler: {0}")]
    Signal(#[source] io::Error),
    /// The daemon's configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The daemon stopped with an error.
    #[error(transparent)]
    Daemon(#[from] DaemonError),
    /// `hash-password` could not read or hash the password.
    #[error("hashing the password: {0}")]
    Password(#[source] io::Error),
}

/// How a failed command ends the process, so that a supervisor can tell a
/// failure a restart may fix from one it cannot (the unit restarts only on
/// [`Exit::Failure`], a crash or the watchdog). The values follow
/// `sysexits.h`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Exit {
    /// Anything else, which may pass: restart.
    Failure = 1,
    /// The kernel lacks what portwatch needs (BTF, cgroup2, a tracepoint
    /// layout it reads): EX_UNAVAILABLE.
    Unsupported = 69,
    /// Missing privileges (a capability, tracefs access): EX_NOPERM.
    NoPermission = 77,
    /// The configuration (file, environment, flags) is wrong: EX_CONFIG.
    Config = 78,
}

impl AppError {
    /// The exit status for this error.
    pub fn exit(&self) -> Exit {
        match self {
            AppError::Config(_) | AppError::Daemon(DaemonError::Config(_)) => Exit::Config,
            AppError::Capture(err) => capture_exit(err),
            AppError::Daemon(DaemonError::Watch(WatchError::Capture(err))) => capture_exit(err),
            // A taken port may free up (the old process still closing),
            // and an address may not be up yet early at boot: restart. A
            // port below 1024 needs a privilege the unit does not grant.
            AppError::Daemon(DaemonError::Listen { source, .. }) => match source.kind() {
                io::ErrorKind::PermissionDenied => Exit::NoPermission,
                _ => Exit::Failure,
            },
            AppError::Output(_)
            | AppError::Signal(_)
            | AppError::Password(_)
            | AppError::Daemon(
                DaemonError::Watch(_)
                | DaemonError::Metrics(_)
                | DaemonError::Signal(_)
                | DaemonError::Pipeline(_),
            ) => Exit::Failure,
        }
    }
}

fn capture_exit(err: &CaptureError) -> Exit {
    match err {
        CaptureError::Env(EnvError::MissingCapability(_) | EnvError::TracefsDenied) => {
            Exit::NoPermission
        }
        CaptureError::Env(EnvError::NoBtf | EnvError::NoCgroup2)
        | CaptureError::TracepointFormat { .. } => Exit::Unsupported,
        CaptureError::Env(EnvError::NotACgroup(_)) | CaptureError::RingSize(_) => Exit::Config,
        CaptureError::Env(EnvError::NoTracefs(_) | EnvError::Read { .. })
        | CaptureError::Btf(_)
        | CaptureError::Load(_)
        | CaptureError::Program { .. }
        | CaptureError::Map { .. }
        | CaptureError::Open { .. }
        | CaptureError::Ring(_) => Exit::Failure,
    }
}

/// The daemon's configuration: file, then environment, then flags.
pub fn daemon_config(args: &DaemonArgs) -> Result<Config, ConfigError> {
    let (path, required) = match &args.config {
        Some(path) => (path.clone(), true),
        None => (DEFAULT_CONFIG_PATH.into(), false),
    };
    let flags = Overrides {
        listen: args.listen,
        metrics_listen: args.metrics_listen,
        cgroup: args.cgroup.clone(),
        web_config: args.web_config.clone(),
        metrics_web_config: args.metrics_web_config.clone(),
    };
    Config::load(&path, required)?
        .apply_env(|name| std::env::var(name).ok())?
        .apply_flags(&flags)
}

/// `portwatch hash-password`: the first line of stdin, hashed.
pub fn hash_password(args: &HashPasswordArgs) -> Result<(), AppError> {
    let password = read_password().map_err(AppError::Password)?;
    // bcrypt reads 72 bytes: a longer password's tail would not count.
    if password.is_empty() || password.len() > 72 {
        return Err(AppError::Password(io::Error::new(
            io::ErrorKind::InvalidInput,
            "a password of 1 to 72 bytes (bcrypt ignores the rest)",
        )));
    }
    let hash = bcrypt::hash(&password, args.cost)
        .map_err(|err| AppError::Password(io::Error::other(err)))?;
    writeln!(io::stdout(), "{hash}").map_err(AppError::Output)
}

/// The first line of stdin; on a terminal, asked for with echo off.
fn read_password() -> io::Result<String> {
    use std::io::IsTerminal as _;

    use nix::sys::termios::{LocalFlags, SetArg, tcgetattr, tcsetattr};

    let stdin = io::stdin();
    let mut line = String::new();
    if stdin.is_terminal() {
        eprint!("Password: ");
        let before = tcgetattr(&stdin)?;
        let mut quiet = before.clone();
        quiet.local_flags.remove(LocalFlags::ECHO);
        tcsetattr(&stdin, SetArg::TCSANOW, &quiet)?;
        let read = stdin.lock().read_line(&mut line);
        tcsetattr(&stdin, SetArg::TCSANOW, &before)?;
        eprintln!();
        read?;
    } else {
        stdin.lock().read_line(&mut line)?;
    }
    Ok(line.trim_end_matches(['\n', '\r']).to_owned())
}

/// `portwatch daemon`.
pub async fn daemon(args: DaemonArgs) -> Result<(), AppError> {
    let config = daemon_config(&args)?;
    if args.check_config {
        let api_web = config.api_web()?;
        println!(
            "portwatch: configuration ok (listen {} over {}{}, metrics_listen {}, reconcile every {:?})",
            config.listen,
            api_web.describe(),
            if config.api_is_remote() && !api_web.authenticates() {
                " and no authentication, as allow_unauthenticated_remote says"
            } else {
                ""
            },
            match config.metrics_listen {
                Some(addr) => format!("{addr} over {}", config.metrics_web()?.describe()),
                None => "none".to_owned(),
            },
            config.reconcile_interval
        );
        return Ok(());
    }
    daemon::run(config).await?;
    Ok(())
}

/// `portwatch trace`: streams events until SIGINT/SIGTERM or until stdout
/// closes.
pub async fn trace(args: TraceArgs) -> Result<(), AppError> {
    let config = CaptureConfig {
        cgroup: args.cgroup.clone(),
        ring_bytes: args.ring_size,
        outcome: args.outcome,
        options: args.socket_options,
        // Map capacities are daemon settings; a trace uses the defaults.
        ..CaptureConfig::default()
    };
    let mut capture = Capture::start(&config)?;
    let filter = TraceFilter {
        port: args.port,
        pid: args.pid,
        failures_only: args.failures_only,
    };
    let clock = BootClock::now();
    let mut book = SocketBook::default();
    let mut interrupt = signal(SignalKind::interrupt()).map_err(AppError::Signal)?;
    let mut terminate = signal(SignalKind::terminate()).map_err(AppError::Signal)?;
    let mut drop_check = tokio::time::interval(std::time::Duration::from_secs(1));
    let mut dropped_before = 0;

    eprintln!(
        "portwatch: tracing binds in cgroup {} (outcomes via {}, socket options via {}, port allocation via {}); Ctrl-C to stop",
        capture.cgroup().display(),
        capture.outcome_path().name(),
        capture.options_path().name(),
        capture.port_alloc_path().name()
    );
    let stdout = io::stdout();
    let mut out = io::BufWriter::new(stdout.lock());
    if !args.json {
        writeln!(out, "{}", trace::header()).map_err(AppError::Output)?;
        out.flush().map_err(AppError::Output)?;
    }
    let result = loop {
        let mut lines = Vec::new();
        tokio::select! {
            read = capture.read(|mut event| {
                book.observe(&mut event);
                if filter.matches(&event) {
                    lines.push(if args.json {
                        trace::json_line(&event, &clock)
                    } else {
                        trace::text_line(&event, &clock)
                    });
                }
            }) => read?,
            _ = drop_check.tick() => {
                dropped_before = report_drops(&capture, dropped_before);
            }
            _ = interrupt.recv() => break Ok(()),
            _ = terminate.recv() => break Ok(()),
        }
        match write_lines(&mut out, &lines) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::BrokenPipe => break Ok(()),
            Err(err) => break Err(AppError::Output(err)),
        }
    };
    report_drops(&capture, dropped_before);
    let decode_errors = capture.stats().decode_errors;
    if decode_errors > 0 {
        eprintln!("portwatch: {decode_errors} kernel records did not decode and were skipped");
    }
    result
}

fn write_lines(out: &mut impl Write, lines: &[String]) -> io::Result<()> {
    for line in lines {
        writeln!(out, "{line}")?;
    }
    out.flush()
}

/// Prints how many records the kernel lost since the last report; returns the
/// new total.
fn report_drops(capture: &Capture, before: u64) -> u64 {
    match capture.drops() {
        Ok(drops) => {
            let total: u64 = drops.iter().map(|(_, n)| n).sum();
            if total > before {
                let per_hook: Vec<String> = drops
                    .iter()
                    .filter(|(_, n)| *n > 0)
                    .map(|(hook, n)| format!("{hook}={n}"))
                    .collect();
                eprintln!(
                    "portwatch: {} records lost in the kernel (ring buffer full), total {total}: {}",
                    total - before,
                    per_hook.join(" ")
                );
            }
            total
        }
        Err(err) => {
            tracing::warn!(error = %err, "reading drop counters");
            before
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listen_error_restarts_unless_a_privilege_is_missing() {
        let listen = |kind| {
            AppError::Daemon(DaemonError::Listen {
                addr: "127.0.0.1:1".parse().unwrap(),
                source: io::Error::from(kind),
            })
            .exit()
        };
        assert_eq!(listen(io::ErrorKind::AddrInUse), Exit::Failure);
        assert_eq!(listen(io::ErrorKind::AddrNotAvailable), Exit::Failure);
        assert_eq!(listen(io::ErrorKind::PermissionDenied), Exit::NoPermission);
    }
}
