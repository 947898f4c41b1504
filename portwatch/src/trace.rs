//! What `portwatch trace` prints: which events pass the filter, and each one
//! as an aligned text line (like bindsnoop) or a JSON object per line.
//!
//! Pure formatting: the only outside input is the system time zone, read
//! through jiff for the text mode's local wall time.

use std::{collections::HashMap, fmt::Write as _, net::IpAddr, time::SystemTime};

use jiff::{Timestamp, tz::TimeZone};
use serde::Serialize;

use crate::event::{
    BootClock, Errno, ErrnoSource, EventKind, Family, Options, PortAlloc, PortEvent, Protocol,
    SockType, Source,
};

/// Which events `portwatch trace` shows. The default shows everything.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TraceFilter {
    /// Only events whose requested or bound port is this one.
    pub port: Option<u16>,
    /// Only events from this process id.
    pub pid: Option<u32>,
    /// Only failed binds and listens.
    pub failures_only: bool,
}

impl TraceFilter {
    /// Whether `ev` passes every condition that is set.
    pub fn matches(&self, ev: &PortEvent) -> bool {
        self.port.is_none_or(|port| ev.concerns_port(port))
            && self.pid.is_none_or(|pid| ev.pid == pid)
            && (!self.failures_only || ev.kind.is_failure())
    }
}

/// What `trace` remembers of the sockets it saw bound or listening, so that a
/// close, which the kernel reports by socket cookie alone, names its
/// endpoint and network namespace (and passes a `--port` filter), and a
/// listen or close shows the options read when the socket was bound.
#[derive(Debug, Default)]
pub struct SocketBook {
    known: HashMap<u64, Remembered>,
}

#[derive(Debug, Clone, Copy)]
struct Remembered {
    address: IpAddr,
    port: u16,
    bound_port: Option<u16>,
    netns: Option<u64>,
    options: Options,
}

impl SocketBook {
    /// Sockets remembered at most; past this, new ones are not remembered
    /// (their closes then show no endpoint) rather than growing without bound.
    pub const CAPACITY: usize = 1 << 20;

    /// Learns from bind and listen events; fills in and forgets on close.
    pub fn observe(&mut self, ev: &mut PortEvent) {
        let Some(cookie) = ev.cookie else { return };
        match ev.kind {
            EventKind::Bind | EventKind::Listen => {
                if let Some(known) = self.known.get(&cookie)
                    && ev.options == Options::default()
                {
                    ev.options = known.options;
                }
                if self.known.len() < Self::CAPACITY || self.known.contains_key(&cookie) {
                    let remembered = Remembered {
                        address: ev.address,
                        port: ev.port,
                        bound_port: ev.bound_port,
                        netns: ev.netns,
                        options: ev.options,
                    };
                    self.known.insert(cookie, remembered);
                }
            }
            EventKind::Close => {
                if let Some(known) = self.known.remove(&cookie) {
                    known.fill(ev);
                }
            }
            EventKind::ListenStop | EventKind::Connected => {
                if let Some(known) = self.known.get(&cookie) {
                    known.fill(ev);
                }
            }
            EventKind::BindFailed | EventKind::ListenFailed | EventKind::ConnectFailed => {}
        }
    }

    /// How many sockets are remembered.
    pub fn len(&self) -> usize {
        self.known.len()
    }

    /// Whether nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.known.is_empty()
    }
}

impl Remembered {
    fn fill(self, ev: &mut PortEvent) {
        ev.address = self.address;
        ev.port = self.port;
        ev.bound_port = ev.bound_port.or(self.bound_port);
        ev.netns = ev.netns.or(self.netns);
        if ev.options == Options::default() {
            ev.options = self.options;
        }
    }
}

/// How a text column is padded.
#[derive(Clone, Copy)]
enum Align {
    Left,
    Right,
}

/// Text columns: title, width, alignment. The last one is not padded.
const COLUMNS: [(&str, usize, Align); 10] = [
    ("TIME", 12, Align::Left),
    ("PID", 7, Align::Right),
    ("COMM", 16, Align::Left),
    ("UID", 6, Align::Right),
    ("PROTO", 7, Align::Left),
    ("EVENT", 13, Align::Left),
    ("ADDRESS", 23, Align::Left),
    ("BOUND", 5, Align::Right),
    ("OPTIONS", 16, Align::Left),
    ("RESULT", 0, Align::Left),
];

