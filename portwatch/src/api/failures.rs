//! `GET /failures`: recent failed binds and listens, with what blocked them.

use axum::{
    Json,
    extract::{RawQuery, State},
};

use super::{
    Shared,
    model::{FailureList, FailureView},
    params::{self, Query},
    problem::ApiError,
};

/// How many failures are returned without `limit`.
pub const DEFAULT_LIMIT: usize = 100;
/// The largest `limit` (the daemon keeps 10,000 failures by default).
pub const MAX_LIMIT: usize = 10_000;

/// Recent failures, newest first.
#[utoipa::path(
    get,
    path = "/failures",
    operation_id = "list_failures",
    tag = "failures",
    params(
        ("port" = Option<u16>, Query, description = "only failures on this port (1 to 65535)", minimum = 1),
        ("errno" = Option<String>, Query, description = "only this errno: a name (EADDRINUSE) or a number"),
        ("since" = Option<String>, Query, description = "only failures at or after this time: RFC 3339 or Unix seconds"),
        ("protocol" = Option<String>, Query, description = "tcp, udp, udplite, sctp or mptcp"),
        ("pod" = Option<String>, Query, description = "only failures of this Kubernetes pod: NAME, or NAMESPACE/NAME"),
        ("limit" = Option<usize>, Query, description = "at most this many, 1 to 10000 (default 100)", minimum = 1, maximum = 10000),
    ),
    responses(
        (status = 200, description = "Matching failures, newest first", body = FailureList),
        (status = 400, description = "A bad or unknown parameter", body = super::problem::Problem, content_type = "application/problem+json"),
    )
)]
pub async fn list(
    State(shared): State<Shared>,
    RawQuery(raw): RawQuery,
) -> Result<Json<FailureList>, ApiError> {
    let query = Query::parse(
        raw.as_deref(),
        &["port", "errno", "since", "protocol", "pod", "limit"],
    )?;
    let port = query.opt("port", params::port)?;
    let errno = query.opt("errno", params::errno)?;
    let since = query.opt("since", params::since)?;
    let protocol = query.opt("protocol", params::protocol)?;
    let pod = query.opt("pod", params::pod)?;
    let limit = query
        .opt("limit", params::limit(MAX_LIMIT))?
        .unwrap_or(DEFAULT_LIMIT);
    let failures = shared.read(|state| {
        state
            .failures
            .newest()
            .filter(|f| {
                let ev = &f.event;
                port.is_none_or(|p| ev.concerns_port(p))
                    && errno.is_none_or(|e| ev.errno == Some(e))
                    && since.is_none_or(|t| f.time >= t)
                    && protocol.is_none_or(|p| ev.protocol == p)
                    && pod
                        .as_ref()
                        .is_none_or(|pod| pod.matches(&f.place.workload))
            })
            .take(limit)
            .map(FailureView::of)
            .collect()
    });
    Ok(Json(FailureList { failures }))
}
