//! A volume: a storage backend exported over NBD, with its metrics.
//!
//! - [`meta_file`]: crash-safe storage of the volume's metadata record.
//! - [`local_disk`]: the local backend with its failed state
//!   (`serve_from_mirror`) and test faults.
//! - [`role`]: the volume's role on this node, the one [`role::RoleCell`]
//!   every part asks.
//!
//! Where each request runs is decided here. Buffered I/O on a regular file
//! completes in microseconds against the page cache, so writes run inline on
//! the connection's task and reads try `preadv2(RWF_NOWAIT)` inline first;
//! everything that can wait on a disk (uncached reads, FUA, flush, trim,
//! O_DIRECT, block devices) goes to tokio's blocking pool, so one slow request
//! never holds up the others on its connection.

pub mod local_disk;
pub mod meta_file;
pub mod role;

use std::sync::Arc;
use std::time::Duration;

use blockmirror_nbd::proto::{STATE_HOLE, STATE_ZERO};
use blockmirror_nbd::{CmdKind, Errno, Export, StatusExtent};
use blockmirror_storage::{Backend, StorageError};
use bytes::{Bytes, BytesMut};
use tracing::warn;

use crate::daemon::config::{PrimaryFailurePolicy, Role};
use crate::daemon::metrics::VolumeMetrics;
use crate::primary::reads::{ReadRouter, RoutedReadError};
use crate::primary::{MirrorOp, Replicator};
use crate::volume::local_disk::LocalDisk;
use crate::volume::meta_file::MetaCell;
use crate::volume::role::RoleCell;
use blockmirror_core::VolumeMeta;

/// A served volume.
///
/// Its role can change at run time (`promote`, `demote`, `resync
/// --discard-local`): it lives in a [`RoleCell`], which the export's
/// read-only flag and every host write read. A connection negotiated before
/// a switch keeps the flags it was told, but every host write checks the
/// role now, so a demoted volume refuses writes with EPERM on old
/// connections too.
pub struct Volume {
    name: String,
    role: Arc<RoleCell>,
    backend: Arc<dyn Backend>,
    size: u64,
    /// The `read_only` config key as a primary would have it.
    primary_read_only: bool,
    metrics: VolumeMetrics,
    meta: Arc<MetaCell>,
    replicator: Option<Arc<Replicator>>,
    /// The local disk with its failed state (`on_primary_failure`); None
    /// for a volume built without one (tests).
    disk: Option<Arc<LocalDisk>>,
    /// On a primary with mirrors: where host reads go (`read_policy`), and
    /// the remote reads of a failed disk.
    reads: Option<ReadRouter>,
    /// NBD STARTTLS mode of the export (`tls` key).
    tls: blockmirror_nbd::TlsMode,
    /// Cluster mode: host writes are acknowledged only while this node
    /// holds the volume's primary key under a trusted lease. None: static
    /// roles (no check at all).
    fence: Option<Arc<crate::cluster::fence::Fence>>,
}

/// How long a host write waits for the fence to lift (this node taking the
/// primary key, a lease renewal) before it fails with EIO.
const FENCE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

impl Volume {
    /// A volume whose role is `role`; `primary_read_only` is the
    /// `read_only` key as it applies while the volume is a primary (a mirror
    /// is always read-only).
    pub fn new(
        name: &str,
        role: Arc<RoleCell>,
        backend: Arc<dyn Backend>,
        primary_read_only: bool,
        meta: Arc<MetaCell>,
        replicator: Option<Arc<Replicator>>,
    ) -> Self {
        let size = backend.size();
        let metrics = VolumeMetrics::new(name);
        metrics.set_size_bytes(size);
        Self {
            name: name.to_owned(),
            role,
            backend,
            size,
            primary_read_only,
            metrics,
            meta,
            replicator,
            disk: None,
            reads: None,
            tls: blockmirror_nbd::TlsMode::Off,
            fence: None,
        }
    }

    /// Cluster mode: writes are acknowledged only under `fence`.
    pub fn with_fence(mut self, fence: Arc<crate::cluster::fence::Fence>) -> Self {
        self.fence = Some(fence);
        self
    }

    pub fn fence(&self) -> Option<&Arc<crate::cluster::fence::Fence>> {
        self.fence.as_ref()
    }

