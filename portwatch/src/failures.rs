//! Failed binds and listens, each with what blocked it. Pure logic: the
//! sockets to judge against are an input (the map's, plus whatever sock_diag
//! reported at failure time for sockets the map does not keep).

use std::{collections::VecDeque, time::SystemTime};

use serde::Serialize;

use crate::{
    event::{Errno, EventKind, PortEvent},
    map::{Entry, PortMap},
    rules::{self, Verdict},
    socket::{BindRequest, ShareOptions, SockState, SocketFacts},
};

/// A socket that blocked a bind, as users need to see it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Blocker {
    /// The blocking socket.
    #[serde(flatten)]
    pub facts: SocketFacts,
    /// `address:port` as users write it.
    pub endpoint: String,
    /// What the socket is: `listener`, `bound socket (not listening)`,
    /// `connected socket`, `TIME_WAIT`.
    pub what: &'static str,
    /// Processes holding it, with their unit or container when known.
    pub holders: Vec<BlockerHolder>,
    /// Why the kernel says it conflicts, in one sentence.
    pub reason: String,
}

/// A process holding a blocking socket.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BlockerHolder {
    pub pid: u32,
    pub process: String,
    pub unit: Option<String>,
    pub container: Option<String>,
}

/// One failed bind or listen.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Failure {
    pub time: SystemTime,
    /// The failed attempt as the kernel reported it.
    pub event: PortEvent,
    /// What the conflict rules name as the cause; empty when the failure is
    /// not a port conflict (EACCES, EADDRNOTAVAIL) or nothing matched.
    pub blocked_by: Vec<Blocker>,
}

/// The request a failed bind event describes.
pub fn request_of(event: &PortEvent) -> BindRequest {
    BindRequest {
        netns: event.netns.unwrap_or(0),
        protocol: event.protocol,
        family: event.family,
        address: event.address,
        port: event.port,
        options: ShareOptions {
            reuse_addr: event.options.reuse_addr,
            reuse_port: event.options.reuse_port,
            v6only: event.options.v6only,
        },
        uid: event.sock_uid.unwrap_or(event.uid),
    }
}

/// Whether a failure is a port conflict worth attributing.
pub fn is_conflict(event: &PortEvent) -> bool {
    matches!(event.kind, EventKind::BindFailed | EventKind::ListenFailed)
        && event.errno == Some(Errno::EADDRINUSE)
}

/// Names the sockets that blocked `event`, judged against what the map holds
/// on that port.
pub fn attribute(event: &PortEvent, map: &PortMap) -> Vec<Blocker> {
    if !is_conflict(event) {
        return Vec::new();
    }
    let request = request_of(event);
    let existing = map.facts_on(request.netns, request.protocol, request.port);
    attribute_against(event, existing, map)
}

/// Whether the map alone may not tell the whole story: nothing in it
/// explains the conflict, or a blocker is a bound TCP socket that may have
/// connected since (the map does not follow connections). sock_diag at
/// failure time answers then.
pub fn needs_diag(event: &PortEvent, blocked_by: &[Blocker]) -> bool {
    is_conflict(event)
        && (blocked_by.is_empty() || blocked_by.iter().any(|b| b.facts.state == SockState::Bound))
}

/// Names the sockets that blocked `event` among `existing` (the sockets on
/// that netns, protocol and port: the map's, or sock_diag's at failure time,
/// TIME_WAIT and connections included). `map` names their holders.
pub fn attribute_against(
    event: &PortEvent,
    mut existing: Vec<SocketFacts>,
    map: &PortMap,
) -> Vec<Blocker> {
    if !is_conflict(event) {
        return Vec::new();
    }
    let request = request_of(event);
    existing.retain(|f| f.cookie == 0 || Some(f.cookie) != event.cookie);
    // The kernel walks sockets in bind order; cookies grow in that order.
    existing.sort_by_key(|f| f.cookie);
    let verdict = match event.kind {
        EventKind::ListenFailed => {
            let me = SocketFacts {
                cookie: event.cookie.unwrap_or(0),
                netns: request.netns,
                protocol: request.protocol,
                family: request.family,
                address: request.address,
                port: event.bound_port.unwrap_or(request.port),
                state: SockState::Bound,
                options: map
                    .get(event.cookie.unwrap_or(0))
                    .map_or(request.options, |e| e.facts.options),
                uid: event.sock_uid,
                bound_dev_if: 0,
            };
            rules::can_listen(&existing, &me)
        }
        _ => rules::can_bind(&existing, &request),
    };
    match verdict {
        Verdict::Ok => Vec::new(),
        Verdict::Refused { blockers, .. } => blockers
            .into_iter()
            .map(|b| {
                let entry = map.get(b.socket.cookie).filter(|_| b.socket.cookie != 0);
                describe(entry, b.socket, b.why.explanation())
            })
            .collect(),
    }
}

/// The holders a snapshot found for a socket the map does not keep.
pub fn holders_of(seen: &crate::map::Observed) -> Vec<BlockerHolder> {
    seen.holders
        .iter()
        .map(|h| BlockerHolder {
            pid: h.pid,
            process: h.process.clone(),
            unit: seen.unit.clone(),
            container: seen.container.clone(),
        })
        .collect()
}

fn describe(entry: Option<&Entry>, facts: SocketFacts, reason: impl Into<String>) -> Blocker {
    let what = match facts.state {
        SockState::Listening => "listener",
        SockState::Bound => "bound socket (not listening)",
        SockState::Connected => "connected socket",
        SockState::TimeWait => "TIME_WAIT",
    };
    let holders = entry
        .map(|e| {
            e.holders
                .iter()
                .map(|h| BlockerHolder {
                    pid: h.pid,
                    process: h.process.clone(),
                    unit: e.unit.clone(),
                    container: e.container.clone(),
                })
                .collect()
        })
        .unwrap_or_default();
    Blocker {
        endpoint: crate::event::endpoint(facts.address, facts.port),
        facts,
        what,
        holders,
        reason: reason.into(),
    }
}

/// The most recent failures, bounded.
#[derive(Debug)]
pub struct FailureLog {
    entries: VecDeque<Failure>,
    capacity: usize,
}

impl FailureLog {
    pub fn new(capacity: usize) -> FailureLog {
        FailureLog {
            entries: VecDeque::with_capacity(capacity.min(4096)),
            capacity: capacity.max(1),
        }
    }

    pub fn push(&mut self, failure: Failure) {
        if self.entries.len() == self.capacity {
            self.entries.pop_front();
        }
        self.entries.push_back(failure);
    }

    /// Newest first.
    pub fn newest(&self) -> impl Iterator<Item = &Failure> {
        self.entries.iter().rev()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}
