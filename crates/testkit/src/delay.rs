//! A WAN stand-in for tests and benchmarks: a TCP proxy that adds one-way
//! delay and limits bandwidth, since this kernel has no netem.
//!
//! Each direction of each proxied connection is a pipe with its own clock:
//!
//! - bytes read at time `t` finish "serialising" at
//!   `max(t, previous finish) + len / rate` (no rate: at `t`), and
//! - are written to the other side `delay` after that.
//!
//! So a stream sees the propagation delay once per direction and a steady
//! throughput of `rate`, as over a real link with that bandwidth and latency.
//! What sits in the pipe is bounded ([`PIPE_CHUNKS`] reads of at most
//! [`CHUNK`] bytes): beyond that the proxy stops reading, and TCP's own
//! back-pressure reaches the sender, as a router's queue would.
//!
//! Delay and rate can be changed while connections are open (new reads use
//! the new values); [`DelayProxy::cut`] resets every connection and refuses
//! new ones until [`DelayProxy::heal`] (a partition). Traffic goes only to
//! the one target address the proxy was given.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Bytes per read.
pub const CHUNK: usize = 64 * 1024;
/// Reads that may be in one direction's pipe at once (4 MiB).
pub const PIPE_CHUNKS: usize = 64;

/// The link's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Shape {
    /// One-way delay added to every byte.
    pub delay: Duration,
    /// Bytes per second in each direction; None is unlimited.
    pub rate: Option<u64>,
}

/// Counters, for tests.
#[derive(Debug, Default)]
pub struct ProxyStats {
    pub connections: AtomicU64,
    /// Bytes delivered, both directions together.
    pub bytes: AtomicU64,
    /// Connections refused while cut.
    pub refused: AtomicU64,
}

struct Inner {
    target: SocketAddr,
    shape: Mutex<Shape>,
    cut: AtomicBool,
    stop: AtomicBool,
    /// Both ends of every open connection, to reset them on a cut.
    open: Mutex<Vec<(TcpStream, TcpStream)>>,
    stats: ProxyStats,
}

/// A running proxy; stops (and closes its connections) when dropped.
pub struct DelayProxy {
    addr: SocketAddr,
    inner: Arc<Inner>,
    acceptor: Option<JoinHandle<()>>,
}

