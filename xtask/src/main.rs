//! portwatch's development tasks, run as `cargo xtask <task>` (an alias in
//! `.cargo/config.toml`). Every external command is printed before it runs.

mod arch;
mod bench;
mod build;
mod cmd;
mod lint;
mod package;
mod readme;
mod setup;
mod test;
mod vm;

use std::{ffi::OsString, process::ExitCode};

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "portwatch development tasks"
)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what a fresh Debian machine lacks to build and lint portwatch.
    ///
    /// LLVM 22 packages, nightly with rust-src and clippy, rustfmt and clippy,
    /// bpf-linker. Idempotent: only missing items are installed.
    Setup {
        /// Only report what is installed; fail if anything is missing.
        #[arg(long)]
        check: bool,
    },
    /// Build portwatch and its eBPF programs (runs setup if something is
    /// missing).
    Build {
        #[arg(long)]
        release: bool,
        /// Cross-build for this architecture (arm64 with Debian's
        /// gcc-aarch64-linux-gnu); default: this machine's.
        #[arg(long, value_enum, default_value_t = arch::Arch::host())]
        arch: arch::Arch,
    },
    /// Build, then run `portwatch <ARGS>` as root (through `sudo -E` when not
    /// root), e.g. `cargo xtask run -- trace --json`.
    Run {
        #[arg(long)]
        release: bool,
        /// Arguments for portwatch.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Run the whole test suite (runs setup if something is missing).
    ///
    /// Tests that need root are `#[ignore]`d with the reason, so a plain
    /// `cargo test` lists them; as root, a second `cargo test --tests --
    /// --ignored` runs them.
    Test {
        /// Extra arguments for `cargo test`, e.g. `-- bind -- --nocapture`
        /// (a filter, then arguments for the test binaries).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// rustfmt check and clippy -D warnings on every crate and target.
    Lint,
    /// Build the Debian package (target/debian/portwatch_<version>_<arch>.deb):
    /// the binary, systemd unit, default config (a conffile), man page,
    /// shell completions, alert rules and dashboard.
    Package {
        /// The package's architecture (`--arch arm64`: portwatch_<v>_arm64.deb).
        #[arg(long, value_enum, default_value_t = arch::Arch::host())]
        arch: arch::Arch,
    },
    /// Measure what portwatch costs: the bind path and the syscall tax with
    /// the daemon attached vs detached (and vs bpftrace), the ingest rate,
    /// the start-up snapshot vs `ss`, the HTTP API under wrk, and a host of
    /// 500 network namespaces (needs root). Prints a markdown table; writes
    /// it and JSON to target/bench.
    Bench {
        /// Few rounds and small sizes: checks that every figure can be
        /// taken (CI); the numbers are not worth quoting.
        #[arg(long)]
        quick: bool,
        /// Also replace the performance table in README.md.
        #[arg(long)]
        write_readme: bool,
        /// Only the figures whose name contains this (repeatable): "bind
        /// path", "syscall tax", "ingest", "snapshot", "API", "namespaces",
        /// "ephemeral", "idle".
        #[arg(long)]
        only: Vec<String>,
        /// Build the eBPF programs as a measuring variant (with --only "bind
        /// path", "syscall tax" or "ephemeral"): `empty` returns at every
        /// program's first instruction (the hooks' own cost), `unsent` does
        /// the work but sends no record.
        #[arg(long, value_enum)]
        ebpf_variant: Option<bench::Variant>,
    },
    /// Boot stock Debian kernels (5.10, 6.1, 6.12) under QEMU and run the
    /// root test suites inside each: trace, map, the predictor, a private
    /// namespace's snapshot, the storm and one-entry-map robustness tests,
    /// exactness, the ephemeral port tests (connect failures, early binds,
    /// connected UDP) and the daemon's seed scenarios.
    /// Ends with a table per kernel: the hook paths, what is unknown there,
    /// and the tests passed, failed and skipped.
    Vm {
        /// A kernel of the matrix (repeatable): 5.10, 6.1, 6.12 or all.
        /// `all` (the default) adds a run on 6.12 with the tracepoint path
        /// forced.
        #[arg(long = "kernel", value_name = "KERNEL")]
        kernels: Vec<String>,
        /// Force the outcome path in every run.
        #[arg(long, value_enum)]
        outcome: Option<vm::Outcome>,
        /// CPU: KVM if a trial boot works, else TCG (auto), or either.
        #[arg(long, value_enum, default_value_t = vm::Accel::Auto)]
        accel: vm::Accel,
        /// Also replace the supported-kernels table in README.md.
        #[arg(long)]
        write_readme: bool,
        /// Minutes one VM may run before it is stopped and counted failed.
        #[arg(long, default_value_t = 30)]
        minutes: u64,
        /// Only the suites whose name contains this (repeatable): trace,
        /// map, predictor, snapshot, robustness, exactness, ephemeral,
        /// daemon.
        #[arg(long = "suite", value_name = "NAME")]
        suites: Vec<String>,
        /// Instead of the suites: a Debian 12 userspace with systemd as PID
        /// 1 (6.1 and 6.12 by default), the .deb installed with dpkg -i, and
        /// the service checked as an operator uses it: READY, unit
        /// attribution, bind failures, the sandbox score, stop, restart,
        /// config errors, the watchdog, purge, and running without the
        /// sock_diag modules.
        #[arg(long)]
        systemd: bool,
        /// The guest's architecture: arm64 boots Debian's arm64 kernel under
        /// qemu-system-aarch64 (TCG) with cross-built test binaries.
        #[arg(long, value_enum, default_value_t = arch::Arch::host())]
        arch: arch::Arch,
    },
    /// A bench load process (run by `cargo xtask bench`, not by hand).
    #[command(hide = true)]
    BenchWorker {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Setup { check } => setup::setup(check),
        Task::Build { release, arch } => build::build(release, arch),
        Task::Run { release, args } => build::run(release, &args),
        Task::Test { args } => test::test(&args),
        Task::Lint => lint::lint(),
        Task::Package { arch } => package::package(arch).map(|_| ()),
        Task::Bench {
            quick,
            write_readme,
            only,
            ebpf_variant,
        } => bench::bench(bench::Options {
            quick,
            write_readme,
            only,
            variant: ebpf_variant,
        }),
        Task::Vm {
            kernels,
            outcome,
            accel,
            write_readme,
            minutes,
            suites,
            systemd,
            arch,
        } => vm::vm(&vm::Options {
            kernels,
            outcome,
            accel,
            write_readme,
            limit: std::time::Duration::from_secs(minutes * 60),
            suites,
            systemd,
            arch,
        }),
        Task::BenchWorker { args } => {
            bench::Cgroup::join_from_env().and_then(|()| bench::worker(&args))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
