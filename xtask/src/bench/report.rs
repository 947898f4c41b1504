//! The results: one [`Row`] per figure, printed as a markdown table (for the
//! README) and as JSON (for machines).

use std::{fmt::Write as _, fs, path::Path};

use anyhow::{Context as _, Result, bail};
use serde::Serialize;

/// The README's performance table sits between these two lines.
const README_BEGIN: &str = "<!-- bench:begin (cargo xtask bench --write-readme) -->";
const README_END: &str = "<!-- bench:end -->";

/// min/median/max of repeated samples.
#[derive(Clone, Debug, Serialize)]
pub struct Stats {
    pub min: f64,
    pub median: f64,
    pub max: f64,
    pub samples: Vec<f64>,
}

impl Stats {
    /// Fails on no samples or a sample that is not a finite number, which
    /// would be a measurement bug, not a slow machine.
    pub fn of(samples: Vec<f64>) -> Result<Stats> {
        if samples.is_empty() {
            bail!("no samples");
        }
        if let Some(bad) = samples.iter().find(|sample| !sample.is_finite()) {
            bail!("a sample is {bad}");
        }
        let mut sorted = samples.clone();
        sorted.sort_by(f64::total_cmp);
        let mid = sorted.len() / 2;
        let median = if sorted.len() % 2 == 1 {
            sorted[mid]
        } else {
            (sorted[mid - 1] + sorted[mid]) / 2.0
        };
        Ok(Stats {
            min: sorted[0],
            median,
            max: sorted[sorted.len() - 1],
            samples,
        })
    }

    /// The per-round ratios `with[i] / without[i]`.
    pub fn of_ratios(with: &[f64], without: &[f64]) -> Result<Stats> {
        Stats::of(with.iter().zip(without).map(|(w, wo)| w / wo).collect())
    }

    /// The median of `samples`.
    pub fn median_of(samples: &[f64]) -> Result<f64> {
        Stats::of(samples.to_vec()).map(|stats| stats.median)
    }
}

/// What a figure should be; checked against the median.
#[derive(Clone, Copy, Debug, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Goal {
    AtMost(f64),
    AtLeast(f64),
    /// Reported for context; no goal.
    None,
}

impl Goal {
    pub fn met(self, value: f64) -> Option<bool> {
        match self {
            Goal::AtMost(limit) => Some(value <= limit),
            Goal::AtLeast(limit) => Some(value >= limit),
            Goal::None => None,
        }
    }
}

/// One line of the table.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    /// What was measured, e.g. "bind path: attached / detached".
    pub figure: String,
    /// The unit of `value` and `goal`: "×", "binds/s", "ms", "MiB".
    pub unit: String,
    pub value: Stats,
    pub goal: Goal,
    /// The absolute numbers behind a ratio, or what happened (drops...).
    pub detail: String,
}

impl Row {
    pub fn new(figure: impl Into<String>, unit: &str, value: Stats, goal: Goal) -> Row {
        Row {
            figure: figure.into(),
            unit: unit.to_owned(),
            value,
            goal,
            detail: String::new(),
        }
    }

    /// A comparison: the per-round ratios of paired samples, as "×".
    pub fn ratio(
        figure: impl Into<String>,
        with: &[f64],
        without: &[f64],
        goal: Goal,
    ) -> Result<Row> {
        Ok(Row::new(
            figure,
            "×",
            Stats::of_ratios(with, without)?,
            goal,
        ))
    }

    pub fn detail(mut self, detail: impl Into<String>) -> Row {
        self.detail = detail.into();
        self
    }

    pub fn met(&self) -> Option<bool> {
        self.goal.met(self.value.median)
    }

    /// `value` in this row's unit: a whole count of [`COUNT_UNITS`] without
    /// decimals ("5 lines", not "5.000 lines").
    fn number(&self, value: f64) -> String {
        if COUNT_UNITS.contains(&self.unit.as_str()) && value.fract() == 0.0 && value.abs() < 1e15 {
            grouped(value)
        } else {
            number(value)
        }
    }

    fn measured(&self) -> String {
        let Stats {
            min, median, max, ..
        } = self.value;
        if self.value.samples.len() == 1 {
            format!("{} {}", self.number(median), self.unit)
        } else {
            format!(
                "**{}** {} ({}–{}, n={})",
                self.number(median),
                self.unit,
                self.number(min),
                self.number(max),
                self.value.samples.len()
            )
        }
    }

    fn goal_text(&self) -> String {
        match self.goal {
            Goal::AtMost(limit) => format!("≤ {} {}", self.number(limit), self.unit),
            Goal::AtLeast(limit) => format!("≥ {} {}", self.number(limit), self.unit),
            Goal::None => "–".to_owned(),
        }
    }

    fn verdict(&self) -> &'static str {
        match self.met() {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "",
        }
    }

    /// For the progress output.
    pub fn one_line(&self) -> String {
        let mut line = format!(
            "  {}: {} (goal {}) {}",
            self.figure,
            self.measured().replace("**", ""),
            self.goal_text(),
            self.verdict().replace("**", "")
        );
        if !self.detail.is_empty() {
            let _ = write!(line, " — {}", self.detail);
        }
        line
    }
}

/// Units of things counted one by one, printed without decimals when whole.
const COUNT_UNITS: [&str; 2] = ["bytes", "lines"];

