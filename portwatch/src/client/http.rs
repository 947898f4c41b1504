//! How the client reaches the daemon: one [`Client`] per command, with the
//! CA and client certificate of the command line and the basic-auth
//! credentials of the environment on every request, and each way that can
//! fail turned into one line saying which flag or variable fixes it.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use base64::Engine as _;
use serde_json::Value;
use ureq::tls::{Certificate, ClientCert, PemItem, PrivateKey, RootCerts, TlsConfig};

use crate::cli::ServerArgs;

/// Why a client command failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing answers at the daemon's address.
    #[error(
        "no portwatch daemon answers at {server}: start it with `sudo portwatch daemon` (or `systemctl start portwatch`), or point --server at it"
    )]
    NotRunning { server: String },
    /// The daemon refused the request (4xx/5xx with a problem body).
    #[error("the daemon answered {status}: {detail}")]
    Problem { status: u16, detail: String },
    /// The daemon asks for credentials (401) and none were given.
    #[error(
        "{server}: 401 Unauthorized: the daemon needs credentials; set {USER_VAR} and {PASSWORD_VAR} (or {PASSWORD_FILE_VAR})"
    )]
    NeedsCredentials { server: String },
    /// The daemon refused the credentials given (401).
    #[error(
        "{server}: 401 Unauthorized: the daemon refused the credentials of user {user} ({USER_VAR} and {password_from})"
    )]
    CredentialsRefused {
        server: String,
        user: String,
        /// The variable the password came from.
        password_from: &'static str,
    },
    /// The TLS handshake failed, or TLS broke later: `cause` says why and
    /// what to change.
    #[error("{server}: TLS: {cause}")]
    Tls { server: String, cause: String },
    /// An `http://` URL got no HTTP answer, as from a port that serves TLS.
    #[error(
        "{server}: no HTTP answer ({cause}); if the daemon serves TLS, use an https:// URL in --server"
    )]
    NotHttp { server: String, cause: String },
    /// A file of `--ca-cert`, `--client-cert` or `--client-key` cannot be
    /// read, or holds nothing usable.
    #[error("{flag} {}: {problem}", path.display())]
    TlsFile {
        flag: &'static str,
        path: PathBuf,
        problem: String,
    },
    /// The client's own settings are incomplete or contradict each other:
    /// a user without a password, a client certificate without its key.
    #[error("{0}")]
    Settings(String),
    /// The request could not be made or read.
    #[error("talking to {server}: {message}")]
    Http { server: String, message: String },
    /// The answer was not the JSON expected.
    #[error("unexpected answer from the daemon: {0}")]
    Decode(String),
    /// Writing to stdout failed.
    #[error("writing output: {0}")]
    Output(#[source] std::io::Error),
}

/// The basic auth user. Credentials are read from the environment only: a
/// flag would show the password in `ps`.
const USER_VAR: &str = "PORTWATCH_USER";
/// The basic auth password.
const PASSWORD_VAR: &str = "PORTWATCH_PASSWORD";
/// A file whose first line is the password: a systemd credential
/// (`$CREDENTIALS_DIRECTORY/...`) or a mounted Kubernetes secret, which
/// keep the password out of the environment too.
const PASSWORD_FILE_VAR: &str = "PORTWATCH_PASSWORD_FILE";

/// How long a JSON request may take, connecting and reading included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// One daemon, and how to talk to it: an agent with the TLS settings of
/// `--ca-cert` and `--client-cert`, and the credentials of the environment.
/// Built once per command, so the pages of `ports` share a connection (and
/// its TLS handshake).
pub struct Client {
    /// The URL as given, for messages.
    pub(super) server: String,
    agent: ureq::Agent,
    credentials: Option<Credentials>,
    /// The TLS files given, to say what to change when a handshake fails.
    ca_cert: Option<PathBuf>,
    client_cert: Option<PathBuf>,
}

impl Client {
    /// The client of `args`, with the credentials of the process's
    /// environment.
    pub fn new(args: &ServerArgs) -> Result<Self, ClientError> {
        Self::with_env(args, |name| std::env::var(name).ok())
    }

