//! portwatch: who is bound to a port, who tried to bind and failed, and why.
//!
//! - [`capture`]: loads and attaches the kernel programs, streams raw records;
//! - [`event`]: decodes raw records into typed events (pure, no I/O);
//! - [`map`]: the live per-port map of listeners (pure);
//! - [`socket`]: what portwatch knows about one socket holding a port (pure);
//! - [`trace`]: the `portwatch trace` output, filters and formatting (pure);
//! - [`cli`]: command-line arguments;
//! - [`app`]: what each command does.

pub mod app;
pub mod capture;
pub mod cli;
pub mod event;
pub mod map;
pub mod socket;
pub mod trace;
