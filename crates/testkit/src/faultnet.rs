//! A fault-injecting TCP proxy: the transport that drops, stalls, corrupts
//! and partitions, for the soak and for tests of the replication link.
//!
//! Every byte is forwarded as it comes (no delay; [`crate::delay`] models a
//! WAN), one thread per direction of each connection. A fault is armed
//! with [`FaultProxy::inject`] and fires at a byte position counted in its
//! direction over all connections, so a seed that picks "after N bytes"
//! picks one exact place in the stream:
//!
//! - [`NetFault::Drop`]: forward `after` more bytes, then shut both sockets
//!   of the connection carrying the next one (a connection lost mid-frame).
//! - [`NetFault::Corrupt`]: XOR one byte, `after` bytes from now, with a
//!   non-zero mask (what the replication protocol's checksums must catch).
//! - [`NetFault::Stall`]: forward nothing, either way, for a time; bytes
//!   are held (TCP back-pressure), not lost.
//! - [`FaultProxy::cut`] and [`FaultProxy::heal`]: a partition (every open
//!   connection is shut, new ones are refused until healed).
//!
//! [`NetFault::random`] draws one of the first three from a
//! [`Rng`](crate::rng::Rng), so a seed replays the same faults. Traffic
//! goes only to the one target address the proxy was given.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::rng::Rng;

/// Bytes per read.
const CHUNK: usize = 64 * 1024;

/// Which way a fault's bytes travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From the connecting side to the target (a primary's frames to its mirror).
    ToTarget,
    /// From the target back (a mirror's acknowledgements).
    ToClient,
}

impl Direction {
    fn index(self) -> usize {
        match self {
            Direction::ToTarget => 0,
            Direction::ToClient => 1,
        }
    }
}

/// One fault to inject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetFault {
    /// Forward `after` more bytes in `dir`, then shut the connection that
    /// carries the next byte.
    Drop { dir: Direction, after: u64 },
    /// XOR the byte `after` bytes from now in `dir` with `mask` (non-zero).
    Corrupt {
        dir: Direction,
        after: u64,
        mask: u8,
    },
    /// Forward nothing, either way, for this long.
    Stall(Duration),
}

impl NetFault {
    /// A fault drawn from `rng`: a drop or a corruption within the next
    /// `max_after` bytes (mostly towards the target, where the write frames
    /// go; within `max_after / 16` on the way back), or a stall of up to
    /// `max_stall`.
    pub fn random(rng: &mut Rng, max_after: u64, max_stall: Duration) -> NetFault {
        let dir = if rng.chance(75) {
            Direction::ToTarget
        } else {
            Direction::ToClient
        };
        // Acknowledgements are small: the way back carries about a
        // sixteenth of the bytes, so its faults are drawn closer.
        let after = match dir {
            Direction::ToTarget => rng.range(0, max_after),
            Direction::ToClient => rng.range(0, max_after / 16),
        };
        match rng.index(3) {
            0 => NetFault::Drop { dir, after },
            1 => NetFault::Corrupt {
                dir,
                after,
                mask: rng.range(1, 255) as u8,
            },
            _ => {
                let ms = max_stall.as_millis().max(1) as u64;
                NetFault::Stall(Duration::from_millis(rng.range(1, ms)))
            }
        }
    }
}

impl std::fmt::Display for NetFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let d = |d: &Direction| match d {
            Direction::ToTarget => "to-target",
            Direction::ToClient => "to-client",
        };
        match self {
            NetFault::Drop { dir, after } => write!(f, "drop {} after {after} B", d(dir)),
            NetFault::Corrupt { dir, after, mask } => {
                write!(f, "corrupt {} byte +{after} ^{mask:#04x}", d(dir))
            }
            NetFault::Stall(t) => write!(f, "stall {}ms", t.as_millis()),
        }
    }
}

/// Counters, for tests and the soak's report.
#[derive(Debug, Default)]
pub struct FaultStats {
    pub connections: AtomicU64,
    /// Bytes forwarded towards the target.
    pub bytes_to_target: AtomicU64,
    /// Bytes forwarded back to clients.
    pub bytes_to_client: AtomicU64,
    /// Connections shut by a [`NetFault::Drop`].
    pub dropped: AtomicU64,
    /// Bytes flipped by a [`NetFault::Corrupt`].
    pub corrupted: AtomicU64,
    /// Stalls that started.
    pub stalls: AtomicU64,
    /// Connections refused while cut.
    pub refused: AtomicU64,
}

