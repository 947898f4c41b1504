//! The command-line client: `portwatch ports|explain|failures|ephemeral|watch|check`
//! ask a running daemon over its HTTP API and print tables or sentences.
//! Pure formatting lives in the `render_*` functions, tested without a
//! daemon.
//!
//! The daemon may serve TLS and ask for HTTP basic auth (its web config):
//! [`Client`] carries the CA and client certificate of the command line and
//! the credentials of the environment to every request.

use std::{
    fmt::Write as _,
    io::{BufRead, BufReader, Write},
};

use comfy_table::{CellAlignment, Table, presets::NOTHING};
use serde_json::Value;

pub use self::ephemeral::{ephemeral, render_ephemeral};
use crate::cli::{CheckArgs, ExplainArgs, FailuresArgs, Output, PortsArgs, ScopeArgs, WatchArgs};

mod ephemeral;
mod http;

pub use self::http::{Client, ClientError};

fn print(text: &str) -> Result<(), ClientError> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(ClientError::Output)
}

fn pretty(value: &Value) -> String {
    serde_json::to_string_pretty(value).unwrap_or_default() + "\n"
}

/// `path` with the query `pairs` (their values URL-encoded).
fn with_query<'a>(path: &str, pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    let mut query = form_urlencoded::Serializer::new(String::new());
    query.extend_pairs(pairs);
    let query = query.finish();
    if query.is_empty() {
        path.to_owned()
    } else {
        format!("{path}?{query}")
    }
}

impl ScopeArgs {
    /// The API's `netns` and `pod` parameters.
    fn pairs(&self) -> impl Iterator<Item = (&str, &str)> {
        [("netns", &self.netns), ("pod", &self.pod)]
            .into_iter()
            .filter_map(|(key, value)| Some((key, value.as_deref()?)))
    }
}

/// `portwatch ports [PORT]`.
pub fn ports(args: &PortsArgs) -> Result<(), ClientError> {
    let client = Client::new(&args.server)?;
    // Every namespace: the table lists them all, as `ss` would per namespace
    // (`/ports` always does; `/ports/{port}` when asked).
    let value = match args.port {
        Some(port) => client.get(&with_query(
            &format!("/ports/{port}"),
            args.scope.pairs().chain([("all", "true")]),
        ))?,
        None => every_page(
            &client,
            &with_query("/ports", args.scope.pairs().chain([("limit", "5000")])),
        )?,
    };
    match args.output {
        Output::Json => print(&pretty(&value)),
        Output::Table => {
            let listeners: Vec<Value> = match args.port {
                Some(_) => array(&value["listeners"]).to_vec(),
                None => array(&value["ports"])
                    .iter()
                    .flat_map(|port| array(&port["listeners"]).to_vec())
                    .collect(),
            };
            print(&render_listeners(&listeners, host_netns(&value)))
        }
    }
}

/// `GET /ports` and every page its `next` links lead to, as one answer
/// (all the ports, and no `next`).
fn every_page(client: &Client, first: &str) -> Result<Value, ClientError> {
    let mut whole = client.get(first)?;
    let mut next = whole["next"].as_str().map(str::to_owned);
    // Each page holds at least one port, so a server that keeps linking
    // past 65535 pages is looping.
    let mut pages = 1;
    while let Some(path) = next {
        pages += 1;
        if pages > 65_536 {
            return Err(ClientError::Decode(format!(
                "{} keeps linking to more pages of /ports ({path})",
                client.server
            )));
        }
        let mut page = client.get(&path)?;
        next = page["next"].as_str().map(str::to_owned);
        if let (Some(ports), Some(more)) =
            (whole["ports"].as_array_mut(), page["ports"].as_array_mut())
        {
            ports.append(more);
        }
    }
    whole["next"] = Value::Null;
    Ok(whole)
}

fn array(value: &Value) -> &[Value] {
    value.as_array().map_or(&[], Vec::as_slice)
}

