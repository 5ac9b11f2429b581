//! Async range locks over [`RangeLockTable`]: a write waits only for the
//! overlapping writes before it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use blockmirror_core::rangelock::{Acquire, LockId, RangeLockTable};
use tokio::sync::oneshot;

#[derive(Default)]
struct Inner {
    table: RangeLockTable,
    waiters: HashMap<LockId, oneshot::Sender<()>>,
}

/// The range locks of one volume.
#[derive(Default, Clone)]
pub struct RangeLocks {
    inner: Arc<Mutex<Inner>>,
}

/// A held range; released on drop.
pub struct RangeGuard {
    locks: RangeLocks,
    id: LockId,
}

impl RangeLocks {
    pub fn new() -> Self {
        Self::default()
    }

    /// Locks `[offset, offset+len)`, waiting for overlapping holders.
    /// Cancel-safe: a waiter dropped before it is granted gives its place up.
    pub async fn lock(&self, offset: u64, len: u64) -> RangeGuard {
        let rx = {
            let mut g = self.inner.lock().expect("range lock poisoned");
            match g.table.acquire(offset, len) {
                Acquire::Granted(id) => {
                    return RangeGuard {
                        locks: self.clone(),
                        id,
                    }
                }
                Acquire::Queued(id) => {
                    let (tx, rx) = oneshot::channel();
                    g.waiters.insert(id, tx);
                    (id, rx)
                }
            }
        };
        // From here the guard owns the id: dropping it (even while still
        // waiting) releases or withdraws it.
        let guard = RangeGuard {
            locks: self.clone(),
            id: rx.0,
        };
        // The sender is dropped only after it was used to grant us.
        let _ = rx.1.await;
        guard
    }

    fn release(&self, id: LockId) {
        let mut g = self.inner.lock().expect("range lock poisoned");
        let mut todo = vec![id];
        while let Some(id) = todo.pop() {
            g.waiters.remove(&id);
            for granted in g.table.release(id) {
                let woken = g
                    .waiters
                    .remove(&granted)
                    .is_some_and(|tx| tx.send(()).is_ok());
                if !woken {
                    // Its waiter is gone: release on its behalf.
                    todo.push(granted);
                }
            }
        }
    }
}

impl Drop for RangeGuard {
    fn drop(&mut self) {
        self.locks.release(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn overlapping_waits_and_cancelled_waiters_give_way() {
        let l = RangeLocks::new();
        let a = l.lock(0, 100).await;
        // A waiter that is cancelled must not block the next one.
        let cancelled = tokio::time::timeout(Duration::from_millis(20), l.lock(50, 10)).await;
        assert!(cancelled.is_err());
        let l2 = l.clone();
        let b = tokio::spawn(async move { l2.lock(10, 10).await });
        tokio::task::yield_now().await;
        assert!(!b.is_finished());
        let _disjoint = l.lock(200, 10).await;
        drop(a);
        let _b = tokio::time::timeout(Duration::from_secs(5), b)
            .await
            .expect("granted after release")
            .unwrap();
    }
}
