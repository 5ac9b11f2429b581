//! Online verify on the primary (seed 002's host-driven compare): compares
//! a primary volume with each of its mirrors while hosts keep writing.
//!
//! For each mirror, a job connection (see `replication::jobs`) is opened
//! beside the replication link, and [`default_jobs`] workers (or as many
//! as the request asks, up to [`MAX_PARALLEL_JOBS`]) each open
//! one job on the mirror and take regions of [`region_len`] bytes in turn.
//! Per region:
//!
//! 1. Take the primary's range lock for the region (host writes and
//!    catch-up copies to it wait), then wait until no request to the region
//!    is in flight on the replication link. From here the mirror holds
//!    every change to the region the primary made, and none can start, so
//!    a hash request on the job connection can no longer overtake a write
//!    still travelling on the replication link, and a write cannot land
//!    between the two reads: no false difference.
//! 2. Read the region locally and, at the same time, ask the mirror for the
//!    blake3 digest of each block (checksum mode) or for the data itself
//!    (`--full`, a remote read). Release the lock once both are in.
//! 3. Compare block by block. Blocks the link's out-of-sync bitmap marks
//!    (seed 002's invalid tracks: not yet replicated) are skipped and
//!    counted, never reported.
//!
//! A block is the bitmap's granularity, so `--mark` marks exactly the
//! differing blocks, and the link copies them at once ([`MirrorLink::mark_and_copy`]).
//!
//! A finished verify's result is stored with the volume's metadata record
//! (one per mirror), so `/status` shows it after a restart too.
//!
//! The cost of step 1 is a short stall of host writes to one region at a
//! time (one region read and hashed on both sides, a few milliseconds).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use blockmirror_core::jobs::LinkId;
use blockmirror_core::{VerifyOutcome, VerifyRecord};
use blockmirror_repl::{
    Frame, JobErrorCode, DIGEST_LEN, MAX_HASH_BLOCK, MAX_JOB_HASHES, MIN_HASH_BLOCK,
};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::daemon::metrics::{self, MetricType};
use crate::mirror::jobs::hash_blocks;
use crate::primary::job_conn::{CallError, JobConn};
use crate::primary::link::LinkContext;
use crate::primary::MirrorLink;

/// Jobs (and workers) one checksum verify opens on each mirror by default.
/// Measured (docs/BENCHMARKS.md, 2 GiB on 2 cores): 1 job 2.17 s, 4 jobs
/// 1.39 s, 8 jobs 1.08 s.
pub const PARALLEL_JOBS: usize = 8;
/// The same for `--full`, where each job holds a region's data in flight:
/// 1 job 2.06 s, 4 jobs 1.88 s, 8 jobs 2.58 s.
pub const PARALLEL_JOBS_FULL: usize = 4;

/// The default number of jobs for a verify of this mode.
pub fn default_jobs(full: bool) -> usize {
    if full {
        PARALLEL_JOBS_FULL
    } else {
        PARALLEL_JOBS
    }
}
/// The most jobs one verify may ask for per mirror (the mirror's table
/// holds 64 for all its volumes).
pub const MAX_PARALLEL_JOBS: usize = 16;
/// Largest region one request covers.
pub const MAX_REGION: u64 = 4 << 20;
/// How long connecting a job connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a reply may take: the mirror's fetch timeout plus the way.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long in-flight writes to a locked region may take to be answered
/// before the verify gives up (the link's watchdog fails it sooner).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a verify could not run to its end. Each names volume and peer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum VerifyError {
    #[error("volume {volume}, mirror {peer}: not connected; verify needs a live link")]
    NotConnected { volume: String, peer: String },
    #[error("volume {volume}, mirror {peer}: job connection: {reason}")]
    Connect {
        volume: String,
        peer: String,
        reason: String,
    },
    #[error("volume {volume}, mirror {peer}: job table full on the mirror (BUSY): {message}")]
    Busy {
        volume: String,
        peer: String,
        message: String,
    },
    #[error("volume {volume}, mirror {peer}: at offset {offset}: timed out: {message}")]
    Timeout {
        volume: String,
        peer: String,
        offset: u64,
        message: String,
    },
    #[error("volume {volume}, mirror {peer}: at offset {offset}: {message}")]
    Failed {
        volume: String,
        peer: String,
        offset: u64,
        message: String,
    },
    #[error("volume {volume}: local read at offset {offset}: {message}")]
    Local {
        volume: String,
        offset: u64,
        message: String,
    },
    #[error("volume {volume}, mirror {peer}: cancelled (node shutting down)")]
    Cancelled { volume: String, peer: String },
}

