//! The blockmirror node: runs the volumes of one config file.
//!
//! - [`config`]: the TOML node config, parsed into a validated [`config::NodeConfig`].
//! - [`volume`]: a volume (backend + geometry + metrics) exported over NBD.
//! - [`meta_file`]: crash-safe storage of each volume's metadata record.
//! - [`metrics`]: lock-free counters and histograms, rendered as Prometheus text.
//! - [`status`]: the /status JSON model and its table rendering.
//! - [`admin`]: the admin HTTP server (GET /status, GET /metrics).
//! - [`replication`]: the primary's write path to its mirrors, and the mirror's receiver.
//! - [`node`]: starts everything for a config and shuts it down cleanly.
//! - [`verify`]: online verify of a primary against its mirrors (seed 002).
//! - [`reads`]: host reads of a primary with mirrors: read balancing and remote reads.
//! - [`local_disk`]: the local backend with its failed state (`serve_from_mirror`) and test faults.

pub mod admin;
pub mod config;
pub mod job_conn;
pub mod local_disk;
pub mod meta_file;
pub mod metrics;
pub mod node;
pub mod oos_store;
pub mod reads;
pub mod replication;
pub mod status;
pub mod verify;
pub mod volume;
