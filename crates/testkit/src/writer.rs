//! The history writer: self-describing block writes, pipelined, with a FLUSH
//! every few writes, each issue and reply recorded in a history log.
//!
//! One thread sends, another reads replies. Two writes to one block are
//! never in flight together (a block is picked among those with nothing in
//! flight), so the last acknowledged write of a block is the one that must
//! be visible. A FLUSH is issued after every `flush_every` writes, pipelined
//! with them.
//!
//! The writer stops when its time is up (it then waits for every reply and
//! disconnects), when [`Progress::stop`] is set, or when the connection is
//! lost (the server died: requests in flight stay unanswered in the log,
//! which is what a crash looks like to a host).

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use blockmirror_nbd::proto;
use bytes::BytesMut;

use crate::history::{encode_block, Geometry, Outcome, Recorder};
use crate::nbd::{self, Stream, Uri};

/// What to write, where, for how long.
#[derive(Debug, Clone)]
pub struct WriterConfig {
    pub uri: String,
    pub log: PathBuf,
    pub blocks: u64,
    pub block_size: u32,
    /// Byte offset of block 0 on the export.
    pub offset: u64,
    /// Requests in flight at once (writes and flushes).
    pub queue_depth: usize,
    /// A FLUSH after this many writes (0: never).
    pub flush_every: u64,
    pub duration: Duration,
    pub seed: u64,
    /// The first write's sequence number (default 1). A run over blocks an
    /// earlier run wrote starts above that run's numbers, so the checker
    /// can tell the earlier content (see [`crate::history::check`]).
    pub first_seq: u64,
}

impl WriterConfig {
    /// 4 KiB blocks from offset 0, QD 8, a flush every 32 writes.
    pub fn new(uri: &str, log: impl Into<PathBuf>, blocks: u64, duration: Duration) -> Self {
        Self {
            uri: uri.to_owned(),
            log: log.into(),
            blocks,
            block_size: 4096,
            offset: 0,
            queue_depth: 8,
            flush_every: 32,
            duration,
            seed: 0x1234_5678,
            first_seq: 1,
        }
    }
}

/// Live counters, readable while the writer runs; `stop` ends it early.
#[derive(Debug, Default)]
pub struct Progress {
    pub writes_issued: AtomicU64,
    pub writes_acked: AtomicU64,
    pub writes_failed: AtomicU64,
    pub flushes_acked: AtomicU64,
    pub stop: AtomicBool,
}

/// Why the writer stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// Its time was up (or it was told to stop); every request was answered.
    Finished,
    /// The connection broke; requests in flight were left unanswered.
    ConnectionLost(String),
}

/// What the writer did.
#[derive(Debug, Clone)]
pub struct Summary {
    pub writes_issued: u64,
    pub writes_acked: u64,
    pub writes_failed: u64,
    pub flushes_issued: u64,
    pub flushes_acked: u64,
    /// Requests without a reply at the end.
    pub unanswered: usize,
    pub end: End,
}

#[derive(Clone, Copy)]
enum Op {
    Write { seq: u64, block: u64 },
    Flush { id: u64 },
}

struct State {
    rec: Recorder<File>,
    inflight: HashMap<u64, Op>,
    busy: HashSet<u64>,
    dead: Option<String>,
    /// The sender is disconnecting on purpose: a closed socket is expected.
    finishing: bool,
    flushes_issued: u64,
}

struct Shared {
    st: Mutex<State>,
    cv: Condvar,
}

/// xorshift64*, deterministic for a seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// Runs the writer until its time is up, it is stopped, or the connection
/// breaks. Errors are setup failures (cannot connect, log not writable).
pub fn run(cfg: &WriterConfig, progress: &Progress) -> Result<Summary> {
    if cfg.queue_depth == 0 {
        bail!("queue depth must be at least 1");
    }
    if cfg.blocks <= 2 * cfg.queue_depth as u64 {
        bail!(
            "{} blocks are too few for queue depth {} (need more than twice as many)",
            cfg.blocks,
            cfg.queue_depth
        );
    }
    let uri = Uri::parse(&cfg.uri)?;
    let conn = nbd::connect(&uri)?;
    let g = Geometry {
        block_size: cfg.block_size,
        blocks: cfg.blocks,
        offset: cfg.offset,
    };
    if g.end() > conn.size {
        bail!(
            "{} blocks of {} bytes from offset {} do not fit the export ({} bytes)",
            g.blocks,
            g.block_size,
            g.offset,
            conn.size
        );
    }
    if conn.read_only() {
        bail!("export {:?} is read-only", uri.export);
    }
    let flush = cfg.flush_every > 0 && conn.can_flush();
    let log = File::create(&cfg.log).with_context(|| format!("creating {}", cfg.log.display()))?;
    let shared = Shared {
        st: Mutex::new(State {
            rec: Recorder::new(log, g)?,
            inflight: HashMap::new(),
            busy: HashSet::new(),
            dead: None,
            finishing: false,
            flushes_issued: 0,
        }),
        cv: Condvar::new(),
    };
    let out = conn.stream;
    let reader_stream = out.try_clone()?;
    let closer = out.try_clone()?;
    std::thread::scope(|scope| {
        let reader = std::thread::Builder::new()
            .name("history-replies".into())
            .spawn_scoped(scope, || read_replies(reader_stream, &shared, progress))?;
        let r = send_requests(cfg, g, flush, out, &shared, progress);
        // Whatever happened, the reader must see the end of the stream.
        let _ = closer.shutdown();
        let _ = reader.join();
        r
    })
}

