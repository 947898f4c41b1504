//! Errors as RFC 9457 `application/problem+json` bodies: the API's own
//! ([`ApiError`]) and every other error response (axum's 405, the body
//! limit's 413, the timeout's 503, a caught panic), rewritten by
//! [`problemize`] so that clients parse one error format.

use axum::{
    Json,
    body::Body,
    extract::Request,
    http::{HeaderValue, StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Response},
};
use serde::Serialize;
use utoipa::ToSchema;

/// The media type of problem details (RFC 9457).
pub const PROBLEM_JSON: &str = "application/problem+json";

/// The longest request target (path and query) the API reads, in bytes.
/// Real requests are far shorter; anything longer is refused before routing.
pub const MAX_URI: usize = 4096;

/// The largest request body accepted; every endpoint is a GET and reads none.
pub const MAX_BODY: usize = 16 * 1024;

/// An RFC 9457 problem details object.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, ToSchema)]
#[schema(example = json!({
    "type": "urn:portwatch:problem:bad-parameter",
    "title": "Bad parameter",
    "status": 400,
    "detail": "port must be a number from 1 to 65535, not \"65536\"",
    "parameter": "port"
}))]
pub struct Problem {
    /// What kind of problem: `urn:portwatch:problem:<name>`, or `about:blank`
    /// when the HTTP status says it all.
    #[serde(rename = "type")]
    pub kind: String,
    /// A short summary of the kind, the same for every occurrence.
    pub title: String,
    /// The HTTP status code.
    pub status: u16,
    /// What went wrong with this request, in one sentence.
    pub detail: String,
    /// The path or query parameter at fault, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parameter: Option<String>,
}

impl Problem {
    /// A problem whose status says it all (`about:blank`, RFC 9457 4.2.1).
    pub fn from_status(status: StatusCode, detail: impl Into<String>) -> Problem {
        Problem {
            kind: "about:blank".into(),
            title: status.canonical_reason().unwrap_or("Error").into(),
            status: status.as_u16(),
            detail: detail.into(),
            parameter: None,
        }
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut response = (status, Json(self)).into_response();
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        response
    }
}

/// Why the API refused a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// A path or query parameter has a value the endpoint does not accept.
    #[error("{detail}")]
    BadParameter {
        /// The parameter's name (`port`, `since`, ...).
        parameter: &'static str,
        /// What is wrong with it.
        detail: String,
    },
    /// A required query parameter is absent.
    #[error("the query parameter `{parameter}` is required")]
    MissingParameter {
        /// The parameter's name.
        parameter: &'static str,
    },
    /// A query parameter this endpoint does not take (typos would otherwise
    /// silently widen an answer).
    #[error("unknown query parameter `{name}`; this endpoint takes {allowed}")]
    UnknownParameter {
        /// The name as sent.
        name: String,
        /// The names the endpoint takes, for the message.
        allowed: String,
    },
    /// The same query parameter more than once.
    #[error("the query parameter `{parameter}` is given more than once")]
    RepeatedParameter {
        /// The parameter's name.
        parameter: &'static str,
    },
    /// No route has this path.
    #[error("nothing at {path}; GET / lists the endpoints")]
    NotFound {
        /// The path asked for (cut short if long).
        path: String,
    },
    /// The request target is longer than [`MAX_URI`].
    #[error("the request target is {length} bytes; the limit is {MAX_URI}")]
    UriTooLong {
        /// Its length in bytes.
        length: usize,
    },
    /// The request announces a body larger than [`MAX_BODY`].
    #[error(
        "the request body is {length} bytes; the limit is {MAX_BODY} (no endpoint reads a body)"
    )]
    BodyTooLarge {
        /// The announced length.
        length: u64,
    },
    /// The programs are not attached or the start-up snapshot is not merged.
    #[error(
        "the kernel programs are not attached or the start-up snapshot is not merged yet; answers would be incomplete"
    )]
    NotReady,
    /// The first ephemeral port listing has not finished.
    #[error(
        "the first ephemeral port listing has not finished yet; it runs at start and every ephemeral_interval"
    )]
    NotListedYet,
    /// The live event stream is gone: the daemon is shutting down.
    #[error("the daemon is shutting down; no live events will follow")]
    ShuttingDown,
}

