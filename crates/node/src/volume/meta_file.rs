//! Crash-safe storage of a volume's metadata record.
//!
//! A record is replaced by writing a temporary file, fsyncing it, renaming it
//! over the old one and fsyncing the directory: after a crash the file holds
//! either the old record or the new one, never a mix. The record holds the
//! volume's fixed fields and the last verify result of each mirror
//! ([`MetaRecord`]), stored together.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use blockmirror_core::{MetaError, MetaRecord, VerifyRecord, VolumeMeta};
use blockmirror_storage::durable;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum MetaFileError {
    #[error("metadata {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("metadata {path}: {source}")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: MetaError,
    },
    #[error(
        "metadata {path} is for a volume of {recorded} bytes, but the config says {configured}"
    )]
    SizeMismatch {
        path: PathBuf,
        recorded: u64,
        configured: u64,
    },
}

/// A random non-zero generation id.
pub fn new_generation_id() -> Result<u64, MetaFileError> {
    getrandom::u64()
        .map(|x| x.max(1))
        .map_err(|e| MetaFileError::Io {
            path: PathBuf::from("<random>"),
            source: io::Error::other(e.to_string()),
        })
}

/// Reads the record at `path`, or creates one for a new volume of `size`
/// bytes: a fresh generation for a primary, a blank one for a mirror (it
/// accepts a full copy). Returns the record and whether it was just created.
pub fn load_or_create(
    path: &Path,
    size: u64,
    mirror: bool,
) -> Result<(MetaRecord, bool), MetaFileError> {
    let io_err = |source| MetaFileError::Io {
        path: path.to_owned(),
        source,
    };
    match fs::read(path) {
        Ok(bytes) => {
            let meta = MetaRecord::decode(&bytes).map_err(|source| MetaFileError::Corrupt {
                path: path.to_owned(),
                source,
            })?;
            if meta.size != size {
                return Err(MetaFileError::SizeMismatch {
                    path: path.to_owned(),
                    recorded: meta.size,
                    configured: size,
                });
            }
            Ok((meta, false))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let mut id = [0u8; 16];
            getrandom::fill(&mut id).map_err(|e| io_err(io::Error::other(e.to_string())))?;
            let meta = MetaRecord::from(if mirror {
                VolumeMeta::new_mirror(id, size)
            } else {
                VolumeMeta::new(id, size, new_generation_id()?)
            });
            store(path, &meta)?;
            Ok((meta, true))
        }
        Err(e) => Err(io_err(e)),
    }
}

/// Durably replaces the record at `path` (temporary file, fsync, rename,
/// directory fsync: `blockmirror_storage::durable::replace_file`).
pub fn store(path: &Path, meta: &MetaRecord) -> Result<(), MetaFileError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(|source| MetaFileError::Io {
        path: path.to_owned(),
        source,
    })?;
    let tmp = path.with_extension("meta.tmp");
    durable::replace_file(path, &tmp, &meta.encode()).map_err(|e| MetaFileError::Io {
        path: e.path,
        source: e.source,
    })
}

/// A volume's record in memory and on disk: every change is stored durably
/// (under the lock, so stores happen in the order of the changes) before it
/// is visible to [`MetaCell::get`].
pub struct MetaCell {
    path: PathBuf,
    meta: Mutex<MetaRecord>,
}

impl MetaCell {
    pub fn new(path: PathBuf, meta: MetaRecord) -> Self {
        Self {
            path,
            meta: Mutex::new(meta),
        }
    }

    pub fn get(&self) -> VolumeMeta {
        self.meta.lock().expect("metadata lock poisoned").meta
    }

    /// The stored verify results, one per mirror.
    pub fn verify(&self) -> Vec<VerifyRecord> {
        self.meta
            .lock()
            .expect("metadata lock poisoned")
            .verify
            .clone()
    }

