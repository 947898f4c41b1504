//! The daemon's configuration: a TOML file (`--config`, default
//! `/etc/portwatch/portwatch.toml`; a missing file means defaults), then
//! `PORTWATCH_*` environment variables, then flags, each overriding the one
//! before. Every key and its default is documented here and in
//! `deploy/portwatch.toml`.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

use crate::{
    capture::{
        CaptureConfig, DEFAULT_IN_FLIGHT_CALLS, DEFAULT_RING_BYTES, DEFAULT_TRACKED_SOCKETS,
        OutcomeChoice, ring_size_ok,
    },
    snapshot::{
        SnapshotConfig,
        workload::{
            DEFAULT_CONTAINER_LOGS, DEFAULT_DOCKER_CONTAINERS, DEFAULT_POD_LOGS, WorkloadRoots,
        },
    },
    state::ExpectedListener,
    watch::WatchConfig,
    web::{Settings, WebError},
};

/// Where the daemon looks for its file when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/portwatch/portwatch.toml";

/// The HTTP address when none is configured: loopback, on a port outside
/// the 9100-9999 range that Prometheus exporters use by convention.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7464";

/// The most threads that can be in a bind or listen at once: Linux's
/// `PID_MAX_LIMIT`, above which no thread id exists.
const MAX_IN_FLIGHT_CALLS: u32 = 4 * 1024 * 1024;

/// The configuration file's contents. Unknown keys are errors, so a typo is
/// not silently ignored.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The full HTTP API (ports, failures, check, events, metrics).
    /// Default `127.0.0.1:7464`: loopback only, since it shows process details.
    /// Another address is refused unless `web_config` asks for credentials
    /// or client certificates, or [`Config::allow_unauthenticated_remote`].
    pub listen: SocketAddr,
    /// A web.yml in exporter-toolkit's format (the file node_exporter and
    /// Prometheus read): TLS, client certificates, basic-auth users and
    /// response headers, for the API and, unless `metrics_web_config` is
    /// set, for `metrics_listen`. Relative paths inside it start at its own
    /// directory. Re-read on SIGHUP and when it or a file it names changes.
    /// Default: none (plain HTTP, no credentials).
    pub web_config: Option<PathBuf>,
    /// The same for `metrics_listen` alone, for a scrape identity that
    /// differs from the API's. Default: `web_config`.
    pub metrics_web_config: Option<PathBuf>,
    /// Serve the API on an address that is not loopback although it has no
    /// authentication: anyone who reaches it sees every process, uid, unit
    /// and container on the host. Said explicitly, and warned about at
    /// start. Default false. (`metrics_listen`, which carries no process
    /// details, needs no such permission.)
    pub allow_unauthenticated_remote: bool,
    /// An optional second listener serving only `/metrics`, `/livez` and
    /// `/readyz`, to expose metrics to the network without the process
    /// details. Default: none.
    pub metrics_listen: Option<SocketAddr>,
    /// The cgroup v2 subtree to watch. Default: the root of the cgroup2
    /// mount, i.e. the whole machine.
    pub cgroup: Option<PathBuf>,
    /// How often the map is checked against sock_diag. Default 30 s.
    #[serde(with = "humantime_serde_compat")]
    pub reconcile_interval: Duration,
    /// How often each namespace's ephemeral port use is listed for
    /// `/ephemeral` and its metrics (and at once after a failure that
    /// exhausts the range). Default 15 s.
    #[serde(with = "humantime_serde_compat")]
    pub ephemeral_interval: Duration,
    /// How many recent failures `/failures` keeps. Default 10000.
    pub failure_log: usize,
    /// How many distinct ports `portwatch_port_bind_failures_total` names
    /// before counting the rest as `port="other"`. Default 1000.
    pub port_label_cap: usize,
    /// Kernel ring buffer size in bytes, a power of two. Default 4 MiB.
    pub ring_size: u32,
    /// How many sockets the kernel programs can track at once to report
    /// their close (listeners and bound sockets). Past it, a close is found
    /// by the next reconciliation instead, and the miss is counted in
    /// `portwatch_events_dropped_total`. Default 131072.
    pub tracked_sockets: u32,
    /// How many binds and how many listens can be in progress at once (one
    /// per thread). Past it, the call still goes ahead and the miss is
    /// counted in `portwatch_events_dropped_total`. Default 16384; at most
    /// 4194304, the most thread ids Linux has.
    pub in_flight_calls: u32,
    /// How bind and listen outcomes are captured: `auto` (fexit when the
    /// kernel allows it, else inferred), `exact` (fexit, else the syscall
    /// tracepoints), `tracepoint` or `inferred`. Default `auto`.
    pub outcome: Outcome,
    /// Read SO_REUSEADDR/SO_REUSEPORT of sockets that existed before
    /// portwatch started (pidfd_getfd). Default true.
    pub read_existing_options: bool,
    /// Ports that should always be listened on in the daemon's own network
    /// namespace, as `"443/tcp"`: `portwatch_expected_listeners` reports
    /// each one's listeners, 0 included, for the PortwatchListenerGone
    /// alert. Default: none.
    #[serde(deserialize_with = "expected_listeners")]
    pub expected_listeners: Vec<ExpectedListener>,
    /// The kubelet's pod log directories, `<namespace>_<pod>_<uid>`, which
    /// give a pod's name and namespace from the uid in its cgroup path.
    /// Default `/var/log/pods` (the kubelet's `podLogsDir`).
    pub pod_logs_dir: PathBuf,
    /// The kubelet's container log links,
    /// `<pod>_<namespace>_<container>-<id>.log`, which give a pod
    /// container's name from its id. Default `/var/log/containers`.
    pub container_logs_dir: PathBuf,
    /// Docker's container directories, whose `<id>/config.v2.json` gives a
    /// Docker container's name. Default `/var/lib/docker/containers`.
    pub docker_containers_dir: PathBuf,
}

