//! A volume's local disk as the node uses it: the backend, an optional fault
//! injector (tests), and the **failed** state of `on_primary_failure =
//! "serve_from_mirror"`.
//!
//! Every user of a volume's backend on this node (host I/O, the links'
//! catch-up copies and activity-log flushes, verify) holds the same
//! [`LocalDisk`]. Once it is marked failed ([`LocalDisk::detach`]: the
//! volume's role machine takes `LocalDiskFailed`, and its disk state, sticky
//! for the run, is what every call here checks) no call
//! reaches the disk any more: reads, writes, trims and zeroes fail at once,
//! so no copy can send a mirror the stale local data, and a flush succeeds
//! without doing anything (nothing was written since; the mirrors hold the
//! data now, and a flush that failed would refuse every later write whose
//! activity-log extent is new).
//!
//! **Restart.** The failed state is recorded durably before any host
//! request is served from the mirror: a marker file `<volume>.disk-failed`
//! in the node's state directory (fsynced, and its directory too). A node
//! that finds the marker at start does not serve that disk as a primary's:
//! it is stale (it lacks every write served by the mirror since). The node
//! makes the volume a blank mirror (its record discards its generation and
//! says inconsistent, then the marker goes), so the node that is primary
//! (the mirror that took the writes, promoted) copies the whole volume to
//! it, as to a replaced disk. The marker is a file of its own rather than a
//! field of the volume's metadata record: it is written from the I/O path,
//! at most once.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};

use blockmirror_core::role::{Action, Event};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use blockmirror_storage::fault::RandomFaults;
use blockmirror_storage::{Backend, Extent, FaultBackend, Faults, FileBackend, Op, StorageError};
use serde::{Deserialize, Serialize};
use tracing::{error, warn};

use crate::daemon::config::{PrimaryFailurePolicy, VolumeConfig};
use crate::volume::role::RoleCell;

/// Why a volume's local disk could not be opened for serving.
#[derive(Debug, thiserror::Error)]
pub enum LocalDiskError {
    #[error("volume {volume}: reading {marker}: {source}")]
    Marker {
        volume: String,
        marker: String,
        #[source]
        source: std::io::Error,
    },
}

/// The body of `POST /volumes/{name}/faults` (test only: the volume needs
/// `fault_injection = true`). Every field absent means "no such fault";
/// each request replaces all faults.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultRequest {
    /// Latency added to every read, in microseconds.
    #[serde(default)]
    pub read_latency_us: u64,
    /// Latency added to every write, trim and flush, in microseconds.
    #[serde(default)]
    pub write_latency_us: u64,
    /// Fail every read overlapping `[offset, offset+len)` with EIO.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fail_reads: Option<FaultRange>,
    /// Fail every write overlapping `[offset, offset+len)` with EIO.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fail_writes: Option<FaultRange>,
    /// Fail the next this many writes with EIO.
    #[serde(default)]
    pub fail_next_writes: u32,
    /// Fail every flush with EIO.
    #[serde(default)]
    pub fail_flush: bool,
    /// Seeded random faults (EIO, ENOSPC, latency spikes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub random: Option<RandomFaultRequest>,
}

/// The `random` part of a [`FaultRequest`]: each write fails with EIO or
/// ENOSPC, and each read, write or flush sleeps `spike_us`, with these
/// probabilities in parts per million, drawn from `seed`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RandomFaultRequest {
    pub seed: u64,
    #[serde(default)]
    pub eio_ppm: u32,
    #[serde(default)]
    pub enospc_ppm: u32,
    #[serde(default)]
    pub spike_ppm: u32,
    #[serde(default)]
    pub spike_us: u64,
}

/// A byte range of a [`FaultRequest`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultRange {
    pub offset: u64,
    pub len: u64,
}

impl FaultRequest {
    fn faults(&self) -> Faults {
        let us = |n: u64| (n > 0).then(|| Duration::from_micros(n));
        let eio = blockmirror_storage::fault::errno::EIO;
        let range =
            |r: &Option<FaultRange>| r.map(|r| (r.offset..r.offset.saturating_add(r.len), eio));
        Faults {
            read_latency: us(self.read_latency_us),
            write_latency: us(self.write_latency_us),
            fail_writes: self.fail_next_writes,
            fail_writes_errno: eio,
            fail_write_range: range(&self.fail_writes),
            fail_read_range: range(&self.fail_reads),
            fail_flush: self.fail_flush,
            random: self.random.map(|r| RandomFaults {
                seed: r.seed,
                eio_ppm: r.eio_ppm.min(1_000_000),
                enospc_ppm: r.enospc_ppm.min(1_000_000),
                spike_ppm: r.spike_ppm.min(1_000_000),
                spike: Duration::from_micros(r.spike_us),
            }),
        }
    }
}