    /// The client of `args`, with the credentials `env` finds (it looks a
    /// variable up), so tests need not change the process's environment.
    pub(super) fn with_env(
        args: &ServerArgs,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ClientError> {
        let credentials = Credentials::from_env(env)?;
        if credentials.is_some() && in_clear_beyond_loopback(&args.server) {
            eprintln!(
                "portwatch: warning: the password goes to {} in clear text; use an https:// URL",
                args.server
            );
        }
        let agent = ureq::Agent::config_builder()
            // Statuses are read here, not turned into ureq's bare
            // `StatusCode` error: a 401 says which credentials to set, and
            // a problem body says why the daemon refused.
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(3)))
            .timeout_global(Some(REQUEST_TIMEOUT))
            .tls_config(tls_config(args)?)
            .build()
            .into();
        Ok(Self {
            server: args.server.clone(),
            agent,
            credentials,
            ca_cert: args.ca_cert.clone(),
            client_cert: args.client_cert.clone(),
        })
    }

    /// A GET of `path` (with its query), carrying the credentials.
    pub(super) fn request(&self, path: &str) -> ureq::RequestBuilder<ureq::typestate::WithoutBody> {
        let url = format!("{}{path}", self.server.trim_end_matches('/'));
        let request = self.agent.get(&url);
        match &self.credentials {
            Some(credentials) => request.header("Authorization", &credentials.header),
            None => request,
        }
    }

    /// GET `path` (with its query) and parse the JSON answer.
    pub(super) fn get(&self, path: &str) -> Result<Value, ClientError> {
        let mut response = self
            .request(path)
            .call()
            .map_err(|err| self.request_error(err))?;
        let status = response.status().as_u16();
        // Before the body: a 401 may have none, or not the API's JSON.
        if status == 401 {
            return Err(self.unauthorized());
        }
        let body = response
            .body_mut()
            .read_to_string()
            .map_err(|err| self.body_error(err))?;
        let value: Value = serde_json::from_str(&body)
            .map_err(|err| ClientError::Decode(format!("{err}: {body:.200}")))?;
        if status >= 400 {
            let detail = value["detail"]
                .as_str()
                .or(value["title"].as_str())
                .unwrap_or("no detail");
            return Err(ClientError::Problem {
                status,
                detail: detail.to_owned(),
            });
        }
        Ok(value)
    }

    /// A 401: which credentials to set, or that those given were refused.
    pub(super) fn unauthorized(&self) -> ClientError {
        let server = self.server.clone();
        match &self.credentials {
            None => ClientError::NeedsCredentials { server },
            Some(credentials) => ClientError::CredentialsRefused {
                server,
                user: credentials.user.clone(),
                password_from: credentials.password_from,
            },
        }
    }

    /// Why a request failed, as one line that says what to change.
    pub(super) fn request_error(&self, err: ureq::Error) -> ClientError {
        let server = self.server.clone();
        if let Some(tls) = rustls_error(&err) {
            return ClientError::Tls {
                server,
                cause: self.tls_cause(tls),
            };
        }
        let https = self.server.to_ascii_lowercase().starts_with("https:");
        match err {
            ureq::Error::Io(io)
                if matches!(
                    io.kind(),
                    std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound
                ) =>
            {
                ClientError::NotRunning { server }
            }
            ureq::Error::ConnectionFailed | ureq::Error::HostNotFound => {
                ClientError::NotRunning { server }
            }
            // ureq's own TLS errors (a host name rustls cannot take).
            ureq::Error::Tls(cause) => ClientError::Tls {
                server,
                cause: cause.to_owned(),
            },
            // A TLS port answers a plain request with a TLS alert (not
            // HTTP), or hangs up: a plain daemon always answers in HTTP.
            ureq::Error::Protocol(_) if !https => ClientError::NotHttp {
                server,
                cause: err.to_string(),
            },
            ureq::Error::Io(ref io)
                if !https
                    && matches!(
                        io.kind(),
                        std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset
                    ) =>
            {
                ClientError::NotHttp {
                    server,
                    cause: err.to_string(),
                }
            }
            other => ClientError::Http {
                server,
                message: other.to_string(),
            },
        }
    }

    /// Why reading an answer's body failed: past the status line, the
    /// answer was HTTP, so only TLS needs explaining.
    pub(super) fn body_error(&self, err: ureq::Error) -> ClientError {
        match rustls_error(&err) {
            Some(tls) => ClientError::Tls {
                server: self.server.clone(),
                cause: self.tls_cause(tls),
            },
            None => ClientError::Http {
                server: self.server.clone(),
                message: err.to_string(),
            },
        }
    }

    /// What a TLS failure means for the user, and which flag fixes it.
    pub(super) fn tls_cause(&self, err: &rustls::Error) -> String {
        use rustls::{AlertDescription as Alert, CertificateError, Error as Tls};
        match err {
            Tls::InvalidCertificate(CertificateError::UnknownIssuer) => match &self.ca_cert {
                Some(path) => format!(
                    "the daemon's certificate does not chain to the CA of --ca-cert {} ({err})",
                    path.display()
                ),
                None => format!(
                    "the daemon's certificate is signed by a CA this client does not know ({err}); pass that CA with --ca-cert (PORTWATCH_CA_CERT)"
                ),
            },
            Tls::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            ) => format!(
                "the daemon's certificate is not for this host ({err}); use a name it is issued for in --server"
            ),
            Tls::InvalidCertificate(_) => format!("the daemon's certificate was refused ({err})"),
            // What a server sends when a client certificate is missing or
            // not to its liking.
            Tls::AlertReceived(
                Alert::CertificateRequired
                | Alert::BadCertificate
                | Alert::UnsupportedCertificate
                | Alert::CertificateRevoked
                | Alert::CertificateExpired
                | Alert::CertificateUnknown
                | Alert::UnknownCA
                | Alert::AccessDenied,
            ) => match &self.client_cert {
                None => format!(
                    "the daemon asks for a client certificate ({err}); pass one with --client-cert and --client-key (PORTWATCH_CLIENT_CERT, PORTWATCH_CLIENT_KEY)"
                ),
                Some(path) => format!(
                    "the daemon refused the client certificate of --client-cert {} ({err}); it must chain to the daemon's client CA",
                    path.display()
                ),
            },
            Tls::AlertReceived(
                Alert::HandshakeFailure | Alert::ProtocolVersion | Alert::InsufficientSecurity,
            )
            | Tls::PeerIncompatible(_) => format!(
                "the daemon and this client have no TLS version or cipher suite in common ({err})"
            ),
            // The first bytes back were not a TLS record.
            Tls::InvalidMessage(_) => format!(
                "the answer is not TLS ({err}); if the daemon serves plain HTTP, use an http:// URL in --server"
            ),
            other => format!("the connection failed ({other})"),
        }
    }
}