/// The armed faults and the byte position of one direction.
#[derive(Debug, Default)]
struct DirState {
    /// Bytes forwarded so far in this direction, all connections together.
    pos: u64,
    drop_at: Option<u64>,
    corrupt_at: Option<(u64, u8)>,
}

struct Conn {
    id: u64,
    client: TcpStream,
    server: TcpStream,
}

struct Inner {
    target: SocketAddr,
    cut: AtomicBool,
    stop: AtomicBool,
    next_id: AtomicU64,
    open: Mutex<Vec<Conn>>,
    dirs: Mutex<[DirState; 2]>,
    /// Until when nothing is forwarded.
    stall: Mutex<Option<Instant>>,
    stall_cv: Condvar,
    stats: FaultStats,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A running proxy; stops (and closes its connections) when dropped.
pub struct FaultProxy {
    addr: SocketAddr,
    inner: Arc<Inner>,
    acceptor: Option<JoinHandle<()>>,
}

impl FaultProxy {
    /// Listens on `listen` (port 0 picks one) and forwards every connection
    /// to `target`.
    pub fn start(listen: SocketAddr, target: SocketAddr) -> io::Result<FaultProxy> {
        let listener = TcpListener::bind(listen)?;
        let addr = listener.local_addr()?;
        let inner = Arc::new(Inner {
            target,
            cut: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            next_id: AtomicU64::new(0),
            open: Mutex::new(Vec::new()),
            dirs: Mutex::new(Default::default()),
            stall: Mutex::new(None),
            stall_cv: Condvar::new(),
            stats: FaultStats::default(),
        });
        let i = inner.clone();
        let acceptor = std::thread::Builder::new()
            .name("fault-proxy".into())
            .spawn(move || accept_loop(listener, i))?;
        Ok(FaultProxy {
            addr,
            inner,
            acceptor: Some(acceptor),
        })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Arms `fault` (replacing an armed fault of the same kind and direction).
    pub fn inject(&self, fault: NetFault) {
        match fault {
            NetFault::Drop { dir, after } => {
                let mut d = lock(&self.inner.dirs);
                let s = &mut d[dir.index()];
                s.drop_at = Some(s.pos + after);
            }
            NetFault::Corrupt { dir, after, mask } => {
                let mut d = lock(&self.inner.dirs);
                let s = &mut d[dir.index()];
                s.corrupt_at = Some((s.pos + after, mask.max(1)));
            }
            NetFault::Stall(t) => {
                *lock(&self.inner.stall) = Some(Instant::now() + t);
                self.inner.stats.stalls.fetch_add(1, Relaxed);
            }
        }
    }

    /// Disarms every fault that has not fired and ends a stall.
    pub fn clear(&self) {
        for s in lock(&self.inner.dirs).iter_mut() {
            s.drop_at = None;
            s.corrupt_at = None;
        }
        *lock(&self.inner.stall) = None;
        self.inner.stall_cv.notify_all();
    }

    /// Whether an armed drop or corruption has not fired yet.
    pub fn armed(&self) -> bool {
        lock(&self.inner.dirs)
            .iter()
            .any(|s| s.drop_at.is_some() || s.corrupt_at.is_some())
    }

    /// Partition: shuts every open connection and refuses new ones.
    pub fn cut(&self) {
        self.inner.cut.store(true, Relaxed);
        self.inner.close_all();
    }

    /// Ends a partition.
    pub fn heal(&self) {
        self.inner.cut.store(false, Relaxed);
    }

    pub fn stats(&self) -> &FaultStats {
        &self.inner.stats
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.inner.stop.store(true, Relaxed);
        self.clear();
        self.inner.close_all();
        // Wake the blocking accept with a connection of our own.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(h) = self.acceptor.take() {
            let _ = h.join();
        }
    }
}

impl Inner {
    fn close_all(&self) {
        for c in lock(&self.open).drain(..) {
            let _ = c.client.shutdown(Shutdown::Both);
            let _ = c.server.shutdown(Shutdown::Both);
        }
    }

