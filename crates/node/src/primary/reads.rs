//! Host reads on a primary with mirrors: read balancing (seed 004, FIG. 9;
//! `read_policy = "balanced"`) and the remote reads that serve a volume
//! whose local disk failed (`on_primary_failure = "serve_from_mirror"`).
//!
//! [`ReadRouter`] decides per read. Paths: 0 is the local backend, 1.. are
//! the mirrors in config order. A mirror is eligible for one read only when
//! [`MirrorLink::serves_reads`] says it holds exactly the primary's data for
//! that range (sync, live, in sync, nothing marked or in flight there); the
//! choice among eligible paths is `blockmirror_core::readpath` (lowest
//! latency average, with probes). A remote read that fails in any way (the
//! link failed between the check and the reply, the job connection broke,
//! the mirror answered an error, no reply within `mirror_timeout`) is
//! served by the local disk instead, so balancing never turns a mirror's
//! trouble into a host error; the failure counts against the path.
//!
//! [`RemoteReader`] is one mirror's remote-read client: a few job
//! connections (seed 002), opened on the first read and again after a
//! failure (never more than once a second per mirror), each carrying one
//! job that all its reads name, with requests multiplexed by id and replies
//! routed back to their waiters in any order. A `JobNotReady` is only
//! counted: the mirror pushes the data when its read completes.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use blockmirror_core::jobs::LinkId;
use blockmirror_core::readpath::{ChooserConfig, ReadChooser};
use blockmirror_repl::{Frame, MAX_DATA};
use bytes::Bytes;
use tracing::{debug, info, warn};

use crate::daemon::config::ReadPolicy;
use crate::daemon::metrics::{self, MetricType};
use crate::primary::job_conn::{CallError, JobConn};
use crate::primary::MirrorLink;

/// Job connections one primary volume keeps to each mirror for reads. The
/// mirror works 16 requests per connection at once
/// (`jobs::MAX_REQUESTS_PER_CONNECTION`); two carry a QD32 host.
pub const READ_CONNECTIONS: usize = 2;
/// How long a job connection may take to connect and authenticate.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// After a failed connection attempt, the mirror is not asked again for
/// this long (its reads go to the local disk meanwhile).
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// Why a remote read failed. Each names volume, peer and offset.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RemoteReadError {
    #[error("volume {volume}, mirror {peer}: remote read at offset {offset}: {reason}")]
    Failed {
        volume: String,
        peer: String,
        offset: u64,
        reason: String,
    },
    #[error("volume {volume}, mirror {peer}: remote read at offset {offset}: no reply within {timeout:?}")]
    Timeout {
        volume: String,
        peer: String,
        offset: u64,
        timeout: Duration,
    },
}

/// One job connection and the job its reads name.
struct ReadConn {
    conn: JobConn,
    job: u64,
}

impl ReadConn {
    fn is_alive(&self) -> bool {
        self.conn.is_alive()
    }
}

/// One mirror's remote-read client (see the module docs).
pub struct RemoteReader {
    volume: String,
    size: u64,
    link: Arc<MirrorLink>,
    slots: Vec<tokio::sync::Mutex<Option<Arc<ReadConn>>>>,
    next_slot: AtomicUsize,
    /// No connection attempt before this.
    retry_at: Mutex<Option<Instant>>,
    timeout: Duration,
    /// `JobNotReady` answers (the mirror read from its disk).
    pub not_ready: Arc<AtomicU64>,
    /// Remote reads that failed (served locally instead).
    pub errors: AtomicU64,
}

impl RemoteReader {
    pub fn new(volume: &str, size: u64, link: Arc<MirrorLink>, timeout: Duration) -> Self {
        Self {
            volume: volume.to_owned(),
            size,
            link,
            slots: (0..READ_CONNECTIONS)
                .map(|_| tokio::sync::Mutex::new(None))
                .collect(),
            next_slot: AtomicUsize::new(0),
            retry_at: Mutex::new(None),
            timeout,
            not_ready: Arc::default(),
            errors: AtomicU64::new(0),
        }
    }

    pub fn peer(&self) -> &str {
        &self.link.peer
    }

    /// False while a failed connection attempt is recent.
    pub fn available(&self) -> bool {
        self.retry_at
            .lock()
            .expect("poisoned")
            .is_none_or(|t| Instant::now() >= t)
    }

    fn failed(&self, offset: u64, reason: impl Into<String>) -> RemoteReadError {
        RemoteReadError::Failed {
            volume: self.volume.clone(),
            peer: self.link.peer.clone(),
            offset,
            reason: reason.into(),
        }
    }