/// The rustls error behind a failed request, if TLS is what failed. ureq
/// passes rustls' errors on as rustls gives them: inside an `io::Error`.
/// Whether `server` is plain `http://` to a host other than this one's
/// loopback, where a password would cross the network readable.
fn in_clear_beyond_loopback(server: &str) -> bool {
    let Ok(uri) = server.parse::<ureq::http::Uri>() else {
        return false;
    };
    if uri.scheme_str() != Some("http") {
        return false;
    }
    let host = uri.host().unwrap_or_default();
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.to_canonical().is_loopback());
    !loopback
}

fn rustls_error(err: &ureq::Error) -> Option<&rustls::Error> {
    match err {
        ureq::Error::Rustls(tls) => Some(tls),
        ureq::Error::Io(io) => io.get_ref()?.downcast_ref(),
        _ => None,
    }
}

/// HTTP basic auth credentials. Not `Debug`: the header holds the password.
struct Credentials {
    user: String,
    /// The variable the password came from, for the message when the
    /// daemon refuses it.
    password_from: &'static str,
    /// `Basic base64(user:password)`, the `Authorization` header (ureq 3
    /// has no basic auth helper).
    header: String,
}

impl Credentials {
    /// The credentials `env` finds, if any: a user and a password, both or
    /// neither. An empty variable counts as unset.
    fn from_env(env: impl Fn(&str) -> Option<String>) -> Result<Option<Self>, ClientError> {
        let set = |name: &str| env(name).filter(|value| !value.is_empty());
        let password = match (set(PASSWORD_VAR), set(PASSWORD_FILE_VAR)) {
            (Some(_), Some(_)) => {
                return Err(ClientError::Settings(format!(
                    "both {PASSWORD_VAR} and {PASSWORD_FILE_VAR} are set: keep one"
                )));
            }
            (Some(password), None) => Some((password, PASSWORD_VAR)),
            (None, Some(path)) => Some((read_password_file(Path::new(&path))?, PASSWORD_FILE_VAR)),
            (None, None) => None,
        };
        match (set(USER_VAR), password) {
            (None, None) => Ok(None),
            (Some(_), None) => Err(ClientError::Settings(format!(
                "{USER_VAR} is set without a password: set {PASSWORD_VAR} or {PASSWORD_FILE_VAR} too"
            ))),
            (None, Some((_, from))) => Err(ClientError::Settings(format!(
                "{from} is set without a user: set {USER_VAR} too"
            ))),
            // RFC 7617: the first colon ends the user.
            (Some(user), Some(_)) if user.contains(':') => Err(ClientError::Settings(format!(
                "{USER_VAR} cannot hold a colon: basic auth ends the user at the first one"
            ))),
            (Some(user), Some((password, from))) => Ok(Some(Self {
                header: basic_auth(&user, &password),
                user,
                password_from: from,
            })),
        }
    }
}