/// Lays out one text line; a cell wider than its column pushes the rest
/// right rather than being cut.
fn row(cells: [&str; COLUMNS.len()]) -> String {
    let mut line = String::with_capacity(128);
    for (i, (cell, (_, width, align))) in cells.into_iter().zip(COLUMNS).enumerate() {
        if i > 0 {
            line.push(' ');
        }
        // Writing to a String cannot fail.
        let _ = match align {
            _ if i == COLUMNS.len() - 1 => write!(line, "{cell}"),
            Align::Left => write!(line, "{cell:<width$}"),
            Align::Right => write!(line, "{cell:>width$}"),
        };
    }
    line
}

/// The title line printed before the first text line.
pub fn header() -> String {
    row(COLUMNS.map(|(title, _, _)| title))
}

/// One event as a text line, aligned under [`header`]:
///
/// - TIME: local wall time, `HH:MM:SS.mmm`;
/// - ADDRESS: the requested endpoint (`0.0.0.0:8000`, `[::1]:0`), `-` for a
///   close that carries none; for a connect, its destination
///   (`to 10.1.2.3:443`);
/// - BOUND: the port the kernel gave, `-` when none is known;
/// - OPTIONS: the options set among reuseaddr, reuseport, v6only, freebind,
///   transparent, noport (`-` for none), then `?` when some could not be
///   read (`?` alone when none could);
/// - RESULT: `ok`, the errno name of a failure (`EADDRINUSE(inferred)` when
///   no outcome hook ran and the conflict rules named it), or `-` for stops
///   and closes; then `backlog=N` for listeners when known.
pub fn text_line(ev: &PortEvent, clock: &BootClock) -> String {
    text_line_in(ev, clock, &TimeZone::system())
}

/// [`text_line`] with the time shown in `tz`.
fn text_line_in(ev: &PortEvent, clock: &BootClock, tz: &TimeZone) -> String {
    let time = timestamp(clock.to_system_time(ev.boot_ns))
        .to_zoned(tz.clone())
        .strftime("%H:%M:%S%.3f")
        .to_string();
    // comm is any bytes but NUL: keep control characters (a newline) from
    // breaking the one-line-per-event output.
    let comm: String = ev
        .process
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    let address = if let Some(peer) = ev.peer {
        format!("to {peer}")
    } else if ev.kind == EventKind::Close
        && ev.port == 0
        && ev.bound_port.is_none()
        && ev.address.is_unspecified()
    {
        "-".to_owned()
    } else {
        ev.requested_endpoint()
    };
    let bound = ev
        .bound_port
        .map_or_else(|| "-".to_owned(), |port| port.to_string());
    row([
        &time,
        &ev.pid.to_string(),
        &comm,
        &ev.uid.to_string(),
        ev.protocol.name(),
        ev.kind.name(),
        &address,
        &bound,
        &options_cell(ev),
        &result_cell(ev),
    ])
}

/// The OPTIONS cell: see [`text_line`].
fn options_cell(ev: &PortEvent) -> String {
    let o = &ev.options;
    let mut flags = vec![
        ("reuseaddr", o.reuse_addr),
        ("reuseport", o.reuse_port),
        ("freebind", o.freebind),
        ("transparent", o.transparent),
        ("noport", o.bind_address_no_port),
    ];
    // IPV6_V6ONLY means nothing on an IPv4 socket: not "unknown" there.
    if ev.family == Family::Ipv6 {
        flags.insert(2, ("v6only", o.v6only));
    }
    let set: Vec<&str> = flags
        .iter()
        .filter(|(_, value)| *value == Some(true))
        .map(|(name, _)| *name)
        .collect();
    let unknown = flags.iter().filter(|(_, value)| value.is_none()).count();
    if unknown == flags.len() {
        return "?".to_owned();
    }
    let mut cell = if set.is_empty() {
        "-".to_owned()
    } else {
        set.join(",")
    };
    if unknown > 0 {
        cell.push('?');
    }
    cell
}