/// One differing range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Range {
    pub offset: u64,
    pub len: u64,
}

/// A verify of one mirror, as `/status` shows it (`last_verify`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VerifyStatus {
    /// Which verify run this is (returned by the POST that started it).
    pub id: u64,
    /// `running`, `identical`, `differ` or `failed`.
    pub state: String,
    pub full: bool,
    pub mark: bool,
    /// Seconds since the Unix epoch.
    pub started_unix: u64,
    #[serde(default)]
    pub finished_unix: Option<u64>,
    pub total_bytes: u64,
    /// Bytes checked or skipped so far.
    pub done_bytes: u64,
    /// Bytes skipped because the bitmap marks them out of sync.
    pub skipped_bytes: u64,
    /// Regions that had writes in flight when locked (waited for, then checked).
    #[serde(default)]
    pub regions_waited: u64,
    /// Mirror answers "not ready yet" (remote reads fetched from disk).
    #[serde(default)]
    pub not_ready: u64,
    pub differing_bytes: u64,
    pub differing: Vec<Range>,
    /// True when `differing` lists only the first ranges (a result read back
    /// from the metadata record keeps at most 256; `differing_bytes` counts
    /// them all).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub differing_truncated: bool,
    /// Bytes marked for resync by `--mark`.
    #[serde(default)]
    pub marked_bytes: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl VerifyStatus {
    pub fn is_running(&self) -> bool {
        self.state == "running"
    }

    /// The record a finished verify of `peer` leaves in the volume's
    /// metadata; None while running.
    pub fn to_record(&self, peer: &str) -> Option<VerifyRecord> {
        let outcome = VerifyOutcome::from_name(&self.state)?;
        Some(
            VerifyRecord {
                peer: peer.to_owned(),
                id: self.id,
                outcome,
                full: self.full,
                mark: self.mark,
                started_unix: self.started_unix,
                finished_unix: self.finished_unix.unwrap_or(0),
                total_bytes: self.total_bytes,
                done_bytes: self.done_bytes,
                skipped_bytes: self.skipped_bytes,
                regions_waited: self.regions_waited,
                not_ready: self.not_ready,
                differing_bytes: self.differing_bytes,
                marked_bytes: self.marked_bytes,
                differing: self.differing.iter().map(|r| (r.offset, r.len)).collect(),
                differing_truncated: self.differing_truncated,
                error: self.error.clone().unwrap_or_default(),
            }
            .bounded(),
        )
    }

    /// A stored result as `/status` shows it.
    pub fn from_record(r: &VerifyRecord) -> VerifyStatus {
        VerifyStatus {
            id: r.id,
            state: r.outcome.as_str().into(),
            full: r.full,
            mark: r.mark,
            started_unix: r.started_unix,
            finished_unix: Some(r.finished_unix),
            total_bytes: r.total_bytes,
            done_bytes: r.done_bytes,
            skipped_bytes: r.skipped_bytes,
            regions_waited: r.regions_waited,
            not_ready: r.not_ready,
            differing_bytes: r.differing_bytes,
            differing: r
                .differing
                .iter()
                .map(|&(offset, len)| Range { offset, len })
                .collect(),
            differing_truncated: r.differing_truncated,
            marked_bytes: r.marked_bytes,
            error: (!r.error.is_empty()).then(|| r.error.clone()),
        }
    }
}

/// Live counters of one run.
#[derive(Default)]
struct Progress {
    done: AtomicU64,
    skipped: AtomicU64,
    waited: AtomicU64,
    not_ready: AtomicU64,
}