fn send_requests(
    cfg: &WriterConfig,
    g: Geometry,
    flush: bool,
    mut out: Stream,
    shared: &Shared,
    progress: &Progress,
) -> Result<Summary> {
    let deadline = Instant::now() + cfg.duration;
    let mut rng = Rng(cfg.seed | 1);
    let mut next_seq = cfg.first_seq.max(1);
    let mut next_cookie = 1u64;
    let mut since_flush = 0u64;
    let mut buf = BytesMut::with_capacity(cfg.block_size as usize + 64);
    let mut block_data = vec![0u8; cfg.block_size as usize];
    loop {
        let mut st = shared.st.lock().expect("poisoned");
        // Wait for a free slot.
        while st.inflight.len() >= cfg.queue_depth && st.dead.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || progress.stop.load(Relaxed) {
                break;
            }
            st = shared
                .cv
                .wait_timeout(st, left.min(Duration::from_millis(100)))
                .expect("poisoned")
                .0;
        }
        if st.dead.is_some() || Instant::now() >= deadline || progress.stop.load(Relaxed) {
            break;
        }
        if st.inflight.len() >= cfg.queue_depth {
            continue;
        }
        let cookie = next_cookie;
        next_cookie += 1;
        buf.clear();
        if flush && since_flush >= cfg.flush_every {
            since_flush = 0;
            st.flushes_issued += 1;
            let id = st.flushes_issued;
            st.rec.flush_issued(id)?;
            st.inflight.insert(cookie, Op::Flush { id });
            nbd::request(proto::CMD_FLUSH, 0, cookie, 0, 0, &mut buf);
        } else {
            let block = loop {
                let b = rng.next() % cfg.blocks;
                if !st.busy.contains(&b) {
                    break b;
                }
            };
            let seq = next_seq;
            next_seq += 1;
            since_flush += 1;
            st.busy.insert(block);
            st.rec.write_issued(seq, block)?;
            st.inflight.insert(cookie, Op::Write { seq, block });
            progress.writes_issued.fetch_add(1, Relaxed);
            encode_block(&mut block_data, block, seq);
            nbd::request(
                proto::CMD_WRITE,
                0,
                cookie,
                g.block_offset(block),
                cfg.block_size,
                &mut buf,
            );
            buf.extend_from_slice(&block_data);
        }
        drop(st);
        if let Err(e) = std::io::Write::write_all(&mut out, &buf) {
            let mut st = shared.st.lock().expect("poisoned");
            st.dead.get_or_insert(format!("sending a request: {e}"));
            break;
        }
    }

    // Finished: wait for the replies still due, then disconnect.
    let mut st = shared.st.lock().expect("poisoned");
    let drain_deadline = Instant::now() + Duration::from_secs(60);
    while st.dead.is_none() && !st.inflight.is_empty() && Instant::now() < drain_deadline {
        st = shared
            .cv
            .wait_timeout(st, Duration::from_millis(100))
            .expect("poisoned")
            .0;
    }
    let end = match st.dead.clone() {
        Some(reason) => End::ConnectionLost(reason),
        None => End::Finished,
    };
    let unanswered = st.inflight.len();
    let reason = match &end {
        End::Finished if unanswered == 0 => "finished".to_string(),
        End::Finished => format!("finished with {unanswered} requests unanswered"),
        End::ConnectionLost(r) => format!("connection lost: {r}"),
    };
    st.rec.end(&reason)?;
    let flushes_issued = st.flushes_issued;
    let clean = end == End::Finished;
    st.finishing = true;
    drop(st);
    if clean {
        buf.clear();
        nbd::request(proto::CMD_DISC, 0, next_cookie, 0, 0, &mut buf);
        let _ = std::io::Write::write_all(&mut out, &buf);
    }
    let _ = out.shutdown();
    Ok(Summary {
        writes_issued: next_seq - cfg.first_seq.max(1),
        writes_acked: progress.writes_acked.load(Relaxed),
        writes_failed: progress.writes_failed.load(Relaxed),
        flushes_issued,
        flushes_acked: progress.flushes_acked.load(Relaxed),
        unanswered,
        end,
    })
}

fn read_replies(mut s: Stream, shared: &Shared, progress: &Progress) {
    loop {
        let r = nbd::read_simple_reply(&mut s);
        let mut st = shared.st.lock().expect("poisoned");
        let (error, cookie) = match r {
            Ok(x) => x,
            Err(e) => {
                let reason = if e.kind() == std::io::ErrorKind::UnexpectedEof {
                    "server closed the connection".to_string()
                } else {
                    e.to_string()
                };
                // After a clean finish the sender shut the socket: not a loss.
                if !st.finishing {
                    st.dead.get_or_insert(reason);
                }
                shared.cv.notify_all();
                return;
            }
        };
        let Some(op) = st.inflight.remove(&cookie) else {
            st.dead
                .get_or_insert(format!("reply for unknown cookie {cookie}"));
            shared.cv.notify_all();
            return;
        };
        let outcome = if error == 0 {
            Outcome::Ok
        } else {
            Outcome::Err(error)
        };
        let logged = match op {
            Op::Write { seq, block } => {
                st.busy.remove(&block);
                if error == 0 {
                    progress.writes_acked.fetch_add(1, Relaxed);
                } else {
                    progress.writes_failed.fetch_add(1, Relaxed);
                }
                st.rec.write_replied(seq, outcome)
            }
            Op::Flush { id } => {
                if error == 0 {
                    progress.flushes_acked.fetch_add(1, Relaxed);
                }
                st.rec.flush_replied(id, outcome)
            }
        };
        if let Err(e) = logged {
            st.dead.get_or_insert(format!("writing the log: {e}"));
            shared.cv.notify_all();
            return;
        }
        shared.cv.notify_all();
    }
}
