//! Remote access: TLS and basic authentication for both HTTP listeners,
//! configured by a web.yml in exporter-toolkit's format (`web_config`,
//! `metrics_web_config`), the file node_exporter and Prometheus read, so an
//! operator's existing one works here.
//!
//! [`file`] parses the YAML, [`tls`] and [`auth`] turn it into [`Settings`];
//! a [`Gate`] holds one listener's current settings, swapped whole on reload
//! ([`reload`]) while connections come and go, and is the middleware that
//! asks for credentials and sets the configured headers.

pub mod auth;
pub mod file;
pub mod reload;
pub mod serve;
pub mod tls;

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use arc_swap::ArcSwap;
use axum::{
    Router,
    extract::{Request, State},
    http::{HeaderName, HeaderValue, StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Response},
};
use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};
use rustls::ServerConfig;
use tokio::sync::Semaphore;

use crate::api::problem::Problem;

pub use tls::ClientAuth;

/// What is wrong with a web configuration file.
#[derive(Debug, thiserror::Error)]
pub enum WebError {
    /// The file, or a file it names, cannot be read.
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid YAML for the format (an unknown key, a wrong type).
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    /// A value is wrong.
    #[error("{path}: {key}: {message}")]
    Invalid {
        path: PathBuf,
        key: String,
        message: String,
    },
    /// A key or value the format defines that portwatch does not implement.
    #[error("{path}: {key}: not supported by portwatch: {why}")]
    Unsupported {
        path: PathBuf,
        key: String,
        why: String,
    },
}

/// One reading of a web.yml: where relative paths start, and every file
/// read with their contents' digest, to watch them and to tell a real
/// change from a touch.
pub struct Load {
    path: PathBuf,
    base: PathBuf,
    files: Vec<PathBuf>,
    digest: ::ring::digest::Context,
}

impl Load {
    fn new(path: &Path) -> Load {
        Load {
            path: path.to_path_buf(),
            base: path.parent().map(Path::to_path_buf).unwrap_or_default(),
            files: Vec::new(),
            digest: ::ring::digest::Context::new(&::ring::digest::SHA256),
        }
    }

    /// Reads a file the web.yml names under `key` (relative to the web.yml).
    fn read(&mut self, key: &str, name: &str) -> Result<Vec<u8>, WebError> {
        let path = self.base.join(name);
        let bytes = std::fs::read(&path).map_err(|source| WebError::Read {
            path: path.clone(),
            source,
        })?;
        if bytes.is_empty() {
            return Err(self.invalid(key, format!("{} is empty", path.display())));
        }
        self.record(path, &bytes);
        Ok(bytes)
    }

    fn record(&mut self, path: PathBuf, bytes: &[u8]) {
        self.digest.update(path.as_os_str().as_encoded_bytes());
        self.digest.update(&(bytes.len() as u64).to_le_bytes());
        self.digest.update(bytes);
        self.files.push(path);
    }

    fn invalid(&self, key: &str, message: String) -> WebError {
        WebError::Invalid {
            path: self.path.clone(),
            key: key.to_owned(),
            message,
        }
    }

    fn unsupported(&self, key: &str, why: String) -> WebError {
        WebError::Unsupported {
            path: self.path.clone(),
            key: key.to_owned(),
            why,
        }
    }
}

/// One listener's TLS, users and headers.
#[derive(Debug)]
pub struct Settings {
    /// The web.yml these came from (`None`: plain HTTP, no users).
    pub source: Option<PathBuf>,
    pub tls: Option<Arc<ServerConfig>>,
    pub client_auth: ClientAuth,
    pub users: auth::Users,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Every file read: the web.yml, then the certificates and keys.
    pub files: Vec<PathBuf>,
    fingerprint: Vec<u8>,
}

impl Settings {
    /// Plain HTTP, nobody asked for credentials.
    pub fn open() -> Settings {
        Settings {
            source: None,
            tls: None,
            client_auth: ClientAuth::None,
            users: auth::Users::default(),
            headers: Vec::new(),
            files: Vec::new(),
            fingerprint: Vec::new(),
        }
    }

