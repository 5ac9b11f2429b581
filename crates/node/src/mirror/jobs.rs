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
    devices: HashMap<String, DeviceId>,
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
            devices,
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
        self.devices
            .get(volume)
            .and_then(|d| self.table().device(*d).map(|r| r.job_count()))
            .unwrap_or(0)
    }

    /// Job-table families for /metrics (a mirror node's).
    pub fn render_metrics(&self, out: &mut String) {
        use crate::daemon::metrics::{write_header, write_sample, MetricType};
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
            write_header(out, name, kind, help);
            write_sample(out, name, &[], v);
        }
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
        let Some(&device) = self.devices.get(volume) else {
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
mod tests {
    use super::*;
    use blockmirror_repl::VolumeIdentity;
    use blockmirror_storage::{FaultBackend, Faults, MemBackend};
    use tokio::io::DuplexStream;

    const SIZE: u64 = 1 << 20;

    fn peer() -> PeerInfo {
        PeerInfo {
            node: "primary".into(),
            volume: VolumeIdentity {
                name: "vol".into(),
                volume_id: [1; 16],
                size: SIZE,
                generation: 1,
                history: [0; blockmirror_repl::HISTORY_LEN],
            },
            compression: blockmirror_repl::Codec::None,
        }
    }

    struct Client {
        r: FrameReader<tokio::io::ReadHalf<DuplexStream>>,
        w: FrameWriter<tokio::io::WriteHalf<DuplexStream>>,
    }

    impl Client {
        async fn send(&mut self, f: Frame) {
            self.w.send(&f).await.unwrap();
        }
        async fn next(&mut self) -> Frame {
            tokio::time::timeout(Duration::from_secs(10), self.r.next())
                .await
                .expect("a reply")
                .unwrap()
                .expect("open")
        }
    }

    fn start(
        capacity: usize,
        fetch_timeout: Duration,
        backend: Arc<dyn Backend>,
    ) -> (Arc<JobService>, Client) {
        let svc = Arc::new(JobService::new(
            7,
            capacity,
            fetch_timeout,
            [DeviceConstants {
                volume: "vol".into(),
                size: SIZE,
                backend,
            }],
        ));
        let (a, b) = tokio::io::duplex(1 << 20);
        tokio::spawn(
            svc.clone()
                .serve(b, peer(), "vol", CancellationToken::new()),
        );
        let (r, w) = tokio::io::split(a);
        (
            svc,
            Client {
                r: FrameReader::new(r),
                w: FrameWriter::new(w),
            },
        )
    }

    fn data() -> Vec<u8> {
        (0..SIZE).map(|i| (i * 7 + i / 4096) as u8).collect()
    }

    #[tokio::test]
    async fn hashes_open_a_job_and_match_the_data() {
        let backend = Arc::new(MemBackend::from_vec("vol", data()));
        let (svc, mut c) = start(4, DEFAULT_FETCH_TIMEOUT, backend);
        c.send(Frame::JobHash {
            id: 1,
            link: 0,
            offset: 8192,
            len: 3 * 4096 + 100,
            block: 4096,
        })
        .await;
        let Frame::JobHashes {
            id, link, digests, ..
        } = c.next().await
        else {
            panic!("not hashes")
        };
        assert_eq!(id, 1);
        assert!(!LinkId::from_u64(link).is_invalid());
        let d = data();
        assert_eq!(digests, hash_blocks(&d[8192..8192 + 3 * 4096 + 100], 4096));
        assert_eq!(svc.jobs_of("vol"), 1);
        // The same job reads; past the end is refused without ending it.
        c.send(Frame::JobRead {
            id: 2,
            link,
            offset: SIZE - 4096,
            len: 8192,
        })
        .await;
        assert!(matches!(
            c.next().await,
            Frame::JobError {
                id: 2,
                code: JobErrorCode::OutOfRange,
                ..
            }
        ));
        c.send(Frame::JobClose { id: 3, link }).await;
        assert_eq!(c.next().await, Frame::JobClosed { id: 3, link });
        assert_eq!(svc.live_jobs(), 0);
        // A closed job's link id is refused.
        c.send(Frame::JobRead {
            id: 4,
            link,
            offset: 0,
            len: 4096,
        })
        .await;
        assert!(matches!(
            c.next().await,
            Frame::JobError {
                id: 4,
                code: JobErrorCode::UnknownLink,
                ..
            }
        ));
    }

    #[tokio::test]
    async fn a_full_table_answers_busy_at_once_and_a_closed_slot_is_reused() {
        let backend = Arc::new(MemBackend::new("vol", SIZE));
        let (svc, mut c) = start(3, DEFAULT_FETCH_TIMEOUT, backend);
        let mut links = Vec::new();
        for id in 0..4u64 {
            c.send(Frame::JobHash {
                id,
                link: 0,
                offset: 0,
                len: 4096,
                block: 4096,
            })
            .await;
            match c.next().await {
                Frame::JobHashes { link, .. } => links.push(link),
                Frame::JobError {
                    id: 3,
                    code: JobErrorCode::Busy,
                    link: 0,
                    ..
                } => {}
                f => panic!("{f:?}"),
            }
        }
        assert_eq!(links.len(), 3);
        assert_eq!(svc.counters.busy.load(Relaxed), 1);
        c.send(Frame::JobClose {
            id: 9,
            link: links[1],
        })
        .await;
        assert!(matches!(c.next().await, Frame::JobClosed { .. }));
        c.send(Frame::JobHash {
            id: 10,
            link: 0,
            offset: 0,
            len: 4096,
            block: 4096,
        })
        .await;
        let Frame::JobHashes { link, .. } = c.next().await else {
            panic!()
        };
        assert_eq!(LinkId::from_u64(link).slot, LinkId::from_u64(links[1]).slot);
        assert_ne!(link, links[1], "a slot's new job has a new link id");
        // The connection ends: its jobs are closed.
        drop(c);
        let deadline = Instant::now() + Duration::from_secs(5);
        while svc.live_jobs() != 0 {
            assert!(Instant::now() < deadline, "jobs not closed");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn a_slow_read_answers_not_ready_then_pushes_the_data_without_blocking_others() {
        let fault = Arc::new(FaultBackend::new(
            MemBackend::from_vec("vol", data()),
            Faults::default(),
        ));
        fault.set_read_latency(Some(Duration::from_millis(300)));
        let (svc, mut c) = start(4, DEFAULT_FETCH_TIMEOUT, fault.clone());
        c.send(Frame::JobRead {
            id: 1,
            link: 0,
            offset: 4096,
            len: 4096,
        })
        .await;
        let Frame::JobNotReady {
            id: 1,
            link,
            retry_after_ms,
            ..
        } = c.next().await
        else {
            panic!("expected not ready")
        };
        assert_eq!(retry_after_ms, RETRY_HINT_MS);
        // While the slow read runs, a close of another (unknown) job is
        // answered: the connection is not blocked.
        c.send(Frame::JobClose { id: 2, link: 12345 }).await;
        assert!(matches!(
            c.next().await,
            Frame::JobError {
                id: 2,
                code: JobErrorCode::UnknownLink,
                ..
            }
        ));
        let Frame::JobData {
            id: 1,
            link: l2,
            data: got,
            ..
        } = c.next().await
        else {
            panic!("expected data")
        };
        assert_eq!(l2, link);
        assert_eq!(&got[..], &data()[4096..8192]);
        assert_eq!(svc.counters.not_ready.load(Relaxed), 1);
    }

    /// An idle connection is closed after the idle timeout and its jobs
    /// leave the table; any frame (a Ping too) counts as activity. The
    /// clock is tokio's paused one: it jumps to the next timer whenever
    /// every task waits, so nothing here sleeps in real time.
    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_is_closed_and_its_jobs_freed() {
        let idle = Duration::from_secs(60);
        let backend = Arc::new(MemBackend::new("vol", SIZE));
        let svc = Arc::new(
            JobService::new(
                7,
                4,
                DEFAULT_FETCH_TIMEOUT,
                [DeviceConstants {
                    volume: "vol".into(),
                    size: SIZE,
                    backend,
                }],
            )
            .with_idle_timeout(idle),
        );
        let (a, b) = tokio::io::duplex(1 << 20);
        let served = tokio::spawn(
            svc.clone()
                .serve(b, peer(), "vol", CancellationToken::new()),
        );
        let (r, w) = tokio::io::split(a);
        let mut c = Client {
            r: FrameReader::new(r),
            w: FrameWriter::new(w),
        };
        let start = tokio::time::Instant::now();
        c.send(Frame::JobHash {
            id: 1,
            link: 0,
            offset: 0,
            len: 4096,
            block: 4096,
        })
        .await;
        assert!(matches!(c.next().await, Frame::JobHashes { id: 1, .. }));
        assert_eq!(svc.live_jobs(), 1);
        // Just short of the timeout, a ping: the connection lives on.
        tokio::time::advance(idle - Duration::from_secs(1)).await;
        c.send(Frame::Ping { id: 2 }).await;
        assert_eq!(c.next().await, Frame::Pong { id: 2 });
        let pinged = tokio::time::Instant::now();
        assert_eq!(svc.live_jobs(), 1);
        assert_eq!(svc.counters.idle_closed.load(Relaxed), 0);
        // Then nothing: the mirror closes the connection (end of stream
        // here) once the timeout has passed since the ping.
        let end = tokio::time::timeout(Duration::from_secs(3600), c.r.next())
            .await
            .expect("closed within the hour");
        assert!(matches!(end, Ok(None)), "{end:?}");
        served.await.unwrap();
        assert!(
            pinged.elapsed() >= idle,
            "closed after {:?}",
            pinged.elapsed()
        );
        assert!(start.elapsed() < 2 * idle + Duration::from_secs(1));
        assert_eq!(svc.live_jobs(), 0, "the idle connection's job is freed");
        assert_eq!(svc.counters.idle_closed.load(Relaxed), 1);
    }

    #[tokio::test]
    async fn a_fetch_past_the_timeout_ends_the_job_with_its_own_error() {
        let fault = Arc::new(FaultBackend::new(
            MemBackend::new("vol", SIZE),
            Faults::default(),
        ));
        fault.set_read_latency(Some(Duration::from_millis(500)));
        let (svc, mut c) = start(4, Duration::from_millis(100), fault);
        c.send(Frame::JobRead {
            id: 1,
            link: 0,
            offset: 0,
            len: 4096,
        })
        .await;
        assert!(matches!(c.next().await, Frame::JobNotReady { id: 1, .. }));
        match c.next().await {
            Frame::JobError {
                id: 1,
                code: JobErrorCode::Timeout,
                message,
                ..
            } => assert!(message.contains("ended"), "{message}"),
            f => panic!("{f:?}"),
        }
        assert_eq!(svc.live_jobs(), 0, "the timed-out job ended");
        assert_eq!(svc.counters.timeouts.load(Relaxed), 1);
    }
}
