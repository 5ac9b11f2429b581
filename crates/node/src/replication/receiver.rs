//! The mirror's side: the replication listener, and the loop that applies
//! what the authenticated primary sends.
//!
//! Only an authenticated primary changes a mirror volume (its NBD export is
//! read-only). One primary at a time feeds a volume: a link from another
//! primary node while one is connected is refused with an Error frame. A new
//! link from the *same* primary replaces the old one (which may be a
//! half-open leftover of a partition): the old apply loop is cancelled and
//! the new one starts only after it has stopped, so no frame of the old
//! link can be applied after one of the new.
//!
//! Operations are handed, in arrival order, to the apply engine
//! ([`super::apply`], seed 003): many tasks write the backend at once, and
//! operations whose ranges overlap apply in arrival order (the primary sends
//! overlapping writes in the order it applied them locally, so both images
//! stay equal). Each operation is acknowledged as soon as it is applied, in
//! whatever order they finish; the primary matches acknowledgements by id.
//!
//! Durability never holds the queue up: a FLUSH waits only for the
//! operations that arrived before it, runs its fdatasync on a task of its
//! own while later writes go on, and is acknowledged when the sync returns.
//! A FUA write is written with RWF_DSYNC on its task.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use blockmirror_repl::{ErrorCode, Frame, FrameReader, FrameWriter, VolumeIdentity};
use blockmirror_storage::Backend;

use super::apply::{Applied, ApplyConfig, ApplyEngine, ApplyMetrics, ApplyOp};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The apply tag of an operation nobody waits for (a Barrier with id 0).
const UNANSWERED: u64 = u64::MAX;

/// A mirror volume as the receiver sees it.
pub struct MirrorTarget {
    pub name: String,
    pub identity: VolumeIdentity,
    pub backend: Arc<dyn Backend>,
    /// The link feeding it now: primary node, connection number, and what
    /// cancels that link.
    current: Mutex<Option<(String, u64, CancellationToken)>>,
    next_conn: AtomicU64,
    /// Held by the running apply loop: one at a time, strictly.
    apply_slot: Arc<tokio::sync::Semaphore>,
    pub applied_bytes: AtomicU64,
    pub applied_ops: AtomicU64,
    /// How the apply engine is cut up, and what it has done.
    pub apply: ApplyConfig,
    pub apply_metrics: Arc<ApplyMetrics>,
}

impl MirrorTarget {
    pub fn new(
        name: &str,
        identity: VolumeIdentity,
        backend: Arc<dyn Backend>,
        apply: ApplyConfig,
    ) -> Self {
        Self {
            apply,
            apply_metrics: Arc::new(ApplyMetrics::new(apply.groups)),
            name: name.to_owned(),
            identity,
            backend,
            current: Mutex::new(None),
            next_conn: AtomicU64::new(1),
            apply_slot: Arc::new(tokio::sync::Semaphore::new(1)),
            applied_bytes: AtomicU64::new(0),
            applied_ops: AtomicU64::new(0),
        }
    }

    pub fn primary(&self) -> Option<String> {
        self.current
            .lock()
            .expect("poisoned")
            .as_ref()
            .map(|(node, _, _)| node.clone())
    }
}

/// Accepts replication links until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    node: String,
    secret: Arc<[u8]>,
    targets: Arc<HashMap<String, Arc<MirrorTarget>>>,
    jobs: Arc<super::jobs::JobService>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let tracker = TaskTracker::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            a = listener.accept() => match a {
                Ok(x) => x,
                Err(e) => {
                    warn!(error = %e, "replication accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let (node, secret, targets, jobs, shutdown) = (
            node.clone(),
            secret.clone(),
            targets.clone(),
            jobs.clone(),
            shutdown.clone(),
        );
        tracker.spawn(async move {
            handle(
                stream,
                peer.to_string(),
                &node,
                &secret,
                &targets,
                jobs,
                shutdown,
            )
            .await;
        });
    }
    tracker.close();
    tracker.wait().await;
    Ok(())
}