/// [`OutcomeChoice`] as the file spells it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    #[default]
    Auto,
    Exact,
    Tracepoint,
    Inferred,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: DEFAULT_LISTEN.parse().expect("a valid default address"),
            allow_unauthenticated_remote: false,
            web_config: None,
            metrics_web_config: None,
            metrics_listen: None,
            cgroup: None,
            reconcile_interval: Duration::from_secs(30),
            ephemeral_interval: Duration::from_secs(15),
            failure_log: 10_000,
            port_label_cap: 1_000,
            ring_size: DEFAULT_RING_BYTES,
            tracked_sockets: DEFAULT_TRACKED_SOCKETS,
            in_flight_calls: DEFAULT_IN_FLIGHT_CALLS,
            outcome: Outcome::Auto,
            read_existing_options: true,
            expected_listeners: Vec::new(),
            // Where the kubelet and Docker keep them unless told otherwise.
            pod_logs_dir: DEFAULT_POD_LOGS.into(),
            container_logs_dir: DEFAULT_CONTAINER_LOGS.into(),
            docker_containers_dir: DEFAULT_DOCKER_CONTAINERS.into(),
        }
    }
}

/// Where byte `at` of a configuration file is, as an operator finds it:
/// `line 12` and, on a `key = value` line, the key (`line 12, key
/// reconcile_interval`): the journal shows one line, which must say what to
/// fix without the file at hand.
fn where_in(text: &str, at: usize) -> String {
    let at = at.min(text.len());
    let before = text.get(..at).unwrap_or(text);
    let line_no = before.matches('\n').count() + 1;
    let start = before.rfind('\n').map_or(0, |i| i + 1);
    let line = text[start..].lines().next().unwrap_or_default();
    match line.split_once('=') {
        Some((key, _)) if !key.trim().is_empty() && !key.trim_start().starts_with('#') => {
            format!("line {line_no}, key {}", key.trim())
        }
        _ => format!("line {line_no}"),
    }
}

fn web_settings(key: &'static str, path: Option<&Path>) -> Result<Settings, ConfigError> {
    match path {
        Some(path) => Settings::load(path).map_err(|source| ConfigError::Web { key, source }),
        None => Ok(Settings::open()),
    }
}

/// What is wrong with a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file exists but cannot be read.
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML for this configuration.
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    /// An environment variable holds a value that does not parse.
    #[error("environment variable {name}={value:?}: {message}")]
    Env {
        name: &'static str,
        value: String,
        message: String,
    },
    /// A value is out of range.
    #[error("{key}: {message}")]
    Invalid { key: &'static str, message: String },
    /// The web.yml a key names is wrong.
    #[error("{key}: {source}")]
    Web {
        key: &'static str,
        #[source]
        source: WebError,
    },
}

