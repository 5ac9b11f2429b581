//! A primary volume's generation record as its write path and links see
//! it: when a write some mirror misses must start a new generation
//! (`blockmirror_core::generation`), the start gate that holds host writes
//! until every link met its peer once, and telling in-sync mirrors of a
//! new generation.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tracing::{info, warn};

use crate::volume::meta_file::{self, MetaCell, MetaFileError};

/// What the generation record needs of a link. A trait, so that this file
/// knows nothing of links.
pub trait Reannounce: Send + Sync {
    /// The generation is about to change: the mirror holds the new one only
    /// once it is told.
    fn forget_current(&self);
    /// A rotation failed: the mirror may still hold the current generation.
    fn assume_current(&self);
    /// A new generation was stored: a mirror live and in sync holds every
    /// write, so it is told the new record.
    fn reannounce(self: Arc<Self>);
}

/// Cluster mode: publishes the volume's current generation in the
/// coordinator (`crate::cluster`).
pub trait Publish: Send + Sync {
    fn publish(&self) -> crate::cluster::BoxFut<'_, Result<(), String>>;
}

/// A primary volume's generation record, shared by its write path and its
/// links.
pub struct GenState {
    /// The volume's fencing state (epoch, and in cluster mode whether writes
    /// may be acknowledged).
    pub fence: Arc<crate::cluster::fence::Fence>,
    /// Cluster mode: where a new generation is published before a write
    /// under it is acknowledged.
    publisher: std::sync::OnceLock<Arc<dyn Publish>>,
    /// A generation was stored that the coordinator has not been told of.
    unpublished: AtomicBool,
    /// Rotations under way: a write that finds no mirror holding the
    /// current generation (they forget it as a rotation starts) still waits
    /// for the rotation to be durable before it is answered.
    in_progress: std::sync::atomic::AtomicUsize,
    pub volume: String,
    pub meta: Arc<MetaCell>,
    rotating: tokio::sync::Mutex<()>,
    /// The volume's links: after a rotation, the ones live and in sync are
    /// told the new generation, so a later promotion of one of them is
    /// seen as what it is (it holds every write), not as a split brain.
    links: std::sync::OnceLock<Vec<std::sync::Weak<dyn Reannounce>>>,
    /// The start gate: host writes wait until every link has met its peer
    /// once (`link_judged`) or `start_wait` has passed since the start.
    gate_open: AtomicBool,
    gate: tokio::sync::Notify,
    judged: std::sync::atomic::AtomicUsize,
    born: std::time::Instant,
    start_wait: std::sync::atomic::AtomicU64,
}