/// The RESULT cell: see [`text_line`].
fn result_cell(ev: &PortEvent) -> String {
    let mut cell = match (ev.kind, ev.errno) {
        (_, Some(errno)) if ev.errno_source() == Some(ErrnoSource::Inferred) => {
            format!("{}(inferred)", errno.name())
        }
        (_, Some(errno)) => errno.name().into_owned(),
        (EventKind::Bind | EventKind::Listen | EventKind::Connected, None) => "ok".to_owned(),
        _ => "-".to_owned(),
    };
    if let Some(backlog) = ev.backlog {
        // Writing to a String cannot fail.
        let _ = write!(cell, " backlog={backlog}");
    }
    cell
}

/// One line of `portwatch trace --json`: a flat object, one per event.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JsonLine<'a> {
    /// Wall-clock time, RFC 3339 in UTC with nanoseconds.
    pub time: String,
    /// CLOCK_BOOTTIME nanoseconds, as the kernel recorded them.
    pub boot_ns: u64,
    /// `bind`, `bind_failed`, `listen`, `listen_failed`, `listen_stop`,
    /// `close`, `connect_failed`, `connected`.
    pub kind: EventKind,
    /// Process id.
    pub pid: u32,
    /// Thread id.
    pub tid: u32,
    /// `comm` of the calling task.
    pub process: &'a str,
    /// Real uid of the calling task.
    pub uid: u32,
    /// Owner uid of the socket; null when unknown.
    pub sock_uid: Option<u32>,
    /// cgroup v2 id of the calling task.
    pub cgroup_id: u64,
    /// Network namespace cookie; null when unknown.
    pub netns: Option<u64>,
    /// Socket cookie; null when unknown.
    pub cookie: Option<u64>,
    /// `tcp`, `udp`, `udplite`, `sctp`, `mptcp`.
    pub protocol: Protocol,
    /// `ipv4` or `ipv6`.
    pub family: Family,
    /// `stream`, `dgram`, ...
    pub sock_type: SockType,
    /// The IP alone (`::1`).
    pub address: IpAddr,
    /// Port asked for.
    pub port: u16,
    /// Port bound; null when none is known.
    pub bound_port: Option<u16>,
    /// Address and port, the bound port when known (`[::1]:8000`).
    pub endpoint: String,
    /// Errno name on failures (`EADDRINUSE`, `UNKNOWN`); null otherwise.
    pub errno: Option<Errno>,
    /// Where the errno came from: `kernel` (an outcome hook saw the call
    /// return) or `inferred` (no outcome hook ran; the conflict rules named
    /// it); null without a known errno.
    pub errno_source: Option<ErrnoSource>,
    /// SO_REUSEADDR; null when unknown.
    pub reuse_addr: Option<bool>,
    /// SO_REUSEPORT; null when unknown.
    pub reuse_port: Option<bool>,
    /// IPV6_V6ONLY; null when unknown and always on IPv4.
    pub v6only: Option<bool>,
    /// IP_FREEBIND; null when unknown.
    pub freebind: Option<bool>,
    /// IP_TRANSPARENT; null when unknown.
    pub transparent: Option<bool>,
    /// IP_BIND_ADDRESS_NO_PORT; null when unknown.
    pub bind_address_no_port: Option<bool>,
    /// Listen backlog; null when not a listener or unknown.
    pub backlog: Option<u32>,
    /// Kernel hook that reported the outcome.
    pub source: Source,
    /// TCP's port allocation verdict (`allocated`, `refused`); null when
    /// fexit on `inet_csk_get_port` is not attached or did not run (UDP).
    pub port_alloc: Option<PortAlloc>,
    /// A connect's destination (`10.1.2.3:443`); null for other kinds.
    pub peer: Option<String>,
}

impl<'a> JsonLine<'a> {
    /// The JSON view of `ev`, with its time converted by `clock`.
    pub fn new(ev: &'a PortEvent, clock: &BootClock) -> Self {
        Self {
            time: rfc3339(clock.to_system_time(ev.boot_ns)),
            boot_ns: ev.boot_ns,
            kind: ev.kind,
            pid: ev.pid,
            tid: ev.tid,
            process: &ev.process,
            uid: ev.uid,
            sock_uid: ev.sock_uid,
            cgroup_id: ev.cgroup_id,
            netns: ev.netns,
            cookie: ev.cookie,
            protocol: ev.protocol,
            family: ev.family,
            sock_type: ev.sock_type,
            address: ev.address,
            port: ev.port,
            bound_port: ev.bound_port,
            endpoint: ev.endpoint(),
            errno: ev.errno,
            errno_source: ev.errno_source(),
            reuse_addr: ev.options.reuse_addr,
            reuse_port: ev.options.reuse_port,
            v6only: ev.options.v6only,
            freebind: ev.options.freebind,
            transparent: ev.options.transparent,
            bind_address_no_port: ev.options.bind_address_no_port,
            backlog: ev.backlog,
            source: ev.source,
            port_alloc: ev.port_alloc,
            peer: ev.peer.map(|peer| peer.to_string()),
        }
    }
}

