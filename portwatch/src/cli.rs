//! Command-line arguments.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::capture::{DEFAULT_RING_BYTES, OutcomeChoice};

/// Version and git revision, as `--version` prints them.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("PORTWATCH_REVISION"),
    ")"
);

/// Who is bound to a port, who tried to bind and failed, and why.
#[derive(Debug, Parser)]
#[command(name = "portwatch", version = VERSION, about)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

/// How log lines look.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Stream bind, listen and close events as they happen, like bindsnoop
    /// (needs root, or CAP_BPF + CAP_PERFMON + CAP_NET_ADMIN).
    Trace(TraceArgs),
}

#[derive(Debug, Args)]
pub struct TraceArgs {
    /// One JSON object per line instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Only events for this port (requested or bound).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    pub port: Option<u16>,
    /// Only events from this process id.
    #[arg(long)]
    pub pid: Option<u32>,
    /// Only failed binds and listens.
    #[arg(long)]
    pub failures_only: bool,
    /// Watch this cgroup (v2) subtree instead of the whole machine.
    #[arg(long, value_name = "PATH")]
    pub cgroup: Option<PathBuf>,
    /// Ring buffer size in bytes: a power of two, at least 4096.
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_RING_BYTES)]
    pub ring_size: u32,
    /// How bind/listen outcomes are captured: `auto` probes for fexit and
    /// falls back to the syscall tracepoints.
    #[arg(long, value_enum, default_value_t = OutcomeChoice::Auto)]
    pub outcome: OutcomeChoice,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn arguments_are_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn trace_flags_parse() {
        let cli = Cli::try_parse_from([
            "portwatch",
            "trace",
            "--json",
            "--port",
            "8080",
            "--pid",
            "42",
            "--failures-only",
        ])
        .unwrap();
        let Command::Trace(args) = cli.command;
        assert!(args.json && args.failures_only);
        assert_eq!((args.port, args.pid), (Some(8080), Some(42)));
        assert_eq!(args.ring_size, DEFAULT_RING_BYTES);
    }

    #[test]
    fn bad_ports_are_refused() {
        for port in ["0", "65536", "abc", "-1"] {
            let arg = format!("--port={port}");
            let err = Cli::try_parse_from(["portwatch", "trace", arg.as_str()]).unwrap_err();
            assert_eq!(
                err.kind(),
                clap::error::ErrorKind::ValueValidation,
                "port {port}"
            );
        }
    }
}
