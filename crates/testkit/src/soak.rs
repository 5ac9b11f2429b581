//! The soak: a primary and a mirror node (`blockmirror serve` processes)
//! on loopback, the history writer against the primary's NBD export, and
//! one seeded fault per cycle.
//!
//! Two nodes, A and B, each configured as the other's mirror (DRBD-style,
//! so either can be promoted), each link through a [`FaultProxy`] in front
//! of the node it feeds. Each cycle:
//!
//! 1. starts the history writer on the current primary (its own log, its
//!    sequence numbers above every earlier cycle's) and waits for a seeded
//!    number of acknowledged writes;
//! 2. injects one fault, chosen by the cycle's seed ([`Fault`]): kill -9
//!    the primary or the mirror and restart it, cut the link and heal it,
//!    drop the connection mid-frame / corrupt a byte / stall
//!    ([`NetFault`]), make the mirror's disk fail (seeded EIO, ENOSPC and
//!    latency spikes through `POST /volumes/vol/faults`) and clear it,
//!    switch the link to the other mode and back, or kill the primary,
//!    promote the mirror, bring the old primary back (it demotes itself)
//!    and fail back by a planned switchover;
//! 3. checks the mirror at the fault where it must hold: dependency closed
//!    after it (or its link) died in either mode; every acknowledged write
//!    (sync) or dependency closed (async) when its primary died;
//! 4. stops the writer, waits (polling, with the cycle's deadline) until
//!    the link is connected, in sync, with nothing out of sync and no lag,
//!    and checks both images against the history (every acknowledged write
//!    present; after an async promotion, dependency closed, since the RPO
//!    may lose the old primary's last writes) and against each other, byte
//!    for byte.
//!
//! A cycle's choices come from `Rng::new(seed ^ cycle)`-style forks, so
//! `--first-cycle C --cycles 1` replays cycle C's faults on a fresh pair.
//! A wait that passes the cycle's deadline is a hang: the run stops there.

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;
use thiserror::Error;

use crate::faultnet::{FaultProxy, NetFault};
use crate::history::{self, Require};
use crate::rng::Rng;
use crate::writer::{self, Progress, WriterConfig};

/// The volume every soak node serves (and its NBD export name).
pub const VOLUME: &str = "vol";
/// Volume size.
pub const VOLUME_SIZE: u64 = 32 << 20;
/// The primary's counter of link reconnections.
const RECONNECTS: &str = "blockmirror_link_reconnects_total";
/// Blocks (4 KiB) the history writer spreads its writes over: the first 8 MiB.
pub const HISTORY_BLOCKS: u64 = 2048;

/// The mirroring mode the soak runs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Sync,
    Async,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Sync => "sync",
            Mode::Async => "async",
        }
    }

    fn other(self) -> Mode {
        match self {
            Mode::Sync => Mode::Async,
            Mode::Async => Mode::Sync,
        }
    }
}

/// The faults a cycle chooses from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    KillPrimary,
    KillMirror,
    CutLink,
    Net,
    MirrorDisk,
    SwitchMode,
    PromoteFailback,
}