    /// Runs a host write (or flush) under the fence: it starts only once
    /// this node may acknowledge (waiting at most [`FENCE_WAIT`]), and its
    /// success is reported only if it still may when the write is done; a
    /// write done but not acknowledged is a write the host may or may not
    /// find later, which is allowed.
    async fn fenced<F: std::future::Future<Output = Result<(), Errno>>>(
        &self,
        f: F,
    ) -> Result<(), Errno> {
        let Some(fence) = &self.fence else {
            return f.await;
        };
        if !fence.wait_writable(FENCE_WAIT).await {
            warn!(volume = %self.name, epoch = fence.epoch(),
                "host write refused: this node does not hold the volume's primary key under a live lease");
            return Err(Errno::Io);
        }
        f.await?;
        // Never acknowledged once the lease's trust lapsed, even if a later
        // renewal restores it: the bound on acknowledgements after losing
        // etcd is the lease, not the lease plus a wait.
        if !fence.may_ack() {
            warn!(volume = %self.name,
                "host write done but not acknowledged: the cluster lease lapsed meanwhile");
            return Err(Errno::Io);
        }
        Ok(())
    }

    /// Sets how the export takes NBD STARTTLS.
    pub fn with_tls(mut self, tls: blockmirror_nbd::TlsMode) -> Self {
        self.tls = tls;
        self
    }

    /// Gives the volume its local disk (the same object as its backend) and,
    /// on a primary with mirrors, its read router.
    pub fn with_disk(mut self, disk: Arc<LocalDisk>, reads: Option<ReadRouter>) -> Self {
        self.disk = Some(disk);
        self.reads = reads;
        self
    }

    pub fn disk(&self) -> Option<&Arc<LocalDisk>> {
        self.disk.as_ref()
    }

    pub fn reads(&self) -> Option<&ReadRouter> {
        self.reads.as_ref()
    }

    /// True while the backend completes I/O in microseconds (asked per
    /// request: an injected latency changes it at run time).
    fn fast(&self) -> bool {
        self.backend.is_fast()
    }

    /// True once the local disk is marked failed: nothing local is used.
    fn disk_failed(&self) -> bool {
        self.role.disk_failed()
    }

    /// A local I/O failed with `e`. With `serve_from_mirror`, on a primary
    /// whose mirror can take over (an in-sync sync mirror is live), the disk
    /// is marked failed and Ok is returned: the caller serves the request
    /// from the mirror. Otherwise the error the host gets. A disk is not
    /// detached while no mirror could take over: that would turn one bad
    /// sector into a volume that answers nothing.
    async fn local_failed(&self, e: StorageError) -> Result<(), Errno> {
        if let (Some(d), Some(r)) = (&self.disk, &self.replicator) {
            if d.policy() == PrimaryFailurePolicy::ServeFromMirror
                && self.role() == Role::Primary
                && (d.is_failed() || r.links.iter().any(|l| l.can_take_over()))
            {
                return match d.detach(&e).await {
                    Ok(()) => Ok(()),
                    Err(_) => Err(Errno::Io),
                };
            }
        }
        Err(self.fail(e))
    }

    /// The disk is failed: the marker must be durable before a request is
    /// served from the mirror.
    async fn ensure_failed_recorded(&self) -> Result<(), Errno> {
        match &self.disk {
            Some(d) => d.ensure_marker().await.map_err(|_| Errno::Io),
            None => Ok(()),
        }
    }

    pub fn meta(&self) -> VolumeMeta {
        self.meta.get()
    }

    pub fn meta_cell(&self) -> &Arc<MetaCell> {
        &self.meta
    }

    /// The volume's role, which every role change is fed to.
    pub fn role_cell(&self) -> &Arc<RoleCell> {
        &self.role
    }

    /// EPERM unless the volume is the primary here (only its primary writes
    /// a mirror; a volume promoting or demoting takes no host write).
    fn check_writable(&self) -> Result<(), Errno> {
        if self.role.accepts_host_writes() {
            Ok(())
        } else {
            Err(Errno::Perm)
        }
    }

    pub fn replicator(&self) -> Option<&Arc<Replicator>> {
        self.replicator.as_ref()
    }

    /// `Primary` only while it takes host writes; `Mirror` otherwise
    /// (also while a promotion or a demotion is under way).
    pub fn role(&self) -> Role {
        self.role.role()
    }

    pub fn metrics(&self) -> &VolumeMetrics {
        &self.metrics
    }

    pub fn generation(&self) -> String {
        self.meta.get().generation_string()
    }

    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    /// Turns a backend failure into the NBD error the client sees. The error
    /// carries volume, operation and range; it is logged here, once.
    fn fail(&self, e: StorageError) -> Errno {
        warn!(error = %e, "backend i/o failed");
        if e.is_no_space() {
            Errno::NoSpc
        } else {
            Errno::Io
        }
    }

