//! The real `portwatch daemon` binary, started for a test and stopped on
//! drop, with helpers to read its HTTP API the way a user would.

use std::{
    io::Read,
    net::TcpListener,
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use portwatch::socket::Protocol;
use serde_json::Value;

use super::{
    CgroupGuard, DEADLINE, NetnsGuard, TempDir,
    churn::{Listing, difference, ss_listeners},
    portwatch_command, until,
};

/// The metric sample of TCP/IPv4 binds refused with EADDRINUSE.
pub const EADDRINUSE_TCP4: &str =
    "portwatch_bind_failures_total{errno=\"EADDRINUSE\",family=\"ipv4\",protocol=\"tcp\"}";

/// A running daemon, stopped with SIGTERM on drop.
pub struct Daemon {
    pub child: Child,
    pub server: String,
    /// The API's port on 127.0.0.1.
    pub port: u16,
    /// Holds the configuration file.
    _dir: TempDir,
}

impl Daemon {
    /// The daemon watching `cgroup`, with reconciliation effectively off.
    pub fn start(cgroup: &CgroupGuard) -> Daemon {
        Daemon::start_with(cgroup, "reconcile_interval = \"1h\"\n", &[])
    }

    /// The daemon watching `cgroup` with `config` as its file, started
    /// through `wrapper` (a command and its arguments, such as `setpriv ...`)
    /// when one is given; returns once `/readyz` answers 200. An `outcome`
    /// in `config` holds even where `PORTWATCH_OUTCOME` is set.
    pub fn start_with(cgroup: &CgroupGuard, config: &str, wrapper: &[&str]) -> Daemon {
        Daemon::try_start_with(cgroup, config, wrapper)
            .unwrap_or_else(|(code, stderr)| panic!("the daemon exited with {code:?}: {stderr}"))
    }

    /// [`Daemon::start_with`], or the exit code and stderr of a daemon that
    /// stopped before it became ready.
    pub fn try_start_with(
        cgroup: &CgroupGuard,
        config: &str,
        wrapper: &[&str],
    ) -> Result<Daemon, (Option<i32>, String)> {
        Daemon::try_start_until(cgroup, config, wrapper, "http", Daemon::settled)
    }

    /// [`Daemon::try_start_with`] for an API served over `scheme`, ready
    /// once `ready` holds (a TLS or authenticated API needs its own probe).
    pub fn try_start_until(
        cgroup: &CgroupGuard,
        config: &str,
        wrapper: &[&str],
        scheme: &str,
        ready: impl Fn(&Daemon) -> bool,
    ) -> Result<Daemon, (Option<i32>, String)> {
        // A free loopback port (released just before the daemon takes it).
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = TempDir::new("daemon");
        let config_path = dir.file("portwatch.toml", config);
        let mut command = portwatch_command(wrapper);
        if config
            .lines()
            .any(|line| line.trim_start().starts_with("outcome"))
        {
            // The test chose the outcome path; one the environment forces on
            // every daemon (a VM run with the tracepoints forced) would
            // override the file.
            command.env_remove("PORTWATCH_OUTCOME");
        }
        let child = command
            .arg("daemon")
            .arg("--config")
            .arg(&config_path)
            .arg("--cgroup")
            .arg(&cgroup.path)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the daemon");
        let mut daemon = Daemon {
            child,
            server: format!("{scheme}://127.0.0.1:{port}"),
            port,
            _dir: dir,
        };
        let deadline = Instant::now() + *DEADLINE;
        // Ready, and done reading the owners of the sockets it found at
        // start-up, which most tests look at first.
        while !ready(&daemon) {
            if let Ok(Some(_)) = daemon.child.try_wait() {
                return Err(daemon.stop());
            }
            assert!(Instant::now() < deadline, "the daemon did not become ready");
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(daemon)
    }

    pub fn agent() -> ureq::Agent {
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into()
    }

    /// `/readyz` answers 200 with no `pending:` line.
    fn settled(&self) -> bool {
        let Ok(mut response) = Daemon::agent()
            .get(&format!("{}/readyz", self.server))
            .call()
        else {
            return false;
        };
        let body = response.body_mut().read_to_string().unwrap_or_default();
        response.status() == 200 && !body.contains("\npending:")
    }

    pub fn status(&self, path: &str) -> Option<u16> {
        Daemon::agent()
            .get(&format!("{}{path}", self.server))
            .call()
            .ok()
            .map(|r| r.status().as_u16())
    }

    pub fn text(&self, path: &str) -> (u16, String) {
        let mut response = Daemon::agent()
            .get(&format!("{}{path}", self.server))
            .call()
            .unwrap();
        let status = response.status().as_u16();
        (status, response.body_mut().read_to_string().unwrap())
    }

    pub fn json(&self, path: &str) -> Value {
        let (status, body) = self.text(path);
        assert_eq!(status, 200, "{path}: {body}");
        serde_json::from_str(&body).unwrap()
    }

    /// Polls `path` until `done` holds for its JSON.
    pub fn json_until(&self, path: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        until(what, || {
            let value = self.json(path);
            if done(&value) { Ok(value) } else { Err(value) }
        })
    }

    /// The listeners `/ports` shows in the namespace with cookie `netns`,
    /// as `/ports` has them, every page of it (following `next`).
    pub fn listeners(&self, netns: u64) -> Vec<Value> {
        let mut listeners = Vec::new();
        let mut next = Some(format!("/ports?netns={netns}"));
        while let Some(path) = next {
            let page = self.json(&path);
            listeners.extend(
                page["ports"]
                    .as_array()
                    .unwrap_or_else(|| panic!("no ports in {page}"))
                    .iter()
                    .flat_map(|port| port["listeners"].as_array().cloned().unwrap_or_default()),
            );
            next = page["next"].as_str().map(str::to_owned);
        }
        listeners
    }

    /// [`Daemon::listeners`] in `ss` terms: (protocol, address, port), sorted.
    pub fn listing(&self, netns: u64) -> Vec<Listing> {
        let mut listing: Vec<Listing> = self
            .listeners(netns)
            .iter()
            .map(|l| {
                let protocol = l["protocol"].as_str().and_then(Protocol::from_name);
                let address = l["address"].as_str().and_then(|a| a.parse().ok());
                let port = l["port"].as_u64().and_then(|p| u16::try_from(p).ok());
                match (protocol, address, port) {
                    (Some(protocol), Some(address), Some(port)) => (protocol, address, port),
                    _ => panic!("a listener without protocol, address or port: {l}"),
                }
            })
            .collect();
        listing.sort_unstable();
        listing
    }

    /// Waits until the daemon lists exactly what `ss -tuln` lists in
    /// `netns` (a multiset); that listing. Panics with the difference, and
    /// `context` (such as a seed), at the deadline.
    pub fn until_listing_is_ss(&self, netns: &NetnsGuard, context: &str) -> Vec<Listing> {
        let cookie = netns.cookie();
        let what = format!(
            "the daemon's listing in {} to be ss -tuln's ({context})",
            netns.name
        );
        until(&what, || {
            let expected = ss_listeners(netns);
            let got = self.listing(cookie);
            if got == expected {
                Ok(got)
            } else {
                Err(format!("it differs:\n{}", difference(&got, &expected)))
            }
        })
    }

    /// Polls the metrics text until `done` holds for it; that text.
    pub fn metrics_until(&self, what: &str, done: impl Fn(&str) -> bool) -> String {
        until(what, || {
            let (status, metrics) = self.text("/metrics");
            assert_eq!(status, 200, "/metrics: {metrics}");
            if done(&metrics) {
                Ok(metrics)
            } else {
                Err(format!("metrics:\n{metrics}"))
            }
        })
    }

    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_portwatch"))
            .args(args)
            .args(["--server", &self.server])
            .output()
            .expect("run the CLI")
    }

    /// SIGTERM, then the exit status and stderr.
    pub fn stop(mut self) -> (Option<i32>, String) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait().expect("wait for the daemon");
        let mut stderr = String::new();
        if let Some(mut pipe) = self.child.stderr.take() {
            let _ = pipe.read_to_string(&mut stderr);
        }
        (status.code(), stderr)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The value of one sample line of the metrics text, 0 if absent.
pub fn sample(metrics: &str, name_and_labels: &str) -> f64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(name_and_labels)?.trim().parse().ok())
        .unwrap_or(0.0)
}
