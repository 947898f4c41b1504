//! Command-line arguments.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::capture::{DEFAULT_RING_BYTES, OptionsChoice, OutcomeChoice};

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
    /// Run the daemon: the live port map, its HTTP API and metrics (needs root).
    #[command(after_help = "Exit status: 0 after SIGTERM or SIGINT; 78 for a bad \
configuration (file, environment, flags, --check-config); 77 for missing privileges; 69 when \
the kernel lacks what portwatch needs (BTF, cgroup2); 1 for anything else, which a restart \
may fix; 2 for a bad command line.")]
    Daemon(DaemonArgs),
    /// Who listens on which port, like `ss -tuln` with owners and sharing.
    Ports(PortsArgs),
    /// In plain sentences: who is on PORT, why they coexist, where
    /// `localhost:PORT` goes, and recent failures with their blockers.
    Explain(ExplainArgs),
    /// Recent failed binds and listens, newest first, with what blocked them.
    Failures(FailuresArgs),
    /// Each network namespace's ephemeral port range: how many ports each
    /// destination may still use, the busiest destinations, and what takes
    /// ports from the range.
    Ephemeral(EphemeralArgs),
    /// Follow bind, listen, close and failure events live.
    Watch(WatchArgs),
    /// Would this bind succeed? Exit code 0 yes, 1 no, 2 error.
    Check(CheckArgs),
    /// Print the bcrypt hash of a password for basic_auth_users in a
    /// web_config, like `htpasswd -nB`: the password is read from stdin (its
    /// first line), without echo on a terminal.
    HashPassword(HashPasswordArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff), e.g. `portwatch man > portwatch.1`.
    Man,
}

#[derive(Debug, Args)]
pub struct DaemonArgs {
    /// Configuration file (TOML). Default /etc/portwatch/portwatch.toml;
    /// a missing default file means the built-in defaults.
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Validate the configuration (file, environment, flags) and exit.
    #[arg(long)]
    pub check_config: bool,
    /// HTTP address of the API (default 127.0.0.1:7464; beyond loopback only with authentication in --web-config, or allow_unauthenticated_remote = true).
    #[arg(long, value_name = "ADDR:PORT")]
    pub listen: Option<std::net::SocketAddr>,
    /// A second address serving only /metrics, /livez and /readyz.
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Watch this cgroup (v2) subtree instead of the whole machine.
    #[arg(long, value_name = "PATH")]
    pub cgroup: Option<PathBuf>,
    /// TLS, client certificates and basic-auth users for both listeners: a
    /// web.yml in exporter-toolkit's format, as node_exporter reads it.
    #[arg(long, value_name = "PATH")]
    pub web_config: Option<PathBuf>,
    /// The same for --metrics-listen alone (default: --web-config).
    #[arg(long, value_name = "PATH")]
    pub metrics_web_config: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct HashPasswordArgs {
    /// bcrypt's cost: each step doubles the time a check takes, for the
    /// daemon and for anyone guessing (4 to 31).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(4..=31))]
    pub cost: u32,
}

/// Which network namespace or pod a client command is about.
#[derive(Debug, Default, Args)]
pub struct ScopeArgs {
    /// Only this network namespace: its cookie (`netns` in `-o json`, and in
    /// `explain`), or `host`.
    #[arg(long, value_name = "COOKIE|host")]
    pub netns: Option<String>,
    /// Only the listeners of this Kubernetes pod: NAME, or NAMESPACE/NAME.
    #[arg(long, value_name = "[NAMESPACE/]NAME")]
    pub pod: Option<String>,
}

/// Where the client finds the daemon, and how it proves who it is.
#[derive(Debug, Args)]
pub struct ServerArgs {
    /// The daemon's URL: `http://`, or `https://` when it serves TLS. HTTP
    /// basic auth credentials come from the environment (see --help).
    ///
    /// The credentials are never a flag (which `ps` would show):
    /// PORTWATCH_USER with PORTWATCH_PASSWORD, or with
    /// PORTWATCH_PASSWORD_FILE, a file whose first line is the password (a
    /// systemd credential, a Kubernetes secret). They are sent with every
    /// request.
    #[arg(long, global = true, env = "PORTWATCH_SERVER", default_value = DEFAULT_SERVER)]
    pub server: String,
    /// PEM CA certificate(s) the daemon's certificate must chain to, for an
    /// `https://` server, instead of the public web PKI roots.
    #[arg(long, global = true, env = "PORTWATCH_CA_CERT", value_name = "PATH")]
    pub ca_cert: Option<PathBuf>,
    /// PEM certificate chain for mutual TLS, when the daemon asks clients
    /// for a certificate; its key is --client-key.
    #[arg(
        long,
        global = true,
        env = "PORTWATCH_CLIENT_CERT",
        value_name = "PATH",
        requires = "client_key"
    )]
    pub client_cert: Option<PathBuf>,
    /// PEM private key of --client-cert (not encrypted).
    #[arg(
        long,
        global = true,
        env = "PORTWATCH_CLIENT_KEY",
        value_name = "PATH",
        requires = "client_cert"
    )]
    pub client_key: Option<PathBuf>,
}

/// The daemon's default address, as a URL.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:7464";

/// Output format of the client commands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// An aligned table (or sentences, for `explain`).
    Table,
    /// The API's JSON, as it came.
    Json,
}

