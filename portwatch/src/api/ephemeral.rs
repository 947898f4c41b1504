//! `GET /ephemeral`: how much of each network namespace's ephemeral port
//! range is left for outgoing connections, per destination, and what takes
//! ports from it (see [`crate::ephemeral`] for the arithmetic).

use axum::{
    Json,
    extract::{RawQuery, State},
};
use serde::Serialize;
use utoipa::ToSchema;

use super::{
    Shared,
    model::{FailureView, Holder},
    params::{self, PodSelector, Query},
    problem::ApiError,
};
use crate::{
    ephemeral::{self, AntiPattern, DestinationUse, HeldPort, NetnsEphemeral},
    event::EventKind,
    map,
    socket::NetnsCookie,
    state::State as DaemonState,
    trace::rfc3339,
};

/// Destinations listed per namespace without `limit`.
pub const DEFAULT_DESTINATIONS: usize = 10;
/// Namespaces listed without `all`, `netns` or `pod`: the host's, then the
/// fullest.
pub const DEFAULT_NAMESPACES: usize = 20;
/// Recent range-exhaustion failures listed per namespace.
pub const RECENT_FAILURES: usize = 20;

/// Every namespace's ephemeral ports.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct EphemeralList {
    /// When the listing behind this answer ran (it runs every
    /// `ephemeral_interval`, and at once after a range is exhausted).
    pub listed_at: String,
    /// How long it took, in milliseconds.
    pub listing_ms: f64,
    /// The machine's own namespace's cookie.
    pub host_netns: NetnsCookie,
    /// Namespaces listed in all (matching the filters).
    pub netns_count: usize,
    /// Namespaces left out of `namespaces` (see `all`).
    pub namespaces_hidden: usize,
    /// Namespaces that could not be listed (entering them was refused).
    pub skipped_netns: usize,
    /// The host's namespace first, then the fullest.
    pub namespaces: Vec<NetnsView>,
}

/// One namespace's range, its use and what takes from it.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct NetnsView {
    pub netns: NetnsCookie,
    pub host: bool,
    /// `host`, `NAMESPACE/POD`, the container's name or short id, or
    /// `netns-COOKIE`; the metrics' `netns` label.
    pub name: String,
    pub pod: Option<String>,
    pub pod_namespace: Option<String>,
    pub container: Option<String>,
    pub container_name: Option<String>,
    /// `net.ipv4.ip_local_port_range` (IPv6 uses it too).
    pub range_low: u16,
    pub range_high: u16,
    /// Ports in the range.
    pub size: u32,
    /// Ports of the range in `net.ipv4.ip_local_reserved_ports`.
    pub reserved: u32,
    /// Distinct ports of the range held by TCP binds (listeners, bound
    /// sockets, sockets bound before they connected): no connect can use
    /// them.
    pub held: u32,
    /// `size - reserved - held`: the local ports each destination may use.
    pub usable: u32,
    /// Sockets to the busiest destination.
    pub in_use: u32,
    /// `in_use / usable` (1 when nothing is usable).
    pub utilization: f64,
    /// The busiest destinations first, at most `limit`.
    pub destinations: Vec<DestinationView>,
    pub destinations_total: usize,
    /// The TCP sockets holding ports of the range (the first 50).
    pub held_by: Vec<HeldView>,
    pub udp: UdpView,
    pub listeners_in_range: u32,
    /// New outgoing TCP connections per second since the previous listing
    /// (null before the second, or where the kernel does not count them).
    pub connect_rate: Option<f64>,
    /// The busiest destination's net change per second since the previous
    /// listing.
    pub busiest_growth: Option<f64>,
    /// At that pace, seconds until the busiest destination has no usable
    /// port left (0: none now); null while it does not grow.
    pub exhaustion_seconds: Option<f64>,
    /// Listeners inside the range (the first 50 by port), then the processes
    /// that bind before they connect.
    pub anti_patterns: Vec<AntiPatternView>,
    /// How many anti-patterns there are, listed or not.
    pub anti_patterns_total: usize,
    /// Recent connects, binds and listens that found no free port in this
    /// namespace's range (`connect_failed`; EADDRINUSE on port 0), newest
    /// first.
    pub recent_failures: Vec<FailureView>,
}

