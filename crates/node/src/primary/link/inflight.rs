//! A link's requests in flight: created before the local I/O
//! ([`MirrorLink::prepare`]), sent once it succeeded, settled by the
//! mirror's acknowledgements (many per wake-up), failed and marked when the
//! connection ends; and the read-eligibility checks that look at them.

use super::*;
use std::sync::atomic::Ordering::Relaxed;
use tokio::sync::oneshot;
use tracing::debug;

pub(super) struct Pending {
    pub(super) offset: u64,
    pub(super) len: u64,
    pub(super) bytes: u64,
    pub(super) flush: bool,
    /// An async write: its activity-log range ends when the mirror has it
    /// (acknowledged, or marked on failure), not when the host is answered.
    pub(super) al_end: Option<Arc<AlEnd>>,
    pub(super) sent: Option<Instant>,
    /// The link's send sequence number of this write (0: not sent, or not
    /// a write), for a consistency group's gate.
    pub(super) send_seq: u64,
    pub(super) done: oneshot::Sender<Result<(), MirrorFailure>>,
}

/// An activity-log range held for an async write until every request that
/// carries it is gone from the link (acknowledged, or failed and marked).
pub(crate) struct AlEnd {
    pub(super) remaining: std::sync::atomic::AtomicUsize,
    pub(super) offset: u64,
    pub(super) len: u64,
}

/// A mirror request created before the local I/O.
pub enum Prepared {
    /// Registered on a live connection; not yet sent.
    Live {
        id: u64,
        epoch: u64,
        rx: oneshot::Receiver<Result<(), MirrorFailure>>,
    },
    /// The mirror is not reachable: the region was marked out of sync.
    Marked,
    /// An iterative initial sync runs: the region was marked in its change
    /// mask and will be copied by it. Not a failure.
    Deferred,
}

/// The sending half of a [`Prepared::Live`] request: what the pipeline
/// carries to the point where the request is released to the link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    id: u64,
    epoch: u64,
}

impl Ticket {
    /// A ticket for request `id` of connection `epoch`, for tests of what
    /// carries tickets (the pipeline).
    #[cfg(test)]
    pub(crate) fn for_test(id: u64, epoch: u64) -> Ticket {
        Ticket { id, epoch }
    }

    #[cfg(test)]
    pub(crate) fn id(&self) -> u64 {
        self.id
    }
}

impl Prepared {
    /// The sending half, without giving the request up.
    pub fn ticket(&self) -> Option<Ticket> {
        match self {
            Prepared::Live { id, epoch, .. } => Some(Ticket {
                id: *id,
                epoch: *epoch,
            }),
            Prepared::Marked | Prepared::Deferred => None,
        }
    }

    /// Splits a request into what sends it (None when the region was
    /// marked instead) and what waits for its acknowledgement.
    pub fn split(self) -> (Option<Ticket>, Sent) {
        match self {
            Prepared::Live { id, epoch, rx } => (Some(Ticket { id, epoch }), Sent::Waiting(rx)),
            Prepared::Marked => (None, Sent::Marked),
            Prepared::Deferred => (None, Sent::Deferred),
        }
    }
}

/// A request sent (or marked), to be waited for.
pub enum Sent {
    Waiting(oneshot::Receiver<Result<(), MirrorFailure>>),
    Marked,
    /// See [`Prepared::Deferred`].
    Deferred,
}

impl MirrorLink {
    /// Creates the mirror request for `[offset, offset+len)` before the local
    /// I/O starts. On a link that is down, marks the region instead.
    pub fn prepare(&self, offset: u64, len: u64) -> Prepared {
        let mut sh = self.shared();
        if sh.tx.is_none() {
            sh.bitmap.mark(offset, len);
            return Prepared::Marked;
        }
        if sh.link.is_filling() {
            // Marked before the local I/O starts: a copy of this region that
            // is running now holds its range lock, so it finished before this
            // write started, and clears nothing this write marks.
            sh.bitmap.mark(offset, len);
            return Prepared::Deferred;
        }
        self.register(&mut sh, offset, len)
    }