/// A volume's local disk (see the module docs).
pub struct LocalDisk {
    volume: String,
    inner: Arc<dyn Backend>,
    faults: Option<Arc<FaultBackend<FileBackend>>>,
    policy: PrimaryFailurePolicy,
    /// The volume's role, whose disk state says whether the disk failed.
    role: Arc<RoleCell>,
    /// Times the disk was found failed (0 or 1), for /metrics.
    failures: AtomicU64,
    marker: PathBuf,
    /// Set once the marker is durable.
    marker_stored: AtomicBool,
    /// What made it fail, for the marker and the log.
    cause: Mutex<Option<String>>,
}

impl LocalDisk {
    /// The marker file of `volume` in `state_dir`.
    pub fn marker_path(state_dir: &Path, volume: &str) -> PathBuf {
        state_dir.join(format!("{volume}.disk-failed"))
    }

    /// Wraps an opened backend for volume `vc`: in a fault injector when
    /// `fault_injection` is on. Also says why the disk was marked failed in
    /// an earlier run, if it was: it is stale then, and the caller must not
    /// serve it as a primary (the node makes it a blank mirror, see
    /// [`LocalDisk::forget_failure`]).
    pub fn open(
        vc: &VolumeConfig,
        file: FileBackend,
        state_dir: &Path,
        role: Arc<RoleCell>,
    ) -> Result<(Arc<LocalDisk>, Option<String>), LocalDiskError> {
        let marker = Self::marker_path(state_dir, &vc.name);
        let earlier = match std::fs::read_to_string(&marker) {
            Ok(reason) => Some(reason.trim().to_owned()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(source) => {
                return Err(LocalDiskError::Marker {
                    volume: vc.name.clone(),
                    marker: marker.display().to_string(),
                    source,
                })
            }
        };
        let (inner, faults): (Arc<dyn Backend>, _) = if vc.fault_injection {
            warn!(volume = %vc.name, "fault_injection is on: for testing only");
            let f = Arc::new(FaultBackend::new(file, Faults::default()));
            (f.clone(), Some(f))
        } else {
            (Arc::new(file), None)
        };
        let disk = Arc::new(LocalDisk {
            volume: vc.name.clone(),
            inner,
            faults,
            policy: vc.on_primary_failure,
            role,
            failures: AtomicU64::new(0),
            marker,
            marker_stored: AtomicBool::new(false),
            cause: Mutex::new(None),
        });
        Ok((disk, earlier))
    }

    /// Removes the failure marker, once the volume's record says blank
    /// (so nothing of the stale disk can be served as a primary's data).
    pub fn forget_failure(&self) -> std::io::Result<()> {
        match std::fs::remove_file(&self.marker) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// A primary's disk over any backend (tests).
    pub fn wrap(
        volume: &str,
        inner: Arc<dyn Backend>,
        policy: PrimaryFailurePolicy,
        state_dir: &Path,
    ) -> Arc<LocalDisk> {
        let role = RoleCell::new(volume);
        role.feed(Event::Open {
            label: blockmirror_core::MirrorLabel::None,
            stale_disk: false,
        })
        .expect("a new cell opens");
        Arc::new(LocalDisk {
            volume: volume.to_owned(),
            inner,
            faults: None,
            policy,
            role,
            failures: AtomicU64::new(0),
            marker: Self::marker_path(state_dir, volume),
            marker_stored: AtomicBool::new(false),
            cause: Mutex::new(None),
        })
    }

    pub fn policy(&self) -> PrimaryFailurePolicy {
        self.policy
    }

    /// True once the disk was marked failed.
    pub fn is_failed(&self) -> bool {
        self.role.disk_failed()
    }

    /// `ok` or `failed`, as /status spells it.
    pub fn state_str(&self) -> &'static str {
        if self.is_failed() {
            "failed"
        } else {
            "ok"
        }
    }

    pub fn failures(&self) -> u64 {
        self.failures.load(SeqCst)
    }

    /// Replaces the injected faults; false when `fault_injection` is off.
    pub fn set_faults(&self, req: &FaultRequest) -> bool {
        match &self.faults {
            Some(f) => {
                f.set_faults(req.faults());
                true
            }
            None => false,
        }
    }

    /// Marks the disk failed after `e` (logged once, with volume, offset and
    /// error), and stores the marker durably. Returns once the marker is
    /// durable; an error when it could not be stored (the caller then must
    /// not serve the request from a mirror: a restart could serve the stale
    /// disk). Later calls only wait for (or retry) the marker. An error too
    /// when the volume is not (or no longer) a primary.
    pub async fn detach(self: &Arc<Self>, e: &StorageError) -> Result<(), String> {
        let actions = self
            .role
            .feed(Event::LocalDiskFailed)
            .map_err(|e| e.to_string())?;
        if actions.contains(&Action::RecordDiskFailure) {
            self.failures.fetch_add(1, SeqCst);
            let cause = format!(
                "{} at offset {} length {}: {}",
                e.op, e.offset, e.len, e.cause
            );
            error!(volume = %self.volume, op = %e.op, offset = e.offset, len = e.len, error = %e.cause,
                "local disk failed: marked failed, serving from the mirror from now on (on_primary_failure = serve_from_mirror)");
            *self.cause.lock().expect("poisoned") = Some(cause);
        }
        self.ensure_marker().await
    }

    /// Stores the marker unless it already is.
    pub async fn ensure_marker(self: &Arc<Self>) -> Result<(), String> {
        if self.marker_stored.load(SeqCst) {
            return Ok(());
        }
        let me = self.clone();
        let r = tokio::task::spawn_blocking(move || me.store_marker())
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()));
        match r {
            Ok(()) => {
                self.marker_stored.store(true, SeqCst);
                Ok(())
            }
            Err(e) => {
                error!(volume = %self.volume, marker = %self.marker.display(), error = %e,
                    "cannot record the failed local disk; refusing to serve from the mirror until it is recorded");
                Err(e)
            }
        }
    }

    fn store_marker(&self) -> std::io::Result<()> {
        let cause = self
            .cause
            .lock()
            .expect("poisoned")
            .clone()
            .unwrap_or_default();
        let unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if let Some(dir) = self.marker.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = self.marker.with_extension("disk-failed.tmp");
        let text = format!(
            "volume {} local disk failed at unix time {unix}: {cause}\n",
            self.volume
        );
        blockmirror_storage::durable::replace_file(&self.marker, &tmp, text.as_bytes())
            .map_err(|e| e.source)
    }

    fn refused(&self, op: Op, offset: u64, len: u64) -> StorageError {
        StorageError::new(
            &self.volume,
            op,
            offset,
            len,
            std::io::Error::other("local disk is marked failed (serving from the mirror)"),
        )
    }
}

