//! Durable small-file writes, the one path every on-disk format of the node
//! takes (metadata record, out-of-sync bitmap, activity log), and a
//! recorder of what that path asks of the file system, for crash-point
//! tests.
//!
//! - [`replace_file`]: write a temporary file, fsync it, rename it over the
//!   target, fsync the directory (after a crash: the old file or the new).
//! - [`write_at_sync`]: pwrite, then fdatasync (a slot of a double buffer).
//!
//! [`record`] runs a closure and returns the [`Event`]s these functions
//! issued on that thread (creates, writes, syncs, renames, directory syncs)
//! and the [`mark`]s the closure set between them (what was acknowledged
//! when). [`crash::states`] turns a recording into every state a power cut
//! could leave on disk; the crash-point tests recover from each one.

use std::cell::RefCell;
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use thiserror::Error;

/// A durable write that failed, with the path it failed on.
#[derive(Debug, Error)]
#[error("{path}: {source}")]
pub struct DurableError {
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

/// One thing asked of the file system.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A file created, or an existing one truncated to nothing.
    Create {
        path: PathBuf,
    },
    Write {
        path: PathBuf,
        offset: u64,
        data: Vec<u8>,
    },
    /// fsync or fdatasync of a file: its data is durable from here.
    Sync {
        path: PathBuf,
    },
    Rename {
        from: PathBuf,
        to: PathBuf,
    },
    /// fsync of a directory: its entries (renames, creates) are durable.
    SyncDir {
        dir: PathBuf,
    },
    /// Set by the caller with [`mark`] (e.g. "the operation returned Ok").
    Mark(String),
}

thread_local! {
    static RECORDING: RefCell<Option<Vec<Event>>> = const { RefCell::new(None) };
}

fn note(e: impl FnOnce() -> Event) {
    RECORDING.with(|r| {
        if let Some(v) = r.borrow_mut().as_mut() {
            v.push(e());
        }
    });
}

/// Runs `f`, recording every durable write it issues on this thread.
pub fn record<T>(f: impl FnOnce() -> T) -> (T, Vec<Event>) {
    RECORDING.with(|r| *r.borrow_mut() = Some(Vec::new()));
    let out = f();
    let events = RECORDING
        .with(|r| r.borrow_mut().take())
        .unwrap_or_default();
    (out, events)
}

/// Adds a mark to the recording (nothing when not recording).
pub fn mark(label: impl Into<String>) {
    let label = label.into();
    note(|| Event::Mark(label));
}