    /// Registers a request on the live connection (the caller checked it).
    pub(super) fn register(&self, sh: &mut Shared, offset: u64, len: u64) -> Prepared {
        let id = self.next_id.fetch_add(1, Relaxed);
        let (done, rx) = oneshot::channel();
        let epoch = sh.link.epoch();
        sh.inflight.insert(
            id,
            Pending {
                offset,
                len,
                bytes: 0,
                flush: false,
                al_end: None,
                sent: None,
                send_seq: 0,
                done,
            },
        );
        Prepared::Live { id, epoch, rx }
    }

    /// Registers a FLUSH on a live link; None when the link is away. What
    /// the mirror acknowledged so far is covered by this FLUSH once it is
    /// acknowledged in turn.
    pub fn prepare_flush(&self) -> Option<Prepared> {
        let p = self.prepare_live(0, 0);
        let Prepared::Live { id, .. } = &p else {
            return None;
        };
        let mut sh = self.shared();
        if let Some(pending) = sh.inflight.get_mut(id) {
            pending.flush = true;
        }
        let fresh = empty_like(&sh.bitmap);
        let covered = std::mem::replace(&mut sh.unflushed, fresh);
        sh.flushing.push_back((*id, covered));
        Some(p)
    }

    /// Like [`MirrorLink::prepare`], but never marks.
    pub(super) fn prepare_live(&self, offset: u64, len: u64) -> Prepared {
        if !self.is_live() {
            return Prepared::Marked;
        }
        self.prepare(offset, len)
    }

    /// Like `prepare`, but only on the given connection and without marking.
    pub(super) fn prepare_for_epoch(&self, epoch: u64, offset: u64, len: u64) -> Option<Prepared> {
        let mut sh = self.shared();
        if sh.link.epoch() != epoch || sh.tx.is_none() {
            return None;
        }
        Some(self.register(&mut sh, offset, len))
    }

    /// Sends a prepared request (the local I/O succeeded). A Write on a
    /// link with compression is compressed here, on the caller's task: the
    /// path of writes no larger than a track, which skip the pipeline.
    pub fn send(&self, p: Prepared, op: &MirrorOp) -> Sent {
        let (ticket, sent) = p.split();
        let Some(ticket) = ticket else {
            // Marked, or deferred to a running initial sync.
            return sent;
        };
        let ok = match op {
            MirrorOp::Write { offset, data, fua } if self.compression() != Codec::None => {
                let write = EncodedWrite::new(data.clone(), self.compression());
                self.send_encoded(ticket, *offset, *fua, write)
            }
            _ => self.send_outgoing(ticket, op.range(), |id| Outgoing::Frame(op.frame(id))),
        };
        if ok {
            sent
        } else {
            Sent::Marked
        }
    }

    /// Sends a Write whose data is ready for the wire; false (the region
    /// marked) when the connection failed since the request was prepared.
    pub fn send_encoded(&self, t: Ticket, offset: u64, fua: bool, write: EncodedWrite) -> bool {
        let range = (offset, u64::from(write.len));
        self.send_outgoing(t, range, |id| Outgoing::Encoded {
            id,
            offset,
            fua,
            write,
        })
    }