impl ApiError {
    /// The HTTP status it is answered with.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadParameter { .. }
            | Self::MissingParameter { .. }
            | Self::UnknownParameter { .. }
            | Self::RepeatedParameter { .. } => StatusCode::BAD_REQUEST,
            Self::NotFound { .. } => StatusCode::NOT_FOUND,
            Self::UriTooLong { .. } => StatusCode::URI_TOO_LONG,
            Self::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::NotReady | Self::NotListedYet | Self::ShuttingDown => {
                StatusCode::SERVICE_UNAVAILABLE
            }
        }
    }

    /// The problem type's last part (`urn:portwatch:problem:<name>`) and title.
    fn kind(&self) -> (&'static str, &'static str) {
        match self {
            Self::BadParameter { .. } => ("bad-parameter", "Bad parameter"),
            Self::MissingParameter { .. } => ("missing-parameter", "Missing parameter"),
            Self::UnknownParameter { .. } => ("unknown-parameter", "Unknown parameter"),
            Self::RepeatedParameter { .. } => ("repeated-parameter", "Repeated parameter"),
            Self::NotFound { .. } => ("not-found", "Not found"),
            Self::UriTooLong { .. } => ("uri-too-long", "Request target too long"),
            Self::BodyTooLarge { .. } => ("body-too-large", "Request body too large"),
            Self::NotReady => ("not-ready", "Not ready"),
            Self::NotListedYet => ("not-listed-yet", "Not listed yet"),
            Self::ShuttingDown => ("shutting-down", "Shutting down"),
        }
    }

    /// The parameter at fault, if any.
    fn parameter(&self) -> Option<String> {
        match self {
            Self::BadParameter { parameter, .. }
            | Self::MissingParameter { parameter }
            | Self::RepeatedParameter { parameter } => Some((*parameter).to_owned()),
            Self::UnknownParameter { name, .. } => Some(name.clone()),
            _ => None,
        }
    }

    /// The problem details of this error.
    pub fn problem(&self) -> Problem {
        let (name, title) = self.kind();
        Problem {
            kind: format!("urn:portwatch:problem:{name}"),
            title: title.into(),
            status: self.status().as_u16(),
            detail: self.to_string(),
            parameter: self.parameter(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        self.problem().into_response()
    }
}

/// The longest error body of another layer that is kept as a problem's
/// `detail`.
const MAX_DETAIL: usize = 512;

/// Middleware: refuses oversized requests before any handler runs, and turns
/// every error response that is not problem+json yet into one, keeping its
/// status and headers (a 405's `Allow`) and its text as the detail.
pub async fn problemize(request: Request, next: Next) -> Response {
    let target = request
        .uri()
        .path_and_query()
        .map_or(0, |pq| pq.as_str().len());
    if target > MAX_URI {
        return ApiError::UriTooLong { length: target }.into_response();
    }
    let announced = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(length) = announced.filter(|&n| n > MAX_BODY as u64) {
        return ApiError::BodyTooLarge { length }.into_response();
    }
    let response = next.run(request).await;
    let status = response.status();
    let is_problem = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(PROBLEM_JSON.as_bytes()));
    if !(status.is_client_error() || status.is_server_error()) || is_problem {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, MAX_DETAIL)
        .await
        .ok()
        .and_then(|bytes| String::from_utf8(bytes.to_vec()).ok())
        .map(|text| text.trim().to_owned())
        .filter(|text| !text.is_empty());
    let detail =
        text.unwrap_or_else(|| status.canonical_reason().unwrap_or("error").to_lowercase());
    let problem = Problem::from_status(status, detail);
    let body = serde_json::to_vec(&problem).unwrap_or_default();
    parts.headers.remove(header::CONTENT_LENGTH);
    parts
        .headers
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
    Response::from_parts(parts, Body::from(body))
}

/// What a caught panic is answered with: a 500, never the panic's message
/// (it may hold internal details; the log has it).
pub fn panic_response(panic: Box<dyn std::any::Any + Send + 'static>) -> Response {
    let message = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("(no message)");
    tracing::error!(panic = message, "an API handler panicked");
    Problem::from_status(
        StatusCode::INTERNAL_SERVER_ERROR,
        "portwatch hit a bug answering this request; the daemon's log has the details",
    )
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_names_a_type_title_and_matching_status() {
        let errors = [
            ApiError::BadParameter {
                parameter: "port",
                detail: "bad".into(),
            },
            ApiError::MissingParameter { parameter: "port" },
            ApiError::UnknownParameter {
                name: "x".into(),
                allowed: "port".into(),
            },
            ApiError::RepeatedParameter { parameter: "port" },
            ApiError::NotFound { path: "/x".into() },
            ApiError::UriTooLong { length: 5000 },
            ApiError::BodyTooLarge { length: 1 << 20 },
            ApiError::NotReady,
            ApiError::NotListedYet,
            ApiError::ShuttingDown,
        ];
        for error in errors {
            let problem = error.problem();
            assert!(problem.kind.starts_with("urn:portwatch:problem:"));
            assert_eq!(problem.status, error.status().as_u16());
            assert!(!problem.title.is_empty() && !problem.detail.is_empty());
        }
    }

    #[test]
    fn a_status_only_problem_is_about_blank_with_the_reason_phrase() {
        let problem = Problem::from_status(StatusCode::METHOD_NOT_ALLOWED, "x");
        assert_eq!(problem.kind, "about:blank");
        assert_eq!(problem.title, "Method Not Allowed");
        assert_eq!(problem.status, 405);
    }
}