/// The outgoing connections to one destination.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct DestinationView {
    #[schema(value_type = String, example = "tcp")]
    pub protocol: crate::event::Protocol,
    #[schema(value_type = String, example = "10.0.0.5")]
    pub local_address: std::net::IpAddr,
    #[schema(value_type = String, example = "10.1.2.3")]
    pub remote_address: std::net::IpAddr,
    pub remote_port: u16,
    /// `10.1.2.3:443`, `[2001:db8::1]:443`.
    pub destination: String,
    /// Sockets to it, each holding one local port.
    pub in_use: u32,
    pub established: u32,
    pub syn_sent: u32,
    pub time_wait: u32,
    /// Closing: FIN_WAIT, CLOSE_WAIT, LAST_ACK, CLOSING.
    pub other: u32,
    /// `in_use / usable`.
    pub utilization: f64,
    /// Processes holding some of its sockets (the 10 busiest destinations).
    pub holders: Vec<Holder>,
}

/// A TCP socket holding a port of the range.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct HeldView {
    pub port: u16,
    #[schema(value_type = String)]
    pub address: std::net::IpAddr,
    /// `listening`, `bound`, or `bound, connected` (bound before it
    /// connected: its bind still holds the port).
    pub state: String,
    pub cookie: u64,
    pub holders: Vec<Holder>,
}

/// UDP's share of the range.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct UdpView {
    /// Distinct ports of the range UDP sockets hold.
    pub in_use: u32,
    /// `size - reserved`.
    pub usable: u32,
    pub utilization: f64,
}

/// Something that takes ports from every outgoing connection.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct AntiPatternView {
    /// `listener_in_range`, or `bind_before_connect` (`address` and `port`
    /// are the last such socket's).
    pub kind: String,
    pub port: u16,
    #[schema(value_type = String)]
    pub protocol: crate::event::Protocol,
    #[schema(value_type = String)]
    pub address: std::net::IpAddr,
    pub holders: Vec<Holder>,
    pub detail: String,
}

fn holders(holders: &[map::Holder]) -> Vec<Holder> {
    holders
        .iter()
        .map(|h| Holder {
            pid: h.pid,
            process: h.process.clone(),
        })
        .collect()
}

/// `address:port`, bracketed for IPv6.
fn endpoint(address: std::net::IpAddr, port: u16) -> String {
    std::net::SocketAddr::new(address, port).to_string()
}

impl From<&DestinationUse> for DestinationView {
    fn from(used: &DestinationUse) -> DestinationView {
        let d = &used.destination;
        DestinationView {
            protocol: d.key.protocol,
            local_address: d.key.local_address,
            remote_address: d.key.remote_address,
            remote_port: d.key.remote_port,
            destination: endpoint(d.key.remote_address, d.key.remote_port),
            in_use: used.in_use,
            established: d.states.established,
            syn_sent: d.states.syn_sent,
            time_wait: d.states.time_wait,
            other: d.states.other,
            utilization: used.utilization,
            holders: holders(&d.processes),
        }
    }
}

impl From<&HeldPort> for HeldView {
    fn from(held: &HeldPort) -> HeldView {
        HeldView {
            port: held.port,
            address: held.address,
            state: held.state.to_owned(),
            cookie: held.cookie,
            holders: holders(&held.holders),
        }
    }
}

impl From<&AntiPattern> for AntiPatternView {
    fn from(anti: &AntiPattern) -> AntiPatternView {
        AntiPatternView {
            kind: anti.kind.to_owned(),
            port: anti.port,
            protocol: anti.protocol,
            address: anti.address,
            holders: holders(&anti.holders),
            detail: anti.detail.clone(),
        }
    }
}

