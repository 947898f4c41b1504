//! What the daemon cannot see right now, said the same way in its log,
//! `/readyz`, the systemd `STATUS=` line and its metrics.
//!
//! Today that is one thing: the sock_diag listing. Debian and most
//! distributions build `inet_diag`, `tcp_diag` and `udp_diag` as modules,
//! which the kernel loads on a listing's first request; a hardened host may
//! lack them or forbid loading (`kernel.modules_disabled=1`, lockdown). The
//! daemon then runs on live events alone: it is still ready (its programs
//! are attached and every new bind is seen), but sockets made before it
//! started are not listed and the map is not checked against the kernel.
//! Pure logic; the pipeline ([`crate::watch`]) fills it.

use crate::{
    event::{Family, Protocol},
    snapshot::SnapshotError,
};

/// The kernel modules that let sock_diag list TCP and UDP sockets: the
/// label values of `portwatch_kernel_module_missing`.
pub const DIAG_MODULES: [&str; 3] = ["inet_diag", "tcp_diag", "udp_diag"];

/// A failing sock_diag listing, as the daemon explains it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListingFailure {
    /// The error, on one line.
    pub error: String,
    /// The modules whose absence explains it (those the kernel refused to
    /// list with ENOENT); empty when it is something else.
    pub missing_modules: Vec<&'static str>,
}

/// The modules missing when the kernel has no handler (ENOENT) for the
/// dumps in `refused`. Both protocols refused: the family handler
/// `inet_diag` itself is missing, or cannot be told apart from both protocol
/// modules missing, so all three are named; one refused: the other works,
/// so `inet_diag` is there and only that protocol's module is missing.
pub fn missing_modules(refused: &[(Protocol, Family)]) -> Vec<&'static str> {
    let tcp = refused.iter().any(|(p, _)| *p == Protocol::Tcp);
    let udp = refused.iter().any(|(p, _)| *p == Protocol::Udp);
    match (tcp, udp) {
        (true, true) => DIAG_MODULES.to_vec(),
        (true, false) => vec!["tcp_diag"],
        (false, true) => vec!["udp_diag"],
        (false, false) => Vec::new(),
    }
}

impl ListingFailure {
    /// A listing's failure, with the modules that explain it when the
    /// kernel had no handler for some dumps.
    pub fn of(err: &SnapshotError) -> ListingFailure {
        let missing_modules = match err {
            SnapshotError::NoHandler { refused } => missing_modules(refused),
            _ => Vec::new(),
        };
        ListingFailure {
            error: err.to_string(),
            missing_modules,
        }
    }

    /// What to do about it, when the cause is known.
    pub fn advice(&self) -> Option<String> {
        if self.missing_modules.is_empty() {
            return None;
        }
        Some(format!(
            "load the kernel modules {} (modprobe -a {})",
            self.missing_modules.join(", "),
            self.missing_modules.join(" ")
        ))
    }

    /// The `/readyz` line: what is degraded, what it costs, what to do.
    pub fn readyz_line(&self) -> String {
        let mut line = format!(
            "degraded: the sock_diag listing fails ({}): sockets made before portwatch started are not listed, and the map is not checked against the kernel; it retries every reconcile_interval",
            self.error
        );
        if let Some(advice) = self.advice() {
            line.push_str("; ");
            line.push_str(&advice);
        }
        line
    }

    /// A short suffix for the systemd `STATUS=` line.
    pub fn status_suffix(&self) -> String {
        if self.missing_modules.is_empty() {
            "; degraded: no sock_diag listing".to_owned()
        } else {
            format!(
                "; degraded: no sock_diag listing (load {})",
                self.missing_modules.join(", ")
            )
        }
    }
}

