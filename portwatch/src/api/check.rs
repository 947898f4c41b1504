//! `GET /check`: would this bind succeed now? The conflict rules
//! ([`rules::predict_bind`]) judged against the sockets the map holds on the
//! port, which are listeners and bound sockets: connections and TIME_WAIT
//! entries are not in the map, so a TCP answer of "ok" says so. Where the
//! answer rests on how this kernel walks a UDP port's sockets, or on how its
//! TCP treats `::ffff:0.0.0.0`, the explanation says so, and what the
//! start-up probe found.

use axum::{
    Json,
    extract::{RawQuery, State},
};

use super::{
    Shared,
    model::{BlockerView, CheckRequest, CheckResponse},
    params::{self, Query},
    problem::ApiError,
};
use crate::{
    event::{Family, Protocol},
    rules::{self, MappedAny, UdpWalk, Verdict},
    socket::{BindRequest, ShareOptions},
    state::State as DaemonState,
};

/// The predictor.
#[utoipa::path(
    get,
    path = "/check",
    operation_id = "check_bind",
    tag = "check",
    params(
        ("protocol" = Option<String>, Query, description = "tcp (default), udp, udplite, sctp or mptcp"),
        ("address" = String, Query, description = "the address to bind: 0.0.0.0, ::, 127.0.0.1, [::1]"),
        ("port" = u16, Query, description = "1 to 65535", minimum = 1),
        ("reuse_addr" = Option<bool>, Query, description = "SO_REUSEADDR (default false)"),
        ("reuse_port" = Option<bool>, Query, description = "SO_REUSEPORT (default false)"),
        ("v6only" = Option<bool>, Query, description = "IPV6_V6ONLY; unset leaves it to net.ipv6.bindv6only"),
        ("netns" = Option<String>, Query, description = "network namespace cookie, or `host` (default)"),
        ("uid" = Option<u32>, Query, description = "the socket owner's uid, which SO_REUSEPORT compares (default 0)"),
    ),
    responses(
        (status = 200, description = "The predicted outcome", body = CheckResponse),
        (status = 400, description = "A bad, missing or unknown parameter", body = super::problem::Problem, content_type = "application/problem+json"),
    )
)]
pub async fn check(
    State(shared): State<Shared>,
    RawQuery(raw): RawQuery,
) -> Result<Json<CheckResponse>, ApiError> {
    let query = Query::parse(
        raw.as_deref(),
        &[
            "protocol",
            "address",
            "port",
            "reuse_addr",
            "reuse_port",
            "v6only",
            "netns",
            "uid",
        ],
    )?;
    let host = shared.read(|state| state.host_netns);
    let address = query.required("address", params::address)?;
    let family = Family::of(address);
    let request = BindRequest {
        netns: query.opt("netns", params::netns(host))?.unwrap_or(host),
        protocol: query
            .opt("protocol", params::protocol)?
            .unwrap_or(Protocol::Tcp),
        family,
        address,
        port: query.required("port", params::port)?,
        options: ShareOptions {
            reuse_addr: Some(query.opt("reuse_addr", params::boolean)?.unwrap_or(false)),
            reuse_port: Some(query.opt("reuse_port", params::boolean)?.unwrap_or(false)),
            // Meaningless on IPv4; on IPv6 unset means the sysctl decides.
            v6only: query
                .opt("v6only", params::boolean)?
                .filter(|_| family == Family::Ipv6),
        },
        uid: query.opt("uid", params::uid)?.unwrap_or(0),
    };
    Ok(Json(shared.read(|state| judge(state, request))))
}

