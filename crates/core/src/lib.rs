//! The pure core of blockmirror: types and decisions with no I/O.
//!
//! Everything here is deterministic and tested without sockets or disks.
//!
//! - [`geometry`]: a volume's size and block sizes, and the range checks every
//!   request goes through before it reaches a backend.
//! - [`rate`]: the token bucket that paces a resync copy.
//! - [`readpath`]: read balancing (seed 004 FIG. 9): a latency average per read path and the chooser.
//! - [`rangelock`]: range locks that keep overlapping writes in one order on disk and on the link.
//! - [`jobs`]: seed 002's device and job records: the mirror's bounded job table and link ids.
//! - [`link`]: the primary's link to one mirror as a state machine (phases, events, actions).
//! - [`meta`]: the durable volume metadata record (identity, generation ids, mirror label, clean flag).
//! - [`generation`]: generation ids and the decision that compares two sides' records
//!   (in sync, which side is ahead, split brain, unrelated).
//! - [`scheduler`]: the mirror's parallel apply scheduler: range groups, task mini-queues and
//!   overlap counters, so overlapping operations apply in arrival order and others in parallel.
//! - [`role`]: a volume's role on its node (primary, mirror, promoting, demoting, failed disk) as one
//!   state machine: events in, the driver's actions out.
//! - [`sequencer`]: releases a write's subtasks, prepared out of order, to the link in order.

pub mod activity;
pub mod bitmap;
pub mod cluster;
pub mod generation;
pub mod geometry;
pub mod jobs;
pub mod link;
pub mod meta;
pub mod rangelock;
pub mod rate;
pub mod readpath;
pub mod role;
pub mod scheduler;
pub mod sequencer;

pub use generation::{
    compare as compare_generations, resync_basis, Generations, Relation, ResyncBasis,
};
pub use geometry::{Geometry, RangeError};
pub use meta::{MetaError, MetaRecord, MirrorLabel, VerifyOutcome, VerifyRecord, VolumeMeta};
