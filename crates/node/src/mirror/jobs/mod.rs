//! The mirror's job handler (seed 002): verify hashes and remote reads that
//! a primary asks for on a *job connection*, beside its replication link.
//!
//! One [`JobService`] per mirror node holds the device records (one per
//! mirror volume) and the one bounded job table of
//! [`blockmirror_core::jobs`]. A request naming the invalid link id (0)
//! opens a job in the first free slot and every reply carries the job's
//! link id; a full table answers `JobError(Busy)` at once, never waits.
//! Jobs end when the primary closes them, when a fetch times out, or when
//! their connection ends. A connection that brings no frame for the idle
//! timeout (the node's `job_idle_timeout`, [`DEFAULT_IDLE_TIMEOUT`] by
//! default) while none of its requests is being worked on is closed: a
//! primary that vanished without a FIN (power loss, partition) does not hold
//! its slots in the table for ever.
//!
//! A slow backend never blocks the connection: the reader task only parses
//! frames and hands each request to its own task (at most
//! [`MAX_REQUESTS_PER_CONNECTION`] at once; replies go out in completion
//! order, keyed by request id). A remote read that the page cache cannot
//! answer at once gets an immediate `JobNotReady` (seed 002's "data not
//! found": the track is being fetched) and the data follows, pushed as a
//! `JobData` for the same request id the moment the read completes. The
//! seed's requester polled every 100 ms; here nobody polls, and the
//! requester learns the data is coming without asking again. A fetch that
//! takes longer than the fetch timeout (the seed's 4 s by default) ends the
//! job with `JobError(Timeout)`, which is distinct from "not ready".

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use blockmirror_core::jobs::{DeviceId, JobError, JobTable, LinkId};
use blockmirror_repl::{
    Frame, FrameReader, FrameWriter, JobErrorCode, PeerInfo, DIGEST_LEN, MAX_DATA,
};
use blockmirror_storage::Backend;
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::daemon::metrics;

/// Jobs one mirror node keeps at once, all volumes together.
pub const MAX_JOBS: usize = 64;
/// Requests of one job connection being worked on at once; the reader
/// stops reading (back-pressure) while this many are.
pub const MAX_REQUESTS_PER_CONNECTION: usize = 16;
/// Replies queued for one connection's writer.
const REPLY_QUEUE: usize = 64;
/// How long a fetch may take before its job ends with a timeout (seed
/// 002's four seconds); a node's `job_timeout` key sets it.
pub const DEFAULT_FETCH_TIMEOUT: Duration = crate::daemon::config::DEFAULT_JOB_TIMEOUT;
/// How long a job connection may stay idle (no frame, no request being
/// worked on) before it is closed; a node's `job_idle_timeout` key sets it.
pub const DEFAULT_IDLE_TIMEOUT: Duration = crate::daemon::config::DEFAULT_JOB_IDLE_TIMEOUT;
/// The retry interval a `JobNotReady` suggests (seed 002's 100 ms). A
/// requester of this build does not retry: the data is pushed.
pub const RETRY_HINT_MS: u32 = 100;

/// A device record's constants (copied into every job record).
#[derive(Clone)]
pub struct DeviceConstants {
    pub volume: String,
    pub size: u64,
    pub backend: Arc<dyn Backend>,
}

/// A device record's shared parameters.
#[derive(Default)]
pub struct DeviceShared {
    /// Jobs ever opened on the device.
    pub opened: u64,
}

/// A job record's own data.
pub struct JobData {
    /// The connection that opened the job (only it may use the job).
    pub conn: u64,
    pub peer: String,
    pub opened: Instant,
    pub requests: u64,
    pub bytes: u64,
}

/// Counters for /metrics.
#[derive(Default)]
pub struct JobCounters {
    pub opened: AtomicU64,
    pub busy: AtomicU64,
    pub not_ready: AtomicU64,
    pub timeouts: AtomicU64,
    /// Job connections closed for being idle.
    pub idle_closed: AtomicU64,
    pub hashed_bytes: AtomicU64,
    pub read_bytes: AtomicU64,
}

type Table = JobTable<DeviceConstants, DeviceShared, JobData>;