    pub(super) fn send_outgoing(
        &self,
        t: Ticket,
        (off, len): (u64, u64),
        make: impl FnOnce(u64) -> Outgoing,
    ) -> bool {
        let Ticket { id, epoch } = t;
        let mut sh = self.shared();
        if sh.link.epoch() == epoch && sh.inflight.contains_key(&id) {
            if let Some(tx) = sh.tx.clone() {
                if len > 0 && self.is_async() {
                    self.gate_for_group(&tx);
                }
                if len > 0 && self.is_async() && self.completed.swap(false, SeqCst) {
                    // A write was answered since the last barrier: this one
                    // may depend on it, so it starts a new epoch (DESIGN.md
                    // guarantee 2). Under the lock, so no send overtakes it.
                    self.send_barrier(&sh, &tx);
                }
                let p = sh.inflight.get_mut(&id).expect("checked above");
                p.sent = Some(Instant::now());
                let out = make(id);
                match &out {
                    Outgoing::Frame(Frame::Write { data, .. }) => {
                        p.bytes = data.len() as u64;
                        self.counters.data_bytes.fetch_add(p.bytes, Relaxed);
                        self.counters.wire_bytes.fetch_add(p.bytes, Relaxed);
                    }
                    Outgoing::Encoded { write, .. } => {
                        p.bytes = u64::from(write.len);
                        self.counters.data_bytes.fetch_add(p.bytes, Relaxed);
                        let wire = write.wire_len() as u64;
                        self.counters.wire_bytes.fetch_add(wire, Relaxed);
                    }
                    Outgoing::Frame(_) | Outgoing::Gate(_) => {}
                }
                let bytes = p.bytes;
                if tx.send(out).is_ok() {
                    sh.inflight_bytes += bytes;
                    // Send numbers only where a group's siblings wait on
                    // them: no cost on the links of ungrouped volumes.
                    if len > 0 && self.group.get().is_some() {
                        sh.next_send += 1;
                        let seq = sh.next_send;
                        sh.inflight.get_mut(&id).expect("checked above").send_seq = seq;
                        sh.unacked_sends.insert(seq);
                        self.last_sent.store(seq, SeqCst);
                    }
                    return true;
                }
            }
        }
        // The connection failed between prepare and send: its failure
        // already marked the region (the entry was in flight) or will not
        // see it, so mark it here too.
        sh.bitmap.mark(off, len);
        if let Some(mut p) = sh.inflight.remove(&id) {
            sh.inflight_bytes -= p.bytes;
            if Self::release_al(&mut sh, p.al_end.take()) {
                drop(sh);
                self.al_wake.notify_waiters();
            }
        }
        false
    }

    /// Async, in a consistency group: after a host answer on any member,
    /// queues a gate before this write: the sender holds it until every
    /// sibling's writes sent so far are acknowledged (see
    /// [`crate::primary::group`]). Under this link's lock, like a barrier.
    fn gate_for_group(&self, tx: &mpsc::UnboundedSender<Outgoing>) {
        let Some((group, idx)) = self.group.get() else {
            return;
        };
        let answers = group.answers();
        if self.group_seen.swap(answers, SeqCst) == answers {
            return;
        }
        let gate = group.gate(*idx);
        if !gate.is_empty() {
            let _ = tx.send(Outgoing::Gate(gate));
        }
    }

    /// `seq` was acknowledged or failed: the lowest unacknowledged send
    /// moves.
    pub(super) fn settle_send(&self, sh: &mut Shared, seq: u64) {
        if seq != 0 {
            sh.unacked_sends.remove(&seq);
        }
    }

    /// Publishes the lowest unacknowledged send (to siblings' gates).
    pub(super) fn publish_acked_low(&self, sh: &Shared) {
        let low = sh
            .unacked_sends
            .first()
            .copied()
            .unwrap_or(sh.next_send + 1);
        self.acked_low.send_if_modified(|v| {
            let moved = *v != low;
            *v = low;
            moved
        });
    }

    /// Queues an epoch barrier. It has id 0: the mirror does not answer
    /// it (nothing waits for an epoch to lift; the writes after it are what
    /// the primary tracks), which keeps a barrier per write cheap. Taking
    /// the link's state shows the caller holds its lock: no other send can
    /// come between the barrier and the write it goes before.
    pub(super) fn send_barrier(&self, _locked: &Shared, tx: &mpsc::UnboundedSender<Outgoing>) {
        if tx
            .send(Outgoing::Frame(Frame::Barrier {
                id: 0,
                durable: self.durable_barriers,
            }))
            .is_ok()
        {
            self.barriers.fetch_add(1, Relaxed);
        }
    }

