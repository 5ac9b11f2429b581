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
//! Operations are applied one after another, in the order they arrive: the
//! primary sends overlapping writes in the order it applied them locally, so
//! this keeps both images equal. Acknowledgements are batched by a writer
//! task. (A parallel apply engine is a later step.)
//!
//! Durability never holds the queue up: a FLUSH covers what was applied
//! before it, so its fdatasync runs in the background while later writes
//! are applied, and its acknowledgement goes out when the sync returns. A
//! FUA write is applied in order like any other, then acknowledged after a
//! background sync.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use blockmirror_repl::{ErrorCode, Frame, FrameReader, FrameWriter, VolumeIdentity};
use blockmirror_storage::{Backend, StorageError};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

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
}

impl MirrorTarget {
    pub fn new(name: &str, identity: VolumeIdentity, backend: Arc<dyn Backend>) -> Self {
        Self {
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
async fn apply_loop(stream: TcpStream, t: &MirrorTarget, shutdown: CancellationToken) -> String {
    let (rd, wr) = stream.into_split();
    let mut reader = FrameReader::new(rd);
    let (tx, rx) = mpsc::unbounded_channel::<Vec<Frame>>();
    let writer = tokio::spawn(ack_writer(FrameWriter::new(wr), rx));
    let size = t.identity.size;
    // Replies to everything one read brought, sent to the writer together.
    let mut acks: Vec<Frame> = Vec::new();
    let reason = loop {
        let frame = match reader.next_buffered() {
            Ok(Some(f)) => Ok(Some(f)),
            Ok(None) => {
                if !acks.is_empty() && tx.send(std::mem::take(&mut acks)).is_err() {
                    break "primary went away".into();
                }
                tokio::select! {
                    _ = shutdown.cancelled() => break "link closed (replaced, or the node is shutting down)".to_string(),
                    f = reader.next() => f,
                }
            }
            Err(e) => Err(e),
        };
        let frame = match frame {
            Ok(Some(f)) => f,
            Ok(None) => break "primary closed the link".into(),
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
        let reply = match frame {
            Frame::Write {
                id,
                offset,
                fua,
                data,
            } => {
                let len = data.len() as u64;
                let applied = reply(id, in_range(offset, len, size), || {
                    apply(t, move |b| b.write_at(&data, offset, false), true)
                })
                .await;
                if applied.is_ok() {
                    t.applied_bytes.fetch_add(len, Relaxed);
                    if fua {
                        background_flush(t, id, tx.clone());
                        t.applied_ops.fetch_add(1, Relaxed);
                        continue;
                    }
                }
                applied
            }
            Frame::Flush { id } => {
                background_flush(t, id, tx.clone());
                t.applied_ops.fetch_add(1, Relaxed);
                continue;
            }
            Frame::Trim {
                id,
                offset,
                len,
                fua,
            } => {
                reply(id, in_range(offset, u64::from(len), size), || {
                    apply(
                        t,
                        move |b| {
                            b.trim(offset, u64::from(len))?;
                            if fua {
                                b.flush()?;
                            }
                            Ok(())
                        },
                        false,
                    )
                })
                .await
            }
            Frame::WriteZeroes {
                id,
                offset,
                len,
                fua,
                may_trim,
            } => {
                reply(id, in_range(offset, u64::from(len), size), || {
                    apply(
                        t,
                        move |b| b.write_zeroes(offset, u64::from(len), may_trim, fua),
                        false,
                    )
                })
                .await
            }
            Frame::Ping { id } => Ok(Frame::Pong { id }),
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
        t.applied_ops.fetch_add(1, Relaxed);
        acks.push(reply.unwrap_or_else(|nack| nack));
        if acks.len() >= 256 && tx.send(std::mem::take(&mut acks)).is_err() {
            break "primary went away".into();
        }
    };
    if !acks.is_empty() {
        let _ = tx.send(acks);
    }
    drop(tx);
    let _ = writer.await;
    reason
}

/// Makes everything applied so far durable without holding up what comes
/// next; acknowledges request `id` when done.
fn background_flush(t: &MirrorTarget, id: u64, tx: mpsc::UnboundedSender<Vec<Frame>>) {
    let b = t.backend.clone();
    tokio::spawn(async move {
        let r = tokio::task::spawn_blocking(move || b.flush()).await;
        let frame = match r {
            Ok(Ok(())) => Frame::Ack { id },
            Ok(Err(e)) => {
                warn!(error = %e, "mirror flush failed");
                Frame::Nack {
                    id,
                    errno: 5,
                    message: e.to_string(),
                }
            }
            Err(e) => Frame::Nack {
                id,
                errno: 5,
                message: e.to_string(),
            },
        };
        let _ = tx.send(vec![frame]);
    });
}

fn in_range(offset: u64, len: u64, size: u64) -> Result<(), String> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(format!("range {offset}+{len} past the end ({size})")),
    }
}

/// Runs `op` after the range check; Ack on success, Nack with the errno otherwise.
async fn reply<F, Fut>(id: u64, range: Result<(), String>, op: F) -> Result<Frame, Frame>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<(), StorageError>>,
{
    if let Err(message) = range {
        return Err(Frame::Nack {
            id,
            errno: 22,
            message,
        });
    }
    match op().await {
        Ok(()) => Ok(Frame::Ack { id }),
        Err(e) => {
            warn!(error = %e, "mirror apply failed");
            Err(Frame::Nack {
                id,
                errno: if e.is_no_space() { 28 } else { 5 },
                message: e.to_string(),
            })
        }
    }
}

/// Runs a backend call inline when it is cheap, else on the blocking pool.
async fn apply<F>(t: &MirrorTarget, f: F, inline_ok: bool) -> Result<(), StorageError>
where
    F: FnOnce(&dyn Backend) -> Result<(), StorageError> + Send + 'static,
{
    if inline_ok && t.backend.is_fast() {
        return f(t.backend.as_ref());
    }
    let b = t.backend.clone();
    match tokio::task::spawn_blocking(move || f(b.as_ref())).await {
        Ok(r) => r,
        Err(e) => Err(StorageError::new(
            &t.name,
            blockmirror_storage::Op::Write,
            0,
            0,
            std::io::Error::other(e.to_string()),
        )),
    }
}

async fn ack_writer(
    mut w: FrameWriter<tokio::net::tcp::OwnedWriteHalf>,
    mut rx: mpsc::UnboundedReceiver<Vec<Frame>>,
) {
    while let Some(batch) = rx.recv().await {
        batch.iter().for_each(|f| w.queue(f));
        while let Ok(batch) = rx.try_recv() {
            batch.iter().for_each(|f| w.queue(f));
        }
        if let Err(e) = w.flush().await {
            debug!(error = %e, "ack writer stopped");
            return;
        }
    }
}