fn judge(state: &DaemonState, request: BindRequest) -> CheckResponse {
    // TCP and MPTCP sockets alike: they share one port space.
    let mut existing = state
        .map
        .facts_on(request.netns, request.protocol, request.port);
    // A stable order only: cookies are not bind order (per-CPU batches,
    // and sockets get theirs at creation), so the rules are asked for
    // answers that do not hang on it.
    existing.sort_by_key(|f| f.cookie);
    let walk = state.kernel.udp_walk;
    let mapped_any = state.kernel.mapped_any;
    let prediction = rules::predict_bind_unordered(state.kernel, None, &existing, &request);
    let blocked_by: Vec<BlockerView> = prediction
        .verdict
        .blockers()
        .iter()
        .map(|b| BlockerView::of_prediction(b, &state.map))
        .collect();
    let endpoint = crate::event::endpoint(request.address, request.port);
    let invalid = match &prediction.verdict {
        Verdict::Refused { invalid, .. } => *invalid,
        Verdict::Ok => None,
    };
    let mut explanation = match (prediction.verdict.errno(), invalid, blocked_by.first()) {
        (None, _, _) => {
            let mut text = format!(
                "{endpoint} is free: no socket portwatch tracks on {} port {} conflicts with it",
                request.protocol, request.port
            );
            if rules::same_port_space(request.protocol, Protocol::Tcp) {
                text.push_str(
                    " (connections and TIME_WAIT are not tracked; without SO_REUSEADDR a TIME_WAIT on this address can still refuse it)",
                );
            }
            text
        }
        (Some(errno), Some(invalid), _) => format!("{errno}: {}", invalid.explanation()),
        (Some(errno), None, Some(first)) => {
            let mut text = format!(
                "{errno}: {} is held by a {}{}: {}",
                first.endpoint,
                first.what,
                holders(first),
                first.reason
            );
            if blocked_by.len() > 1 {
                text.push_str(&format!(" (and {} more)", blocked_by.len() - 1));
            }
            text
        }
        (Some(errno), None, None) => format!("{errno}: {}", errno.description()),
    };
    if prediction.udp_walk_decides {
        explanation.push_str(&match walk {
            UdpWalk::Unknown => format!(
                ". The answer depends on how the kernel walks the UDP sockets on a port, and this one was not probed (udp_walk = {walk}): a kernel that stops at the first overlapping socket would let this bind through, one that checks every overlapping socket refuses it"
            ),
            known => format!(
                ". The answer depends on how the kernel walks the UDP sockets on a port: this one {} (udp_walk = {known}, probed at start)",
                known.description()
            ),
        });
    }
    if prediction.mapped_any_decides {
        explanation.push_str(&match mapped_any {
            MappedAny::Unknown => format!(
                ". The answer depends on how the kernel treats a TCP socket on ::ffff:0.0.0.0, and this one was not probed (mapped_any = {mapped_any}): Linux 6.1 lets an IPv6 socket bind a specific ::ffff:a.b.c.d address past it, other kernels refuse that"
            ),
            known => format!(
                ". The answer depends on how the kernel treats a TCP socket on ::ffff:0.0.0.0: this one {} (mapped_any = {known}, probed at start)",
                known.description()
            ),
        });
    }
    if !prediction.confident {
        explanation.push_str(
            ". Not certain: an option or owner portwatch could not read, the kernel's SO_REUSEPORT memory of the port, SCTP, a crowded UDP port, an unprobed UDP walk or an unprobed treatment of ::ffff:0.0.0.0 could change the answer",
        );
    }
    CheckResponse {
        ok: prediction.verdict.is_ok(),
        errno: prediction.verdict.errno(),
        errno_description: prediction
            .verdict
            .errno()
            .map(|e| e.description().to_owned()),
        confident: prediction.confident,
        invalid,
        blocked_by,
        explanation,
        request: CheckRequest {
            protocol: request.protocol,
            family: request.family,
            address: request.address,
            port: request.port,
            endpoint,
            netns: request.netns,
            uid: request.uid,
            reuse_addr: request.options.reuse_addr.unwrap_or(false),
            reuse_port: request.options.reuse_port.unwrap_or(false),
            v6only: request.options.v6only,
        },
    }
}

