//! `cargo xtask bench`: what portwatch costs, measured side by side.
//!
//! This machine is noisy (a 2-core VM), so no figure is an absolute time
//! taken once. Each comparison alternates "with" and "without" in one run,
//! repeats, and reports the ratio of each pair as min/median/max; the goal
//! is checked against the median. Timings never fail the command: it fails
//! only when a measurement could not be taken.
//!
//! The figures, one module each:
//! 1. [`bindpath`]: socket+bind(0)+listen+close with the daemon attached vs
//!    detached, and vs bpftrace on the same tracepoints;
//! 2. [`tax`]: a getppid loop attached vs detached, per hook path;
//! 3. [`ingest`]: the highest bind rate absorbed with 0 drops, and what
//!    happens above it;
//! 4. [`snapshot`]: the start-up snapshot of 100k listeners vs `ss -tlnH`;
//! 5. [`api`]: `GET /ports/{p}` latency and rate with wrk, and daemon RSS,
//!    with 100k listeners;
//! 6. [`namespaces`]: a container host, 500 network namespaces listening on
//!    80, 443 and 8080: the start-up snapshot, the size of `GET /ports/8080`,
//!    the length of `portwatch explain 8080`, and a reconciliation;
//! 7. [`ephemeral`]: connect() to a loopback listener attached vs detached,
//!    and the ephemeral port listing with 100k connections vs `ss -tanpH`;
//! 8. [`idle`]: the daemon at rest on a quiet host: wakeups and CPU.
//!
//! The daemon under test is the release build, watching a cgroup created for
//! the run (`portwatch-bench-<pid>` under the cgroup2 mount); the load runs
//! inside that cgroup as `cargo xtask bench-worker` child processes. Only
//! loopback and network namespaces made for the run are used. The daemon's
//! configuration and log and bpftrace's output go to `target/bench/run-<pid>`,
//! so that two runs do not overwrite each other's; it is removed when the run
//! succeeds.

mod api;
mod bindpath;
mod ephemeral;
mod idle;
mod ingest;
mod namespaces;
mod programs;
mod report;
mod rig;
mod snapshot;
mod tax;

use std::{fs, path::PathBuf};

use anyhow::{Context as _, Result, bail};

pub use report::{Goal, Row, Stats};
pub use rig::{BenchDaemon, Cgroup, Worker, alternate};

use crate::{build, cmd, setup};

/// `cargo xtask bench` options.
#[derive(Clone, Debug)]
pub struct Options {
    /// Fewer rounds and smaller sizes: checks that every figure can be
    /// taken, in well under 3 minutes (CI).
    pub quick: bool,
    /// Replace the table between the markers in README.md.
    pub write_readme: bool,
    /// Only the figures whose name contains one of these (all when empty).
    pub only: Vec<String>,
    /// Build the eBPF programs as one of the variants that show where their
    /// cost lies, instead of as they ship.
    pub variant: Option<Variant>,
}

/// `--ebpf-variant`: the eBPF programs built to measure where their cost
/// lies (`PORTWATCH_EBPF_VARIANT`; see `portwatch-ebpf`'s `variant`). The
/// daemon then sees nothing or hears nothing, so only the figures that time
/// a loop against the detached kernel take it, and no bind is accounted for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Variant {
    /// Every program returns at its first instruction: the hooks' own cost.
    Empty,
    /// The programs do all their work but send no record.
    Unsent,
}

impl Variant {
    /// The figures that can be taken with a variant: loops timed attached
    /// against detached.
    const FIGURES: [&str; 3] = ["bind path", "syscall tax", "ephemeral"];

    pub fn name(self) -> &'static str {
        match self {
            Variant::Empty => "empty",
            Variant::Unsent => "unsent",
        }
    }
}

/// What every figure needs: the daemon binary, the cgroup the load runs in,
/// and how hard to try.
pub struct Ctx {
    pub quick: bool,
    /// The eBPF programs are a measuring variant: the daemon accounts for
    /// nothing.
    pub variant: Option<Variant>,
    /// The release build of portwatch.
    pub portwatch: PathBuf,
    /// The cgroup the daemon watches and the workers run in.
    pub cgroup: Cgroup,
    /// This run's daemon configuration and log, and bpftrace's output
    /// (`target/bench/run-<pid>`).
    pub run_dir: PathBuf,
}

impl Ctx {
    /// `full` normally, `quick` with `--quick`.
    pub fn pick<T>(&self, full: T, quick: T) -> T {
        if self.quick { quick } else { full }
    }

