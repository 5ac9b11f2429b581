//! Copying what the mirror lacks: the live catch-up over the bitmap, the
//! iterative initial sync of a blank mirror (seed 004 FIG. 2), checksum
//! resync, pacing, and the announcements of "resyncing" and "in sync".

use super::*;
use bytes::BytesMut;
use std::sync::atomic::Ordering::Relaxed;
use tracing::{info, warn};

/// Catch-up copies this much per request.
pub(super) const CATCH_UP_CHUNK: u64 = 1024 * 1024;

/// Catch-up copies regions that may or may not differ (what a returning
/// peer reported) in pieces this large, each hashed first: a 4 KiB
/// difference then costs 64 KiB on the wire, not a whole chunk (measured:
/// a failback after a crash under fio sent 13.6 MiB of them with 1 MiB
/// pieces).
pub(super) const MAYBE_CHUNK: u64 = 64 * 1024;

/// Catch-up requests in flight at once.
pub(super) const CATCH_UP_WINDOW: usize = 16;

/// An iterative initial sync whose passes never leave less than the
/// threshold (host writes outpace the copy) goes live after this many.
pub(super) const MAX_PASSES: u32 = 8;

/// The resync rate limiter lets this much go at once.
pub(super) const RATE_BURST: u64 = 4 * CATCH_UP_CHUNK;

/// Final copies cut short by `resync_max_suspension` before it goes live.
pub(super) const MAX_SUSPENSION_ATTEMPTS: u32 = 3;

/// Host writes within this long count as "hosts are writing".
pub(super) const HOST_ACTIVE_NS: u64 = 100_000_000;

/// What `len` bytes of copy cost in the rate limiter: more while hosts write,
/// so the copy runs at `(100 - share)%` of the rate and the rest is theirs.
pub(super) fn charged_bytes(len: u64, share: u8, host_active: bool) -> u64 {
    if !host_active || share == 0 {
        return len;
    }
    let keep = 100 - u64::from(share.min(90));
    len.saturating_mul(100) / keep
}

/// The first run of marked bytes at or after `from` (region-aligned), at
/// most `max` long (rounded to whole regions).
/// [`next_run`], cut where membership in `maybe` changes, so a run is
/// either all "hash first" or all "send".
pub(super) fn next_run_split(
    b: &Bitmap,
    maybe: Option<&Bitmap>,
    from: u64,
    max: u64,
) -> Option<(u64, u64)> {
    let (start, len) = next_run(b, from, max)?;
    let Some(m) = maybe else {
        return Some((start, len));
    };
    let g = b.granularity();
    let region = b.region_of(start);
    let maybe = m.is_region_marked(region);
    let boundary = if maybe {
        m.next_clean(region)
    } else {
        m.next_dirty(region)
    };
    let mut end = boundary.map_or(start + len, |r| (r * g).min(start + len));
    if maybe {
        // Hashed runs are short: what differs in them (a crashed primary's
        // last writes, scattered) is then sent at a fine grain.
        end = end.min(start + MAYBE_CHUNK.max(g));
    }
    Some((start, end.max(start + g.min(len)) - start))
}

pub(super) fn next_run(b: &Bitmap, from: u64, max: u64) -> Option<(u64, u64)> {
    if from >= b.volume_size() {
        return None;
    }
    let g = b.granularity();
    let max = max.max(g) / g * g;
    let region = b.next_dirty(b.region_of(from))?;
    let start = region * g;
    let end_region = b.next_clean(region).unwrap_or(b.regions());
    let end = (end_region * g).min(start + max).min(b.volume_size());
    Some((start, end - start))
}

