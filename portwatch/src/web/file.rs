//! web.yml as exporter-toolkit defines it (the file node_exporter,
//! Prometheus and most exporters read with `--web.config.file`), so that an
//! operator's existing file works here unchanged. Parsing is strict: a key
//! the format does not have is an error naming it, and a key the format has
//! but portwatch does not implement is refused by name rather than ignored.
//!
//! Pure: this reads text into these types; [`super::tls`] and
//! [`super::auth`] turn them into what the listeners use.

use std::collections::BTreeMap;

use serde::{Deserialize, de::IgnoredAny};

/// The whole file.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebFile {
    pub tls_server_config: TlsFile,
    pub http_server_config: HttpFile,
    /// User name -> bcrypt hash.
    pub basic_auth_users: BTreeMap<String, String>,
    /// exporter-toolkit 0.13's request rate limit: not implemented here.
    pub rate_limit: Option<IgnoredAny>,
}

/// `tls_server_config`. TLS is on when a certificate, a key or a client
/// policy is set.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsFile {
    pub cert_file: Option<String>,
    pub key_file: Option<String>,
    /// The certificate chain as inline PEM, instead of `cert_file`.
    pub cert: Option<String>,
    /// The key as inline PEM, instead of `key_file`.
    pub key: Option<String>,
    pub client_ca_file: Option<String>,
    /// The client CAs as inline PEM, instead of `client_ca_file`.
    pub client_ca: Option<String>,
    pub client_auth_type: Option<String>,
    pub client_allowed_sans: Option<IgnoredAny>,
    pub min_version: Option<String>,
    pub max_version: Option<String>,
    pub cipher_suites: Option<Vec<String>>,
    pub curve_preferences: Option<Vec<String>>,
    pub prefer_server_cipher_suites: Option<bool>,
}

impl TlsFile {
    /// Whether the file asks for TLS at all.
    pub fn enabled(&self) -> bool {
        [
            &self.cert_file,
            &self.key_file,
            &self.cert,
            &self.key,
            &self.client_ca_file,
            &self.client_ca,
            &self.client_auth_type,
        ]
        .into_iter()
        .any(|value| value.as_deref().is_some_and(|v| !v.is_empty()))
    }
}

/// `http_server_config`.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpFile {
    pub http2: Option<bool>,
    pub headers: BTreeMap<String, String>,
}

/// The response headers the format allows, with the values it allows
/// (`None`: any value), as exporter-toolkit checks them.
pub const ALLOWED_HEADERS: &[(&str, Option<&[&str]>)] = &[
    ("Strict-Transport-Security", None),
    ("X-Content-Type-Options", Some(&["nosniff"])),
    ("X-Frame-Options", Some(&["deny", "sameorigin"])),
    ("X-XSS-Protection", None),
    ("Content-Security-Policy", None),
];

/// Parses the text of a web.yml: `Err` is one line saying where and what.
/// An empty file (or one of comments only) is the empty configuration: no
/// TLS, no users.
pub fn parse(text: &str) -> Result<WebFile, String> {
    if text
        .lines()
        .all(|line| line.trim().is_empty() || line.trim_start().starts_with('#'))
    {
        return Ok(WebFile::default());
    }
    serde_saphyr::from_str(text).map_err(|err| one_line(&err.to_string()))
}

/// An error message on one line: the journal shows one line per record.
fn one_line(message: &str) -> String {
    message
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_exporter_file_parses() {
        let file = parse(
            "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: ca.crt\n  min_version: TLS13\nhttp_server_config:\n  headers:\n    X-Frame-Options: deny\nbasic_auth_users:\n  alice: $2y$10$abc\n",
        )
        .unwrap();
        assert!(file.tls_server_config.enabled());
        assert_eq!(file.tls_server_config.min_version.as_deref(), Some("TLS13"));
        assert_eq!(file.basic_auth_users["alice"], "$2y$10$abc");
        assert_eq!(file.http_server_config.headers["X-Frame-Options"], "deny");
    }

    #[test]
    fn an_empty_or_commented_file_is_no_tls_and_no_users() {
        for text in ["", "\n", "# nothing yet\n"] {
            let file = parse(text).unwrap();
            assert!(!file.tls_server_config.enabled());
            assert!(file.basic_auth_users.is_empty());
        }
    }

    #[test]
    fn an_unknown_key_is_named_on_one_line() {
        for (text, key) in [
            ("basic_auth_user:\n  a: b\n", "basic_auth_user"),
            ("tls_server_config:\n  cert_fil: x\n", "cert_fil"),
            ("http_server_config:\n  header: {}\n", "header"),
        ] {
            let err = parse(text).unwrap_err();
            assert!(err.contains(key), "{err}");
            assert!(!err.contains('\n'), "{err}");
        }
    }

    #[test]
    fn a_file_that_is_not_yaml_is_an_error() {
        assert!(parse("tls_server_config: [\n").is_err());
        assert!(parse("basic_auth_users: 3\n").is_err());
    }
}
