//! The primary's end of a job connection (seed 002), shared by verify and
//! remote reads: TCP (and TLS with `[tls]`) and the handshake with `Purpose::Jobs`, a sender task
//! that batches queued frames into vectored writes, and a reader task that
//! routes each reply to its waiter by request id, in whatever order they
//! come. A `JobNotReady` is only an interim answer (the data is pushed
//! later, for the same id): it is counted, and the waiter keeps waiting.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use blockmirror_repl::{connect_for, Frame, FrameReader, FrameWriter, Purpose};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::primary::link::LinkContext;

type Waiters = Arc<Mutex<HashMap<u64, oneshot::Sender<Frame>>>>;

/// Why a call got no reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallError {
    /// The connection ended (or was never usable) before the reply.
    Lost,
    /// No reply within the call's timeout.
    Timeout,
}

/// One job connection; dropping it closes the connection.
pub struct JobConn {
    tx: mpsc::UnboundedSender<Frame>,
    waiters: Waiters,
    next_id: AtomicU64,
    alive: Arc<AtomicBool>,
    _cancel: tokio_util::sync::DropGuard,
}

impl JobConn {
    /// Connects to the mirror at `addr` as the primary `ctx` describes,
    /// within `timeout`. `on_not_ready` runs for every `JobNotReady`.
    pub async fn open(
        addr: SocketAddr,
        peer_name: Option<&str>,
        ctx: &LinkContext,
        timeout: Duration,
        on_not_ready: impl Fn() + Send + 'static,
    ) -> Result<JobConn, String> {
        let attempt = async {
            let mut s = crate::tls::dial(addr, ctx.tls.as_deref(), peer_name)
                .await
                .map_err(|e| e.to_string())?;
            let key = s
                .link_key(ctx.secret.as_deref())
                .map_err(|e| e.to_string())?;
            connect_for(&mut s, &key, &ctx.hello(), Purpose::Jobs)
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(s)
        };
        let stream = tokio::time::timeout(timeout, attempt)
            .await
            .unwrap_or_else(|_| Err(format!("no handshake within {timeout:?}")))?;
        let (rd, wr) = stream.into_split();
        let cancel = CancellationToken::new();
        let (tx, mut rx) = mpsc::unbounded_channel::<Frame>();
        let waiters: Waiters = Arc::default();
        let alive = Arc::new(AtomicBool::new(true));
        let (c, al) = (cancel.clone(), alive.clone());
        tokio::spawn(async move {
            let mut w = FrameWriter::new(wr);
            loop {
                let f = tokio::select! {
                    _ = c.cancelled() => break,
                    f = rx.recv() => f,
                };
                let Some(f) = f else { break };
                w.queue(&f);
                while let Ok(f) = rx.try_recv() {
                    w.queue(&f);
                }
                if w.flush().await.is_err() {
                    break;
                }
            }
            al.store(false, Relaxed);
        });
        let (c, ws, al) = (cancel.clone(), waiters.clone(), alive.clone());
        tokio::spawn(async move {
            let mut r = FrameReader::new(rd);
            loop {
                let f = tokio::select! {
                    _ = c.cancelled() => break,
                    f = r.next() => f,
                };
                match f {
                    Ok(Some(Frame::JobNotReady { .. })) => on_not_ready(),
                    Ok(Some(f)) => {
                        if let Some(w) = ws.lock().expect("poisoned").remove(&f.id()) {
                            let _ = w.send(f);
                        }
                    }
                    _ => break,
                }
            }
            al.store(false, Relaxed);
            // Waiters still registered see their sender dropped.
            ws.lock().expect("poisoned").clear();
        });
        Ok(JobConn {
            tx,
            waiters,
            next_id: AtomicU64::new(1),
            alive,
            _cancel: cancel.drop_guard(),
        })
    }

    /// Whether both of the connection's tasks still run.
    pub fn is_alive(&self) -> bool {
        self.alive.load(Relaxed)
    }

    /// Sends the request `make` builds for a fresh request id and waits for
    /// its reply (a JobError is a reply too).
    pub async fn call(
        &self,
        make: impl FnOnce(u64) -> Frame,
        timeout: Duration,
    ) -> Result<Frame, CallError> {
        let id = self.next_id.fetch_add(1, Relaxed);
        let (done, rx) = oneshot::channel();
        self.waiters.lock().expect("poisoned").insert(id, done);
        if self.tx.send(make(id)).is_err() {
            self.waiters.lock().expect("poisoned").remove(&id);
            return Err(CallError::Lost);
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(f)) => Ok(f),
            Ok(Err(_)) => Err(CallError::Lost),
            Err(_) => {
                self.waiters.lock().expect("poisoned").remove(&id);
                Err(CallError::Timeout)
            }
        }
    }
}