/// Overrides from the command line (`None` = not given).
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub listen: Option<SocketAddr>,
    pub metrics_listen: Option<SocketAddr>,
    pub cgroup: Option<PathBuf>,
    pub web_config: Option<PathBuf>,
    pub metrics_web_config: Option<PathBuf>,
}

impl Config {
    /// Reads `path` (a missing file is the defaults, unless `required`).
    pub fn load(path: &Path, required: bool) -> Result<Config, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Config::parse(&text, path),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound && !required => {
                Ok(Config::default())
            }
            Err(source) => Err(ConfigError::Read {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    /// Parses the text of a configuration file.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|err| ConfigError::Parse {
            path: path.to_path_buf(),
            message: match err.span() {
                Some(span) => format!("{}: {}", where_in(text, span.start), err.message()),
                None => err.message().to_owned(),
            },
        })?;
        config.validate_values()?;
        Ok(config)
    }

    /// Applies `PORTWATCH_*` variables from `env` (name -> value).
    pub fn apply_env(
        mut self,
        env: impl Fn(&'static str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        fn parsed<T: std::str::FromStr>(name: &'static str, value: String) -> Result<T, ConfigError>
        where
            T::Err: std::fmt::Display,
        {
            value.parse().map_err(|err: T::Err| ConfigError::Env {
                name,
                message: err.to_string(),
                value,
            })
        }
        if let Some(v) = env("PORTWATCH_LISTEN") {
            self.listen = parsed("PORTWATCH_LISTEN", v)?;
        }
        if let Some(v) = env("PORTWATCH_ALLOW_UNAUTHENTICATED_REMOTE") {
            self.allow_unauthenticated_remote =
                parsed("PORTWATCH_ALLOW_UNAUTHENTICATED_REMOTE", v)?;
        }
        if let Some(v) = env("PORTWATCH_WEB_CONFIG") {
            self.web_config = Some(PathBuf::from(v));
        }
        if let Some(v) = env("PORTWATCH_METRICS_WEB_CONFIG") {
            self.metrics_web_config = Some(PathBuf::from(v));
        }
        if let Some(v) = env("PORTWATCH_METRICS_LISTEN") {
            self.metrics_listen = Some(parsed("PORTWATCH_METRICS_LISTEN", v)?);
        }
        if let Some(v) = env("PORTWATCH_CGROUP") {
            self.cgroup = Some(PathBuf::from(v));
        }
        if let Some(v) = env("PORTWATCH_RECONCILE_INTERVAL") {
            self.reconcile_interval =
                humantime::parse_duration(&v).map_err(|err| ConfigError::Env {
                    name: "PORTWATCH_RECONCILE_INTERVAL",
                    message: err.to_string(),
                    value: v,
                })?;
        }
        if let Some(v) = env("PORTWATCH_EPHEMERAL_INTERVAL") {
            self.ephemeral_interval =
                humantime::parse_duration(&v).map_err(|err| ConfigError::Env {
                    name: "PORTWATCH_EPHEMERAL_INTERVAL",
                    message: err.to_string(),
                    value: v,
                })?;
        }
        if let Some(v) = env("PORTWATCH_FAILURE_LOG") {
            self.failure_log = parsed("PORTWATCH_FAILURE_LOG", v)?;
        }
        if let Some(v) = env("PORTWATCH_PORT_LABEL_CAP") {
            self.port_label_cap = parsed("PORTWATCH_PORT_LABEL_CAP", v)?;
        }
        if let Some(v) = env("PORTWATCH_RING_SIZE") {
            self.ring_size = parsed("PORTWATCH_RING_SIZE", v)?;
        }
        if let Some(v) = env("PORTWATCH_TRACKED_SOCKETS") {
            self.tracked_sockets = parsed("PORTWATCH_TRACKED_SOCKETS", v)?;
        }
        if let Some(v) = env("PORTWATCH_IN_FLIGHT_CALLS") {
            self.in_flight_calls = parsed("PORTWATCH_IN_FLIGHT_CALLS", v)?;
        }
        if let Some(v) = env("PORTWATCH_OUTCOME") {
            self.outcome = match v.as_str() {
                "auto" => Outcome::Auto,
                "exact" => Outcome::Exact,
                "tracepoint" => Outcome::Tracepoint,
                "inferred" => Outcome::Inferred,
                _ => {
                    return Err(ConfigError::Env {
                        name: "PORTWATCH_OUTCOME",
                        message: "expected `auto`, `exact`, `tracepoint` or `inferred`".to_owned(),
                        value: v,
                    });
                }
            };
        }
        if let Some(v) = env("PORTWATCH_EXPECTED_LISTENERS") {
            self.expected_listeners = v
                .split(',')
                .filter(|item| !item.trim().is_empty())
                .map(str::parse)
                .collect::<Result<_, String>>()
                .map_err(|message| ConfigError::Env {
                    name: "PORTWATCH_EXPECTED_LISTENERS",
                    message,
                    value: v.clone(),
                })?;
        }
        if let Some(v) = env("PORTWATCH_POD_LOGS_DIR") {
            self.pod_logs_dir = PathBuf::from(v);
        }
        if let Some(v) = env("PORTWATCH_CONTAINER_LOGS_DIR") {
            self.container_logs_dir = PathBuf::from(v);
        }
        if let Some(v) = env("PORTWATCH_DOCKER_CONTAINERS_DIR") {
            self.docker_containers_dir = PathBuf::from(v);
        }
        self.validate_values()?;
        Ok(self)
    }

    /// Applies command-line overrides, the last layer: the result is checked
    /// as a whole (values, and how they go together).
    pub fn apply_flags(mut self, flags: &Overrides) -> Result<Config, ConfigError> {
        if let Some(listen) = flags.listen {
            self.listen = listen;
        }
        if let Some(listen) = flags.metrics_listen {
            self.metrics_listen = Some(listen);
        }
        if let Some(cgroup) = &flags.cgroup {
            self.cgroup = Some(cgroup.clone());
        }
        if let Some(path) = &flags.web_config {
            self.web_config = Some(path.clone());
        }
        if let Some(path) = &flags.metrics_web_config {
            self.metrics_web_config = Some(path.clone());
        }
        self.validate()?;
        Ok(self)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        self.validate_values()?;
        if self.metrics_listen == Some(self.listen) {
            return Err(ConfigError::Invalid {
                key: "metrics_listen",
                message: "must differ from listen".into(),
            });
        }
        // Both files are read whole: --check-config refuses what the
        // daemon would.
        self.check_api_web(&self.api_web()?)?;
        self.metrics_web()?;
        Ok(())
    }

    /// Whether the API must ask who is calling: it listens beyond loopback
    /// and `allow_unauthenticated_remote` does not say otherwise.
    pub fn api_must_authenticate(&self) -> bool {
        self.api_is_remote() && !self.allow_unauthenticated_remote
    }

    /// Refuses the API's web settings when it must authenticate and they
    /// ask for neither a password nor a client certificate.
    pub fn check_api_web(&self, api_web: &Settings) -> Result<(), ConfigError> {
        if self.api_must_authenticate() && !api_web.authenticates() {
            return Err(ConfigError::Invalid {
                key: "listen",
                message: format!(
                    "{} is not a loopback address, and the API has no authentication: anyone who reaches it would see every process, uid, unit and container on this host; set web_config to a web.yml with basic_auth_users or client_auth_type: RequireAndVerifyClientCert, listen on 127.0.0.1 or ::1 (and serve metrics with metrics_listen), or set allow_unauthenticated_remote = true",
                    self.listen
                ),
            });
        }
        Ok(())
    }

    /// The API listener's TLS and users, read from `web_config`.
    pub fn api_web(&self) -> Result<Settings, ConfigError> {
        web_settings("web_config", self.web_config.as_deref())
    }

    /// The metrics listener's, from `metrics_web_config`, else `web_config`.
    pub fn metrics_web(&self) -> Result<Settings, ConfigError> {
        match &self.metrics_web_config {
            Some(path) => web_settings("metrics_web_config", Some(path)),
            None => self.api_web(),
        }
    }

    /// Whether the API listens beyond loopback (an IPv4-mapped loopback
    /// address is loopback).
    pub fn api_is_remote(&self) -> bool {
        !self.listen.ip().to_canonical().is_loopback()
    }

    /// Each value on its own. A later layer replaces a value as a whole,
    /// so a bad one is wrong in its own layer; how values go together is
    /// checked once, on the final configuration ([`Config::apply_flags`]).
    fn validate_values(&self) -> Result<(), ConfigError> {
        let invalid = |key, message: &str| {
            Err(ConfigError::Invalid {
                key,
                message: message.into(),
            })
        };
        if self.reconcile_interval < Duration::from_secs(1) {
            return invalid("reconcile_interval", "must be at least 1s");
        }
        if self.ephemeral_interval < Duration::from_secs(1) {
            return invalid("ephemeral_interval", "must be at least 1s");
        }
        if !(1..=10_000_000).contains(&self.failure_log) {
            return invalid("failure_log", "must be between 1 and 10000000");
        }
        if self.port_label_cap > 65_535 {
            return invalid("port_label_cap", "must be at most 65535");
        }
        if !ring_size_ok(self.ring_size) {
            return invalid("ring_size", "must be a power of two of at least 4096");
        }
        if self.tracked_sockets == 0 {
            return invalid("tracked_sockets", "must be at least 1");
        }
        if !(1..=MAX_IN_FLIGHT_CALLS).contains(&self.in_flight_calls) {
            return invalid("in_flight_calls", "must be between 1 and 4194304");
        }
        // The daemon's working directory says nothing about the node.
        for (key, dir) in [
            ("pod_logs_dir", Some(&self.pod_logs_dir)),
            ("container_logs_dir", Some(&self.container_logs_dir)),
            ("docker_containers_dir", Some(&self.docker_containers_dir)),
            ("web_config", self.web_config.as_ref()),
            ("metrics_web_config", self.metrics_web_config.as_ref()),
        ] {
            if dir.is_some_and(|dir| !dir.is_absolute()) {
                return invalid(key, "must be an absolute path");
            }
        }
        Ok(())
    }

    /// The pipeline's configuration.
    pub fn watch(&self) -> WatchConfig {
        WatchConfig {
            capture: CaptureConfig {
                cgroup: self.cgroup.clone(),
                ring_bytes: self.ring_size,
                tracked_sockets: self.tracked_sockets,
                in_flight_calls: self.in_flight_calls,
                outcome: match self.outcome {
                    Outcome::Auto => OutcomeChoice::Auto,
                    Outcome::Exact => OutcomeChoice::Exact,
                    Outcome::Tracepoint => OutcomeChoice::Tracepoint,
                    Outcome::Inferred => OutcomeChoice::Inferred,
                },
                // The bind hooks probe; only `portwatch trace` can force one.
                ..CaptureConfig::default()
            },
            snapshot: SnapshotConfig {
                read_owners: true,
                read_options: self.read_existing_options,
                // The map keeps only listeners and bound sockets.
                holders_only: true,
            },
            reconcile_every: self.reconcile_interval,
            ephemeral_every: self.ephemeral_interval,
            failure_log: self.failure_log,
            port_label_cap: self.port_label_cap,
            expected: self.expected_listeners.clone(),
            workloads: WorkloadRoots {
                pod_logs: self.pod_logs_dir.clone(),
                container_logs: self.container_logs_dir.clone(),
                docker_containers: self.docker_containers_dir.clone(),
            },
        }
    }
}