/// The `Authorization` header's value for `user` and `password`.
fn basic_auth(user: &str, password: &str) -> String {
    let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    format!("Basic {token}")
}

/// The password in the file at `path`: its first line, without the line's
/// end (`\n` or `\r\n`), as `echo secret > file` and secret stores write it.
fn read_password_file(path: &Path) -> Result<String, ClientError> {
    let fail = |problem: String| {
        ClientError::Settings(format!("{PASSWORD_FILE_VAR} {}: {problem}", path.display()))
    };
    let text = std::fs::read_to_string(path).map_err(|err| fail(err.to_string()))?;
    match text.lines().next() {
        Some(line) if !line.is_empty() => Ok(line.to_owned()),
        _ => Err(fail("the first line, the password, is empty".to_owned())),
    }
}

/// The agent's TLS settings: the CAs of `--ca-cert` instead of the web PKI
/// roots (a daemon's certificate is usually from a private CA), and the
/// client certificate of `--client-cert` and `--client-key`. ureq uses them
/// for `https://` URLs only.
fn tls_config(args: &ServerArgs) -> Result<TlsConfig, ClientError> {
    let mut tls = TlsConfig::builder();
    if let Some(path) = &args.ca_cert {
        tls = tls.root_certs(RootCerts::new_with_certs(&read_ca_certs(path)?));
    }
    // clap requires both already; this also holds for args built otherwise.
    match (&args.client_cert, &args.client_key) {
        (Some(cert), Some(key)) => tls = tls.client_cert(Some(read_client_cert(cert, key)?)),
        (None, None) => {}
        (Some(_), None) => {
            return Err(ClientError::Settings(
                "--client-cert needs --client-key (PORTWATCH_CLIENT_KEY), the certificate's private key".to_owned(),
            ));
        }
        (None, Some(_)) => {
            return Err(ClientError::Settings(
                "--client-key needs --client-cert (PORTWATCH_CLIENT_CERT), the certificate it goes with".to_owned(),
            ));
        }
    }
    Ok(tls.build())
}

fn tls_file(flag: &'static str, path: &Path, problem: impl Into<String>) -> ClientError {
    ClientError::TlsFile {
        flag,
        path: path.to_owned(),
        problem: problem.into(),
    }
}

/// The bytes of a TLS file, or an error naming its flag and path.
fn read_tls_file(flag: &'static str, path: &Path) -> Result<Vec<u8>, ClientError> {
    std::fs::read(path).map_err(|err| tls_file(flag, path, err.to_string()))
}

/// Every certificate of the PEM file at `path` (other items, such as a key
/// kept in the same file, are skipped).
fn read_certs(flag: &'static str, path: &Path) -> Result<Vec<Certificate<'static>>, ClientError> {
    let pem = read_tls_file(flag, path)?;
    let mut certs = Vec::new();
    for item in ureq::tls::parse_pem(&pem) {
        let item = item.map_err(|err| tls_file(flag, path, format!("not valid PEM ({err})")))?;
        if let PemItem::Certificate(cert) = item {
            certs.push(cert);
        }
    }
    if certs.is_empty() {
        return Err(tls_file(
            flag,
            path,
            "no PEM certificate (-----BEGIN CERTIFICATE-----) in the file",
        ));
    }
    Ok(certs)
}

/// The CAs of `--ca-cert`, each checked now: ureq would skip one it cannot
/// use and leave every handshake to fail with an unknown issuer.
fn read_ca_certs(path: &Path) -> Result<Vec<Certificate<'static>>, ClientError> {
    const FLAG: &str = "--ca-cert";
    let certs = read_certs(FLAG, path)?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in &certs {
        roots
            .add(rustls::pki_types::CertificateDer::from(cert.der().to_vec()))
            .map_err(|err| tls_file(FLAG, path, format!("not a usable CA certificate ({err})")))?;
    }
    Ok(certs)
}