struct Run {
    status: VerifyStatus,
    progress: Arc<Progress>,
}

impl Run {
    fn snapshot(&self) -> VerifyStatus {
        let mut s = self.status.clone();
        if s.is_running() {
            s.done_bytes = self.progress.done.load(Relaxed);
            s.skipped_bytes = self.progress.skipped.load(Relaxed);
            s.regions_waited = self.progress.waited.load(Relaxed);
            s.not_ready = self.progress.not_ready.load(Relaxed);
        }
        s
    }
}

/// A primary volume that can be verified.
pub struct VerifyVolume {
    pub name: String,
    pub size: u64,
    pub links: Vec<Arc<MirrorLink>>,
    pub ctx: LinkContext,
}

/// Why a verify could not be started (the HTTP status the admin API answers).
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("no primary volume {0:?} with mirrors on this node")]
    UnknownVolume(String),
    #[error("volume {0}: a verify is already running")]
    Running(String),
    #[error("jobs {0}: must be 1..={MAX_PARALLEL_JOBS}")]
    BadJobs(usize),
}

impl StartError {
    pub fn http_status(&self) -> u16 {
        match self {
            StartError::UnknownVolume(_) => 404,
            StartError::Running(_) => 409,
            StartError::BadJobs(_) => 400,
        }
    }
}

/// The node's verifies: starts them, keeps each mirror's last result.
pub struct VerifyService {
    volumes: std::sync::RwLock<HashMap<String, Arc<VerifyVolume>>>,
    runs: Mutex<HashMap<(String, String), Run>>,
    next_id: AtomicU64,
    shutdown: CancellationToken,
}

impl VerifyService {
    /// The service for `volumes`, each mirror's last result read back from
    /// its volume's metadata record (run ids go on from the highest).
    pub fn new(volumes: Vec<VerifyVolume>, shutdown: CancellationToken) -> Self {
        let s = Self {
            volumes: std::sync::RwLock::new(HashMap::new()),
            runs: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            shutdown,
        };
        for v in volumes {
            s.add(v);
        }
        s
    }

    /// Adds a volume (at start, or opened while the node runs), its
    /// mirrors' last results read back from its metadata.
    pub fn add(&self, v: VerifyVolume) {
        let stored = v.ctx.gen.meta.verify();
        {
            let mut runs = self.runs();
            for l in &v.links {
                if let Some(r) = stored.iter().find(|r| r.peer == l.peer) {
                    self.next_id.fetch_max(r.id + 1, Relaxed);
                    runs.insert(
                        (v.name.clone(), l.peer.clone()),
                        Run {
                            status: VerifyStatus::from_record(r),
                            progress: Arc::default(),
                        },
                    );
                }
            }
        }
        self.volumes
            .write()
            .expect("poisoned")
            .insert(v.name.clone(), Arc::new(v));
    }

    fn runs(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), Run>> {
        self.runs.lock().expect("verify state poisoned")
    }

    /// The last (or running) verify of one mirror.
    pub fn status(&self, volume: &str, peer: &str) -> Option<VerifyStatus> {
        self.runs()
            .get(&(volume.to_owned(), peer.to_owned()))
            .map(Run::snapshot)
    }