    /// Rounds per comparison (each round runs every side once).
    pub fn rounds(&self) -> usize {
        self.pick(7, 2)
    }
}

/// One figure: its rows, or why it could not be taken.
type Figure = fn(&Ctx) -> Result<Vec<Row>>;

/// `cargo xtask bench [--quick] [--write-readme] [--only <figure>]...`.
pub fn bench(options: Options) -> Result<()> {
    if !cmd::is_root() {
        bail!(
            "the benchmarks load eBPF programs and create cgroups and network namespaces: run `cargo xtask bench` as root"
        );
    }
    if let Some(variant) = options.variant {
        if options.write_readme {
            bail!("--ebpf-variant measures an experiment: it does not write the README");
        }
        if options.only.is_empty()
            || options.only.iter().any(|only| {
                !Variant::FIGURES
                    .iter()
                    .any(|figure| figure.contains(only.as_str()))
            })
        {
            bail!(
                "--ebpf-variant {} needs --only, naming only these figures: {}",
                variant.name(),
                Variant::FIGURES.join(", ")
            );
        }
    }
    setup::ensure()?;
    build::build_programs(
        true,
        crate::arch::Arch::host(),
        options.variant.map(Variant::name),
    )?;
    let portwatch = build::target_dir().join("release/portwatch");
    let out_dir = build::target_dir().join("bench");
    let run_dir = out_dir.join(format!("run-{}", std::process::id()));
    fs::create_dir_all(&run_dir).with_context(|| format!("creating {}", run_dir.display()))?;

    let ctx = Ctx {
        quick: options.quick,
        variant: options.variant,
        portwatch,
        cgroup: Cgroup::create()?,
        run_dir,
    };
    let figures: [(&str, Figure); 8] = [
        ("bind path", bindpath::run),
        ("syscall tax", tax::run),
        ("ingest", ingest::run),
        ("snapshot", snapshot::run),
        ("API", api::run),
        ("namespaces", namespaces::run),
        ("ephemeral", ephemeral::run),
        ("idle", idle::run),
    ];
    let mut rows = Vec::new();
    for (name, figure) in figures {
        if !options.only.is_empty() && !options.only.iter().any(|only| name.contains(only.as_str()))
        {
            continue;
        }
        println!("\n== bench: {name} ==");
        let taken = figure(&ctx).with_context(|| {
            format!(
                "bench: {name} (daemon log and bpftrace output in {})",
                ctx.run_dir.display()
            )
        })?;
        let taken: Vec<Row> = match options.variant {
            Some(variant) => taken
                .into_iter()
                .map(|mut row| {
                    row.figure = format!("{} [programs: {}]", row.figure, variant.name());
                    row
                })
                .collect(),
            None => taken,
        };
        for row in &taken {
            println!("{}", row.one_line());
        }
        rows.extend(taken);
    }

    if let Err(err) = fs::remove_dir_all(&ctx.run_dir) {
        eprintln!("bench: could not remove {}: {err}", ctx.run_dir.display());
    }

    let table = report::markdown(&rows, &report::Machine::describe(options.quick));
    println!("\n{table}");
    let md = out_dir.join("results.md");
    let json = out_dir.join("results.json");
    fs::write(&md, &table).with_context(|| format!("writing {}", md.display()))?;
    fs::write(&json, report::json(&rows, options.quick)?)
        .with_context(|| format!("writing {}", json.display()))?;
    println!("bench: wrote {} and {}", md.display(), json.display());
    if options.write_readme && options.only.is_empty() {
        report::write_readme(&cmd::workspace_root().join("README.md"), &table)?;
        println!("bench: README.md's performance table updated");
    }
    Ok(())
}

/// `cargo xtask bench-worker <kind> <args>`: the load, in its own process so
/// that it can run inside the bench cgroup (and, for the listeners, inside
/// its own network namespace). Not meant to be run by hand.
pub fn worker(args: &[String]) -> Result<()> {
    let Some((kind, rest)) = args.split_first() else {
        bail!("bench-worker: which worker?");
    };
    match kind.as_str() {
        "bind-loop" => bindpath::worker(rest),
        "getppid-loop" => tax::worker(rest),
        "bind-storm" => ingest::worker(rest),
        "hold-listeners" => snapshot::worker(rest),
        "hold-namespaces" => namespaces::worker(rest),
        "connect-loop" => ephemeral::connect_worker(rest),
        "hold-connections" => ephemeral::hold_worker(rest),
        other => bail!("bench-worker: unknown worker {other:?}"),
    }
}