/// Durably replaces `path` with `bytes`: writes `tmp`, fsyncs it, renames
/// it over `path`, fsyncs the directory.
pub fn replace_file(path: &Path, tmp: &Path, bytes: &[u8]) -> Result<(), DurableError> {
    let err = |p: &Path| {
        let p = p.to_owned();
        move |source| DurableError { path: p, source }
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut f = File::create(tmp).map_err(err(tmp))?;
    note(|| Event::Create {
        path: tmp.to_owned(),
    });
    f.write_all(bytes).map_err(err(tmp))?;
    note(|| Event::Write {
        path: tmp.to_owned(),
        offset: 0,
        data: bytes.to_vec(),
    });
    f.sync_all().map_err(err(tmp))?;
    note(|| Event::Sync {
        path: tmp.to_owned(),
    });
    drop(f);
    fs::rename(tmp, path).map_err(err(path))?;
    note(|| Event::Rename {
        from: tmp.to_owned(),
        to: path.to_owned(),
    });
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(err(dir))?;
    note(|| Event::SyncDir {
        dir: dir.to_owned(),
    });
    Ok(())
}

/// Writes `bytes` at `offset` of `file` (which is `path`), then fdatasync.
pub fn write_at_sync(file: &File, path: &Path, bytes: &[u8], offset: u64) -> io::Result<()> {
    file.write_all_at(bytes, offset)?;
    note(|| Event::Write {
        path: path.to_owned(),
        offset,
        data: bytes.to_vec(),
    });
    file.sync_data()?;
    note(|| Event::Sync {
        path: path.to_owned(),
    });
    Ok(())
}

/// The states a power cut can leave, from a recording.
pub mod crash {
    use std::collections::BTreeMap;
    use std::path::{Path, PathBuf};

    use super::Event;

    /// Sector size for torn writes.
    pub const SECTOR: usize = 512;

    /// Regular files (path -> content) of a directory tree.
    pub type Files = BTreeMap<PathBuf, Vec<u8>>;

    /// Reads every regular file under `dir`.
    pub fn snapshot(dir: &Path) -> std::io::Result<Files> {
        let mut out = Files::new();
        let mut todo = vec![dir.to_owned()];
        while let Some(d) = todo.pop() {
            for e in std::fs::read_dir(&d)? {
                let e = e?;
                let t = e.file_type()?;
                if t.is_dir() {
                    todo.push(e.path());
                } else if t.is_file() {
                    out.insert(e.path(), std::fs::read(e.path())?);
                }
            }
        }
        Ok(out)
    }

    /// Makes `dir` hold exactly `files` (every other regular file under it
    /// is removed).
    pub fn restore(dir: &Path, files: &Files) -> std::io::Result<()> {
        for p in snapshot(dir)?.keys() {
            if !files.contains_key(p) {
                std::fs::remove_file(p)?;
            }
        }
        for (p, data) in files {
            if let Some(parent) = p.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::write(p, data)?;
        }
        Ok(())
    }

    /// One state a power cut can leave.
    #[derive(Debug, Clone)]
    pub struct CrashState {
        pub files: Files,
        /// The marks set before the cut: operations known to have finished.
        pub marks: Vec<String>,
        /// Events issued before the cut (the last one maybe torn).
        pub events: usize,
        /// How the state was made, for failure messages.
        pub how: String,
    }

    #[derive(Debug, Clone)]
    struct Inode {
        data: Vec<u8>,
        /// Content as of the last sync (None: never synced since created).
        synced: Option<Vec<u8>>,
    }

    /// A file system model: names to inodes, and the names as of the last
    /// directory sync.
    #[derive(Debug, Clone)]
    struct Model {
        names: BTreeMap<PathBuf, usize>,
        durable_names: BTreeMap<PathBuf, usize>,
        inodes: Vec<Inode>,
    }

    impl Model {
        fn new(initial: &Files) -> Model {
            let mut m = Model {
                names: BTreeMap::new(),
                durable_names: BTreeMap::new(),
                inodes: Vec::new(),
            };
            for (p, d) in initial {
                m.inodes.push(Inode {
                    data: d.clone(),
                    synced: Some(d.clone()),
                });
                m.names.insert(p.clone(), m.inodes.len() - 1);
            }
            m.durable_names = m.names.clone();
            m
        }

        fn apply(&mut self, e: &Event) {
            match e {
                Event::Create { path } => match self.names.get(path) {
                    Some(&i) => self.inodes[i].data.clear(),
                    None => {
                        self.inodes.push(Inode {
                            data: Vec::new(),
                            synced: None,
                        });
                        self.names.insert(path.clone(), self.inodes.len() - 1);
                    }
                },
                Event::Write { path, offset, data } => {
                    if let Some(&i) = self.names.get(path) {
                        write_into(&mut self.inodes[i].data, *offset as usize, data);
                    }
                }
                Event::Sync { path } => {
                    if let Some(&i) = self.names.get(path) {
                        self.inodes[i].synced = Some(self.inodes[i].data.clone());
                    }
                }
                Event::Rename { from, to } => {
                    if let Some(i) = self.names.remove(from) {
                        self.names.insert(to.clone(), i);
                    }
                }
                Event::SyncDir { dir } => {
                    // Entries of `dir` become durable as they are now.
                    self.durable_names.retain(|p, _| p.parent() != Some(dir));
                    for (p, &i) in &self.names {
                        if p.parent() == Some(dir) {
                            self.durable_names.insert(p.clone(), i);
                        }
                    }
                }
                Event::Mark(_) => {}
            }
        }

        /// Everything issued reached the disk.
        fn all(&self) -> Files {
            self.names
                .iter()
                .map(|(p, &i)| (p.clone(), self.inodes[i].data.clone()))
                .collect()
        }

        /// Only what was synced survived: names as of the last directory
        /// sync, contents as of each file's last sync.
        fn synced_only(&self) -> Files {
            self.durable_names
                .iter()
                .map(|(p, &i)| (p.clone(), self.inodes[i].synced.clone().unwrap_or_default()))
                .collect()
        }
    }

    fn write_into(buf: &mut Vec<u8>, offset: usize, data: &[u8]) {
        if buf.len() < offset + data.len() {
            buf.resize(offset + data.len(), 0);
        }
        buf[offset..offset + data.len()].copy_from_slice(data);
    }

    /// Bytes of a write that reached the disk: (file offset, bytes).
    type Piece = (usize, Vec<u8>);

    /// The torn versions of a write of `data` at `offset`: which of its
    /// bytes reached the disk. Byte prefixes (1, half, all but one), and at
    /// sector granularity (sectors of the file, not of the write): every
    /// subset when there are at most 6 sectors, else each sector alone,
    /// each sector missing, the first half and the second half.
    fn torn(offset: usize, data: &[u8]) -> Vec<(String, Vec<Piece>)> {
        let n = data.len();
        let mut out = Vec::new();
        if n == 0 {
            return out;
        }
        for cut in [1, n / 2, n - 1] {
            if cut > 0 && cut < n {
                out.push((
                    format!("first {cut} of {n} bytes"),
                    vec![(offset, data[..cut].to_vec())],
                ));
            }
        }
        // The write's pieces by file sector.
        let mut pieces = Vec::new();
        let mut at = offset;
        while at < offset + n {
            let end = ((at / SECTOR + 1) * SECTOR).min(offset + n);
            pieces.push((at, data[at - offset..end - offset].to_vec()));
            at = end;
        }
        let k = pieces.len();
        if k < 2 {
            return out;
        }
        let mut subsets: Vec<Vec<bool>> = Vec::new();
        if k <= 6 {
            for bits in 1..(1u32 << k) - 1 {
                subsets.push((0..k).map(|i| bits & (1 << i) != 0).collect());
            }
        } else {
            for i in 0..k {
                subsets.push((0..k).map(|j| j == i).collect());
                subsets.push((0..k).map(|j| j != i).collect());
            }
            subsets.push((0..k).map(|j| j < k / 2).collect());
            subsets.push((0..k).map(|j| j >= k / 2).collect());
        }
        for s in subsets {
            let which: Vec<usize> = (0..k).filter(|&i| s[i]).collect();
            out.push((
                format!("sectors {which:?} of {k}"),
                which.iter().map(|&i| pieces[i].clone()).collect(),
            ));
        }
        out
    }

    /// Every state a power cut during `events` (starting from `initial`)
    /// can leave: after each prefix of events, (1) with everything issued
    /// on disk, (2) with only what was synced (unsynced data and
    /// unsynced directory entries lost), and (3) with the next write torn.
    pub fn states(initial: &Files, events: &[Event]) -> Vec<CrashState> {
        let mut out = Vec::new();
        let mut m = Model::new(initial);
        let mut marks = Vec::new();
        for k in 0..=events.len() {
            out.push(CrashState {
                files: m.all(),
                marks: marks.clone(),
                events: k,
                how: format!("after event {k}, all issued data on disk"),
            });
            out.push(CrashState {
                files: m.synced_only(),
                marks: marks.clone(),
                events: k,
                how: format!("after event {k}, only synced data and entries on disk"),
            });
            let Some(e) = events.get(k) else { break };
            if let Event::Write { path, offset, data } = e {
                if let Some(&i) = m.names.get(path) {
                    for (how, parts) in torn(*offset as usize, data) {
                        let mut files = m.all();
                        let mut content = m.inodes[i].data.clone();
                        for (at, bytes) in &parts {
                            write_into(&mut content, *at, bytes);
                        }
                        files.insert(path.clone(), content);
                        out.push(CrashState {
                            files,
                            marks: marks.clone(),
                            events: k + 1,
                            how: format!("event {k} (write of {}) torn: {how}", path.display()),
                        });
                    }
                }
            }
            if let Event::Mark(l) = e {
                marks.push(l.clone());
            }
            m.apply(e);
        }
        out
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        fn p(s: &str) -> PathBuf {
            PathBuf::from("/d").join(s)
        }

        #[test]
        fn a_replace_is_old_or_new_and_an_unsynced_write_may_vanish() {
            let initial: Files = [(p("f"), b"old".to_vec())].into();
            let events = vec![
                Event::Create { path: p("f.tmp") },
                Event::Write {
                    path: p("f.tmp"),
                    offset: 0,
                    data: vec![7; 1500],
                },
                Event::Sync { path: p("f.tmp") },
                Event::Rename {
                    from: p("f.tmp"),
                    to: p("f"),
                },
                Event::SyncDir {
                    dir: PathBuf::from("/d"),
                },
                Event::Mark("stored".into()),
                Event::Write {
                    path: p("f"),
                    offset: 1000,
                    data: vec![9; 100],
                },
            ];
            let st = states(&initial, &events);
            for s in &st {
                let f = s.files.get(&p("f")).expect("f always exists");
                if f == b"old" {
                    assert!(
                        !s.marks.iter().any(|m| m == "stored"),
                        "{}: a durable replace went back",
                        s.how
                    );
                    continue;
                }
                // The new file, with the last write all there, none or torn.
                assert_eq!(f.len(), 1500, "{}", s.how);
                assert!(
                    f[..1000].iter().chain(&f[1100..]).all(|&b| b == 7),
                    "{}",
                    s.how
                );
                assert!(f[1000..1100].iter().all(|&b| b == 7 || b == 9), "{}", s.how);
            }
            // The torn write of the temporary file: 3 byte prefixes and the
            // sector subsets of its 3 sectors.
            assert!(st.iter().any(|s| s.how.contains("sectors [0, 2] of 3")));
            // The last, unsynced write is lost in the synced-only state.
            let last = st
                .iter()
                .find(|s| s.events == events.len() && s.how.contains("only synced"))
                .unwrap();
            assert!(last.files[&p("f")].iter().all(|&b| b == 7));
        }

        #[test]
        fn a_rename_without_a_directory_sync_may_be_lost() {
            let events = vec![
                Event::Create { path: p("n.tmp") },
                Event::Write {
                    path: p("n.tmp"),
                    offset: 0,
                    data: b"x".to_vec(),
                },
                Event::Sync { path: p("n.tmp") },
                Event::Rename {
                    from: p("n.tmp"),
                    to: p("n"),
                },
            ];
            let st = states(&Files::new(), &events);
            let last: Vec<_> = st.iter().filter(|s| s.events == 4).collect();
            assert!(last
                .iter()
                .any(|s| s.files.get(&p("n")) == Some(&b"x".to_vec())));
            assert!(last.iter().any(|s| s.files.is_empty()));
        }
    }
}