async fn handle(
    mut stream: TcpStream,
    peer: String,
    node: &str,
    secret: &[u8],
    targets: &HashMap<String, Arc<MirrorTarget>>,
    jobs: Arc<super::jobs::JobService>,
    shutdown: CancellationToken,
) {
    let _ = stream.set_nodelay(true);
    let lookup = |name: &str| targets.get(name).map(|t| t.identity.clone());
    let hs = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        blockmirror_repl::accept_any(&mut stream, secret, node, lookup),
    )
    .await;
    // A job connection (verify, remote read) goes to the job handler, never
    // near the replication link's replacement logic below.
    if let Ok(Ok((primary, volume, blockmirror_repl::Purpose::Jobs))) = hs {
        return jobs.serve(stream, primary, &volume.name, shutdown).await;
    }
    let hs = hs.map(|r| r.map(|(p, v, _)| (p, v)));
    let (primary, volume) = match hs {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => {
            warn!(%peer, error = %e, "replication peer refused");
            return;
        }
        Err(_) => {
            warn!(%peer, "replication peer refused: no handshake within {HANDSHAKE_TIMEOUT:?}");
            return;
        }
    };
    let Some(target) = targets.get(&volume.name).cloned() else {
        return;
    };
    let conn = target.next_conn.fetch_add(1, Relaxed);
    let token = shutdown.child_token();
    let busy = {
        let mut current = target.current.lock().expect("poisoned");
        match current.as_ref() {
            Some((node, _, _)) if *node != primary.node => Some(format!(
                "volume {} is already fed by primary {node}",
                target.name
            )),
            other => {
                if let Some((_, old, old_token)) = other {
                    info!(volume = %target.name, primary = %primary.node, old_link = old,
                        "a new link from the same primary replaces the old one");
                    old_token.cancel();
                }
                *current = Some((primary.node.clone(), conn, token.clone()));
                None
            }
        }
    };
    if let Some(msg) = busy {
        warn!(%peer, primary = %primary.node, "{msg}; refusing the second link");
        let mut w = FrameWriter::new(stream);
        let _ = w
            .send(&Frame::Error {
                id: 0,
                code: ErrorCode::Busy,
                message: msg,
            })
            .await;
        return;
    }
    // Wait until a replaced link's apply loop has stopped.
    let slot = tokio::select! {
        p = target.apply_slot.clone().acquire_owned() => p.expect("never closed"),
        _ = token.cancelled() => return,
    };
    info!(volume = %target.name, primary = %primary.node, %peer, "replication link up");
    let reason = apply_loop(stream, &target, token).await;
    drop(slot);
    {
        let mut current = target.current.lock().expect("poisoned");
        if current.as_ref().is_some_and(|(_, c, _)| *c == conn) {
            *current = None;
        }
    }
    info!(volume = %target.name, primary = %primary.node, %reason, "replication link down");
}