    /// Starts verifying every mirror of `volume` with `jobs` parallel jobs
    /// each; returns the run's id.
    pub fn start(
        self: &Arc<Self>,
        volume: &str,
        full: bool,
        mark: bool,
        jobs: usize,
    ) -> Result<u64, StartError> {
        if !(1..=MAX_PARALLEL_JOBS).contains(&jobs) {
            return Err(StartError::BadJobs(jobs));
        }
        let v = self
            .volumes
            .read()
            .expect("poisoned")
            .get(volume)
            .cloned()
            .ok_or_else(|| StartError::UnknownVolume(volume.to_owned()))?;
        let id = self.next_id.fetch_add(1, Relaxed);
        let mut progress = Vec::new();
        {
            let mut runs = self.runs();
            if v.links.iter().any(|l| {
                runs.get(&(v.name.clone(), l.peer.clone()))
                    .is_some_and(|r| r.status.is_running())
            }) {
                return Err(StartError::Running(v.name.clone()));
            }
            for l in &v.links {
                let p = Arc::new(Progress::default());
                runs.insert(
                    (v.name.clone(), l.peer.clone()),
                    Run {
                        status: VerifyStatus {
                            id,
                            state: "running".into(),
                            full,
                            mark,
                            started_unix: unix_now(),
                            finished_unix: None,
                            total_bytes: v.size,
                            done_bytes: 0,
                            skipped_bytes: 0,
                            regions_waited: 0,
                            not_ready: 0,
                            differing_bytes: 0,
                            differing: Vec::new(),
                            differing_truncated: false,
                            marked_bytes: 0,
                            error: None,
                        },
                        progress: p.clone(),
                    },
                );
                progress.push(p);
            }
        }
        info!(volume = %v.name, id, full, mark, mirrors = v.links.len(), "verify started");
        for (link, p) in v.links.iter().zip(progress) {
            let (svc, v, link) = (self.clone(), v.clone(), link.clone());
            tokio::spawn(async move {
                let started = Instant::now();
                let cancel = svc.shutdown.child_token();
                let r = verify_link(&v, &link, full, jobs, &p, &cancel).await;
                let key = (v.name.clone(), link.peer.clone());
                let Some(mut s) = svc.runs().get(&key).map(|run| run.status.clone()) else {
                    return;
                };
                s.finished_unix = Some(unix_now());
                s.done_bytes = p.done.load(Relaxed);
                s.skipped_bytes = p.skipped.load(Relaxed);
                s.regions_waited = p.waited.load(Relaxed);
                s.not_ready = p.not_ready.load(Relaxed);
                match r {
                    Ok(diffs) => {
                        s.differing_bytes = diffs.iter().map(|r| r.len).sum();
                        if mark {
                            for d in &diffs {
                                link.mark_and_copy(d.offset, d.len, &v.ctx);
                            }
                            s.marked_bytes = s.differing_bytes;
                        }
                        s.state = if diffs.is_empty() {
                            "identical"
                        } else {
                            "differ"
                        }
                        .into();
                        s.differing = diffs;
                        info!(volume = %v.name, peer = %link.peer, id, state = %s.state,
                            differing_bytes = s.differing_bytes, skipped_bytes = s.skipped_bytes,
                            ms = started.elapsed().as_millis() as u64, "verify finished");
                    }
                    Err(e) => {
                        warn!(error = %e, "verify failed");
                        s.state = "failed".into();
                        s.error = Some(e.to_string());
                    }
                }
                // Stored with the volume's record before /status says the
                // run finished, so a result seen there survives a restart.
                // A verify cut short by shutdown is stored too (failed:
                // cancelled), unless the node exits first.
                if let Some(record) = s.to_record(&link.peer) {
                    let meta = v.ctx.gen.meta.clone();
                    let stored = tokio::task::spawn_blocking(move || meta.set_verify(record))
                        .await
                        .unwrap_or_else(|e| {
                            Err(crate::volume::meta_file::MetaFileError::Io {
                                path: v.ctx.gen.meta.path().to_owned(),
                                source: std::io::Error::other(e.to_string()),
                            })
                        });
                    if let Err(e) = stored {
                        warn!(volume = %v.name, peer = %link.peer, error = %e,
                            "storing the verify result failed; /status loses it at restart");
                    }
                }
                if let Some(run) = svc.runs().get_mut(&key) {
                    run.status = s;
                }
            });
        }
        Ok(id)
    }

    /// Registers the verify families for /metrics, labelled by volume and
    /// peer.
    pub fn register_metrics(self: &Arc<Self>, registry: &mut metrics::Registry) {
        let me = self.clone();
        registry.register_collector(metrics::FnCollector::boxed("verify", move |enc| {
            me.encode_metrics(enc)
        }));
    }