impl DelayProxy {
    /// Listens on `listen` (port 0 picks one) and forwards every connection
    /// to `target` through a pipe of the given shape.
    pub fn start(listen: SocketAddr, target: SocketAddr, shape: Shape) -> io::Result<DelayProxy> {
        let listener = TcpListener::bind(listen)?;
        let addr = listener.local_addr()?;
        let inner = Arc::new(Inner {
            target,
            shape: Mutex::new(shape),
            cut: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            open: Mutex::new(Vec::new()),
            stats: ProxyStats::default(),
        });
        let i = inner.clone();
        let acceptor = std::thread::Builder::new()
            .name("delay-proxy".into())
            .spawn(move || accept_loop(listener, i))?;
        Ok(DelayProxy {
            addr,
            inner,
            acceptor: Some(acceptor),
        })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn shape(&self) -> Shape {
        *self.inner.shape.lock().expect("poisoned")
    }

    /// Changes delay and rate; bytes read from now on use the new shape.
    pub fn set_shape(&self, shape: Shape) {
        *self.inner.shape.lock().expect("poisoned") = shape;
    }

    /// Partition: resets every open connection and refuses new ones.
    pub fn cut(&self) {
        self.inner.cut.store(true, Relaxed);
        self.inner.close_all();
    }

    /// Ends a partition: new connections are forwarded again.
    pub fn heal(&self) {
        self.inner.cut.store(false, Relaxed);
    }

    pub fn stats(&self) -> &ProxyStats {
        &self.inner.stats
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        self.inner.stop.store(true, Relaxed);
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
        for (a, b) in self.open.lock().expect("poisoned").drain(..) {
            let _ = a.shutdown(Shutdown::Both);
            let _ = b.shutdown(Shutdown::Both);
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
        if let (Ok(c), Ok(s)) = (client.try_clone(), server.try_clone()) {
            inner.open.lock().expect("poisoned").push((c, s));
        }
        for (from, to) in [(&client, &server), (&server, &client)] {
            let (Ok(from), Ok(to)) = (from.try_clone(), to.try_clone()) else {
                continue;
            };
            let i = inner.clone();
            let _ = std::thread::Builder::new()
                .name("delay-pipe".into())
                .spawn(move || pipe(from, to, &i));
        }
    }
}

/// One direction: a reader that timestamps chunks, a writer that delivers
/// each at its time.
fn pipe(from: TcpStream, to: TcpStream, inner: &Arc<Inner>) {
    let (tx, rx) = sync_channel::<(Instant, Vec<u8>)>(PIPE_CHUNKS);
    let i = inner.clone();
    let writer = std::thread::Builder::new()
        .name("delay-out".into())
        .spawn(move || deliver(rx, to, &i));
    read_side(from, tx, inner);
    if let Ok(w) = writer {
        let _ = w.join();
    }
}

fn read_side(mut from: TcpStream, tx: SyncSender<(Instant, Vec<u8>)>, inner: &Inner) {
    let mut line_free = Instant::now();
    // One read buffer; each chunk is copied out at its own length (a fresh
    // zeroed 64 KiB per read cost more CPU than the forwarding itself).
    let mut scratch = vec![0u8; CHUNK];
    loop {
        let n = match from.read(&mut scratch) {
            Ok(0) | Err(_) => return, // dropping tx ends the writer after the queue
            Ok(n) => n,
        };
        let buf = scratch[..n].to_vec();
        let shape = *inner.shape.lock().expect("poisoned");
        let now = Instant::now();
        let sent = match shape.rate {
            Some(rate) if rate > 0 => {
                let start = line_free.max(now);
                line_free = start + Duration::from_secs_f64(n as f64 / rate as f64);
                line_free
            }
            _ => now,
        };
        if tx.send((sent + shape.delay, buf)).is_err() {
            return;
        }
    }
}

fn deliver(rx: Receiver<(Instant, Vec<u8>)>, mut to: TcpStream, inner: &Inner) {
    while let Ok((at, buf)) = rx.recv() {
        let now = Instant::now();
        if at > now {
            // The pipe's clock: this is the delay being modelled, not a
            // wait for some state.
            std::thread::sleep(at - now);
        }
        if to.write_all(&buf).is_err() {
            return;
        }
        inner.stats.bytes.fetch_add(buf.len() as u64, Relaxed);
    }
    // The other side finished sending: pass the end of stream on.
    let _ = to.shutdown(Shutdown::Write);
}

/// Parses "5ms", "1.5s", "200us", "0".
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let (num, unit) = s
        .find(|c: char| c.is_ascii_alphabetic())
        .map(|i| s.split_at(i))
        .ok_or_else(|| format!("{s:?}: a unit is needed (us, ms or s)"))?;
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a duration"))?;
    let secs = match unit {
        "us" => v / 1e6,
        "ms" => v / 1e3,
        "s" => v,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (us, ms or s)")),
    };
    if !(secs.is_finite() && secs >= 0.0) {
        return Err(format!("{s:?} is not a duration"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Parses a rate: "100MiB" or "12.5MB" per second, or a bare number of bytes.
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let s = s.trim().trim_end_matches("/s");
    let split = s.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a rate (e.g. 100MiB)"))?;
    let mult = match unit {
        "" | "B" => 1.0,
        "KiB" => 1024.0,
        "MiB" => 1024.0 * 1024.0,
        "GiB" => 1024.0 * 1024.0 * 1024.0,
        "KB" | "kB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        _ => return Err(format!("{s:?}: unknown unit {unit:?}")),
    };
    let r = v * mult;
    if !(r.is_finite() && r >= 1.0) {
        return Err(format!("{s:?} is not a positive rate"));
    }
    Ok(r as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

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

    fn round_trip(addr: SocketAddr, len: usize) -> Duration {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_nodelay(true).unwrap();
        let data = vec![7u8; len];
        let t = Instant::now();
        let mut w = s.try_clone().unwrap();
        let writer = std::thread::spawn(move || w.write_all(&data).unwrap());
        let mut back = vec![0u8; len];
        s.read_exact(&mut back).unwrap();
        writer.join().unwrap();
        assert!(back.iter().all(|&b| b == 7));
        t.elapsed()
    }

    #[test]
    fn adds_the_delay_each_way() {
        let shape = Shape {
            delay: Duration::from_millis(20),
            rate: None,
        };
        let p = DelayProxy::start("127.0.0.1:0".parse().unwrap(), echo(), shape).unwrap();
        let rtt = round_trip(p.addr(), 100);
        assert!(rtt >= Duration::from_millis(40), "rtt {rtt:?}");
        assert!(rtt < Duration::from_millis(1000), "rtt {rtt:?}");
        // Changed while running: the new delay applies.
        p.set_shape(Shape {
            delay: Duration::ZERO,
            rate: None,
        });
        let rtt = round_trip(p.addr(), 100);
        assert!(rtt < Duration::from_millis(40), "rtt {rtt:?}");
    }

    #[test]
    fn limits_the_rate() {
        // 1 MiB through 4 MiB/s each way (echo: the way back is pipelined
        // with the way out): about a quarter of a second, at least.
        let shape = Shape {
            delay: Duration::ZERO,
            rate: Some(4 << 20),
        };
        let p = DelayProxy::start("127.0.0.1:0".parse().unwrap(), echo(), shape).unwrap();
        let t = round_trip(p.addr(), 1 << 20);
        assert!(t >= Duration::from_millis(240), "took {t:?}");
        // The proxy counts a chunk after passing it on: the echo can be
        // back before the count of its last chunk.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while p.stats().bytes.load(Relaxed) != 2 << 20 {
            assert!(
                std::time::Instant::now() < deadline,
                "counted {} bytes",
                p.stats().bytes.load(Relaxed)
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn cut_resets_and_refuses_until_healed() {
        let p =
            DelayProxy::start("127.0.0.1:0".parse().unwrap(), echo(), Shape::default()).unwrap();
        let mut s = TcpStream::connect(p.addr()).unwrap();
        s.write_all(b"x").unwrap();
        let mut b = [0u8; 1];
        s.read_exact(&mut b).unwrap();
        p.cut();
        // The open connection ends (reset or EOF), it does not hang.
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = s.write_all(b"y");
        let r = s.read(&mut b);
        assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
        // A new one is closed at once.
        let mut s2 = TcpStream::connect(p.addr()).unwrap();
        s2.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let r = s2.read(&mut b);
        assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
        p.heal();
        assert!(round_trip(p.addr(), 10) < Duration::from_secs(5));
    }

    #[test]
    fn parses_durations_and_rates() {
        assert_eq!(parse_duration("5ms").unwrap(), Duration::from_millis(5));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("200us").unwrap(), Duration::from_micros(200));
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("5h").is_err());
        assert!(parse_duration("-1ms").is_err());
        assert_eq!(parse_rate("100MiB").unwrap(), 100 << 20);
        assert_eq!(parse_rate("12.5MB/s").unwrap(), 12_500_000);
        assert_eq!(parse_rate("4096").unwrap(), 4096);
        assert!(parse_rate("0").is_err());
        assert!(parse_rate("fast").is_err());
    }
}
