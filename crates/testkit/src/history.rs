//! Write histories and the checker.
//!
//! # Blocks
//!
//! Every block the writer writes describes itself: a header (magic, block
//! index, sequence number, crc32c) followed by a filler derived from the
//! sequence number. Reading a block back tells which write put it there, or
//! that it was never written (all zero), or that it is damaged.
//!
//! # The log
//!
//! One line per event, in the order the events happened in the writer,
//! numbered by one logical clock (`event`), with the microseconds since the
//! writer started beside it (for people):
//!
//! ```text
//! blockmirror-testkit history v1
//! geometry block_size=4096 blocks=4096 offset=0
//! W  <event> <us> <seq> <block>        a write was issued (logged before it is sent)
//! WR <event> <us> <seq> ok             its reply arrived (logged after it arrived)
//! WR <event> <us> <seq> err <errno>
//! F  <event> <us> <id>                 a FLUSH was issued
//! FR <event> <us> <id> ok|err <errno>  its reply
//! end <event> <us> <reason>            the writer stopped (optional)
//! ```
//!
//! Because an issue is logged before the request is sent and a reply after
//! it arrived, "the reply of A has a smaller event than the issue of B"
//! proves that A completed before B was issued: A happened before B. The
//! converse is not claimed (the checker is never stricter than the truth).
//!
//! # What the checker verifies
//!
//! For a block whose content is write C and a write W to the same block that
//! must be present, the block is right when C is W, or when C did not
//! happen before W (C was issued after W completed, or the two were in
//! flight together, so either order was allowed).
//!
//! - **flushed**: every write answered OK before the last successful FLUSH
//!   was issued (NBD: a FLUSH covers the writes completed before it) must be
//!   present. This is what survives a crash of the primary.
//! - **acked**: every write answered OK must be present (a synchronous
//!   mirror that stayed up holds every acknowledged write).
//! - **prefix** (for asynchronous mirrors): the image is dependency closed:
//!   if it holds write C, it holds every write that completed before C was
//!   issued.
//! - always: no block is damaged, and every block holds a write that was
//!   issued to that block (or zeros, or a write numbered below the log's
//!   first write: content from an earlier run over the same blocks, which
//!   counts as "not written by this history").
//!
//! A write that was issued and never answered (in flight at the crash) may
//! or may not be present; both are fine.

use std::collections::HashMap;
use std::fmt;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::time::Instant;

/// The first bytes of every block the writer writes.
pub const BLOCK_MAGIC: [u8; 8] = *b"BMHIST01";
/// magic (8) + block (8) + seq (8) + crc32c (4).
pub const BLOCK_HEADER_LEN: usize = 28;
/// The first line of a log.
pub const LOG_HEADER: &str = "blockmirror-testkit history v1";

/// Fills `buf` (one block) with the self-describing content of write `seq`
/// to block `block`.
pub fn encode_block(buf: &mut [u8], block: u64, seq: u64) {
    assert!(buf.len() >= BLOCK_HEADER_LEN + 4, "block too small");
    buf[0..8].copy_from_slice(&BLOCK_MAGIC);
    buf[8..16].copy_from_slice(&block.to_le_bytes());
    buf[16..24].copy_from_slice(&seq.to_le_bytes());
    let mut x = seq.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ block ^ 0x5555;
    for chunk in buf[BLOCK_HEADER_LEN..].chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    let crc = block_crc(buf);
    buf[24..28].copy_from_slice(&crc.to_le_bytes());
}

fn block_crc(buf: &[u8]) -> u32 {
    let c = crc32c::crc32c(&buf[..24]);
    crc32c::crc32c_append(c, &buf[BLOCK_HEADER_LEN..])
}

/// What a block of an image holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    /// All zero: never written (or trimmed).
    Zero,
    /// The content of write `seq`, which claims to belong to `block`.
    Record { block: u64, seq: u64 },
    /// Neither: a torn, misdirected or foreign block.
    Corrupt(String),
}

/// Decodes one block read from an image.
pub fn decode_block(buf: &[u8]) -> Content {
    if buf.iter().all(|&b| b == 0) {
        return Content::Zero;
    }
    if buf.len() < BLOCK_HEADER_LEN + 4 || buf[0..8] != BLOCK_MAGIC {
        return Content::Corrupt("no block magic".into());
    }
    let block = u64::from_le_bytes(buf[8..16].try_into().expect("8 bytes"));
    let seq = u64::from_le_bytes(buf[16..24].try_into().expect("8 bytes"));
    let stored = u32::from_le_bytes(buf[24..28].try_into().expect("4 bytes"));
    let computed = block_crc(buf);
    if stored != computed {
        return Content::Corrupt(format!(
            "crc mismatch (block {block} seq {seq}: stored {stored:#010x}, computed {computed:#010x})"
        ));
    }
    Content::Record { block, seq }
}

