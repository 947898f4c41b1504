//! What a VM said on its serial console, read back into results, and the
//! table they make. Pure: unit-tested on console text.
//!
//! The guest's `/init` writes one marker line per fact, each starting with
//! [`MARK`]; everything else on the console is the tests' own output, of
//! which only libtest's `test result:` and `... FAILED` lines are read. A
//! suite without its end marker, or a VM without the final one, is a
//! failure: a VM that returns no result never passes.

use std::fmt::Write as _;

use serde::Serialize;

use crate::test::{SKIP_MARK, Totals};

/// The prefix of every marker line.
pub const MARK: &str = "PWVM";

/// One suite's results inside one VM.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SuiteResult {
    pub name: String,
    /// The test binary's exit code; `None` if it never ended.
    pub exit: Option<i32>,
    pub passed: u64,
    pub failed: u64,
    pub skipped: u64,
    /// Names of the tests that failed.
    pub failures: Vec<String>,
    /// `test: feature` of each test that skipped itself.
    pub skips: Vec<String>,
}

impl SuiteResult {
    pub fn ok(&self) -> bool {
        self.exit == Some(0) && self.failed == 0 && self.passed > 0
    }
}

/// Everything one VM reported.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PassReport {
    /// `uname -r` in the guest.
    pub release: Option<String>,
    /// (hook, path) of every attached program, from the daemon's
    /// `portwatch_program_attached` metric.
    pub hooks: Vec<(String, String)>,
    /// What the daemon warned about at start-up (facts it cannot read).
    pub warnings: Vec<String>,
    pub suites: Vec<SuiteResult>,
    /// Problems of the run itself: a module that did not load, a daemon
    /// that did not start, a suite that never ended, no final marker.
    pub problems: Vec<String>,
    /// The guest reached its last marker.
    pub finished: bool,
    /// The guest read its kernel log after the suites (a WARN, an oops or a
    /// taint in it is one of `problems`).
    pub dmesg_checked: bool,
    /// The predictor's agreement lines (`predictor: kernel ..., agreement
    /// .../..., confident .../...`), one per differential run.
    pub predictor: Vec<String>,
}

impl PassReport {
    /// Reads a console log; `expected` names the suites that must have run.
    pub fn parse(console: &str, expected: &[&str]) -> PassReport {
        let mut report = PassReport::default();
        let mut current: Option<(SuiteResult, Totals)> = None;
        for line in console.lines() {
            let Some(marker) = marker_of(line) else {
                if let Some((suite, totals)) = current.as_mut() {
                    totals.add_line(line);
                    if let Some((_, skip)) = line.split_once(SKIP_MARK) {
                        suite.skips.push(skip.trim().to_owned());
                    }
                    if let Some(at) = line.find("predictor: kernel ") {
                        report
                            .predictor
                            .push(line[at + "predictor: ".len()..].trim().to_owned());
                    }
                    if let Some(name) = failed_test(line) {
                        suite.failures.push(name);
                    }
                }
                continue;
            };
            let (kind, rest) = marker.split_once(' ').unwrap_or((marker, ""));
            match kind {
                "KERNEL" => report.release = Some(rest.trim().to_owned()),
                "HOOK" => report.hooks.extend(hook_of(rest)),
                "WARN" => report.warnings.push(rest.trim().to_owned()),
                "PROBLEM" => report.problems.push(rest.trim().to_owned()),
                "BEGIN" => {
                    current = Some((
                        SuiteResult {
                            name: rest.trim().to_owned(),
                            ..SuiteResult::default()
                        },
                        Totals::default(),
                    ));
                }
                "END" => {
                    if let Some((mut suite, totals)) = current.take() {
                        suite.exit = rest
                            .split_whitespace()
                            .last()
                            .and_then(|rc| rc.parse().ok());
                        suite.passed = totals.passed;
                        suite.failed = totals.failed;
                        suite.skipped = totals.ignored;
                        report.suites.push(suite);
                    }
                }
                "DONE" => report.finished = true,
                "DMESG" => report.dmesg_checked = true,
                _ => {}
            }
        }
        if let Some((suite, _)) = current {
            report
                .problems
                .push(format!("suite `{}` never ended", suite.name));
            report.suites.push(suite);
        }
        for name in expected {
            if !report.suites.iter().any(|s| s.name == *name) {
                report.problems.push(format!("suite `{name}` did not run"));
            }
        }
        if !report.finished {
            report
                .problems
                .push("the VM did not reach its last marker".to_owned());
        } else if !report.dmesg_checked {
            report
                .problems
                .push("the kernel log was not checked".to_owned());
        }
        report
    }

