//! `GET /ports` and `GET /ports/{port}`: who is bound, and why they coexist.

use axum::{
    Json,
    extract::{Path, RawQuery, State, rejection::PathRejection},
};

use super::{
    Shared,
    model::{FailureView, Listener, LocalhostView, PortDetail, PortList, PortSummary},
    params::{self, Query},
    problem::ApiError,
};
use crate::{
    event::{Family, Protocol},
    explain,
    failures::Failure,
    map::Entry,
    socket::NetnsCookie,
    state,
};

/// How many failures `GET /ports/{port}` lists.
pub const RECENT_FAILURES: usize = 20;

/// The filters both endpoints take.
const FILTERS: [&str; 3] = ["protocol", "family", "netns"];

/// Which sockets a request is about; `None` matches everything.
#[derive(Clone, Copy, Debug, Default)]
struct Filter {
    protocol: Option<Protocol>,
    family: Option<Family>,
    netns: Option<NetnsCookie>,
}

impl Filter {
    fn parse(raw: Option<&str>, host_netns: NetnsCookie) -> Result<Filter, ApiError> {
        let query = Query::parse(raw, &FILTERS)?;
        Ok(Filter {
            protocol: query.opt("protocol", params::protocol)?,
            family: query.opt("family", params::family)?,
            netns: query.opt("netns", params::netns(host_netns))?,
        })
    }

    fn matches(&self, protocol: Protocol, family: Family, netns: Option<NetnsCookie>) -> bool {
        self.protocol.is_none_or(|p| p == protocol)
            && self.family.is_none_or(|f| f == family)
            && self.netns.is_none_or(|n| Some(n) == netns)
    }

    fn entry(&self, entry: &Entry) -> bool {
        let f = &entry.facts;
        self.matches(f.protocol, f.family, Some(f.netns))
    }

    fn failure(&self, failure: &Failure) -> bool {
        let ev = &failure.event;
        self.matches(ev.protocol, ev.family, ev.netns)
    }
}

/// Every port with listeners.
#[utoipa::path(
    get,
    path = "/ports",
    operation_id = "list_ports",
    tag = "ports",
    params(
        ("protocol" = Option<String>, Query, description = "tcp, udp, udplite, sctp or mptcp"),
        ("family" = Option<String>, Query, description = "ipv4 or ipv6"),
        ("netns" = Option<String>, Query, description = "network namespace cookie, or `host`"),
    ),
    responses(
        (status = 200, description = "Every port with at least one matching listener, ascending", body = PortList),
        (status = 400, description = "A bad or unknown parameter", body = super::problem::Problem, content_type = "application/problem+json"),
    )
)]
pub async fn list(
    State(shared): State<Shared>,
    RawQuery(raw): RawQuery,
) -> Result<Json<PortList>, ApiError> {
    // One read: the query needs the host namespace to resolve `netns=host`.
    let ports = shared.read(|state| {
        let filter = Filter::parse(raw.as_deref(), state.host_netns)?;
        Ok::<_, ApiError>(port_list(state, &filter))
    })?;
    Ok(Json(PortList { ports }))
}

/// One port: listeners, why they coexist, flags, who `localhost` reaches and
/// recent failures. A port nobody holds is a 200 with empty lists.
#[utoipa::path(
    get,
    path = "/ports/{port}",
    operation_id = "get_port",
    tag = "ports",
    params(
        ("port" = u16, Path, description = "1 to 65535", minimum = 1),
        ("protocol" = Option<String>, Query, description = "tcp, udp, udplite, sctp or mptcp"),
        ("family" = Option<String>, Query, description = "ipv4 or ipv6"),
        ("netns" = Option<String>, Query, description = "network namespace cookie, or `host`"),
    ),
    responses(
        (status = 200, description = "The port explained", body = PortDetail),
        (status = 400, description = "A bad port or parameter", body = super::problem::Problem, content_type = "application/problem+json"),
    )
)]
pub async fn detail(
    State(shared): State<Shared>,
    path: Result<Path<String>, PathRejection>,
    RawQuery(raw): RawQuery,
) -> Result<Json<PortDetail>, ApiError> {
    let port = match path {
        Ok(Path(text)) => params::port("port", &text)?,
        Err(rejection) => {
            return Err(ApiError::BadParameter {
                parameter: "port",
                detail: format!("port: {}", rejection.body_text()),
            });
        }
    };
    let detail = shared.read(|state| {
        let filter = Filter::parse(raw.as_deref(), state.host_netns)?;
        Ok::<_, ApiError>(port_detail(state, port, &filter))
    })?;
    Ok(Json(detail))
}

fn port_list(state: &state::State, filter: &Filter) -> Vec<PortSummary> {
    state
        .map
        .ports()
        .into_iter()
        .filter_map(|port| {
            let listeners: Vec<Listener> = state
                .map
                .listeners_on(port)
                .into_iter()
                .filter(|e| filter.entry(e))
                .map(Listener::of)
                .collect();
            (!listeners.is_empty()).then_some(PortSummary {
                port,
                shared: listeners.len() > 1,
                listeners,
            })
        })
        .collect()
}

fn port_detail(state: &state::State, port: u16, filter: &Filter) -> PortDetail {
    let all = state.map.listeners_on(port);
    let shown: Vec<&Entry> = all.iter().copied().filter(|e| filter.entry(e)).collect();
    let explained = explain::explain(port, &shown, state.host_netns, &state.localhost);
    // Who localhost reaches is a fact about the machine, not about the
    // filter: `explain` judged it over every listener when the filter kept
    // them all (a filter only removes).
    let reach = if shown.len() == all.len() {
        explained.localhost
    } else {
        explain::reach(&all, state.host_netns, &state.localhost)
    };
    let recent_failures = state
        .failures
        .newest()
        .filter(|f| f.event.concerns_port(port) && filter.failure(f))
        .take(RECENT_FAILURES)
        .map(FailureView::of)
        .collect();
    PortDetail {
        port,
        listeners: shown.iter().copied().map(Listener::of).collect(),
        shared: explained.shared,
        sharing: explained.sharing,
        flags: explained.flags.iter().map(explain::Flag::name).collect(),
        flag_details: explained.flags,
        localhost: LocalhostView {
            reaches: reach
                .reaches
                .and_then(|cookie| state.map.get(cookie))
                .map(Listener::of),
            via: reach.via,
            order: reach.order,
        },
        recent_failures,
    }
}
