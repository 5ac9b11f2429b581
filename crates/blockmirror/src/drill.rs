//! `blockmirror demo --drill`: a disaster drill an operator runs and
//! watches (seed 004's "a failed primary promotes a mirror", end to end).
//!
//! Two real node processes (`blockmirror serve`) on loopback, site A the
//! primary and site B its synchronous mirror, configured symmetrically (each
//! lists the other as its mirror, used whenever it is the primary):
//!
//! 1. data is written to A and checksummed;
//! 2. A is killed (SIGKILL: no clean shutdown, writes may be in flight);
//! 3. B is promoted, and the first host write on B is acknowledged: the RTO
//!    is the time from A's loss to that acknowledgement;
//! 4. B's data is checked against the checksums, and more is written on B
//!    while A is away;
//! 5. A restarts, finds B promoted past it, demotes itself and reports the
//!    regions it may hold that B lacks; B copies only those and what it
//!    wrote meanwhile (failback without a full copy);
//! 6. both images are checksummed whole and must be equal.
//!
//! Each step is printed with its time; the drill exits 0 only if every
//! check passed.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use blockmirror_nbd::proto;
use blockmirror_node::daemon::admin;
use blockmirror_node::daemon::status::{human_bytes, NodeStatus};
use blockmirror_testkit::nbd::{self as client, Uri};
use bytes::BytesMut;

use crate::free_port;

/// Written to A before the disaster (capped by the volume size).
const PHASE1_BYTES: u64 = 64 << 20;
/// Written on B while A is away: this many scattered 64 KiB writes.
const APART_WRITES: u64 = 128;
const APART_WRITE_LEN: u64 = 64 << 10;
/// How long any one step may take before the drill gives up.
const STEP_TIMEOUT: Duration = Duration::from_secs(120);

/// One node process of the drill.
struct Site {
    name: &'static str,
    config: PathBuf,
    log: PathBuf,
    admin: SocketAddr,
    uri: String,
    child: Option<Child>,
}

