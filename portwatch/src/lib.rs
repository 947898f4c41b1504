//! portwatch: who is bound to a port, who tried to bind and failed, and why.
//!
//! - [`api`]: the HTTP API: ports, failures, the predictor, live events, health;
//! - [`capture`]: loads and attaches the kernel programs, streams raw records;
//! - [`ephemeral`]: how much of each namespace's ephemeral port range is left, per destination (pure);
//! - [`event`]: decodes raw records into typed events (pure, no I/O);
//! - [`explain`]: why a port's listeners coexist, flags, who `localhost` reaches (pure);
//! - [`failures`]: failed binds with what blocked them (pure);
//! - [`state`]: what the daemon knows: map, failures, counters (pure);
//! - [`health`]: what the daemon cannot see (a failing sock_diag listing), said alike in the log, `/readyz`, STATUS= and metrics (pure);
//! - [`watch`]: the live pipeline keeping the map exact;
//! - [`map`]: the live per-port map of listeners (pure);
//! - [`metrics`]: Prometheus metrics, read from the shared state at scrape;
//! - [`snapshot`]: every socket holding a port in every netns, with its owners;
//! - [`socket`]: what portwatch knows about one socket holding a port (pure);
//! - [`rules`]: the kernel's port-sharing rules: would a bind succeed, who blocks it, why (pure);
//! - [`kernel_probe`]: what this kernel's rules do where kernels differ, tried at start;
//! - [`trace`]: the `portwatch trace` output, filters and formatting (pure);
//! - [`cli`]: command-line arguments;
//! - [`client`]: the CLI client of a running daemon;
//! - [`daemon`]: `portwatch daemon`: pipeline, HTTP API, metrics;
//! - [`service`]: systemd readiness, status and watchdog (sd_notify);
//! - [`config`]: the daemon's configuration file, environment and flags;
//! - [`app`]: what each command does, and the exit status that says whether a restart helps.

pub mod api;
pub mod app;
pub mod capture;
pub mod cli;
pub mod client;
pub mod config;
pub mod daemon;
pub mod ephemeral;
pub mod event;
pub mod explain;
pub mod failures;
pub mod health;
pub mod kernel_probe;
pub mod map;
pub mod metrics;
pub mod rules;
pub mod service;
pub mod snapshot;
pub mod socket;
pub mod state;
pub mod trace;
pub mod watch;
pub mod web;