    fn close(&self, id: u64) {
        let mut open = lock(&self.open);
        if let Some(i) = open.iter().position(|c| c.id == id) {
            let c = open.swap_remove(i);
            let _ = c.client.shutdown(Shutdown::Both);
            let _ = c.server.shutdown(Shutdown::Both);
        }
    }

    /// Blocks while a stall lasts. The stall's length is the fault being
    /// modelled, not a wait for some state.
    fn wait_stall(&self) {
        let mut g = lock(&self.stall);
        while let Some(until) = *g {
            let now = Instant::now();
            if now >= until || self.stop.load(Relaxed) {
                *g = None;
                break;
            }
            g = self
                .stall_cv
                .wait_timeout(g, until - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

fn accept_loop(listener: TcpListener, inner: Arc<Inner>) {
    for conn in listener.incoming() {
        if inner.stop.load(Relaxed) {
            return;
        }
        let Ok(client) = conn else { continue };
        if inner.cut.load(Relaxed) {
            inner.stats.refused.fetch_add(1, Relaxed);
            let _ = client.shutdown(Shutdown::Both);
            continue;
        }
        let Ok(server) = TcpStream::connect_timeout(&inner.target, Duration::from_secs(5)) else {
            let _ = client.shutdown(Shutdown::Both);
            continue;
        };
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);
        inner.stats.connections.fetch_add(1, Relaxed);
        let id = inner.next_id.fetch_add(1, Relaxed);
        let (Ok(c), Ok(s)) = (client.try_clone(), server.try_clone()) else {
            continue;
        };
        lock(&inner.open).push(Conn {
            id,
            client: c,
            server: s,
        });
        let ended = Arc::new(AtomicU64::new(0));
        for (from, to, dir) in [
            (&client, &server, Direction::ToTarget),
            (&server, &client, Direction::ToClient),
        ] {
            let (Ok(from), Ok(to)) = (from.try_clone(), to.try_clone()) else {
                continue;
            };
            let i = inner.clone();
            let ended = ended.clone();
            let _ = std::thread::Builder::new()
                .name("fault-pipe".into())
                .spawn(move || {
                    pipe(id, from, to, dir, &i);
                    // Both directions ended: forget the connection.
                    if ended.fetch_add(1, Relaxed) == 1 {
                        i.close(id);
                    }
                });
        }
    }
}

/// What one chunk read from a socket turns into.
#[derive(Debug, PartialEq, Eq)]
struct ChunkPlan {
    /// Bytes to forward (a prefix of the chunk).
    send: usize,
    /// Shut the connection after forwarding them.
    drop: bool,
    /// Index and mask of a byte to flip.
    corrupt: Option<(usize, u8)>,
}

/// Accounts a chunk of `n` bytes in one direction: fires the armed faults
/// that fall inside it.
fn plan_chunk(s: &mut DirState, n: usize) -> ChunkPlan {
    let start = s.pos;
    let end = start + n as u64;
    let mut plan = ChunkPlan {
        send: n,
        drop: false,
        corrupt: None,
    };
    if let Some(at) = s.drop_at {
        if at < end {
            plan.send = at.saturating_sub(start) as usize;
            plan.drop = true;
            s.drop_at = None;
        }
    }
    if let Some((at, mask)) = s.corrupt_at {
        if at >= start && at < start + plan.send as u64 {
            plan.corrupt = Some(((at - start) as usize, mask));
            s.corrupt_at = None;
        }
    }
    s.pos += plan.send as u64;
    plan
}

fn pipe(id: u64, mut from: TcpStream, mut to: TcpStream, dir: Direction, inner: &Inner) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        inner.wait_stall();
        let plan = plan_chunk(&mut lock(&inner.dirs)[dir.index()], n);
        if let Some((i, mask)) = plan.corrupt {
            buf[i] ^= mask;
            inner.stats.corrupted.fetch_add(1, Relaxed);
        }
        // Counted before the write, so a reader that saw the bytes sees the count.
        let counter = match dir {
            Direction::ToTarget => &inner.stats.bytes_to_target,
            Direction::ToClient => &inner.stats.bytes_to_client,
        };
        counter.fetch_add(plan.send as u64, Relaxed);
        if to.write_all(&buf[..plan.send]).is_err() {
            break;
        }
        if plan.drop {
            inner.stats.dropped.fetch_add(1, Relaxed);
            inner.close(id);
            return;
        }
    }
    // The other side finished sending: pass the end of stream on.
    let _ = to.shutdown(Shutdown::Write);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// An echo server on loopback; returns its address.
    fn echo() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(mut c) = c else { return };
                std::thread::spawn(move || {
                    let mut r = c.try_clone().unwrap();
                    let _ = io::copy(&mut r, &mut c);
                });
            }
        });
        a
    }

    /// A server that reads each connection to its end and reports what it got.
    fn sink() -> (SocketAddr, mpsc::Receiver<Vec<u8>>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = l.local_addr().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(mut c) = c else { return };
                let tx = tx.clone();
                std::thread::spawn(move || {
                    let mut got = Vec::new();
                    let _ = c.read_to_end(&mut got);
                    let _ = tx.send(got);
                });
            }
        });
        (a, rx)
    }

    fn proxy(target: SocketAddr) -> FaultProxy {
        FaultProxy::start("127.0.0.1:0".parse().unwrap(), target).unwrap()
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + 3) as u8).collect()
    }

    /// Sends `data` through an echo and returns what came back.
    fn echo_round_trip(p: &FaultProxy, data: &[u8]) -> Vec<u8> {
        let mut s = TcpStream::connect(p.addr()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut w = s.try_clone().unwrap();
        let d = data.to_vec();
        let writer = std::thread::spawn(move || w.write_all(&d).unwrap());
        let mut back = vec![0u8; data.len()];
        s.read_exact(&mut back).unwrap();
        writer.join().unwrap();
        back
    }

    #[test]
    fn forwards_unchanged_without_faults() {
        let p = proxy(echo());
        let data = pattern(300_000);
        assert_eq!(echo_round_trip(&p, &data), data);
        assert_eq!(p.stats().bytes_to_target.load(Relaxed), 300_000);
        assert_eq!(p.stats().bytes_to_client.load(Relaxed), 300_000);
        assert_eq!(p.stats().corrupted.load(Relaxed), 0);
    }

    #[test]
    fn corrupts_exactly_one_byte_at_the_chosen_place() {
        let p = proxy(echo());
        let data = pattern(200_000);
        // Position counts from the arming: 1000 bytes go through first.
        assert_eq!(echo_round_trip(&p, &data[..1000]), &data[..1000]);
        p.inject(NetFault::Corrupt {
            dir: Direction::ToTarget,
            after: 150_000,
            mask: 0x5a,
        });
        assert!(p.armed());
        let back = echo_round_trip(&p, &data);
        let diff: Vec<usize> = (0..data.len()).filter(|&i| back[i] != data[i]).collect();
        assert_eq!(diff, vec![150_000]);
        assert_eq!(back[150_000], data[150_000] ^ 0x5a);
        assert_eq!(p.stats().corrupted.load(Relaxed), 1);
        assert!(!p.armed());
        // It fired once: the next stream is clean.
        assert_eq!(echo_round_trip(&p, &data), data);
    }

    #[test]
    fn drop_cuts_the_connection_after_exactly_n_bytes() {
        let (addr, got) = sink();
        let p = proxy(addr);
        p.inject(NetFault::Drop {
            dir: Direction::ToTarget,
            after: 70_001,
        });
        let mut s = TcpStream::connect(p.addr()).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
        // The proxy shuts the connection mid-stream: the client's writes
        // start failing (or are swallowed) and its reads see the end.
        let _ = s.write_all(&pattern(200_000));
        let received = got.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(received, pattern(200_000)[..70_001]);
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut b = [0u8; 1];
        assert!(matches!(s.read(&mut b), Ok(0) | Err(_)));
        assert_eq!(p.stats().dropped.load(Relaxed), 1);
        // New connections are forwarded in full again.
        let mut s = TcpStream::connect(p.addr()).unwrap();
        s.write_all(&pattern(1000)).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let received = got.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(received, pattern(1000));
    }

    #[test]
    fn drop_on_the_way_back() {
        let p = proxy(echo());
        p.inject(NetFault::Drop {
            dir: Direction::ToClient,
            after: 10,
        });
        let mut s = TcpStream::connect(p.addr()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(&pattern(100)).unwrap();
        let mut back = Vec::new();
        let _ = s.read_to_end(&mut back);
        assert_eq!(back, pattern(100)[..10]);
    }

    #[test]
    fn stall_holds_bytes_then_delivers_them() {
        let p = proxy(echo());
        p.inject(NetFault::Stall(Duration::from_millis(300)));
        let t = Instant::now();
        let data = pattern(5000);
        assert_eq!(echo_round_trip(&p, &data), data);
        assert!(
            t.elapsed() >= Duration::from_millis(300),
            "{:?}",
            t.elapsed()
        );
        assert_eq!(p.stats().stalls.load(Relaxed), 1);
        // Cleared early: forwarding resumes at once.
        p.inject(NetFault::Stall(Duration::from_secs(600)));
        let h = {
            let addr = p.addr();
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(addr).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                s.write_all(b"ping").unwrap();
                let mut b = [0u8; 4];
                s.read_exact(&mut b).unwrap();
                b
            })
        };
        // The client is blocked by the stall until it is cleared (poll
        // rather than sleep: the first byte must reach the proxy).
        let deadline = Instant::now() + Duration::from_secs(10);
        while p.stats().connections.load(Relaxed) < 2 {
            assert!(Instant::now() < deadline);
            std::thread::park_timeout(Duration::from_millis(5));
        }
        p.clear();
        assert_eq!(&h.join().unwrap(), b"ping");
    }

    #[test]
    fn cut_shuts_and_refuses_until_healed() {
        let p = proxy(echo());
        let mut s = TcpStream::connect(p.addr()).unwrap();
        s.write_all(b"x").unwrap();
        let mut b = [0u8; 1];
        s.read_exact(&mut b).unwrap();
        p.cut();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = s.write_all(b"y");
        assert!(matches!(s.read(&mut b), Ok(0) | Err(_)));
        let mut s2 = TcpStream::connect(p.addr()).unwrap();
        s2.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert!(matches!(s2.read(&mut b), Ok(0) | Err(_)));
        p.heal();
        assert_eq!(echo_round_trip(&p, b"back"), b"back");
    }

    #[test]
    fn random_faults_replay_from_a_seed() {
        let draw = |seed| {
            let mut r = Rng::new(seed);
            (0..50)
                .map(|_| NetFault::random(&mut r, 1 << 20, Duration::from_secs(2)))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(42), draw(42));
        assert_ne!(draw(42), draw(43));
        let all = draw(42);
        assert!(all.iter().any(|f| matches!(f, NetFault::Drop { .. })));
        assert!(all.iter().any(|f| matches!(f, NetFault::Corrupt { .. })));
        assert!(all.iter().any(|f| matches!(f, NetFault::Stall(_))));
        for f in all {
            match f {
                NetFault::Drop { after, .. } => assert!(after <= 1 << 20),
                NetFault::Corrupt { after, mask, .. } => assert!(after <= 1 << 20 && mask != 0),
                NetFault::Stall(t) => assert!(t <= Duration::from_secs(2) && !t.is_zero()),
            }
        }
    }

    #[test]
    fn chunk_accounting_fires_faults_at_their_byte() {
        let mut s = DirState {
            pos: 100,
            drop_at: Some(150),
            corrupt_at: Some((120, 1)),
        };
        assert_eq!(
            plan_chunk(&mut s, 30),
            ChunkPlan {
                send: 30,
                drop: false,
                corrupt: Some((20, 1))
            }
        );
        // The drop falls inside the next chunk: only the bytes before it go.
        assert_eq!(
            plan_chunk(&mut s, 100),
            ChunkPlan {
                send: 20,
                drop: true,
                corrupt: None
            }
        );
        assert_eq!(s.pos, 150);
        // A corruption past a drop stays armed for a later connection.
        s.drop_at = Some(150);
        s.corrupt_at = Some((155, 2));
        assert_eq!(
            plan_chunk(&mut s, 10),
            ChunkPlan {
                send: 0,
                drop: true,
                corrupt: None
            }
        );
        assert_eq!(s.corrupt_at, Some((155, 2)));
    }
}