impl GenState {
    /// After a start nothing is known about what the mirrors hold: the first
    /// write a mirror misses starts a new generation.
    pub fn new(volume: &str, meta: Arc<MetaCell>) -> Self {
        Self {
            fence: Arc::new(crate::cluster::fence::Fence::new()),
            publisher: std::sync::OnceLock::new(),
            unpublished: AtomicBool::new(false),
            in_progress: std::sync::atomic::AtomicUsize::new(0),
            volume: volume.to_owned(),
            meta,
            rotating: tokio::sync::Mutex::new(()),
            links: std::sync::OnceLock::new(),
            gate_open: AtomicBool::new(true),
            gate: tokio::sync::Notify::new(),
            judged: std::sync::atomic::AtomicUsize::new(0),
            born: std::time::Instant::now(),
            start_wait: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Shares `fence` (the volume's) with the write path and the links.
    pub fn with_fence(mut self, fence: Arc<crate::cluster::fence::Fence>) -> Self {
        self.fence = fence;
        self
    }

    /// Cluster mode: new generations are published through `p`.
    pub fn set_publisher(&self, p: Arc<dyn Publish>) {
        let _ = self.publisher.set(p);
    }

    /// The coordinator holds `generation` now.
    pub fn published(&self, generation: u64) {
        if self.meta.get().generations.current == generation
            && self.in_progress.load(Ordering::SeqCst) == 0
        {
            self.unpublished.store(false, Ordering::SeqCst);
        }
    }

    /// In cluster mode, returns once the coordinator holds the current
    /// generation (publishing it if needed): a write under a generation the
    /// coordinator does not know is never acknowledged, so a mirror that
    /// holds the published one and is listed in step holds every
    /// acknowledged write. One atomic load when nothing is pending.
    /// Whether [`GenState::ensure_published`] has anything to do: a new
    /// generation not yet published, in cluster mode. One atomic load.
    #[inline]
    pub fn publish_pending(&self) -> bool {
        self.unpublished.load(Ordering::SeqCst) && self.publisher.get().is_some()
    }

    pub async fn ensure_published(&self) -> Result<(), String> {
        if !self.unpublished.load(Ordering::SeqCst) {
            return Ok(());
        }
        let Some(p) = self.publisher.get() else {
            return Ok(());
        };
        let _one = self.rotating.lock().await;
        if !self.unpublished.load(Ordering::SeqCst) {
            return Ok(());
        }
        p.publish().await
    }

    /// Host writes wait at start for the links, at most `d` (`start_wait`).
    /// Called once, before the node serves.
    pub fn hold_writes_at_start(&self, d: std::time::Duration) {
        self.start_wait
            .store(d.as_millis() as u64, Ordering::SeqCst);
        self.gate_open.store(d.is_zero(), Ordering::SeqCst);
    }

    /// A link met its peer (or failed to reach it) for the first time.
    pub fn link_judged(&self) {
        let n = self.judged.fetch_add(1, Ordering::SeqCst) + 1;
        if n >= self.links.get().map_or(0, Vec::len) {
            self.open_gate();
        }
    }

    /// Host writes no longer wait (every link reported, the wait is over,
    /// or the volume was promoted here).
    pub fn open_gate(&self) {
        if !self.gate_open.swap(true, Ordering::SeqCst) {
            self.gate.notify_waiters();
        }
    }

    /// Waits, on host writes just after a start, until every link has met
    /// its peer once, at most `start_wait` after the start. Costs one
    /// atomic load afterwards.
    pub async fn wait_start(&self) {
        if self.gate_open.load(Ordering::SeqCst) {
            return;
        }
        let deadline = tokio::time::Instant::from_std(
            self.born + std::time::Duration::from_millis(self.start_wait.load(Ordering::SeqCst)),
        );
        loop {
            let woken = self.gate.notified();
            if self.gate_open.load(Ordering::SeqCst) {
                return;
            }
            if tokio::time::timeout_at(deadline, woken).await.is_err() {
                warn!(volume = %self.volume,
                    "start_wait passed before every mirror link met its peer: host writes go on");
                self.open_gate();
                return;
            }
        }
    }

    /// Starts a new generation if `needed()` (a mirror that missed a write
    /// may hold the current generation as in sync); returns once the new
    /// record is durable. Writes racing here wait for it, and ask again:
    /// the first one's rotation usually settles theirs.
    ///
    /// Every link forgets that its mirror may hold the current generation
    /// *before* the new one is stored, and a link sets it again only after
    /// reading the record it announces: so a mirror told the new generation
    /// is never taken as lacking it, and one told the old one while this
    /// rotation ran is taken as holding the new one (an extra rotation
    /// later, never a missed one).
    pub async fn diverge(&self, needed: impl Fn() -> bool) -> Result<(), MetaFileError> {
        // Not needed, and no rotation under way (one under way makes every
        // link forget the current generation before it is durable: a write
        // that sees that must wait for it, not take it as done).
        if !needed() && self.in_progress.load(Ordering::SeqCst) == 0 {
            return Ok(());
        }
        let _one = self.rotating.lock().await;
        if !needed() {
            return Ok(());
        }
        // Cluster mode: a node that may not acknowledge writes (its lease
        // lapsed, it holds no key) starts no generation; the write fails
        // as it would have at its answer. A generation started here that
        // nobody learns of would look like a split brain to the next
        // primary.
        if self.fence.is_clustered() && !self.fence.may_ack() {
            return Err(MetaFileError::Io {
                path: self.meta.path().to_owned(),
                source: std::io::Error::other(
                    "cluster mode: not holding the primary key under a live lease; no new generation",
                ),
            });
        }
        self.in_progress.fetch_add(1, Ordering::SeqCst);
        if self.publisher.get().is_some() {
            // Before any link forgets the current generation: a write that
            // finds them forgotten finds this set too.
            self.unpublished.store(true, Ordering::SeqCst);
        }
        let links: Vec<Arc<dyn Reannounce>> = self
            .links
            .get()
            .into_iter()
            .flatten()
            .filter_map(std::sync::Weak::upgrade)
            .collect();
        for l in &links {
            l.forget_current();
        }
        let meta = self.meta.clone();
        let stored = tokio::task::spawn_blocking(move || {
            let id = meta_file::new_generation_id()?;
            meta.update(|m| {
                m.generations.rotate(id);
                m.primary_at = m.generations.current;
            })
        })
        .await
        .unwrap_or_else(|e| {
            Err(MetaFileError::Io {
                path: self.meta.path().to_owned(),
                source: std::io::Error::other(e.to_string()),
            })
        });
        self.in_progress.fetch_sub(1, Ordering::SeqCst);
        match stored {
            Ok(m) => {
                info!(volume = %self.volume, generations = %m.generations.to_display(),
                    "a mirror misses writes: new generation");
                for l in links {
                    l.reannounce();
                }
                Ok(())
            }
            Err(e) => {
                // Nothing rotated: whoever may have held the generation
                // still may.
                for l in &links {
                    l.assume_current();
                }
                Err(e)
            }
        }
    }

    /// The volume's links, once, before it serves: the start gate counts
    /// them, a rotation tells them.
    pub fn set_links(&self, links: Vec<std::sync::Weak<dyn Reannounce>>) {
        let _ = self.links.set(links);
    }
}