    /// Reads the web.yml at `path` and every file it names.
    pub fn load(path: &Path) -> Result<Settings, WebError> {
        let mut load = Load::new(path);
        let bytes = std::fs::read(path).map_err(|source| WebError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        load.record(path.to_path_buf(), &bytes);
        let text = String::from_utf8(bytes).map_err(|_| WebError::Parse {
            path: path.to_path_buf(),
            message: "not UTF-8 text".into(),
        })?;
        let web = file::parse(&text).map_err(|message| WebError::Parse {
            path: path.to_path_buf(),
            message,
        })?;
        if web.rate_limit.is_some() {
            return Err(load.unsupported("rate_limit", "requests are not rate-limited".into()));
        }
        if web.tls_server_config.client_allowed_sans.is_some() {
            return Err(load.unsupported(
                "client_allowed_sans",
                "any certificate from client_ca_file is accepted".into(),
            ));
        }
        if web.http_server_config.http2 == Some(true) {
            return Err(load.unsupported(
                "http2",
                "portwatch serves HTTP/1.1 only; remove the key or set it to false".into(),
            ));
        }
        let headers = headers(&web.http_server_config.headers, &load)?;
        let users = auth::Users::new(&web.basic_auth_users).map_err(|(user, message)| {
            load.invalid(&format!("basic_auth_users: {user}"), message)
        })?;
        let (tls, client_auth) = if web.tls_server_config.enabled() {
            let (config, client_auth) = tls::server_config(&web.tls_server_config, &mut load)?;
            (Some(config), client_auth)
        } else {
            (None, ClientAuth::None)
        };
        if tls.is_none() && users.required() {
            tracing::warn!(
                path = %path.display(),
                "basic_auth_users without tls_server_config: passwords cross the network in clear text"
            );
        }
        Ok(Settings {
            source: Some(path.to_path_buf()),
            tls,
            client_auth,
            users,
            headers,
            files: load.files,
            fingerprint: load.digest.finish().as_ref().to_vec(),
        })
    }

    /// Whether a client must prove who it is: a password or a client
    /// certificate.
    pub fn authenticates(&self) -> bool {
        self.users.required() || self.client_auth == ClientAuth::Required
    }

    /// One phrase for `--check-config` and the start-up log.
    pub fn describe(&self) -> String {
        let mut parts = vec![match (&self.tls, self.client_auth) {
            (None, _) => "plain HTTP".to_owned(),
            (Some(_), ClientAuth::None) => "TLS".to_owned(),
            (Some(_), ClientAuth::IfGiven) => "TLS, client certificates verified if given".into(),
            (Some(_), ClientAuth::Required) => "TLS, client certificates required".into(),
        }];
        if self.users.required() {
            let users = self.users.count();
            parts.push(format!(
                "basic auth ({users} {})",
                if users == 1 { "user" } else { "users" }
            ));
        }
        parts.join(" with ")
    }
}

/// `http_server_config.headers`, checked as exporter-toolkit checks them.
fn headers(
    wanted: &std::collections::BTreeMap<String, String>,
    load: &Load,
) -> Result<Vec<(HeaderName, HeaderValue)>, WebError> {
    wanted
        .iter()
        .map(|(name, value)| {
            let key = format!("headers: {name}");
            let Some((canonical, allowed)) = file::ALLOWED_HEADERS
                .iter()
                .find(|(allowed, _)| allowed.eq_ignore_ascii_case(name))
            else {
                let names: Vec<_> = file::ALLOWED_HEADERS.iter().map(|(n, _)| *n).collect();
                return Err(load.invalid(
                    &key,
                    format!("not a header the format allows ({})", names.join(", ")),
                ));
            };
            if let Some(allowed) = allowed
                && !allowed.iter().any(|v| v.eq_ignore_ascii_case(value))
            {
                return Err(load.invalid(&key, format!("must be one of {}", allowed.join(", "))));
            }
            let value = HeaderValue::from_str(value)
                .map_err(|_| load.invalid(&key, "not a valid header value".into()))?;
            let name = HeaderName::from_bytes(canonical.as_bytes())
                .expect("the allowed names are valid header names");
            Ok((name, value))
        })
        .collect()
}

/// The counters of every listener's gate.
#[derive(Clone, Debug)]
pub struct WebMetrics {
    auth_failures: IntCounterVec,
    reload_ok: IntGaugeVec,
}

impl WebMetrics {
    pub fn new() -> Result<WebMetrics, prometheus::Error> {
        Ok(WebMetrics {
            auth_failures: IntCounterVec::new(
                Opts::new(
                    "portwatch_http_auth_failures_total",
                    "HTTP requests refused for missing or wrong basic-auth credentials, by listener (api, metrics).",
                ),
                &["listener"],
            )?,
            reload_ok: IntGaugeVec::new(
                Opts::new(
                    "portwatch_web_config_last_reload_successful",
                    "Whether the listener's web_config last (re)loaded without error (1) or the previous one is still in use (0), by listener.",
                ),
                &["listener"],
            )?,
        })
    }

