//! Crash-safe storage of a volume's metadata record.
//!
//! A record is replaced by writing a temporary file, fsyncing it, renaming it
//! over the old one and fsyncing the directory: after a crash the file holds
//! either the old record or the new one, never a mix.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use blockmirror_core::{MetaError, VolumeMeta};
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

/// Reads the record at `path`, or creates one for a new volume of `size` bytes.
/// Returns the record and whether it was just created.
pub fn load_or_create(path: &Path, size: u64) -> Result<(VolumeMeta, bool), MetaFileError> {
    let io_err = |source| MetaFileError::Io {
        path: path.to_owned(),
        source,
    };
    match fs::read(path) {
        Ok(bytes) => {
            let meta = VolumeMeta::decode(&bytes).map_err(|source| MetaFileError::Corrupt {
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
            let meta = VolumeMeta::new(id, size);
            store(path, &meta)?;
            Ok((meta, true))
        }
        Err(e) => Err(io_err(e)),
    }
}

/// Durably replaces the record at `path`.
pub fn store(path: &Path, meta: &VolumeMeta) -> Result<(), MetaFileError> {
    let io_err = |source| MetaFileError::Io {
        path: path.to_owned(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(io_err)?;
    let tmp = path.with_extension("meta.tmp");
    let mut f = fs::File::create(&tmp).map_err(io_err)?;
    f.write_all(&meta.encode()).map_err(io_err)?;
    f.sync_all().map_err(io_err)?;
    drop(f);
    fs::rename(&tmp, path).map_err(io_err)?;
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_reload_and_refuse_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state/v.meta");
        let (m, created) = load_or_create(&p, 1 << 20).unwrap();
        assert!(created && !m.clean && m.generation == 1);
        let (again, created) = load_or_create(&p, 1 << 20).unwrap();
        assert!(!created);
        assert_eq!(again, m);
        store(&p, &VolumeMeta { clean: true, ..m }).unwrap();
        assert!(load_or_create(&p, 1 << 20).unwrap().0.clean);
        assert!(matches!(
            load_or_create(&p, 2 << 20),
            Err(MetaFileError::SizeMismatch { .. })
        ));
        let mut bytes = fs::read(&p).unwrap();
        bytes[20] ^= 0xff;
        fs::write(&p, bytes).unwrap();
        let err = load_or_create(&p, 1 << 20).unwrap_err();
        assert!(matches!(err, MetaFileError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("v.meta"));
    }
}
