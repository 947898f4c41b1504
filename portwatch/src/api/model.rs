//! The API's JSON: serde response types built from the map, the failure log
//! and the predictor, so that the wire shape is decided here and not by the
//! internal types. Unknown values are `null`, never guessed; times are RFC
//! 3339 in UTC with nanoseconds, as in `portwatch trace --json`.

use std::net::IpAddr;

use serde::Serialize;
use utoipa::ToSchema;

pub use crate::failures::BlockerHolder;
use crate::{
    event::{Errno, ErrnoSource, EventKind, Family, Protocol},
    explain::{Flag, NamespaceSummary, Sharing},
    failures::{self, Failure},
    map::{Entry, PortMap},
    rules::{self, ConflictReason, InvalidRequest, Overlap},
    snapshot::{owners::Place, workload::Workload},
    socket::SockState,
    trace::rfc3339,
};

/// A process holding a socket.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, ToSchema)]
pub struct Holder {
    pub pid: u32,
    /// Process name (`comm`, at most 15 bytes).
    pub process: String,
}

/// One socket that receives on a port: a TCP listener or a bound UDP socket.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, ToSchema)]
#[schema(example = json!({
    "protocol": "tcp", "family": "ipv6", "address": "::", "port": 8000,
    "endpoint": "[::]:8000", "state": "listening", "pids": [2002],
    "process": "node", "holders": [{"pid": 2002, "process": "node"}],
    "uid": 1000, "unit": "app.service", "container": null,
    "cgroup": "/system.slice/app.service", "cgroup_id": 77,
    "netns": 4026531840u64, "cookie": 12, "inode": 123456,
    "reuse_addr": false, "reuse_port": false, "v6only": true,
    "bound_dev_if": 0, "since": "2024-05-01T12:00:00.000000000Z", "since_exact": true,
    "owners_pending": false
}))]
pub struct Listener {
    /// `tcp`, `udp`, `udplite`, `sctp`, `mptcp`.
    #[schema(value_type = String, example = "tcp")]
    pub protocol: Protocol,
    /// `ipv4` or `ipv6`.
    #[schema(value_type = String, example = "ipv4")]
    pub family: Family,
    /// The local address (`0.0.0.0`, `::1`).
    #[schema(value_type = String, example = "0.0.0.0")]
    pub address: IpAddr,
    pub port: u16,
    /// Address and port as users write them (`[::1]:8000`).
    pub endpoint: String,
    /// `listening` (TCP) or `bound` (UDP).
    #[schema(value_type = String, example = "listening")]
    pub state: SockState,
    /// Every process known to hold the socket, ascending.
    pub pids: Vec<u32>,
    /// The name of the first of them; null when no holder is known.
    pub process: Option<String>,
    /// The holders with their names.
    pub holders: Vec<Holder>,
    /// The socket's owner uid; null when unknown.
    pub uid: Option<u32>,
    /// systemd unit of the owner, when known.
    pub unit: Option<String>,
    /// Container id of the owner, when known.
    pub container: Option<String>,
    /// The owner's container and pod names, when known.
    #[serde(flatten)]
    pub workload: Workload,
    /// cgroup v2 path of the owner, when known.
    pub cgroup: Option<String>,
    /// cgroup v2 id of the task that bound it, when an event saw it.
    pub cgroup_id: Option<u64>,
    /// Network namespace cookie.
    pub netns: u64,
    /// Socket cookie: the socket's identity, which `sharing`, `flag_details`
    /// and `blocked_by` refer to.
    pub cookie: u64,
    /// Socket inode, when a snapshot saw it.
    pub inode: Option<u64>,
    /// SO_REUSEADDR; null when unknown.
    pub reuse_addr: Option<bool>,
    /// SO_REUSEPORT; null when unknown.
    pub reuse_port: Option<bool>,
    /// IPV6_V6ONLY; null when unknown, and always on IPv4.
    pub v6only: Option<bool>,
    /// The device index it is bound to (SO_BINDTODEVICE), 0 for none.
    pub bound_dev_if: u32,
    /// When portwatch first saw it in its current state (RFC 3339).
    pub since: String,
    /// Whether `since` is the real moment; false when the socket predates the
    /// daemon and `since` is when the start-up snapshot found it.
    pub since_exact: bool,
    /// True for a socket from before the start while the daemon, already
    /// ready, still reads its processes and SO_REUSE* options (a second or
    /// so at 100k sockets): `pids`, `process`, the place and those options
    /// are not known yet, rather than unknown.
    pub owners_pending: bool,
}