/// Applies frames until the link ends; returns why it ended.
///
/// Frames are decoded in arrival order and handed to the apply engine
/// ([`super::apply`]), which runs them on many tasks while keeping
/// overlapping ones in order. Acknowledgements are collected as operations
/// finish and written, in one vectored write, whenever the loop would wait
/// (no hand-off to another task: one wake-up less per batch). The primary
/// reads acknowledgements on a task of its own, so that write does not wait
/// on the primary's sending. While the engine is full the socket is not read
/// (back-pressure to the primary).
async fn apply_loop(stream: TcpStream, t: &MirrorTarget, shutdown: CancellationToken) -> String {
    let (rd, wr) = stream.into_split();
    let mut reader = FrameReader::new(rd);
    let mut writer = FrameWriter::new(wr);
    let mut engine = match ApplyEngine::new(t.backend.clone(), t.apply, t.apply_metrics.clone()) {
        Ok(e) => e,
        Err(e) => {
            warn!(volume = %t.name, error = %e, "cannot apply");
            let _ = writer
                .send(&Frame::Error {
                    id: 0,
                    code: ErrorCode::Protocol,
                    message: e.to_string(),
                })
                .await;
            return e.to_string();
        }
    };
    let size = t.identity.size;
    // Replies gathered until the loop would wait, then sent together.
    let mut acks: Vec<Frame> = Vec::new();
    let mut applied: Vec<Applied> = Vec::new();
    let reason = loop {
        engine.ready(&mut applied);
        to_acks(t, &mut applied, &mut acks);
        let frame = if engine.is_full() {
            None
        } else {
            match reader.next_buffered() {
                Ok(f) => f.map(Ok),
                Err(e) => Some(Err(e)),
            }
        };
        let frame = match frame {
            Some(f) => f,
            None => {
                // About to wait: reply to everything so far first.
                engine.publish();
                if let Err(why) = send_acks(&mut writer, &mut acks, &shutdown).await {
                    break why;
                }
                if engine.is_full() {
                    t.apply_metrics.full_stalls.fetch_add(1, Relaxed);
                }
                tokio::select! {
                    _ = shutdown.cancelled() => break "link closed (replaced, or the node is shutting down)".to_string(),
                    _ = engine.completions(&mut applied) => continue,
                    f = reader.next(), if !engine.is_full() => match f {
                        Ok(Some(f)) => Ok(f),
                        Ok(None) => break "primary closed the link".into(),
                        Err(e) => Err(e),
                    },
                }
            }
        };
        let frame = match frame {
            Ok(f) => f,
            Err(e) => {
                // Corrupted or truncated: nothing of this frame was applied.
                warn!(volume = %t.name, error = %e, "closing replication link");
                acks.push(Frame::Error {
                    id: 0,
                    code: ErrorCode::Protocol,
                    message: e.to_string(),
                });
                break e.to_string();
            }
        };
        let (id, range, op) = match frame {
            Frame::Write {
                id,
                offset,
                fua,
                data,
            } => (
                id,
                in_range(offset, data.len() as u64, size),
                ApplyOp::Write { offset, data, fua },
            ),
            Frame::Flush { id } => (id, Ok(()), ApplyOp::Flush),
            // An asynchronous primary's epoch boundary: what follows waits
            // for everything before it (crash consistency, DESIGN.md 2).
            Frame::Barrier { id, durable } => (
                if id == 0 { UNANSWERED } else { id },
                Ok(()),
                ApplyOp::Barrier { durable },
            ),
            Frame::Trim {
                id,
                offset,
                len,
                fua,
            } => (
                id,
                in_range(offset, u64::from(len), size),
                ApplyOp::Trim {
                    offset,
                    len: u64::from(len),
                    fua,
                },
            ),
            Frame::WriteZeroes {
                id,
                offset,
                len,
                fua,
                may_trim,
            } => (
                id,
                in_range(offset, u64::from(len), size),
                ApplyOp::Zeroes {
                    offset,
                    len: u64::from(len),
                    may_trim,
                    fua,
                },
            ),
            Frame::Ping { id } => {
                acks.push(Frame::Pong { id });
                continue;
            }
            f => {
                let msg = format!("unexpected {:?} frame on an established link", f.kind());
                acks.push(Frame::Error {
                    id: f.id(),
                    code: ErrorCode::Protocol,
                    message: msg.clone(),
                });
                break msg;
            }
        };
        match range {
            Ok(()) => engine.submit(id, op, &mut applied),
            Err(message) => {
                t.applied_ops.fetch_add(1, Relaxed);
                acks.push(Frame::Nack {
                    id,
                    errno: 22,
                    message,
                });
            }
        }
        if acks.len() >= 256 {
            if let Err(why) = send_acks(&mut writer, &mut acks, &shutdown).await {
                break why;
            }
        }
    };
    // What is running finishes (never half-applied); what has not started
    // is dropped, unacknowledged, so the primary has it marked for resync.
    applied.extend(engine.drain().await);
    to_acks(t, &mut applied, &mut acks);
    let _ = send_acks(&mut writer, &mut acks, &shutdown).await;
    reason
}

/// Writes the gathered replies; gives up when the node shuts down (a
/// primary that stopped reading must not hold the shutdown).
async fn send_acks(
    w: &mut FrameWriter<tokio::net::tcp::OwnedWriteHalf>,
    acks: &mut Vec<Frame>,
    shutdown: &CancellationToken,
) -> Result<(), String> {
    if acks.is_empty() {
        return Ok(());
    }
    acks.iter().for_each(|f| w.queue(f));
    acks.clear();
    tokio::select! {
        // A flush that can finish at once does, even during shutdown.
        biased;
        r = w.flush() => r.map_err(|e| format!("primary went away: {e}")),
        _ = shutdown.cancelled() => Err("link closed (replaced, or the node is shutting down)".into()),
    }
}

/// Turns applied operations into Ack or Nack frames, and counts them.
fn to_acks(t: &MirrorTarget, applied: &mut Vec<Applied>, acks: &mut Vec<Frame>) {
    for a in applied.drain(..) {
        if a.tag == UNANSWERED {
            // An epoch barrier with id 0: the primary does not wait for it.
            continue;
        }
        t.applied_ops.fetch_add(1, Relaxed);
        acks.push(match a.result {
            Ok(()) => {
                t.applied_bytes.fetch_add(a.written, Relaxed);
                Frame::Ack { id: a.tag }
            }
            Err(e) => {
                warn!(error = %e, "mirror apply failed");
                Frame::Nack {
                    id: a.tag,
                    errno: if e.is_no_space() { 28 } else { 5 },
                    message: e.to_string(),
                }
            }
        });
    }
}

fn in_range(offset: u64, len: u64, size: u64) -> Result<(), String> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(format!("range {offset}+{len} past the end ({size})")),
    }
}