/// Where the history's blocks live on the volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub block_size: u32,
    pub blocks: u64,
    /// Byte offset of block 0.
    pub offset: u64,
}

impl Geometry {
    pub fn block_offset(&self, block: u64) -> u64 {
        self.offset + block * u64::from(self.block_size)
    }

    pub fn end(&self) -> u64 {
        self.block_offset(self.blocks)
    }
}

/// How a request was answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// The NBD error number.
    Err(u32),
}

/// A reply: its event, its time, its outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply {
    pub event: u64,
    pub micros: u64,
    pub outcome: Outcome,
}

/// One write of the history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteRecord {
    pub seq: u64,
    pub block: u64,
    pub issued: u64,
    pub issued_micros: u64,
    pub reply: Option<Reply>,
}

impl WriteRecord {
    /// Answered OK.
    pub fn acked(&self) -> bool {
        matches!(self.reply, Some(r) if r.outcome == Outcome::Ok)
    }

    /// Answered (either way) before event `e`.
    fn completed_before(&self, e: u64) -> bool {
        matches!(self.reply, Some(r) if r.event < e)
    }
}

/// One FLUSH of the history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlushRecord {
    pub id: u64,
    pub issued: u64,
    pub issued_micros: u64,
    pub reply: Option<Reply>,
}

/// A parsed log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct History {
    pub geometry: Geometry,
    /// In issue order (ascending `seq` and `issued`).
    pub writes: Vec<WriteRecord>,
    pub flushes: Vec<FlushRecord>,
    /// Why the writer stopped, if it said.
    pub end: Option<String>,
    /// Bytes at the end of the log that were not a complete line (a writer
    /// that died mid-line); ignored.
    pub torn_tail: usize,
}

/// A log that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    pub line: usize,
    pub reason: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "history log line {}: {}", self.line, self.reason)
    }
}

impl std::error::Error for ParseError {}

fn num(tok: Option<&str>, what: &str) -> Result<u64, String> {
    let t = tok.ok_or_else(|| format!("missing {what}"))?;
    t.parse()
        .map_err(|_| format!("{what} {t:?} is not a number"))
}

fn outcome(tokens: &mut std::str::SplitWhitespace<'_>) -> Result<Outcome, String> {
    match tokens.next() {
        Some("ok") => Ok(Outcome::Ok),
        Some("err") => Ok(Outcome::Err(num(tokens.next(), "errno")? as u32)),
        other => Err(format!("expected ok or err, found {other:?}")),
    }
}

fn kv(tok: Option<&str>, key: &str) -> Result<u64, String> {
    let t = tok.ok_or_else(|| format!("missing {key}="))?;
    let v = t
        .strip_prefix(key)
        .and_then(|r| r.strip_prefix('='))
        .ok_or_else(|| format!("expected {key}=N, found {t:?}"))?;
    v.parse()
        .map_err(|_| format!("{key} {v:?} is not a number"))
}

