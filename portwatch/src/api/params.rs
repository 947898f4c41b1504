//! Query strings and path parameters, parsed strictly: each endpoint names
//! the keys it takes, and an unknown or repeated key is refused rather than
//! ignored (a typo such as `?protcol=udp` would otherwise silently widen the
//! answer). Every refusal names the parameter and what it accepts.

use std::{
    net::IpAddr,
    str::FromStr,
    time::{Duration, SystemTime},
};

use super::problem::ApiError;
use crate::{
    event::{Errno, Family, Protocol},
    snapshot::workload::Workload,
    socket::NetnsCookie,
};

/// A query string split into its decoded `key=value` pairs.
#[derive(Debug, Default)]
pub struct Query {
    pairs: Vec<(String, String)>,
}

impl Query {
    /// Decodes `raw` (the part after `?`), refusing keys outside `allowed`
    /// and keys given twice. An empty key (`?&a=1`) is skipped.
    pub fn parse(raw: Option<&str>, allowed: &[&'static str]) -> Result<Query, ApiError> {
        let mut pairs: Vec<(String, String)> = Vec::new();
        for (key, value) in form_urlencoded::parse(raw.unwrap_or_default().as_bytes()) {
            if key.is_empty() {
                continue;
            }
            let Some(&known) = allowed.iter().find(|name| **name == key) else {
                return Err(ApiError::UnknownParameter {
                    name: shorten(&key),
                    allowed: if allowed.is_empty() {
                        "no parameters".to_owned()
                    } else {
                        allowed.join(", ")
                    },
                });
            };
            if pairs.iter().any(|(k, _)| k == known) {
                return Err(ApiError::RepeatedParameter { parameter: known });
            }
            pairs.push((known.to_owned(), value.into_owned()));
        }
        Ok(Query { pairs })
    }

    /// `path` with this query, `key` set to `value` (replacing what it was):
    /// the link to the next page of a paged answer.
    pub fn link_with(&self, path: &str, key: &str, value: &str) -> String {
        let mut query = form_urlencoded::Serializer::new(String::new());
        for (k, v) in self.pairs.iter().filter(|(k, _)| k != key) {
            query.append_pair(k, v);
        }
        query.append_pair(key, value);
        format!("{path}?{}", query.finish())
    }

    /// The value of `key`, if given.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// `parse` applied to the value of `key`, if given.
    pub fn opt<T>(
        &self,
        key: &'static str,
        parse: impl FnOnce(&'static str, &str) -> Result<T, ApiError>,
    ) -> Result<Option<T>, ApiError> {
        self.get(key).map(|v| parse(key, v)).transpose()
    }

    /// `parse` applied to the value of `key`, which must be given.
    pub fn required<T>(
        &self,
        key: &'static str,
        parse: impl FnOnce(&'static str, &str) -> Result<T, ApiError>,
    ) -> Result<T, ApiError> {
        self.opt(key, parse)?
            .ok_or(ApiError::MissingParameter { parameter: key })
    }
}

/// The longest piece of user input quoted back in a message.
const MAX_QUOTE: usize = 64;

/// `text`, cut to [`MAX_QUOTE`] characters, so that a huge value is not
/// echoed whole.
pub fn shorten(text: &str) -> String {
    match text.char_indices().nth(MAX_QUOTE) {
        Some((end, _)) => format!("{}...", &text[..end]),
        None => text.to_owned(),
    }
}

fn bad(parameter: &'static str, detail: String) -> ApiError {
    ApiError::BadParameter { parameter, detail }
}

/// A port number 1-65535: decimal digits only (no sign, no spaces).
pub fn port(parameter: &'static str, value: &str) -> Result<u16, ApiError> {
    let digits = !value.is_empty() && value.len() <= 5 && value.bytes().all(|b| b.is_ascii_digit());
    match value.parse::<u32>() {
        Ok(0) if digits => Err(bad(
            parameter,
            "port 0 is not a port (it asks the kernel for any free one); give 1 to 65535".into(),
        )),
        Ok(n @ 1..=65535) if digits => Ok(n as u16),
        _ => Err(bad(
            parameter,
            format!(
                "{parameter} must be a number from 1 to 65535, not {:?}",
                shorten(value)
            ),
        )),
    }
}

/// A protocol name: `tcp`, `udp`, `udplite`, `sctp` or `mptcp`, any case.
pub fn protocol(parameter: &'static str, value: &str) -> Result<Protocol, ApiError> {
    Protocol::from_name(value).ok_or_else(|| {
        bad(
            parameter,
            format!(
                "{parameter} must be tcp, udp, udplite, sctp or mptcp, not {:?}",
                shorten(value)
            ),
        )
    })
}

/// An address family: `ipv4` or `ipv6`, any case.
pub fn family(parameter: &'static str, value: &str) -> Result<Family, ApiError> {
    [Family::Ipv4, Family::Ipv6]
        .into_iter()
        .find(|f| f.name().eq_ignore_ascii_case(value))
        .ok_or_else(|| {
            bad(
                parameter,
                format!("{parameter} must be ipv4 or ipv6, not {:?}", shorten(value)),
            )
        })
}

/// A network namespace: its cookie (decimal), or `host` for the daemon's own.
pub fn netns(
    host: NetnsCookie,
) -> impl FnOnce(&'static str, &str) -> Result<NetnsCookie, ApiError> {
    move |parameter, value| {
        if value.eq_ignore_ascii_case("host") {
            return Ok(host);
        }
        value
            .parse::<u64>()
            .ok()
            .filter(|_| value.bytes().all(|b| b.is_ascii_digit()))
            .ok_or_else(|| {
                bad(
                    parameter,
                    format!(
                        "{parameter} must be a network namespace cookie (a decimal number) or \"host\", not {:?}",
                        shorten(value)
                    ),
                )
            })
    }
}

/// A Kubernetes pod, as `?pod=` names it: `NAME` in any namespace, or
/// `NAMESPACE/NAME`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodSelector {
    pub namespace: Option<String>,
    pub name: String,
}

impl PodSelector {
    /// Whether `workload` is this pod.
    pub fn matches(&self, workload: &Workload) -> bool {
        workload.pod.as_deref() == Some(self.name.as_str())
            && self
                .namespace
                .as_deref()
                .is_none_or(|ns| workload.pod_namespace.as_deref() == Some(ns))
    }
}

/// `NAME` or `NAMESPACE/NAME`, each a Kubernetes name: lowercase letters,
/// digits, `-` and `.`, at most 253 characters.
pub fn pod(parameter: &'static str, value: &str) -> Result<PodSelector, ApiError> {
    let is_name = |text: &str| {
        !text.is_empty()
            && text.len() <= 253
            && text
                .bytes()
                .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.'))
    };
    let (namespace, name) = match value.split_once('/') {
        Some((namespace, name)) => (Some(namespace), name),
        None => (None, value),
    };
    if is_name(name) && namespace.is_none_or(is_name) {
        return Ok(PodSelector {
            namespace: namespace.map(str::to_owned),
            name: name.to_owned(),
        });
    }
    Err(bad(
        parameter,
        format!(
            "{parameter} must be a pod name or NAMESPACE/NAME (lowercase letters, digits, '-' and '.'), not {:?}",
            shorten(value)
        ),
    ))
}

/// A uid (decimal, 0 to 4294967294; 4294967295 is "no uid" to the kernel).
pub fn uid(parameter: &'static str, value: &str) -> Result<u32, ApiError> {
    value
        .parse::<u32>()
        .ok()
        .filter(|&n| n != u32::MAX && value.bytes().all(|b| b.is_ascii_digit()))
        .ok_or_else(|| {
            bad(
                parameter,
                format!(
                    "{parameter} must be a uid from 0 to 4294967294, not {:?}",
                    shorten(value)
                ),
            )
        })
}

/// A boolean: `true`/`false`, `1`/`0`, any case; an empty value (`?reuse_port`)
/// is `true`.
pub fn boolean(parameter: &'static str, value: &str) -> Result<bool, ApiError> {
    match value.to_ascii_lowercase().as_str() {
        "" | "true" | "1" => Ok(true),
        "false" | "0" => Ok(false),
        _ => Err(bad(
            parameter,
            format!(
                "{parameter} must be true or false, not {:?}",
                shorten(value)
            ),
        )),
    }
}

/// An errno: a name (`EADDRINUSE`, any case), `UNKNOWN`, or a number from 1
/// to 4095 (`98`, `E98`).
pub fn errno(parameter: &'static str, value: &str) -> Result<Errno, ApiError> {
    Errno::from_str(value)
        .ok()
        .filter(|e| *e == Errno::UNKNOWN || (1..=4095).contains(&e.0))
        .ok_or_else(|| {
            bad(
                parameter,
                format!(
                    "{parameter} must be an errno name such as EADDRINUSE, or a number from 1 to 4095, not {:?}",
                    shorten(value)
                ),
            )
        })
}

/// A point in time: RFC 3339 (`2024-05-01T12:34:56Z`, `...+02:00`) or Unix
/// seconds, fractions allowed (`1714566896`, `1714566896.25`).
pub fn since(parameter: &'static str, value: &str) -> Result<SystemTime, ApiError> {
    let invalid = || {
        bad(
            parameter,
            format!(
                "{parameter} must be an RFC 3339 time (2024-05-01T12:34:56Z) or Unix seconds, not {:?}",
                shorten(value)
            ),
        )
    };
    if value.bytes().next().is_some_and(|b| b.is_ascii_digit())
        && value.bytes().all(|b| b.is_ascii_digit() || b == b'.')
    {
        let (whole, fraction) = value.split_once('.').unwrap_or((value, ""));
        let secs: u64 = whole.parse().map_err(|_| invalid())?;
        if !fraction.bytes().all(|b| b.is_ascii_digit()) {
            return Err(invalid());
        }
        // Nanoseconds from the first nine fraction digits.
        let nanos: u32 = format!("{:0<9}", &fraction[..fraction.len().min(9)])
            .parse()
            .map_err(|_| invalid())?;
        return SystemTime::UNIX_EPOCH
            .checked_add(Duration::new(secs, nanos))
            .ok_or_else(invalid);
    }
    let stamp = jiff::Timestamp::from_str(value).map_err(|_| invalid())?;
    Ok(SystemTime::from(stamp))
}

/// How many failures to return: 1 to `max`.
pub fn limit(max: usize) -> impl FnOnce(&'static str, &str) -> Result<usize, ApiError> {
    move |parameter, value| {
        value
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=max).contains(n) && value.bytes().all(|b| b.is_ascii_digit()))
            .ok_or_else(|| {
                bad(
                    parameter,
                    format!(
                        "{parameter} must be a number from 1 to {max}, not {:?}",
                        shorten(value)
                    ),
                )
            })
    }
}