impl NetnsView {
    fn of(ns: NetnsEphemeral, state: &DaemonState) -> NetnsView {
        let recent_failures = state
            .failures
            .newest()
            .filter(|f| {
                f.event.netns == Some(ns.netns)
                    && (f.exhausted_range() || f.event.kind == EventKind::ConnectFailed)
            })
            .take(RECENT_FAILURES)
            .map(FailureView::of)
            .collect();
        let workload = &ns.place.workload;
        NetnsView {
            netns: ns.netns,
            host: ns.host,
            name: ns.name.clone(),
            pod: workload.pod.clone(),
            pod_namespace: workload.pod_namespace.clone(),
            container: ns.place.container.clone(),
            container_name: workload.container_name.clone(),
            range_low: ns.range.low,
            range_high: ns.range.high,
            size: ns.size,
            reserved: ns.reserved,
            held: ns.held,
            usable: ns.usable,
            in_use: ns.in_use,
            utilization: ns.utilization,
            destinations: ns.destinations.iter().map(DestinationView::from).collect(),
            destinations_total: ns.destinations_total,
            held_by: ns.held_by.iter().map(HeldView::from).collect(),
            udp: UdpView {
                in_use: ns.udp.in_use,
                usable: ns.udp.usable,
                utilization: ns.udp.utilization,
            },
            listeners_in_range: ns.listeners_in_range,
            connect_rate: ns.connect_rate,
            busiest_growth: ns.busiest_growth,
            exhaustion_seconds: ns.exhaustion_seconds,
            anti_patterns: ns.anti_patterns.iter().map(AntiPatternView::from).collect(),
            anti_patterns_total: ns.anti_patterns_total,
            recent_failures,
        }
    }
}

/// Which namespaces, and how much of each.
struct Filter {
    netns: Option<NetnsCookie>,
    pod: Option<PodSelector>,
    all: bool,
    limit: usize,
}

/// Each namespace's ephemeral port range and its use.
#[utoipa::path(
    get,
    path = "/ephemeral",
    operation_id = "get_ephemeral",
    tag = "ephemeral",
    params(
        ("netns" = Option<String>, Query, description = "network namespace cookie, or `host`"),
        ("pod" = Option<String>, Query, description = "only this Kubernetes pod's namespace: NAME, or NAMESPACE/NAME"),
        ("all" = Option<bool>, Query, description = "every namespace; by default the host's and the fullest, 20 in all"),
        ("limit" = Option<usize>, Query, description = "destinations per namespace, 1 to 1000 (default 10)", minimum = 1, maximum = 1000),
    ),
    responses(
        (status = 200, description = "The namespaces, the host's first, then the fullest", body = EphemeralList),
        (status = 400, description = "A bad or unknown parameter", body = super::problem::Problem, content_type = "application/problem+json"),
        (status = 503, description = "The first listing has not finished yet", body = super::problem::Problem, content_type = "application/problem+json"),
    )
)]
pub async fn list(
    State(shared): State<Shared>,
    RawQuery(raw): RawQuery,
) -> Result<Json<EphemeralList>, ApiError> {
    let list = shared.read(|state| {
        let query = Query::parse(raw.as_deref(), &["netns", "pod", "all", "limit"])?;
        let filter = Filter {
            netns: query.opt("netns", params::netns(state.host_netns))?,
            pod: query.opt("pod", params::pod)?,
            all: query.opt("all", params::boolean)?.unwrap_or(false),
            limit: query
                .opt("limit", params::limit(1000))?
                .unwrap_or(DEFAULT_DESTINATIONS),
        };
        answer(state, &filter)
    })?;
    Ok(Json(list))
}

fn answer(state: &DaemonState, filter: &Filter) -> Result<EphemeralList, ApiError> {
    let listing = state.ephemeral.as_ref().ok_or(ApiError::NotListedYet)?;
    let mut namespaces: Vec<NetnsEphemeral> = listing
        .namespaces
        .iter()
        .filter(|usage| filter.netns.is_none_or(|n| n == usage.netns))
        .filter(|usage| {
            filter
                .pod
                .as_ref()
                .is_none_or(|pod| pod.matches(&usage.place.workload))
        })
        .map(|usage| {
            ephemeral::explain(
                usage,
                &state.map,
                state.host_netns,
                filter.limit,
                &state.early_binds,
            )
        })
        .collect();
    ephemeral::sort(&mut namespaces);
    let netns_count = namespaces.len();
    if !(filter.all || filter.netns.is_some() || filter.pod.is_some()) {
        namespaces.truncate(DEFAULT_NAMESPACES);
    }
    Ok(EphemeralList {
        listed_at: rfc3339(listing.taken_at),
        listing_ms: listing.elapsed.as_secs_f64() * 1e3,
        host_netns: state.host_netns,
        netns_count,
        namespaces_hidden: netns_count - namespaces.len(),
        skipped_netns: listing.skipped,
        namespaces: namespaces
            .into_iter()
            .map(|ns| NetnsView::of(ns, state))
            .collect(),
    })
}