    /// Async: hands the activity-log end of `[offset, offset+len)` (what
    /// [`MirrorLink::activate`] let through) to the requests `tickets`: the
    /// range ends when the last of them is acknowledged or failed. False
    /// (the caller ends it) when none of them is still in flight.
    pub fn end_when_done(&self, tickets: &[Ticket], offset: u64, len: u64) -> bool {
        let mut sh = self.shared();
        let live: Vec<u64> = tickets
            .iter()
            .filter(|t| t.epoch == sh.link.epoch() && sh.inflight.contains_key(&t.id))
            .map(|t| t.id)
            .collect();
        if live.is_empty() {
            return false;
        }
        let guard = Arc::new(AlEnd {
            remaining: std::sync::atomic::AtomicUsize::new(live.len()),
            offset,
            len,
        });
        for id in live {
            if let Some(p) = sh.inflight.get_mut(&id) {
                p.al_end = Some(guard.clone());
            }
        }
        true
    }

    /// A request carrying an activity-log end left the link: ends the range
    /// when it was the last. True when an extent was freed.
    pub(super) fn release_al(sh: &mut Shared, g: Option<Arc<AlEnd>>) -> bool {
        match g {
            Some(g) if g.remaining.fetch_sub(1, SeqCst) == 1 => {
                sh.al.end(g.offset, g.len).unwrap_or(false)
            }
            _ => false,
        }
    }

    /// The local I/O failed: the request is never sent. The caller marks
    /// the region (see [`MirrorLink::abandon`]).
    pub fn abandon_ticket(&self, t: Ticket) {
        self.shared().inflight.remove(&t.id);
    }

    /// The local I/O failed: nothing is sent, and the region is marked,
    /// since the local disk may now differ from the mirror.
    pub fn abandon(&self, p: Prepared, offset: u64, len: u64) {
        let mut sh = self.shared();
        if let Prepared::Live { id, .. } = p {
            sh.inflight.remove(&id);
        }
        sh.bitmap.mark(offset, len);
    }

    /// Waits for a sent request. The watchdog bounds the wait.
    pub async fn wait(&self, s: Sent) -> Result<(), MirrorFailure> {
        match s {
            Sent::Deferred => Ok(()),
            Sent::Marked => Err(MirrorFailure::Marked {
                volume: self.volume.clone(),
                peer: self.peer.clone(),
            }),
            Sent::Waiting(rx) => rx.await.unwrap_or_else(|_| {
                Err(MirrorFailure::Dropped {
                    volume: self.volume.clone(),
                    peer: self.peer.clone(),
                })
            }),
        }
    }

    /// Settles acknowledged requests under one lock, then completes their
    /// waiters outside it.
    pub(super) fn acked(&self, ids: &[u64], epoch: u64) {
        let mut done = Vec::with_capacity(ids.len());
        let mut freed = false;
        {
            let mut sh = self.shared();
            if sh.link.epoch() != epoch {
                return;
            }
            for &id in ids {
                let Some(mut p) = sh.inflight.remove(&id) else {
                    debug!(volume = %self.volume, peer = %self.peer, id, "acknowledgement for no request in flight; ignored");
                    continue;
                };
                if p.flush || p.len > 0 {
                    // Not a liveness probe.
                    self.counters.requests_acked.fetch_add(1, Relaxed);
                }
                self.counters.bytes_replicated.fetch_add(p.bytes, Relaxed);
                sh.inflight_bytes -= p.bytes;
                self.settle_send(&mut sh, p.send_seq);
                freed |= Self::release_al(&mut sh, p.al_end.take());
                if p.flush {
                    while sh.flushing.front().is_some_and(|(fid, _)| *fid <= id) {
                        sh.flushing.pop_front();
                    }
                } else if p.len > 0 {
                    sh.unflushed.mark(p.offset, p.len);
                }
                done.push(p.done);
            }
            if self.group.get().is_some() {
                self.publish_acked_low(&sh);
            }
        }
        if freed {
            self.al_wake.notify_waiters();
        }
        for d in done {
            let _ = d.send(Ok(()));
        }
    }