#[derive(Debug, Args)]
pub struct PortsArgs {
    /// Only this port.
    #[arg(value_parser = clap::value_parser!(u16).range(1..))]
    pub port: Option<u16>,
    #[command(flatten)]
    pub scope: ScopeArgs,
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    #[command(flatten)]
    pub server: ServerArgs,
}

#[derive(Debug, Args)]
pub struct ExplainArgs {
    #[arg(value_parser = clap::value_parser!(u16).range(1..))]
    pub port: u16,
    /// Every network namespace with a listener on the port, not only the
    /// host's and those where something is shared or failed.
    #[arg(long)]
    pub all: bool,
    #[command(flatten)]
    pub scope: ScopeArgs,
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    #[command(flatten)]
    pub server: ServerArgs,
}

#[derive(Debug, Args)]
pub struct FailuresArgs {
    /// Only failures on this port.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    pub port: Option<u16>,
    /// Only failures with this errno (EADDRINUSE, EACCES, ...).
    #[arg(long)]
    pub errno: Option<String>,
    /// Only failures of this Kubernetes pod: NAME, or NAMESPACE/NAME.
    #[arg(long, value_name = "[NAMESPACE/]NAME")]
    pub pod: Option<String>,
    /// At most this many (default 20).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub limit: u32,
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    #[command(flatten)]
    pub server: ServerArgs,
}

#[derive(Debug, Args)]
pub struct EphemeralArgs {
    #[command(flatten)]
    pub scope: ScopeArgs,
    /// Every namespace, not only the host's and the 19 fullest.
    #[arg(long)]
    pub all: bool,
    /// Destinations per namespace (default 10).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub limit: u32,
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    #[command(flatten)]
    pub server: ServerArgs,
}

#[derive(Debug, Args)]
pub struct WatchArgs {
    /// Only events for this port.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    pub port: Option<u16>,
    /// One JSON object per line instead of text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub server: ServerArgs,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// tcp or udp.
    #[arg(value_parser = ["tcp", "udp"])]
    pub protocol: String,
    /// The address and port to bind, as `0.0.0.0:8080` or `[::]:8080`.
    pub endpoint: std::net::SocketAddr,
    #[arg(long)]
    pub reuse_port: bool,
    #[arg(long)]
    pub reuse_addr: bool,
    #[arg(long)]
    pub v6only: bool,
    /// Network namespace (its cookie, as `ports` shows it); default: the
    /// daemon's own.
    #[arg(long, value_name = "COOKIE")]
    pub netns: Option<u64>,
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    #[command(flatten)]
    pub server: ServerArgs,
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
    /// How bind/listen outcomes are captured: `exact` probes for fexit and
    /// falls back to the syscall tracepoints, so every errno is the
    /// kernel's; `auto` falls back to inferring them, as the daemon does;
    /// `inferred` attaches no outcome hook (no per-syscall cost; trace has
    /// no map to infer errnos from, see the README).
    #[arg(long, value_enum, env = "PORTWATCH_OUTCOME", default_value_t = OutcomeChoice::Exact)]
    pub outcome: OutcomeChoice,
    /// Where the bind hooks read SO_REUSEADDR/SO_REUSEPORT: `auto` tries
    /// `bpf_getsockopt` and falls back to the socket's own bits.
    #[arg(long, value_enum, default_value_t = OptionsChoice::Auto)]
    pub socket_options: OptionsChoice,
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
        let Command::Trace(args) = cli.command else {
            panic!("parsed as trace");
        };
        assert!(args.json && args.failures_only);
        assert_eq!((args.port, args.pid), (Some(8080), Some(42)));
        assert_eq!(args.ring_size, DEFAULT_RING_BYTES);
    }

    #[test]
    fn client_commands_parse() {
        let cli =
            Cli::try_parse_from(["portwatch", "check", "tcp", "[::]:8080", "--v6only"]).unwrap();
        let Command::Check(check) = cli.command else {
            panic!("check")
        };
        assert!(check.v6only && !check.reuse_port);
        assert_eq!(check.endpoint.port(), 8080);
        assert_eq!(check.server.server, DEFAULT_SERVER);
        assert!(Cli::try_parse_from(["portwatch", "check", "sctp", "1.2.3.4:1"]).is_err());
        assert!(Cli::try_parse_from(["portwatch", "check", "tcp", "8080"]).is_err());
        let cli = Cli::try_parse_from(["portwatch", "ports", "8000", "-o", "json"]).unwrap();
        let Command::Ports(ports) = cli.command else {
            panic!("ports")
        };
        assert_eq!((ports.port, ports.output), (Some(8000), Output::Json));
        assert!(Cli::try_parse_from(["portwatch", "failures", "--limit", "0"]).is_err());
    }

    #[test]
    fn completions_and_man_page_are_generated() {
        let mut out = Vec::new();
        clap_complete::generate(
            clap_complete::Shell::Bash,
            &mut Cli::command(),
            "portwatch",
            &mut out,
        );
        let script = String::from_utf8(out).unwrap();
        assert!(
            script.contains("portwatch") && script.contains("explain"),
            "bash completion"
        );
        let mut man = Vec::new();
        clap_mangen::Man::new(Cli::command())
            .render(&mut man)
            .unwrap();
        let man = String::from_utf8(man).unwrap();
        assert!(
            man.starts_with(".ie") || man.contains(".TH portwatch"),
            "{man:.200}"
        );
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