impl Backend for LocalDisk {
    fn volume(&self) -> &str {
        &self.volume
    }

    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> blockmirror_storage::Result<()> {
        if self.is_failed() {
            return Err(self.refused(Op::Read, offset, buf.len() as u64));
        }
        self.inner.read_at(buf, offset)
    }

    fn try_read_at_nowait(&self, buf: &mut [u8], offset: u64) -> blockmirror_storage::Result<bool> {
        if self.is_failed() {
            return Err(self.refused(Op::Read, offset, buf.len() as u64));
        }
        self.inner.try_read_at_nowait(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> blockmirror_storage::Result<()> {
        if self.is_failed() {
            return Err(self.refused(Op::Write, offset, buf.len() as u64));
        }
        self.inner.write_at(buf, offset, fua)
    }

    /// A no-op once failed (see the module docs).
    fn flush(&self) -> blockmirror_storage::Result<()> {
        if self.is_failed() {
            return Ok(());
        }
        self.inner.flush()
    }

    fn trim(&self, offset: u64, len: u64) -> blockmirror_storage::Result<()> {
        if self.is_failed() {
            return Err(self.refused(Op::Trim, offset, len));
        }
        self.inner.trim(offset, len)
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_trim: bool,
        fua: bool,
    ) -> blockmirror_storage::Result<()> {
        if self.is_failed() {
            return Err(self.refused(Op::WriteZeroes, offset, len));
        }
        self.inner.write_zeroes(offset, len, may_trim, fua)
    }

    fn fast_zeroes(&self) -> bool {
        self.inner.fast_zeroes()
    }

    /// Once failed, everything is reported as data (nothing is known).
    fn allocation(&self, offset: u64, len: u64) -> blockmirror_storage::Result<Vec<Extent>> {
        if self.is_failed() {
            return Ok(vec![Extent { len, hole: false }]);
        }
        self.inner.allocation(offset, len)
    }

    fn is_fast(&self) -> bool {
        self.inner.is_fast()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use blockmirror_storage::MemBackend;

    #[tokio::test]
    async fn a_failed_disk_is_no_longer_touched_and_the_marker_is_durable() {
        let dir = tempfile::tempdir().unwrap();
        let mem = Arc::new(MemBackend::new("v", 1 << 20));
        let disk = LocalDisk::wrap(
            "v",
            mem.clone(),
            PrimaryFailurePolicy::ServeFromMirror,
            dir.path(),
        );
        disk.write_at(&[7u8; 4096], 0, false).unwrap();
        assert_eq!(disk.state_str(), "ok");
        let e = StorageError::new("v", Op::Write, 8192, 4096, std::io::Error::other("boom"));
        disk.detach(&e).await.unwrap();
        disk.detach(&e).await.unwrap();
        assert_eq!(disk.failures(), 1, "counted once");
        assert_eq!(disk.state_str(), "failed");
        assert!(disk.write_at(&[9u8; 4096], 0, false).is_err());
        let mut buf = [0u8; 4096];
        assert!(disk.read_at(&mut buf, 0).is_err());
        assert!(disk.trim(0, 4096).is_err());
        assert!(disk.flush().is_ok(), "a flush of a failed disk is a no-op");
        assert_eq!(
            mem.snapshot()[..4096],
            [7u8; 4096],
            "the disk was not written"
        );
        let marker = std::fs::read_to_string(LocalDisk::marker_path(dir.path(), "v")).unwrap();
        assert!(marker.contains("offset 8192"), "{marker}");
    }

    /// Crash points of the marker: once it was stored, every state a power
    /// cut can leave has it, readable; before, it is absent or readable.
    #[test]
    fn every_power_cut_after_the_marker_was_stored_keeps_it() {
        use blockmirror_storage::durable::{self, crash};
        let dir = tempfile::tempdir().unwrap();
        let disk = LocalDisk::wrap(
            "v",
            Arc::new(MemBackend::new("v", 1 << 20)),
            PrimaryFailurePolicy::ServeFromMirror,
            dir.path(),
        );
        let ((), events) = durable::record(|| {
            disk.store_marker().unwrap();
            durable::mark("stored");
        });
        let marker = LocalDisk::marker_path(dir.path(), "v");
        let states = crash::states(&crash::Files::new(), &events);
        assert!(states.len() > 5);
        for st in states {
            crash::restore(dir.path(), &st.files).unwrap();
            match std::fs::read_to_string(&marker) {
                Ok(text) => assert!(text.contains("local disk failed"), "{}: {text:?}", st.how),
                Err(e) => {
                    assert_eq!(e.kind(), std::io::ErrorKind::NotFound, "{}", st.how);
                    assert!(
                        st.marks.is_empty(),
                        "{}: the stored marker vanished",
                        st.how
                    );
                }
            }
        }
    }

    #[test]
    fn fault_requests_map_to_faults() {
        let f = FaultRequest {
            read_latency_us: 2000,
            fail_reads: Some(FaultRange {
                offset: 4096,
                len: 4096,
            }),
            ..FaultRequest::default()
        }
        .faults();
        assert_eq!(f.read_latency, Some(Duration::from_millis(2)));
        assert_eq!(f.write_latency, None);
        assert_eq!(f.fail_read_range.unwrap().0, 4096..8192);
        assert!(f.fail_write_range.is_none());
        assert_eq!(FaultRequest::default().faults().fail_writes, 0);
        let req: FaultRequest = serde_json::from_str(
            r#"{"random": {"seed": 7, "eio_ppm": 2000, "enospc_ppm": 3000, "spike_ppm": 50000, "spike_us": 20000}}"#,
        )
        .unwrap();
        let r = req.faults().random.unwrap();
        assert_eq!(
            (r.seed, r.eio_ppm, r.enospc_ppm, r.spike_ppm),
            (7, 2000, 3000, 50000)
        );
        assert_eq!(r.spike, Duration::from_millis(20));
    }
}