/// The mirror node's device records and job table.
pub struct JobService {
    table: Mutex<Table>,
    devices: std::sync::RwLock<HashMap<String, DeviceId>>,
    next_conn: AtomicU64,
    fetch_timeout: Duration,
    idle_timeout: Duration,
    /// Hash read buffers, reused (a fresh 4 MiB buffer per request costs
    /// a page fault per 4 KiB).
    buffers: Mutex<Vec<Vec<u8>>>,
    pub counters: JobCounters,
}

impl JobService {
    /// A service for `volumes` (one device record each). `mirror_id` goes
    /// into every link id this node issues.
    pub fn new(
        mirror_id: u16,
        capacity: usize,
        fetch_timeout: Duration,
        volumes: impl IntoIterator<Item = DeviceConstants>,
    ) -> Self {
        let mut table = Table::new(mirror_id, capacity);
        let devices = volumes
            .into_iter()
            .map(|c| {
                let name = c.volume.clone();
                (name, table.add_device(c, DeviceShared::default()))
            })
            .collect();
        Self {
            table: Mutex::new(table),
            devices: std::sync::RwLock::new(devices),
            next_conn: AtomicU64::new(1),
            fetch_timeout,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            buffers: Mutex::new(Vec::new()),
            counters: JobCounters::default(),
        }
    }

    /// Sets how long a job connection may stay idle (the node's
    /// `job_idle_timeout`).
    pub fn with_idle_timeout(mut self, idle: Duration) -> Self {
        self.idle_timeout = idle;
        self
    }

    /// Adds a device record for a volume opened while the node runs.
    pub fn add_device(&self, c: DeviceConstants) {
        let name = c.volume.clone();
        let id = self.table().add_device(c, DeviceShared::default());
        self.devices.write().expect("poisoned").insert(name, id);
    }

    /// A mirror id from the node's name (link ids name their mirror).
    pub fn mirror_id_for(node: &str) -> u16 {
        let h = blake3::hash(node.as_bytes());
        u16::from_be_bytes([h.as_bytes()[0], h.as_bytes()[1]])
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().expect("job table poisoned")
    }

    /// Live jobs, all volumes.
    pub fn live_jobs(&self) -> usize {
        self.table().len()
    }

    pub fn capacity(&self) -> usize {
        self.table().capacity()
    }

    /// Live jobs of one volume (its device record's job count).
    pub fn jobs_of(&self, volume: &str) -> usize {
        let device = self.devices.read().expect("poisoned").get(volume).copied();
        device
            .and_then(|d| self.table().device(d).map(|r| r.job_count()))
            .unwrap_or(0)
    }

    /// Registers the job table's families (a mirror node's) for /metrics.
    pub fn register_metrics(self: &Arc<Self>, registry: &mut metrics::Registry) {
        let me = self.clone();
        registry.register_collector(metrics::FnCollector::boxed("jobs", move |enc| {
            me.encode_metrics(enc)
        }));
    }

    fn encode_metrics(&self, enc: &mut metrics::Encoder<'_>) -> std::fmt::Result {
        use crate::daemon::metrics::{family, MetricType};
        let c = &self.counters;
        let (live, cap) = {
            let t = self.table();
            (t.len(), t.capacity())
        };
        let families: [(&str, MetricType, &str, f64); 7] = [
            (
                "blockmirror_jobs_live",
                MetricType::Gauge,
                "Jobs (verify, remote read) open on this mirror node.",
                live as f64,
            ),
            (
                "blockmirror_jobs_capacity",
                MetricType::Gauge,
                "Size of this mirror node's job table.",
                cap as f64,
            ),
            (
                "blockmirror_jobs_opened_total",
                MetricType::Counter,
                "Jobs opened.",
                c.opened.load(Relaxed) as f64,
            ),
            (
                "blockmirror_jobs_busy_total",
                MetricType::Counter,
                "Job requests refused because the table was full.",
                c.busy.load(Relaxed) as f64,
            ),
            (
                "blockmirror_jobs_not_ready_total",
                MetricType::Counter,
                "Remote reads answered 'not ready' while fetched from disk.",
                c.not_ready.load(Relaxed) as f64,
            ),
            (
                "blockmirror_jobs_timeouts_total",
                MetricType::Counter,
                "Jobs ended because a fetch took longer than the fetch timeout.",
                c.timeouts.load(Relaxed) as f64,
            ),
            (
                "blockmirror_jobs_idle_closed_total",
                MetricType::Counter,
                "Job connections closed after carrying no request for the idle timeout.",
                c.idle_closed.load(Relaxed) as f64,
            ),
        ];
        for (name, kind, help, v) in families {
            let mut f = family(enc, name, kind, help)?;
            f.sample(&[], v)?;
        }
        Ok(())
    }