impl History {
    /// Parses a log. A last line without its newline is ignored (counted in
    /// `torn_tail`); anything else malformed is an error.
    pub fn parse(text: &str) -> Result<History, ParseError> {
        let (body, torn_tail) = match text.rfind('\n') {
            Some(i) => (&text[..=i], text.len() - i - 1),
            None => ("", text.len()),
        };
        let mut lines = body.lines().enumerate().map(|(i, l)| (i + 1, l));
        let err = |line: usize, reason: String| ParseError { line, reason };
        match lines.next() {
            Some((_, l)) if l == LOG_HEADER => {}
            Some((n, l)) => return Err(err(n, format!("expected {LOG_HEADER:?}, found {l:?}"))),
            None => return Err(err(1, "empty log".into())),
        }
        let geometry = match lines.next() {
            Some((n, l)) => {
                let mut t = l.split_whitespace();
                if t.next() != Some("geometry") {
                    return Err(err(n, format!("expected a geometry line, found {l:?}")));
                }
                let g = (|| -> Result<Geometry, String> {
                    let block_size = kv(t.next(), "block_size")?;
                    let blocks = kv(t.next(), "blocks")?;
                    let offset = kv(t.next(), "offset")?;
                    let block_size = u32::try_from(block_size)
                        .ok()
                        .filter(|&b| b as usize >= BLOCK_HEADER_LEN + 4)
                        .ok_or_else(|| format!("block_size {block_size} is not usable"))?;
                    Ok(Geometry {
                        block_size,
                        blocks,
                        offset,
                    })
                })()
                .map_err(|r| err(n, r))?;
                g
            }
            None => return Err(err(2, "missing geometry line".into())),
        };
        let mut h = History {
            geometry,
            writes: Vec::new(),
            flushes: Vec::new(),
            end: None,
            torn_tail,
        };
        let mut write_index: HashMap<u64, usize> = HashMap::new();
        let mut flush_index: HashMap<u64, usize> = HashMap::new();
        let mut last_event: Option<u64> = None;
        for (n, line) in lines {
            let mut t = line.split_whitespace();
            let Some(kind) = t.next() else { continue };
            let r = (|| -> Result<(), String> {
                let event = num(t.next(), "event")?;
                if last_event.is_some_and(|e| event <= e) {
                    return Err(format!(
                        "event {event} does not follow {}",
                        last_event.unwrap()
                    ));
                }
                last_event = Some(event);
                let micros = num(t.next(), "time")?;
                match kind {
                    "W" => {
                        let seq = num(t.next(), "seq")?;
                        let block = num(t.next(), "block")?;
                        if block >= h.geometry.blocks {
                            return Err(format!("block {block} is past the geometry"));
                        }
                        if write_index.insert(seq, h.writes.len()).is_some() {
                            return Err(format!("write {seq} issued twice"));
                        }
                        h.writes.push(WriteRecord {
                            seq,
                            block,
                            issued: event,
                            issued_micros: micros,
                            reply: None,
                        });
                    }
                    "WR" => {
                        let seq = num(t.next(), "seq")?;
                        let outcome = outcome(&mut t)?;
                        let i = *write_index
                            .get(&seq)
                            .ok_or_else(|| format!("reply to write {seq}, never issued"))?;
                        let w = &mut h.writes[i];
                        if w.reply.is_some() {
                            return Err(format!("write {seq} answered twice"));
                        }
                        w.reply = Some(Reply {
                            event,
                            micros,
                            outcome,
                        });
                    }
                    "F" => {
                        let id = num(t.next(), "flush id")?;
                        if flush_index.insert(id, h.flushes.len()).is_some() {
                            return Err(format!("flush {id} issued twice"));
                        }
                        h.flushes.push(FlushRecord {
                            id,
                            issued: event,
                            issued_micros: micros,
                            reply: None,
                        });
                    }
                    "FR" => {
                        let id = num(t.next(), "flush id")?;
                        let outcome = outcome(&mut t)?;
                        let i = *flush_index
                            .get(&id)
                            .ok_or_else(|| format!("reply to flush {id}, never issued"))?;
                        let f = &mut h.flushes[i];
                        if f.reply.is_some() {
                            return Err(format!("flush {id} answered twice"));
                        }
                        f.reply = Some(Reply {
                            event,
                            micros,
                            outcome,
                        });
                    }
                    "end" => {
                        h.end = Some(t.collect::<Vec<_>>().join(" "));
                    }
                    other => return Err(format!("unknown record {other:?}")),
                }
                Ok(())
            })();
            r.map_err(|reason| err(n, reason))?;
        }
        Ok(h)
    }

    /// Reads and parses a log file.
    pub fn load(path: &Path) -> anyhow::Result<History> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
        Ok(History::parse(&text)?)
    }

    /// The write with sequence number `seq`.
    pub fn write(&self, seq: u64) -> Option<&WriteRecord> {
        // Sequence numbers are issued in increasing order.
        self.writes
            .binary_search_by_key(&seq, |w| w.seq)
            .ok()
            .map(|i| &self.writes[i])
    }

    /// The issue event of the last FLUSH answered OK.
    pub fn last_ok_flush_issued(&self) -> Option<u64> {
        self.flushes
            .iter()
            .filter(|f| matches!(f.reply, Some(r) if r.outcome == Outcome::Ok))
            .map(|f| f.issued)
            .max()
    }
}

/// Writes a log as events happen. Each record is one `write` call, so a
/// crash of the writer leaves at most one torn line at the end.
pub struct Recorder<W: Write> {
    out: W,
    next_event: u64,
    start: Instant,
}