impl Fault {
    pub const ALL: [Fault; 7] = [
        Fault::KillPrimary,
        Fault::KillMirror,
        Fault::CutLink,
        Fault::Net,
        Fault::MirrorDisk,
        Fault::SwitchMode,
        Fault::PromoteFailback,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Fault::KillPrimary => "kill-primary",
            Fault::KillMirror => "kill-mirror",
            Fault::CutLink => "cut-link",
            Fault::Net => "net",
            Fault::MirrorDisk => "mirror-disk",
            Fault::SwitchMode => "switch-mode",
            Fault::PromoteFailback => "promote-failback",
        }
    }

    pub fn parse(s: &str) -> Option<Fault> {
        Fault::ALL.into_iter().find(|f| f.name() == s)
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct SoakConfig {
    pub mode: Mode,
    pub cycles: u64,
    /// Number of the first cycle (its choices are those of that cycle of a
    /// longer run with the same seed).
    pub first_cycle: u64,
    pub seed: u64,
    /// Where the run's directory is made (a fresh `blockmirror-soak-*`
    /// directory inside it); the system's temporary directory if None.
    pub dir: Option<PathBuf>,
    /// The `blockmirror` binary.
    pub bin: PathBuf,
    /// A cycle that takes longer than this is a hang.
    pub cycle_deadline: Duration,
    /// Faults to choose from (all when empty).
    pub faults: Vec<Fault>,
    /// Keep the run's directory even when every cycle passed.
    pub keep: bool,
}

/// The run's outcome.
#[derive(Debug, Clone, Default)]
pub struct SoakSummary {
    pub cycles: u64,
    pub writes_checked: u64,
    pub violations: u64,
    pub seed: u64,
    /// Cycles that passed their deadline (the run stops at the first).
    pub hangs: u64,
    /// From the end of each cycle's fault to in_sync.
    pub time_to_in_sync: Vec<Duration>,
    /// Corrupted bytes the fault transport injected (all caught, or a check
    /// would have failed).
    pub corrupted_bytes: u64,
    pub dropped_connections: u64,
}

impl SoakSummary {
    /// The last line the binary prints (CONTRACT.md, "Test tools").
    pub fn line(&self) -> String {
        let mut t = self.time_to_in_sync.clone();
        t.sort();
        let ms = |d: Option<&Duration>| d.map_or(0, |d| d.as_millis());
        format!(
            "cycles={} writes_checked={} violations={} seed={} hangs={} time_to_in_sync_median_ms={} time_to_in_sync_max_ms={} corrupted_bytes={} dropped_connections={}",
            self.cycles,
            self.writes_checked,
            self.violations,
            self.seed,
            self.hangs,
            ms(t.get(t.len() / 2)),
            ms(t.last()),
            self.corrupted_bytes,
            self.dropped_connections,
        )
    }
}

/// Why the soak could not run, or stopped.
#[derive(Debug, Error)]
pub enum SoakError {
    #[error("setting up the soak: {0}")]
    Setup(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cycle {cycle} (seed {seed}): hang: {what} did not happen within the cycle's deadline; last: {last}")]
    Hang {
        cycle: u64,
        seed: u64,
        what: String,
        last: String,
    },
    #[error("cycle {cycle}: node {node} exited unexpectedly ({status}); see {log}")]
    NodeDied {
        cycle: u64,
        node: String,
        status: String,
        log: PathBuf,
    },
}

impl SoakError {
    fn with_seed(self, s: u64) -> SoakError {
        match self {
            SoakError::Hang {
                cycle, what, last, ..
            } => SoakError::Hang {
                cycle,
                seed: s,
                what,
                last,
            },
            e => e,
        }
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SoakError + '_ {
    move |source| SoakError::Io {
        path: path.to_owned(),
        source,
    }
}

// ---------------------------------------------------------------------------
// Small HTTP client for the admin API.

fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let code = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((code, body))
}

/// A loopback port that was free a moment ago, never one handed out before
/// in this process.
fn free_port() -> std::io::Result<u16> {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
        if !given.contains(&port) {
            given.push(port);
            return Ok(port);
        }
    }
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

// ---------------------------------------------------------------------------
// Nodes.

struct Node {
    name: &'static str,
    dir: PathBuf,
    config: PathBuf,
    admin: SocketAddr,
    nbd: SocketAddr,
    listen: SocketAddr,
    image: PathBuf,
    child: Option<Child>,
    bin: PathBuf,
}

impl Node {
    fn uri(&self) -> String {
        format!("nbd://{}/{VOLUME}", self.nbd)
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("node.log")
    }

    /// Starts the process and waits until its admin server answers.
    fn spawn(&mut self, deadline: Instant, cycle: u64) -> Result<(), SoakError> {
        let log_path = self.log_path();
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io_err(&log_path))?;
        let child = Command::new(&self.bin)
            .args(["serve", "--config"])
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| SoakError::Setup(format!("starting {}: {e}", self.bin.display())))?;
        self.child = Some(child);
        let admin = self.admin;
        poll(
            deadline,
            cycle,
            &format!("node {} to answer", self.name),
            || {
                self.check_alive(cycle)?;
                Ok(match http(admin, "GET", "/status", "") {
                    Ok((200, _)) => Some(()),
                    _ => None,
                })
            },
        )
    }

    fn check_alive(&mut self, cycle: u64) -> Result<(), SoakError> {
        if let Some(c) = self.child.as_mut() {
            if let Ok(Some(st)) = c.try_wait() {
                self.child = None;
                return Err(SoakError::NodeDied {
                    cycle,
                    node: self.name.into(),
                    status: st.to_string(),
                    log: self.log_path(),
                });
            }
        }
        Ok(())
    }

    /// kill -9, and reaps it.
    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then SIGKILL if it has not exited within 20 s.
    fn stop(&mut self) {
        let Some(mut c) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = c.try_wait() {
                return;
            }
            std::thread::park_timeout(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
    }

    fn volume(&self) -> Option<Value> {
        let (code, body) = http(self.admin, "GET", "/status", "").ok()?;
        if code != 200 {
            return None;
        }
        let v: Value = serde_json::from_str(&body).ok()?;
        Some(v["volumes"][0].clone())
    }

    /// The sum of every sample of metric `name`; None when unreachable.
    fn metric(&self, name: &str) -> Option<f64> {
        let (code, body) = http(self.admin, "GET", "/metrics", "").ok()?;
        if code != 200 {
            return None;
        }
        let mut sum = 0.0;
        for line in body.lines().filter(|l| !l.starts_with('#')) {
            if let Some(rest) = line.strip_prefix(name) {
                if rest.starts_with('{') || rest.starts_with(' ') {
                    sum += rest
                        .rsplit(' ')
                        .next()
                        .and_then(|v| v.parse::<f64>().ok())
                        .unwrap_or(0.0);
                }
            }
        }
        Some(sum)
    }

    fn post(&self, path: &str, body: &str) -> Result<String, String> {
        match http(self.admin, "POST", path, body) {
            Ok((200, b)) => Ok(b),
            Ok((code, b)) => Err(format!("POST {path} on {}: {code} {}", self.name, b.trim())),
            Err(e) => Err(format!("POST {path} on {}: {e}", self.name)),
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Polls `f` until it returns Some or `deadline` passes (a hang).
fn poll<T>(
    deadline: Instant,
    cycle: u64,
    what: &str,
    mut f: impl FnMut() -> Result<Option<T>, SoakError>,
) -> Result<T, SoakError> {
    let mut pause = Duration::from_millis(2);
    loop {
        if let Some(v) = f()? {
            return Ok(v);
        }
        if Instant::now() > deadline {
            return Err(SoakError::Hang {
                cycle,
                seed: 0,
                what: what.into(),
                last: String::new(),
            });
        }
        std::thread::park_timeout(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// A history writer running on its own thread.
struct RunningWriter {
    progress: Arc<Progress>,
    handle: Option<JoinHandle<anyhow::Result<writer::Summary>>>,
}

impl RunningWriter {
    fn start(cfg: WriterConfig) -> RunningWriter {
        let progress = Arc::new(Progress::default());
        let p = progress.clone();
        let handle = std::thread::Builder::new()
            .name("soak-writer".into())
            .spawn(move || writer::run(&cfg, &p))
            .expect("spawn the writer thread");
        RunningWriter {
            progress,
            handle: Some(handle),
        }
    }

    fn acked(&self) -> u64 {
        self.progress.writes_acked.load(Relaxed)
    }

    fn finished(&self) -> bool {
        self.handle.as_ref().is_none_or(|h| h.is_finished())
    }

    /// Stops it and waits for it (it drains its replies, then disconnects).
    fn stop(&mut self) -> Result<writer::Summary, String> {
        self.progress.stop.store(true, Relaxed);
        match self.handle.take() {
            Some(h) => match h.join() {
                Ok(Ok(s)) => Ok(s),
                Ok(Err(e)) => Err(format!("history writer: {e:#}")),
                Err(_) => Err("history writer panicked".into()),
            },
            None => Err("history writer already stopped".into()),
        }
    }
}

/// Compares two files byte by byte; the first differing offset, if any.
fn first_difference(a: &Path, b: &Path) -> std::io::Result<Option<u64>> {
    let mut fa = fs::File::open(a)?;
    let mut fb = fs::File::open(b)?;
    let (la, lb) = (fa.metadata()?.len(), fb.metadata()?.len());
    let mut ba = vec![0u8; 1 << 20];
    let mut bb = vec![0u8; 1 << 20];
    let mut off = 0u64;
    while off < la.min(lb) {
        let n = ((la.min(lb) - off) as usize).min(ba.len());
        fa.read_exact(&mut ba[..n])?;
        fb.read_exact(&mut bb[..n])?;
        if let Some(i) = (0..n).find(|&i| ba[i] != bb[i]) {
            return Ok(Some(off + i as u64));
        }
        off += n as u64;
    }
    Ok((la != lb).then_some(la.min(lb)))
}

/// Finds the `blockmirror` binary: `BLOCKMIRROR_BIN`, else next to the
/// running executable (cargo puts both in `target/<profile>/`), else its
/// parent directory (a test executable lives in `target/<profile>/deps/`).
pub fn find_blockmirror() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("BLOCKMIRROR_BIN") {
        return Some(PathBuf::from(p));
    }
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    [dir.join("blockmirror"), dir.parent()?.join("blockmirror")]
        .into_iter()
        .find(|p| p.is_file())
}

// ---------------------------------------------------------------------------
// The soak.

struct Soak<'a> {
    cfg: &'a SoakConfig,
    dir: PathBuf,
    nodes: [Node; 2],
    /// `proxies[i]` forwards to node i's replication listener; node 1-i's
    /// mirror table names it.
    proxies: [FaultProxy; 2],
    primary: usize,
    out: &'a mut dyn FnMut(&str),
}

/// What one cycle found.
struct CycleOutcome {
    line: String,
    writes_checked: u64,
    violations: Vec<String>,
    time_to_in_sync: Duration,
}

/// Runs the soak; `out` gets each line to print (one per cycle, the
/// violations, and last the summary line).
pub fn run(cfg: &SoakConfig, out: &mut dyn FnMut(&str)) -> Result<SoakSummary, SoakError> {
    let base = cfg.dir.clone().unwrap_or_else(std::env::temp_dir);
    fs::create_dir_all(&base).map_err(io_err(&base))?;
    let dir = base.join(format!(
        "blockmirror-soak-{}-{}-{}",
        cfg.mode.as_str(),
        cfg.seed,
        std::process::id()
    ));
    if dir.exists() {
        fs::remove_dir_all(&dir).map_err(io_err(&dir))?;
    }
    fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    let mut summary = SoakSummary {
        seed: cfg.seed,
        ..SoakSummary::default()
    };
    let result = (|| {
        let mut soak = Soak::start(cfg, &dir, out)?;
        for c in cfg.first_cycle..cfg.first_cycle + cfg.cycles {
            let o = match soak.cycle(c).map_err(|e| e.with_seed(cfg.seed)) {
                Ok(o) => o,
                Err(e) => {
                    summary.hangs += u64::from(matches!(e, SoakError::Hang { .. }));
                    summary.violations += 1;
                    summary.cycles += 1;
                    (soak.out)(&format!(
                        "cycle {c} FAILED: {e} (replay: blockmirror-soak --mode {} --seed {} --first-cycle {c} --cycles 1)",
                        cfg.mode.as_str(),
                        cfg.seed
                    ));
                    soak.proxy_totals(&mut summary);
                    return Err(e);
                }
            };
            summary.cycles += 1;
            summary.writes_checked += o.writes_checked;
            summary.time_to_in_sync.push(o.time_to_in_sync);
            (soak.out)(&o.line);
            for v in &o.violations {
                summary.violations += 1;
                (soak.out)(&format!(
                    "VIOLATION cycle {c} seed {}: {v} (replay: blockmirror-soak --mode {} --seed {} --first-cycle {c} --cycles 1)",
                    cfg.seed,
                    cfg.mode.as_str(),
                    cfg.seed
                ));
            }
        }
        soak.proxy_totals(&mut summary);
        soak.shutdown();
        Ok(())
    })();
    let clean = result.is_ok() && summary.violations == 0 && !cfg.keep;
    if clean {
        let _ = fs::remove_dir_all(&dir);
    } else {
        out(&format!("kept the run's files in {}", dir.display()));
    }
    match result {
        Ok(()) => Ok(summary),
        Err(e) => {
            out(&summary.line());
            Err(e)
        }
    }
}

fn hex_secret(seed: u64) -> String {
    let mut r = Rng::new(seed ^ u64::from(std::process::id()) ^ 0x5ec2e7);
    (0..4).map(|_| format!("{:016x}", r.next_u64())).collect()
}

impl<'a> Soak<'a> {
    fn start(
        cfg: &'a SoakConfig,
        dir: &Path,
        out: &'a mut dyn FnMut(&str),
    ) -> Result<Soak<'a>, SoakError> {
        let setup = |e: std::io::Error| SoakError::Setup(format!("ports: {e}"));
        let listens = [
            loopback(free_port().map_err(setup)?),
            loopback(free_port().map_err(setup)?),
        ];
        let any: SocketAddr = loopback(0);
        let proxies = [
            FaultProxy::start(any, listens[0]).map_err(setup)?,
            FaultProxy::start(any, listens[1]).map_err(setup)?,
        ];
        let secret = hex_secret(cfg.seed);
        let make = |i: usize, name: &'static str| -> Result<Node, SoakError> {
            let ndir = dir.join(name);
            fs::create_dir_all(&ndir).map_err(io_err(&ndir))?;
            let key = ndir.join("secret.key");
            fs::write(&key, format!("{secret}\n")).map_err(io_err(&key))?;
            let admin = loopback(free_port().map_err(setup)?);
            let nbd = loopback(free_port().map_err(setup)?);
            let image = ndir.join(format!("{VOLUME}.img"));
            let role = if i == 0 { "primary" } else { "mirror" };
            let peer = proxies[1 - i].addr();
            let text = format!(
                "node = \"{name}\"\nlisten = \"{}\"\nadmin = \"{admin}\"\nsecret_file = \"secret.key\"\n\n\
                 [[volume]]\nname = \"{VOLUME}\"\npath = \"{}\"\nsize = {VOLUME_SIZE}\nrole = \"{role}\"\n\
                 nbd = \"{nbd}\"\nmirror_timeout = \"1s\"\nfault_injection = true\n\n\
                 [[volume.mirror]]\npeer = \"{peer}\"\nmode = \"{}\"\n",
                listens[i],
                image.display(),
                cfg.mode.as_str()
            );
            let config = ndir.join("node.toml");
            fs::write(&config, text).map_err(io_err(&config))?;
            Ok(Node {
                name,
                dir: ndir,
                config,
                admin,
                nbd,
                listen: listens[i],
                image,
                child: None,
                bin: cfg.bin.clone(),
            })
        };
        let nodes = [make(0, "a")?, make(1, "b")?];
        let mut soak = Soak {
            cfg,
            dir: dir.to_owned(),
            nodes,
            proxies,
            primary: 0,
            out,
        };
        let deadline = Instant::now() + cfg.cycle_deadline;
        let c = cfg.first_cycle;
        soak.nodes[1].spawn(deadline, c)?;
        soak.nodes[0].spawn(deadline, c)?;
        soak.wait_settled(deadline, c)?;
        (soak.out)(&format!(
            "soak: mode {} seed {} cycles {}..{}: nodes a ({}) and b ({}) in {}",
            cfg.mode.as_str(),
            cfg.seed,
            cfg.first_cycle,
            cfg.first_cycle + cfg.cycles,
            soak.nodes[0].listen,
            soak.nodes[1].listen,
            soak.dir.display()
        ));
        Ok(soak)
    }

    fn proxy_totals(&self, s: &mut SoakSummary) {
        s.corrupted_bytes = self
            .proxies
            .iter()
            .map(|p| p.stats().corrupted.load(Relaxed))
            .sum();
        s.dropped_connections = self
            .proxies
            .iter()
            .map(|p| p.stats().dropped.load(Relaxed))
            .sum();
    }

    fn shutdown(&mut self) {
        for n in &mut self.nodes {
            n.stop();
        }
    }

    fn mirror(&self) -> usize {
        1 - self.primary
    }

    /// Waits until the primary's link is connected, in sync, nothing out
    /// of sync, no lag, nothing in flight, and the mirror names its feeder.
    fn wait_settled(&mut self, deadline: Instant, cycle: u64) -> Result<(), SoakError> {
        let (p, m) = (self.primary, self.mirror());
        let mut last = String::new();
        let r = poll(deadline, cycle, "the link to be in sync", || {
            for n in &mut self.nodes {
                n.check_alive(cycle)?;
            }
            let Some(v) = self.nodes[p].volume() else {
                return Ok(None);
            };
            let l = &v["mirrors"][0];
            last = l.to_string();
            let settled = v["role"] == "primary"
                && l["connection"] == "connected"
                && l["state"] == "in_sync"
                && l["out_of_sync_bytes"] == 0
                && l["lag_bytes"] == 0
                && l["inflight_requests"].as_u64().unwrap_or(0) == 0;
            if !settled {
                return Ok(None);
            }
            let Some(mv) = self.nodes[m].volume() else {
                return Ok(None);
            };
            Ok((mv["role"] == "mirror" && mv["primary"] == self.nodes[p].name).then_some(()))
        });
        self.with_last(r, last)
    }

    fn with_last<T>(&self, r: Result<T, SoakError>, last: String) -> Result<T, SoakError> {
        r.map_err(|e| match e {
            SoakError::Hang {
                cycle, seed, what, ..
            } => SoakError::Hang {
                cycle,
                seed,
                what,
                last,
            },
            e => e,
        })
    }

    /// Waits until node `i` no longer names a primary feeding it.
    fn wait_feeder_gone(
        &mut self,
        i: usize,
        deadline: Instant,
        cycle: u64,
    ) -> Result<(), SoakError> {
        let what = format!("node {} to see its primary gone", self.nodes[i].name);
        let node = &mut self.nodes[i];
        poll(deadline, cycle, &what, || {
            node.check_alive(cycle)?;
            Ok(node
                .volume()
                .filter(|v| v.get("primary").is_none_or(Value::is_null))
                .map(|_| ()))
        })
    }

    fn wait_acked(
        &mut self,
        w: &RunningWriter,
        n: u64,
        deadline: Instant,
        cycle: u64,
    ) -> Result<(), SoakError> {
        let p = self.primary;
        let node = &mut self.nodes[p];
        poll(deadline, cycle, &format!("{n} acknowledged writes"), || {
            node.check_alive(cycle)?;
            if w.finished() {
                // The writer ended (e.g. its primary refused it): nothing
                // more will be acknowledged.
                return Ok(Some(()));
            }
            Ok((w.acked() >= n).then_some(()))
        })
    }

    /// Flushes the primary through NBD (the writer's own flushes are
    /// periodic; this makes the final state durable and flushes the mirror).
    fn flush_primary(&self) -> Result<(), String> {
        use crate::nbd;
        use blockmirror_nbd::proto;
        let uri = nbd::Uri::parse(&self.nodes[self.primary].uri()).map_err(|e| e.to_string())?;
        let mut conn = nbd::connect(&uri).map_err(|e| format!("flush: {e:#}"))?;
        let mut buf = bytes::BytesMut::new();
        nbd::request(proto::CMD_FLUSH, 0, 1, 0, 0, &mut buf);
        nbd::request(proto::CMD_DISC, 0, 2, 0, 0, &mut buf);
        conn.stream
            .write_all(&buf)
            .map_err(|e| format!("flush: {e}"))?;
        let (err, _) =
            nbd::read_simple_reply(&mut conn.stream).map_err(|e| format!("flush: {e}"))?;
        if err != 0 {
            return Err(format!("flush answered error {err}"));
        }
        Ok(())
    }

    fn check(
        &self,
        image: &Path,
        log: &Path,
        require: Require,
        what: &str,
    ) -> (u64, Option<String>) {
        match history::check_image(image, log) {
            Ok(rep) => {
                let bad = (!rep.holds(require)).then(|| {
                    format!(
                        "{what}: {} does not keep {require:?}: {}",
                        image.display(),
                        rep.summary().replace('\n', "; ")
                    )
                });
                (rep.writes_acked as u64, bad)
            }
            Err(e) => (
                0,
                Some(format!("{what}: checking {}: {e:#}", image.display())),
            ),
        }
    }

    fn writer_config(&self, log: &Path, cycle: u64, rng: &mut Rng) -> WriterConfig {
        let mut cfg = WriterConfig::new(
            &self.nodes[self.primary].uri(),
            log,
            HISTORY_BLOCKS,
            Duration::from_secs(3600),
        );
        cfg.queue_depth = 8;
        cfg.flush_every = 32;
        cfg.seed = rng.next_u64() | 1;
        cfg.first_seq = (cycle + 1) << 32;
        cfg
    }

    fn cycle(&mut self, c: u64) -> Result<CycleOutcome, SoakError> {
        let seed = self.cfg.seed;
        let mut rng = Rng::new(seed ^ c.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let start = Instant::now();
        let deadline = start + self.cfg.cycle_deadline;
        let faults: &[Fault] = if self.cfg.faults.is_empty() {
            &Fault::ALL
        } else {
            &self.cfg.faults
        };
        let fault = faults[rng.index(faults.len())];
        let log = self.dir.join(format!("cycle-{c}.log"));
        let wcfg = self.writer_config(&log, c, &mut rng);
        let mut w = RunningWriter::start(wcfg);
        let before = rng.range(100, 1200);
        self.wait_acked(&w, before, deadline, c)?;
        let (p, m) = (self.primary, self.mirror());
        // The primary's reconnections over the cycle (it keeps running,
        // except after kill-primary and promote-failback).
        let reconnects_before = self.nodes[p].metric(RECONNECTS);
        let mode = self.cfg.mode;
        let mut violations = Vec::new();
        let mut note = String::new();
        // After an async promotion the old primary's last acknowledged
        // writes may be gone (the RPO): the final state is only a prefix.
        let mut final_require = Require::Acked;
        let more = rng.range(100, 800);
        let fault_end;
        match fault {
            Fault::KillPrimary => {
                self.nodes[p].kill9();
                let _ = w.stop();
                self.wait_feeder_gone(m, deadline, c)?;
                let req = match mode {
                    Mode::Sync => Require::Acked,
                    Mode::Async => Require::Prefix,
                };
                let (_, v) = self.check(
                    &self.nodes[m].image,
                    &log,
                    req,
                    "mirror after its primary was killed",
                );
                violations.extend(v);
                fault_end = Instant::now();
                self.nodes[p].spawn(deadline, c)?;
            }
            Fault::KillMirror => {
                self.nodes[m].kill9();
                let (_, v) =
                    self.check(&self.nodes[m].image, &log, Require::Prefix, "killed mirror");
                violations.extend(v);
                let now = w.acked();
                self.wait_acked(&w, now + more, deadline, c)?;
                fault_end = Instant::now();
                self.nodes[m].spawn(deadline, c)?;
            }
            Fault::CutLink => {
                self.proxies[m].cut();
                self.wait_feeder_gone(m, deadline, c)?;
                let (_, v) = self.check(
                    &self.nodes[m].image,
                    &log,
                    Require::Prefix,
                    "mirror cut off",
                );
                violations.extend(v);
                let now = w.acked();
                self.wait_acked(&w, now + more, deadline, c)?;
                self.proxies[m].heal();
                fault_end = Instant::now();
            }
            Fault::Net => {
                let f = NetFault::random(&mut rng, 512 << 10, Duration::from_millis(1500));
                note = format!(" ({f})");
                let reconnects = self.nodes[p].metric(RECONNECTS).unwrap_or(0.0);
                let corrupted = self.proxies[m].stats().corrupted.load(Relaxed);
                let proxy = &self.proxies[m];
                proxy.inject(f);
                if matches!(f, NetFault::Stall(_)) {
                    let now = w.acked();
                    self.wait_acked(&w, now + more, deadline, c)?;
                } else {
                    // Until it fires (the writer keeps the link busy).
                    poll(deadline, c, "the network fault to fire", || {
                        Ok((!proxy.armed() || w.finished()).then_some(()))
                    })?;
                    let now = w.acked();
                    self.wait_acked(&w, now + more, deadline, c)?;
                }
                self.proxies[m].clear();
                fault_end = Instant::now();
                // A flipped byte must be caught by the frame checksums (or
                // the handshake's proof): the link drops and reconnects.
                if self.proxies[m].stats().corrupted.load(Relaxed) > corrupted {
                    let now = poll(
                        deadline,
                        c,
                        "the link to reconnect after a corrupted byte",
                        || {
                            let r = self.nodes[p].metric(RECONNECTS).unwrap_or(0.0);
                            Ok((r > reconnects).then_some(r))
                        },
                    );
                    match now {
                        Ok(r) => note += &format!(" reconnects=+{}", r - reconnects),
                        Err(_) => violations.push(format!(
                            "a corrupted byte ({f}) went through without the link noticing"
                        )),
                    }
                }
            }
            Fault::MirrorDisk => {
                let body = format!(
                    "{{\"random\": {{\"seed\": {}, \"eio_ppm\": {}, \"enospc_ppm\": {}, \"spike_ppm\": {}, \"spike_us\": {}}}}}",
                    rng.next_u64() >> 1,
                    rng.range(1_000, 50_000),
                    rng.range(0, 20_000),
                    rng.range(0, 100_000),
                    rng.range(1_000, 50_000)
                );
                note = format!(" ({body})");
                self.nodes[m]
                    .post(&format!("/volumes/{VOLUME}/faults"), &body)
                    .map_err(SoakError::Setup)?;
                let now = w.acked();
                self.wait_acked(&w, now + more, deadline, c)?;
                self.nodes[m]
                    .post(&format!("/volumes/{VOLUME}/faults"), "{}")
                    .map_err(SoakError::Setup)?;
                fault_end = Instant::now();
            }
            Fault::SwitchMode => {
                let other = mode.other().as_str();
                self.nodes[p]
                    .post(
                        &format!("/mode/{VOLUME}"),
                        &format!("{{\"mode\": \"{other}\"}}"),
                    )
                    .map_err(SoakError::Setup)?;
                let now = w.acked();
                self.wait_acked(&w, now + more, deadline, c)?;
                self.nodes[p]
                    .post(
                        &format!("/mode/{VOLUME}"),
                        &format!("{{\"mode\": \"{}\"}}", mode.as_str()),
                    )
                    .map_err(SoakError::Setup)?;
                fault_end = Instant::now();
            }
            Fault::PromoteFailback => {
                self.nodes[p].kill9();
                let _ = w.stop();
                self.wait_feeder_gone(m, deadline, c)?;
                self.nodes[m]
                    .post(&format!("/volumes/{VOLUME}/promote"), "{}")
                    .map_err(SoakError::Setup)?;
                let req = match mode {
                    Mode::Sync => Require::Acked,
                    Mode::Async => Require::Prefix,
                };
                final_require = req;
                let (_, v) = self.check(&self.nodes[m].image, &log, req, "promoted mirror");
                violations.extend(v);
                // The old primary returns with its config unchanged, finds
                // the mirror promoted past it and demotes itself.
                fault_end = Instant::now();
                self.primary = m;
                self.nodes[p].spawn(deadline, c)?;
                self.wait_settled(deadline, c)?;
                // Fail back: a planned switchover to the old primary.
                self.nodes[m]
                    .post(&format!("/volumes/{VOLUME}/demote"), "{}")
                    .map_err(SoakError::Setup)?;
                self.wait_feeder_gone(p, deadline, c)?;
                self.nodes[p]
                    .post(&format!("/volumes/{VOLUME}/promote"), "{}")
                    .map_err(SoakError::Setup)?;
                self.primary = p;
            }
        }
        let ws = if w.handle.is_some() {
            w.stop().ok()
        } else {
            None
        };
        self.wait_settled(deadline, c)?;
        let time_to_in_sync = fault_end.elapsed();
        if let Err(e) = self.flush_primary() {
            violations.push(format!("final flush on the primary: {e}"));
        }
        self.wait_settled(deadline, c)?;
        let (pi, mi) = (self.primary, self.mirror());
        let (checked, v) = self.check(
            &self.nodes[pi].image,
            &log,
            final_require,
            "primary after resync",
        );
        violations.extend(v);
        let (_, v) = self.check(
            &self.nodes[mi].image,
            &log,
            final_require,
            "mirror after resync",
        );
        violations.extend(v);
        match first_difference(&self.nodes[pi].image, &self.nodes[mi].image) {
            Ok(None) => {}
            Ok(Some(off)) => violations.push(format!(
                "images differ after resync, first at byte {off} (block {})",
                off / 4096
            )),
            Err(e) => violations.push(format!("comparing the images: {e}")),
        }
        if Instant::now() > deadline {
            return Err(SoakError::Hang {
                cycle: c,
                seed,
                what: format!("the cycle to end ({} ms)", start.elapsed().as_millis()),
                last: format!("fault {}{note}", fault.name()),
            });
        }
        if !matches!(
            fault,
            Fault::KillPrimary | Fault::PromoteFailback | Fault::Net
        ) {
            if let (Some(a), Some(b)) = (reconnects_before, self.nodes[p].metric(RECONNECTS)) {
                note += &format!(" reconnects=+{}", b - a);
            }
        }
        let line = format!(
            "cycle {c} fault={}{note} acked={} checked={checked} in_sync_ms={} cycle_ms={} {}",
            fault.name(),
            ws.map_or(w.acked(), |s| s.writes_acked),
            time_to_in_sync.as_millis(),
            start.elapsed().as_millis(),
            if violations.is_empty() {
                "ok"
            } else {
                "VIOLATED"
            }
        );
        Ok(CycleOutcome {
            line,
            writes_checked: checked,
            violations,
            time_to_in_sync,
        })
    }
}
