//! `tls_server_config` -> a rustls server configuration, on the ring
//! provider (no OpenSSL). Every value exporter-toolkit's format defines is
//! either honoured or refused by name: rustls implements TLS 1.2 and 1.3
//! only, and no CBC or static-RSA cipher suites, so a file asking for those
//! gets an error naming what it asked for rather than a weaker server.

use std::sync::Arc;

use rustls::{
    CipherSuite, NamedGroup, ProtocolVersion, RootCertStore, ServerConfig,
    SupportedProtocolVersion,
    crypto::{CryptoProvider, SupportedKxGroup, ring},
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::WebPkiClientVerifier,
    version::{TLS12, TLS13},
};

use super::{Load, WebError, file::TlsFile};

/// Who must show a client certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientAuth {
    /// `NoClientCert` (the default).
    None,
    /// `VerifyClientCertIfGiven`: a certificate is optional, but one that is
    /// shown must chain to `client_ca_file`.
    IfGiven,
    /// `RequireAndVerifyClientCert`: mutual TLS.
    Required,
}

/// The server configuration, and the client policy it enforces.
pub fn server_config(
    tls: &TlsFile,
    load: &mut Load,
) -> Result<(Arc<ServerConfig>, ClientAuth), WebError> {
    let client_auth = client_auth(tls, load)?;
    let versions = versions(tls, load)?;
    // rustls deprecates its ring provider for lacking post-quantum key
    // exchange; aws-lc-rs, which has it, needs cmake and a C toolchain in
    // every build here, and the format offers no such curve to configure.
    #[allow(deprecated)]
    let mut provider = ring::default_provider();
    if let Some(names) = &tls.cipher_suites {
        provider.cipher_suites = cipher_suites(&provider, names, load)?;
    }
    if let Some(names) = &tls.curve_preferences {
        provider.kx_groups = curves(&provider, names, load)?;
    }
    let provider = Arc::new(provider);

    let chain = pem_input(load, "cert_file", &tls.cert_file, "cert", &tls.cert)?;
    let chain = certificates(load, "cert_file", &chain)?;
    let key = pem_input(load, "key_file", &tls.key_file, "key", &tls.key)?;
    let key = PrivateKeyDer::from_pem_slice(&key).map_err(|err| {
        load.invalid(
            "key_file",
            format!("no PEM private key (PKCS#8, PKCS#1 or SEC1) found: {err}"),
        )
    })?;

    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&versions)
        .map_err(|err| load.invalid("tls_server_config", err.to_string()))?;
    let builder = match client_auth {
        ClientAuth::None => builder.with_no_client_auth(),
        ClientAuth::IfGiven | ClientAuth::Required => {
            let cas = pem_input(
                load,
                "client_ca_file",
                &tls.client_ca_file,
                "client_ca",
                &tls.client_ca,
            )?;
            let mut roots = RootCertStore::empty();
            for ca in certificates(load, "client_ca_file", &cas)? {
                roots.add(ca).map_err(|err| {
                    load.invalid("client_ca_file", format!("a CA certificate: {err}"))
                })?;
            }
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
            let verifier = match client_auth {
                ClientAuth::IfGiven => verifier.allow_unauthenticated(),
                _ => verifier,
            };
            let verifier = verifier
                .build()
                .map_err(|err| load.invalid("client_ca_file", err.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(chain, key).map_err(|err| {
        load.invalid(
            "key_file",
            format!("does not go with cert_file's certificate: {err}"),
        )
    })?;
    // exporter-toolkit's default is true; Go's server then picks the suite.
    config.ignore_client_order = tls.prefer_server_cipher_suites.unwrap_or(true);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok((Arc::new(config), client_auth))
}

/// The `_file` key or its inline twin: one of them, not both.
fn pem_input(
    load: &mut Load,
    file_key: &'static str,
    file: &Option<String>,
    inline_key: &'static str,
    inline: &Option<String>,
) -> Result<Vec<u8>, WebError> {
    let file = file.as_deref().filter(|v| !v.is_empty());
    let inline = inline.as_deref().filter(|v| !v.is_empty());
    match (file, inline) {
        (Some(_), Some(_)) => Err(load.invalid(
            file_key,
            format!("set {file_key} or {inline_key}, not both"),
        )),
        (Some(path), None) => load.read(file_key, path),
        (None, Some(text)) => Ok(text.as_bytes().to_vec()),
        (None, None) => Err(load.invalid(
            file_key,
            format!("TLS is configured, so {file_key} (or {inline_key}) is required"),
        )),
    }
}

fn certificates(
    load: &Load,
    key: &'static str,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, WebError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| load.invalid(key, format!("not a PEM certificate: {err}")))?;
    if certs.is_empty() {
        return Err(load.invalid(key, "holds no PEM certificate".into()));
    }
    Ok(certs)
}

fn client_auth(tls: &TlsFile, load: &Load) -> Result<ClientAuth, WebError> {
    let policy = match tls.client_auth_type.as_deref().unwrap_or("") {
        "" | "NoClientCert" => ClientAuth::None,
        "VerifyClientCertIfGiven" => ClientAuth::IfGiven,
        "RequireAndVerifyClientCert" => ClientAuth::Required,
        name @ ("RequestClientCert" | "RequireAnyClientCert" | "RequireClientCert") => {
            return Err(load.unsupported(
                "client_auth_type",
                format!(
                    "{name} accepts client certificates without verifying them; use RequireAndVerifyClientCert or VerifyClientCertIfGiven with client_ca_file"
                ),
            ));
        }
        other => {
            return Err(load.invalid(
                "client_auth_type",
                format!(
                    "unknown value {other:?}; expected NoClientCert, VerifyClientCertIfGiven or RequireAndVerifyClientCert"
                ),
            ));
        }
    };
    let has_cas = [&tls.client_ca_file, &tls.client_ca]
        .into_iter()
        .any(|v| v.as_deref().is_some_and(|v| !v.is_empty()));
    match (policy, has_cas) {
        (ClientAuth::None, true) => Err(load.invalid(
            "client_ca_file",
            "client CAs are set but client_auth_type is not; set it to RequireAndVerifyClientCert (or VerifyClientCertIfGiven)".into(),
        )),
        (ClientAuth::IfGiven | ClientAuth::Required, false) => Err(load.invalid(
            "client_auth_type",
            "verifying client certificates needs client_ca_file".into(),
        )),
        _ => Ok(policy),
    }
}

/// `min_version`..=`max_version`, defaulting to TLS 1.2 and 1.3.
fn versions(
    tls: &TlsFile,
    load: &Load,
) -> Result<Vec<&'static SupportedProtocolVersion>, WebError> {
    let parse = |key: &'static str, value: &Option<String>, default: u8| match value.as_deref() {
        None | Some("") => Ok(default),
        Some("TLS12") => Ok(12),
        Some("TLS13") => Ok(13),
        Some(old @ ("TLS10" | "TLS11")) => Err(load.unsupported(
            key,
            format!("{old}: rustls implements TLS 1.2 and 1.3 only"),
        )),
        Some(other) => Err(load.invalid(
            key,
            format!("unknown version {other:?}; expected TLS12 or TLS13"),
        )),
    };
    let min = parse("min_version", &tls.min_version, 12)?;
    let max = parse("max_version", &tls.max_version, 13)?;
    if min > max {
        return Err(load.invalid("max_version", "is older than min_version".into()));
    }
    Ok([(12, &TLS12), (13, &TLS13)]
        .into_iter()
        .filter(|(v, _)| (min..=max).contains(v))
        .map(|(_, version)| version)
        .collect())
}

/// `cipher_suites` name TLS 1.2 suites, in Go's spelling; as in Go, TLS 1.3
/// suites are not configurable and all stay.
fn cipher_suites(
    provider: &CryptoProvider,
    names: &[String],
    load: &Load,
) -> Result<Vec<rustls::SupportedCipherSuite>, WebError> {
    let mut suites: Vec<_> = provider
        .cipher_suites
        .iter()
        .filter(|s| s.version().version == ProtocolVersion::TLSv1_3)
        .copied()
        .collect();
    for name in names {
        // Go lists its TLS 1.3 suites among the names, and ignores them here.
        if [
            "TLS_AES_128_GCM_SHA256",
            "TLS_AES_256_GCM_SHA384",
            "TLS_CHACHA20_POLY1305_SHA256",
        ]
        .contains(&name.as_str())
        {
            continue;
        }
        let found = provider.cipher_suites.iter().find(|s| {
            s.version().version == ProtocolVersion::TLSv1_2 && go_suite_name(s.suite(), name)
        });
        match found {
            Some(suite) if !suites.contains(suite) => suites.push(*suite),
            Some(_) => {}
            None => {
                return Err(load.unsupported(
                    "cipher_suites",
                    format!(
                        "{name}: rustls offers only ECDHE with AES-GCM or ChaCha20-Poly1305 for TLS 1.2"
                    ),
                ));
            }
        }
    }
    Ok(suites)
}

/// Whether Go's name for a suite is `suite`: Go spells ChaCha20 suites
/// without the `_SHA256` the IANA name has (and accepts it too).
fn go_suite_name(suite: CipherSuite, name: &str) -> bool {
    let iana = format!("{suite:?}");
    iana == name || iana.strip_suffix("_SHA256") == Some(name) && name.contains("CHACHA20")
}

/// `curve_preferences`, in Go's names, in the order given.
fn curves(
    provider: &CryptoProvider,
    names: &[String],
    load: &Load,
) -> Result<Vec<&'static dyn SupportedKxGroup>, WebError> {
    names
        .iter()
        .map(|name| {
            let group = match name.as_str() {
                "X25519" => Some(NamedGroup::X25519),
                "CurveP256" => Some(NamedGroup::secp256r1),
                "CurveP384" => Some(NamedGroup::secp384r1),
                _ => None,
            };
            group
                .and_then(|group| provider.kx_groups.iter().find(|g| g.name() == group))
                .copied()
                .ok_or_else(|| {
                    load.unsupported(
                        "curve_preferences",
                        format!("{name}: the curves here are X25519, CurveP256 and CurveP384"),
                    )
                })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_suite_names_match_rustls_suites() {
        assert!(go_suite_name(
            CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
            "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256"
        ));
        assert!(go_suite_name(
            CipherSuite::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
            "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305"
        ));
        assert!(!go_suite_name(
            CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
            "TLS_ECDHE_RSA_WITH_AES_128_GCM"
        ));
    }
}
