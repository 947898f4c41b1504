//! The operational endpoints: `/metrics`, `/livez`, `/readyz`,
//! `/openapi.json`, and the landing page at `/`. They ignore query strings:
//! scrapers and probes may add parameters of their own.

use std::{sync::LazyLock, time::Instant};

use axum::{
    body::Bytes,
    extract::State,
    http::header,
    response::{Html, IntoResponse, Response},
};
use utoipa::OpenApi;

use super::{
    Shared,
    problem::{ApiError, Problem},
};

/// The Prometheus text exposition format's media type.
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Prometheus metrics.
#[utoipa::path(
    get,
    path = "/metrics",
    operation_id = "metrics",
    tag = "operations",
    responses(
        (status = 200, description = "The Prometheus text exposition format 0.0.4", content_type = "text/plain; version=0.0.4", body = String),
    )
)]
pub async fn metrics(State(shared): State<Shared>) -> Response {
    let asked = Instant::now();
    // One rendering at a time. A rendering that started after this scrape
    // arrived already shows everything the scrape could expect: it is
    // served again, shared, rather than rendered once more.
    let mut latest = shared.rendered.clone().lock_owned().await;
    if let Some(recent) = latest.as_ref().filter(|r| r.started >= asked) {
        return exposition(recent.text.clone());
    }
    // Rendering is CPU work that grows with the listeners (about 150 ms for
    // 100,000): off the runtime's workers, which serve the other requests.
    // The lock goes with the work, so it outlives a request given up on.
    let render = move || {
        let started = Instant::now();
        let text = Bytes::from((shared.metrics)());
        *latest = Some(Rendered {
            started,
            text: text.clone(),
        });
        text
    };
    match tokio::task::spawn_blocking(render).await {
        Ok(text) => exposition(text),
        // The renderer panicked: let the panic layer answer the 500.
        Err(err) => std::panic::resume_unwind(err.into_panic()),
    }
}

/// The latest `/metrics` text and when its rendering started.
pub struct Rendered {
    started: Instant,
    /// Shared by every response that serves it (a reference count, not a
    /// copy per reader).
    text: Bytes,
}

fn exposition(text: Bytes) -> Response {
    ([(header::CONTENT_TYPE, PROMETHEUS_TEXT)], text).into_response()
}

/// Liveness: the HTTP server answers.
#[utoipa::path(
    get,
    path = "/livez",
    operation_id = "livez",
    tag = "operations",
    responses((status = 200, description = "`ok`", content_type = "text/plain", body = String))
)]
pub async fn livez() -> &'static str {
    "ok"
}

/// Readiness: the kernel programs are attached and the start-up snapshot is
/// merged (or could not be taken).
///
/// A daemon that cannot list sockets (no sock_diag modules) is still ready:
/// its programs see every new bind, and taking it out of rotation (a
/// Kubernetes readiness probe) would hide what it does see. The body says
/// what it cannot see: `ready`, then one `degraded: ...` line per gap,
/// naming what to do (the kernel modules to load).
#[utoipa::path(
    get,
    path = "/readyz",
    operation_id = "readyz",
    tag = "operations",
    responses(
        (status = 200, description = "`ready`, then a `degraded: ...` line for each thing the daemon cannot see (a failing sock_diag listing, with the kernel modules to load)", content_type = "text/plain", body = String),
        (status = 503, description = "Not ready yet", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn readyz(State(shared): State<Shared>) -> Result<String, ApiError> {
    shared
        .read(|state| {
            state.ready.then(|| {
                crate::health::readyz_body(
                    state.listing.as_ref(),
                    state.owners_pending,
                    state.owners_failure.as_deref(),
                )
            })
        })
        .ok_or(ApiError::NotReady)
}

/// The OpenAPI document, built once.
static OPENAPI: LazyLock<String> = LazyLock::new(|| {
    super::ApiDoc::openapi()
        .to_pretty_json()
        .unwrap_or_else(|err| format!("{{\"error\":\"{err}\"}}"))
});

/// This API's OpenAPI 3.1 description.
#[utoipa::path(
    get,
    path = "/openapi.json",
    operation_id = "openapi",
    tag = "operations",
    responses((status = 200, description = "The OpenAPI document", content_type = "application/json", body = Object))
)]
pub async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        OPENAPI.as_str(),
    )
        .into_response()
}

/// A page linking the endpoints, for a person with a browser.
#[utoipa::path(
    get,
    path = "/",
    operation_id = "landing_page",
    tag = "operations",
    responses((status = 200, description = "An HTML page linking the endpoints", content_type = "text/html", body = String))
)]
pub async fn landing() -> Html<&'static str> {
    Html(LANDING)
}

const LANDING: &str = concat!(
    r#"<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><title>portwatch</title>
<style>body{font-family:system-ui,sans-serif;max-width:46em;margin:2em auto;padding:0 1em;line-height:1.5}code{background:#eee;padding:0 .2em}</style>
</head>
<body>
<h1>portwatch "#,
    env!("CARGO_PKG_VERSION"),
    r#"</h1>
<p>Who is bound to a port, who failed to bind, and why.</p>
<ul>
<li><a href="/ports">/ports</a>: every port with listeners (<code>?protocol=tcp|udp&amp;family=ipv4|ipv6&amp;netns=</code>)</li>
<li><a href="/ports/8000">/ports/8000</a>: one port: listeners, why they coexist, flags, who <code>localhost</code> reaches, recent failures</li>
<li><a href="/failures">/failures</a>: recent failed binds and listens (<code>?port=&amp;errno=&amp;since=&amp;limit=</code>)</li>
<li><a href="/check?protocol=tcp&amp;address=0.0.0.0&amp;port=8000">/check</a>: would this bind succeed? (<code>?protocol=&amp;address=&amp;port=&amp;reuse_addr=&amp;reuse_port=&amp;v6only=</code>)</li>
<li><a href="/events">/events</a>: live events as Server-Sent Events (<code>?port=</code>)</li>
<li><a href="/metrics">/metrics</a>: Prometheus metrics</li>
<li><a href="/livez">/livez</a> and <a href="/readyz">/readyz</a>: health</li>
<li><a href="/openapi.json">/openapi.json</a>: this API described in OpenAPI</li>
</ul>
</body>
</html>
"#
);