    pub fn ok(&self) -> bool {
        self.finished && self.problems.is_empty() && self.suites.iter().all(SuiteResult::ok)
    }

    pub fn totals(&self) -> (u64, u64, u64) {
        self.suites.iter().fold((0, 0, 0), |(p, f, s), suite| {
            (p + suite.passed, f + suite.failed, s + suite.skipped)
        })
    }
}

/// The text after `PWVM-` on a marker line. A marker may follow kernel
/// output on the same console line, so it is searched for, not anchored.
fn marker_of(line: &str) -> Option<&str> {
    let at = line.find(MARK)?;
    line[at + MARK.len()..].strip_prefix('-')
}

/// `portwatch_program_attached{hook="bind_outcome",path="fexit"} 1`.
fn hook_of(sample: &str) -> Option<(String, String)> {
    let labels = sample.split_once('{')?.1.split_once('}')?;
    if labels.1.trim() != "1" {
        return None;
    }
    let label = |key: &str| {
        labels.0.split(',').find_map(|pair| {
            let (k, v) = pair.split_once('=')?;
            (k.trim() == key).then(|| v.trim().trim_matches('"').to_owned())
        })
    };
    Some((label("hook")?, label("path")?))
}

/// `test some::name ... FAILED`.
fn failed_test(line: &str) -> Option<String> {
    let name = line.strip_prefix("test ")?.strip_suffix(" ... FAILED")?;
    Some(name.to_owned())
}

/// One VM run of the matrix, for the table.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    /// `6.1`, or `6.12, tracepoint forced`.
    pub label: String,
    pub package: String,
    pub accel: String,
    pub seconds: u64,
    pub report: PassReport,
}

