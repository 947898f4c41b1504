//! `GET /ports` and `GET /ports/{port}`: who is bound, and why they coexist.

use std::collections::BTreeSet;

use axum::{
    Json,
    extract::{Path, RawQuery, State, rejection::PathRejection},
};

use super::{
    Shared,
    model::{
        FailureView, Listener, LocalhostView, NamespaceView, PortDetail, PortList, PortSummary,
    },
    params::{self, PodSelector, Query},
    problem::ApiError,
};
use crate::{
    event::{Family, Protocol},
    explain,
    failures::Failure,
    map::Entry,
    snapshot::workload::Workload,
    socket::NetnsCookie,
    state,
};

/// How many failures `GET /ports/{port}` lists.
pub const RECENT_FAILURES: usize = 20;

/// Ports per page of `GET /ports` without `limit`: a bounded answer (about
/// 200 KiB with two listeners a port) however many listeners the host has.
pub const PORTS_PAGE: usize = 200;
/// The most ports a page may hold (`limit`).
pub const PORTS_PAGE_MAX: usize = 5000;

/// The parameters `GET /ports` takes: filters and the page.
const LIST_PARAMETERS: &[&str] = &["protocol", "family", "netns", "pod", "limit", "after"];
/// The filters `GET /ports/{port}` takes: those, and whether to show every
/// namespace (the list shows them all).
const DETAIL_FILTERS: &[&str] = &["protocol", "family", "netns", "pod", "all"];

/// Which sockets a request is about; `None` matches everything.
#[derive(Clone, Debug, Default)]
struct Filter {
    protocol: Option<Protocol>,
    family: Option<Family>,
    netns: Option<NetnsCookie>,
    pod: Option<PodSelector>,
    /// Every namespace, not only those worth showing.
    all: bool,
}

impl Filter {
    fn parse(query: &Query, host_netns: NetnsCookie) -> Result<Filter, ApiError> {
        Ok(Filter {
            protocol: query.opt("protocol", params::protocol)?,
            family: query.opt("family", params::family)?,
            netns: query.opt("netns", params::netns(host_netns))?,
            pod: query.opt("pod", params::pod)?,
            all: query.opt("all", params::boolean)?.unwrap_or(false),
        })
    }

    fn matches(
        &self,
        protocol: Protocol,
        family: Family,
        netns: Option<NetnsCookie>,
        workload: &Workload,
    ) -> bool {
        self.protocol.is_none_or(|p| p == protocol)
            && self.family.is_none_or(|f| f == family)
            && self.netns.is_none_or(|n| Some(n) == netns)
            && self.pod.as_ref().is_none_or(|pod| pod.matches(workload))
    }

    fn entry(&self, entry: &Entry) -> bool {
        let f = &entry.facts;
        self.matches(f.protocol, f.family, Some(f.netns), &entry.place.workload)
    }

    fn failure(&self, failure: &Failure) -> bool {
        let ev = &failure.event;
        self.matches(ev.protocol, ev.family, ev.netns, &failure.place.workload)
    }

    /// Whether the answer names every namespace: asked for, or narrowed to
    /// one namespace or pod already.
    fn every_namespace(&self) -> bool {
        self.all || self.netns.is_some() || self.pod.is_some()
    }
}

/// Every port with listeners, a page at a time.
#[utoipa::path(
    get,
    path = "/ports",
    operation_id = "list_ports",
    tag = "ports",
    params(
        ("protocol" = Option<String>, Query, description = "tcp, udp, udplite, sctp or mptcp"),
        ("family" = Option<String>, Query, description = "ipv4 or ipv6"),
        ("netns" = Option<String>, Query, description = "network namespace cookie, or `host`"),
        ("pod" = Option<String>, Query, description = "only the listeners of this Kubernetes pod: NAME, or NAMESPACE/NAME"),
        ("limit" = Option<usize>, Query, description = "ports per page, 1 to 5000 (default 200)", minimum = 1, maximum = 5000),
        ("after" = Option<u16>, Query, description = "start after this port (the `next` link of the previous page sets it)", minimum = 1),
    ),
    responses(
        (status = 200, description = "A page of the ports with at least one matching listener, ascending; `next` links to the following page", body = PortList),
        (status = 400, description = "A bad or unknown parameter", body = super::problem::Problem, content_type = "application/problem+json"),
    )
)]
pub async fn list(
    State(shared): State<Shared>,
    RawQuery(raw): RawQuery,
) -> Result<Json<PortList>, ApiError> {
    let query = Query::parse(raw.as_deref(), LIST_PARAMETERS)?;
    let limit = query
        .opt("limit", params::limit(PORTS_PAGE_MAX))?
        .unwrap_or(PORTS_PAGE);
    // `after=0` is the start, as no `after` is.
    let after = query
        .opt("after", |parameter, value| match value {
            "0" => Ok(0),
            _ => params::port(parameter, value),
        })?
        .unwrap_or(0);
    // One read: the query needs the host namespace to resolve `netns=host`.
    let list = shared.read(|state| {
        let filter = Filter::parse(&query, state.host_netns)?;
        let (ports, more) = port_page(state, &filter, after, limit);
        let next = more
            .then(|| ports.last())
            .flatten()
            .map(|last| query.link_with("/ports", "after", &last.port.to_string()));
        Ok::<_, ApiError>(PortList {
            host_netns: state.host_netns,
            ports,
            next,
        })
    })?;
    Ok(Json(list))
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
        ("pod" = Option<String>, Query, description = "only the listeners of this Kubernetes pod: NAME, or NAMESPACE/NAME"),
        ("all" = Option<bool>, Query, description = "show every namespace; by default, past 8 namespaces, only the host's and those where something is shared or failed are shown and the rest are counted"),
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
    let query = Query::parse(raw.as_deref(), DETAIL_FILTERS)?;
    let detail = shared.read(|state| {
        let filter = Filter::parse(&query, state.host_netns)?;
        Ok::<_, ApiError>(port_detail(state, port, &filter))
    })?;
    Ok(Json(detail))
}