impl<W: Write> Recorder<W> {
    /// Starts a log: writes the header and the geometry.
    pub fn new(mut out: W, g: Geometry) -> std::io::Result<Self> {
        let head = format!(
            "{LOG_HEADER}\ngeometry block_size={} blocks={} offset={}\n",
            g.block_size, g.blocks, g.offset
        );
        out.write_all(head.as_bytes())?;
        out.flush()?;
        Ok(Self {
            out,
            next_event: 1,
            start: Instant::now(),
        })
    }

    fn kind(&mut self, kind: &str, body: std::fmt::Arguments<'_>) -> std::io::Result<u64> {
        let event = self.next_event;
        self.next_event += 1;
        let us = self.start.elapsed().as_micros() as u64;
        let line = format!("{kind} {event} {us} {body}\n");
        self.out.write_all(line.as_bytes())?;
        self.out.flush()?;
        Ok(event)
    }

    pub fn write_issued(&mut self, seq: u64, block: u64) -> std::io::Result<u64> {
        self.kind("W", format_args!("{seq} {block}"))
    }

    pub fn write_replied(&mut self, seq: u64, o: Outcome) -> std::io::Result<u64> {
        match o {
            Outcome::Ok => self.kind("WR", format_args!("{seq} ok")),
            Outcome::Err(e) => self.kind("WR", format_args!("{seq} err {e}")),
        }
    }

    pub fn flush_issued(&mut self, id: u64) -> std::io::Result<u64> {
        self.kind("F", format_args!("{id}"))
    }

    pub fn flush_replied(&mut self, id: u64, o: Outcome) -> std::io::Result<u64> {
        match o {
            Outcome::Ok => self.kind("FR", format_args!("{id} ok")),
            Outcome::Err(e) => self.kind("FR", format_args!("{id} err {e}")),
        }
    }

    pub fn end(&mut self, reason: &str) -> std::io::Result<u64> {
        let reason = reason.replace('\n', " ");
        self.kind("end", format_args!("{reason}"))
    }

    /// The underlying writer.
    pub fn into_inner(self) -> W {
        self.out
    }
}

/// What the checker found wrong with one block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub block: u64,
    /// The write that should be visible (for missing writes).
    pub expected_seq: Option<u64>,
    pub found: Content,
    pub detail: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "block {}: {}", self.block, self.detail)
    }
}

/// The checker's findings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    pub blocks: u64,
    pub writes_issued: usize,
    pub writes_acked: usize,
    pub writes_failed: usize,
    pub writes_unanswered: usize,
    pub flushes_acked: usize,
    /// Writes that the last successful FLUSH covers.
    pub required_flushed: usize,
    /// Blocks holding a write that was never answered (in flight at the end).
    pub unanswered_present: usize,
    /// Covered by a FLUSH and missing: a durability bug.
    pub missing_flushed: Vec<Violation>,
    /// Acknowledged and missing (whether or not a FLUSH covered it).
    pub missing_acked: Vec<Violation>,
    /// The image holds a write, but not one that completed before it was issued.
    pub prefix_violations: Vec<Violation>,
    /// Damaged or misdirected blocks.
    pub corrupt: Vec<Violation>,
    /// Blocks holding a write the log never issued to them.
    pub unknown: Vec<Violation>,
}

/// Which promise a check holds the image to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Require {
    /// Every write covered by a successful FLUSH (the crash guarantee).
    Flushed,
    /// Every acknowledged write (a sync mirror that stayed up).
    Acked,
    /// Dependency closed, as an async mirror must be (plus `Flushed` is not
    /// implied: an async mirror may lag).
    Prefix,
}

impl Report {
    /// True when the image keeps the promise (and nothing is corrupt or unknown).
    pub fn holds(&self, r: Require) -> bool {
        let sound = self.corrupt.is_empty() && self.unknown.is_empty();
        sound
            && match r {
                Require::Flushed => self.missing_flushed.is_empty(),
                Require::Acked => self.missing_acked.is_empty() && self.missing_flushed.is_empty(),
                Require::Prefix => self.prefix_violations.is_empty(),
            }
    }