    /// Reads `[offset, offset+len)` from the mirror.
    pub async fn read(&self, offset: u64, len: u32) -> Result<Bytes, RemoteReadError> {
        if len > MAX_DATA {
            return Err(self.failed(
                offset,
                format!("{len} bytes is more than a job frame carries"),
            ));
        }
        let slot = self.next_slot.fetch_add(1, Relaxed) % self.slots.len();
        let conn = self.conn(slot, offset).await?;
        let r = self.read_on(&conn, conn.job, offset, len).await;
        if r.is_err() {
            // Whatever went wrong, the next read starts a fresh connection
            // (and job) on this slot.
            let mut s = self.slots[slot].lock().await;
            if s.as_ref().is_some_and(|c| Arc::ptr_eq(c, &conn)) {
                *s = None;
            }
        }
        r
    }

    /// The slot's live connection, connected (and its job opened) if needed.
    async fn conn(&self, slot: usize, offset: u64) -> Result<Arc<ReadConn>, RemoteReadError> {
        let mut s = self.slots[slot].lock().await;
        if let Some(c) = s.as_ref().filter(|c| c.is_alive()) {
            return Ok(c.clone());
        }
        *s = None;
        if !self.available() {
            return Err(self.failed(offset, "job connection failed recently; not retried yet"));
        }
        match self.connect().await {
            Ok(c) => {
                *s = Some(c.clone());
                Ok(c)
            }
            Err(reason) => {
                *self.retry_at.lock().expect("poisoned") = Some(Instant::now() + RETRY_AFTER);
                warn!(volume = %self.volume, peer = %self.link.peer, %reason,
                    "remote-read job connection failed; reads stay local for {RETRY_AFTER:?}");
                Err(self.failed(offset, reason))
            }
        }
    }

    async fn connect(&self) -> Result<Arc<ReadConn>, String> {
        let ctx = self
            .link
            .context()
            .ok_or("the mirror link has not started")?
            .clone();
        let nr = self.not_ready.clone();
        let conn = JobConn::open(
            self.link.addr(),
            self.link.peer_name(),
            &ctx,
            CONNECT_TIMEOUT,
            move || {
                nr.fetch_add(1, Relaxed);
            },
        )
        .await?;
        let mut conn = ReadConn {
            conn,
            job: LinkId::INVALID.to_u64(),
        };
        // A job is opened by its first request (seed 002): one small read,
        // so that every later read on this connection names the same job.
        let probe = self.size.min(4096) as u32;
        let job = self
            .request(&conn, LinkId::INVALID.to_u64(), 0, probe)
            .await
            .map_err(|e| format!("opening a job: {e}"))?
            .0;
        conn.job = job;
        info!(volume = %self.volume, peer = %self.link.peer, job = %LinkId::from_u64(job),
            "remote-read job connection up");
        Ok(Arc::new(conn))
    }

    async fn read_on(
        &self,
        conn: &ReadConn,
        job: u64,
        offset: u64,
        len: u32,
    ) -> Result<Bytes, RemoteReadError> {
        self.request(conn, job, offset, len).await.map(|(_, d)| d)
    }

    /// One JobRead; returns the job's link id and the data.
    async fn request(
        &self,
        conn: &ReadConn,
        job: u64,
        offset: u64,
        len: u32,
    ) -> Result<(u64, Bytes), RemoteReadError> {
        let reply = conn
            .conn
            .call(
                |id| Frame::JobRead {
                    id,
                    link: job,
                    offset,
                    len,
                },
                self.timeout,
            )
            .await;
        match reply {
            Ok(Frame::JobData {
                link,
                offset: o,
                data,
                ..
            }) if o == offset && data.len() == len as usize => Ok((link, data)),
            Ok(Frame::JobError { code, message, .. }) => {
                Err(self.failed(offset, format!("{code}: {message}")))
            }
            Ok(f) => Err(self.failed(offset, format!("unexpected {} reply", f.kind()))),
            Err(CallError::Lost) => Err(self.failed(offset, "job connection lost")),
            Err(CallError::Timeout) => Err(RemoteReadError::Timeout {
                volume: self.volume.clone(),
                peer: self.link.peer.clone(),
                offset,
                timeout: self.timeout,
            }),
        }
    }
}