impl MirrorLink {
    /// Copies every marked region to the mirror, then declares it in sync.
    ///
    /// Each chunk holds its range lock from the local read until the mirror
    /// acknowledged it, so a host write to the same bytes cannot slip between
    /// the copy and the clearing of its bits.
    pub(super) async fn catch_up(
        self: Arc<Self>,
        epoch: u64,
        ctx: LinkContext,
        cancel: CancellationToken,
    ) {
        let total = self.shared().bitmap.dirty_bytes();
        if total == 0 {
            // Nothing to copy: the mirror holds our generation.
            self.announce(epoch, &ctx, SyncPhase::InSync).await;
            return;
        }
        {
            let mut sh = self.shared();
            sh.resync_total = total;
            sh.resync_done = 0;
        }
        // The mirror is inconsistent from its first resync write on.
        if !self.announce(epoch, &ctx, SyncPhase::Resyncing).await {
            return;
        }
        let started = Instant::now();
        if self.shared().link.is_filling() && !self.iterative_fill(epoch, &ctx, &cancel).await {
            return;
        }
        info!(volume = %self.volume, peer = %self.peer, bytes = self.shared().bitmap.dirty_bytes(),
            "catching up (live): copying out-of-sync regions");
        let mut window = tokio::task::JoinSet::new();
        let mut cursor = 0u64;
        // A pass whose local reads failed is retried after a pause that
        // doubles (the disk is failing: no tight loop over it).
        let mut pause = Duration::from_millis(200);
        let mut failures = self.counters.catch_up_read_failures.load(Relaxed);
        loop {
            if cancel.is_cancelled() {
                return;
            }
            let next = {
                let sh = self.shared();
                next_run_split(&sh.bitmap, sh.maybe.as_ref(), cursor, CATCH_UP_CHUNK)
            };
            let Some((off, len)) = next else {
                // Wait for what is in flight, then look again from the start:
                // regions marked meanwhile are copied too.
                while window.join_next().await.is_some() {}
                if cancel.is_cancelled() {
                    return;
                }
                if self.shared().bitmap.is_clear()
                    && !self.announce(epoch, &ctx, SyncPhase::InSync).await
                {
                    return;
                }
                let in_sync = {
                    let mut sh = self.shared();
                    if sh.link.epoch() != epoch {
                        return;
                    }
                    let clear = sh.bitmap.is_clear();
                    if clear {
                        let step = self.step(&mut sh, Event::CatchUpDone { epoch }, None);
                        sh.resync_done = sh.resync_total;
                        sh.maybe = None;
                        drop(sh);
                        step.finish(&self);
                    }
                    clear
                };
                if in_sync {
                    info!(volume = %self.volume, peer = %self.peer, bytes = total,
                        ms = started.elapsed().as_millis() as u64, "mirror in sync");
                    // Stored now rather than at the next periodic store: a
                    // crash soon after a long resync then replays only the
                    // activity log, not the whole resync again.
                    if let Err(e) = self.persist_bitmap().await {
                        warn!(volume = %self.volume, peer = %self.peer, error = %e, "storing the out-of-sync bitmap failed");
                    }
                    return;
                }
                let now = self.counters.catch_up_read_failures.load(Relaxed);
                if now != failures {
                    failures = now;
                    warn!(volume = %self.volume, peer = %self.peer, retry_ms = pause.as_millis() as u64,
                        "catch-up: local reads failed; retrying the marked regions after a pause");
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(pause) => {}
                    }
                    pause = (pause * 2).min(Duration::from_secs(10));
                } else {
                    pause = Duration::from_millis(200);
                }
                cursor = 0;
                continue;
            };
            cursor = off + len;
            while window.len() >= CATCH_UP_WINDOW {
                window.join_next().await;
            }
            self.pace(len, &cancel).await;
            let link = self.clone();
            let ctx = ctx.clone();
            window.spawn(async move { link.copy_chunk(epoch, &ctx, off, len, true).await });
        }
    }

    /// Seed 004 FIG. 2, for a mirror filled from scratch. Host writes only
    /// mark the bitmap (the change mask, already clear of nothing: a blank
    /// mirror has every region marked). Each pass copies what is marked, each
    /// chunk under its range lock, so a host write racing with the copy of
    /// its region lands its mark after the copy cleared the bits, and the
    /// next pass copies it again. Once a pass leaves at most
    /// `resync_threshold` marked, host writes are suspended (the range lock
    /// over the whole volume), the rest is copied, and the link goes live
    /// before the lock is released: no write can fall between.
    ///
    /// Returns false when the connection ended. Returns true with the link
    /// live: either in sync, or (host writes outpacing the copy, or final
    /// copies too long for `resync_max_suspension`) handed to the live
    /// catch-up, which always converges.
    pub(super) async fn iterative_fill(
        self: &Arc<Self>,
        epoch: u64,
        ctx: &LinkContext,
        cancel: &CancellationToken,
    ) -> bool {
        let size = self.shared().bitmap.volume_size();
        let mut attempts = 0;
        let started = Instant::now();
        info!(volume = %self.volume, peer = %self.peer, bytes = size, threshold = self.resync.threshold,
            "initial sync (iterative): host writes mark the change mask while passes copy");
        for pass in 1.. {
            {
                let mut sh = self.shared();
                sh.passes = pass;
                sh.resync_total = sh.resync_done + sh.bitmap.dirty_bytes();
            }
            if !self.copy_pass(epoch, ctx, cancel).await {
                return false;
            }
            let left = self.shared().bitmap.dirty_bytes();
            info!(volume = %self.volume, peer = %self.peer, pass, changed = left, "initial sync pass done");
            if left <= self.resync.threshold {
                match self.final_copy(epoch, ctx, cancel, size).await {
                    Some(true) => {
                        info!(volume = %self.volume, peer = %self.peer, passes = pass,
                            ms = started.elapsed().as_millis() as u64, "initial sync copied; live");
                        return true;
                    }
                    Some(false) => {
                        attempts += 1;
                        if attempts >= MAX_SUSPENSION_ATTEMPTS {
                            warn!(volume = %self.volume, peer = %self.peer, attempts,
                                "final copies keep exceeding resync_max_suspension: going live (range-locked catch-up)");
                            break;
                        }
                    }
                    None => return false,
                }
            } else if pass >= MAX_PASSES {
                warn!(volume = %self.volume, peer = %self.peer, passes = pass, changed = left,
                    "host writes outpace the copy: going live (range-locked catch-up)");
                break;
            }
        }
        let mut sh = self.shared();
        if sh.link.epoch() != epoch {
            return false;
        }
        let step = self.step(&mut sh, Event::FillDone { epoch }, None);
        drop(sh);
        step.finish(self);
        true
    }

    /// The resync rate in bytes per second (0: unlimited).
    pub fn resync_rate(&self) -> u64 {
        self.bucket.lock().expect("poisoned").rate()
    }

    /// Changes the resync rate at once, also for a copy that is running.
    pub fn set_resync_rate(&self, rate: u64) {
        let now = self.born.elapsed().as_nanos() as u64;
        self.bucket.lock().expect("poisoned").set_rate(rate, now);
        info!(volume = %self.volume, peer = %self.peer, rate, "resync rate set (bytes/s, 0: unlimited)");
    }

    /// A host write came through (for `resync_host_share`).
    pub fn note_host_write(&self) {
        if self.resync.host_share > 0 {
            let now = self.born.elapsed().as_nanos() as u64;
            self.last_host_write.store(now + 1, Relaxed);
        }
    }

    /// Waits until `len` more bytes of resync copy fit the rate (less the
    /// host's share while hosts write).
    pub(super) async fn pace(&self, len: u64, cancel: &CancellationToken) {
        let wait = {
            let now = self.born.elapsed().as_nanos() as u64;
            let last = self.last_host_write.load(Relaxed);
            let active = last != 0 && now.saturating_sub(last - 1) < HOST_ACTIVE_NS;
            let charged = charged_bytes(len, self.resync.host_share, active);
            self.bucket.lock().expect("poisoned").take(charged, now)
        };
        if wait > 0 {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_nanos(wait)) => {}
                _ = cancel.cancelled() => {}
            }
        }
    }

    /// One walk over the bitmap, copying each marked run under its range lock.
    pub(super) async fn copy_pass(
        self: &Arc<Self>,
        epoch: u64,
        ctx: &LinkContext,
        cancel: &CancellationToken,
    ) -> bool {
        let mut window = tokio::task::JoinSet::new();
        let mut cursor = 0u64;
        loop {
            if cancel.is_cancelled() || self.shared().link.epoch() != epoch {
                return false;
            }
            let next = next_run(&self.shared().bitmap, cursor, CATCH_UP_CHUNK);
            let Some((off, len)) = next else { break };
            cursor = off + len;
            while window.len() >= CATCH_UP_WINDOW {
                window.join_next().await;
            }
            self.pace(len, cancel).await;
            let (link, ctx) = (self.clone(), ctx.clone());
            window.spawn(async move { link.copy_chunk(epoch, &ctx, off, len, true).await });
        }
        while window.join_next().await.is_some() {}
        !cancel.is_cancelled() && self.shared().link.epoch() == epoch
    }

    /// Suspends host writes (the range lock over the whole volume), copies
    /// what is still marked, and goes live before resuming them. Some(true):
    /// done; Some(false): cut short by `resync_max_suspension` (host writes
    /// resume, still only marking); None: the connection ended.
    pub(super) async fn final_copy(
        self: &Arc<Self>,
        epoch: u64,
        ctx: &LinkContext,
        cancel: &CancellationToken,
        size: u64,
    ) -> Option<bool> {
        let asked = Instant::now();
        let guard = tokio::select! {
            g = ctx.locks.lock(0, size) => g,
            _ = cancel.cancelled() => return None,
        };
        let locked_after = asked.elapsed();
        let deadline = asked + self.resync.max_suspension;
        let mut window = tokio::task::JoinSet::new();
        let mut cursor = 0u64;
        let mut cut_short = false;
        loop {
            if cancel.is_cancelled() || self.shared().link.epoch() != epoch {
                return None;
            }
            if Instant::now() >= deadline {
                cut_short = true;
                break;
            }
            let next = next_run(&self.shared().bitmap, cursor, CATCH_UP_CHUNK);
            let Some((off, len)) = next else { break };
            cursor = off + len;
            while window.len() >= CATCH_UP_WINDOW {
                window.join_next().await;
            }
            let (link, ctx) = (self.clone(), ctx.clone());
            // We hold the whole volume: the chunk takes no lock of its own.
            window.spawn(async move { link.copy_chunk(epoch, &ctx, off, len, false).await });
        }
        while window.join_next().await.is_some() {}
        let done = {
            let mut sh = self.shared();
            if sh.link.epoch() != epoch {
                return None;
            }
            let done = !cut_short && sh.bitmap.is_clear();
            if done {
                // Host writes waiting on the lock go to the mirror from now on.
                let step = self.step(&mut sh, Event::FillDone { epoch }, None);
                drop(sh);
                step.finish(self);
            }
            done
        };
        drop(guard);
        let held = asked.elapsed();
        {
            let mut sh = self.shared();
            sh.last_suspension = Some(held);
        }
        self.counters
            .suspended_us
            .fetch_add(held.as_micros() as u64, Relaxed);
        self.counters.suspensions.fetch_add(1, Relaxed);
        if done {
            info!(volume = %self.volume, peer = %self.peer, suspended_us = held.as_micros() as u64,
                waited_for_writes_us = locked_after.as_micros() as u64,
                "initial sync final copy: host writes were suspended");
        } else {
            warn!(volume = %self.volume, peer = %self.peer, suspended_us = held.as_micros() as u64,
                max_ms = self.resync.max_suspension.as_millis() as u64,
                "initial sync final copy cut short at resync_max_suspension; host writes resumed");
        }
        Some(done)
    }

    pub(super) async fn copy_chunk(
        &self,
        epoch: u64,
        ctx: &LinkContext,
        off: u64,
        len: u64,
        lock: bool,
    ) {
        let guard = if lock {
            Some(ctx.locks.lock(off, len).await)
        } else {
            None
        };
        let backend = ctx.backend.clone();
        let checksum = self.resync.checksum
            || self
                .shared()
                .maybe
                .as_ref()
                .is_some_and(|m| m.is_marked(off));
        // With checksums, ask for the mirror's hash while the local read runs.
        let asked = if checksum {
            self.prepare_for_epoch(epoch, 0, 0).map(|p| {
                let id = match &p {
                    Prepared::Live { id, .. } => *id,
                    _ => 0,
                };
                let sent = self.send(
                    p,
                    &MirrorOp::Hash {
                        offset: off,
                        len: len as u32,
                    },
                );
                (id, sent)
            })
        } else {
            None
        };
        let codec = self.compression();
        // Read, hash when asked, and compress when the link does, off the
        // runtime's threads.
        let read = tokio::task::spawn_blocking(move || {
            let mut buf = BytesMut::zeroed(len as usize);
            backend.read_at(&mut buf, off).map(|()| {
                let hash = checksum.then(|| *blake3::hash(&buf).as_bytes());
                let data = buf.freeze();
                let data = if data.iter().all(|&b| b == 0) {
                    None
                } else {
                    Some(EncodedWrite::new(data, codec))
                };
                (data, hash)
            })
        })
        .await;
        let (data, local_hash) = match read {
            Ok(Ok(d)) => d,
            Ok(Err(e)) => {
                warn!(error = %e, "catch-up read failed; region stays marked");
                self.counters.catch_up_read_failures.fetch_add(1, Relaxed);
                self.shared().last_error = Some(format!("catch-up: {e}"));
                return;
            }
            Err(_) => return,
        };
        if let (Some((id, sent)), Some(local)) = (asked, local_hash) {
            // The mirror hashes without waiting for writes queued before the
            // request; under our range lock only a host write sent before it
            // can be queued there, and it carries the data we just read, so
            // "equal" can only be true of data the mirror ends up holding.
            let theirs = match self.wait(sent).await {
                Ok(()) => self.hashes.lock().expect("poisoned").remove(&id),
                Err(_) => None,
            };
            if theirs == Some(local) {
                let mut sh = self.shared();
                if sh.link.epoch() == epoch {
                    sh.bitmap.clear(off, len);
                    sh.resync_done += len;
                    self.counters.resync_skipped_bytes.fetch_add(len, Relaxed);
                }
                return;
            }
        }
        let p = self.prepare_for_epoch(epoch, off, len);
        let Some(p) = p else { return };
        let sent = match data {
            None => self.send(
                p,
                &MirrorOp::WriteZeroes {
                    offset: off,
                    len: len as u32,
                    fua: false,
                    may_trim: true,
                },
            ),
            Some(write) => {
                let (ticket, sent) = p.split();
                match ticket {
                    Some(t) if self.send_encoded(t, off, false, write) => sent,
                    _ => Sent::Marked,
                }
            }
        };
        if self.wait(sent).await.is_ok() {
            let mut sh = self.shared();
            if sh.link.epoch() == epoch {
                sh.bitmap.clear(off, len);
                sh.resync_done += len;
                self.counters.resync_bytes.fetch_add(len, Relaxed);
            }
        }
        drop(guard);
    }

    /// Async, lag_policy "bitmap": a write past the bound was recorded
    /// instead of sent. The mirror is inconsistent until a resync.
    pub fn mark_inconsistent(&self, offset: u64, len: u64) {
        let mut sh = self.shared();
        sh.bitmap.mark(offset, len);
        // A catch-up already running (resyncing) picks the new marks up.
        let step = self.step(&mut sh, Event::OverLag, None);
        drop(sh);
        step.finish(self);
    }

    /// Async, lag_policy "bitmap": once the lag is back under the bound,
    /// copies what was recorded (the mirror is "resyncing" meanwhile and in
    /// sync, consistent again, when done).
    pub fn resync_if_recovered(self: &Arc<Self>) {
        if let Some(ctx) = self.ctx.get() {
            if self.start_catch_up(Event::LagRecovered, ctx) {
                info!(volume = %self.volume, peer = %self.peer, "async mirror lag back under its bound: resyncing what was recorded");
            }
        }
    }

    /// Marks `[offset, offset+len)` out of sync and, on a live link that is
    /// in sync, starts copying the marked regions now (the catch-up that
    /// otherwise runs only when the link connects). On a link that is
    /// resyncing, the running catch-up picks the new marks up before it
    /// declares the mirror in sync; on a link that is down, the next
    /// connection copies them.
    pub fn mark_and_copy(self: &Arc<Self>, offset: u64, len: u64, ctx: &LinkContext) {
        self.shared().bitmap.mark(offset, len);
        self.start_catch_up(Event::MarkedRegions, ctx);
    }

    /// Feeds `event`; when the state machine says so, starts a catch-up on
    /// the live connection. True when one was started.
    fn start_catch_up(self: &Arc<Self>, event: Event, ctx: &LinkContext) -> bool {
        let (step, cancel) = {
            let mut sh = self.shared();
            let step = self.step(&mut sh, event, None);
            (step, sh.conn_cancel.clone())
        };
        let mut started = false;
        for a in step.finish(self) {
            if let (Action::StartCatchUp { epoch }, Some(cancel)) = (a, cancel.clone()) {
                tokio::spawn(self.clone().catch_up(epoch, ctx.clone(), cancel));
                started = true;
            }
        }
        started
    }

    /// The primary started a new generation (another mirror misses writes):
    /// a mirror that is live and in sync holds every write, so it is told
    /// the new record (after a FLUSH, like every "in sync").
    pub fn reannounce(self: Arc<Self>) {
        let epoch = {
            let sh = self.shared();
            if !sh.link.in_sync() {
                return;
            }
            sh.link.epoch()
        };
        let Some(ctx) = self.ctx.get().cloned() else {
            return;
        };
        tokio::spawn(async move {
            self.announce(epoch, &ctx, SyncPhase::InSync).await;
        });
    }

    /// Sends a SyncState on this connection and waits for the mirror to store
    /// it. "In sync" is sent after a FLUSH, so what it covers is durable.
    pub(super) async fn announce(&self, epoch: u64, ctx: &LinkContext, phase: SyncPhase) -> bool {
        if phase == SyncPhase::InSync {
            let Some(p) = self.prepare_flush() else {
                return false;
            };
            let sent = self.send(p, &MirrorOp::Flush);
            if self.wait(sent).await.is_err() {
                return false;
            }
        }
        let generations = ctx.gen.meta.get().generations;
        let Some(p) = self.prepare_for_epoch(epoch, 0, 0) else {
            return false;
        };
        if phase == SyncPhase::InSync {
            // Set when sent, not when acknowledged: a mirror that stored it
            // and then failed a write before its acknowledgement came back
            // holds it all the same. After reading the record (see
            // `GenState::diverge`).
            self.holds_current.store(true, SeqCst);
        }
        let sent = self.send(p, &MirrorOp::SyncState { phase, generations });
        self.wait(sent).await.is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_share_slows_the_copy_only_while_hosts_write() {
        assert_eq!(charged_bytes(1 << 20, 0, true), 1 << 20);
        assert_eq!(charged_bytes(1 << 20, 50, false), 1 << 20);
        // Half the rate for the copy: each byte costs two.
        assert_eq!(charged_bytes(1 << 20, 50, true), 2 << 20);
        // 25% kept for hosts: the copy gets 75% of the rate.
        assert_eq!(charged_bytes(3 << 20, 25, true), 4 << 20);
        // Capped at 90%, so the copy always progresses.
        assert_eq!(charged_bytes(100, 200, true), 1000);
    }
}