/// ` of node (pid 2001)`, ` of node (pid 1) and 2 more`, or nothing.
fn holders(blocker: &BlockerView) -> String {
    match blocker.holders.as_slice() {
        [] => String::new(),
        [one] => format!(" of {} (pid {})", one.process, one.pid),
        [first, rest @ ..] => format!(
            " of {} (pid {}) and {} more",
            first.process,
            first.pid,
            rest.len()
        ),
    }
}

#[cfg(test)]
mod tests {
    use std::{net::IpAddr, sync::Arc, time::SystemTime};

    use super::*;
    use crate::{
        map::Observed,
        rules::KernelRules,
        socket::{SockState, SocketFacts},
    };

    /// A daemon state whose map holds one IPv6 TCP socket on
    /// `[::ffff:0.0.0.0]:8080`, judging by `kernel`.
    fn state_with_mapped_any(kernel: KernelRules) -> DaemonState {
        let mut state = DaemonState::new(8, 8);
        state.kernel = kernel;
        state.host_netns = 1;
        let facts = SocketFacts {
            cookie: 1,
            netns: 1,
            protocol: Protocol::Tcp,
            family: Family::Ipv6,
            address: "::ffff:0.0.0.0".parse().unwrap(),
            port: 8080,
            state: SockState::Bound,
            options: ShareOptions {
                reuse_addr: Some(false),
                reuse_port: Some(false),
                v6only: Some(false),
            },
            uid: Some(0),
            bound_dev_if: 0,
        };
        let observed = Observed {
            facts,
            holders: Arc::new([]),
            inode: None,
            place: Default::default(),
        };
        state.map.merge(vec![observed], SystemTime::now());
        state
    }

    fn mapped_request() -> BindRequest {
        let address: IpAddr = "::ffff:127.0.0.2".parse().unwrap();
        BindRequest {
            netns: 1,
            protocol: Protocol::Tcp,
            family: Family::Ipv6,
            address,
            port: 8080,
            options: ShareOptions {
                reuse_addr: Some(false),
                reuse_port: Some(false),
                v6only: Some(false),
            },
            uid: 0,
        }
    }

    #[test]
    fn the_explanation_says_when_the_mapped_wildcard_decided() {
        let quirk = KernelRules {
            mapped_any: MappedAny::Quirk,
            ..KernelRules::UNKNOWN
        };
        let answer = judge(&state_with_mapped_any(quirk), mapped_request());
        assert!(answer.ok && answer.confident, "{}", answer.explanation);
        assert!(
            answer
                .explanation
                .contains("(mapped_any = quirk, probed at start)"),
            "{}",
            answer.explanation
        );
        let wildcard = KernelRules {
            mapped_any: MappedAny::Wildcard,
            ..KernelRules::UNKNOWN
        };
        let answer = judge(&state_with_mapped_any(wildcard), mapped_request());
        assert!(!answer.ok && answer.confident, "{}", answer.explanation);
        assert!(
            answer
                .explanation
                .contains("(mapped_any = wildcard, probed at start)"),
            "{}",
            answer.explanation
        );
        let answer = judge(
            &state_with_mapped_any(KernelRules::UNKNOWN),
            mapped_request(),
        );
        assert!(!answer.ok && !answer.confident, "{}", answer.explanation);
        assert!(
            answer
                .explanation
                .contains("this one was not probed (mapped_any = unknown)"),
            "{}",
            answer.explanation
        );
        // An IPv4 request does not depend on it: no note.
        let mut v4 = mapped_request();
        v4.family = Family::Ipv4;
        v4.address = "127.0.0.2".parse().unwrap();
        let answer = judge(&state_with_mapped_any(KernelRules::UNKNOWN), v4);
        assert!(!answer.ok && answer.confident, "{}", answer.explanation);
        assert!(
            !answer.explanation.contains("mapped_any"),
            "{}",
            answer.explanation
        );
    }
}