impl Listener {
    pub fn of(entry: &Entry) -> Listener {
        let f = &entry.facts;
        Listener {
            protocol: f.protocol,
            family: f.family,
            address: f.address,
            port: f.port,
            endpoint: crate::event::endpoint(f.address, f.port),
            state: f.state,
            pids: entry.holders.iter().map(|h| h.pid).collect(),
            process: entry.holders.first().map(|h| h.process.clone()),
            holders: entry
                .holders
                .iter()
                .map(|h| Holder {
                    pid: h.pid,
                    process: h.process.clone(),
                })
                .collect(),
            uid: f.uid,
            unit: entry.place.unit.clone(),
            container: entry.place.container.clone(),
            workload: entry.place.workload.clone(),
            cgroup: entry.place.cgroup.clone(),
            cgroup_id: entry.cgroup_id,
            netns: f.netns,
            cookie: f.cookie,
            inode: entry.inode,
            reuse_addr: f.options.reuse_addr,
            reuse_port: f.options.reuse_port,
            v6only: f.options.v6only,
            bound_dev_if: f.bound_dev_if,
            since: rfc3339(entry.since),
            since_exact: entry.since_exact,
            owners_pending: entry.owners_pending,
        }
    }
}

/// `GET /ports`.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct PortList {
    /// The cookie of the machine's own network namespace (0 if unknown).
    pub host_netns: u64,
    /// A page of the ports with at least one listener (matching the
    /// filters), ascending.
    pub ports: Vec<PortSummary>,
    /// The next page (path and query), when more ports follow this one.
    pub next: Option<String>,
}

/// One port in `GET /ports`.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct PortSummary {
    pub port: u16,
    pub listeners: Vec<Listener>,
    /// Two or more of those listeners are in one network namespace (one
    /// port table).
    pub shared: bool,
    /// In how many network namespaces those listeners are.
    pub netns_count: usize,
}

/// `GET /ports/{port}`: the port's listeners, one network namespace (one
/// port table) at a time, and why they coexist there.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct PortDetail {
    pub port: u16,
    /// The cookie of the machine's own network namespace (0 if unknown).
    pub host_netns: u64,
    /// The listeners of the namespaces shown (`namespaces`) matching the
    /// filters: all of them when there are few namespaces or with `all=true`.
    pub listeners: Vec<Listener>,
    /// Two or more listeners share one namespace's port table, in any
    /// namespace matching the filters (shown or not).
    pub shared: bool,
    /// In how many network namespaces the port has a matching listener.
    pub netns_count: usize,
    /// Per network namespace shown, the host's first: who it is, its
    /// listeners and why they coexist.
    pub namespaces: Vec<NamespaceView>,
    /// How many namespaces with a matching listener are not shown (ask with
    /// `all=true`, or filter with `netns` or `pod`).
    pub namespaces_hidden: usize,
    /// How many of those have something shared or failed (past the 8 shown).
    pub namespaces_hidden_eventful: usize,
    /// What all those namespaces are, counted (shown or not).
    #[schema(value_type = Object)]
    pub summary: NamespaceSummary,
    /// Why the listeners shown may share the port, within their namespace:
    /// one entry per rule and group (the `sharing` of every namespace shown).
    #[schema(value_type = Vec<SharingDoc>)]
    pub sharing: Vec<Sharing>,
    /// Names of the surprises among those listeners (`dual_stack_split`,
    /// `reuseport_group`, `wildcard_and_specific`).
    pub flags: Vec<&'static str>,
    /// The same flags with the cookies they concern and an explanation.
    #[schema(value_type = Vec<Object>)]
    pub flag_details: Vec<Flag>,
    /// Which listener a TCP client on this machine reaches at
    /// `localhost:PORT` (judged over every listener, whatever the filters).
    pub localhost: LocalhostView,
    /// The latest failed binds and listens on this port (matching the
    /// filters), newest first, at most 20.
    pub recent_failures: Vec<FailureView>,
}