/// `expected_listeners = ["443/tcp", "53/udp"]`, each entry checked.
fn expected_listeners<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Vec<ExpectedListener>, D::Error> {
    Vec::<String>::deserialize(deserializer)?
        .iter()
        .map(|text| text.parse().map_err(serde::de::Error::custom))
        .collect()
}

/// `reconcile_interval = "30s"` (humantime) or a number of seconds.
mod humantime_serde_compat {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, de::Error};

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Text(String),
        Seconds(u64),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        match Raw::deserialize(deserializer)? {
            Raw::Seconds(seconds) => Ok(Duration::from_secs(seconds)),
            Raw::Text(text) => humantime::parse_duration(&text).map_err(|err| {
                D::Error::custom(format!(
                    "{text:?} is not a duration ({err}); write it like \"30s\" or \"2m\""
                ))
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file with nothing on top, checked as the daemon checks it.
    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("test.toml"))?.apply_flags(&Overrides::default())
    }

    #[test]
    fn an_empty_file_is_the_defaults() {
        assert_eq!(parse("").unwrap(), Config::default());
        assert_eq!(Config::default().listen.to_string(), "127.0.0.1:7464");
    }

    #[test]
    fn an_api_beyond_loopback_needs_the_explicit_permission() {
        for loopback in [
            "127.0.0.1:1",
            "127.8.9.10:1",
            "[::1]:1",
            "[::ffff:127.0.0.1]:1",
        ] {
            let config = parse(&format!("listen = \"{loopback}\"")).unwrap();
            assert!(!config.api_is_remote(), "{loopback}");
        }
        for remote in [
            "0.0.0.0:7464",
            "192.0.2.1:7464",
            "[::]:7464",
            "[::ffff:192.0.2.1]:1",
        ] {
            let err = parse(&format!("listen = \"{remote}\""))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("listen")
                    && err.contains("web_config")
                    && err.contains("allow_unauthenticated_remote = true"),
                "{remote}: {err}"
            );
            let config = parse(&format!(
                "listen = \"{remote}\"\nallow_unauthenticated_remote = true"
            ))
            .unwrap();
            assert!(config.api_is_remote());
        }
        // The flag is checked with the rest: a remote --listen is refused too,
        // and the environment gives the permission as the file does.
        let remote = Overrides {
            listen: Some("0.0.0.0:7464".parse().unwrap()),
            ..Overrides::default()
        };
        assert!(Config::default().apply_flags(&remote).is_err());
        let allowed = Config::default()
            .apply_env(|name| {
                (name == "PORTWATCH_ALLOW_UNAUTHENTICATED_REMOTE").then(|| "true".to_owned())
            })
            .unwrap();
        assert!(allowed.apply_flags(&remote).is_ok());
        let bad = Config::default().apply_env(|name| {
            (name == "PORTWATCH_ALLOW_UNAUTHENTICATED_REMOTE").then(|| "yes".to_owned())
        });
        assert!(bad.is_err());
        // metrics_listen carries no process details: no permission needed.
        assert!(parse("metrics_listen = \"0.0.0.0:7465\"").is_ok());
    }

    #[test]
    fn an_api_beyond_loopback_serves_with_authentication_in_web_config() {
        let dir = std::env::temp_dir().join(format!("portwatch-config-web-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let users = dir.join("users.yml");
        let hash = bcrypt::hash("pw", 4).unwrap();
        std::fs::write(&users, format!("basic_auth_users:\n  alice: {hash}\n")).unwrap();
        let headers_only = dir.join("headers.yml");
        std::fs::write(
            &headers_only,
            "http_server_config:\n  headers:\n    X-Frame-Options: deny\n",
        )
        .unwrap();
        let broken = dir.join("broken.yml");
        std::fs::write(&broken, "basic_auth_users: [\n").unwrap();
        let remote = |web: &Path| {
            parse(&format!(
                "listen = \"0.0.0.0:7464\"\nweb_config = \"{}\"",
                web.display()
            ))
        };
        let config = remote(&users).unwrap();
        assert!(config.api_is_remote() && config.api_web().unwrap().authenticates());
        // Headers alone authenticate nobody.
        let err = remote(&headers_only).unwrap_err().to_string();
        assert!(err.contains("no authentication"), "{err}");
        // A broken web.yml is a configuration error naming the key and file.
        let err = remote(&broken).unwrap_err().to_string();
        assert!(
            err.starts_with("web_config: ") && err.contains("broken.yml"),
            "{err}"
        );
        let err = parse(&format!("metrics_web_config = \"{}\"", broken.display()))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("metrics_web_config: "), "{err}");
        // A relative path would depend on the daemon's working directory.
        for key in ["web_config", "metrics_web_config"] {
            let err = parse(&format!("{key} = \"web.yml\""))
                .unwrap_err()
                .to_string();
            assert_eq!(err, format!("{key}: must be an absolute path"));
        }
        // The metrics listener falls back to web_config.
        let config = parse(&format!("web_config = \"{}\"", users.display())).unwrap();
        assert!(config.metrics_web().unwrap().authenticates());
        let config = Config::default()
            .apply_env(|name| {
                (name == "PORTWATCH_METRICS_WEB_CONFIG").then(|| headers_only.display().to_string())
            })
            .unwrap()
            .apply_flags(&Overrides {
                web_config: Some(users.clone()),
                ..Overrides::default()
            })
            .unwrap();
        assert!(config.api_web().unwrap().authenticates());
        assert!(!config.metrics_web().unwrap().authenticates());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_default_port_is_outside_the_exporter_range() {
        let port = Config::default().listen.port();
        assert!(!(9100..=9999).contains(&port));
        assert!(Config::default().listen.ip().is_loopback());
    }

    #[test]
    fn every_key_parses() {
        let config = parse(
            r#"
            listen = "127.0.0.1:8080"
            allow_unauthenticated_remote = true
            metrics_listen = "0.0.0.0:8081"
            cgroup = "/sys/fs/cgroup/unified/system.slice"
            reconcile_interval = "1m 30s"
            failure_log = 50
            port_label_cap = 10
            ring_size = 8192
            tracked_sockets = 1
            in_flight_calls = 4194304
            outcome = "tracepoint"
            read_existing_options = false
            expected_listeners = ["22/tcp", "53/udp"]
            pod_logs_dir = "/srv/kubelet/pods"
            container_logs_dir = "/srv/kubelet/containers"
            docker_containers_dir = "/srv/docker/containers"
            "#,
        )
        .unwrap();
        assert_eq!(config.listen.port(), 8080);
        assert_eq!(config.metrics_listen.unwrap().port(), 8081);
        assert_eq!(config.reconcile_interval, Duration::from_secs(90));
        assert_eq!(config.outcome, Outcome::Tracepoint);
        let capture = config.watch().capture;
        assert_eq!(
            (
                capture.ring_bytes,
                capture.tracked_sockets,
                capture.in_flight_calls
            ),
            (8192, 1, 4_194_304)
        );
        assert!(!config.watch().snapshot.read_options);
        let expected: Vec<String> = config
            .watch()
            .expected
            .iter()
            .map(|e| e.to_string())
            .collect();
        assert_eq!(expected, ["22/tcp", "53/udp"]);
        assert_eq!(
            config.watch().workloads,
            WorkloadRoots {
                pod_logs: "/srv/kubelet/pods".into(),
                container_logs: "/srv/kubelet/containers".into(),
                docker_containers: "/srv/docker/containers".into(),
            }
        );
        assert_eq!(
            Config::default().watch().workloads,
            WorkloadRoots::default()
        );
        assert_eq!(
            parse("reconcile_interval = 5").unwrap().reconcile_interval,
            Duration::from_secs(5)
        );
    }

    #[test]
    fn a_parse_error_names_its_line_and_key() {
        let text = "# comment\nlisten = \"127.0.0.1:1\"\n\n  ring_size = 5000\n[table]\n";
        assert_eq!(where_in(text, 0), "line 1");
        assert_eq!(where_in(text, 12), "line 2, key listen");
        assert_eq!(
            where_in(text, text.find("5000").unwrap()),
            "line 4, key ring_size"
        );
        assert_eq!(where_in(text, text.find("[table]").unwrap()), "line 5");
        // Past the end, or inside a multi-byte character: no panic.
        assert_eq!(where_in(text, 10_000), "line 6");
        assert_eq!(where_in("é = 1", 1), "line 1, key é");
    }

    #[test]
    fn bad_files_say_what_is_wrong() {
        for (text, needle) in [
            ("listen = 7", "invalid type"),
            ("listen = \"nope\"", "invalid socket address"),
            ("lisen = \"127.0.0.1:1\"", "unknown field `lisen`"),
            ("ring_size = 5000", "power of two"),
            ("reconcile_interval = \"0s\"", "at least 1s"),
            (
                "reconcile_interval = \"soon\"",
                "line 1, key reconcile_interval: \"soon\" is not a duration",
            ),
            ("failure_log = 0", "between 1"),
            ("tracked_sockets = 0", "tracked_sockets: must be at least 1"),
            ("tracked_sockets = -1", "invalid value"),
            ("in_flight_calls = 0", "in_flight_calls: must be between 1"),
            (
                "in_flight_calls = 4194305",
                "in_flight_calls: must be between 1",
            ),
            ("outcome = \"kprobe\"", "unknown variant"),
            (
                "listen = \"127.0.0.1:1\"\nmetrics_listen = \"127.0.0.1:1\"",
                "must differ",
            ),
            ("[[[", "test.toml"),
            (
                "expected_listeners = [\"https\"]",
                "write it like \"443/tcp\"",
            ),
            ("expected_listeners = \"443/tcp\"", "invalid type"),
            (
                "pod_logs_dir = \"var/log/pods\"",
                "pod_logs_dir: must be an absolute path",
            ),
            (
                "container_logs_dir = \"\"",
                "container_logs_dir: must be an absolute path",
            ),
            ("docker_containers_dir = 1", "invalid type"),
        ] {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.contains(needle), "{text:?}: {err}");
        }
    }

    #[test]
    fn a_missing_file_is_the_defaults_unless_required() {
        let path = Path::new("/nonexistent/portwatch.toml");
        assert_eq!(Config::load(path, false).unwrap(), Config::default());
        assert!(matches!(
            Config::load(path, true),
            Err(ConfigError::Read { .. })
        ));
    }

    #[test]
    fn environment_then_flags_override_the_file() {
        let file = parse("listen = \"127.0.0.1:1000\"\nfailure_log = 5").unwrap();
        let env = |name: &str| match name {
            "PORTWATCH_LISTEN" => Some("127.0.0.1:2000".to_owned()),
            "PORTWATCH_RECONCILE_INTERVAL" => Some("10s".to_owned()),
            "PORTWATCH_EXPECTED_LISTENERS" => Some("22/tcp, 53/udp".to_owned()),
            "PORTWATCH_TRACKED_SOCKETS" => Some("64".to_owned()),
            "PORTWATCH_IN_FLIGHT_CALLS" => Some("8".to_owned()),
            "PORTWATCH_POD_LOGS_DIR" => Some("/fake/pods".to_owned()),
            "PORTWATCH_CONTAINER_LOGS_DIR" => Some("/fake/containers".to_owned()),
            "PORTWATCH_DOCKER_CONTAINERS_DIR" => Some("/fake/docker".to_owned()),
            _ => None,
        };
        let config = file.apply_env(env).unwrap();
        assert_eq!((config.tracked_sockets, config.in_flight_calls), (64, 8));
        assert_eq!(config.listen.port(), 2000);
        assert_eq!(config.failure_log, 5, "untouched by the environment");
        assert_eq!(config.reconcile_interval, Duration::from_secs(10));
        assert_eq!(config.expected_listeners.len(), 2);
        assert_eq!(
            (
                config.pod_logs_dir.to_str(),
                config.container_logs_dir.to_str(),
                config.docker_containers_dir.to_str()
            ),
            (
                Some("/fake/pods"),
                Some("/fake/containers"),
                Some("/fake/docker")
            )
        );
        let relative = |name: &str| (name == "PORTWATCH_POD_LOGS_DIR").then(|| "pods".to_owned());
        let err = Config::default().apply_env(relative).unwrap_err();
        assert!(err.to_string().contains("pod_logs_dir"), "{err}");
        let flags = Overrides {
            listen: Some("127.0.0.1:3000".parse().unwrap()),
            ..Overrides::default()
        };
        assert_eq!(config.apply_flags(&flags).unwrap().listen.port(), 3000);
    }

    #[test]
    fn how_values_go_together_is_checked_on_the_final_configuration() {
        // The file's metrics_listen is the default listen address, which
        // the flag moves away: a valid result.
        let file = Config::parse(
            "metrics_listen = \"127.0.0.1:7464\"",
            Path::new("test.toml"),
        )
        .unwrap();
        let flags = Overrides {
            listen: Some("127.0.0.1:7000".parse().unwrap()),
            ..Overrides::default()
        };
        assert!(file.clone().apply_flags(&flags).is_ok());
        let err = file.apply_flags(&Overrides::default()).unwrap_err();
        assert!(err.to_string().contains("must differ"), "{err}");
    }

    #[test]
    fn bad_environment_values_name_the_variable() {
        let env = |name: &str| (name == "PORTWATCH_RING_SIZE").then(|| "lots".to_owned());
        let err = Config::default().apply_env(env).unwrap_err().to_string();
        assert!(err.contains("PORTWATCH_RING_SIZE=\"lots\""), "{err}");
    }

    #[test]
    fn the_outcome_path_can_be_forced_from_the_environment() {
        let env = |value: &'static str| {
            move |name: &str| (name == "PORTWATCH_OUTCOME").then(|| value.to_owned())
        };
        let config = Config::default().apply_env(env("tracepoint")).unwrap();
        assert_eq!(config.outcome, Outcome::Tracepoint);
        let config = Config::default().apply_env(env("inferred")).unwrap();
        assert_eq!(config.outcome, Outcome::Inferred);
        assert_eq!(config.watch().capture.outcome, OutcomeChoice::Inferred);
        let config = Config::default().apply_env(env("exact")).unwrap();
        assert_eq!(config.watch().capture.outcome, OutcomeChoice::Exact);
        let err = Config::default().apply_env(env("fexit")).unwrap_err();
        assert!(err.to_string().contains("PORTWATCH_OUTCOME"), "{err}");
    }
}
