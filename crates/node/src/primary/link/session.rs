//! One link's connections: connect and handshake, the generation check
//! and the mirror's divergence report, the connection's tasks (sender,
//! receiver, watchdog, periodic flush), and what happens when it ends.

use super::*;
use crate::daemon::config::InitialSync;
use blockmirror_core::link::{Action, Event, Judgment, Phase};
use blockmirror_core::{compare_generations, resync_basis, Relation, ResyncBasis};
use blockmirror_repl::{FrameReader, FrameWriter, PeerInfo};
use blockmirror_repl::{LinkRead, LinkStream, LinkWrite};
use std::sync::atomic::Ordering::Relaxed;
use tracing::{debug, info, warn};

/// The live link asks the mirror to flush this often when it has written
/// since the last flush, so that what a mirror crash can lose stays small.
pub(super) const PERIODIC_FLUSH: Duration = Duration::from_secs(1);

/// How long connecting plus the handshake may take.
pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the mirror may take to report its divergent regions after the
/// handshake.
pub(super) const DIVERGENCE_TIMEOUT: Duration = Duration::from_secs(30);

pub(super) const BACKOFF_MIN: Duration = Duration::from_millis(100);

pub(super) const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Reads the Divergence frames a mirror sends right after the handshake:
/// whether it wrote its current generation as a primary, and the regions it
/// may hold that we lack. The mirror sends nothing else until it is asked,
/// so the reader dropped here buffers nothing of what follows.
pub(super) async fn read_divergence(
    stream: &mut LinkStream,
) -> Result<(bool, Vec<(u64, u64)>), LinkError> {
    let mut reader = FrameReader::new(stream);
    let mut all = Vec::new();
    let read = async {
        loop {
            match reader.next().await {
                Ok(Some(Frame::Divergence {
                    was_primary,
                    last,
                    ranges,
                })) => {
                    all.extend(ranges);
                    if last {
                        return Ok(was_primary);
                    }
                }
                Ok(Some(Frame::Error { code, message, .. })) => {
                    return Err(LinkError::Refused {
                        code: format!("{code:?}"),
                        message,
                    })
                }
                Ok(Some(f)) => return Err(LinkError::NoDivergence(format!("{:?}", f.kind()))),
                Ok(None) => return Err(LinkError::Closed),
                Err(e) => return Err(LinkError::Io(e.to_string())),
            }
        }
    };
    let was_primary = tokio::time::timeout(DIVERGENCE_TIMEOUT, read)
        .await
        .unwrap_or(Err(LinkError::DivergenceTimeout(DIVERGENCE_TIMEOUT)))?;
    Ok((was_primary, all))
}

/// `gates_waited`: counts the consistency-group gates this sender waited at.
pub(super) async fn sender_loop(
    mut w: FrameWriter<LinkWrite>,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
    gates_waited: Option<Arc<MirrorLink>>,
    cancel: CancellationToken,
) {
    use crate::primary::group;
    let gates_waited = gates_waited.as_ref().map(|l| &l.counters.group_gates);
    loop {
        let first = tokio::select! {
            _ = cancel.cancelled() => return,
            f = rx.recv() => f,
        };
        let Some(out) = first else { return };
        // A gate the siblings already satisfy costs nothing: batching goes
        // on through it.
        let mut gate = None;
        match out {
            Outgoing::Gate(g) if !group::gate_open(&g) => gate = Some(g),
            Outgoing::Gate(_) => {}
            out => queue(&mut w, out),
        }
        while gate.is_none() && w.buffered() < 4 << 20 {
            match rx.try_recv() {
                Ok(Outgoing::Gate(g)) if !group::gate_open(&g) => gate = Some(g),
                Ok(Outgoing::Gate(_)) => {}
                Ok(out) => queue(&mut w, out),
                Err(_) => break,
            }
        }
        if w.buffered() > 0 {
            let flushed = tokio::select! {
                _ = cancel.cancelled() => return,
                r = w.flush() => r,
            };
            if flushed.is_err() {
                // The receiver sees the broken connection and fails the epoch.
                cancel.cancel();
                return;
            }
        }
        // A consistency group's gate: what is queued behind it waits until
        // the siblings' earlier writes are acknowledged (a sibling whose
        // link fails settles them all, and is cut with this one anyway).
        if let Some(g) = gate {
            for (mut acked_low, sent) in g {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = acked_low.wait_for(|low| *low > sent) => {}
                }
            }
            if let Some(c) = &gates_waited {
                c.fetch_add(1, Relaxed);
            }
        }
    }
}

