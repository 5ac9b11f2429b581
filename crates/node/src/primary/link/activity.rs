//! The link's activity log and the persistence of its out-of-sync bitmap:
//! what makes a crash of the primary recoverable by copying only the
//! extents that may differ (DRBD's activity log).

use super::*;
use blockmirror_core::activity::{ActivityError, Begin};
use tracing::warn;

/// The bitmap is stored this often when it changed.
pub(super) const BITMAP_STORE_INTERVAL: Duration = Duration::from_secs(5);

/// Why a write could not be protected by the activity log.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("volume {volume}, mirror {peer}: recording the write's extent failed: {reason}")]
    Store {
        volume: String,
        peer: String,
        reason: String,
    },
}

impl MirrorLink {
    /// Makes sure the extents of `[offset, offset+len)` are durably active
    /// before a write there starts (DRBD's activity log). Usually nothing to
    /// do; otherwise one small synchronous metadata write, shared by the
    /// writes batched with it. Every successful call is paired with
    /// [`MirrorLink::end`].
    pub async fn activate(&self, offset: u64, len: u64) -> Result<(), ActivateError> {
        loop {
            let notified = self.al_wake.notified();
            tokio::pin!(notified);
            // Decide under the lock; act (wait, store) after releasing it.
            enum Next {
                Ready,
                Wait,
                Commit(
                    blockmirror_core::activity::Transaction,
                    Option<(Bitmap, u64)>,
                ),
                StoreBitmap((Bitmap, u64)),
                Fail(String),
            }
            let next = {
                let mut sh = self.shared();
                match sh.al.begin(offset, len) {
                    Ok(Begin::Ready) => Next::Ready,
                    Ok(Begin::Wait(_)) => {
                        notified.as_mut().enable();
                        Next::Wait
                    }
                    Ok(Begin::NeedsCommit(tx)) => {
                        // Marks made while an evicted extent was active are
                        // covered only by the log, and so are writes there
                        // the mirror acknowledged but may not have flushed:
                        // store the bitmap (with those) first.
                        let ext = tx.extent_size();
                        let bitmap = (sh.bitmap.changes() != sh.stored_changes
                            || tx
                                .evicted()
                                .iter()
                                .any(|&e| sh.unflushed_touches(e * ext, ext)))
                        .then(|| sh.bitmap_to_store())
                        .filter(|_| !tx.evicted().is_empty());
                        Next::Commit(tx, bitmap)
                    }
                    Err(ActivityError::SpanTooLarge { .. }) => {
                        // A huge TRIM or zeroing: record it in the bitmap
                        // durably instead; the resync after a crash copies it.
                        sh.bitmap.mark(offset, len);
                        Next::StoreBitmap(sh.bitmap_to_store())
                    }
                    Err(e) => Next::Fail(e.to_string()),
                }
            };
            let (tx, bitmap) = match next {
                Next::Ready => return Ok(()),
                Next::Wait => {
                    notified.await;
                    continue;
                }
                Next::StoreBitmap((bm, changes)) => {
                    return self.store_bitmap_now(bm, changes).await
                }
                Next::Fail(reason) => return Err(self.store_error(reason)),
                Next::Commit(tx, bitmap) => (tx, bitmap),
            };
            let evicting = !tx.evicted().is_empty();
            let (store, local) = (self.store.clone(), self.local.clone());
            let changes = bitmap.as_ref().map(|(_, c)| *c);
            let joined = tokio::task::spawn_blocking(move || {
                let r = (|| {
                    if evicting {
                        local.flush().map_err(|e| e.to_string())?;
                    }
                    if let Some((bm, _)) = &bitmap {
                        store.store_bitmap(bm).map_err(|e| e.to_string())?;
                    }
                    store.commit_activity(&tx).map_err(|e| e.to_string())
                })();
                (tx, r)
            })
            .await;
            let mut sh = self.shared();
            let outcome = match joined {
                Ok((tx, Ok(()))) => {
                    if let Some(c) = changes {
                        sh.stored_changes = sh.stored_changes.max(c);
                    }
                    sh.al
                        .committed(tx)
                        .map_err(|e| self.store_error(e.to_string()))
                }
                Ok((tx, Err(reason))) => {
                    warn!(volume = %self.volume, peer = %self.peer, %reason, "activity log commit failed");
                    let _ = sh.al.abort(tx);
                    Err(self.store_error(reason))
                }
                Err(join) => Err(self.store_error(join.to_string())),
            };
            drop(sh);
            self.al_wake.notify_waiters();
            return outcome;
        }
    }

    /// The write that [`MirrorLink::activate`] let through is complete here:
    /// acknowledged by the mirror, or recorded in the bitmap.
    pub fn end(&self, offset: u64, len: u64) {
        let freed = {
            let mut sh = self.shared();
            match sh.al.end(offset, len) {
                Ok(freed) => freed,
                Err(ActivityError::SpanTooLarge { .. }) => false,
                Err(e) => {
                    warn!(volume = %self.volume, peer = %self.peer, error = %e, "activity log end");
                    false
                }
            }
        };
        if freed {
            self.al_wake.notify_waiters();
        }
    }

    pub(super) fn store_error(&self, reason: String) -> ActivateError {
        ActivateError::Store {
            volume: self.volume.clone(),
            peer: self.peer.clone(),
            reason,
        }
    }

    /// Stores `bm` (what [`Shared::bitmap_to_store`] made of the bitmap at
    /// change count `changes`).
    pub(super) async fn store_bitmap_now(
        &self,
        bm: Bitmap,
        changes: u64,
    ) -> Result<(), ActivateError> {
        let store = self.store.clone();
        let r =
            tokio::task::spawn_blocking(move || store.store_bitmap(&bm).map_err(|e| e.to_string()))
                .await
                .unwrap_or_else(|e| Err(e.to_string()));
        match r {
            Ok(()) => {
                let mut sh = self.shared();
                sh.stored_changes = sh.stored_changes.max(changes);
                Ok(())
            }
            Err(reason) => Err(self.store_error(reason)),
        }
    }

    /// Stores the bitmap if the stored one may lack something: it changed
    /// since, or the mirror acknowledged writes it may not have flushed.
    pub async fn persist_bitmap(&self) -> Result<(), ActivateError> {
        let (bm, changes) = {
            let sh = self.shared();
            if !sh.store_due() {
                return Ok(());
            }
            sh.bitmap_to_store()
        };
        self.store_bitmap_now(bm, changes).await
    }

    /// At a clean shutdown, after every write ended: stores the bitmap and
    /// a clean record, so the next start needs no crash recovery.
    pub fn close_clean(&self) -> Result<(), ActivateError> {
        let sh = self.shared();
        if !sh.al.is_idle() {
            return Err(self.store_error("writes still in flight at shutdown".into()));
        }
        let (bm, _) = sh.bitmap_to_store();
        drop(sh);
        self.store
            .mark_clean_shutdown(&bm)
            .map_err(|e| self.store_error(e.to_string()))
    }

    /// Stores the bitmap every few seconds when it changed, until `shutdown`.
    pub async fn persist_periodically(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(BITMAP_STORE_INTERVAL) => {}
            }
            if let Err(e) = self.persist_bitmap().await {
                warn!(error = %e, "storing the out-of-sync bitmap failed");
            }
        }
    }
}
