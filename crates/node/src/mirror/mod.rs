//! The mirror's side: what a primary's links and job connections reach.
//!
//! - [`receiver`]: the listener, authentication and the replication
//!   stream's receive loop (one primary per volume).
//! - [`apply`]: the parallel apply engine (seed 003).
//! - [`jobs`]: the job handler (seed 002: job table, verify hashes,
//!   remote reads) on job connections.

pub mod apply;
pub mod jobs;
pub mod receiver;
