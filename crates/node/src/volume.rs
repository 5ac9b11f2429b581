//! A volume: a storage backend exported over NBD, with its metrics.
//!
//! Where each request runs is decided here. Buffered I/O on a regular file
//! completes in microseconds against the page cache, so writes run inline on
//! the connection's task and reads try `preadv2(RWF_NOWAIT)` inline first;
//! everything that can wait on a disk (uncached reads, FUA, flush, trim,
//! O_DIRECT, block devices) goes to tokio's blocking pool, so one slow request
//! never holds up the others on its connection.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use blockmirror_nbd::proto::{STATE_HOLE, STATE_ZERO};
use blockmirror_nbd::{CmdKind, Errno, Export, StatusExtent};
use blockmirror_storage::{Backend, StorageError};
use bytes::{Bytes, BytesMut};
use tracing::warn;

use crate::config::Role;
use crate::meta_file::MetaCell;
use crate::metrics::VolumeMetrics;
use crate::replication::{MirrorOp, Replicator};
use blockmirror_core::VolumeMeta;

/// A served volume.
///
/// Its role can change at run time (`promote`, `resync --discard-local`):
/// the role and the export's read-only flag are atomics. A connection
/// negotiated before a switch keeps the flags it was told, but every host
/// write checks the role now, so a demoted volume refuses writes with EPERM
/// on old connections too.
pub struct Volume {
    name: String,
    /// True while the volume is a mirror.
    mirror: AtomicBool,
    backend: Arc<dyn Backend>,
    size: u64,
    read_only: AtomicBool,
    /// The `read_only` config key as a primary would have it.
    primary_read_only: bool,
    fast: bool,
    metrics: VolumeMetrics,
    meta: Arc<MetaCell>,
    replicator: Option<Arc<Replicator>>,
}

impl Volume {
    /// A volume in `role`; `primary_read_only` is the `read_only` key as it
    /// applies while the volume is a primary (a mirror is always read-only).
    pub fn new(
        name: &str,
        role: Role,
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
            mirror: AtomicBool::new(role == Role::Mirror),
            fast: backend.is_fast(),
            backend,
            size,
            read_only: AtomicBool::new(primary_read_only || role == Role::Mirror),
            primary_read_only,
            metrics,
            meta,
            replicator,
        }
    }

    pub fn meta(&self) -> VolumeMeta {
        self.meta.get()
    }

    pub fn meta_cell(&self) -> &Arc<MetaCell> {
        &self.meta
    }

    /// Switches the role: a mirror's export is read-only and refuses every
    /// host write; a primary's is read-write (unless configured read-only).
    pub fn set_role(&self, role: Role) {
        let mirror = role == Role::Mirror;
        self.read_only
            .store(mirror || self.primary_read_only, Ordering::SeqCst);
        self.mirror.store(mirror, Ordering::SeqCst);
    }

    /// Makes a primary a mirror now (read-only, host writes refused); false
    /// if it already was one. The first half of a demote: atomic, so two
    /// callers never both go on to demote it.
    pub fn demote_now(&self) -> bool {
        let was_mirror = self.mirror.swap(true, Ordering::SeqCst);
        self.read_only.store(true, Ordering::SeqCst);
        if let Some(r) = &self.replicator {
            r.refuse_writes();
        }
        !was_mirror
    }

    /// EPERM while the volume is a mirror (only its primary writes it).
    fn check_writable(&self) -> Result<(), Errno> {
        if self.mirror.load(Ordering::SeqCst) {
            Err(Errno::Perm)
        } else {
            Ok(())
        }
    }

    pub fn replicator(&self) -> Option<&Arc<Replicator>> {
        self.replicator.as_ref()
    }

    pub fn role(&self) -> Role {
        if self.mirror.load(Ordering::SeqCst) {
            Role::Mirror
        } else {
            Role::Primary
        }
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
        let b = self.backend.clone();
        match tokio::task::spawn_blocking(move || f(b.as_ref())).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(self.fail(e)),
            Err(join) => {
                warn!(volume = %self.name, error = %join, "backend task panicked");
                Err(Errno::Io)
            }
        }
    }
}

impl Volume {
    async fn local_write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), Errno> {
        if self.fast && !fua {
            return self
                .backend
                .write_at(&data, offset, false)
                .map_err(|e| self.fail(e));
        }
        self.blocking(move |b| b.write_at(&data, offset, fua)).await
    }

    async fn local_trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), Errno> {
        self.blocking(move |b| {
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
        self.blocking(move |b| b.write_zeroes(offset, len, may_trim, fua))
            .await
    }

    async fn local_flush(&self) -> Result<(), Errno> {
        self.blocking(|b| b.flush()).await
    }
}

impl Export for Volume {
    fn name(&self) -> &str {
        &self.name
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only.load(Ordering::SeqCst)
    }

    fn fast_zeroes(&self) -> bool {
        self.backend.fast_zeroes()
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, Errno> {
        let mut buf = BytesMut::zeroed(len as usize);
        if self.fast {
            match self.backend.try_read_at_nowait(&mut buf, offset) {
                Ok(true) => return Ok(buf.freeze()),
                Ok(false) => {}
                Err(e) => return Err(self.fail(e)),
            }
        }
        self.blocking(move |b| b.read_at(&mut buf, offset).map(|()| buf.freeze()))
            .await
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), Errno> {
        self.check_writable()?;
        match &self.replicator {
            None => self.local_write(offset, data, fua).await,
            Some(r) => {
                let op = MirrorOp::Write {
                    offset,
                    data: data.clone(),
                    fua,
                };
                r.replicate(op, || self.local_write(offset, data, fua))
                    .await
            }
        }
    }

    async fn flush(&self) -> Result<(), Errno> {
        match &self.replicator {
            None => self.local_flush().await,
            Some(r) => r.flush(|| self.local_flush()).await,
        }
    }

    async fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), Errno> {
        self.check_writable()?;
        match &self.replicator {
            None => self.local_trim(offset, len, fua).await,
            Some(r) => {
                let op = MirrorOp::Trim {
                    offset,
                    len: len as u32,
                    fua,
                };
                r.replicate(op, || self.local_trim(offset, len, fua)).await
            }
        }
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_trim: bool,
        fua: bool,
    ) -> Result<(), Errno> {
        self.check_writable()?;
        match &self.replicator {
            None => self.local_zeroes(offset, len, may_trim, fua).await,
            Some(r) => {
                let op = MirrorOp::WriteZeroes {
                    offset,
                    len: len as u32,
                    fua,
                    may_trim,
                };
                r.replicate(op, || self.local_zeroes(offset, len, may_trim, fua))
                    .await
            }
        }
    }

    async fn block_status(&self, offset: u64, len: u32) -> Result<Vec<StatusExtent>, Errno> {
        let extents = if self.fast {
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