fn text(value: &Value) -> String {
    match value {
        Value::Null => "-".to_owned(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// `1234/nginx,1240/nginx`.
fn holders(listener: &Value) -> String {
    let holders = array(&listener["holders"]);
    if holders.is_empty() {
        return "-".to_owned();
    }
    holders
        .iter()
        .map(|h| format!("{}/{}", text(&h["pid"]), text(&h["process"])))
        .collect::<Vec<_>>()
        .join(",")
}

fn options(listener: &Value) -> String {
    let mut set = Vec::new();
    let mut unknown = false;
    for (key, name) in [
        ("reuse_addr", "reuseaddr"),
        ("reuse_port", "reuseport"),
        ("v6only", "v6only"),
    ] {
        match &listener[key] {
            Value::Bool(true) => set.push(name),
            Value::Null if !(key == "v6only" && listener["family"] == "ipv4") => unknown = true,
            _ => {}
        }
    }
    let mut cell = if set.is_empty() {
        "-".to_owned()
    } else {
        set.join(",")
    };
    if unknown {
        cell.push('?');
    }
    cell
}

/// The host's network namespace cookie, as an answer names it.
fn host_netns(value: &Value) -> Option<u64> {
    value["host_netns"].as_u64()
}

/// Where a listener is: `host` (with its pod, `host (kube-system/proxy)`,
/// for a pod on the host's network), a pod (`shop/web-1`), a container's
/// name (or its id's first 12 digits), else its namespace cookie.
fn netns_or_pod(listener: &Value, host: Option<u64>) -> String {
    let pod = pod_name(listener);
    if listener["netns"]
        .as_u64()
        .is_some_and(|netns| Some(netns) == host)
    {
        return match pod {
            Some(pod) => format!("host ({pod})"),
            None => "host".to_owned(),
        };
    }
    pod.or_else(|| container_label(listener))
        .unwrap_or_else(|| text(&listener["netns"]))
}

/// `shop/web-1`: an owner's pod, when known.
fn pod_name(owner: &Value) -> Option<String> {
    match (&owner["pod_namespace"], &owner["pod"]) {
        (Value::String(namespace), Value::String(pod)) => Some(format!("{namespace}/{pod}")),
        _ => None,
    }
}

/// An owner's container: its name, else its id's first 12 digits.
fn container_label(owner: &Value) -> Option<String> {
    match (&owner["container_name"], &owner["container"]) {
        (Value::String(name), _) => Some(name.clone()),
        (_, Value::String(id)) => Some(format!("{id:.12}")),
        _ => None,
    }
}

/// The `ss`-style table: borderless, aligned. `host` is the host's network
/// namespace cookie, when the answer said it.
pub fn render_listeners(listeners: &[Value], host: Option<u64>) -> String {
    let mut table = Table::new();
    table.load_preset(NOTHING).set_header([
        "PROTO",
        "LOCAL",
        "PROCESS",
        "UID",
        "UNIT",
        "OPTIONS",
        "NETNS/POD",
        "SINCE",
    ]);
    for listener in listeners {
        let unit = match (&listener["unit"], &listener["container"]) {
            (Value::String(unit), _) => unit.clone(),
            (_, Value::String(container)) => format!("container {:.12}", container),
            _ => "-".to_owned(),
        };
        table.add_row([
            text(&listener["protocol"]),
            text(&listener["endpoint"]),
            holders(listener),
            text(&listener["uid"]),
            unit,
            options(listener),
            netns_or_pod(listener, host),
            since(listener),
        ]);
    }
    // Like ss: no border, no leading space, two spaces between columns.
    for column in table.column_iter_mut() {
        column.set_padding((0, 2));
    }
    if let Some(column) = table.column_mut(3) {
        column.set_cell_alignment(CellAlignment::Right);
    }
    let mut out = table.trim_fmt();
    out.push('\n');
    if listeners.is_empty() {
        out.push_str("(no listeners)\n");
    }
    out
}

fn since(listener: &Value) -> String {
    let time = text(&listener["since"]);
    let short = time.get(..19).unwrap_or(&time).replace('T', " ");
    if listener["since_exact"] == Value::Bool(false) {
        format!("before {short}")
    } else {
        short
    }
}

/// `portwatch explain PORT`.
pub fn explain(args: &ExplainArgs) -> Result<(), ClientError> {
    let all = args.all.then_some(("all", "true"));
    let path = with_query(
        &format!("/ports/{}", args.port),
        args.scope.pairs().chain(all),
    );
    let value = Client::new(&args.server)?.get(&path)?;
    match args.output {
        Output::Json => print(&pretty(&value)),
        Output::Table => print(&render_explanation(&value)),
    }
}

/// The listeners of one port table, why they share it, and its surprises.
fn render_port_table(
    out: &mut String,
    number: &str,
    listeners: &[Value],
    sharing: &[Value],
    flags: &[Value],
) {
    match listeners.len() {
        0 => {
            let _ = writeln!(out, "Nothing listens on port {number}.");
        }
        1 => {
            let _ = writeln!(out, "One service listens on port {number}:");
        }
        n => {
            let _ = writeln!(out, "{n} services listen on port {number}:");
        }
    }
    for listener in listeners {
        let _ = writeln!(out, "  - {}", describe_listener(listener));
    }
    if !sharing.is_empty() {
        let _ = writeln!(out, "Why they can share the port:");
        for reason in sharing {
            let _ = writeln!(out, "  - {}", text(&reason["explanation"]));
        }
    }
    for flag in flags {
        let _ = writeln!(
            out,
            "Note ({}): {}.",
            text(&flag["flag"]),
            text(&flag["explanation"])
        );
    }
}

fn plural(n: u64, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

/// `the host namespace (netns 4026531840)`, `pod shop/web-1 (container
/// app), netns 4026532001`, `netns 4026532001 (python3)`.
fn namespace_name(namespace: &Value) -> String {
    let netns = text(&namespace["netns"]);
    if namespace["host"] == true {
        return format!("the host namespace (netns {netns})");
    }
    match workload(namespace) {
        Some(workload) => format!("{workload}, netns {netns}"),
        None => {
            let processes: Vec<String> = array(&namespace["processes"]).iter().map(text).collect();
            if processes.is_empty() {
                format!("netns {netns}")
            } else {
                format!("netns {netns} ({})", processes.join(", "))
            }
        }
    }
}

/// `the host, 150 pods (by Kubernetes namespace: web 100, shop 50), 2
/// containers; held by python3 in 150, nginx in 3`.
fn summary(summary: &Value) -> String {
    let count = |key: &str| summary[key].as_u64().unwrap_or(0);
    let names = |key: &str, sep: &str| -> String {
        array(&summary[key])
            .iter()
            .map(|n| format!("{}{sep}{}", text(&n["name"]), text(&n["namespaces"])))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut parts = Vec::new();
    if summary["host"] == true {
        parts.push("the host".to_owned());
    }
    if count("pods") > 0 {
        let pods = plural(count("pods"), "pod");
        let namespaces = names("pod_namespaces", " ");
        parts.push(if namespaces.is_empty() {
            pods
        } else {
            format!("{pods} (by Kubernetes namespace: {namespaces})")
        });
    }
    if count("containers") > 0 {
        parts.push(plural(count("containers"), "container"));
    }
    if count("other") > 0 {
        parts.push(format!("{} with no known pod or container", count("other")));
    }
    let mut line = parts.join(", ");
    let processes = names("processes", " in ");
    if !processes.is_empty() {
        let _ = write!(line, "; held by {processes}");
    }
    line
}

fn describe_listener(listener: &Value) -> String {
    let mut line = format!(
        "{} {}",
        text(&listener["protocol"]),
        text(&listener["endpoint"])
    );
    let opts = options(listener);
    if opts != "-" {
        let _ = write!(line, " ({opts})");
    }
    let owners = array(&listener["holders"]);
    if owners.is_empty() {
        line.push_str(", owner unknown");
    } else {
        let names: Vec<String> = owners
            .iter()
            .map(|h| format!("{} (pid {})", text(&h["process"]), text(&h["pid"])))
            .collect();
        let _ = write!(line, " held by {}", names.join(", "));
    }
    // A container's own unit (`docker-<id>.scope`) says less than its name.
    if let Some(workload) = workload(listener) {
        let _ = write!(line, ", {workload}");
    } else if let Value::String(unit) = &listener["unit"] {
        let _ = write!(line, ", unit {unit}");
    }
    line
}

/// `pod shop/web-1 (container app)`, `container web`, `container 0123456789ab`:
/// the workload an owner belongs to, when known.
fn workload(owner: &Value) -> Option<String> {
    match (pod_name(owner), container_label(owner)) {
        (Some(pod), Some(container)) => Some(format!("pod {pod} (container {container})")),
        (Some(pod), None) => Some(format!("pod {pod}")),
        (None, Some(container)) => Some(format!("container {container}")),
        (None, None) => None,
    }
}

/// The plain-sentence explanation of one port, from `/ports/{port}`. One
/// network namespace reads as it always has; several are summarized first,
/// then each namespace shown gets its own paragraph.
pub fn render_explanation(port: &Value) -> String {
    let number = text(&port["port"]);
    let listeners = array(&port["listeners"]);
    let namespaces = array(&port["namespaces"]);
    let netns_count = port["netns_count"].as_u64().unwrap_or(0);
    let mut out = String::new();
    if netns_count <= 1 {
        // One namespace, not the host's (a pod's, `--netns`): say whose.
        if let Some(namespace) = namespaces.first().filter(|n| n["host"] == false) {
            let _ = writeln!(out, "In {}:", namespace_name(namespace));
        }
        render_port_table(
            &mut out,
            &number,
            listeners,
            array(&port["sharing"]),
            array(&port["flag_details"]),
        );
    } else {
        let _ = writeln!(
            out,
            "Port {number} is used in {netns_count} network namespaces: {}.",
            summary(&port["summary"])
        );
        let _ = writeln!(
            out,
            "Each has its own port table: listeners in different namespaces never share the port or block each other."
        );
        for namespace in namespaces {
            let cookies = array(&namespace["listeners"]);
            let members: Vec<Value> = listeners
                .iter()
                .filter(|l| cookies.contains(&l["cookie"]))
                .cloned()
                .collect();
            let _ = writeln!(out, "\nIn {}:", namespace_name(namespace));
            render_port_table(
                &mut out,
                &number,
                &members,
                array(&namespace["sharing"]),
                array(&namespace["flag_details"]),
            );
            if let Some(failed) = namespace["recent_failures"].as_u64().filter(|&n| n > 0) {
                let _ = writeln!(out, "{} here (below).", plural(failed, "recent failure"));
            }
        }
        if let Some(hidden) = port["namespaces_hidden"].as_u64().filter(|&n| n > 0) {
            let why = match port["namespaces_hidden_eventful"].as_u64().unwrap_or(0) {
                0 => "nothing is shared or failed there".to_owned(),
                n => format!("{n} of them with something shared or failed"),
            };
            let _ = writeln!(
                out,
                "\n{} not shown: {why} (`portwatch explain {number} --all` lists every one).",
                plural(hidden, "more namespace")
            );
        }
    }
    let localhost = &port["localhost"];
    let order: Vec<String> = array(&localhost["order"]).iter().map(text).collect();
    match &localhost["reaches"] {
        Value::Null => {
            let _ = writeln!(
                out,
                "localhost:{number} reaches nothing over TCP (this machine tries {}).",
                order.join(", then ")
            );
        }
        reaches => {
            let _ = writeln!(
                out,
                "localhost:{number} reaches {} via {} (this machine tries {}).",
                describe_listener(reaches),
                text(&localhost["via"]),
                order.join(", then ")
            );
        }
    }
    let failures = array(&port["recent_failures"]);
    if !failures.is_empty() {
        let _ = writeln!(out, "Recent failures:");
        for failure in failures {
            let _ = writeln!(out, "  - {}", describe_failure(failure));
        }
    }
    out
}

/// `python3 (pid 12, demo.service)`: a process, and its workload or unit
/// when known.
fn who(process: &Value) -> String {
    // A container's own unit (`docker-<id>.scope`) says less than its name.
    let place = workload(process)
        .or_else(|| process["unit"].as_str().map(str::to_owned))
        .map(|place| format!(", {place}"))
        .unwrap_or_default();
    format!(
        "{} (pid {}{place})",
        text(&process["process"]),
        text(&process["pid"])
    )
}

fn describe_failure(failure: &Value) -> String {
    let time = text(&failure["time"]);
    let time = time.get(11..19).unwrap_or(&time).to_owned();
    let (verb, target) = match failure["kind"].as_str() {
        Some("listen_failed") => ("listen on", text(&failure["endpoint"])),
        Some("connect_failed") => ("connect", format!("to {}", text(&failure["destination"]))),
        _ => ("bind", text(&failure["endpoint"])),
    };
    let mut line = format!(
        "{time} {} could not {verb} {} {target}: {}",
        who(failure),
        text(&failure["protocol"]),
        text(&failure["errno"]),
    );
    if let Some(cause) = failure["cause"].as_str() {
        let _ = write!(line, ", {cause}");
    }
    if failure["ephemeral_range_exhausted"] == true {
        line.push_str(", no free port left in the ephemeral range (`portwatch ephemeral` shows what fills it)");
    }
    let blockers = array(&failure["blocked_by"]);
    for (i, blocker) in blockers.iter().enumerate() {
        let owners: Vec<String> = array(&blocker["holders"]).iter().map(who).collect();
        let owners = if owners.is_empty() {
            "an unknown process".to_owned()
        } else {
            owners.join(", ")
        };
        let _ = write!(
            line,
            "{} a {} of {owners} on {}: {}",
            if i == 0 { ", blocked by" } else { "; and by" },
            text(&blocker["what"]),
            text(&blocker["endpoint"]),
            text(&blocker["reason"]),
        );
    }
    line
}

/// `portwatch failures`.
pub fn failures(args: &FailuresArgs) -> Result<(), ClientError> {
    let limit = args.limit.to_string();
    let port = args.port.map(|port| port.to_string());
    let pairs = [
        ("limit", Some(&limit)),
        ("port", port.as_ref()),
        ("errno", args.errno.as_ref()),
        ("pod", args.pod.as_ref()),
    ];
    let pairs = pairs
        .into_iter()
        .filter_map(|(key, value)| Some((key, value?.as_str())));
    let value = Client::new(&args.server)?.get(&with_query("/failures", pairs))?;
    match args.output {
        Output::Json => print(&pretty(&value)),
        Output::Table => {
            let lines: String = array(&value["failures"])
                .iter()
                .map(|f| describe_failure(f) + "\n")
                .collect();
            print(if lines.is_empty() {
                "(no failures)\n"
            } else {
                &lines
            })
        }
    }
}

/// `portwatch watch`: follows `/events` until interrupted or the daemon stops.
pub fn watch(args: &WatchArgs) -> Result<(), ClientError> {
    let client = Client::new(&args.server)?;
    let mut path = "/events".to_owned();
    if let Some(port) = args.port {
        let _ = write!(path, "?port={port}");
    }
    let response = client
        .request(&path)
        .config()
        // The stream lasts as long as the daemon runs.
        .timeout_global(None)
        .build()
        .call()
        .map_err(|err| client.request_error(err))?;
    if response.status().as_u16() == 401 {
        return Err(client.unauthorized());
    }
    if response.status().as_u16() >= 400 {
        return Err(ClientError::Problem {
            status: response.status().as_u16(),
            detail: "the daemon refused the event stream".to_owned(),
        });
    }
    let reader = BufReader::new(response.into_body().into_reader());
    let mut out = std::io::stdout().lock();
    let mut event_name = String::new();
    for line in reader.lines() {
        let line = line.map_err(|err| client.body_error(err.into()))?;
        if let Some(name) = line.strip_prefix("event:") {
            event_name = name.trim().to_owned();
            continue;
        }
        let Some(data) = line.strip_prefix("data:") else {
            continue;
        };
        let data = data.trim();
        let text_line = if event_name == "lagged" {
            format!("(missed events: {data})")
        } else if args.json {
            data.to_owned()
        } else {
            match serde_json::from_str::<Value>(data) {
                Ok(event) => render_event(&event),
                Err(_) => continue,
            }
        };
        event_name.clear();
        match writeln!(out, "{text_line}").and_then(|()| out.flush()) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
            Err(err) => return Err(ClientError::Output(err)),
        }
    }
    Ok(())
}

/// One live event as a line: time, pid, process, kind, endpoint, result.
pub fn render_event(event: &Value) -> String {
    let time = text(&event["time"]);
    let time = time.get(11..23).unwrap_or(&time).to_owned();
    let result = match &event["errno"] {
        Value::Null => "ok".to_owned(),
        errno => text(errno),
    };
    format!(
        "{time} {:>7} {:<15} {:<13} {:<5} {:<24} {result}",
        text(&event["pid"]),
        text(&event["process"]),
        text(&event["kind"]),
        text(&event["protocol"]),
        text(&event["endpoint"]),
    )
}

/// `portwatch check`: Ok(true) if the bind would succeed.
pub fn check(args: &CheckArgs) -> Result<bool, ClientError> {
    let path = format!(
        "/check?protocol={}&address={}&port={}&reuse_port={}&reuse_addr={}&v6only={}",
        args.protocol,
        args.endpoint.ip(),
        args.endpoint.port(),
        args.reuse_port,
        args.reuse_addr,
        args.v6only,
    );
    let path = match args.netns {
        Some(netns) => format!("{path}&netns={netns}"),
        None => path,
    };
    let value = Client::new(&args.server)?.get(&path)?;
    match args.output {
        Output::Json => print(&pretty(&value))?,
        Output::Table => print(&(text(&value["explanation"]) + "\n"))?,
    }
    value["ok"]
        .as_bool()
        .ok_or_else(|| ClientError::Decode("no `ok` in the answer".to_owned()))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn listener(pid: u32, endpoint: &str, family: &str, v6only: Value) -> Value {
        json!({
            "protocol": "tcp", "family": family, "endpoint": endpoint, "uid": 1000,
            "holders": [{"pid": pid, "process": "node"}], "unit": "app.service",
            "container": null, "reuse_addr": false, "reuse_port": false, "v6only": v6only,
            "netns": 4026531840u64, "since": "2024-05-01T12:00:02.000000000Z", "since_exact": true
        })
    }

    #[test]
    fn the_table_is_aligned_and_names_owners() {
        let rows = [
            listener(2001, "0.0.0.0:8000", "ipv4", Value::Null),
            listener(2002, "[::]:8000", "ipv6", Value::Bool(true)),
        ];
        let table = render_listeners(&rows, None);
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].starts_with("PROTO"), "{table}");
        assert!(
            lines[1].contains("2001/node") && lines[2].contains("v6only"),
            "{table}"
        );
        // Columns line up: LOCAL starts at the same place in every line.
        let at = lines[0].find("LOCAL").unwrap();
        assert_eq!(&lines[1][at..at + 7], "0.0.0.0");
        assert_eq!(&lines[2][at..at + 4], "[::]");
        assert!(
            !lines[1].contains('?'),
            "v6only is not unknown for IPv4: {table}"
        );
        assert!(render_listeners(&[], None).ends_with("(no listeners)\n"));
    }

    #[test]
    fn explanations_are_sentences() {
        let port = json!({
            "port": 8000,
            "listeners": [listener(2001, "0.0.0.0:8000", "ipv4", Value::Null), listener(2002, "[::]:8000", "ipv6", Value::Bool(true))],
            "sharing": [{"kind": "v6only_split", "explanation": "the IPv6 socket is v6only"}],
            "flag_details": [{"flag": "dual_stack_split", "explanation": "IPv4 is served by pid 2001 and IPv6 by pid 2002"}],
            "localhost": {"reaches": listener(2002, "[::]:8000", "ipv6", Value::Bool(true)), "via": "::1", "order": ["::1", "127.0.0.1"]},
            "recent_failures": [{
                "time": "2024-05-01T12:00:10.000000000Z", "kind": "bind_failed", "pid": 3003, "process": "python3",
                "unit": "app.service", "protocol": "tcp", "endpoint": "0.0.0.0:8000", "errno": "EADDRINUSE",
                "blocked_by": [{"what": "listener", "endpoint": "0.0.0.0:8000", "reason": "same address",
                                "holders": [{"pid": 2001, "process": "node", "unit": null, "container": "0123abcd"}]}]
            }]
        });
        let text = render_explanation(&port);
        assert!(
            text.starts_with("2 services listen on port 8000:"),
            "{text}"
        );
        assert!(
            text.contains("localhost:8000 reaches tcp [::]:8000 (v6only) held by node (pid 2002)"),
            "{text}"
        );
        assert!(
            text.contains("via ::1 (this machine tries ::1, then 127.0.0.1)"),
            "{text}"
        );
        assert!(text.contains("Note (dual_stack_split)"), "{text}");
        assert!(text.contains("python3 (pid 3003, app.service) could not bind tcp 0.0.0.0:8000: EADDRINUSE, blocked by a listener of node (pid 2001, container 0123abcd)"), "{text}");
        let empty = render_explanation(
            &json!({"port": 9, "listeners": [], "localhost": {"reaches": null, "order": ["::1"]}}),
        );
        assert!(empty.starts_with("Nothing listens on port 9."), "{empty}");
        assert!(empty.contains("reaches nothing"), "{empty}");
    }

    #[test]
    fn a_failed_connect_reads_as_where_it_went_and_why() {
        let port = json!({
            "port": 8000,
            "listeners": [],
            "localhost": {"reaches": null, "order": ["127.0.0.1"]},
            "recent_failures": [{
                "time": "2026-12-05T22:20:07.000000000Z", "kind": "connect_failed",
                "pid": 19828, "process": "python3", "unit": null, "protocol": "tcp",
                "endpoint": "0.0.0.0:0", "destination": "127.0.0.1:8000",
                "errno": "EADDRNOTAVAIL", "blocked_by": [],
                "cause": "all 8 usable local ports to 127.0.0.1:8000 were in use (range 40000-40009, 0 reserved, 2 held by binds; listed 870 ms after)"
            }]
        });
        let text = render_explanation(&port);
        assert!(
            text.contains("python3 (pid 19828) could not connect tcp to 127.0.0.1:8000: EADDRNOTAVAIL, all 8 usable local ports to 127.0.0.1:8000 were in use"),
            "{text}"
        );
    }
}
