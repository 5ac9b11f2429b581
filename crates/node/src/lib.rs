//! The blockmirror node: runs the volumes of one config file.
//!
//! The folders are the picture of the system:
//!
//! - [`volume`]: a volume (backend, geometry, metrics) exported over NBD, its
//!   metadata record on disk, and its local disk with a failed state.
//! - [`primary`]: the primary's side: the write path, each mirror's link,
//!   the pipeline, consistency groups, verify and remote reads.
//! - [`mirror`]: the mirror's side: the receiver, the apply engine and the
//!   job handler.
//! - [`daemon`]: config, admin HTTP API, status, metrics, node start and stop.

pub mod cluster;
pub mod daemon;
pub mod mirror;
pub mod primary;
pub mod tls;
pub mod volume;