/// The body of a `200 /readyz`: `ready`, then one line per thing the daemon
/// cannot see, and a `pending:` line while it reads the owners of the
/// sockets it found at start-up (plain `ready` when it sees everything).
pub fn readyz_body(
    listing: Option<&ListingFailure>,
    owners_pending: Option<usize>,
    owners_failure: Option<&str>,
) -> String {
    let mut body = String::from("ready");
    if let Some(failure) = listing {
        body.push('\n');
        body.push_str(&failure.readyz_line());
    }
    if let Some(error) = owners_failure {
        body.push_str(&format!(
            "\ndegraded: the processes of the sockets found at start-up could not be read ({error}); the next reconciliation reads them, and their SO_REUSE* options stay unknown"
        ));
    }
    if let Some(sockets) = owners_pending {
        body.push_str(&format!(
            "\npending: the processes and SO_REUSE* options of the {sockets} sockets found at start-up are being read"
        ));
    }
    body
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_refused_dumps_name_the_missing_modules() {
        use Family::{Ipv4, Ipv6};
        use Protocol::{Tcp, Udp};
        let all = [(Tcp, Ipv4), (Tcp, Ipv6), (Udp, Ipv4), (Udp, Ipv6)];
        assert_eq!(missing_modules(&all), ["inet_diag", "tcp_diag", "udp_diag"]);
        assert_eq!(missing_modules(&all[..2]), ["tcp_diag"]);
        assert_eq!(missing_modules(&all[2..]), ["udp_diag"]);
        assert!(missing_modules(&[]).is_empty());

        let failure = ListingFailure::of(&SnapshotError::NoHandler {
            refused: all.to_vec(),
        });
        assert_eq!(
            failure.error,
            "the kernel has no sock_diag handler for the tcp ipv4, tcp ipv6, udp ipv4, udp ipv6 dumps (No such file or directory)"
        );
        assert_eq!(
            failure.missing_modules,
            ["inet_diag", "tcp_diag", "udp_diag"]
        );
        // Any other failure names no module.
        let other = ListingFailure::of(&SnapshotError::Cookie(std::io::Error::from_raw_os_error(
            libc::ENOPROTOOPT,
        )));
        assert!(other.missing_modules.is_empty() && other.advice().is_none());
    }

    #[test]
    fn readyz_says_ready_and_what_is_degraded() {
        assert_eq!(readyz_body(None, None, None), "ready");
        assert!(
            readyz_body(None, None, Some("reading /proc: EACCES"))
                .starts_with("ready\ndegraded: the processes of the sockets found at start-up could not be read (reading /proc: EACCES)")
        );
        assert_eq!(
            readyz_body(None, Some(3), None),
            "ready\npending: the processes and SO_REUSE* options of the 3 sockets found at start-up are being read"
        );
        let failure = ListingFailure {
            error: "the kernel has no sock_diag handler for the tcp ipv4, udp ipv4 dumps (No such file or directory)".into(),
            missing_modules: vec!["inet_diag", "tcp_diag", "udp_diag"],
        };
        let body = readyz_body(Some(&failure), None, None);
        let lines: Vec<&str> = body.lines().collect();
        assert_eq!(lines[0], "ready");
        assert!(
            lines[1].starts_with(
                "degraded: the sock_diag listing fails (the kernel has no sock_diag handler for the tcp ipv4"
            ),
            "{body}"
        );
        assert!(
            lines[1].ends_with("load the kernel modules inet_diag, tcp_diag, udp_diag (modprobe -a inet_diag tcp_diag udp_diag)"),
            "{body}"
        );
        assert_eq!(
            failure.status_suffix(),
            "; degraded: no sock_diag listing (load inet_diag, tcp_diag, udp_diag)"
        );

        let other = ListingFailure {
            error: "entering network namespace /proc/7/ns/net: Operation not permitted".into(),
            missing_modules: Vec::new(),
        };
        assert_eq!(other.advice(), None);
        assert!(!readyz_body(Some(&other), None, None).contains("modprobe"));
        assert_eq!(other.status_suffix(), "; degraded: no sock_diag listing");
    }
}