/// Why a routed read failed: the local disk failed it (the caller decides
/// what a local failure means), or no path could serve it.
#[derive(Debug)]
pub enum RoutedReadError<E> {
    Local(E),
    /// Only when the local path is not offered: no mirror could serve it.
    NoPath,
}

/// The read path of one primary volume with mirrors (see the module docs).
pub struct ReadRouter {
    volume: String,
    policy: ReadPolicy,
    links: Vec<Arc<MirrorLink>>,
    remotes: Vec<RemoteReader>,
    chooser: Mutex<ReadChooser>,
    clock: Instant,
    /// Reads served per path (0: local).
    served: Vec<AtomicU64>,
}

impl ReadRouter {
    pub fn new(
        volume: &str,
        size: u64,
        policy: ReadPolicy,
        links: Vec<Arc<MirrorLink>>,
        timeout: Duration,
    ) -> Self {
        let remotes = links
            .iter()
            .map(|l| RemoteReader::new(volume, size, l.clone(), timeout))
            .collect();
        Self {
            volume: volume.to_owned(),
            policy,
            chooser: Mutex::new(ReadChooser::new(links.len() + 1, ChooserConfig::default())),
            served: (0..=links.len()).map(|_| AtomicU64::new(0)).collect(),
            links,
            remotes,
            clock: Instant::now(),
        }
    }

    pub fn policy(&self) -> ReadPolicy {
        self.policy
    }

    /// Reads served by mirror `peer` (as configured).
    pub fn served_by(&self, peer: &str) -> u64 {
        self.links
            .iter()
            .position(|l| l.peer == peer)
            .map_or(0, |i| self.served[i + 1].load(Relaxed))
    }

    /// `t` on the chooser's clock. Reading the clock is not free (3-4% of
    /// a 4 KiB read's CPU on this VM at four reads per request), so each
    /// read reads it twice: at its start and at its end.
    fn ns(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.clock).as_nanos() as u64
    }

    /// Eligibility per path; path 0 is `local`.
    fn eligible(&self, offset: u64, len: u32, local: bool) -> Vec<bool> {
        std::iter::once(local)
            .chain(
                self.links
                    .iter()
                    .zip(&self.remotes)
                    .map(|(l, r)| r.available() && l.serves_reads(offset, u64::from(len))),
            )
            .collect()
    }

    /// A host read. `local` reads the local disk; it is offered as a path
    /// unless `local_ok` is false (the disk is failed). With policy
    /// "primary" and a working disk, the read is local.
    pub async fn read<F, Fut, E>(
        &self,
        offset: u64,
        len: u32,
        local_ok: bool,
        local: F,
    ) -> Result<Bytes, RoutedReadError<E>>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<Bytes, E>>,
    {
        if local_ok && self.policy == ReadPolicy::Primary {
            let r = local().await.map_err(RoutedReadError::Local)?;
            self.served[0].fetch_add(1, Relaxed);
            return Ok(r);
        }
        let eligible = self.eligible(offset, len, local_ok);
        let started = Instant::now();
        let choice = self
            .chooser
            .lock()
            .expect("poisoned")
            .choose(self.ns(started), &eligible);
        let Some(choice) = choice else {
            return Err(RoutedReadError::NoPath);
        };
        if choice.path == 0 {
            let r = local().await;
            match &r {
                Ok(_) => self.record(0, started),
                Err(_) => self.record_error(0),
            }
            return r.map_err(RoutedReadError::Local);
        }
        let remote = &self.remotes[choice.path - 1];
        match remote.read(offset, len).await {
            Ok(data) => {
                self.record(choice.path, started);
                Ok(data)
            }
            Err(e) => {
                remote.errors.fetch_add(1, Relaxed);
                self.record_error(choice.path);
                debug!(error = %e, probe = choice.probe, "remote read failed; reading locally");
                if !local_ok {
                    warn!(volume = %self.volume, error = %e,
                        "remote read failed and the local disk is failed: EIO");
                    return Err(RoutedReadError::NoPath);
                }
                let started = Instant::now();
                let r = local().await.map_err(RoutedReadError::Local)?;
                self.record(0, started);
                Ok(r)
            }
        }
    }

    fn record(&self, path: usize, started: Instant) {
        let now = Instant::now();
        let lat = now.saturating_duration_since(started).as_nanos() as u64;
        self.chooser
            .lock()
            .expect("poisoned")
            .record(path, self.ns(now), lat);
        self.served[path].fetch_add(1, Relaxed);
    }

    fn record_error(&self, path: usize) {
        let now = self.ns(Instant::now());
        self.chooser
            .lock()
            .expect("poisoned")
            .record_error(path, now);
    }

    /// Every path's figures, local first.
    fn paths(&self) -> Vec<PathStats> {
        let c = self.chooser.lock().expect("poisoned");
        std::iter::once("local".to_owned())
            .chain(self.links.iter().map(|l| l.peer.clone()))
            .enumerate()
            .map(|(i, name)| {
                let e = c.estimate(i).copied().unwrap_or_default();
                PathStats {
                    name,
                    served: self.served[i].load(Relaxed),
                    ewma_seconds: e.ewma_ns.map(|n| n / 1e9),
                    probes: e.probes,
                }
            })
            .collect()
    }
}

