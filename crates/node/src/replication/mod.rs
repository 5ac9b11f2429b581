//! Replication: the primary's write path to its mirrors, and the mirror's
//! receiver.
//!
//! - [`locks`]: async range locks (overlapping writes in one order).
//! - [`group`]: consistency groups (suspend together, resume together).
//! - [`link`]: one mirror of a primary volume (connection, requests in
//!   flight, out-of-sync bitmap, catch-up, watchdog).
//! - [`receiver`]: the mirror side (listener, authentication, apply).
//! - [`jobs`]: the mirror's job handler (seed 002: job table, verify
//!   hashes, remote reads) on job connections.
//!
//! The write path ([`Replicator::replicate`]), seed 004's detour rebuilt:
//!
//! 1. With `on_mirror_failure = "fence"` and a mirror away, refuse (EIO)
//!    before anything is written: nothing lands that the mirror lacks.
//! 2. Lock the byte range (overlapping writes queue in arrival order), and
//!    make sure its extents are durably active in each mirror's activity log
//!    (after a crash, those extents are resynced).
//! 3. Create each mirror's request (registered, not sent); a mirror that is
//!    away has the region marked in its bitmap instead.
//! 4. Run the local I/O. If it fails, nothing is sent, every mirror marks the
//!    region (the local disk may now differ), and the host gets the error.
//! 5. Send every request, then release the range lock.
//! 6. Wait for every acknowledgement. A mirror that fails (error, closed
//!    link, or the watchdog's timeout) has the region marked and is
//!    degraded; the host's request succeeds ("degrade") or fails with EIO
//!    ("fence").

pub mod group;
pub mod jobs;
pub mod link;
pub mod locks;
pub mod receiver;

use std::future::Future;
use std::sync::Arc;

use blockmirror_nbd::Errno;
use tracing::{debug, warn};

use crate::config::FailurePolicy;
pub use link::{MirrorLink, MirrorOp};
pub use locks::RangeLocks;

/// The mirrors of one primary volume.
pub struct Replicator {
    pub links: Vec<Arc<MirrorLink>>,
    pub locks: RangeLocks,
    pub policy: FailurePolicy,
}

impl Replicator {
    /// Applies `op` locally with `local` and on every mirror, as described
    /// in the module docs.
    pub async fn replicate<F, Fut>(&self, op: MirrorOp, local: F) -> Result<(), Errno>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<(), Errno>>,
    {
        self.check_fence()?;
        let (offset, len) = op.range();
        let guard = self.locks.lock(offset, len).await;
        for (i, l) in self.links.iter().enumerate() {
            if let Err(e) = l.activate(offset, len).await {
                warn!(error = %e, "write refused: it could not be recorded for resync");
                for done in &self.links[..i] {
                    done.end(offset, len);
                }
                return Err(Errno::Io);
            }
        }
        let prepared: Vec<_> = self.links.iter().map(|l| l.prepare(offset, len)).collect();
        if let Err(e) = local().await {
            for (l, p) in self.links.iter().zip(prepared) {
                l.abandon(p, offset, len);
                l.end(offset, len);
            }
            return Err(e);
        }
        let sent: Vec<_> = self
            .links
            .iter()
            .zip(prepared)
            .map(|(l, p)| l.send(p, &op))
            .collect();
        drop(guard);
        let result = self.wait_all(sent).await;
        for l in &self.links {
            l.end(offset, len);
        }
        result
    }

    /// FLUSH: durable locally (by `local`) and on every live mirror.
    pub async fn flush<F, Fut>(&self, local: F) -> Result<(), Errno>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<(), Errno>>,
    {
        self.check_fence()?;
        // Only live links take the flush; an away mirror has nothing to
        // flush that its bitmap does not already cover.
        let sent: Vec<_> = self
            .links
            .iter()
            .map(|l| match l.prepare_flush() {
                Some(p) => l.send(p, &MirrorOp::Flush),
                None => link::Sent::Marked,
            })
            .collect();
        let local = local().await;
        let mirrors = self.wait_all(sent).await;
        local.and(mirrors)
    }

    /// With "fence", a mirror that is away refuses host writes up front:
    /// nothing lands that it lacks.
    fn check_fence(&self) -> Result<(), Errno> {
        if self.policy == FailurePolicy::Fence && self.links.iter().any(|l| !l.is_live()) {
            return Err(Errno::Io);
        }
        Ok(())
    }

    async fn wait_all(&self, sent: Vec<link::Sent>) -> Result<(), Errno> {
        let mut result = Ok(());
        for (l, s) in self.links.iter().zip(sent) {
            if let Err(e) = l.wait(s).await {
                debug!(error = %e, "mirror did not take a request");
                if self.policy == FailurePolicy::Fence {
                    result = Err(Errno::Io);
                }
            }
        }
        result
    }
}