    /// A few lines for people: counts, then the first violations of each kind.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "{} blocks; writes: {} issued, {} acknowledged, {} failed, {} unanswered; {} flushes acknowledged; \
             {} writes covered by the last flush; {} blocks hold an unanswered write\n",
            self.blocks,
            self.writes_issued,
            self.writes_acked,
            self.writes_failed,
            self.writes_unanswered,
            self.flushes_acked,
            self.required_flushed,
            self.unanswered_present,
        );
        for (name, v) in [
            ("missing after a flush", &self.missing_flushed),
            ("acknowledged but missing", &self.missing_acked),
            ("dependency (prefix) violations", &self.prefix_violations),
            ("corrupt", &self.corrupt),
            ("unknown content", &self.unknown),
        ] {
            s += &format!("{name}: {}\n", v.len());
            for x in v.iter().take(10) {
                s += &format!("  {x}\n");
            }
        }
        s
    }
}

/// Whether the block's content (`present`) shows write `w` or something
/// allowed to replace it.
fn satisfies(w: &WriteRecord, present: Option<&WriteRecord>) -> bool {
    match present {
        None => false,
        Some(c) if c.seq == w.seq => true,
        // Unless C completed before W was issued (then W should have
        // replaced it), C may be ordered after W.
        Some(c) => !c.completed_before(w.issued),
    }
}

fn describe(found: &Content) -> String {
    match found {
        Content::Zero => "zeros".into(),
        Content::Record { seq, .. } => format!("write {seq}"),
        Content::Corrupt(r) => format!("corrupt ({r})"),
    }
}

/// Checks `contents` (one entry per block, in block order) against `h`.
pub fn check(h: &History, contents: &[Content]) -> Report {
    let g = h.geometry;
    assert_eq!(contents.len() as u64, g.blocks, "one content per block");
    let mut rep = Report {
        blocks: g.blocks,
        writes_issued: h.writes.len(),
        flushes_acked: h
            .flushes
            .iter()
            .filter(|f| matches!(f.reply, Some(r) if r.outcome == Outcome::Ok))
            .count(),
        ..Report::default()
    };
    for w in &h.writes {
        match w.reply {
            Some(Reply {
                outcome: Outcome::Ok,
                ..
            }) => rep.writes_acked += 1,
            Some(_) => rep.writes_failed += 1,
            None => rep.writes_unanswered += 1,
        }
    }

    let first_seq = h.writes.first().map_or(1, |w| w.seq);
    // What each block holds, as a write of the history.
    let mut present: Vec<Option<&WriteRecord>> = Vec::with_capacity(contents.len());
    for (b, c) in contents.iter().enumerate() {
        let b = b as u64;
        let p = match c {
            Content::Zero => None,
            Content::Corrupt(r) => {
                rep.corrupt.push(Violation {
                    block: b,
                    expected_seq: None,
                    found: c.clone(),
                    detail: format!("damaged block: {r}"),
                });
                None
            }
            Content::Record { block, seq } if *block != b => {
                rep.corrupt.push(Violation {
                    block: b,
                    expected_seq: None,
                    found: c.clone(),
                    detail: format!("holds write {seq} meant for block {block} (misdirected)"),
                });
                None
            }
            // Written before this history began (a writer run over blocks an
            // earlier run wrote starts above its numbers): like zeros.
            Content::Record { seq, .. } if *seq < first_seq => None,
            Content::Record { seq, .. } => match h.write(*seq) {
                Some(w) if w.block == b => {
                    if w.reply.is_none() {
                        rep.unanswered_present += 1;
                    }
                    Some(w)
                }
                Some(w) => {
                    rep.unknown.push(Violation {
                        block: b,
                        expected_seq: None,
                        found: c.clone(),
                        detail: format!(
                            "holds write {seq}, which the log issued to block {}",
                            w.block
                        ),
                    });
                    None
                }
                None => {
                    rep.unknown.push(Violation {
                        block: b,
                        expected_seq: None,
                        found: c.clone(),
                        detail: format!("holds write {seq}, which the log never issued"),
                    });
                    None
                }
            },
        };
        present.push(p);
    }
    let sound = |b: u64| !matches!(contents[b as usize], Content::Corrupt(_));

    let flush_cut = h.last_ok_flush_issued();
    // Per block, the latest unsatisfied requirement of each kind (one
    // violation per block is enough to read).
    let mut missing_flushed: HashMap<u64, &WriteRecord> = HashMap::new();
    let mut missing_acked: HashMap<u64, &WriteRecord> = HashMap::new();
    for w in h.writes.iter().filter(|w| w.acked()) {
        let ok = satisfies(w, present[w.block as usize]);
        let covered = matches!((w.reply, flush_cut), (Some(r), Some(cut)) if r.event < cut);
        if covered {
            rep.required_flushed += 1;
        }
        if ok || !sound(w.block) {
            continue;
        }
        missing_acked.insert(w.block, w);
        if covered {
            missing_flushed.insert(w.block, w);
        }
    }
    let violations = |m: HashMap<u64, &WriteRecord>, what: &str| {
        let mut v: Vec<Violation> = m
            .into_iter()
            .map(|(b, w)| Violation {
                block: b,
                expected_seq: Some(w.seq),
                found: contents[b as usize].clone(),
                detail: format!(
                    "write {} ({what}, issued at event {}, answered at event {}) is missing: the block holds {}",
                    w.seq,
                    w.issued,
                    w.reply.map_or(0, |r| r.event),
                    describe(&contents[b as usize])
                ),
            })
            .collect();
        v.sort_by_key(|x| x.block);
        v
    };
    rep.missing_flushed = violations(missing_flushed, "acknowledged, then covered by a flush");
    rep.missing_acked = violations(missing_acked, "acknowledged");

    // Dependency closure: T is the latest issue among the writes present;
    // every write that completed OK before T must be visible.
    if let Some((t, holder)) = present.iter().flatten().map(|w| (w.issued, w.seq)).max() {
        let mut missing: HashMap<u64, &WriteRecord> = HashMap::new();
        for w in h
            .writes
            .iter()
            .filter(|w| w.acked() && w.completed_before(t))
        {
            if sound(w.block) && !satisfies(w, present[w.block as usize]) {
                missing.insert(w.block, w);
            }
        }
        rep.prefix_violations = violations(
            missing,
            &format!("completed before write {holder}, which the image holds, was issued"),
        );
    }
    rep
}