/// One event as a single-line JSON object (see [`JsonLine`]), no newline.
pub fn json_line(ev: &PortEvent, clock: &BootClock) -> String {
    serde_json::to_string(&JsonLine::new(ev, clock))
        .expect("a JsonLine holds only strings, numbers, booleans and nulls")
}

/// `time` as RFC 3339 in UTC with nanoseconds (`2024-05-01T12:34:56.000000000Z`),
/// as `trace --json` and the HTTP API write times; saturating as
/// [`timestamp`] does.
pub fn rfc3339(time: SystemTime) -> String {
    format!("{:.9}", timestamp(time))
}

/// `time` as a jiff timestamp, saturating at jiff's range (years -9999 to
/// 9999), which only nonsense boot times leave.
fn timestamp(time: SystemTime) -> Timestamp {
    Timestamp::try_from(time).unwrap_or_else(|_| {
        if time > SystemTime::UNIX_EPOCH {
            Timestamp::MAX
        } else {
            Timestamp::MIN
        }
    })
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use serde_json::Value;

    use super::*;

    /// 2024-05-01T12:34:56Z minus one second of boot time.
    const CLOCK: BootClock = BootClock::from_offset_ns(1_714_566_895_000_000_000);

    /// A failed bind of [::1]:8000 one and a quarter seconds after boot.
    fn failed_v6() -> PortEvent {
        PortEvent {
            kind: EventKind::BindFailed,
            boot_ns: 1_250_000_007,
            pid: 4321,
            tid: 4322,
            uid: 1000,
            sock_uid: Some(1000),
            process: "python3".into(),
            cgroup_id: 9876,
            netns: Some(4026531840),
            cookie: Some(12345),
            protocol: Protocol::Tcp,
            family: Family::Ipv6,
            sock_type: SockType::Stream,
            address: IpAddr::V6(Ipv6Addr::LOCALHOST),
            port: 8000,
            bound_port: None,
            errno: Some(Errno::EADDRINUSE),
            options: Options {
                reuse_addr: Some(true),
                reuse_port: Some(false),
                v6only: Some(false),
                freebind: Some(false),
                transparent: None,
                bind_address_no_port: Some(false),
            },
            backlog: None,
            source: Source::Fexit,
            port_alloc: Some(PortAlloc::Refused),
            peer: None,
        }
    }

    /// A successful listen on 0.0.0.0:8080.
    fn listen_v4() -> PortEvent {
        PortEvent {
            kind: EventKind::Listen,
            family: Family::Ipv4,
            address: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            port: 8080,
            bound_port: Some(8080),
            errno: None,
            options: Options::default(),
            backlog: Some(511),
            source: Source::State,
            port_alloc: Some(PortAlloc::Allocated),
            process: "nginx".into(),
            pid: 77,
            ..failed_v6()
        }
    }

    #[test]
    fn json_line_schema() {
        let line = json_line(&failed_v6(), &CLOCK);
        assert!(!line.contains('\n'));
        let v: Value = serde_json::from_str(&line).unwrap();
        let obj = v.as_object().unwrap();
        let strings = [
            ("time", "2024-05-01T12:34:56.250000007Z"),
            ("kind", "bind_failed"),
            ("process", "python3"),
            ("protocol", "tcp"),
            ("family", "ipv6"),
            ("sock_type", "stream"),
            ("address", "::1"),
            ("endpoint", "[::1]:8000"),
            ("errno", "EADDRINUSE"),
            ("errno_source", "kernel"),
            ("source", "fexit"),
            ("port_alloc", "refused"),
        ];
        for (key, want) in strings {
            assert_eq!(obj[key].as_str(), Some(want), "{key}");
        }
        let numbers = [
            ("pid", 4321),
            ("tid", 4322),
            ("uid", 1000),
            ("sock_uid", 1000),
            ("port", 8000),
            ("cookie", 12345),
            ("netns", 4026531840),
            ("cgroup_id", 9876),
            ("boot_ns", 1_250_000_007),
        ];
        for (key, want) in numbers {
            assert_eq!(obj[key].as_u64(), Some(want), "{key}");
        }
        let bools = [
            ("reuse_addr", Some(true)),
            ("reuse_port", Some(false)),
            ("v6only", Some(false)),
            ("freebind", Some(false)),
            ("transparent", None),
            ("bind_address_no_port", Some(false)),
        ];
        for (key, want) in bools {
            assert_eq!(obj[key].as_bool(), want, "{key}");
            assert_eq!(obj[key].is_null(), want.is_none(), "{key}");
        }
        assert!(obj["bound_port"].is_null());
        assert!(obj["backlog"].is_null());
        assert!(obj["peer"].is_null());
        assert_eq!(obj.len(), 30, "{line}");
    }

    #[test]
    fn json_line_exact() {
        assert_eq!(
            json_line(&listen_v4(), &CLOCK),
            concat!(
                r#"{"time":"2024-05-01T12:34:56.250000007Z","boot_ns":1250000007,"#,
                r#""kind":"listen","pid":77,"tid":4322,"process":"nginx","uid":1000,"#,
                r#""sock_uid":1000,"cgroup_id":9876,"netns":4026531840,"cookie":12345,"#,
                r#""protocol":"tcp","family":"ipv4","sock_type":"stream","#,
                r#""address":"0.0.0.0","port":8080,"bound_port":8080,"#,
                r#""endpoint":"0.0.0.0:8080","errno":null,"errno_source":null,"#,
                r#""reuse_addr":null,"#,
                r#""reuse_port":null,"v6only":null,"freebind":null,"transparent":null,"#,
                r#""bind_address_no_port":null,"backlog":511,"source":"state","#,
                r#""port_alloc":"allocated","peer":null}"#
            )
        );
    }

    #[test]
    fn json_endpoint_uses_the_bound_port() {
        let ev = PortEvent {
            kind: EventKind::Bind,
            port: 0,
            bound_port: Some(43210),
            errno: None,
            ..failed_v6()
        };
        let v: Value = serde_json::from_str(&json_line(&ev, &CLOCK)).unwrap();
        assert_eq!(v["endpoint"], "[::1]:43210");
        assert_eq!(v["port"], 0);
        assert_eq!(v["bound_port"], 43210);
        assert!(v["errno"].is_null());
    }

    #[test]
    fn header_and_lines_align() {
        let header = header();
        assert!(header.starts_with("TIME "));
        assert!(header.ends_with(" RESULT"));
        let lines = [
            text_line_in(&failed_v6(), &CLOCK, &TimeZone::UTC),
            text_line_in(&listen_v4(), &CLOCK, &TimeZone::UTC),
        ];
        // Every column but the last starts where its title does.
        for title in ["COMM", "PROTO", "EVENT", "ADDRESS", "OPTIONS", "RESULT"] {
            let at = header.find(title).unwrap();
            for line in &lines {
                assert_ne!(line.as_bytes()[at], b' ', "{title} in {line:?}");
                assert_eq!(line.as_bytes()[at - 1], b' ', "{title} in {line:?}");
            }
        }
    }

    #[test]
    fn text_line_exact() {
        assert_eq!(
            header(),
            "TIME             PID COMM                UID PROTO   EVENT         \
             ADDRESS                 BOUND OPTIONS          RESULT"
        );
        assert_eq!(
            text_line_in(&failed_v6(), &CLOCK, &TimeZone::UTC),
            "12:34:56.250    4321 python3            1000 tcp     bind_failed   \
             [::1]:8000                  - reuseaddr?       EADDRINUSE"
        );
        assert_eq!(
            text_line_in(&listen_v4(), &CLOCK, &TimeZone::UTC),
            "12:34:56.250      77 nginx              1000 tcp     listen        \
             0.0.0.0:8080             8080 ?                ok backlog=511"
        );
    }

    #[test]
    fn text_line_with_the_system_zone_has_errno_and_endpoint() {
        let line = text_line(&failed_v6(), &CLOCK);
        assert!(line.contains("EADDRINUSE"), "{line}");
        assert!(line.contains("[::1]:8000"), "{line}");
        assert!(line.contains("bind_failed"), "{line}");
    }

    #[test]
    fn text_result_column() {
        let unknown = PortEvent {
            errno: Some(Errno::UNKNOWN),
            source: Source::Unresolved,
            ..failed_v6()
        };
        assert!(text_line(&unknown, &CLOCK).ends_with(" UNKNOWN"));
        let inferred = PortEvent {
            errno: Some(Errno::EADDRINUSE),
            ..unknown.clone()
        };
        assert!(text_line(&inferred, &CLOCK).ends_with(" EADDRINUSE(inferred)"));
        let v: Value = serde_json::from_str(&json_line(&inferred, &CLOCK)).unwrap();
        assert_eq!(v["errno_source"], "inferred");
        let v: Value = serde_json::from_str(&json_line(&unknown, &CLOCK)).unwrap();
        assert!(v["errno_source"].is_null());
        let odd = PortEvent {
            errno: Some(Errno(4242)),
            ..failed_v6()
        };
        assert!(text_line(&odd, &CLOCK).ends_with(" E4242"));
        let stop = PortEvent {
            kind: EventKind::ListenStop,
            backlog: None,
            ..listen_v4()
        };
        assert!(text_line(&stop, &CLOCK).ends_with(" -"));
        let failed_listen = PortEvent {
            kind: EventKind::ListenFailed,
            errno: Some(Errno::EADDRINUSE),
            ..listen_v4()
        };
        assert!(text_line(&failed_listen, &CLOCK).ends_with(" EADDRINUSE backlog=511"));
    }

    #[test]
    fn text_close_without_address() {
        let close = PortEvent {
            kind: EventKind::Close,
            address: IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            port: 0,
            bound_port: None,
            errno: None,
            options: Options::default(),
            source: Source::Release,
            ..failed_v6()
        };
        let line = text_line_in(&close, &CLOCK, &TimeZone::UTC);
        assert!(line.contains(" close         -   "), "{line}");
        assert!(!line.contains("[::]:0"), "{line}");
    }

    #[test]
    fn text_line_keeps_control_characters_out() {
        let ev = PortEvent {
            process: "evil\nname\t".into(),
            ..failed_v6()
        };
        let line = text_line(&ev, &CLOCK);
        assert!(!line.contains('\n') && !line.contains('\t'), "{line:?}");
        assert!(line.contains("evil?name?"), "{line:?}");
    }

    #[test]
    fn options_cell() {
        let with = |family, options| PortEvent {
            family,
            options,
            ..failed_v6()
        };
        let all_known = Options {
            reuse_addr: Some(false),
            reuse_port: Some(false),
            v6only: Some(false),
            freebind: Some(false),
            transparent: Some(false),
            bind_address_no_port: Some(false),
        };
        let cases = [
            (Family::Ipv6, all_known, "-"),
            (Family::Ipv6, Options::default(), "?"),
            (
                Family::Ipv6,
                Options {
                    reuse_addr: Some(true),
                    reuse_port: Some(true),
                    v6only: Some(true),
                    freebind: Some(true),
                    transparent: Some(true),
                    bind_address_no_port: Some(true),
                },
                "reuseaddr,reuseport,v6only,freebind,transparent,noport",
            ),
            (
                Family::Ipv6,
                Options {
                    freebind: None,
                    ..all_known
                },
                "-?",
            ),
            (
                Family::Ipv6,
                Options {
                    reuse_port: Some(true),
                    transparent: None,
                    ..all_known
                },
                "reuseport?",
            ),
            // v6only is not applicable to IPv4, so its None is not "unknown".
            (
                Family::Ipv4,
                Options {
                    v6only: None,
                    reuse_addr: Some(true),
                    ..all_known
                },
                "reuseaddr",
            ),
        ];
        for (family, options, want) in cases {
            assert_eq!(
                super::options_cell(&with(family, options)),
                want,
                "{options:?}"
            );
        }
    }

    #[test]
    fn filter_by_port() {
        let filter = TraceFilter {
            port: Some(8000),
            ..TraceFilter::default()
        };
        assert!(filter.matches(&failed_v6()));
        assert!(!filter.matches(&listen_v4()));
        let ephemeral = PortEvent {
            port: 0,
            bound_port: Some(8000),
            ..listen_v4()
        };
        assert!(filter.matches(&ephemeral));
    }

    #[test]
    fn filter_by_pid_and_failures() {
        assert!(TraceFilter::default().matches(&failed_v6()));
        assert!(TraceFilter::default().matches(&listen_v4()));
        let pid = TraceFilter {
            pid: Some(77),
            ..TraceFilter::default()
        };
        assert!(pid.matches(&listen_v4()));
        assert!(!pid.matches(&failed_v6()));
        let failures = TraceFilter {
            failures_only: true,
            ..TraceFilter::default()
        };
        assert!(failures.matches(&failed_v6()));
        assert!(!failures.matches(&listen_v4()));
        let failed_listen = PortEvent {
            kind: EventKind::ListenFailed,
            errno: Some(Errno::EADDRINUSE),
            ..listen_v4()
        };
        assert!(failures.matches(&failed_listen));
        for kind in [EventKind::ListenStop, EventKind::Close, EventKind::Bind] {
            let ev = PortEvent {
                kind,
                errno: None,
                ..listen_v4()
            };
            assert!(!failures.matches(&ev), "{kind}");
        }
        let all = TraceFilter {
            port: Some(8080),
            pid: Some(77),
            failures_only: true,
        };
        assert!(all.matches(&failed_listen));
        assert!(!all.matches(&listen_v4()));
    }

    proptest::proptest! {
        #[test]
        fn every_decodable_record_formats(bytes in crate::event::tests::valid_record()) {
            let ev = crate::event::decode(&bytes).unwrap();
            let clock = BootClock::from_offset_ns(1_700_000_000_000_000_000);
            let text = text_line(&ev, &clock);
            proptest::prop_assert!(!text.contains('\n'));
            proptest::prop_assert!(text.contains(ev.kind.name()));
            let json: Value = serde_json::from_str(&json_line(&ev, &clock)).unwrap();
            let endpoint = ev.endpoint();
            proptest::prop_assert_eq!(json["endpoint"].as_str(), Some(endpoint.as_str()));
            let address: IpAddr = json["address"].as_str().unwrap().parse().unwrap();
            proptest::prop_assert_eq!(address, ev.address);
        }
    }

    #[test]
    fn nonsense_times_do_not_panic() {
        let ev = PortEvent {
            boot_ns: u64::MAX,
            ..failed_v6()
        };
        let far = BootClock::from_offset_ns(i128::MAX / 2);
        assert!(json_line(&ev, &far).contains("\"time\":\"9999-12-"));
        let _ = text_line(&ev, &far);
        let past = BootClock::from_offset_ns(i128::MIN / 2);
        assert!(json_line(&ev, &past).contains("\"time\":\"1970-01-01T00:00:00.000000000Z\""));
    }

    #[test]
    fn a_close_names_the_endpoint_it_closed_and_is_then_forgotten() {
        let mut book = SocketBook::default();
        let mut bind = listen_v4();
        bind.kind = EventKind::Bind;
        bind.cookie = Some(7);
        bind.options.reuse_addr = Some(true);
        bind.options.reuse_port = Some(false);
        book.observe(&mut bind);
        assert_eq!(book.len(), 1);
        let mut close = PortEvent {
            kind: EventKind::Close,
            address: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            port: 0,
            bound_port: None,
            netns: None,
            backlog: None,
            cookie: Some(7),
            ..listen_v4()
        };
        book.observe(&mut close);
        assert_eq!(close.endpoint(), "0.0.0.0:8080");
        assert_eq!(close.options, bind.options, "options carried from the bind");
        assert_eq!(close.netns, bind.netns);
        assert!(book.is_empty(), "a closed socket is forgotten");
        let filter = TraceFilter {
            port: Some(8080),
            ..TraceFilter::default()
        };
        assert!(filter.matches(&close));

        let mut unknown = PortEvent {
            cookie: Some(8),
            ..close.clone()
        };
        unknown.port = 0;
        unknown.bound_port = None;
        book.observe(&mut unknown);
        assert_eq!(unknown.port, 0, "a cookie never seen is left as it is");
    }

    #[test]
    fn failures_are_not_remembered() {
        let mut book = SocketBook::default();
        book.observe(&mut failed_v6());
        assert!(book.is_empty());
    }
}