/// The client certificate chain and its key, checked to belong together
/// now: ureq panics on the first request when rustls refuses the pair.
fn read_client_cert(cert_path: &Path, key_path: &Path) -> Result<ClientCert, ClientError> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    const KEY_FLAG: &str = "--client-key";
    let chain = read_certs("--client-cert", cert_path)?;
    let key = PrivateKey::from_pem(&read_tls_file(KEY_FLAG, key_path)?).map_err(|err| {
        let problem = match err {
            // What ureq says when it finds no key.
            ureq::Error::Tls(_) => {
                "no PEM private key (PKCS#8, PKCS#1 or SEC1) in the file; an encrypted key is not supported".to_owned()
            }
            other => format!("not valid PEM ({other})"),
        };
        tls_file(KEY_FLAG, key_path, problem)
    })?;
    let refused = |err: rustls::Error| {
        let cert = cert_path.display();
        let problem = match err {
            rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
                format!("not the key of --client-cert {cert} ({err})")
            }
            other => format!("cannot be used with --client-cert {cert} ({other})"),
        };
        tls_file(KEY_FLAG, key_path, problem)
    };
    let key_der = PrivateKeyDer::try_from(key.der().to_vec())
        .map_err(|err| tls_file(KEY_FLAG, key_path, format!("not a private key ({err})")))?;
    // ring, the provider ureq picks when the process sets none (the CLI
    // does not), loads the key; a key it cannot use fails here.
    let signing_key = rustls::crypto::ring::sign::any_supported_type(&key_der).map_err(refused)?;
    let chain_der = chain
        .iter()
        .map(|cert| CertificateDer::from(cert.der().to_vec()))
        .collect();
    // As rustls checks the pair for ureq: a key whose public half cannot
    // be compared passes.
    match rustls::sign::CertifiedKey::new(chain_der, signing_key).keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(err) => return Err(refused(err)),
    }
    Ok(ClientCert::new_with_certs(&chain, key))
}

#[cfg(test)]
mod tests {
    use std::{io::Write as _, sync::Arc};

    use super::*;
    use crate::{cli::WatchArgs, client::watch};

    #[test]
    fn a_password_in_clear_beyond_loopback_is_told() {
        for clear in [
            "http://server1.example:7464",
            "http://192.0.2.1:7464",
            "http://[2001:db8::1]:7464",
        ] {
            assert!(in_clear_beyond_loopback(clear), "{clear}");
        }
        for fine in [
            "https://server1.example:7464",
            "http://127.0.0.1:7464",
            "http://localhost:7464",
            "http://[::1]:7464",
        ] {
            assert!(!in_clear_beyond_loopback(fine), "{fine}");
        }
    }

    #[test]
    fn a_daemon_that_is_not_running_is_one_clear_line() {
        // Port 1 on loopback: nothing listens there.
        let err = client("http://127.0.0.1:1").get("/ports").unwrap_err();
        assert!(matches!(err, ClientError::NotRunning { .. }), "{err:?}");
        let message = err.to_string();
        assert!(
            message.contains("no portwatch daemon answers") && !message.contains('\n'),
            "{message}"
        );
    }

    /// `ServerArgs` for `server`, with no TLS file.
    fn server_args(server: &str) -> ServerArgs {
        ServerArgs {
            server: server.to_owned(),
            ca_cert: None,
            client_cert: None,
            client_key: None,
        }
    }

    /// An environment with no variable set.
    fn no_env(_: &str) -> Option<String> {
        None
    }

    /// A client of `server` with no TLS file and no credentials.
    fn client(server: &str) -> Client {
        Client::with_env(&server_args(server), no_env).unwrap_or_else(|err| panic!("{err}"))
    }

    /// An environment holding `vars`.
    fn env_of(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
            .collect();
        move |name| {
            vars.iter()
                .find(|(key, _)| key == name)
                .map(|(_, value)| value.clone())
        }
    }