/// Up to `limit` ports after `after` with matching listeners, and whether
/// more follow.
fn port_page(
    state: &state::State,
    filter: &Filter,
    after: u16,
    limit: usize,
) -> (Vec<PortSummary>, bool) {
    let Some(first) = after.checked_add(1) else {
        return (Vec::new(), false);
    };
    let mut found = state.map.ports_from(first).filter_map(|port| {
        let matching: Vec<&Entry> = state
            .map
            .listeners_on(port)
            .into_iter()
            .filter(|e| filter.entry(e))
            .collect();
        let namespaces: BTreeSet<NetnsCookie> = matching.iter().map(|e| e.facts.netns).collect();
        (!matching.is_empty()).then(|| PortSummary {
            port,
            shared: matching.len() > namespaces.len(),
            netns_count: namespaces.len(),
            listeners: matching.into_iter().map(Listener::of).collect(),
        })
    });
    let page: Vec<PortSummary> = found.by_ref().take(limit).collect();
    // Whether another port matches (one more port is looked at).
    let more = page.len() == limit && found.next().is_some();
    (page, more)
}

fn port_detail(state: &state::State, port: u16, filter: &Filter) -> PortDetail {
    let all = state.map.listeners_on(port);
    let matching: Vec<&Entry> = all.iter().copied().filter(|e| filter.entry(e)).collect();
    let explained = explain::explain(port, &matching, state.host_netns, &state.localhost);
    // Who localhost reaches is a fact about the machine, not about the
    // filter: `explain` judged it over every listener when the filter kept
    // them all (a filter only removes).
    let reach = if matching.len() == all.len() {
        explained.localhost.clone()
    } else {
        explain::reach(&all, state.host_netns, &state.localhost)
    };
    let failures: Vec<&Failure> = state
        .failures
        .newest()
        .filter(|f| f.event.concerns_port(port) && filter.failure(f))
        .take(RECENT_FAILURES)
        .collect();
    let failed: BTreeSet<NetnsCookie> = failures.iter().filter_map(|f| f.event.netns).collect();
    let shown = if filter.every_namespace() {
        vec![true; explained.netns_count()]
    } else {
        explain::worth_showing(&explained.namespaces, &failed)
    };
    let mut detail = PortDetail {
        port,
        host_netns: state.host_netns,
        listeners: Vec::new(),
        shared: explained.shared(),
        netns_count: explained.netns_count(),
        namespaces: Vec::new(),
        namespaces_hidden: shown.iter().filter(|&&shown| !shown).count(),
        namespaces_hidden_eventful: explained
            .namespaces
            .iter()
            .zip(&shown)
            .filter(|(n, shown)| !**shown && (n.shared() || failed.contains(&n.netns)))
            .count(),
        summary: explain::summarize(&explained.namespaces),
        sharing: Vec::new(),
        flags: Vec::new(),
        flag_details: Vec::new(),
        localhost: LocalhostView {
            reaches: reach
                .reaches
                .and_then(|cookie| state.map.get(cookie))
                .map(Listener::of),
            via: reach.via,
            order: reach.order,
        },
        recent_failures: failures.iter().copied().map(FailureView::of).collect(),
    };
    for (namespace, _) in explained
        .namespaces
        .into_iter()
        .zip(shown)
        .filter(|(_, shown)| *shown)
    {
        detail.listeners.extend(
            namespace
                .listeners
                .iter()
                .filter_map(|&cookie| state.map.get(cookie))
                .map(Listener::of),
        );
        let flags: Vec<&'static str> = namespace.flags.iter().map(explain::Flag::name).collect();
        detail.sharing.extend(namespace.sharing.iter().cloned());
        detail.flags.extend(&flags);
        detail.flag_details.extend(namespace.flags.iter().cloned());
        detail.namespaces.push(NamespaceView {
            netns: namespace.netns,
            host: namespace.host,
            shared: namespace.shared(),
            recent_failures: failures
                .iter()
                .filter(|f| f.event.netns == Some(namespace.netns))
                .count(),
            place: namespace.place,
            processes: namespace.processes,
            listeners: namespace.listeners,
            sharing: namespace.sharing,
            flags,
            flag_details: namespace.flags,
        });
    }
    detail
}