    /// Stores `record` as its peer's last verify (blocking, like
    /// [`MetaCell::update`]).
    pub fn set_verify(&self, record: VerifyRecord) -> Result<(), MetaFileError> {
        let mut g = self.meta.lock().expect("metadata lock poisoned");
        let mut next = g.clone();
        next.set_verify(record);
        if next != *g {
            store(&self.path, &next)?;
            *g = next;
        }
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Applies `f` and stores the result (blocking: call it on the blocking
    /// pool from async code). On a store error nothing changes in memory.
    pub fn update(&self, f: impl FnOnce(&mut VolumeMeta)) -> Result<VolumeMeta, MetaFileError> {
        let mut g = self.meta.lock().expect("metadata lock poisoned");
        let mut next = g.meta;
        f(&mut next);
        if next != g.meta {
            let record = MetaRecord {
                meta: next,
                verify: g.verify.clone(),
            };
            store(&self.path, &record)?;
            *g = record;
        }
        Ok(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_reload_and_refuse_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state/v.meta");
        let (m, created) = load_or_create(&p, 1 << 20, false).unwrap();
        assert!(created && !m.clean && !m.generations.is_blank());
        let (again, created) = load_or_create(&p, 1 << 20, false).unwrap();
        assert!(!created);
        assert_eq!(again, m);
        store(
            &p,
            &VolumeMeta {
                clean: true,
                ..m.meta
            }
            .into(),
        )
        .unwrap();
        assert!(load_or_create(&p, 1 << 20, false).unwrap().0.clean);
        assert!(matches!(
            load_or_create(&p, 2 << 20, false),
            Err(MetaFileError::SizeMismatch { .. })
        ));
        let mut bytes = fs::read(&p).unwrap();
        bytes[20] ^= 0xff;
        fs::write(&p, bytes).unwrap();
        let err = load_or_create(&p, 1 << 20, false).unwrap_err();
        assert!(matches!(err, MetaFileError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("v.meta"));
    }

    #[test]
    fn new_mirror_is_blank_and_cell_stores_every_change() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.meta");
        let (m, created) = load_or_create(&p, 1 << 20, true).unwrap();
        assert!(created && m.generations.is_blank());
        assert_eq!(m.label, blockmirror_core::MirrorLabel::Inconsistent);
        let cell = MetaCell::new(p.clone(), m);
        // A verify result is stored with the record and survives a reload,
        // and later updates of the fixed fields keep it.
        let result = blockmirror_core::VerifyRecord {
            peer: "127.0.0.1:7701".into(),
            id: 2,
            outcome: blockmirror_core::VerifyOutcome::Identical,
            full: true,
            mark: false,
            started_unix: 1,
            finished_unix: 2,
            total_bytes: 1 << 20,
            done_bytes: 1 << 20,
            skipped_bytes: 0,
            regions_waited: 0,
            not_ready: 0,
            differing_bytes: 0,
            marked_bytes: 0,
            differing: Vec::new(),
            differing_truncated: false,
            error: String::new(),
        };
        cell.set_verify(result.clone()).unwrap();
        assert_eq!(cell.verify(), vec![result.clone()]);
        let after = cell
            .update(|m| {
                m.generations.rotate(42);
                m.label = blockmirror_core::MirrorLabel::None;
            })
            .unwrap();
        assert_eq!(after.generations.current, 42);
        assert_eq!(cell.get(), after);
        let reloaded = load_or_create(&p, 1 << 20, true).unwrap().0;
        assert_eq!(reloaded.meta, after);
        assert_eq!(reloaded.verify, vec![result]);
        // A version 1 record of the previous build still loads.
        let mut v1 = [0u8; 64];
        v1[0..8].copy_from_slice(b"BMVOLMD1");
        v1[8..12].copy_from_slice(&1u32.to_le_bytes());
        v1[32..40].copy_from_slice(&1u64.to_le_bytes());
        v1[40..48].copy_from_slice(&(1u64 << 20).to_le_bytes());
        let crc = crc32c::crc32c(&v1[..60]);
        v1[60..].copy_from_slice(&crc.to_le_bytes());
        fs::write(&p, v1).unwrap();
        let (old, created) = load_or_create(&p, 1 << 20, true).unwrap();
        assert!(!created);
        assert_eq!(old.generations.current, 1);
        assert!(old.verify.is_empty());
    }

    /// Crash points of the metadata record: a record created, then its
    /// generation rotated four times (each store a temporary file, fsync,
    /// rename, directory fsync), recorded; every state a power cut could
    /// leave (each prefix, everything issued or only what was synced, the
    /// last write torn by bytes and by sectors) must load as the record of
    /// the last acknowledged store or of the one in flight: the generation
    /// never goes back past a durable update, and the record is never lost.
    #[test]
    fn every_power_cut_of_a_store_loads_the_old_or_the_new_record() {
        use blockmirror_storage::durable::{self, crash};
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state/v.meta");
        let mut gens = Vec::new();
        let ((), events) = durable::record(|| {
            let (mut m, created) = load_or_create(&p, 1 << 20, false).unwrap();
            assert!(created);
            gens.push(m.meta.generations.current);
            durable::mark("m0");
            for i in 1..=4u64 {
                m.meta.generations.rotate(1000 + i);
                // A record that spans several sectors.
                m.set_verify(VerifyRecord {
                    peer: format!("peer-{i}"),
                    id: i,
                    outcome: blockmirror_core::VerifyOutcome::Differ,
                    full: false,
                    mark: false,
                    started_unix: 1,
                    finished_unix: 2,
                    total_bytes: 1 << 20,
                    done_bytes: 1 << 20,
                    skipped_bytes: 0,
                    regions_waited: 0,
                    not_ready: 0,
                    differing_bytes: 40 * 4096,
                    marked_bytes: 0,
                    differing: (0..40).map(|k| (k * 4096, 4096)).collect(),
                    differing_truncated: false,
                    error: String::new(),
                });
                store(&p, &m).unwrap();
                gens.push(m.meta.generations.current);
                durable::mark(format!("m{i}"));
            }
        });
        let states = crash::states(&crash::Files::new(), &events);
        let mut torn = 0;
        for st in &states {
            torn += usize::from(st.how.contains("torn"));
            crash::restore(dir.path(), &st.files).unwrap();
            let acked = st
                .marks
                .iter()
                .filter_map(|m| m.strip_prefix('m')?.parse::<usize>().ok())
                .max();
            let r = load_or_create(&p, 1 << 20, false);
            let (m, created) = r.unwrap_or_else(|e| panic!("{}: {e}", st.how));
            match acked {
                None => {} // the first creation was cut: a new record is right
                Some(n) => {
                    assert!(!created, "{}: a stored record was lost", st.how);
                    let g = m.meta.generations.current;
                    let allowed = &gens[n..(n + 2).min(gens.len())];
                    assert!(
                        allowed.contains(&g),
                        "{}: generation {g:x} is neither the acknowledged {:x} nor the next",
                        st.how,
                        gens[n]
                    );
                }
            }
        }
        assert!(torn >= 4 * 3, "{torn} torn states");
    }

    /// Garbage in the record itself (it is never written in place, so this
    /// is media damage or an operator's mistake): refused with a typed
    /// error, never read as some other record.
    #[test]
    fn a_damaged_record_is_refused_with_a_typed_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("v.meta");
        load_or_create(&p, 1 << 20, false).unwrap();
        let good = fs::read(&p).unwrap();
        let mut cases: Vec<Vec<u8>> = (0..good.len()).map(|n| good[..n].to_vec()).collect();
        for i in 0..good.len() {
            let mut b = good.clone();
            b[i] ^= 0x10;
            cases.push(b);
        }
        for s in (0..good.len()).step_by(512) {
            let mut b = good.clone();
            let end = (s + 512).min(b.len());
            b[s..end].fill(0);
            cases.push(b);
        }
        for bad in cases {
            fs::write(&p, &bad).unwrap();
            assert!(
                matches!(
                    load_or_create(&p, 1 << 20, false),
                    Err(MetaFileError::Corrupt { .. })
                ),
                "{} bytes accepted",
                bad.len()
            );
        }
    }
}
