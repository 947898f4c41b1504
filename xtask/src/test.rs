//! `cargo xtask test`: the whole test suite.
//!
//! `portwatch-ebpf` is excluded because its binary only builds for the bpf
//! target; its library (the wire types) is compiled and tested through
//! `portwatch`.
//!
//! Tests that need root (they load the real programs) are marked
//! `#[ignore = "<why>; run by `cargo xtask test`"]`, so a plain `cargo test`
//! lists them as ignored with the reason. When run as root, a second
//! `cargo test --tests -- --ignored` runs exactly those. (`--include-ignored`
//! in one run would also run doc examples marked `ignore`, which are not
//! meant to compile.)

use std::{
    ffi::OsString,
    io::{Read as _, Write as _},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, Result, bail};

use crate::{
    cmd::{self, display},
    setup,
};

/// `cargo xtask test [-- <cargo test args> [-- <test binary args>]]`.
pub fn test(args: &[OsString]) -> Result<()> {
    setup::ensure()?;
    let started = Instant::now();
    let (cargo_args, test_args) = match args.iter().position(|arg| arg == "--") {
        Some(split) => (&args[..split], &args[split + 1..]),
        None => (args, &[][..]),
    };

    let mut all = cargo_test();
    all.args(args);
    let mut failures = Vec::new();
    let mut totals = run_counting(&mut all, &mut failures)?;

    if totals.runs == 0 {
        // Nothing ran (the build failed, or `--help`): the second run would
        // only repeat that.
    } else if cmd::is_root() {
        let mut root_only = cargo_test();
        root_only
            .arg("--tests")
            .args(cargo_args)
            .args(["--", "--ignored"])
            .args(test_args);
        let root = run_counting(&mut root_only, &mut failures)?;
        totals.passed += root.passed;
        totals.failed += root.failed;
        totals.runs += root.runs;
        // Those ran in the second run: only the rest stayed ignored.
        totals.ignored = totals.ignored.saturating_sub(root.passed + root.failed);
    } else {
        println!(
            "test: not root, so the root-only tests stay ignored (run `cargo xtask test` as root)"
        );
    }

    let verdict = if failures.is_empty() { "ok" } else { "FAILED" };
    println!(
        "test: {verdict} in {} test runs, {:.0?}; ignored tests are the ones that could not run here",
        totals.runs,
        started.elapsed()
    );
    // The plain closing line CI reads: "N passed, N failed, N skipped".
    println!(
        "summary: {} passed, {} failed, {} skipped",
        totals.passed, totals.failed, totals.ignored
    );
    if !failures.is_empty() {
        bail!("{}", failures.join("; "));
    }
    Ok(())
}

/// `cargo test` over every host crate, from the workspace root; every test
/// binary runs even after one fails, so one run shows every failure.
fn cargo_test() -> Command {
    let mut test = cmd::cargo();
    test.args([
        "test",
        "--workspace",
        "--exclude",
        "portwatch-ebpf",
        "--no-fail-fast",
    ]);
    test
}

/// Prints `$ cmd`, runs it passing its output through, and returns the sums of
/// its `test result:` lines. A failed run is added to `failures`.
fn run_counting(test: &mut Command, failures: &mut Vec<String>) -> Result<Totals> {
    let shown = display(test);
    println!("$ {shown}");
    let mut child = test
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("could not start `{shown}`"))?;
    let mut totals = Totals::default();
    if let Some(mut out) = child.stdout.take() {
        // Pass test output through as it comes (libtest prints `test x ... `
        // before the result), keeping whole lines to read the result counts.
        let (mut chunk, mut line) = ([0u8; 8192], Vec::new());
        let mut stdout = std::io::stdout().lock();
        loop {
            let n = out
                .read(&mut chunk)
                .context("reading `cargo test` output")?;
            if n == 0 {
                break;
            }
            stdout.write_all(&chunk[..n])?;
            stdout.flush()?;
            for &byte in &chunk[..n] {
                if byte == b'\n' {
                    totals.add_line(&String::from_utf8_lossy(&line));
                    line.clear();
                } else {
                    line.push(byte);
                }
            }
        }
    }
    let status = child
        .wait()
        .with_context(|| format!("waiting for `{shown}`"))?;
    if !status.success() {
        failures.push(format!("`{shown}` failed ({status})"));
    }
    Ok(totals)
}

/// Sums of libtest's `test result:` lines, one per test binary or doc-test run.
#[derive(Debug, Default, PartialEq)]
pub struct Totals {
    pub runs: u64,
    pub passed: u64,
    pub failed: u64,
    /// Ignored tests, and those that skipped themselves.
    pub ignored: u64,
    /// Skip lines seen since the last `test result:` line.
    skipped_since_result: u64,
}

/// What a test that skips itself prints (tests/support: `SKIP_MARK`).
pub const SKIP_MARK: &str = "PORTWATCH-SKIP:";

impl Totals {
    /// Adds `test result: ok. 3 passed; 0 failed; 1 ignored; 0 measured; ...`.
    pub fn add_line(&mut self, line: &str) {
        if line.contains(SKIP_MARK) {
            self.skipped_since_result += 1;
            return;
        }
        let Some(result) = line.trim().strip_prefix("test result: ") else {
            return;
        };
        self.runs += 1;
        let counts = result.split_once(". ").map_or(result, |(_, counts)| counts);
        for part in counts.split(';') {
            let mut words = part.split_whitespace();
            let (Some(count), Some(what)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(count) = count.parse::<u64>() else {
                continue;
            };
            match what {
                "passed" => self.passed += count,
                "failed" => self.failed += count,
                "ignored" => self.ignored += count,
                _ => {}
            }
        }
        // libtest counted the tests that skipped themselves as passed.
        let skipped = std::mem::take(&mut self.skipped_since_result);
        self.passed = self.passed.saturating_sub(skipped);
        self.ignored += skipped;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_result_lines_and_ignores_the_rest() {
        let mut totals = Totals::default();
        for line in [
            "running 4 tests",
            "test result: ok. 3 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s",
            "test result: FAILED. 1 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1.20s",
        ] {
            totals.add_line(line);
        }
        let expected = Totals {
            runs: 2,
            passed: 4,
            failed: 2,
            ignored: 1,
            skipped_since_result: 0,
        };
        assert_eq!(totals, expected);
    }

    #[test]
    fn a_test_that_skips_itself_counts_as_skipped() {
        let mut totals = Totals::default();
        for line in [
            "test result: ok. 2 passed; 0 failed; 0 ignored;",
            "test uring ... ",
            "PORTWATCH-SKIP: uring: io_uring bind (Linux 6.11+)",
            "ok",
            "test result: ok. 3 passed; 0 failed; 1 ignored;",
        ] {
            totals.add_line(line);
        }
        assert_eq!((totals.passed, totals.failed, totals.ignored), (4, 0, 2));
    }
}
