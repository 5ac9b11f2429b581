//! Replication: the primary's write path to its mirrors, and the mirror's
//! receiver.
//!
//! - [`locks`]: async range locks (overlapping writes in one order).
//! - [`group`]: consistency groups (suspend together, resume together).
//! - [`link`]: one mirror of a primary volume (connection, requests in
//!   flight, out-of-sync bitmap, catch-up, watchdog).
//! - [`receiver`]: the mirror side (listener, authentication, receive loop).
//! - [`apply`]: the mirror's parallel apply engine (seed 003).
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
//!
//! Generations ([`GenState`], `blockmirror_core::generation`): the first
//! write that some mirror will lack (its link is away, or fails under the
//! write) starts a new generation, durably, before the host is told the
//! write is done, but only when a mirror may hold the current generation as
//! "in sync" (it was announced to one since the last rotation, or the node
//! just started). So a mirror promoted during the outage, and written, is
//! seen as a split brain when the link comes back.

pub mod apply;
pub mod group;
pub mod link;
pub mod locks;
pub mod receiver;

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use blockmirror_nbd::Errno;
use tracing::{debug, info, warn};

use crate::config::FailurePolicy;
use crate::meta_file::{self, MetaCell, MetaFileError};
pub use link::{MirrorLink, MirrorOp};
pub use locks::RangeLocks;

/// A primary volume's generation record, shared by its write path and its
/// links.
pub struct GenState {
    pub volume: String,
    pub meta: Arc<MetaCell>,
    /// True when some mirror may hold the current generation as in sync, so
    /// the next write a mirror misses must start a new generation first.
    announced: AtomicBool,
    rotating: tokio::sync::Mutex<()>,
}

impl GenState {
    /// After a start nothing is known about what the mirrors hold: the first
    /// write a mirror misses starts a new generation.
    pub fn new(volume: &str, meta: Arc<MetaCell>) -> Self {
        Self {
            volume: volume.to_owned(),
            meta,
            announced: AtomicBool::new(true),
            rotating: tokio::sync::Mutex::new(()),
        }
    }

    /// A mirror acknowledged that it holds the current generation in sync.
    pub fn announced(&self) {
        self.announced.store(true, Ordering::SeqCst);
    }

    /// Starts a new generation if a mirror may hold the current one; returns
    /// once the new record is durable. Writes racing here wait for it.
    pub async fn diverge(&self) -> Result<(), MetaFileError> {
        if !self.announced.load(Ordering::SeqCst) {
            return Ok(());
        }
        let _one = self.rotating.lock().await;
        if !self.announced.load(Ordering::SeqCst) {
            return Ok(());
        }
        // Cleared before the store: an announcement racing with this
        // rotation (of the old id) sets it again, which is conservative.
        self.announced.store(false, Ordering::SeqCst);
        let meta = self.meta.clone();
        let stored = tokio::task::spawn_blocking(move || {
            let id = meta_file::new_generation_id()?;
            meta.update(|m| m.generations.rotate(id))
        })
        .await
        .unwrap_or_else(|e| {
            Err(MetaFileError::Io {
                path: self.meta.path().to_owned(),
                source: std::io::Error::other(e.to_string()),
            })
        });
        match stored {
            Ok(m) => {
                info!(volume = %self.volume, generations = %m.generations.to_display(),
                    "a mirror misses writes: new generation");
                Ok(())
            }
            Err(e) => {
                self.announced.store(true, Ordering::SeqCst);
                Err(e)
            }
        }
    }
}

/// The mirrors of one primary volume.
pub struct Replicator {
    pub links: Vec<Arc<MirrorLink>>,
    pub locks: RangeLocks,
    pub policy: FailurePolicy,
    pub gen: Arc<GenState>,
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
        for l in &self.links {
            l.note_host_write();
        }
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
        if prepared.iter().any(|p| matches!(p, link::Prepared::Marked)) {
            if let Err(e) = self.gen.diverge().await {
                warn!(error = %e, "write refused: a new generation could not be stored");
                for (l, p) in self.links.iter().zip(prepared) {
                    l.abandon(p, offset, len);
                    l.end(offset, len);
                }
                return Err(Errno::Io);
            }
        }
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
        let (mut result, missed) = self.wait_all(sent).await;
        if missed {
            // A mirror lacks this write: the host hears "done" only once a
            // new generation records that.
            if let Err(e) = self.gen.diverge().await {
                warn!(error = %e, "a new generation could not be stored");
                result = Err(Errno::Io);
            }
        }
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
                // Connected but filling (iterative initial sync): the mirror
                // holds no host data to flush yet.
                None if l.is_live() => link::Sent::Deferred,
                None => link::Sent::Marked,
            })
            .collect();
        let local = local().await;
        let (mirrors, _) = self.wait_all(sent).await;
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

    /// Waits for every mirror; also says whether one of them missed it.
    async fn wait_all(&self, sent: Vec<link::Sent>) -> (Result<(), Errno>, bool) {
        let mut result = Ok(());
        let mut missed = false;
        for (l, s) in self.links.iter().zip(sent) {
            if let Err(e) = l.wait(s).await {
                debug!(error = %e, "mirror did not take a request");
                missed = true;
                if self.policy == FailurePolicy::Fence {
                    result = Err(Errno::Io);
                }
            }
        }
        (result, missed)
    }
}