/// The markdown table: one row per VM run.
pub fn markdown(rows: &[Row]) -> String {
    let mut out = String::from(
        "| kernel | `uname -r` | hooks that are not cgroup programs (hook: path) | what the daemon warned about at start | passed | failed | skipped | result |\n|---|---|---|---|---|---|---|---|\n",
    );
    for row in rows {
        let report = &row.report;
        let hooks: Vec<String> = report
            .hooks
            .iter()
            .filter(|(_, path)| path != "cgroup")
            .map(|(hook, path)| format!("{hook}: {path}"))
            .collect();
        let warned = if report.warnings.is_empty() {
            "nothing".to_owned()
        } else {
            report.warnings.join("; ").replace('|', "\\|")
        };
        let (passed, failed, skipped) = report.totals();
        let skips: Vec<&str> = report
            .suites
            .iter()
            .flat_map(|s| s.skips.iter().map(String::as_str))
            .collect();
        let result = if report.ok() && skips.is_empty() {
            "pass".to_owned()
        } else if report.ok() {
            format!("pass; skipped {}", skips.join("; "))
        } else {
            let mut why = report.problems.clone();
            for suite in report.suites.iter().filter(|s| !s.ok()) {
                why.push(format!("{} failed", suite.name));
            }
            format!("**FAIL**: {}", why.join("; "))
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {passed} | {failed} | {skipped} | {result} |",
            row.label,
            report.release.as_deref().unwrap_or("?"),
            if hooks.is_empty() {
                "?".to_owned()
            } else {
                hooks.join(", ")
            },
            warned,
        );
    }
    let runs: Vec<String> = rows
        .iter()
        .flat_map(|row| {
            row.report
                .predictor
                .iter()
                .map(move |line| format!("- {}: {line}", row.label))
        })
        .collect();
    if !runs.is_empty() {
        out.push_str("\nThe predictor's differential runs (a confident prediction the kernel contradicts fails the run):\n\n");
        for run in runs {
            out.push_str(&run);
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONSOLE: &str = "\
[    0.000000] Linux version 6.1.0-50-cloud-amd64
PWVM-KERNEL 6.1.0-50-cloud-amd64
PWVM-HOOK portwatch_program_attached{hook=\"bind\",path=\"cgroup\"} 1
PWVM-HOOK portwatch_program_attached{hook=\"bind_outcome\",path=\"fexit\"} 1
PWVM-HOOK portwatch_program_attached{hook=\"get_port\",path=\"fexit\"} 0
PWVM-WARN kernel BTF lacks inet_flags
PWVM-BEGIN trace

running 2 tests
test bind_is_seen ... ok
test listen_is_seen ... FAILED

test result: FAILED. 1 passed; 1 failed; 0 ignored; 0 measured; 3 filtered out; finished in 2.00s

PWVM-END trace 101
PWVM-BEGIN map
predictor: kernel 6.1.0-50-cloud-amd64, udp_walk=first_match, 3000 scenarios
test uring ... 
PORTWATCH-SKIP: uring: io_uring bind (Linux 6.11+)
ok
test result: ok. 5 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 9.00s
PWVM-END map 0
PWVM-DMESG checked (taint 0)
[   30.1] reboot: PWVM-DONE
";

    #[test]
    fn a_console_gives_suites_hooks_and_warnings() {
        let report = PassReport::parse(CONSOLE, &["trace", "map"]);
        assert_eq!(report.release.as_deref(), Some("6.1.0-50-cloud-amd64"));
        assert_eq!(
            report.hooks,
            [
                ("bind".to_owned(), "cgroup".to_owned()),
                ("bind_outcome".to_owned(), "fexit".to_owned()),
            ],
            "a hook whose sample is 0 is not attached"
        );
        assert_eq!(report.warnings, ["kernel BTF lacks inet_flags"]);
        assert_eq!(report.suites.len(), 2);
        let trace = &report.suites[0];
        assert_eq!((trace.passed, trace.failed, trace.exit), (1, 1, Some(101)));
        assert_eq!(trace.failures, ["listen_is_seen"]);
        assert!(!trace.ok());
        assert!(report.suites[1].ok());
        assert_eq!(
            report.suites[1].skips,
            ["uring: io_uring bind (Linux 6.11+)"]
        );
        assert!(report.finished);
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        assert!(!report.ok());
        assert_eq!(report.totals(), (5, 1, 1));
    }

    #[test]
    fn a_vm_that_says_nothing_fails() {
        let report = PassReport::parse("", &["trace"]);
        assert!(!report.ok());
        assert_eq!(
            report.problems,
            [
                "suite `trace` did not run",
                "the VM did not reach its last marker"
            ]
        );
    }

    #[test]
    fn a_suite_cut_off_or_running_nothing_fails() {
        let cut = PassReport::parse(
            "PWVM-BEGIN map\ntest result: ok. 3 passed; 0 failed;\n",
            &["map"],
        );
        assert!(!cut.ok());
        assert!(cut.problems.iter().any(|p| p.contains("never ended")));
        let empty = PassReport::parse(
            "PWVM-BEGIN map\ntest result: ok. 0 passed; 0 failed; 0 ignored;\nPWVM-END map 0\nPWVM-DONE\n",
            &["map"],
        );
        assert!(!empty.ok(), "a suite that ran no test is no pass");
        let good = PassReport::parse(
            "PWVM-BEGIN map\ntest result: ok. 3 passed; 0 failed; 0 ignored;\nPWVM-END map 0\nPWVM-DMESG checked (taint 0)\nPWVM-DONE\n",
            &["map"],
        );
        assert!(good.ok());
    }

    #[test]
    fn a_kernel_log_with_a_warning_or_unread_fails() {
        let suites =
            "PWVM-BEGIN map\ntest result: ok. 3 passed; 0 failed; 0 ignored;\nPWVM-END map 0\n";
        let warned = PassReport::parse(
            &format!(
                "{suites}PWVM-PROBLEM dmesg: [ 3.1] trace type BPF program uses run-time allocation\nPWVM-DMESG checked (taint 512)\nPWVM-DONE\n"
            ),
            &["map"],
        );
        assert!(!warned.ok());
        assert!(warned.problems[0].contains("run-time allocation"));
        let unread = PassReport::parse(&format!("{suites}PWVM-DONE\n"), &["map"]);
        assert!(!unread.ok());
        assert_eq!(unread.problems, ["the kernel log was not checked"]);
    }

    #[test]
    fn the_table_has_a_row_per_run() {
        let row = Row {
            label: "6.1".to_owned(),
            package: "linux-image-6.1.0-50-cloud-amd64".to_owned(),
            accel: "tcg".to_owned(),
            seconds: 90,
            report: PassReport::parse(CONSOLE, &["trace", "map"]),
        };
        let table = markdown(&[row]);
        assert_eq!(table.lines().count(), 7, "{table}");
        assert!(
            table.contains("- 6.1: kernel 6.1.0-50-cloud-amd64, udp_walk=first_match"),
            "{table}"
        );
        assert!(table.contains("bind_outcome: fexit"), "{table}");
        assert!(!table.contains("bind: cgroup"), "{table}");
        assert!(
            table.contains("| 5 | 1 | 1 | **FAIL**: trace failed |"),
            "{table}"
        );
    }
}