    /// Runs `f` on the blocking pool.
    async fn blocking<T, F>(&self, f: F) -> Result<T, Errno>
    where
        T: Send + 'static,
        F: FnOnce(&dyn Backend) -> Result<T, StorageError> + Send + 'static,
    {
        match self.blocking_raw(f).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(self.fail(e)),
            Err(e) => Err(e),
        }
    }

    /// Runs `f` on the blocking pool; the backend's error as it is.
    async fn blocking_raw<T, F>(&self, f: F) -> Result<Result<T, StorageError>, Errno>
    where
        T: Send + 'static,
        F: FnOnce(&dyn Backend) -> Result<T, StorageError> + Send + 'static,
    {
        let b = self.backend.clone();
        tokio::task::spawn_blocking(move || f(b.as_ref()))
            .await
            .map_err(|join| {
                warn!(volume = %self.name, error = %join, "backend task panicked");
                Errno::Io
            })
    }
}

impl Volume {
    /// The local half of a host write, trim, zeroes or flush. Once the disk
    /// is failed it does nothing (the mirrors take the request); a failure
    /// goes through [`Volume::local_failed`].
    async fn local_io<F>(&self, inline: bool, f: F) -> Result<(), Errno>
    where
        F: FnOnce(&dyn Backend) -> Result<(), StorageError> + Send + 'static,
    {
        if self.disk_failed() {
            return self.ensure_failed_recorded().await;
        }
        let r = if inline {
            f(self.backend.as_ref())
        } else {
            self.blocking_raw(f).await?
        };
        match r {
            Ok(()) => Ok(()),
            Err(e) => self.local_failed(e).await,
        }
    }

    async fn local_write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), Errno> {
        self.local_io(self.fast() && !fua, move |b| b.write_at(&data, offset, fua))
            .await
    }

    async fn local_trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), Errno> {
        self.local_io(false, move |b| {
            b.trim(offset, len)?;
            if fua {
                b.flush()?;
            }
            Ok(())
        })
        .await
    }

    async fn local_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_trim: bool,
        fua: bool,
    ) -> Result<(), Errno> {
        self.local_io(false, move |b| b.write_zeroes(offset, len, may_trim, fua))
            .await
    }

    async fn local_flush(&self) -> Result<(), Errno> {
        self.local_io(false, |b| b.flush()).await
    }

    /// A read of the local disk; the backend's error as it is.
    async fn local_read(&self, offset: u64, len: u32) -> Result<Bytes, LocalReadError> {
        let mut buf = BytesMut::zeroed(len as usize);
        if self.fast() {
            match self.backend.try_read_at_nowait(&mut buf, offset) {
                Ok(true) => return Ok(buf.freeze()),
                Ok(false) => {}
                Err(e) => return Err(LocalReadError::Disk(e)),
            }
        }
        match self
            .blocking_raw(move |b| b.read_at(&mut buf, offset).map(|()| buf.freeze()))
            .await
        {
            Ok(Ok(d)) => Ok(d),
            Ok(Err(e)) => Err(LocalReadError::Disk(e)),
            Err(e) => Err(LocalReadError::Errno(e)),
        }
    }

    /// Whether the request must be acknowledged by an in-sync sync mirror:
    /// the local disk is failed (before or during the request).
    async fn write_inner(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), Errno> {
        match &self.replicator {
            None => self.local_write(offset, data, fua).await,
            Some(r) => {
                let op = MirrorOp::Write {
                    offset,
                    data: data.clone(),
                    fua,
                };
                r.replicate_with(op, || self.local_write(offset, data, fua), &|| {
                    self.mirror_required()
                })
                .await
            }
        }
    }

    async fn flush_inner(&self) -> Result<(), Errno> {
        match &self.replicator {
            None => self.local_flush().await,
            Some(r) => {
                r.flush_with(|| self.local_flush(), &|| self.mirror_required())
                    .await
            }
        }
    }

    async fn trim_inner(&self, offset: u64, len: u64, fua: bool) -> Result<(), Errno> {
        match &self.replicator {
            None => self.local_trim(offset, len, fua).await,
            Some(r) => {
                let op = MirrorOp::Trim {
                    offset,
                    len: len as u32,
                    fua,
                };
                r.replicate_with(op, || self.local_trim(offset, len, fua), &|| {
                    self.mirror_required()
                })
                .await
            }
        }
    }

    async fn zeroes_inner(
        &self,
        offset: u64,
        len: u64,
        may_trim: bool,
        fua: bool,
    ) -> Result<(), Errno> {
        match &self.replicator {
            None => self.local_zeroes(offset, len, may_trim, fua).await,
            Some(r) => {
                let op = MirrorOp::WriteZeroes {
                    offset,
                    len: len as u32,
                    fua,
                    may_trim,
                };
                r.replicate_with(
                    op,
                    || self.local_zeroes(offset, len, may_trim, fua),
                    &|| self.mirror_required(),
                )
                .await
            }
        }
    }

    fn mirror_required(&self) -> bool {
        self.disk_failed()
    }
}