impl Site {
    fn start(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("opening {}", self.log.display()))?;
        let exe = std::env::current_exe().context("finding the blockmirror binary")?;
        let child = Command::new(exe)
            .arg("serve")
            .arg("--config")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting site {}", self.name))?;
        self.child = Some(child);
        Ok(())
    }

    /// SIGKILL: the site is lost, nothing is shut down cleanly.
    fn kill(&mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            c.kill().context("killing the primary")?;
            c.wait()?;
        }
        Ok(())
    }

    /// SIGTERM and wait: a clean stop.
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let pid = rustix::process::Pid::from_child(&c);
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    async fn status(&self) -> Option<NodeStatus> {
        admin::fetch_status(self.admin).await.ok()
    }

    /// A counter of this site's /metrics, summed over labels.
    async fn metric(&self, name: &str) -> f64 {
        let text = admin::fetch_metrics(self.admin).await.unwrap_or_default();
        text.lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Prints a step with the time since the drill started.
struct Clock(Instant);

impl Clock {
    fn step(&self, what: &str) {
        println!("[{:>8.3} s] {what}", self.0.elapsed().as_secs_f64());
    }
}

/// Polls `f` every 20 ms until it gives Some, or fails after [`STEP_TIMEOUT`].
async fn wait_for<T, F, Fut>(what: &str, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {STEP_TIMEOUT:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The bytes the drill writes at `offset`: a pattern that differs per 4 KiB
/// block and per `round`, so a block in the wrong place or from the wrong
/// round changes the checksum.
fn pattern(offset: u64, len: usize, round: u64) -> Vec<u8> {
    let mut out = vec![0u8; len];
    for (i, chunk) in out.chunks_mut(4096).enumerate() {
        let mut x = (offset / 4096 + i as u64) ^ round.rotate_left(32) ^ 0x9E37_79B9_7F4A_7C15;
        for b in chunk.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b.copy_from_slice(&x.to_le_bytes()[..b.len()]);
        }
    }
    out
}

/// A blocking NBD session (the drill's host).
struct Host {
    conn: client::Connection,
    cookie: u64,
}

impl Host {
    fn open(uri: &str) -> Result<Host> {
        let conn = client::connect(&Uri::parse(uri)?)?;
        Ok(Host { conn, cookie: 1 })
    }

    fn call(&mut self, kind: u16, offset: u64, len: u32, data: &[u8]) -> Result<()> {
        use std::io::Write;
        let mut out = BytesMut::new();
        self.cookie += 1;
        client::request(kind, 0, self.cookie, offset, len, &mut out);
        out.extend_from_slice(data);
        self.conn.stream.write_all(&out)?;
        let (err, cookie) = client::read_simple_reply(&mut self.conn.stream)?;
        if cookie != self.cookie {
            bail!("reply for cookie {cookie}, expected {}", self.cookie);
        }
        if err != 0 {
            bail!("NBD error {err} at offset {offset}");
        }
        Ok(())
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        self.call(proto::CMD_WRITE, offset, data.len() as u32, data)
    }

    fn flush(&mut self) -> Result<()> {
        self.call(proto::CMD_FLUSH, 0, 0, &[])
    }

    fn read(&mut self, offset: u64, len: usize) -> Result<Vec<u8>> {
        use std::io::Read;
        self.call(proto::CMD_READ, offset, len as u32, &[])?;
        let mut buf = vec![0u8; len];
        self.conn.stream.read_exact(&mut buf)?;
        Ok(buf)
    }

    /// BLAKE3 of `[offset, offset + len)`, read in 1 MiB requests.
    fn checksum(&mut self, offset: u64, len: u64) -> Result<blake3::Hash> {
        let mut h = blake3::Hasher::new();
        let mut at = offset;
        while at < offset + len {
            let n = (offset + len - at).min(1 << 20) as usize;
            h.update(&self.read(at, n)?);
            at += n as u64;
        }
        Ok(h.finalize())
    }
}

/// Runs a blocking host session off the runtime.
async fn host<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await?
}

fn site_config(
    node: &str,
    role: &str,
    listen: u16,
    admin: u16,
    nbd: u16,
    peer_listen: u16,
    size: &str,
) -> String {
    format!(
        r#"# blockmirror drill: site {node}. Each site lists the other as its mirror;
# the table is used whenever this site is the primary.
node = "{node}"
listen = "127.0.0.1:{listen}"
admin = "127.0.0.1:{admin}"
secret_file = "secret.key"

[[volume]]
name = "drill"
path = "{node}/drill.img"
size = "{size}"
role = "{role}"
nbd = "127.0.0.1:{nbd}"
mirror_timeout = "2s"

[[volume.mirror]]
peer = "127.0.0.1:{peer_listen}"
mode = "sync"
"#
    )
}

/// Runs the drill in `dir` (emptied first) with a volume of `size`.
/// Returns whether every check passed.
pub async fn run(dir: &Path, size_text: &str, size: u64) -> Result<bool> {
    if size < 16 << 20 {
        bail!("--size: the drill needs at least 16MiB");
    }
    let dir = dir.join("drill");
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir)?;
    let dir = dir.canonicalize()?;
    let mut key = [0u8; 32];
    getrandom::fill(&mut key).map_err(|e| anyhow::anyhow!("random secret: {e}"))?;
    let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    std::fs::write(dir.join("secret.key"), hex + "\n")?;
    let ports = |base| free_port(base);
    let (a_listen, a_admin, a_nbd) = (ports(7711)?, ports(7791)?, ports(10819)?);
    let (b_listen, b_admin, b_nbd) = (ports(7712)?, ports(7792)?, ports(10820)?);
    let site = |name: &'static str, role, l, a, n, peer| -> Result<Site> {
        let config = dir.join(format!("{name}.toml"));
        std::fs::write(&config, site_config(name, role, l, a, n, peer, size_text))?;
        Ok(Site {
            name,
            config,
            log: dir.join(format!("{name}.log")),
            admin: SocketAddr::from(([127, 0, 0, 1], a)),
            uri: format!("nbd://127.0.0.1:{n}/drill"),
            child: None,
        })
    };
    let mut a = site("site-a", "primary", a_listen, a_admin, a_nbd, b_listen)?;
    let mut b = site("site-b", "mirror", b_listen, b_admin, b_nbd, a_listen)?;
    let clock = Clock(Instant::now());
    println!(
        "blockmirror disaster drill: site A (primary) mirrored synchronously to site B, {} volume, in {}",
        human_bytes(size),
        dir.display()
    );
    println!("  logs: {}  {}", a.log.display(), b.log.display());
    let mut ok = true;
    let mut check = |what: &str, pass: bool| {
        println!("             {} {what}", if pass { "ok  " } else { "FAIL" });
        ok &= pass;
    };

    // 0. Both sites up, the mirror in sync.
    b.start()?;
    a.start()?;
    clock.step("sites started; waiting for B to be in sync with A");
    wait_for("B in sync with A", || async {
        let st = a.status().await?;
        let l = st.volumes.first()?.mirrors.first()?.clone();
        (l.connection == "connected" && l.state == "in_sync" && l.out_of_sync_bytes == 0)
            .then_some(())
    })
    .await?;
    clock.step("B is in sync");

    // 1. Data on A.
    let phase1 = PHASE1_BYTES.min(size / 2);
    let uri = a.uri.clone();
    let sum1 = host(move || {
        let mut h = Host::open(&uri)?;
        let mut at = 0;
        while at < phase1 {
            h.write(at, &pattern(at, 1 << 20, 1))?;
            at += 1 << 20;
        }
        h.flush()?;
        h.checksum(0, phase1)
    })
    .await?;
    clock.step(&format!(
        "wrote {} to A (1 MiB writes, acknowledged by both sites); checksum {}",
        human_bytes(phase1),
        &sum1.to_hex()[..16]
    ));

    // 2. Site A is lost.
    let lost = Instant::now();
    a.kill()?;
    clock.step("site A killed (SIGKILL)");
    wait_for("B to see its primary gone", || async {
        let st = b.status().await?;
        st.volumes.first()?.primary.is_none().then_some(())
    })
    .await?;
    let detected = lost.elapsed();
    clock.step(&format!(
        "B noticed the loss after {} ms",
        detected.as_millis()
    ));

    // 3. Promote B; the first host write on B.
    let msg = admin::post_control(
        b.admin,
        "/volumes/drill/promote",
        &admin::PromoteRequest::default(),
    )
    .await
    .context("promoting B")?;
    let promoted = lost.elapsed();
    clock.step(&format!("promote B: {msg}"));
    let uri = b.uri.clone();
    host(move || {
        let mut h = Host::open(&uri)?;
        h.write(size - 4096, &pattern(size - 4096, 4096, 2))
    })
    .await
    .context("first host write on B")?;
    let rto = lost.elapsed();
    clock.step(&format!(
        "first host write acknowledged by B: RTO {:.1} ms (loss noticed {} ms, promoted {} ms)",
        rto.as_secs_f64() * 1e3,
        detected.as_millis(),
        promoted.as_millis()
    ));

    // 4. Check B's data, write more while A is away.
    let uri = b.uri.clone();
    let sum_b = host(move || Host::open(&uri)?.checksum(0, phase1)).await?;
    check(
        "B holds every byte written to A before the loss",
        sum_b == sum1,
    );
    let uri = b.uri.clone();
    let apart = host(move || {
        let mut h = Host::open(&uri)?;
        let slots = (size - (1 << 20)) / APART_WRITE_LEN;
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        for _ in 0..APART_WRITES {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let at = (x % slots) * APART_WRITE_LEN;
            h.write(at, &pattern(at, APART_WRITE_LEN as usize, 3))?;
        }
        h.flush()?;
        Ok(APART_WRITES * APART_WRITE_LEN + 4096)
    })
    .await?;
    clock.step(&format!(
        "wrote {} on B while A is away ({APART_WRITES} scattered 64 KiB writes)",
        human_bytes(apart)
    ));

    // 5. A returns, becomes B's mirror, resyncs what differs.
    let back = Instant::now();
    a.start()?;
    clock.step("site A restarted (its config still says primary)");
    wait_for("A to demote itself", || async {
        let st = a.status().await?;
        (st.volumes.first()?.role == "mirror").then_some(())
    })
    .await?;
    clock.step("A found B promoted past it and demoted itself: a read-only mirror of B");
    wait_for("B's link to A in sync", || async {
        let st = b.status().await?;
        let l = st.volumes.first()?.mirrors.first()?.clone();
        (l.connection == "connected" && l.state == "in_sync" && l.out_of_sync_bytes == 0)
            .then_some(())
    })
    .await?;
    let failback = back.elapsed();
    let copied = b.metric("blockmirror_resync_bytes_total").await as u64;
    let skipped = b.metric("blockmirror_resync_skipped_bytes_total").await as u64;
    let reported = b.metric("blockmirror_resync_divergent_bytes_total").await as u64;
    clock.step(&format!(
        "failback done in {:.2} s: A reported {} it may hold that B lacks; B sent {} (and found {} already equal by checksum)",
        failback.as_secs_f64(),
        human_bytes(reported),
        human_bytes(copied),
        human_bytes(skipped)
    ));

    // 6. Both images whole.
    let (ua, ub) = (a.uri.clone(), b.uri.clone());
    let (ha, hb) = host(move || {
        let ha = Host::open(&ua)?.checksum(0, size)?;
        let hb = Host::open(&ub)?.checksum(0, size)?;
        Ok((ha, hb))
    })
    .await?;
    clock.step(&format!(
        "checksummed both volumes whole: A {} B {}",
        &ha.to_hex()[..16],
        &hb.to_hex()[..16]
    ));
    check("A and B are identical after the failback", ha == hb);
    check(
        &format!(
            "the failback sent less than the volume ({} of {})",
            human_bytes(copied),
            human_bytes(size)
        ),
        copied < size,
    );
    let st = a.status().await;
    check(
        "A is B's mirror, in sync",
        st.is_some_and(|s| {
            s.volumes
                .first()
                .is_some_and(|v| v.role == "mirror" && v.state.as_deref() == Some("in_sync"))
        }),
    );
    println!();
    println!(
        "  RTO (loss of A to the first write acknowledged by B): {:.1} ms",
        rto.as_secs_f64() * 1e3
    );
    println!(
        "  failback: {} written on B while apart, {} reported by A, {} sent ({:.1}% of the volume)",
        human_bytes(apart),
        human_bytes(reported),
        human_bytes(copied),
        copied as f64 * 100.0 / size as f64
    );
    println!("  result: {}", if ok { "PASS" } else { "FAIL" });
    // One line for scripts (bench/drill.py).
    println!(
        "drill-summary ok={ok} rto_ms={:.3} detect_ms={} promote_ms={} failback_s={:.3} size_bytes={size} apart_bytes={apart} reported_bytes={reported} sent_bytes={copied} equal_bytes={skipped}",
        rto.as_secs_f64() * 1e3,
        detected.as_millis(),
        promoted.as_millis(),
        failback.as_secs_f64()
    );
    b.stop();
    a.stop();
    Ok(ok)
}