    /// The job named by `link` for connection `conn`, or a new one on
    /// `device` when `link` is the invalid link id.
    fn job_for(
        &self,
        device: DeviceId,
        conn: u64,
        peer: &str,
        link: u64,
    ) -> Result<(LinkId, DeviceConstants), (JobErrorCode, String)> {
        let mut t = self.table();
        let link = LinkId::from_u64(link);
        if link.is_invalid() {
            return match t.open(
                device,
                JobData {
                    conn,
                    peer: peer.to_owned(),
                    opened: Instant::now(),
                    requests: 0,
                    bytes: 0,
                },
            ) {
                Ok(l) => {
                    if let Some(d) = t.device_mut(device) {
                        d.shared.opened += 1;
                    }
                    self.counters.opened.fetch_add(1, Relaxed);
                    let c = t.get(l).expect("just opened").constants.clone();
                    debug!(volume = %c.volume, %peer, link = %l, jobs = t.len(), "job opened");
                    Ok((l, c))
                }
                Err(e @ JobError::Full { .. }) => {
                    self.counters.busy.fetch_add(1, Relaxed);
                    Err((JobErrorCode::Busy, e.to_string()))
                }
                Err(e) => Err((JobErrorCode::Invalid, e.to_string())),
            };
        }
        match t.get_mut(link) {
            Ok(j) if j.data.conn == conn && j.device == device => {
                j.data.requests += 1;
                let c = j.constants.clone();
                // The device's active job is the one it served last.
                t.activate(link).expect("live");
                Ok((link, c))
            }
            _ => Err((
                JobErrorCode::UnknownLink,
                format!("no job with link id {link}"),
            )),
        }
    }

    fn account(&self, link: LinkId, bytes: u64) {
        if let Ok(j) = self.table().get_mut(link) {
            j.data.bytes += bytes;
        }
    }

    fn close(&self, link: LinkId, conn: u64) -> bool {
        let mut t = self.table();
        match t.get(link) {
            Ok(j) if j.data.conn == conn => t.close(link).is_ok(),
            _ => false,
        }
    }

    fn close_connection(&self, conn: u64) -> usize {
        let mut t = self.table();
        let mine: Vec<_> = t
            .links()
            .into_iter()
            .filter(|l| t.get(*l).is_ok_and(|j| j.data.conn == conn))
            .collect();
        for l in &mine {
            let _ = t.close(*l);
        }
        mine.len()
    }