/// One read path's figures for /metrics.
struct PathStats {
    /// `local`, or the mirror's peer.
    name: String,
    served: u64,
    ewma_seconds: Option<f64>,
    probes: u64,
}

/// One primary volume's read and local-disk state for /metrics.
pub struct ReadMetrics<'a> {
    pub volume: &'a str,
    pub router: Option<&'a ReadRouter>,
    pub disk: Option<&'a crate::volume::local_disk::LocalDisk>,
}

/// Registers the read-path families of the volumes among `volumes` with
/// mirrors.
pub fn register_metrics(registry: &mut metrics::Registry, volumes: metrics::VolumeList) {
    use blockmirror_nbd::Export as _;
    registry.register_collector(metrics::FnCollector::boxed("reads", move |enc| {
        let volumes = volumes();
        let reads: Vec<ReadMetrics<'_>> = volumes
            .iter()
            .filter(|v| v.replicator().is_some())
            .map(|v| ReadMetrics {
                volume: v.name(),
                router: v.reads(),
                disk: v.disk().map(|d| &**d),
            })
            .collect();
        encode_metrics(enc, &reads)
    }));
}

/// The read-path families: reads per path, latency average per path,
/// probes, remote-read errors, and the local disk's state.
pub fn encode_metrics(
    enc: &mut metrics::Encoder<'_>,
    volumes: &[ReadMetrics<'_>],
) -> std::fmt::Result {
    let routed: Vec<(&str, &ReadRouter, Vec<PathStats>)> = volumes
        .iter()
        .filter_map(|v| v.router.map(|r| (v.volume, r, r.paths())))
        .collect();
    if !routed.is_empty() {
        let name = "blockmirror_reads_total";
        let mut f = metrics::family(
            enc,
            name,
            MetricType::Counter,
            "Host reads served, by path: local, or the mirror (peer) that served it.",
        )?;
        for (vol, _, paths) in &routed {
            for p in paths {
                f.sample(&[("volume", vol), ("path", &p.name)], p.served)?;
            }
        }
        let name = "blockmirror_read_probes_total";
        let mut f = metrics::family(
            enc,
            name,
            MetricType::Counter,
            "Balanced reads sent to a path to refresh its latency estimate.",
        )?;
        for (vol, _, paths) in &routed {
            for p in paths {
                f.sample(&[("volume", vol), ("path", &p.name)], p.probes)?;
            }
        }
        let name = "blockmirror_read_latency_ewma_seconds";
        let mut f = metrics::family(
            enc,
            name,
            MetricType::Gauge,
            "Moving average of read latency per path (balanced policy; absent before a sample).",
        )?;
        for (vol, _, paths) in &routed {
            for p in paths {
                if let Some(e) = p.ewma_seconds {
                    f.sample(&[("volume", vol), ("path", &p.name)], e)?;
                }
            }
        }
        let name = "blockmirror_remote_read_errors_total";
        let mut f = metrics::family(enc, name, MetricType::Counter, "Remote reads that failed (the read was served locally, or failed if the disk is failed).")?;
        for (vol, r, _) in &routed {
            for rr in &r.remotes {
                f.sample(
                    &[("volume", vol), ("peer", rr.peer())],
                    rr.errors.load(Relaxed),
                )?;
            }
        }
    }
    let disks: Vec<_> = volumes
        .iter()
        .filter_map(|v| v.disk.map(|d| (v.volume, d)))
        .collect();
    if !disks.is_empty() {
        let name = "blockmirror_local_disk_failed";
        let mut f = metrics::family(enc, name, MetricType::Gauge, "1 when the primary's local disk is marked failed and the volume is served from a mirror.")?;
        for (vol, d) in &disks {
            f.sample(&[("volume", vol)], u8::from(d.is_failed()))?;
        }
    }
    Ok(())
}
