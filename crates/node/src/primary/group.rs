//! Consistency groups: volumes that must fail over together keep one point
//! in time at each mirror site (DESIGN.md guarantee 7; seed 004's "all
//! mirrors disassociated together").
//!
//! The links of a group's volumes to one site form a [`SiteGroup`]. Two rules:
//!
//! - **Suspend together.** When one member's link fails, every sibling link
//!   to that site is cut *before* the failed member's pending writes are
//!   answered to the host. A host that waits for write A before issuing a
//!   dependent write B therefore sees A complete only after B can no longer
//!   reach the site: the site never holds B without A.
//! - **Resume together.** After its handshake a member waits at a barrier
//!   until every member is connected; only then do all go live. While one
//!   member is away, the others stay suspended (their writes are recorded in
//!   their bitmaps), so the site is not fed a mix of old and new.
//! - **Order across volumes (async).** Within one link, a barrier before the
//!   first write sent after a host was answered keeps dependent writes in
//!   order. Across the group's links there is no common stream, so a write
//!   B on one volume issued after a write A on another was answered could
//!   be applied at the site before A. After any member's host answer, a
//!   member's next write is therefore preceded by a gate ([`SiteGroup::gate`],
//!   awaited by the link's sender task, never by the host): nothing behind
//!   it is sent until every sibling's writes sent so far are acknowledged by
//!   the site. The site then holds, at any instant, a state the group's
//!   volumes passed through together, so they can be promoted as one at that
//!   point. A gate the siblings already satisfy when the sender reaches it
//!   costs nothing; the sender waits only while the site is behind, and
//!   writes issued meanwhile join the next epoch. The snapshot is taken
//!   when the gate is queued: taken when the sender reaches it, two members'
//!   gates could each wait for writes queued behind the other's.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Weak};

use tokio::sync::watch;

/// What a group needs of its members (the links): to be cut when a
/// sibling fails. A trait, so that the group knows nothing of links.
pub trait GroupMember: Send + Sync {
    /// A sibling lost its mirror: cut this member's connection too,
    /// without propagating further.
    fn suspend_for_group(&self, reason: &str);
    /// The send sequence number of the last write this member sent (0:
    /// none yet).
    fn last_sent(&self) -> u64;
    /// The lowest send sequence number not yet acknowledged by the site
    /// (every lower one is), as it moves.
    fn acked_low(&self) -> watch::Receiver<u64>;
}

/// What a member's sender waits for before its next write: each sibling's
/// writes sent up to a point, acknowledged.
pub type Gate = Vec<(watch::Receiver<u64>, u64)>;

/// Whether `gate` asks for nothing more (every sibling acknowledged).
pub fn gate_open(gate: &Gate) -> bool {
    gate.iter().all(|(low, sent)| *low.borrow() > *sent)
}

/// The links of one consistency group to one mirror site.
pub struct SiteGroup {
    pub name: String,
    pub site: SocketAddr,
    members: Mutex<Vec<Weak<dyn GroupMember>>>,
    barrier: Mutex<Barrier>,
    /// Bumped whenever the barrier opens or is reset, to wake waiters.
    changed: watch::Sender<u64>,
    /// Host answers of async writes on any member, counted: a member whose
    /// last gate saw an older count gates its next write.
    answered: std::sync::atomic::AtomicU64,
}

#[derive(Default)]
struct Barrier {
    generation: u64,
    arrived: Vec<bool>,
    open: bool,
}

/// Why a member did not get through the barrier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BarrierReset;

impl SiteGroup {
    pub fn new(name: &str, site: SocketAddr) -> Arc<Self> {
        Arc::new(Self {
            name: name.to_owned(),
            site,
            members: Mutex::new(Vec::new()),
            barrier: Mutex::new(Barrier::default()),
            changed: watch::channel(0).0,
            answered: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// A host was answered for an async write on a member.
    pub fn answered(&self) {
        self.answered
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    /// The count of answers, for [`SiteGroup::gate`]'s caller to remember.
    pub fn answers(&self) -> u64 {
        self.answered.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// What member `idx` must wait for before its next write: every
    /// sibling's writes sent so far, where some are not acknowledged yet.
    /// Lock-free on the siblings (atomics and watch values), so it may be
    /// called under the member's own lock. A write answered before this
    /// call was sent before its answer, so it is covered.
    pub fn gate(&self, idx: usize) -> Gate {
        let members: Vec<Arc<dyn GroupMember>> = self
            .members
            .lock()
            .expect("poisoned")
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != idx)
            .filter_map(|(_, m)| m.upgrade())
            .collect();
        members
            .iter()
            .filter_map(|m| {
                let last = m.last_sent();
                let low = m.acked_low();
                let pending = *low.borrow() <= last;
                pending.then_some((low, last))
            })
            .collect()
    }

    /// Adds a member; returns its index.
    pub fn join(&self, member: Weak<dyn GroupMember>) -> usize {
        let mut m = self.members.lock().expect("poisoned");
        m.push(member);
        self.barrier.lock().expect("poisoned").arrived.push(false);
        m.len() - 1
    }

    pub fn size(&self) -> usize {
        self.members.lock().expect("poisoned").len()
    }

    /// Member `idx` is connected and ready: waits until every member is,
    /// then returns. Fails when the group is reset meanwhile (a member
    /// failed): the caller drops its connection and tries again.
    pub async fn arrive(&self, idx: usize) -> Result<(), BarrierReset> {
        let mut rx = self.changed.subscribe();
        let generation = {
            let mut b = self.barrier.lock().expect("poisoned");
            b.arrived[idx] = true;
            if !b.open && b.arrived.iter().all(|&a| a) {
                b.open = true;
                b.generation += 1;
                self.changed.send_replace(b.generation);
                return Ok(());
            }
            if b.open {
                // Opened already (this member reconnected alone after a
                // reset that did not involve it): nothing to wait for.
                return Ok(());
            }
            b.generation
        };
        loop {
            if rx.changed().await.is_err() {
                return Err(BarrierReset);
            }
            let b = self.barrier.lock().expect("poisoned");
            if b.generation != generation {
                return if b.open && b.arrived[idx] {
                    Ok(())
                } else {
                    Err(BarrierReset)
                };
            }
        }
    }

    /// Member `origin` failed: closes the barrier and cuts every other
    /// member's link. Returns once they are all cut.
    pub fn suspend(&self, origin: usize, reason: &str) {
        {
            let mut b = self.barrier.lock().expect("poisoned");
            let was_open = b.open;
            b.open = false;
            b.arrived.iter_mut().for_each(|a| *a = false);
            b.generation += 1;
            self.changed.send_replace(b.generation);
            if !was_open {
                // Not live: nothing was being sent to the site.
            }
        }
        let members: Vec<Arc<dyn GroupMember>> = self
            .members
            .lock()
            .expect("poisoned")
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        let why = format!("consistency group {}: {reason}", self.name);
        for (i, m) in members.iter().enumerate() {
            if i != origin {
                m.suspend_for_group(&why);
            }
        }
    }
}