    /// Serves one authenticated job connection for `volume` until it ends
    /// or `shutdown`.
    pub async fn serve<S>(
        self: Arc<Self>,
        stream: S,
        primary: PeerInfo,
        volume: &str,
        shutdown: CancellationToken,
    ) where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let conn = self.next_conn.fetch_add(1, Relaxed);
        let peer = primary.node.clone();
        let Some(device) = self.devices.read().expect("poisoned").get(volume).copied() else {
            warn!(%volume, %peer, "job connection for a volume with no device record");
            return;
        };
        info!(%volume, %peer, conn, "job connection up");
        let (rd, wr) = tokio::io::split(stream);
        let mut reader = FrameReader::new(rd);
        let (tx, rx) = mpsc::channel::<Frame>(REPLY_QUEUE);
        let writer = tokio::spawn(reply_writer(FrameWriter::new(wr), rx));
        let permits = Arc::new(Semaphore::new(MAX_REQUESTS_PER_CONNECTION));
        let mut tasks = tokio::task::JoinSet::new();
        let idle = self.idle_timeout;
        // Idle time counts from the last frame or the last finished request.
        let mut active = tokio::time::Instant::now();
        let reason = loop {
            let frame = tokio::select! {
                _ = shutdown.cancelled() => break "node shutting down".to_string(),
                f = reader.next() => f,
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {
                    active = tokio::time::Instant::now();
                    continue;
                }
                _ = tokio::time::sleep_until(active + idle), if tasks.is_empty() => {
                    self.counters.idle_closed.fetch_add(1, Relaxed);
                    break format!("idle: no request for {idle:?}");
                }
            };
            active = tokio::time::Instant::now();
            let frame = match frame {
                Ok(Some(f)) => f,
                Ok(None) => break "primary closed the job connection".into(),
                Err(e) => break e.to_string(),
            };
            // Reap finished request tasks as we go.
            while tasks.try_join_next().is_some() {}
            let (id, link) = match &frame {
                Frame::JobHash { id, link, .. } | Frame::JobRead { id, link, .. } => (*id, *link),
                Frame::JobClose { id, link } => {
                    let closed = self.close(LinkId::from_u64(*link), conn);
                    let reply = if closed {
                        Frame::JobClosed {
                            id: *id,
                            link: *link,
                        }
                    } else {
                        job_error(*id, *link, JobErrorCode::UnknownLink, "no such job")
                    };
                    if tx.send(reply).await.is_err() {
                        break "primary went away".into();
                    }
                    continue;
                }
                Frame::Ping { id } => {
                    if tx.send(Frame::Pong { id: *id }).await.is_err() {
                        break "primary went away".into();
                    }
                    continue;
                }
                f => break format!("unexpected {} frame on a job connection", f.kind()),
            };
            let (link, dev) = match self.job_for(device, conn, &peer, link) {
                Ok(x) => x,
                Err((code, msg)) => {
                    if tx.send(job_error(id, link, code, &msg)).await.is_err() {
                        break "primary went away".into();
                    }
                    continue;
                }
            };
            let permit = tokio::select! {
                _ = shutdown.cancelled() => break "node shutting down".to_string(),
                p = permits.clone().acquire_owned() => p.expect("never closed"),
            };
            let (svc, tx) = (self.clone(), tx.clone());
            tasks.spawn(async move {
                let replies = svc.run_request(frame, link, conn, dev, &tx).await;
                for r in replies {
                    let _ = tx.send(r).await;
                }
                drop(permit);
            });
        };
        // In-flight requests finish (their replies may still go out).
        while tasks.join_next().await.is_some() {}
        drop(tx);
        let _ = writer.await;
        let closed = self.close_connection(conn);
        info!(%volume, %peer, conn, %reason, jobs_closed = closed, "job connection down");
    }

    /// Works one hash or read request; returns its final replies (an
    /// interim JobNotReady is sent on `tx` directly).
    async fn run_request(
        &self,
        frame: Frame,
        link: LinkId,
        conn: u64,
        dev: DeviceConstants,
        tx: &mpsc::Sender<Frame>,
    ) -> Vec<Frame> {
        let l = link.to_u64();
        let (id, offset, len) = match &frame {
            Frame::JobHash {
                id, offset, len, ..
            }
            | Frame::JobRead {
                id, offset, len, ..
            } => (*id, *offset, *len),
            _ => unreachable!("only hash and read requests reach here"),
        };
        if offset
            .checked_add(u64::from(len))
            .is_none_or(|end| end > dev.size)
        {
            let msg = format!(
                "volume {}: range {offset}+{len} past the end ({})",
                dev.volume, dev.size
            );
            return vec![job_error(id, l, JobErrorCode::OutOfRange, &msg)];
        }
        match frame {
            Frame::JobHash { block, .. } => {
                let backend = dev.backend.clone();
                let mut buf = self
                    .buffers
                    .lock()
                    .expect("poisoned")
                    .pop()
                    .unwrap_or_default();
                let work = tokio::task::spawn_blocking(move || {
                    buf.resize(len as usize, 0);
                    let r = backend
                        .read_at(&mut buf, offset)
                        .map(|()| hash_blocks(&buf, block));
                    (buf, r)
                });
                let done = self.deadline(work).await.map(|(buf, r)| {
                    let mut pool = self.buffers.lock().expect("poisoned");
                    if pool.len() < MAX_REQUESTS_PER_CONNECTION {
                        pool.push(buf);
                    }
                    r
                });
                match done {
                    Ok(Ok(digests)) => {
                        self.counters
                            .hashed_bytes
                            .fetch_add(u64::from(len), Relaxed);
                        self.account(link, u64::from(len));
                        vec![Frame::JobHashes {
                            id,
                            link: l,
                            offset,
                            len,
                            block,
                            digests,
                        }]
                    }
                    Ok(Err(e)) => vec![job_error(id, l, JobErrorCode::Io, &e.to_string())],
                    Err(()) => self.timed_out(id, link, conn, &dev, offset, len),
                }
            }
            Frame::JobRead { .. } => {
                debug_assert!(len <= MAX_DATA);
                let mut buf = BytesMut::zeroed(len as usize);
                // The page cache may have it: answer at once.
                if let Ok(true) = dev.backend.try_read_at_nowait(&mut buf, offset) {
                    return self.read_done(id, link, offset, buf.freeze());
                }
                self.counters.not_ready.fetch_add(1, Relaxed);
                let _ = tx
                    .send(Frame::JobNotReady {
                        id,
                        link: l,
                        offset,
                        len,
                        retry_after_ms: RETRY_HINT_MS,
                    })
                    .await;
                let backend = dev.backend.clone();
                let work = tokio::task::spawn_blocking(move || {
                    backend.read_at(&mut buf, offset).map(|()| buf.freeze())
                });
                match self.deadline(work).await {
                    Ok(Ok(data)) => self.read_done(id, link, offset, data),
                    Ok(Err(e)) => vec![job_error(id, l, JobErrorCode::Io, &e.to_string())],
                    Err(()) => self.timed_out(id, link, conn, &dev, offset, len),
                }
            }
            _ => unreachable!(),
        }
    }

    fn read_done(&self, id: u64, link: LinkId, offset: u64, data: Bytes) -> Vec<Frame> {
        let n = data.len() as u64;
        self.counters.read_bytes.fetch_add(n, Relaxed);
        self.account(link, n);
        vec![Frame::JobData {
            id,
            link: link.to_u64(),
            offset,
            data,
        }]
    }

    /// Waits for blocking work within the fetch timeout; `Err(())` when it
    /// took longer (the work itself finishes in the background).
    async fn deadline<T>(&self, work: tokio::task::JoinHandle<T>) -> Result<T, ()> {
        match tokio::time::timeout(self.fetch_timeout, work).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(join)) => panic!("job work panicked: {join}"),
            Err(_) => Err(()),
        }
    }

    fn timed_out(
        &self,
        id: u64,
        link: LinkId,
        conn: u64,
        dev: &DeviceConstants,
        offset: u64,
        len: u32,
    ) -> Vec<Frame> {
        self.counters.timeouts.fetch_add(1, Relaxed);
        self.close(link, conn);
        let msg = format!(
            "volume {}: fetching {len} bytes at offset {offset} took longer than {:?}; job {link} ended",
            dev.volume, self.fetch_timeout
        );
        warn!("{msg}");
        vec![job_error(id, link.to_u64(), JobErrorCode::Timeout, &msg)]
    }
}

fn job_error(id: u64, link: u64, code: JobErrorCode, message: &str) -> Frame {
    Frame::JobError {
        id,
        link,
        code,
        message: message.to_owned(),
    }
}

/// The blake3 digest of each `block` bytes of `data` (the last may be short).
pub fn hash_blocks(data: &[u8], block: u32) -> Vec<[u8; DIGEST_LEN]> {
    data.chunks(block as usize)
        .map(|c| *blake3::hash(c).as_bytes())
        .collect()
}

async fn reply_writer<W: AsyncWrite + Unpin>(mut w: FrameWriter<W>, mut rx: mpsc::Receiver<Frame>) {
    while let Some(f) = rx.recv().await {
        w.queue(&f);
        while w.buffered() < 4 << 20 {
            match rx.try_recv() {
                Ok(f) => w.queue(&f),
                Err(_) => break,
            }
        }
        if let Err(e) = w.flush().await {
            debug!(error = %e, "job reply writer stopped");
            return;
        }
    }
}

#[cfg(test)]
mod tests;