pub(super) fn queue(w: &mut FrameWriter<LinkWrite>, out: Outgoing) {
    match out {
        Outgoing::Gate(_) => unreachable!("gates are awaited by the sender loop, not queued"),
        Outgoing::Frame(f) => w.queue(&f),
        Outgoing::Encoded {
            id,
            offset,
            fua,
            write,
        } => w.queue_encoded_write(id, offset, fua, &write),
    }
}

impl MirrorLink {
    /// Connects, reconnects with backoff, catches up, until `shutdown`.
    pub async fn run(self: Arc<Self>, ctx: LinkContext, shutdown: CancellationToken) {
        let _ = self.ctx.set(ctx.clone());
        let mut backoff = BACKOFF_MIN;
        let mut first = true;
        let mut quiet = false;
        let mut active = self.active.subscribe();
        loop {
            if !*active.borrow_and_update() {
                // Parked while the volume is a mirror here.
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = active.wait_for(|a| *a) => {}
                }
                backoff = BACKOFF_MIN;
                continue;
            }
            if self.drive(Event::Connect, None).is_empty() && !self.is_connecting() {
                // Parked between the check and the attempt.
                continue;
            }
            let started = Instant::now();
            match self.connect(&ctx).await {
                Ok((mut stream, peer)) => {
                    if !first {
                        self.counters.reconnects.fetch_add(1, Relaxed);
                    }
                    first = false;
                    quiet = false;
                    let peer_node = peer.node.clone();
                    if peer.compression != self.configured_codec {
                        warn!(volume = %self.volume, peer = %self.peer, wanted = self.configured_codec.as_str(),
                            "the mirror does not support this link's compression: sending uncompressed");
                    }
                    self.codec.store(peer.compression.code(), Relaxed);
                    if let Some(rel) = self.judge_generations(&ctx, &peer) {
                        match read_divergence(&mut stream).await {
                            Ok((was_primary, ranges)) => {
                                self.take_divergence(&ctx, &peer, rel, was_primary, &ranges);
                                info!(volume = %self.volume, peer = %self.peer, peer_node = %peer_node, tls = stream.is_tls(), "mirror link connected");
                                self.clone()
                                    .serve_connection(stream, peer_node, &ctx, &shutdown)
                                    .await;
                            }
                            Err(e) => {
                                warn!(volume = %self.volume, peer = %self.peer, error = %e, "mirror did not report its divergent regions");
                                self.drive(Event::DivergenceFailed, None);
                                self.shared().last_error = Some(e.to_string());
                            }
                        }
                    }
                }
                Err(e) => {
                    self.shared().last_error = Some(e.to_string());
                    // Unreachable: nothing to learn from it; writes go on.
                    self.drive(Event::ConnectFailed, None);
                    if quiet {
                        debug!(volume = %self.volume, peer = %self.peer, error = %e, "mirror link connect failed");
                    } else {
                        warn!(volume = %self.volume, peer = %self.peer, error = %e, "mirror link connect failed; retrying with backoff");
                        quiet = true;
                    }
                }
            }
            if shutdown.is_cancelled() {
                break;
            }
            if started.elapsed() > BACKOFF_MAX * 2 {
                backoff = BACKOFF_MIN; // It had been up for a while: retry quickly.
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(backoff) => {}
                _ = active.wait_for(|a| !*a) => {}
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
        self.stop();
    }

    fn is_connecting(&self) -> bool {
        matches!(self.shared().link.phase(), Phase::Connecting { .. })
    }

    /// Compares the mirror's generation record with ours (both authenticated
    /// by the handshake). Says whether the link may go live; if not, the
    /// state says why (split brain, or suspended) and nothing is copied. A
    /// blank mirror gets the whole volume marked.
    pub(super) fn judge_generations(&self, ctx: &LinkContext, peer: &PeerInfo) -> Option<Relation> {
        let local = ctx.gen.meta.get().generations;
        let theirs = Generations {
            current: peer.volume.generation,
            history: peer.volume.history,
        };
        let rel = compare_generations(&local, &theirs);
        let judgment = if rel.primary_may_sync() {
            Judgment::Sync {
                full_copy: rel.needs_full_copy(),
            }
        } else {
            match rel {
                Relation::SplitBrain => Judgment::SplitBrain,
                Relation::PeerAhead => Judgment::PeerAhead,
                _ => Judgment::Unrelated,
            }
        };
        let mut sh = self.shared();
        let before = sh.link.sync_state();
        sh.peer_node = Some(peer.node.clone());
        let step = self.step(&mut sh, Event::Handshake(judgment), None);
        if step.illegal {
            // Parked while connecting: the connection is dropped.
            drop(sh);
            step.finish(self);
            return None;
        }
        let why = match judgment {
            Judgment::Sync { full_copy } => {
                if full_copy {
                    let size = sh.bitmap.volume_size();
                    sh.bitmap.mark(0, size);
                    info!(volume = %self.volume, peer = %self.peer, peer_node = %peer.node,
                        "mirror holds no data lineage (new, or discarded): copying the whole volume");
                } else if rel == Relation::LocalAhead {
                    info!(volume = %self.volume, peer = %self.peer, out_of_sync = sh.bitmap.dirty_bytes(),
                        "this primary wrote while the mirror was away: copying what the bitmap marks");
                }
                drop(sh);
                step.finish(self);
                return Some(rel);
            }
            Judgment::SplitBrain => format!(
                "split brain: both sides were written since they last agreed \
                 (ours {}, mirror {}); no automatic resync: run `blockmirror resync \
                 {} --discard-local` on the side whose changes are to be thrown away",
                local.to_display(),
                theirs.to_display(),
                self.volume
            ),
            Judgment::PeerAhead => format!(
                "the mirror was promoted (its generation {} descends from ours {}): \
                 not overwriting it; this side must be demoted",
                theirs.to_display(),
                local.to_display()
            ),
            Judgment::Unrelated => format!(
                "mirror data is unrelated to ours ({}: ours {}, mirror {}); \
                 run `blockmirror resync {} --discard-local` on the mirror to replace it",
                rel.as_str(),
                local.to_display(),
                theirs.to_display(),
                self.volume
            ),
        };
        if sh.link.sync_state() != before || sh.last_error.as_deref() != Some(why.as_str()) {
            warn!(volume = %self.volume, peer = %self.peer, peer_node = %peer.node, relation = rel.as_str(), "{why}");
        }
        sh.last_error = Some(why);
        drop(sh);
        // A promoted peer: the volume demotes (host writes refused) before
        // the start gate is told this link met its peer.
        step.finish(self);
        None
    }

    /// Adds what the mirror reported after the handshake to what is copied,
    /// and decides whether the bitmap can be trusted at all
    /// ([`resync_basis`]): after a promotion this node's bitmaps start
    /// empty, so a peer last in step before it is compared block by block,
    /// unless it is the old primary itself, whose report names its own
    /// writes (failback without a full copy).
    pub(super) fn take_divergence(
        &self,
        ctx: &LinkContext,
        peer: &PeerInfo,
        rel: Relation,
        was_primary: bool,
        ranges: &[(u64, u64)],
    ) {
        let meta = ctx.gen.meta.get();
        let theirs = Generations {
            current: peer.volume.generation,
            history: peer.volume.history,
        };
        let mut sh = self.shared();
        sh.maybe = None;
        let size = sh.bitmap.volume_size();
        // What the peer reports is what it *may* hold (whole activity-log
        // extents after a crash, mostly equal to ours): hashed before it is
        // sent. What our own bitmap marks is sent at once.
        let mut maybe = empty_like(&sh.bitmap);
        let mut reported = 0u64;
        for &(off, len) in ranges {
            let end = off.saturating_add(len).min(size);
            if off < end {
                maybe.mark(off, end - off);
                reported += end - off;
            }
        }
        self.counters.divergent_bytes.fetch_add(reported, Relaxed);
        if rel.needs_full_copy() {
            sh.bitmap.mark(0, size);
            return;
        }
        match resync_basis(&meta.generations, meta.promoted_from, &theirs, was_primary) {
            ResyncBasis::Bitmap => {
                if reported > 0 {
                    info!(volume = %self.volume, peer = %self.peer, reported,
                        "the mirror reports regions of its own: copying them too");
                }
            }
            ResyncBasis::BitmapAndPeer => {
                info!(volume = %self.volume, peer = %self.peer, peer_node = %peer.node, reported,
                    written_here = sh.bitmap.dirty_bytes().saturating_sub(reported),
                    out_of_sync = sh.bitmap.dirty_bytes(),
                    "failback: the old primary returns as a mirror; copying what it wrote after the \
                     promotion missed it and what was written here since");
            }
            ResyncBasis::CompareAll => {
                maybe.mark(0, size);
                info!(volume = %self.volume, peer = %self.peer, peer_node = %peer.node,
                    "nothing here records how this mirror differs (it was last in step before \
                     this node was promoted): comparing every block by checksum");
            }
        }
        // Hashed first: what is only possibly different, less what this
        // primary knows it wrote (sent at once, at the bitmap's grain).
        let own: Vec<(u64, u64)> = sh.bitmap.runs().collect();
        for (off, len) in own {
            maybe.clear(off, len);
        }
        if !maybe.is_clear() {
            sh.bitmap.union_with(&maybe).expect("same shape");
            sh.maybe = Some(maybe);
        }
    }

    pub(super) async fn connect(
        &self,
        ctx: &LinkContext,
    ) -> Result<(LinkStream, PeerInfo), LinkError> {
        let addr = self.addr;
        // Cluster mode: a primary links to its mirrors only while it holds
        // the volume's key (a node back from a partition learns first
        // whether it still is the primary).
        let fence = &ctx.gen.fence;
        if fence.is_clustered() && fence.holds() == 0 {
            return Err(LinkError::Connect {
                addr,
                message: "cluster mode: this node does not hold the volume's primary key (yet)"
                    .into(),
            });
        }
        let epoch = fence.epoch();
        let attempt = async {
            let mut s = crate::tls::dial(addr, ctx.tls.as_deref(), self.peer_name())
                .await
                .map_err(|e| match e {
                    crate::tls::DialError::Connect { source, .. } => LinkError::Connect {
                        addr,
                        message: source.to_string(),
                    },
                    e => LinkError::Tls {
                        addr,
                        message: e.to_string(),
                    },
                })?;
            let options = blockmirror_repl::ConnectOptions {
                compression: self.configured_codec,
                epoch,
                ..Default::default()
            };
            let handshake = |e: blockmirror_repl::HandshakeError| LinkError::Handshake {
                addr,
                message: e.to_string(),
            };
            let key = s.link_key(ctx.secret.as_deref()).map_err(handshake)?;
            let peer = blockmirror_repl::connect_with(&mut s, &key, &ctx.hello(), options)
                .await
                .map_err(handshake)?;
            Ok((s, peer))
        };
        tokio::time::timeout(CONNECT_TIMEOUT, attempt)
            .await
            .unwrap_or(Err(LinkError::HandshakeTimeout(CONNECT_TIMEOUT)))
    }

    pub(super) async fn serve_connection(
        self: Arc<Self>,
        stream: LinkStream,
        peer_node: String,
        ctx: &LinkContext,
        shutdown: &CancellationToken,
    ) {
        let (rd, wr) = stream.into_split();
        let (tx, rx) = mpsc::unbounded_channel();
        let cancel = shutdown.child_token();
        let epoch = {
            let mut sh = self.shared();
            // Under the lock that parking takes: either the link was parked
            // before (the event is refused) or parking sees this connection
            // and closes it.
            let step = self.step(&mut sh, Event::DivergenceRead, None);
            let adopted = step.actions.iter().find_map(|a| match a {
                Action::Adopt { epoch } => Some(*epoch),
                _ => None,
            });
            let Some(epoch) = adopted else {
                drop(sh);
                step.finish(self.as_ref());
                return;
            };
            sh.conn_cancel = Some(cancel.clone());
            sh.peer_node = Some(peer_node);
            sh.last_error = None;
            drop(sh);
            step.finish(self.as_ref());
            epoch
        };
        // A group member goes live only when every member is connected.
        if let Some((group, idx)) = self.group.get() {
            let arrived = tokio::select! {
                r = group.arrive(*idx) => r.is_ok(),
                _ = cancel.cancelled() => false,
            };
            if !arrived {
                let mut sh = self.shared();
                let step = self.step(&mut sh, Event::JoinFailed { epoch }, None);
                if sh.link.epoch() == epoch {
                    sh.conn_cancel = None;
                }
                drop(sh);
                step.finish(self.as_ref());
                return;
            }
        }
        {
            let mut sh = self.shared();
            let event = if cancel.is_cancelled() {
                Event::JoinFailed { epoch }
            } else {
                Event::Joined {
                    epoch,
                    bitmap_clear: sh.bitmap.is_clear(),
                    iterative: self.resync.initial_sync == InitialSync::Iterative,
                }
            };
            let step = self.step(&mut sh, event, None);
            let live = step
                .actions
                .iter()
                .any(|a| matches!(a, Action::GoLive { .. }));
            if live {
                sh.tx = Some(tx);
            } else if sh.link.epoch() == epoch {
                sh.conn_cancel = None;
            }
            drop(sh);
            step.finish(self.as_ref());
            if !live {
                return;
            }
        }
        let sender = tokio::spawn(sender_loop(
            FrameWriter::new(wr),
            rx,
            self.group.get().is_some().then(|| self.clone()),
            cancel.clone(),
        ));
        let catch_up = tokio::spawn(self.clone().catch_up(epoch, ctx.clone(), cancel.clone()));
        let watchdog = tokio::spawn(self.clone().watchdog(epoch, cancel.clone()));
        let flusher = tokio::spawn(self.clone().periodic_flush(cancel.clone()));
        let why = self.receive(FrameReader::new(rd), epoch, &cancel).await;
        if shutdown.is_cancelled() {
            self.stop();
        } else {
            self.fail(epoch, why);
        }
        cancel.cancel();
        let _ = sender.await;
        let _ = catch_up.await;
        let _ = watchdog.await;
        let _ = flusher.await;
    }

    /// Reads acknowledgements until the connection ends; returns why it ended.
    pub(super) async fn receive(
        &self,
        mut reader: FrameReader<LinkRead>,
        epoch: u64,
        cancel: &CancellationToken,
    ) -> LinkError {
        // Acknowledgements that one read brought are settled together.
        let mut ids: Vec<u64> = Vec::new();
        let reason = loop {
            let frame = match reader.next_buffered() {
                Ok(Some(f)) => Ok(Some(f)),
                Ok(None) => {
                    if !ids.is_empty() {
                        self.acked(&ids, epoch);
                        ids.clear();
                    }
                    tokio::select! {
                        _ = cancel.cancelled() => break LinkError::Closed,
                        f = reader.next() => f,
                    }
                }
                Err(e) => Err(e),
            };
            match frame {
                Ok(Some(Frame::Ack { id })) | Ok(Some(Frame::Pong { id })) => ids.push(id),
                Ok(Some(Frame::HashReply { id, hash })) => {
                    self.hashes.lock().expect("poisoned").insert(id, hash);
                    ids.push(id);
                }
                Ok(Some(Frame::Nack { id, errno, message })) => {
                    break LinkError::Nack { id, errno, message };
                }
                Ok(Some(Frame::Error { code, message, .. })) => {
                    break LinkError::PeerError {
                        code: format!("{code:?}"),
                        message,
                    };
                }
                Ok(Some(f)) => break LinkError::UnexpectedFrame(format!("{:?}", f.kind())),
                Ok(None) => break LinkError::Closed,
                Err(e) => break LinkError::Io(e.to_string()),
            }
        };
        // What was acknowledged before the link ended is on the mirror.
        self.acked(&ids, epoch);
        reason
    }

    /// Asks the mirror to flush when it acknowledged writes since the last
    /// flush, so that what a mirror crash can lose stays a second's worth.
    pub(super) async fn periodic_flush(self: Arc<Self>, cancel: CancellationToken) {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(PERIODIC_FLUSH) => {}
            }
            if self.shared().unflushed.is_clear() {
                continue;
            }
            if let Some(p) = self.prepare_flush() {
                let sent = self.send(p, &MirrorOp::Flush);
                let _ = self.wait(sent).await;
            }
        }
    }

    /// Fails the connection when a request has waited longer than the
    /// timeout; warns when one has waited half of it.
    pub(super) async fn watchdog(self: Arc<Self>, epoch: u64, cancel: CancellationToken) {
        let tick = (self.timeout / 4).clamp(Duration::from_millis(5), Duration::from_secs(1));
        let mut warned = 0u64;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(tick) => {}
            }
            let probe = {
                let sh = self.shared();
                let now = Instant::now();
                match sh
                    .inflight
                    .iter()
                    .filter_map(|(id, p)| p.sent.map(|t| (now.saturating_duration_since(t), *id)))
                    .max()
                {
                    Some(x) => Err(x),
                    None => Ok(()),
                }
            };
            let (oldest, id) = match probe {
                Err(x) => x,
                Ok(()) => {
                    // Idle: probe, so a dead peer is noticed before a host
                    // write has to wait for it. The probe is a request like
                    // any other: unanswered, it trips this watchdog.
                    if let p @ Prepared::Live { .. } = self.prepare_live(0, 0) {
                        if let Sent::Waiting(rx) = self.send(p, &MirrorOp::Ping) {
                            drop(rx);
                        }
                    }
                    continue;
                }
            };
            if oldest >= self.timeout {
                self.fail(
                    epoch,
                    LinkError::Timeout {
                        id,
                        waited_ms: oldest.as_millis() as u64,
                    },
                );
                return;
            }
            if oldest >= self.timeout / 2 && id != warned {
                warned = id;
                warn!(volume = %self.volume, peer = %self.peer, id, waited_ms = oldest.as_millis() as u64, "mirror request outstanding long");
            }
        }
    }

    /// Fails the connection of `epoch`: every request in flight fails and
    /// its region is marked; the link is degraded until it reconnects and
    /// catches up. A failure of an older connection changes nothing.
    pub fn fail(&self, epoch: u64, why: LinkError) {
        let cause = why.cause();
        self.drive(
            Event::Lost {
                epoch: Some(epoch),
                cause,
            },
            Some(why),
        );
    }

    /// The node is shutting down: the link closes as a failure would (its
    /// requests fail and are marked), but that is expected, not reported.
    /// Once: a stopped link takes no more events.
    pub(super) fn stop(&self) {
        let step = {
            let mut sh = self.shared();
            if sh.link.phase() == Phase::Stopped {
                return;
            }
            self.step(&mut sh, Event::Stop, Some(LinkError::Shutdown))
        };
        step.finish(self);
    }
}
