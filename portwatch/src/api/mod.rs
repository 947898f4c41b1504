//! The HTTP API: the daemon's answers over HTTP, read from the shared
//! [`State`] and the live event broadcast.
//!
//! | route | answer |
//! | --- | --- |
//! | `GET /` | an HTML page linking the rest |
//! | `GET /ports` | every port with listeners |
//! | `GET /ports/{port}` | one port: listeners, sharing, flags, `localhost`, recent failures |
//! | `GET /failures` | recent failed binds and listens, newest first |
//! | `GET /check` | would this bind succeed? |
//! | `GET /ephemeral` | each namespace's ephemeral port range: usable, busiest destinations, what takes ports |
//! | `GET /events` | live events (Server-Sent Events) |
//! | `GET /metrics` | Prometheus metrics, from the renderer given in [`ApiContext`] |
//! | `GET /livez`, `GET /readyz` | health |
//! | `GET /openapi.json` | this API in OpenAPI 3.1 |
//!
//! Every error is an RFC 9457 `application/problem+json` body. Query
//! strings are strict: an unknown or repeated parameter is a 400 naming it
//! (the operational endpoints ignore query strings). Requests are bounded:
//! the request target to [`problem::MAX_URI`] bytes (414), bodies to
//! [`problem::MAX_BODY`] (413), and handling to [`REQUEST_TIMEOUT`] (503); a
//! panic becomes a 500 instead of a dropped connection.
//!
//! The state's lock is taken only inside a handler's synchronous part, never
//! across an await.

mod check;
mod ephemeral;
mod events;
mod failures;
pub mod model;
mod ops;
mod params;
mod ports;

pub use ports::{PORTS_PAGE, PORTS_PAGE_MAX};
pub mod problem;

use std::{
    sync::{Arc, PoisonError},
    time::Duration,
};

use axum::{
    Router,
    http::{StatusCode, Uri},
    middleware,
    routing::get,
};
use tokio::sync::{Mutex, broadcast};
use tower_http::{
    catch_panic::CatchPanicLayer, limit::RequestBodyLimitLayer, timeout::TimeoutLayer,
};
use utoipa::OpenApi;

use crate::{
    event::{BootClock, PortEvent},
    state::State,
    watch::SharedState,
};
pub use ops::PROMETHEUS_TEXT;
pub use problem::{ApiError, PROBLEM_JSON, Problem};

/// How long a request may take before it is answered with a 503. Only the
/// time to the response's head counts: an `/events` stream runs on.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// What the API reads.
#[derive(Clone)]
pub struct ApiContext {
    /// The daemon's state.
    pub state: SharedState,
    /// The live events. The API keeps only a weak handle: `/events` streams
    /// end when the pipeline's senders are dropped, so that a graceful
    /// shutdown is not held up by open streams.
    pub events: broadcast::Sender<Arc<PortEvent>>,
    /// Renders the Prometheus text exposition (the metrics module's).
    pub metrics: Arc<dyn Fn() -> String + Send + Sync>,
    /// Turns an event's boot time into wall time.
    pub clock: BootClock,
}

/// What the handlers share: the context, with the event sender made weak.
#[derive(Clone)]
struct Shared {
    state: SharedState,
    events: broadcast::WeakSender<Arc<PortEvent>>,
    metrics: Arc<dyn Fn() -> String + Send + Sync>,
    /// The latest `/metrics` rendering. One rendering at a time (each takes
    /// a blocking thread and memory that grows with the listeners), and the
    /// scrapes that waited for one share its text: a flood of scrapes costs
    /// two renderings, not one each, and never serves a text older than
    /// the scrape.
    rendered: Arc<Mutex<Option<ops::Rendered>>>,
    clock: BootClock,
}

impl Shared {
    fn new(ctx: ApiContext) -> Shared {
        Shared {
            state: ctx.state,
            events: ctx.events.downgrade(),
            metrics: ctx.metrics,
            rendered: Arc::new(Mutex::new(None)),
            clock: ctx.clock,
        }
    }

    /// Reads the state under its lock. `f` is synchronous, so the lock is
    /// never held across an await; a writer that panicked left the state
    /// usable (every write is a whole update), so poisoning is ignored.
    fn read<T>(&self, f: impl FnOnce(&State) -> T) -> T {
        f(&self.state.read().unwrap_or_else(PoisonError::into_inner))
    }
}

/// The full API.
pub fn router(ctx: ApiContext) -> Router {
    let routes = operational()
        .route("/", get(ops::landing))
        .route("/ports", get(ports::list))
        .route("/ports/{port}", get(ports::detail))
        .route("/failures", get(failures::list))
        .route("/check", get(check::check))
        .route("/ephemeral", get(ephemeral::list))
        .route("/events", get(events::events))
        .route("/openapi.json", get(ops::openapi));
    bounded(routes, Shared::new(ctx))
}

/// Only `/metrics`, `/livez` and `/readyz`: for a listener exposed to the
/// network, which should not show processes, users and failures.
pub fn metrics_router(ctx: ApiContext) -> Router {
    bounded(operational(), Shared::new(ctx))
}

fn operational() -> Router<Shared> {
    Router::new()
        .route("/metrics", get(ops::metrics))
        .route("/livez", get(ops::livez))
        .route("/readyz", get(ops::readyz))
}

/// Adds the 404 fallback and the bounds every request goes through.
fn bounded(routes: Router<Shared>, shared: Shared) -> Router {
    routes
        .fallback(not_found)
        .with_state(shared)
        .layer(RequestBodyLimitLayer::new(problem::MAX_BODY))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            REQUEST_TIMEOUT,
        ))
        .layer(middleware::from_fn(problem::problemize))
        .layer(CatchPanicLayer::custom(problem::panic_response))
}

async fn not_found(uri: Uri) -> ApiError {
    ApiError::NotFound {
        path: params::shorten(uri.path()),
    }
}

/// The OpenAPI description served at `/openapi.json`.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "portwatch",
        description = "Who is bound to a port, who failed to bind, and why. Errors are RFC 9457 application/problem+json; unknown query parameters are refused."
    ),
    paths(
        ports::list,
        ports::detail,
        failures::list,
        check::check,
        ephemeral::list,
        events::events,
        ops::metrics,
        ops::livez,
        ops::readyz,
        ops::openapi,
        ops::landing,
    ),
    components(schemas(Problem)),
    tags(
        (name = "ports", description = "Who holds a port, and why they coexist"),
        (name = "failures", description = "Failed binds and listens, with what blocked them"),
        (name = "check", description = "The predictor: would a bind succeed?"),
        (name = "ephemeral", description = "Ephemeral ports: how much of each namespace's range is left, per destination"),
        (name = "events", description = "Live events"),
        (name = "operations", description = "Metrics, health and this description"),
    )
)]
pub struct ApiDoc;
