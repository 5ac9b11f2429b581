//! blockmirror-testkit: tools that tests and operators use to check what a
//! mirror holds.
//!
//! The history checker answers one question: after a crash, does the mirror
//! hold every write that the primary promised it had?
//!
//! - [`history`]: the self-describing block format, the history log (each
//!   write and flush, when it was issued and when it was answered, in one
//!   logical clock), and the checker that compares a log with an image.
//! - [`nbd`]: a minimal blocking NBD client (fixed newstyle, NBD_OPT_GO,
//!   simple replies) built on `blockmirror_nbd::proto`.
//! - [`delay`]: a TCP proxy adding one-way delay and a bandwidth limit (a
//!   WAN stand-in: this kernel has no netem), with cut and heal.
//! - [`faultnet`]: a TCP proxy that injects seeded faults: a connection
//!   dropped after N bytes (mid-frame), a stall, one corrupted byte, a cut
//!   and heal.
//! - [`etcd`]: a throwaway N-member etcd cluster (child processes, own
//!   ports and data dirs, fast raft timing) with kill, restart, health
//!   waits, and keys, prefix lists and leases through the JSON gateway:
//!   the coordinator of cluster mode.
//! - [`netns`]: K network namespaces ("sites") on one bridge, each with its
//!   own address, with partition and heal of one site's link, and
//!   `in_ns`/`connect` to act from inside a site.
//! - [`rng`]: the seeded generator every random choice here comes from.
//! - [`soak`]: the `blockmirror-soak` run: two nodes, the history writer,
//!   one seeded fault per cycle, the checks after each.
//! - [`writer`]: the history writer: pipelined 4 KiB block writes with
//!   periodic FLUSHes against an NBD export, recorded as it goes.
//!
//! The `blockmirror-testkit` binary wraps these as `history write` and
//! `history check`; integration tests call the library in-process.

pub mod delay;
pub mod etcd;
pub mod faultnet;
pub mod history;
pub mod nbd;
pub mod netns;
pub mod rng;
pub mod soak;
pub mod writer;
