//! Self-fencing: the node's lease clock, and each volume's fencing epoch.
//!
//! etcd revokes a lease once it has heard no keep-alive for its TTL,
//! counted on the etcd leader from when a keep-alive *arrived*. This node
//! counts from when it *sent* the keep-alive whose answer renewed the lease,
//! which is earlier, and trusts the lease for less than the TTL:
//!
//! ```text
//! trusted until = sent + ttl - (ttl / 20 + 200 ms)
//! ```
//!
//! The margin covers a clock-rate difference of up to 5% between this
//! node's monotonic clock and the leader's (real oscillators differ by
//! about 0.01%), and 200 ms for a reply decided just before the deadline to
//! reach the wire. So a primary stops acknowledging host writes before its
//! key can disappear anywhere else, and no mirror is promoted (its
//! transaction needs the key gone) while the old primary still acknowledges:
//! two primaries never both acknowledge writes.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// How long before its TTL a lease stops being trusted here.
pub fn margin(ttl: Duration) -> Duration {
    ttl / 20 + Duration::from_millis(200)
}

/// The node's lease as this node may rely on it.
#[derive(Debug)]
pub struct LeaseClock {
    origin: Instant,
    /// Nanoseconds after `origin` until which the lease is trusted (0: not).
    until: AtomicU64,
}

impl Default for LeaseClock {
    fn default() -> Self {
        Self::new()
    }
}

impl LeaseClock {
    pub fn new() -> Self {
        Self {
            origin: Instant::now(),
            until: AtomicU64::new(0),
        }
    }

    /// A keep-alive (or the grant) sent at `sent` was answered: the lease
    /// has `ttl` left from the leader's point of view.
    pub fn renewed(&self, sent: Instant, ttl: Duration) {
        let Some(trusted) = ttl.checked_sub(margin(ttl)) else {
            return;
        };
        let until = (sent + trusted).saturating_duration_since(self.origin);
        self.until
            .fetch_max(until.as_nanos().max(1) as u64, Ordering::SeqCst);
    }

    /// The lease is gone (revoked, expired, or replaced by a new one).
    pub fn expire(&self) {
        self.until.store(0, Ordering::SeqCst);
    }

    /// Whether the lease is trusted now.
    pub fn valid(&self) -> bool {
        self.valid_at(Instant::now())
    }

    pub fn valid_at(&self, now: Instant) -> bool {
        let until = self.until.load(Ordering::SeqCst);
        until != 0 && (now.saturating_duration_since(self.origin).as_nanos() as u64) < until
    }

    /// How long the lease stays trusted from now (zero: not trusted).
    pub fn remaining(&self) -> Duration {
        let until = Duration::from_nanos(self.until.load(Ordering::SeqCst));
        until.saturating_sub(self.origin.elapsed())
    }
}

/// One volume's fencing state. Without a cluster (static roles) it never
/// fences and every epoch is 0.
#[derive(Debug, Default)]
pub struct Fence {
    /// Cluster mode: the node's lease. Unset: static roles.
    lease: OnceLock<Arc<LeaseClock>>,
    /// The volume's epoch as this node knows it: the one it holds as
    /// primary, or the newest one seen as a mirror.
    epoch: AtomicU64,
    /// The epoch at which this node holds the volume's primary key (0: it
    /// does not).
    holds: AtomicU64,
    /// Cluster mode: the agent has read the coordinator once, so `epoch` is
    /// at least the current one (until then a mirror takes no link).
    synced: AtomicBool,
    changed: tokio::sync::Notify,
}

impl Fence {
    /// A fence for static roles: never fences.
    pub fn new() -> Self {
        Self::default()
    }

    /// Puts the volume under cluster mode with the node's lease.
    pub fn clustered(&self, lease: Arc<LeaseClock>) {
        let _ = self.lease.set(lease);
    }

    pub fn is_clustered(&self) -> bool {
        self.lease.get().is_some()
    }

    /// The volume's epoch as known here (0 without a cluster).
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    /// A newer epoch was seen; returns whether it raised the known one.
    pub fn raise(&self, epoch: u64) -> bool {
        let before = self.epoch.fetch_max(epoch, Ordering::SeqCst);
        if epoch > before {
            self.changed.notify_waiters();
        }
        epoch > before
    }

