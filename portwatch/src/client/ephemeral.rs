//! `portwatch ephemeral`: each network namespace's ephemeral port range, its
//! busiest destinations and what takes ports from it, from `GET /ephemeral`.

use std::fmt::Write as _;

use comfy_table::{CellAlignment, Table, presets::NOTHING};
use serde_json::Value;

use super::{
    Client, ClientError, array, describe_failure, holders, pretty, print, text, with_query,
};
use crate::cli::{EphemeralArgs, Output};

/// `portwatch ephemeral`.
pub fn ephemeral(args: &EphemeralArgs) -> Result<(), ClientError> {
    let limit = args.limit.to_string();
    let mut pairs: Vec<(&str, &str)> = args.scope.pairs().collect();
    pairs.push(("limit", &limit));
    if args.all {
        pairs.push(("all", "true"));
    }
    let value = Client::new(&args.server)?.get(&with_query("/ephemeral", pairs))?;
    match args.output {
        Output::Json => print(&pretty(&value)),
        Output::Table => print(&render_ephemeral(&value)),
    }
}

/// `0.35` as `35.0%`.
fn percent(value: &Value) -> String {
    value
        .as_f64()
        .map_or_else(|| "-".to_owned(), |ratio| format!("{:.1}%", ratio * 100.0))
}

/// Every namespace of a `/ephemeral` answer: a headline, the destinations'
/// table, UDP, and what takes ports from the range.
pub fn render_ephemeral(answer: &Value) -> String {
    let mut out = String::new();
    let namespaces = array(&answer["namespaces"]);
    if namespaces.is_empty() {
        out.push_str("(no namespace matches)\n");
    }
    for (i, ns) in namespaces.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        render_namespace(&mut out, ns);
    }
    let hidden = answer["namespaces_hidden"].as_u64().unwrap_or(0);
    if hidden > 0 {
        let _ = writeln!(
            out,
            "\n{hidden} more namespaces, less full, not shown (--all shows them)"
        );
    }
    let _ = writeln!(out, "\nlisted at {}", text(&answer["listed_at"]));
    out
}

fn render_namespace(out: &mut String, ns: &Value) {
    let name = text(&ns["name"]);
    let cookie = text(&ns["netns"]);
    let title = if ns["host"] == true {
        "host".to_owned()
    } else if name == format!("netns-{cookie}") {
        format!("netns {cookie}")
    } else {
        format!("{name} (netns {cookie})")
    };
    let _ = writeln!(
        out,
        "{title}: range {}-{} ({} ports, {} reserved, {} held by binds): {} usable per destination",
        text(&ns["range_low"]),
        text(&ns["range_high"]),
        text(&ns["size"]),
        text(&ns["reserved"]),
        text(&ns["held"]),
        text(&ns["usable"]),
    );
    let destinations = array(&ns["destinations"]);
    if destinations.is_empty() {
        out.push_str("  no outgoing TCP connections from the range\n");
    } else {
        let _ = writeln!(
            out,
            "  busiest destination: {} of {} usable ports in use ({})",
            text(&ns["in_use"]),
            text(&ns["usable"]),
            percent(&ns["utilization"])
        );
        out.push_str(&destination_table(destinations));
        more(
            out,
            &ns["destinations_total"],
            destinations.len(),
            "destinations, less used",
        );
    }
    if let Some(line) = pace(ns) {
        let _ = writeln!(out, "  {line}");
    }
    let udp = &ns["udp"];
    let _ = writeln!(
        out,
        "  udp: {} of {} ports in use ({})",
        text(&udp["in_use"]),
        text(&udp["usable"]),
        percent(&udp["utilization"])
    );
    let anti_patterns = array(&ns["anti_patterns"]);
    for anti in anti_patterns {
        let _ = writeln!(
            out,
            "  ! {} {}:{} held by {}: {}",
            text(&anti["protocol"]),
            text(&anti["address"]),
            text(&anti["port"]),
            holders(anti),
            text(&anti["detail"]),
        );
    }
    more(
        out,
        &ns["anti_patterns_total"],
        anti_patterns.len(),
        "listeners inside the range",
    );
    for failure in array(&ns["recent_failures"]) {
        let _ = writeln!(out, "  {}", describe_failure(failure));
    }
}

/// `  (N more WHAT)` when `total` counts more than the `shown`.
fn more(out: &mut String, total: &Value, shown: usize, what: &str) {
    let hidden = total.as_u64().unwrap_or(0).saturating_sub(shown as u64);
    if hidden > 0 {
        let _ = writeln!(out, "  ({hidden} more {what})");
    }
}

/// `12.5 new connections/s; busiest destination +1.2/s: full in about 4 min`,
/// from the rate and trend fields, when the answer has them.
fn pace(ns: &Value) -> Option<String> {
    let mut parts = Vec::new();
    if let Some(rate) = ns["connect_rate"].as_f64() {
        parts.push(format!("{rate:.1} new connections/s"));
    }
    if let Some(growth) = ns["busiest_growth"].as_f64() {
        let mut part = format!("busiest destination {growth:+.1}/s");
        match ns["exhaustion_seconds"].as_f64() {
            Some(seconds) if seconds > 0.0 => {
                let _ = write!(part, ": full in about {}", duration(seconds));
            }
            Some(_) => part.push_str(": full now"),
            None => {}
        }
        parts.push(part);
    }
    (!parts.is_empty()).then(|| parts.join("; "))
}