/// A number with as many digits as it deserves.
fn number(value: f64) -> String {
    let abs = value.abs();
    if abs >= 10_000.0 {
        grouped(value)
    } else if abs >= 100.0 {
        format!("{value:.0}")
    } else if abs >= 10.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.3}")
    }
}

/// `value` rounded to a whole number, its digits grouped by thousands.
fn grouped(value: f64) -> String {
    let digits = format!("{:.0}", value.abs());
    let mut out = String::from(if value < 0.0 { "-" } else { "" });
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

/// The machine the numbers come from, for the table's caption.
pub struct Machine(String);

impl Machine {
    pub fn describe(quick: bool) -> Machine {
        let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let cpus = std::thread::available_parallelism().map_or(0, usize::from);
        let model = fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|info| {
                info.lines()
                    .find_map(|line| line.strip_prefix("model name"))
                    .map(|rest| rest.trim_start_matches([' ', '\t', ':']).to_owned())
            })
            .unwrap_or_else(|| "unknown CPU".to_owned());
        let mode = if quick {
            ", `--quick`: too few rounds to quote"
        } else {
            ""
        };
        Machine(format!(
            "Linux {}, {cpus} CPUs ({model}){mode}",
            kernel.trim()
        ))
    }
}

/// The table, with the machine it was measured on.
pub fn markdown(rows: &[Row], machine: &Machine) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "Measured by `cargo xtask bench` on {}.", machine.0);
    let _ = writeln!(
        out,
        "Ratios are with/without portwatch, paired per round; **median** (min–max, rounds)."
    );
    let _ = writeln!(out);
    let _ = writeln!(out, "| Figure | Measured | Goal | Met | Detail |");
    let _ = writeln!(out, "|---|---|---|---|---|");
    for row in rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} |",
            row.figure,
            row.measured(),
            row.goal_text(),
            row.verdict(),
            row.detail.replace('|', "\\|")
        );
    }
    out
}

#[derive(Serialize)]
struct JsonReport<'a> {
    quick: bool,
    rows: &'a [Row],
}

pub fn json(rows: &[Row], quick: bool) -> Result<String> {
    serde_json::to_string_pretty(&JsonReport { quick, rows }).context("encoding the results")
}

/// Replaces the text between the README's bench markers with `table`.
pub fn write_readme(readme: &Path, table: &str) -> Result<()> {
    crate::readme::replace_section(readme, README_BEGIN, README_END, table)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_take_the_middle_and_the_ends() {
        let stats = Stats::of(vec![3.0, 1.0, 2.0, 10.0]).unwrap();
        assert_eq!((stats.min, stats.median, stats.max), (1.0, 2.5, 10.0));
        assert!(Stats::of(vec![]).is_err());
        assert!(Stats::of(vec![1.0, f64::NAN]).is_err());
        let ratios = Stats::of_ratios(&[2.0, 3.0, 8.0], &[1.0, 2.0, 2.0]).unwrap();
        assert_eq!(ratios.samples, [2.0, 1.5, 4.0]);
        assert_eq!(Stats::median_of(&[5.0, 1.0, 3.0]).unwrap(), 3.0);
    }

    #[test]
    fn goals_are_checked_against_the_median() {
        let row = Row::new(
            "x",
            "×",
            Stats::of(vec![1.0, 1.2, 1.3]).unwrap(),
            Goal::AtMost(1.1),
        );
        assert_eq!(row.met(), Some(false));
        let row = Row::new(
            "x",
            "binds/s",
            Stats::of(vec![250e3]).unwrap(),
            Goal::AtLeast(200e3),
        );
        assert_eq!(row.met(), Some(true));
    }

    #[test]
    fn numbers_are_grouped_and_rounded() {
        assert_eq!(number(201_234.0), "201,234");
        assert_eq!(number(1_234_567.0), "1,234,567");
        assert_eq!(number(123.4), "123");
        assert_eq!(number(1.0734), "1.073");
        let lines = Row::new(
            "x",
            "lines",
            Stats::of(vec![5.0]).unwrap(),
            Goal::AtMost(40.0),
        );
        assert_eq!(lines.measured(), "5 lines");
        assert_eq!(lines.goal_text(), "≤ 40 lines");
        let bytes = Row::new("x", "bytes", Stats::of(vec![368.0]).unwrap(), Goal::None);
        assert_eq!(bytes.number(65_536.0), "65,536");
        assert_eq!(bytes.number(0.5), "0.500");
        let ms = Row::new("x", "ms", Stats::of(vec![5.0]).unwrap(), Goal::None);
        assert_eq!(ms.measured(), "5.000 ms");
    }

    #[test]
    fn the_readme_table_is_replaced_between_the_markers() {
        let dir = std::env::temp_dir().join(format!("xtask-readme-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let readme = dir.join("README.md");
        fs::write(
            &readme,
            format!("a\n{README_BEGIN}\nold\n{README_END}\nb\n"),
        )
        .unwrap();
        write_readme(&readme, "new\n").unwrap();
        let text = fs::read_to_string(&readme).unwrap();
        fs::remove_dir_all(&dir).unwrap();
        assert_eq!(text, format!("a\n{README_BEGIN}\nnew\n{README_END}\nb\n"));
    }
}