/// One network namespace of a port: one port table.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct NamespaceView {
    /// Network namespace cookie.
    pub netns: u64,
    /// The machine's own namespace.
    pub host: bool,
    /// The unit, container and pod every listener's owner here shares;
    /// null where they differ or are not known.
    #[serde(flatten)]
    #[schema(value_type = Object)]
    pub place: Place,
    /// The processes holding its listeners, ascending.
    pub processes: Vec<String>,
    /// Cookies of its listeners (see `listeners`).
    pub listeners: Vec<u64>,
    /// Two or more of them.
    pub shared: bool,
    /// Why they coexist.
    #[schema(value_type = Vec<SharingDoc>)]
    pub sharing: Vec<Sharing>,
    /// Names of their surprises.
    pub flags: Vec<&'static str>,
    /// The same flags with the cookies they concern and an explanation.
    #[schema(value_type = Vec<Object>)]
    pub flag_details: Vec<Flag>,
    /// How many of the port's recent failures happened here.
    pub recent_failures: usize,
}

/// The shape of one `sharing` entry (documentation only).
#[derive(ToSchema)]
#[expect(
    dead_code,
    reason = "only describes explain::Sharing's JSON to OpenAPI"
)]
pub struct SharingDoc {
    /// The rule that lets them coexist (`v6only_split`, `reuse_port_group`, ...).
    kind: String,
    /// Cookies of the listeners it covers.
    listeners: Vec<u64>,
    /// One plain sentence.
    explanation: String,
}

/// Who `localhost:PORT` reaches.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct LocalhostView {
    /// The listener that accepts the first address tried; null when none does.
    pub reaches: Option<Listener>,
    /// The address it is reached on.
    #[schema(value_type = Option<String>, example = "::1")]
    pub via: Option<IpAddr>,
    /// The order in which this machine's clients try the addresses of `localhost`.
    #[schema(value_type = Vec<String>, example = json!(["::1", "127.0.0.1"]))]
    pub order: Vec<IpAddr>,
}

/// A socket that blocks (or blocked) a bind, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, ToSchema)]
pub struct BlockerView {
    /// Address and port as users write them.
    pub endpoint: String,
    /// `listener`, `bound socket (not listening)`, `connected socket`, `TIME_WAIT`.
    pub what: String,
    /// Why the kernel says the two conflict, in one sentence.
    pub reason: String,
    /// The rule's name (`same_address`, `reuse_port_not_set_on_both`, ...);
    /// null when only the sentence is known.
    #[schema(value_type = Option<String>)]
    pub conflict: Option<ConflictReason>,
    /// How the addresses overlap (`same_address`, `existing_wildcard`, ...);
    /// null when not known.
    #[schema(value_type = Option<String>)]
    pub overlap: Option<Overlap>,
    #[schema(value_type = String)]
    pub protocol: Protocol,
    #[schema(value_type = String)]
    pub family: Family,
    #[schema(value_type = String)]
    pub address: IpAddr,
    pub port: u16,
    /// `listening`, `bound`, `connected`, `time_wait`.
    #[schema(value_type = String)]
    pub state: SockState,
    pub netns: u64,
    /// Socket cookie (0 for TIME_WAIT, which has no socket).
    pub cookie: u64,
    /// Owner uid; null when unknown.
    pub uid: Option<u32>,
    pub reuse_addr: Option<bool>,
    pub reuse_port: Option<bool>,
    pub v6only: Option<bool>,
    /// Processes holding it, when known.
    pub holders: Vec<BlockerHolder>,
}

impl BlockerView {
    /// A blocker recorded with a failure.
    pub fn of_failure(blocker: &failures::Blocker) -> BlockerView {
        let facts = &blocker.facts;
        BlockerView {
            endpoint: blocker.endpoint.clone(),
            what: blocker.what.to_owned(),
            reason: blocker.reason.clone(),
            conflict: None,
            overlap: None,
            protocol: facts.protocol,
            family: facts.family,
            address: facts.address,
            port: facts.port,
            state: facts.state,
            netns: facts.netns,
            cookie: facts.cookie,
            uid: facts.uid,
            reuse_addr: facts.options.reuse_addr,
            reuse_port: facts.options.reuse_port,
            v6only: facts.options.v6only,
            holders: blocker.holders.clone(),
        }
    }