    /// Async: true while the lag is past `max_lag_bytes` or the oldest
    /// unacknowledged write is older than `max_lag_seconds`.
    pub fn over_lag(&self) -> bool {
        let sh = self.shared();
        if sh.inflight_bytes > self.max_lag_bytes {
            return true;
        }
        sh.inflight
            .values()
            .find(|p| p.len > 0 && p.sent.is_some())
            .and_then(|p| p.sent)
            .is_some_and(|t| t.elapsed() > self.max_lag)
    }

    /// True while a request that changes bytes of `[offset, offset+len)` is
    /// in flight (prepared or sent, not yet acknowledged or failed).
    pub fn has_inflight_in(&self, offset: u64, len: u64) -> bool {
        self.shared().inflight_overlaps(offset, len)
    }

    /// True when a host read of `[offset, offset+len)` may be served by this
    /// mirror: it holds exactly the primary's data there. All of: the link
    /// is sync (an async mirror may lack acknowledged writes), live (host
    /// writes reach it now), in sync and not filling (no copy pending), the
    /// range is not marked in its bitmap (verify `--mark` can mark regions
    /// of a link that is still in sync), and no write to the range is in
    /// flight on it (an async write acknowledged before a switch to sync
    /// may still be on its way; a sync one in flight is concurrent with
    /// this read anyway, so either answer would do, and the local disk has
    /// it). Checked under the link's lock, so it is one consistent view.
    ///
    /// Why a read after an acknowledged write is safe: in sync mode the
    /// host hears "done" only after the mirror acknowledged the write, which
    /// it does once the write is applied to its backend; or after the link
    /// failed, and a failing link is degraded (not live) before any of its
    /// requests is failed, so this check is false from then on.
    pub fn serves_reads(&self, offset: u64, len: u64) -> bool {
        if len == 0 {
            return false;
        }
        let sh = self.shared();
        if !self.in_sync_now(&sh) {
            return false;
        }
        // Usually clear (O(1)); otherwise only the read's own regions (at
        // most 32 MiB / granularity), never a scan to the volume's end.
        !marked_in(&sh.bitmap, offset, len) && !sh.inflight_overlaps(offset, len)
    }

    /// True when this mirror can take over every host request of a primary
    /// whose local disk failed: sync, live, in sync, nothing marked.
    pub fn can_take_over(&self) -> bool {
        let sh = self.shared();
        self.in_sync_now(&sh) && sh.bitmap.is_clear()
    }

    pub(super) fn in_sync_now(&self, sh: &Shared) -> bool {
        self.mode() == MirrorMode::Sync && sh.link.in_sync()
    }

    /// Takes every request in flight out of the table, marks its region,
    /// and marks what the mirror acknowledged but may not have flushed (the
    /// state machine's `FailInflight`). Returns the requests to fail once
    /// the lock is released, and whether an activity-log extent was freed.
    pub(super) fn fail_requests(&self, sh: &mut Shared) -> (BTreeMap<u64, Pending>, bool) {
        let mut freed = false;
        let mut inflight = std::mem::take(&mut sh.inflight);
        sh.inflight_bytes = 0;
        // Failed, so no sibling waits for them any more.
        sh.unacked_sends.clear();
        self.publish_acked_low(sh);
        for p in inflight.values_mut() {
            sh.bitmap.mark(p.offset, p.len);
            // Marked: the async write's extent may end.
            if Self::release_al(sh, p.al_end.take()) {
                freed = true;
            }
        }
        // Acknowledged but perhaps not durable on the mirror.
        sh.bitmap = sh.bitmap_to_store().0;
        sh.unflushed = empty_like(&sh.bitmap);
        sh.flushing.clear();
        (inflight, freed)
    }
}
