//! Certificates made in the test with rcgen (nothing pre-made is checked
//! in): a CA, a server certificate for `localhost` and 127.0.0.1 signed by
//! it, and a client certificate, as PEM files in a [`TempDir`]; and a small
//! rustls client to talk to a TLS listener with exactly the versions and
//! identity a test wants.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use rustls::{
    ClientConfig, ClientConnection, RootCertStore, StreamOwned, SupportedProtocolVersion,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject},
};

use super::TempDir;

/// A test CA and the files it issued.
pub struct Pki {
    ca: CertifiedIssuer<'static, KeyPair>,
    pub dir: TempDir,
    /// The CA certificate (PEM).
    pub ca_file: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl Pki {
    pub fn new(label: &str) -> Pki {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "portwatch test CA");
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        let dir = TempDir::new(label);
        let ca_file = dir.file("ca.pem", ca.pem());
        let mut pki = Pki {
            ca,
            ca_file,
            server_cert: dir.path.join("server.pem"),
            server_key: dir.path.join("server.key"),
            client_cert: dir.path.join("client.pem"),
            client_key: dir.path.join("client.key"),
            dir,
        };
        pki.issue_server();
        let (cert, key) = pki.issue("portwatch test client", vec![]);
        std::fs::write(&pki.client_cert, cert).unwrap();
        std::fs::write(&pki.client_key, key).unwrap();
        pki
    }

    /// A certificate and key (PEM) for `names`, signed by the CA.
    pub fn issue(&self, common_name: &str, names: Vec<String>) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(names).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        let cert = params.signed_by(&key, &self.ca).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// Writes a new server certificate and key over the old ones (as a
    /// rotation does); the new certificate's DER.
    pub fn issue_server(&mut self) -> Vec<u8> {
        let (cert, key) = self.issue(
            "portwatch test server",
            vec!["localhost".into(), "127.0.0.1".into(), "::1".into()],
        );
        // The key first: a reload between the two writes then fails on a
        // mismatch and keeps the old pair, rather than serving a wrong one.
        std::fs::write(&self.server_key, key).unwrap();
        std::fs::write(&self.server_cert, &cert).unwrap();
        CertificateDer::from_pem_slice(cert.as_bytes())
            .unwrap()
            .to_vec()
    }

    /// A client trusting the CA, speaking `versions`, with the client
    /// certificate if `identify`.
    pub fn client(
        &self,
        versions: &[&'static SupportedProtocolVersion],
        identify: bool,
    ) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_file(&self.ca_file).unwrap())
            .unwrap();
        #[allow(deprecated, reason = "the provider the daemon uses")]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots);
        let config = if identify {
            let chain = CertificateDer::pem_file_iter(&self.client_cert)
                .unwrap()
                .collect::<Result<Vec<_>, _>>()
                .unwrap();
            let key = PrivateKeyDer::from_pem_file(&self.client_key).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        } else {
            builder.with_no_client_auth()
        };
        Arc::new(config)
    }
}

/// What a TLS request got: the server's certificate and the raw answer.
pub struct TlsAnswer {
    pub server_cert: Vec<u8>,
    pub response: String,
}

impl TlsAnswer {
    /// The status code of the answer's status line.
    pub fn status(&self) -> u16 {
        self.response
            .split(' ')
            .nth(1)
            .and_then(|code| code.parse().ok())
            .unwrap_or_else(|| panic!("no status line in {:?}", self.response))
    }
}

/// `GET path` over TLS to `addr` with an optional `Authorization` header,
/// the connection closed after the answer. `Err` is what failed (the
/// handshake, typically), as text.
pub fn tls_get(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
    path: &str,
    authorization: Option<&str>,
) -> Result<TlsAnswer, String> {
    let tcp = TcpStream::connect(addr).map_err(|err| err.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let connection = ClientConnection::new(config, name).map_err(|err| err.to_string())?;
    let mut tls = StreamOwned::new(connection, tcp);
    let mut request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    if let Some(value) = authorization {
        request.push_str(&format!("Authorization: {value}\r\n"));
    }
    request.push_str("\r\n");
    tls.write_all(request.as_bytes())
        .map_err(|err| err.to_string())?;
    let mut response = Vec::new();
    match tls.read_to_end(&mut response) {
        Ok(_) => {}
        // Servers that close without close_notify still sent the answer.
        Err(err) if err.kind() == std::io::ErrorKind::UnexpectedEof && !response.is_empty() => {}
        Err(err) => return Err(err.to_string()),
    }
    let server_cert = tls
        .conn
        .peer_certificates()
        .and_then(|chain| chain.first())
        .map(|cert| cert.to_vec())
        .unwrap_or_default();
    Ok(TlsAnswer {
        server_cert,
        response: String::from_utf8_lossy(&response).into_owned(),
    })
}

/// `Basic base64(user:password)`.
pub fn basic(user: &str, password: &str) -> String {
    use base64::Engine as _;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

/// A bcrypt hash of `password` at the lowest cost, so tests stay fast.
pub fn bcrypt_hash(password: &str) -> String {
    bcrypt::hash(password, 4).unwrap()
}