    /// A blocker the predictor names, with its holders from the map.
    pub fn of_prediction(blocker: &rules::Blocker, map: &PortMap) -> BlockerView {
        let described = failures::describe(blocker.socket.clone(), blocker.why.explanation(), map);
        BlockerView {
            conflict: Some(blocker.why),
            overlap: Some(blocker.overlap),
            ..BlockerView::of_failure(&described)
        }
    }
}

/// One failed bind or listen.
#[derive(Clone, Debug, Serialize, ToSchema)]
#[schema(example = json!({
    "time": "2024-05-01T12:00:05.000000000Z", "kind": "bind_failed",
    "pid": 3003, "process": "python3", "uid": 1000, "protocol": "tcp",
    "family": "ipv4", "address": "0.0.0.0", "port": 8000,
    "endpoint": "0.0.0.0:8000", "errno": "EADDRINUSE",
    "errno_description": "Address already in use", "errno_source": "kernel",
    "netns": 4026531840u64,
    "cookie": 40, "reuse_addr": false, "reuse_port": false, "v6only": null,
    "unit": "app.service", "container": null, "cgroup": "/system.slice/app.service",
    "blocked_by": []
}))]
pub struct FailureView {
    /// When it happened (RFC 3339).
    pub time: String,
    /// `bind_failed`, `listen_failed` or `connect_failed`.
    #[schema(value_type = String)]
    pub kind: EventKind,
    pub pid: u32,
    pub process: String,
    /// Real uid of the calling task.
    pub uid: u32,
    #[schema(value_type = String)]
    pub protocol: Protocol,
    #[schema(value_type = String)]
    pub family: Family,
    /// The address asked for.
    #[schema(value_type = String)]
    pub address: IpAddr,
    /// The port asked for (for a failed listen: the port the socket holds).
    pub port: u16,
    pub endpoint: String,
    /// The errno name (`EADDRINUSE`, `EACCES`, `UNKNOWN`).
    #[schema(value_type = String, example = "EADDRINUSE")]
    pub errno: Errno,
    /// What the errno means, as strerror(3) says it.
    pub errno_description: String,
    /// Where the errno came from: `kernel` (an outcome hook saw the call
    /// return) or `inferred` (no outcome hook ran; the conflict rules named
    /// it from the sockets on the port); null when it is `UNKNOWN`.
    #[schema(value_type = Option<String>, example = "kernel")]
    pub errno_source: Option<ErrnoSource>,
    /// Network namespace cookie; null when unknown.
    pub netns: Option<u64>,
    /// Socket cookie; null when unknown.
    pub cookie: Option<u64>,
    pub reuse_addr: Option<bool>,
    pub reuse_port: Option<bool>,
    pub v6only: Option<bool>,
    /// The failing process's systemd unit, read when the failure arrived;
    /// null when it had already exited or is in no unit.
    pub unit: Option<String>,
    /// Its container id, when its cgroup names one.
    pub container: Option<String>,
    /// Its container and pod names, when known.
    #[serde(flatten)]
    pub workload: Workload,
    /// Its cgroup v2 path.
    pub cgroup: Option<String>,
    /// The sockets the conflict rules name as the cause; empty when the
    /// failure is not a port conflict or nothing matched.
    pub blocked_by: Vec<BlockerView>,
    /// A bind to port 0 (or a listen that had to pick a port) found no free
    /// port in the ephemeral range: the range is full, not one socket in
    /// the way (`GET /ephemeral` shows what fills it).
    pub ephemeral_range_exhausted: bool,
    /// For a `connect_failed`: where it was going (`10.1.2.3:443`).
    pub destination: Option<String>,
    /// For a `connect_failed`: what the latest ephemeral listing said of
    /// that destination ("all 28232 usable local ports to 10.1.2.3:443 were
    /// in use (...)"); null without a listing of its namespace.
    pub cause: Option<String>,
}