/// An IP address, IPv6 with or without brackets (`::1`, `[::1]`).
pub fn address(parameter: &'static str, value: &str) -> Result<IpAddr, ApiError> {
    let bare = value
        .strip_prefix('[')
        .and_then(|v| v.strip_suffix(']'))
        .unwrap_or(value);
    IpAddr::from_str(bare).map_err(|_| {
        bad(
            parameter,
            format!(
                "{parameter} must be an IPv4 or IPv6 address (0.0.0.0, ::, 127.0.0.1), not {:?}",
                shorten(value)
            ),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_1_to_65535_in_plain_digits() {
        assert_eq!(port("port", "8000"), Ok(8000));
        assert_eq!(port("port", "65535"), Ok(65535));
        assert_eq!(port("port", "08000"), Ok(8000));
        for bad in [
            "0",
            "65536",
            "abc",
            "",
            "+80",
            "-1",
            " 80",
            "99999999999",
            "8e3",
        ] {
            assert!(port("port", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn unknown_and_repeated_keys_are_refused() {
        let allowed = ["port", "errno"];
        assert!(Query::parse(Some("port=1&errno=EACCES"), &allowed).is_ok());
        assert!(Query::parse(None, &allowed).is_ok());
        assert!(matches!(
            Query::parse(Some("prot=1"), &allowed),
            Err(ApiError::UnknownParameter { .. })
        ));
        assert!(matches!(
            Query::parse(Some("port=1&port=2"), &allowed),
            Err(ApiError::RepeatedParameter { parameter: "port" })
        ));
        let q = Query::parse(Some("&port=%38%30&"), &allowed).unwrap();
        assert_eq!(q.get("port"), Some("80"));
    }

    #[test]
    fn since_takes_rfc3339_and_unix_seconds() {
        let at = |s| since("since", s);
        let expected = SystemTime::UNIX_EPOCH + Duration::from_secs(1_714_566_896);
        assert_eq!(at("1714566896"), Ok(expected));
        assert_eq!(at("2024-05-01T12:34:56Z"), Ok(expected));
        assert_eq!(at("2024-05-01T14:34:56+02:00"), Ok(expected));
        assert_eq!(
            at("1714566896.25"),
            Ok(expected + Duration::from_millis(250))
        );
        for bad in [
            "yesterday",
            "",
            "1.2.3",
            ".5",
            "99999999999999999999999",
            "2024-13-01T00:00:00Z",
        ] {
            assert!(at(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn errnos_are_names_or_numbers_in_range() {
        assert_eq!(errno("errno", "eaddrinuse"), Ok(Errno::EADDRINUSE));
        assert_eq!(errno("errno", "98"), Ok(Errno::EADDRINUSE));
        assert_eq!(errno("errno", "UNKNOWN"), Ok(Errno::UNKNOWN));
        for bad in ["EFOO", "0", "-5", "5000", ""] {
            assert!(errno("errno", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn small_values_parse_strictly() {
        assert_eq!(boolean("b", ""), Ok(true));
        assert_eq!(boolean("b", "FALSE"), Ok(false));
        assert!(boolean("b", "yes").is_err());
        assert_eq!(protocol("p", "UDP"), Ok(Protocol::Udp));
        assert!(protocol("p", "icmp").is_err());
        assert_eq!(family("f", "ipv6"), Ok(Family::Ipv6));
        assert!(family("f", "inet").is_err());
        assert_eq!(netns(7)("netns", "host"), Ok(7));
        assert_eq!(netns(7)("netns", "42"), Ok(42));
        assert!(netns(7)("netns", "+42").is_err());
        assert_eq!(limit(10)("limit", "10"), Ok(10));
        assert!(limit(10)("limit", "0").is_err());
        assert!(limit(10)("limit", "11").is_err());
        assert_eq!(address("a", "[::1]"), Ok("::1".parse().unwrap()));
        assert!(address("a", "localhost").is_err());
        assert!(uid("uid", "4294967295").is_err());
    }

    #[test]
    fn long_input_is_quoted_short() {
        let long = "x".repeat(1000);
        assert_eq!(shorten(&long).len(), MAX_QUOTE + 3);
        assert_eq!(shorten("é".repeat(10).as_str()), "é".repeat(10));
    }

    #[test]
    fn pods_are_named_alone_or_with_their_namespace() {
        let web = Workload {
            pod: Some("web-7d9f8-x2x4q".into()),
            pod_namespace: Some("shop".into()),
            ..Workload::default()
        };
        for (value, matches) in [
            ("web-7d9f8-x2x4q", true),
            ("shop/web-7d9f8-x2x4q", true),
            ("kube-system/web-7d9f8-x2x4q", false),
            ("web", false),
        ] {
            assert_eq!(pod("pod", value).unwrap().matches(&web), matches, "{value}");
        }
        assert!(!pod("pod", "web").unwrap().matches(&Workload::default()));
        for bad in [
            "",
            "/",
            "shop/",
            "/web",
            "Web",
            "a/b/c",
            "we b",
            "a_b",
            &"x".repeat(254),
        ] {
            let err = pod("pod", bad).unwrap_err();
            assert!(err.to_string().contains("pod"), "{bad:?}: {err}");
        }
    }
}