/// Reads the history's blocks from an image file (or block device).
pub fn read_contents(image: &Path, g: Geometry) -> std::io::Result<Vec<Content>> {
    let mut f = std::fs::File::open(image)?;
    f.seek(SeekFrom::Start(g.offset))?;
    let bs = g.block_size as usize;
    let per_read = (1 << 20) / bs.max(1);
    let per_read = per_read.max(1);
    let mut out = Vec::with_capacity(g.blocks as usize);
    let mut buf = vec![0u8; per_read * bs];
    let mut left = g.blocks as usize;
    while left > 0 {
        let n = left.min(per_read);
        f.read_exact(&mut buf[..n * bs])?;
        out.extend(buf[..n * bs].chunks(bs).map(decode_block));
        left -= n;
    }
    Ok(out)
}

/// Loads a log and checks an image against it.
pub fn check_image(image: &Path, log: &Path) -> anyhow::Result<Report> {
    let h = History::load(log)?;
    let contents = read_contents(image, h.geometry)
        .map_err(|e| anyhow::anyhow!("reading {}: {e}", image.display()))?;
    Ok(check(&h, &contents))
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: Geometry = Geometry {
        block_size: 512,
        blocks: 4,
        offset: 0,
    };

    fn block(b: u64, seq: u64) -> Vec<u8> {
        let mut v = vec![0u8; 512];
        encode_block(&mut v, b, seq);
        v
    }

    /// A recorder over memory; returns the text when done.
    fn log(f: impl FnOnce(&mut Recorder<Vec<u8>>)) -> History {
        let mut r = Recorder::new(Vec::new(), G).unwrap();
        f(&mut r);
        History::parse(&String::from_utf8(r.into_inner()).unwrap()).unwrap()
    }

    fn rec(b: u64, seq: u64) -> Content {
        Content::Record { block: b, seq }
    }

    #[test]
    fn content_from_before_the_history_counts_as_unwritten() {
        // A run whose writes start at 100 over blocks an earlier run wrote.
        let h = log(|r| {
            r.write_issued(100, 0).unwrap();
            r.write_replied(100, Outcome::Ok).unwrap();
            r.write_issued(101, 1).unwrap();
        });
        // Block 1 still holds write 7 of the earlier run (101 never
        // answered), block 2 write 3: neither is unknown.
        let rep = check(&h, &[rec(0, 100), rec(1, 7), rec(2, 3), Content::Zero]);
        assert!(rep.holds(Require::Acked), "{}", rep.summary());
        // But an acknowledged write of this run that lost to old content is missing.
        let rep = check(
            &h,
            &[rec(0, 5), Content::Zero, Content::Zero, Content::Zero],
        );
        assert_eq!(rep.missing_acked.len(), 1);
        // And a number above the first one that the log never issued is unknown.
        let rep = check(
            &h,
            &[rec(0, 100), Content::Zero, rec(2, 150), Content::Zero],
        );
        assert_eq!(rep.unknown.len(), 1);
    }

    #[test]
    fn blocks_round_trip_and_detect_damage() {
        let mut b = block(3, 77);
        assert_eq!(decode_block(&b), rec(3, 77));
        assert_eq!(decode_block(&[0u8; 512]), Content::Zero);
        b[300] ^= 1;
        assert!(matches!(decode_block(&b), Content::Corrupt(_)));
        let mut torn = block(1, 5);
        torn[256..].copy_from_slice(&block(1, 6)[256..]);
        assert!(matches!(decode_block(&torn), Content::Corrupt(_)));
        assert!(matches!(decode_block(&[7u8; 512]), Content::Corrupt(_)));
        // Different writes of one block differ in their filler too.
        assert_ne!(block(1, 5)[100..], block(1, 6)[100..]);
    }

    #[test]
    fn parses_what_the_recorder_writes() {
        let h = log(|r| {
            r.write_issued(1, 0).unwrap();
            r.write_issued(2, 3).unwrap();
            r.write_replied(2, Outcome::Ok).unwrap();
            r.flush_issued(1).unwrap();
            r.write_replied(1, Outcome::Err(5)).unwrap();
            r.flush_replied(1, Outcome::Ok).unwrap();
            r.end("time up").unwrap();
        });
        assert_eq!(h.geometry, G);
        assert_eq!(h.writes.len(), 2);
        assert_eq!(h.writes[0].issued, 1);
        assert_eq!(h.writes[0].reply.unwrap().outcome, Outcome::Err(5));
        assert_eq!(h.writes[1].reply.unwrap().event, 3);
        assert_eq!(h.flushes[0].issued, 4);
        assert_eq!(h.last_ok_flush_issued(), Some(4));
        assert_eq!(h.end.as_deref(), Some("time up"));
        assert_eq!(h.torn_tail, 0);
    }

    #[test]
    fn a_torn_last_line_is_ignored_and_bad_lines_are_errors() {
        let good = format!("{LOG_HEADER}\ngeometry block_size=512 blocks=4 offset=0\nW 1 0 1 2\n");
        let h = History::parse(&(good.clone() + "WR 2 0 1 o")).unwrap();
        assert_eq!(h.torn_tail, "WR 2 0 1 o".len());
        assert!(h.writes[0].reply.is_none());
        for bad in [
            "WR 2 0 9 ok\n",    // reply to nothing
            "W 1 0 2 1\n",      // event does not increase
            "W 2 0 1 1\n",      // seq issued twice
            "W 2 0 2 4\n",      // block past the geometry
            "X 2 0\n",          // unknown record
            "WR 2 0 1 maybe\n", // bad outcome
        ] {
            let e = History::parse(&(good.clone() + bad)).unwrap_err();
            assert_eq!(e.line, 4, "{bad}: {e}");
        }
        assert!(History::parse("nonsense\n").is_err());
        assert!(History::parse(&format!(
            "{LOG_HEADER}\ngeometry block_size=8 blocks=1 offset=0\n"
        ))
        .is_err());
    }

    #[test]
    fn flushed_writes_must_be_present() {
        // w1 -> block 0 acked, flush issued after it and acked; w2 -> block 1
        // acked after the flush was issued (not covered); w3 in flight.
        let h = log(|r| {
            r.write_issued(1, 0).unwrap();
            r.write_replied(1, Outcome::Ok).unwrap();
            r.flush_issued(1).unwrap();
            r.write_issued(2, 1).unwrap();
            r.flush_replied(1, Outcome::Ok).unwrap();
            r.write_replied(2, Outcome::Ok).unwrap();
            r.write_issued(3, 2).unwrap();
        });
        // Everything there: fine under every requirement.
        let all = check(&h, &[rec(0, 1), rec(1, 2), rec(2, 3), Content::Zero]);
        assert!(all.holds(Require::Acked), "{}", all.summary());
        assert!(all.holds(Require::Prefix), "{}", all.summary());
        assert_eq!(all.required_flushed, 1);
        assert_eq!(all.unanswered_present, 1);
        // The unflushed write and the in-flight one lost: the flush promise holds, the ack one does not.
        let lost = check(
            &h,
            &[rec(0, 1), Content::Zero, Content::Zero, Content::Zero],
        );
        assert!(lost.holds(Require::Flushed), "{}", lost.summary());
        assert!(!lost.holds(Require::Acked));
        assert_eq!(lost.missing_acked.len(), 1);
        assert_eq!(lost.missing_acked[0].block, 1);
        // The flushed write lost: a violation of both.
        let bad = check(
            &h,
            &[Content::Zero, rec(1, 2), Content::Zero, Content::Zero],
        );
        assert!(!bad.holds(Require::Flushed));
        assert_eq!(bad.missing_flushed[0].expected_seq, Some(1));
        // The image holds w2, issued after w1 completed, but not w1: not a prefix.
        assert_eq!(bad.prefix_violations.len(), 1);
        assert!(!bad.holds(Require::Prefix));
    }

    #[test]
    fn an_older_write_of_the_same_block_does_not_count_unless_concurrent() {
        // Block 0: w1 acked, then w2 issued and acked, then a flush.
        let serial = log(|r| {
            r.write_issued(1, 0).unwrap();
            r.write_replied(1, Outcome::Ok).unwrap();
            r.write_issued(2, 0).unwrap();
            r.write_replied(2, Outcome::Ok).unwrap();
            r.flush_issued(1).unwrap();
            r.flush_replied(1, Outcome::Ok).unwrap();
        });
        let c = [rec(0, 1), Content::Zero, Content::Zero, Content::Zero];
        let rep = check(&serial, &c);
        assert!(!rep.holds(Require::Flushed));
        assert_eq!(rep.missing_flushed[0].expected_seq, Some(2));
        let c = [rec(0, 2), Content::Zero, Content::Zero, Content::Zero];
        assert!(check(&serial, &c).holds(Require::Acked));

        // w1 and w2 in flight together: either may win.
        let concurrent = log(|r| {
            r.write_issued(1, 0).unwrap();
            r.write_issued(2, 0).unwrap();
            r.write_replied(2, Outcome::Ok).unwrap();
            r.write_replied(1, Outcome::Ok).unwrap();
            r.flush_issued(1).unwrap();
            r.flush_replied(1, Outcome::Ok).unwrap();
        });
        for winner in [1, 2] {
            let c = [rec(0, winner), Content::Zero, Content::Zero, Content::Zero];
            let rep = check(&concurrent, &c);
            assert!(
                rep.holds(Require::Acked),
                "winner {winner}: {}",
                rep.summary()
            );
        }
    }

    #[test]
    fn corrupt_misdirected_and_unknown_blocks_are_reported() {
        let h = log(|r| {
            r.write_issued(1, 0).unwrap();
            r.write_issued(2, 1).unwrap();
        });
        let rep = check(
            &h,
            &[
                rec(1, 2),                       // meant for block 1
                rec(1, 99),                      // never issued
                Content::Corrupt("torn".into()), // damaged
                rec(3, 1),                       // issued to block 0
            ],
        );
        assert_eq!(rep.corrupt.len(), 2, "{}", rep.summary());
        assert_eq!(rep.unknown.len(), 2, "{}", rep.summary());
        assert!(!rep.holds(Require::Flushed));
    }

    #[test]
    fn a_failed_flush_covers_nothing_and_failed_writes_are_not_required() {
        let h = log(|r| {
            r.write_issued(1, 0).unwrap();
            r.write_replied(1, Outcome::Ok).unwrap();
            r.write_issued(2, 1).unwrap();
            r.write_replied(2, Outcome::Err(5)).unwrap();
            r.flush_issued(1).unwrap();
            r.flush_replied(1, Outcome::Err(5)).unwrap();
        });
        let rep = check(&h, &vec![Content::Zero; 4]);
        assert_eq!(rep.required_flushed, 0);
        assert!(rep.holds(Require::Flushed));
        assert!(!rep.holds(Require::Acked));
        assert_eq!(rep.writes_failed, 1);
    }

    #[test]
    fn reads_an_image_file() {
        let dir = tempfile::tempdir().unwrap();
        let g = Geometry {
            block_size: 512,
            blocks: 3,
            offset: 1024,
        };
        let mut img = vec![0u8; 1024 + 4 * 512];
        img[1024 + 512..1024 + 1024].copy_from_slice(&block(1, 7));
        let path = dir.path().join("img");
        std::fs::write(&path, &img).unwrap();
        let c = read_contents(&path, g).unwrap();
        assert_eq!(c, vec![Content::Zero, rec(1, 7), Content::Zero]);
    }
}