    fn encode_metrics(&self, enc: &mut metrics::Encoder<'_>) -> std::fmt::Result {
        let mut all: Vec<((String, String), VerifyStatus)> = self
            .runs()
            .iter()
            .map(|(k, r)| (k.clone(), r.snapshot()))
            .collect();
        if all.is_empty() {
            return Ok(());
        }
        all.sort_by(|a, b| a.0.cmp(&b.0));
        type Get = fn(&VerifyStatus) -> f64;
        let families: [(&str, MetricType, &str, Get); 5] = [
            (
                "blockmirror_verify_running",
                MetricType::Gauge,
                "1 while a verify of the mirror runs.",
                |s| f64::from(u8::from(s.is_running())),
            ),
            (
                "blockmirror_verify_done_bytes",
                MetricType::Gauge,
                "Bytes the current or last verify checked or skipped.",
                |s| s.done_bytes as f64,
            ),
            (
                "blockmirror_verify_total_bytes",
                MetricType::Gauge,
                "Bytes the current or last verify covers.",
                |s| s.total_bytes as f64,
            ),
            (
                "blockmirror_verify_skipped_bytes",
                MetricType::Gauge,
                "Bytes the current or last verify skipped as out of sync.",
                |s| s.skipped_bytes as f64,
            ),
            (
                "blockmirror_verify_differing_bytes",
                MetricType::Gauge,
                "Bytes the last finished verify found different.",
                |s| s.differing_bytes as f64,
            ),
        ];
        for (name, kind, help, get) in families {
            let mut f = metrics::family(enc, name, kind, help)?;
            for ((vol, peer), s) in &all {
                f.sample(&[("volume", vol), ("peer", peer)], get(s))?;
            }
        }
        Ok(())
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The hash block for a link: its bitmap's granularity, within the wire's limits.
pub fn block_len(granularity: u64) -> u32 {
    granularity.clamp(u64::from(MIN_HASH_BLOCK), u64::from(MAX_HASH_BLOCK)) as u32
}

/// The region one request covers for a block size.
pub fn region_len(block: u32) -> u64 {
    (u64::from(block) * u64::from(MAX_JOB_HASHES)).min(MAX_REGION.max(u64::from(block)))
}

/// Verifies one mirror; returns the differing ranges, merged and in order.
async fn verify_link(
    v: &Arc<VerifyVolume>,
    link: &Arc<MirrorLink>,
    full: bool,
    jobs: usize,
    progress: &Arc<Progress>,
    cancel: &CancellationToken,
) -> Result<Vec<Range>, VerifyError> {
    let err_ctx = (v.name.clone(), link.peer.clone());
    if !link.is_live() {
        return Err(VerifyError::NotConnected {
            volume: err_ctx.0,
            peer: err_ctx.1,
        });
    }
    let client = JobClient::connect(v, link, progress.clone()).await?;
    let block = block_len(link.bitmap().granularity());
    let region = region_len(block);
    let cursor = Arc::new(AtomicU64::new(0));
    let diffs = Arc::new(Mutex::new(BTreeMap::<u64, u64>::new()));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..jobs {
        let w = Worker {
            v: v.clone(),
            link: link.clone(),
            client: client.clone(),
            job: LinkId::INVALID.to_u64(),
            buf: Vec::new(),
            block,
            full,
            progress: progress.clone(),
        };
        let (cursor, diffs, cancel) = (cursor.clone(), diffs.clone(), cancel.clone());
        workers.spawn(async move {
            let mut w = w;
            let r = w.run(region, &cursor, &diffs, &cancel).await;
            w.close().await;
            r
        });
    }
    let mut result = Ok(());
    while let Some(r) = workers.join_next().await {
        let r = r.unwrap_or_else(|e| {
            Err(VerifyError::Failed {
                volume: v.name.clone(),
                peer: link.peer.clone(),
                offset: 0,
                message: format!("worker panicked: {e}"),
            })
        });
        if let Err(e) = r {
            if result.is_ok() {
                result = Err(e);
            }
            cursor.store(u64::MAX / 2, Relaxed); // Stop the others.
        }
    }
    result?;
    let d = diffs.lock().expect("poisoned");
    Ok(merge(d.iter().map(|(o, l)| Range {
        offset: *o,
        len: *l,
    })))
}

/// Merges adjacent ranges (input in offset order).
fn merge(rs: impl Iterator<Item = Range>) -> Vec<Range> {
    let mut out: Vec<Range> = Vec::new();
    for r in rs {
        match out.last_mut() {
            Some(last) if last.offset + last.len == r.offset => last.len += r.len,
            _ => out.push(r),
        }
    }
    out
}

struct Worker {
    v: Arc<VerifyVolume>,
    link: Arc<MirrorLink>,
    client: Arc<JobClient>,
    /// This worker's job on the mirror (invalid until the first reply).
    job: u64,
    /// The local read buffer, reused region after region.
    buf: Vec<u8>,
    block: u32,
    full: bool,
    progress: Arc<Progress>,
}

impl Worker {
    async fn run(
        &mut self,
        region: u64,
        cursor: &AtomicU64,
        diffs: &Mutex<BTreeMap<u64, u64>>,
        cancel: &CancellationToken,
    ) -> Result<(), VerifyError> {
        loop {
            if cancel.is_cancelled() {
                return Err(VerifyError::Cancelled {
                    volume: self.v.name.clone(),
                    peer: self.link.peer.clone(),
                });
            }
            let off = cursor.fetch_add(region, Relaxed);
            if off >= self.v.size {
                return Ok(());
            }
            let len = region.min(self.v.size - off);
            for d in self.check(off, len).await? {
                diffs.lock().expect("poisoned").insert(d.offset, d.len);
            }
        }
    }

    /// Checks one region (see the module docs); returns its differing blocks.
    async fn check(&mut self, off: u64, len: u64) -> Result<Vec<Range>, VerifyError> {
        let block = u64::from(self.block);
        let guard = self.v.ctx.locks.lock(off, len).await;
        if self.link.has_inflight_in(off, len) {
            self.progress.waited.fetch_add(1, Relaxed);
            let deadline = Instant::now() + DRAIN_TIMEOUT;
            let mut pause = Duration::from_micros(200);
            while self.link.has_inflight_in(off, len) {
                // A failing link fails (and marks) its requests at once;
                // only a mirror that neither answers nor fails gets here.
                if Instant::now() > deadline {
                    return Err(self.failed(off, "writes to the region were not answered"));
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(5));
            }
        }
        let before = self.link.bitmap();
        let backend = self.v.ctx.backend.clone();
        let full = self.full;
        let mut buf = std::mem::take(&mut self.buf);
        let local = tokio::task::spawn_blocking(move || {
            buf.resize(len as usize, 0);
            let r = backend.read_at(&mut buf, off);
            let digests = match (&r, full) {
                (Ok(()), false) => hash_blocks(&buf, block as u32),
                _ => Vec::new(),
            };
            (buf, r.map(|()| digests))
        });
        let remote = async {
            if full {
                self.client
                    .read(&mut self.job, off, len as u32)
                    .await
                    .map(Remote::Data)
            } else {
                self.client
                    .hash(&mut self.job, off, len as u32, self.block)
                    .await
                    .map(Remote::Digests)
            }
        };
        let (local, remote) = tokio::join!(local, remote);
        drop(guard);
        let (data, local_digests) = match local {
            Ok((buf, Ok(d))) => (buf, d),
            Ok((_, Err(e))) => return Err(self.local_failed(off, e.to_string())),
            Err(e) => return Err(self.local_failed(off, e.to_string())),
        };
        let remote = remote;
        let remote = match remote {
            Ok(r) => r,
            Err(e) => {
                self.buf = data;
                return Err(e);
            }
        };
        // Marked before or during the check: not replicated yet, skipped.
        let after = self.link.bitmap();
        let mut out = Vec::new();
        let mut skipped = 0;
        for (i, start) in (off..off + len).step_by(block as usize).enumerate() {
            let n = block.min(off + len - start);
            if before.is_marked(start) || after.is_marked(start) {
                skipped += n;
                continue;
            }
            let same = match &remote {
                Remote::Digests(d) => d.get(i) == local_digests.get(i),
                Remote::Data(d) => {
                    let a = (start - off) as usize;
                    d.get(a..a + n as usize) == data.get(a..a + n as usize)
                }
            };
            if !same {
                out.push(Range {
                    offset: start,
                    len: n,
                });
            }
        }
        self.buf = data;
        self.progress.skipped.fetch_add(skipped, Relaxed);
        self.progress.done.fetch_add(len, Relaxed);
        Ok(out)
    }

    async fn close(&mut self) {
        if !LinkId::from_u64(self.job).is_invalid() {
            let _ = self.client.close(self.job).await;
        }
    }

    fn failed(&self, offset: u64, message: &str) -> VerifyError {
        VerifyError::Failed {
            volume: self.v.name.clone(),
            peer: self.link.peer.clone(),
            offset,
            message: message.to_owned(),
        }
    }

    fn local_failed(&self, offset: u64, message: String) -> VerifyError {
        VerifyError::Local {
            volume: self.v.name.clone(),
            offset,
            message,
        }
    }
}

enum Remote {
    Digests(Vec<[u8; DIGEST_LEN]>),
    Data(Bytes),
}

/// The primary's end of a job connection (see [`JobConn`]), with the
/// volume and peer its errors name.
struct JobClient {
    volume: String,
    peer: String,
    conn: JobConn,
}

impl JobClient {
    async fn connect(
        v: &VerifyVolume,
        link: &MirrorLink,
        progress: Arc<Progress>,
    ) -> Result<Arc<Self>, VerifyError> {
        let conn = JobConn::open(
            link.addr(),
            link.peer_name(),
            &v.ctx,
            CONNECT_TIMEOUT,
            move || {
                // Seed 002's "not found yet": the data follows.
                progress.not_ready.fetch_add(1, Relaxed);
            },
        )
        .await
        .map_err(|reason| VerifyError::Connect {
            volume: v.name.clone(),
            peer: link.peer.clone(),
            reason,
        })?;
        Ok(Arc::new(Self {
            volume: v.name.clone(),
            peer: link.peer.clone(),
            conn,
        }))
    }

    async fn call(
        &self,
        offset: u64,
        make: impl FnOnce(u64) -> Frame,
    ) -> Result<Frame, VerifyError> {
        match self.conn.call(make, REPLY_TIMEOUT).await {
            Ok(Frame::JobError { code, message, .. }) => Err(match code {
                JobErrorCode::Busy => VerifyError::Busy {
                    volume: self.volume.clone(),
                    peer: self.peer.clone(),
                    message,
                },
                JobErrorCode::Timeout => VerifyError::Timeout {
                    volume: self.volume.clone(),
                    peer: self.peer.clone(),
                    offset,
                    message,
                },
                code => VerifyError::Failed {
                    volume: self.volume.clone(),
                    peer: self.peer.clone(),
                    offset,
                    message: format!("{code}: {message}"),
                },
            }),
            Ok(f) => Ok(f),
            Err(CallError::Lost) => Err(VerifyError::Failed {
                volume: self.volume.clone(),
                peer: self.peer.clone(),
                offset,
                message: "job connection lost".into(),
            }),
            Err(CallError::Timeout) => Err(VerifyError::Timeout {
                volume: self.volume.clone(),
                peer: self.peer.clone(),
                offset,
                message: format!("no reply within {REPLY_TIMEOUT:?}"),
            }),
        }
    }

    fn unexpected(&self, offset: u64, f: &Frame) -> VerifyError {
        VerifyError::Failed {
            volume: self.volume.clone(),
            peer: self.peer.clone(),
            offset,
            message: format!("unexpected {} reply", f.kind()),
        }
    }

    /// Digests of `[offset, offset+len)`; `job` is the worker's link id,
    /// set from the reply when it was the invalid one.
    async fn hash(
        &self,
        job: &mut u64,
        offset: u64,
        len: u32,
        block: u32,
    ) -> Result<Vec<[u8; DIGEST_LEN]>, VerifyError> {
        let link = *job;
        match self
            .call(offset, |id| Frame::JobHash {
                id,
                link,
                offset,
                len,
                block,
            })
            .await?
        {
            Frame::JobHashes {
                link,
                digests,
                offset: o,
                len: l,
                ..
            } if o == offset && l == len => {
                *job = link;
                Ok(digests)
            }
            f => Err(self.unexpected(offset, &f)),
        }
    }

    /// Remote read of `[offset, offset+len)`.
    async fn read(&self, job: &mut u64, offset: u64, len: u32) -> Result<Bytes, VerifyError> {
        let link = *job;
        match self
            .call(offset, |id| Frame::JobRead {
                id,
                link,
                offset,
                len,
            })
            .await?
        {
            Frame::JobData {
                link,
                data,
                offset: o,
                ..
            } if o == offset && data.len() == len as usize => {
                *job = link;
                Ok(data)
            }
            f => Err(self.unexpected(offset, &f)),
        }
    }

    async fn close(&self, link: u64) -> Result<(), VerifyError> {
        self.call(0, |id| Frame::JobClose { id, link })
            .await
            .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_finished_status_survives_its_record_and_a_running_one_has_none() {
        let mut s = VerifyStatus {
            id: 4,
            state: "differ".into(),
            full: true,
            mark: true,
            started_unix: 10,
            finished_unix: Some(12),
            total_bytes: 1 << 30,
            done_bytes: 1 << 30,
            skipped_bytes: 4096,
            regions_waited: 2,
            not_ready: 1,
            differing_bytes: 128 << 10,
            differing: vec![Range {
                offset: 0,
                len: 128 << 10,
            }],
            differing_truncated: false,
            marked_bytes: 128 << 10,
            error: None,
        };
        let r = s.to_record("127.0.0.1:7701").unwrap();
        assert_eq!(r.peer, "127.0.0.1:7701");
        assert_eq!(VerifyStatus::from_record(&r), s);
        s.state = "failed".into();
        s.error = Some("volume v, mirror m: cancelled (node shutting down)".into());
        assert_eq!(VerifyStatus::from_record(&s.to_record("m").unwrap()), s);
        // More ranges than a record keeps: the first ones, marked truncated.
        s.differing = (0..300)
            .map(|i| Range {
                offset: i * 8192,
                len: 4096,
            })
            .collect();
        let back = VerifyStatus::from_record(&s.to_record("m").unwrap());
        assert_eq!(
            back.differing.len(),
            blockmirror_core::meta::MAX_VERIFY_RANGES
        );
        assert!(back.differing_truncated);
        assert!(serde_json::to_string(&back)
            .unwrap()
            .contains("\"differing_truncated\":true"));
        s.state = "running".into();
        assert!(s.to_record("m").is_none());
        // Absent from JSON when false (status consumers see no new key).
        let mut plain = back;
        plain.differing_truncated = false;
        assert!(!serde_json::to_string(&plain)
            .unwrap()
            .contains("differing_truncated"));
    }

    #[test]
    fn adjacent_ranges_merge() {
        let r = |offset, len| Range { offset, len };
        assert_eq!(
            merge([r(0, 4), r(4, 4), r(12, 4), r(16, 1)].into_iter()),
            [r(0, 8), r(12, 5)]
        );
        assert!(merge(std::iter::empty()).is_empty());
    }

    #[test]
    fn blocks_and_regions_fit_the_wire() {
        assert_eq!(block_len(64 << 10), 64 << 10);
        assert_eq!(block_len(512), MIN_HASH_BLOCK);
        assert_eq!(block_len(1 << 30), MAX_HASH_BLOCK);
        for g in [4096u64, 64 << 10, 1 << 20, 16 << 20] {
            let b = block_len(g);
            let r = region_len(b);
            assert!(r / u64::from(b) <= u64::from(MAX_JOB_HASHES));
            assert!(r >= u64::from(b));
            assert!(r <= MAX_REGION.max(u64::from(b)));
        }
    }
}