    /// Adds the counters to `registry`.
    pub fn register(&self, registry: &Registry) -> Result<(), prometheus::Error> {
        registry.register(Box::new(self.auth_failures.clone()))?;
        registry.register(Box::new(self.reload_ok.clone()))
    }
}

/// What a reload did.
#[derive(Debug, PartialEq, Eq)]
pub enum Reloaded {
    /// No web.yml, or nothing in its files changed.
    Unchanged,
    /// The new settings are in use.
    Changed,
    /// The new files are wrong; the old settings stay.
    Failed(String),
}

/// One listener's live settings.
#[derive(Debug)]
pub struct Gate {
    /// `api` or `metrics`, for logs and labels.
    pub listener: &'static str,
    current: ArcSwap<Settings>,
    checks: Arc<Semaphore>,
    failures: prometheus::IntCounter,
    reload_ok: prometheus::IntGauge,
    last_error: Mutex<Option<String>>,
    /// The listener is beyond loopback without `allow_unauthenticated_remote`:
    /// a reload must not leave it asking nobody who is calling.
    must_authenticate: bool,
}

impl Gate {
    /// `must_authenticate`: see [`Gate::reload`].
    pub fn new(
        listener: &'static str,
        settings: Settings,
        must_authenticate: bool,
        metrics: &WebMetrics,
    ) -> Arc<Gate> {
        let reload_ok = metrics.reload_ok.with_label_values(&[listener]);
        reload_ok.set(1);
        Arc::new(Gate {
            listener,
            current: ArcSwap::from_pointee(settings),
            checks: auth::bcrypt_slots(),
            failures: metrics.auth_failures.with_label_values(&[listener]),
            reload_ok,
            last_error: Mutex::new(None),
            must_authenticate,
        })
    }

    /// The settings now in use.
    pub fn settings(&self) -> Arc<Settings> {
        self.current.load_full()
    }

    /// Reads the web.yml again; a broken one keeps the settings in use, and
    /// so does one that would turn TLS off (a restart can do that) or, on a
    /// listener that must authenticate, ask nobody who is calling (the rule
    /// the configuration is checked by at start). Blocking: file I/O and a
    /// bcrypt hash.
    pub fn reload(&self) -> Reloaded {
        let current = self.current.load_full();
        let Some(path) = current.source.clone() else {
            return Reloaded::Unchanged;
        };
        let loaded = Settings::load(&path).and_then(|settings| {
            let refuse = |why: &str| WebError::Invalid {
                path: path.clone(),
                key: "tls_server_config".into(),
                message: why.into(),
            };
            if current.tls.is_some() && settings.tls.is_none() {
                return Err(refuse(
                    "the new file turns TLS off, which takes a restart, not a reload",
                ));
            }
            if self.must_authenticate && !settings.authenticates() {
                return Err(WebError::Invalid {
                    path: path.clone(),
                    key: "basic_auth_users".into(),
                    message: "the new file asks for no password and no client certificate, and this listener is beyond loopback".into(),
                });
            }
            Ok(settings)
        });
        let mut last_error = self.last_error.lock().unwrap_or_else(|p| p.into_inner());
        match loaded {
            Ok(settings) if settings.fingerprint == current.fingerprint => {
                self.reload_ok.set(1);
                *last_error = None;
                Reloaded::Unchanged
            }
            Ok(settings) => {
                tracing::info!(
                    listener = self.listener,
                    path = %path.display(),
                    settings = settings.describe(),
                    "web_config reloaded; new connections use it"
                );
                self.current.store(Arc::new(settings));
                self.reload_ok.set(1);
                *last_error = None;
                Reloaded::Changed
            }
            Err(err) => {
                let message = err.to_string();
                // Said once per distinct error, not at every file event.
                if last_error.as_deref() != Some(message.as_str()) {
                    tracing::error!(
                        listener = self.listener,
                        error = %message,
                        "web_config not reloaded; the previous one stays in use"
                    );
                }
                self.reload_ok.set(0);
                *last_error = Some(message.clone());
                Reloaded::Failed(message)
            }
        }
    }

    /// `router` behind this gate: credentials checked, headers set.
    pub fn guard(self: &Arc<Self>, router: Router) -> Router {
        router.layer(axum::middleware::from_fn_with_state(self.clone(), guard))
    }
}

async fn guard(State(gate): State<Arc<Gate>>, request: Request, next: Next) -> Response {
    let settings = gate.settings();
    let admission = if settings.users.required() {
        settings
            .users
            .admit(request.headers().get(header::AUTHORIZATION), &gate.checks)
            .await
    } else {
        auth::Admission::Admitted
    };
    let mut response = match admission {
        auth::Admission::Admitted => next.run(request).await,
        auth::Admission::Refused => {
            gate.failures.inc();
            unauthorized()
        }
        auth::Admission::Busy => {
            gate.failures.inc();
            busy()
        }
    };
    for (name, value) in &settings.headers {
        response.headers_mut().insert(name.clone(), value.clone());
    }
    response
}

/// 429: every bcrypt slot stayed taken (a flood of guesses, most likely).
fn busy() -> Response {
    let mut response = Problem::from_status(
        StatusCode::TOO_MANY_REQUESTS,
        "too many password checks at once; try again in a second",
    )
    .into_response();
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    response
}

/// 401, with the challenge that makes curl and browsers ask for a password.
fn unauthorized() -> Response {
    let mut response = Problem::from_status(
        StatusCode::UNAUTHORIZED,
        "this listener needs basic-auth credentials (basic_auth_users in its web_config)",
    )
    .into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Basic realm=\"portwatch\", charset=\"UTF-8\""),
    );
    response
}