    /// A directory of its own under the temp dir, removed when dropped.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> Self {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |since| since.as_nanos());
            let path = std::env::temp_dir().join(format!(
                "portwatch-client-{name}-{}-{nanos}",
                std::process::id()
            ));
            std::fs::create_dir_all(&path).unwrap();
            Self(path)
        }

        /// Writes `contents` to `name` in the directory; its path.
        fn file(&self, name: &str, contents: &str) -> PathBuf {
            let path = self.0.join(name);
            std::fs::write(&path, contents).unwrap();
            path
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A self-signed certificate for `name`, and its key, as PEM.
    fn certificate_for(name: &str) -> (String, String) {
        let rcgen::CertifiedKey { cert, signing_key } =
            rcgen::generate_simple_self_signed(vec![name.to_owned()]).unwrap();
        (cert.pem(), signing_key.serialize_pem())
    }

    /// A self-signed certificate for localhost, and its key, as PEM.
    fn certificate() -> (String, String) {
        certificate_for("localhost")
    }

    /// A server on loopback that reads one request (until its blank line,
    /// or a pause) and writes `answer`; its address, and the request it
    /// read.
    fn serve_once(answer: &'static [u8]) -> (String, std::thread::JoinHandle<String>) {
        use std::io::Read as _;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let server = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            // A TLS ClientHello has no blank line: stop at a pause instead.
            stream
                .set_read_timeout(Some(Duration::from_millis(300)))
                .unwrap();
            let mut request = Vec::new();
            let mut buffer = [0; 4096];
            while !request.windows(4).any(|end| end == b"\r\n\r\n") {
                match stream.read(&mut buffer) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => request.extend_from_slice(&buffer[..n]),
                }
            }
            let _ = stream.write_all(answer);
            String::from_utf8_lossy(&request).into_owned()
        });
        (address, server)
    }

    const UNAUTHORIZED: &[u8] =
        b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic\r\nContent-Length: 0\r\n\r\n";

    fn assert_one_line(err: &ClientError, words: &str) {
        let message = err.to_string();
        assert!(
            message.contains(words) && !message.contains('\n'),
            "{message}"
        );
    }

    #[test]
    fn the_agent_takes_a_ca_file_and_a_client_certificate() {
        let dir = TempDir::new("tls");
        let (cert, key) = certificate();
        let cert_path = dir.file("cert.pem", &cert);
        let key_path = dir.file("key.pem", &key);
        let mut args = server_args("https://localhost:7464");
        args.ca_cert = Some(cert_path.clone());
        Client::with_env(&args, no_env).unwrap_or_else(|err| panic!("CA: {err}"));
        args.client_cert = Some(cert_path.clone());
        args.client_key = Some(key_path.clone());
        Client::with_env(&args, no_env).unwrap_or_else(|err| panic!("client cert: {err}"));
        // The certificate and its key in one file serve as both.
        let both = dir.file("both.pem", &format!("{cert}{key}"));
        args.client_cert = Some(both.clone());
        args.client_key = Some(both);
        Client::with_env(&args, no_env).unwrap_or_else(|err| panic!("one file: {err}"));

        // Another certificate's key: refused now, not by a panic in ureq at
        // the first request.
        let (_, other_key) = certificate();
        args.client_cert = Some(cert_path.clone());
        args.client_key = Some(dir.file("other.pem", &other_key));
        let err = Client::with_env(&args, no_env).err().unwrap();
        assert_one_line(&err, "other.pem: not the key of --client-cert");

        // Each file's problem names its flag and path.
        args.client_key = Some(cert_path.clone());
        let err = Client::with_env(&args, no_env).err().unwrap();
        assert_one_line(&err, "--client-key");
        assert_one_line(&err, "no PEM private key");
        args.client_cert = None;
        args.client_key = None;
        args.ca_cert = Some(dir.0.join("missing.pem"));
        let err = Client::with_env(&args, no_env).err().unwrap();
        assert_one_line(&err, "--ca-cert ");
        assert_one_line(&err, "missing.pem: ");
        args.ca_cert = Some(key_path.clone());
        let err = Client::with_env(&args, no_env).err().unwrap();
        assert_one_line(&err, "key.pem: no PEM certificate");

        // One of the pair alone.
        args.ca_cert = None;
        args.client_cert = Some(cert_path);
        let err = Client::with_env(&args, no_env).err().unwrap();
        assert_one_line(&err, "--client-cert needs --client-key");
        args.client_cert = None;
        args.client_key = Some(key_path);
        let err = Client::with_env(&args, no_env).err().unwrap();
        assert_one_line(&err, "--client-key needs --client-cert");
    }

    #[test]
    fn credentials_come_from_the_environment_in_pairs() {
        assert!(Credentials::from_env(no_env).unwrap().is_none());
        let credentials = Credentials::from_env(env_of(&[
            ("PORTWATCH_USER", "user"),
            ("PORTWATCH_PASSWORD", "pass"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(credentials.header, "Basic dXNlcjpwYXNz");
        assert_eq!(credentials.password_from, "PORTWATCH_PASSWORD");

        for (vars, words) in [
            (
                &[("PORTWATCH_USER", "user")][..],
                "PORTWATCH_USER is set without a password",
            ),
            (
                &[("PORTWATCH_USER", "user"), ("PORTWATCH_PASSWORD", "")][..],
                "PORTWATCH_USER is set without a password",
            ),
            (
                &[("PORTWATCH_PASSWORD", "pass")][..],
                "PORTWATCH_PASSWORD is set without a user",
            ),
            (
                &[
                    ("PORTWATCH_USER", "user"),
                    ("PORTWATCH_PASSWORD", "pass"),
                    ("PORTWATCH_PASSWORD_FILE", "/nonexistent"),
                ][..],
                "keep one",
            ),
            (
                &[("PORTWATCH_USER", "us:er"), ("PORTWATCH_PASSWORD", "pass")][..],
                "colon",
            ),
        ] {
            let err = Credentials::from_env(env_of(vars)).err().unwrap();
            assert_one_line(&err, words);
        }

        // The file's first line, without its end.
        let dir = TempDir::new("password");
        let file = dir.file("password", "pass\r\nignored\n");
        let file = file.to_str().unwrap();
        let credentials = Credentials::from_env(env_of(&[
            ("PORTWATCH_USER", "user"),
            ("PORTWATCH_PASSWORD_FILE", file),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(credentials.header, basic_auth("user", "pass"));
        assert_eq!(credentials.password_from, "PORTWATCH_PASSWORD_FILE");
        let empty = dir.file("empty", "\n");
        let err = Credentials::from_env(env_of(&[
            ("PORTWATCH_USER", "user"),
            ("PORTWATCH_PASSWORD_FILE", empty.to_str().unwrap()),
        ]))
        .err()
        .unwrap();
        assert_one_line(&err, "is empty");
        let missing = dir.0.join("missing");
        let err = Credentials::from_env(env_of(&[
            ("PORTWATCH_USER", "user"),
            ("PORTWATCH_PASSWORD_FILE", missing.to_str().unwrap()),
        ]))
        .err()
        .unwrap();
        assert_one_line(&err, "PORTWATCH_PASSWORD_FILE ");
        assert_one_line(&err, "missing: ");
    }

    #[test]
    fn a_401_is_one_line_naming_the_credentials() {
        let (address, server) = serve_once(UNAUTHORIZED);
        let err = client(&format!("http://{address}"))
            .get("/ports")
            .unwrap_err();
        assert!(
            matches!(err, ClientError::NeedsCredentials { .. }),
            "{err:?}"
        );
        assert_one_line(
            &err,
            "401 Unauthorized: the daemon needs credentials; set PORTWATCH_USER and PORTWATCH_PASSWORD",
        );
        assert!(err.to_string().starts_with(&format!("http://{address}: ")));
        server.join().unwrap();

        // With credentials: sent, and refused by name.
        let (address, server) = serve_once(UNAUTHORIZED);
        let env = env_of(&[("PORTWATCH_USER", "user"), ("PORTWATCH_PASSWORD", "pass")]);
        let client = Client::with_env(&server_args(&format!("http://{address}")), env).unwrap();
        let err = client.get("/ports").unwrap_err();
        assert_one_line(
            &err,
            "401 Unauthorized: the daemon refused the credentials of user user (PORTWATCH_USER and PORTWATCH_PASSWORD)",
        );
        let request = server.join().unwrap();
        assert!(
            request
                .to_ascii_lowercase()
                .contains("authorization: basic dxnlcjpwyxnz\r\n"),
            "{request}"
        );

        // The event stream of `watch` asks the same way.
        let (address, server) = serve_once(UNAUTHORIZED);
        let args = WatchArgs {
            port: None,
            json: false,
            server: server_args(&format!("http://{address}")),
        };
        let err = watch(&args).unwrap_err();
        assert!(
            matches!(err, ClientError::NeedsCredentials { .. }),
            "{err:?}"
        );
        assert!(server.join().unwrap().starts_with("GET /events "));
    }

    #[test]
    fn https_to_a_plain_port_is_one_tls_line() {
        let (address, server) = serve_once(UNAUTHORIZED);
        let err = client(&format!("https://{address}"))
            .get("/ports")
            .unwrap_err();
        assert!(matches!(err, ClientError::Tls { .. }), "{err:?}");
        assert_one_line(
            &err,
            &format!("https://{address}: TLS: the answer is not TLS"),
        );
        assert_one_line(&err, "use an http:// URL");
        server.join().unwrap();
    }

    #[test]
    fn plain_http_to_a_tls_port_says_to_use_https() {
        // A TLS server's answer to a plain request: a fatal decode_error
        // alert record, then it hangs up.
        let (address, server) = serve_once(b"\x15\x03\x03\x00\x02\x02\x32");
        let err = client(&format!("http://{address}"))
            .get("/ports")
            .unwrap_err();
        assert!(matches!(err, ClientError::NotHttp { .. }), "{err:?}");
        assert_one_line(&err, "use an https:// URL in --server");
        server.join().unwrap();
    }

    /// A TLS server on loopback with `cert` and `key` that answers one
    /// request with `{}`, and, given `client_ca`, asks for a client
    /// certificate signed by it. Its address.
    fn serve_tls_once(cert: &str, key: &str, client_ca: Option<&str>) -> String {
        use std::io::Read as _;

        use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
        // The provider the daemon uses (rustls deprecates ring for lacking
        // post-quantum key exchange).
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = match client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                roots
                    .add(CertificateDer::from_pem_slice(ca.as_bytes()).unwrap())
                    .unwrap();
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    roots.into(),
                    provider,
                )
                .build()
                .unwrap();
                builder.with_client_cert_verifier(verifier)
            }
        };
        let config = builder
            .with_single_cert(
                vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap().to_string();
        std::thread::spawn(move || {
            let (socket, _) = listener.accept().unwrap();
            socket
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            let connection = rustls::ServerConnection::new(Arc::new(config)).unwrap();
            let mut stream = rustls::StreamOwned::new(connection, socket);
            let mut request = Vec::new();
            let mut buffer = [0; 4096];
            // A failed handshake ends the read with an error, and the
            // client reads the alert rustls sent.
            while !request.windows(4).any(|end| end == b"\r\n\r\n") {
                match stream.read(&mut buffer) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => request.extend_from_slice(&buffer[..n]),
                }
            }
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}");
            stream.conn.send_close_notify();
            let _ = stream.flush();
        });
        address
    }

    #[test]
    fn tls_failures_say_which_flag_fixes_them() {
        let dir = TempDir::new("handshake");
        let (cert, key) = certificate_for("127.0.0.1");
        let ca = dir.file("ca.pem", &cert);
        let client_with = |server: &str, ca: Option<&Path>, mtls: Option<(&Path, &Path)>| {
            let mut args = server_args(server);
            args.ca_cert = ca.map(Path::to_owned);
            args.client_cert = mtls.map(|(cert, _)| cert.to_owned());
            args.client_key = mtls.map(|(_, key)| key.to_owned());
            Client::with_env(&args, no_env).unwrap_or_else(|err| panic!("{err}"))
        };

        // The web PKI roots do not know a private CA.
        let server = format!("https://{}", serve_tls_once(&cert, &key, None));
        let err = client_with(&server, None, None).get("/").unwrap_err();
        assert!(matches!(err, ClientError::Tls { .. }), "{err:?}");
        assert_one_line(&err, "UnknownIssuer");
        assert_one_line(&err, "pass that CA with --ca-cert");
        // --ca-cert does.
        let server = format!("https://{}", serve_tls_once(&cert, &key, None));
        let answer = client_with(&server, Some(&ca), None).get("/");
        assert_eq!(answer.unwrap(), serde_json::json!({}));

        // A certificate for another name.
        let (other, other_key) = certificate_for("example.invalid");
        let other_ca = dir.file("other-ca.pem", &other);
        let server = format!("https://{}", serve_tls_once(&other, &other_key, None));
        let err = client_with(&server, Some(&other_ca), None)
            .get("/")
            .unwrap_err();
        assert_one_line(&err, "the daemon's certificate is not for this host");

        // Mutual TLS: without a client certificate, then with one.
        let (client_cert, client_key) = certificate();
        let client_cert_path = dir.file("client.pem", &client_cert);
        let client_key_path = dir.file("client-key.pem", &client_key);
        let server = format!(
            "https://{}",
            serve_tls_once(&cert, &key, Some(&client_cert))
        );
        let err = client_with(&server, Some(&ca), None).get("/").unwrap_err();
        assert_one_line(&err, "the daemon asks for a client certificate");
        assert_one_line(&err, "--client-cert and --client-key");
        let server = format!(
            "https://{}",
            serve_tls_once(&cert, &key, Some(&client_cert))
        );
        let mtls = Some((client_cert_path.as_path(), client_key_path.as_path()));
        let answer = client_with(&server, Some(&ca), mtls).get("/");
        assert_eq!(answer.unwrap(), serde_json::json!({}));
    }
}