impl FailureView {
    pub fn of(failure: &Failure) -> FailureView {
        let ev = &failure.event;
        let errno = ev.errno.unwrap_or(Errno::UNKNOWN);
        FailureView {
            time: rfc3339(failure.time),
            kind: ev.kind,
            pid: ev.pid,
            process: ev.process.clone(),
            uid: ev.uid,
            protocol: ev.protocol,
            family: ev.family,
            address: ev.address,
            port: failure_port(failure),
            endpoint: ev.endpoint(),
            errno,
            errno_description: errno.description().to_owned(),
            errno_source: ev.errno_source(),
            netns: ev.netns,
            cookie: ev.cookie,
            reuse_addr: ev.options.reuse_addr,
            reuse_port: ev.options.reuse_port,
            v6only: ev.options.v6only,
            unit: failure.place.unit.clone(),
            container: failure.place.container.clone(),
            workload: failure.place.workload.clone(),
            cgroup: failure.place.cgroup.clone(),
            blocked_by: failure
                .blocked_by
                .iter()
                .map(BlockerView::of_failure)
                .collect(),
            ephemeral_range_exhausted: failure.exhausted_range(),
            destination: ev.peer.map(|peer| peer.to_string()),
            cause: failure.cause.clone(),
        }
    }
}

/// The port a failure is about: the one the socket holds when known (a
/// failed listen), else the one asked for.
pub fn failure_port(failure: &Failure) -> u16 {
    failure.event.bound_port.unwrap_or(failure.event.port)
}

/// `GET /failures`.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct FailureList {
    /// Newest first.
    pub failures: Vec<FailureView>,
}

/// The bind `GET /check` judged, with the defaults filled in.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct CheckRequest {
    #[schema(value_type = String)]
    pub protocol: Protocol,
    /// Follows from the address.
    #[schema(value_type = String)]
    pub family: Family,
    #[schema(value_type = String)]
    pub address: IpAddr,
    pub port: u16,
    pub endpoint: String,
    pub netns: u64,
    pub uid: u32,
    pub reuse_addr: bool,
    pub reuse_port: bool,
    /// Null when not given for an IPv6 address (the kernel's
    /// `net.ipv6.bindv6only` decides), and on IPv4.
    pub v6only: Option<bool>,
}

/// `GET /check`: would this bind succeed now?
#[derive(Clone, Debug, Serialize, ToSchema)]
#[schema(example = json!({
    "ok": false, "errno": "EADDRINUSE", "errno_description": "Address already in use",
    "confident": true, "invalid": null, "blocked_by": [],
    "explanation": "EADDRINUSE: 0.0.0.0:8000 is held by a listener of node (pid 2001): both sockets want the same address and port, and neither SO_REUSEADDR nor SO_REUSEPORT is set on both",
    "request": {"protocol": "tcp", "family": "ipv4", "address": "0.0.0.0", "port": 8000,
        "endpoint": "0.0.0.0:8000", "netns": 4026531840u64, "uid": 0,
        "reuse_addr": false, "reuse_port": false, "v6only": null}
}))]
pub struct CheckResponse {
    /// Whether the kernel would let the bind through.
    pub ok: bool,
    /// The predicted error; null when ok.
    #[schema(value_type = Option<String>, example = "EADDRINUSE")]
    pub errno: Option<Errno>,
    /// What that error means; null when ok.
    pub errno_description: Option<String>,
    /// False when something portwatch cannot see could change the answer: an
    /// unknown option or owner, the kernel's SO_REUSEPORT memory, SCTP, a
    /// crowded UDP port.
    pub confident: bool,
    /// Set when the request fails by itself, whatever holds the port
    /// (`ipv6_address_on_ipv4_socket`, `v6only_mapped_address`, ...).
    #[schema(value_type = Option<String>)]
    pub invalid: Option<InvalidRequest>,
    /// The sockets that would refuse it.
    pub blocked_by: Vec<BlockerView>,
    /// The answer in one or two sentences.
    pub explanation: String,
    /// The bind judged.
    pub request: CheckRequest,
}