/// `45 s`, `4 min`, `3 h`.
fn duration(seconds: f64) -> String {
    if seconds < 90.0 {
        format!("{seconds:.0} s")
    } else if seconds < 90.0 * 60.0 {
        format!("{:.0} min", seconds / 60.0)
    } else {
        format!("{:.0} h", seconds / 3600.0)
    }
}

fn destination_table(destinations: &[Value]) -> String {
    let mut table = Table::new();
    table.load_preset(NOTHING).set_header([
        "PROTO",
        "LOCAL",
        "DESTINATION",
        "IN USE",
        "ESTAB",
        "SYN-SENT",
        "TIME-WAIT",
        "CLOSING",
        "USE",
        "PROCESS",
    ]);
    for d in destinations {
        table.add_row([
            text(&d["protocol"]),
            text(&d["local_address"]),
            text(&d["destination"]),
            text(&d["in_use"]),
            text(&d["established"]),
            text(&d["syn_sent"]),
            text(&d["time_wait"]),
            text(&d["other"]),
            percent(&d["utilization"]),
            holders(d),
        ]);
    }
    for column in 3..9 {
        if let Some(column) = table.column_mut(column) {
            column.set_cell_alignment(CellAlignment::Right);
        }
    }
    table
        .lines()
        .map(|line| format!("  {}\n", line.trim_end()))
        .collect()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_namespace_reads_as_its_range_destinations_and_anti_patterns() {
        let answer = json!({
            "listed_at": "2026-12-05T12:00:00.000000000Z",
            "namespaces_hidden": 3,
            "namespaces": [{
                "netns": 4026532000u64, "host": false, "name": "shop/web-1",
                "range_low": 40000, "range_high": 40009, "size": 10, "reserved": 0,
                "held": 1, "usable": 9, "in_use": 9, "utilization": 1.0,
                "destinations_total": 3, "anti_patterns_total": 4,
                "destinations": [{
                    "protocol": "tcp", "local_address": "127.0.0.1",
                    "destination": "127.0.0.1:8000", "in_use": 9, "established": 7,
                    "syn_sent": 0, "time_wait": 2, "other": 0, "utilization": 1.0,
                    "holders": [{"pid": 42, "process": "client"}]
                }],
                "udp": {"in_use": 2, "usable": 10, "utilization": 0.2},
                "anti_patterns": [{
                    "kind": "listener_in_range", "protocol": "tcp", "address": "0.0.0.0",
                    "port": 40009, "holders": [{"pid": 7, "process": "server"}],
                    "detail": "port 40009 is inside the ephemeral range"
                }],
                "recent_failures": []
            }]
        });
        let text = render_ephemeral(&answer);
        assert!(text.starts_with("shop/web-1 (netns 4026532000): range 40000-40009 (10 ports, 0 reserved, 1 held by binds): 9 usable per destination\n"), "{text}");
        assert!(
            text.contains("busiest destination: 9 of 9 usable ports in use (100.0%)"),
            "{text}"
        );
        assert!(text.contains("127.0.0.1:8000"), "{text}");
        assert!(text.contains("42/client"), "{text}");
        assert!(text.contains("(2 more destinations, less used)"), "{text}");
        assert!(
            text.contains("(3 more listeners inside the range)"),
            "{text}"
        );
        assert!(text.contains("udp: 2 of 10 ports in use (20.0%)"), "{text}");
        assert!(
            text.contains("! tcp 0.0.0.0:40009 held by 7/server: port 40009 is inside"),
            "{text}"
        );
        assert!(text.contains("3 more namespaces"), "{text}");
    }

    #[test]
    fn the_pace_says_when_the_busiest_destination_runs_out() {
        let ns = json!({"connect_rate": 12.5, "busiest_growth": 1.25, "exhaustion_seconds": 240.0});
        assert_eq!(
            pace(&ns).as_deref(),
            Some("12.5 new connections/s; busiest destination +1.2/s: full in about 4 min")
        );
        let full = json!({"busiest_growth": 0.0, "exhaustion_seconds": 0.0});
        assert_eq!(
            pace(&full).as_deref(),
            Some("busiest destination +0.0/s: full now")
        );
        assert_eq!(pace(&json!({})), None);
        assert_eq!(duration(30.0), "30 s");
        assert_eq!(duration(7200.0), "2 h");
    }

    #[test]
    fn nothing_listed_says_so() {
        let text = render_ephemeral(&json!({"namespaces": [], "listed_at": "x"}));
        assert!(text.starts_with("(no namespace matches)"), "{text}");
        assert_eq!(percent(&Value::Null), "-");
    }
}