/// Why a local read failed.
enum LocalReadError {
    Disk(StorageError),
    Errno(Errno),
}

impl Export for Volume {
    fn name(&self) -> &str {
        &self.name
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.primary_read_only || self.role.export_read_only()
    }

    fn fast_zeroes(&self) -> bool {
        self.backend.fast_zeroes()
    }

    fn tls(&self) -> blockmirror_nbd::TlsMode {
        self.tls
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, Errno> {
        let Some(router) = &self.reads else {
            return match self.local_read(offset, len).await {
                Ok(d) => Ok(d),
                Err(LocalReadError::Disk(e)) => Err(self.fail(e)),
                Err(LocalReadError::Errno(e)) => Err(e),
            };
        };
        let local_ok = !self.disk_failed();
        if !local_ok {
            self.ensure_failed_recorded().await?;
        }
        let e = match router
            .read(offset, len, local_ok, || self.local_read(offset, len))
            .await
        {
            Ok(d) => return Ok(d),
            Err(RoutedReadError::NoPath) => return Err(Errno::Io),
            Err(RoutedReadError::Local(LocalReadError::Errno(e))) => return Err(e),
            Err(RoutedReadError::Local(LocalReadError::Disk(e))) => e,
        };
        // The local disk failed this read: with serve_from_mirror it is
        // detached and the read served by a mirror.
        self.local_failed(e).await?;
        match router.read(offset, len, false, || async { Err(()) }).await {
            Ok(d) => Ok(d),
            Err(_) => Err(Errno::Io),
        }
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), Errno> {
        self.check_writable()?;
        if self.fence.is_some() {
            // Cluster mode, boxed: the static path's future stays the size
            // of the write alone.
            return Box::pin(self.fenced(self.write_inner(offset, data, fua))).await;
        }
        self.write_inner(offset, data, fua).await
    }

    async fn flush(&self) -> Result<(), Errno> {
        if self.fence.is_some() && self.role.accepts_host_writes() {
            return Box::pin(self.fenced(self.flush_inner())).await;
        }
        self.flush_inner().await
    }

    async fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), Errno> {
        self.check_writable()?;
        if self.fence.is_some() {
            return Box::pin(self.fenced(self.trim_inner(offset, len, fua))).await;
        }
        self.trim_inner(offset, len, fua).await
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_trim: bool,
        fua: bool,
    ) -> Result<(), Errno> {
        self.check_writable()?;
        if self.fence.is_some() {
            return Box::pin(self.fenced(self.zeroes_inner(offset, len, may_trim, fua))).await;
        }
        self.zeroes_inner(offset, len, may_trim, fua).await
    }

    async fn block_status(&self, offset: u64, len: u32) -> Result<Vec<StatusExtent>, Errno> {
        let extents = if self.fast() {
            self.backend
                .allocation(offset, u64::from(len))
                .map_err(|e| self.fail(e))?
        } else {
            self.blocking(move |b| b.allocation(offset, u64::from(len)))
                .await?
        };
        let mut out = Vec::with_capacity(extents.len());
        let mut left = u64::from(len);
        for x in extents {
            if left == 0 {
                break;
            }
            let n = x.len.min(left);
            if n == 0 {
                continue;
            }
            left -= n;
            let flags = if x.hole { STATE_HOLE | STATE_ZERO } else { 0 };
            match out.last_mut() {
                Some(StatusExtent { len, flags: f }) if *f == flags => *len += n as u32,
                _ => out.push(StatusExtent {
                    len: n as u32,
                    flags,
                }),
            }
        }
        Ok(out)
    }

    fn connection_opened(&self) {
        self.metrics.connection_opened();
    }

    fn connection_closed(&self) {
        self.metrics.connection_closed();
    }

    fn record(&self, cmd: CmdKind, bytes: u64, latency: Duration, ok: bool) {
        self.metrics.record(cmd, bytes, latency, ok);
    }
}
