//! `GET /events`: live events as Server-Sent Events.
//!
//! Each event is one `data:` line holding the JSON object `portwatch trace
//! --json` prints (default event type, so `EventSource.onmessage` gets it).
//! A client too slow for the stream gets an event of type `lagged` with
//! `{"missed":N}` and the stream goes on. The stream ends when the daemon's
//! pipeline stops (every strong sender is gone).
//!
//! With `?port=N`, events whose requested or bound port is N pass, and so do
//! the listen-stops and closes of sockets known to be on N (closes carry
//! only the socket's cookie): the ones on the port when the stream started
//! and the ones bound there since.

use std::{collections::HashSet, convert::Infallible, sync::Arc, time::Duration};

use axum::{
    extract::{RawQuery, State},
    response::sse::{Event, KeepAlive, Sse},
};
use futures_util::{Stream, stream};
use tokio::sync::broadcast::{self, error::RecvError};

use super::{
    Shared,
    params::{self, Query},
    problem::ApiError,
};
use crate::{
    event::{BootClock, EventKind, PortEvent},
    trace,
};

/// How often an idle stream sends a comment, so that proxies and clients
/// keep the connection.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// Socket cookies followed per stream at most (a port rarely has more than a
/// few sockets; this only bounds a pathological one).
const MAX_FOLLOWED: usize = 65_536;

/// The live stream.
#[utoipa::path(
    get,
    path = "/events",
    operation_id = "stream_events",
    tag = "events",
    params(
        ("port" = Option<u16>, Query, description = "only events about this port (1 to 65535)", minimum = 1),
    ),
    responses(
        (status = 200, description = "Server-Sent Events: one `portwatch trace --json` object per event; `lagged` events say how many were missed", content_type = "text/event-stream", body = String),
        (status = 400, description = "A bad or unknown parameter", body = super::problem::Problem, content_type = "application/problem+json"),
        (status = 503, description = "The daemon is shutting down", body = super::problem::Problem, content_type = "application/problem+json"),
    )
)]
pub async fn events(
    State(shared): State<Shared>,
    RawQuery(raw): RawQuery,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let query = Query::parse(raw.as_deref(), &["port"])?;
    let port = query.opt("port", params::port)?;
    let receiver = shared
        .events
        .upgrade()
        .ok_or(ApiError::ShuttingDown)?
        .subscribe();
    // Subscribed first, then read: a socket that changes in between is seen
    // both ways, never missed.
    let followed: HashSet<u64> = match port {
        Some(port) => shared.read(|state| {
            state
                .map
                .on_port(port)
                .map(|e| e.facts.cookie)
                .take(MAX_FOLLOWED)
                .collect()
        }),
        None => HashSet::new(),
    };
    let stream = Subscription {
        receiver,
        filter: PortFilter { port, followed },
        clock: shared.clock,
    };
    Ok(Sse::new(stream.into_stream()).keep_alive(KeepAlive::new().interval(KEEP_ALIVE)))
}

/// What one stream passes.
struct PortFilter {
    port: Option<u16>,
    /// Cookies of the sockets known to be on the port.
    followed: HashSet<u64>,
}

impl PortFilter {
    fn pass(&mut self, event: &PortEvent) -> bool {
        let Some(port) = self.port else { return true };
        let on_port = event.concerns_port(port);
        match (event.kind, event.cookie) {
            (EventKind::Bind | EventKind::Listen, Some(cookie)) if on_port => {
                if self.followed.len() < MAX_FOLLOWED {
                    self.followed.insert(cookie);
                }
                true
            }
            (EventKind::Close, Some(cookie)) => self.followed.remove(&cookie) || on_port,
            (EventKind::ListenStop, Some(cookie)) => self.followed.contains(&cookie) || on_port,
            _ => on_port,
        }
    }
}

/// The state of one stream.
struct Subscription {
    receiver: broadcast::Receiver<Arc<PortEvent>>,
    filter: PortFilter,
    clock: BootClock,
}

impl Subscription {
    fn into_stream(self) -> impl Stream<Item = Result<Event, Infallible>> {
        stream::unfold(self, |mut this| async move {
            loop {
                match this.receiver.recv().await {
                    Ok(event) => {
                        if this.filter.pass(&event) {
                            let data = trace::json_line(&event, &this.clock);
                            return Some((Ok(Event::default().data(data)), this));
                        }
                    }
                    Err(RecvError::Lagged(missed)) => {
                        let lagged = Event::default()
                            .event("lagged")
                            .data(format!("{{\"missed\":{missed}}}"));
                        return Some((Ok(lagged), this));
                    }
                    Err(RecvError::Closed) => return None,
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use super::*;
    use crate::event::Protocol;

    fn event(kind: EventKind, cookie: u64, port: u16) -> PortEvent {
        let any = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
        PortEvent::example(kind, Protocol::Tcp, any, port, cookie)
    }

    #[test]
    fn closes_of_sockets_on_the_port_pass_the_port_filter() {
        let mut filter = PortFilter {
            port: Some(8000),
            followed: HashSet::from([7]),
        };
        assert!(filter.pass(&event(EventKind::Bind, 1, 8000)));
        assert!(!filter.pass(&event(EventKind::Bind, 2, 9000)));
        // Closes carry no port: known cookies pass, others do not.
        assert!(filter.pass(&event(EventKind::Close, 1, 0)));
        assert!(filter.pass(&event(EventKind::Close, 7, 0)));
        assert!(!filter.pass(&event(EventKind::Close, 2, 0)));
        assert!(
            !filter.pass(&event(EventKind::Close, 1, 0)),
            "forgotten once closed"
        );
        let mut all = PortFilter {
            port: None,
            followed: HashSet::new(),
        };
        assert!(all.pass(&event(EventKind::Close, 2, 0)));
    }
}