    /// This node took the primary key at `epoch`: writes may be acknowledged
    /// (while the lease is trusted).
    pub fn hold(&self, epoch: u64) {
        self.raise(epoch);
        self.holds.store(epoch, Ordering::SeqCst);
        self.changed.notify_waiters();
    }

    /// This node no longer holds the primary key.
    pub fn release(&self) {
        self.holds.store(0, Ordering::SeqCst);
        self.changed.notify_waiters();
    }

    /// The epoch this node holds the key at (0: none).
    pub fn holds(&self) -> u64 {
        self.holds.load(Ordering::SeqCst)
    }

    pub fn mark_synced(&self) {
        self.synced.store(true, Ordering::SeqCst);
    }

    /// Whether a mirror may judge a primary's epoch yet.
    pub fn synced(&self) -> bool {
        !self.is_clustered() || self.synced.load(Ordering::SeqCst)
    }

    /// Whether a host write may be acknowledged now: always without a
    /// cluster; in cluster mode only while this node holds the primary key
    /// under a trusted lease.
    pub fn may_ack(&self) -> bool {
        match self.lease.get() {
            None => true,
            Some(l) => self.holds.load(Ordering::SeqCst) != 0 && l.valid(),
        }
    }

    /// Waits, at most `max`, until [`Fence::may_ack`]; returns it.
    pub async fn wait_writable(&self, max: Duration) -> bool {
        if self.may_ack() {
            return true;
        }
        let deadline = tokio::time::Instant::now() + max;
        loop {
            let changed = self.changed.notified();
            if self.may_ack() {
                return true;
            }
            // The lease clock moves without a notification: look again
            // every 50 ms.
            let step = (tokio::time::Instant::now() + Duration::from_millis(50)).min(deadline);
            let _ = tokio::time::timeout_at(step, changed).await;
            if self.may_ack() {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_is_trusted_for_less_than_its_ttl_from_the_send() {
        let c = LeaseClock::new();
        assert!(!c.valid());
        let sent = Instant::now();
        let ttl = Duration::from_secs(5);
        c.renewed(sent, ttl);
        assert!(c.valid_at(sent));
        let edge = sent + ttl - margin(ttl);
        assert!(c.valid_at(edge - Duration::from_millis(1)));
        assert!(!c.valid_at(edge));
        assert!(!c.valid_at(sent + ttl));
        // An older answer arriving late never shortens it.
        c.renewed(sent - Duration::from_secs(1), ttl);
        assert!(c.valid_at(edge - Duration::from_millis(1)));
        c.expire();
        assert!(!c.valid_at(sent));
        assert_eq!(margin(ttl), Duration::from_millis(450));
    }

    #[test]
    fn static_fences_never_fence_and_clustered_ones_need_the_key_and_the_lease() {
        let f = Fence::new();
        assert!(f.may_ack() && f.synced());
        assert_eq!(f.epoch(), 0);
        let lease = Arc::new(LeaseClock::new());
        let f = Fence::new();
        f.clustered(lease.clone());
        assert!(!f.may_ack() && !f.synced());
        f.hold(3);
        assert!(!f.may_ack(), "no trusted lease yet");
        lease.renewed(Instant::now(), Duration::from_secs(5));
        assert!(f.may_ack());
        assert_eq!((f.epoch(), f.holds()), (3, 3));
        assert!(!f.raise(2));
        assert!(f.raise(4));
        f.release();
        assert!(!f.may_ack());
        lease.expire();
        f.hold(4);
        assert!(!f.may_ack());
    }

    #[tokio::test]
    async fn waiting_for_the_fence_returns_once_the_key_is_held() {
        let lease = Arc::new(LeaseClock::new());
        lease.renewed(Instant::now(), Duration::from_secs(5));
        let f = Arc::new(Fence::new());
        f.clustered(lease);
        assert!(!f.wait_writable(Duration::from_millis(60)).await);
        let f2 = f.clone();
        let w = tokio::spawn(async move { f2.wait_writable(Duration::from_secs(10)).await });
        f.hold(1);
        assert!(w.await.unwrap());
    }
}
