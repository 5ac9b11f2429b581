//! The node daemon's own rooms: what runs a config file, serves the
//! operator and shows what happens.
//!
//! - [`config`]: the TOML node config, parsed into a validated [`config::NodeConfig`].
//! - [`node`]: starts everything for a config, changes roles, shuts down cleanly.
//! - [`role_driver`]: performs what a volume's role machine asks (promote, demote, discard).
//! - [`admin`]: the admin HTTP server (status, metrics, role and data commands).
//! - [`admin_auth`]: the admin API's bearer token and its HTTPS listener.
//! - [`status`]: the /status JSON model and its table rendering.
//! - [`events`]: state-change events (`GET /events`) and the charts' history, by sampling the status.
//! - [`page`]: the live status page (`GET /`), embedded HTML.
//! - [`metrics`]: lock-free counters and histograms, rendered as Prometheus text.

pub mod admin;
pub mod admin_auth;
pub mod config;
pub mod events;
pub mod metrics;
pub mod node;
pub mod page;
pub mod role_driver;
pub mod status;
