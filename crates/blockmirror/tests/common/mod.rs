//! Test harness: starts `blockmirror serve` as a real process and drives it
//! with real NBD clients. Waits poll a condition with a deadline; no sleeps.

#![allow(dead_code)]

pub mod kill;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_blockmirror");

/// A loopback port that was free a moment ago, and never one this test
/// process handed out before (the kernel may give the same ephemeral port
/// to two binds in a row once the first is closed).
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut given = GIVEN.lock().unwrap();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// Polls `f` until it returns Some, or panics after `timeout` naming `what`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(5);
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::park_timeout(pause);
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// Fails the test with a clear message when a client tool is missing.
pub fn require_tool(tool: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "{tool} is not installed: run scripts/install-deps.sh (it installs qemu-utils, libnbd-bin, nbdkit, fio)"
    );
}

/// Runs a command, returning its output; panics with stderr if it cannot start.
pub fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// Runs `qemu-io -f raw -c CMD ... URI`.
pub fn qemu_io(uri: &str, cmds: &[&str]) -> Output {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    run(c.arg(uri))
}

/// [`qemu_io`] that must succeed, every command included (qemu-io exits 0
/// after a failed command, saying "failed").
pub fn qemu_io_ok(uri: &str, cmds: &[&str]) {
    let out = qemu_io(uri, cmds);
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !text.contains("failed"),
        "qemu-io {cmds:?} on {uri}: {text}"
    );
}

/// Runs the `blockmirror` binary with `args`.
pub fn cli(args: &[&str]) -> Output {
    run(Command::new(BIN).args(args))
}

/// Runs a command that must succeed; returns stdout.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed with {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A minimal HTTP/1.1 GET; returns (status code, body).
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
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

/// A minimal HTTP/1.1 request with extra header lines (e.g.
/// `Authorization: Bearer X`) and a body; returns (status code, body).
pub fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[&str],
    body: &str,
) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for h in headers {
        req += h;
        req += "\r\n";
    }
    req += &format!("Content-Length: {}\r\n\r\n{body}", body.len());
    s.write_all(req.as_bytes())?;
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

/// A POST with an empty body.
pub fn http_post(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    http_request(addr, "POST", path, &[], "")
}

/// One volume of a test node.
pub struct VolumeSpec {
    pub name: String,
    pub size: u64,
    pub extra: String,
    /// Serve over a Unix socket instead of TCP.
    pub unix: bool,
}

impl VolumeSpec {
    pub fn new(name: &str, size: u64) -> Self {
        Self {
            name: name.into(),
            size,
            extra: String::new(),
            unix: false,
        }
    }
}

/// A `blockmirror serve` process with its own directory.
pub struct TestNode {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub admin: SocketAddr,
    pub uris: Vec<String>,
    pub images: Vec<PathBuf>,
    /// A command the node is started under (e.g. `ip netns exec NS`); empty: none.
    pub launcher: Vec<String>,
    /// The admin port speaks HTTPS: readiness is the "node running" log
    /// line, not a plain-HTTP answer.
    pub https: bool,
    child: Option<Child>,
}

impl TestNode {
    pub fn start(volumes: &[VolumeSpec]) -> TestNode {
        let dir = tempfile::tempdir().unwrap();
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut text = format!("node = \"test\"\nadmin = \"{admin}\"\n");
        let mut uris = Vec::new();
        let mut images = Vec::new();
        for v in volumes {
            let (nbd, uri) = if v.unix {
                let sock = dir.path().join(format!("{}.sock", v.name));
                (
                    format!("unix:{}", sock.display()),
                    format!("nbd+unix:///{}?socket={}", v.name, sock.display()),
                )
            } else {
                let port = free_port();
                (
                    format!("127.0.0.1:{port}"),
                    format!("nbd://127.0.0.1:{port}/{}", v.name),
                )
            };
            let img = dir.path().join(format!("{}.img", v.name));
            text += &format!(
                "\n[[volume]]\nname = \"{}\"\npath = \"{}\"\nsize = {}\nrole = \"primary\"\nnbd = \"{nbd}\"\n{}\n",
                v.name,
                img.display(),
                v.size,
                v.extra
            );
            uris.push(uri);
            images.push(img);
        }
        let config = dir.path().join("node.toml");
        std::fs::write(&config, text).unwrap();
        let mut node = TestNode {
            dir,
            config,
            admin,
            uris,
            images,
            launcher: Vec::new(),
            https: false,
            child: None,
        };
        node.spawn();
        node
    }

    /// Starts the process (again) and waits until its admin server answers.
    pub fn spawn(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("node.log")).unwrap();
        let mut cmd = match self.launcher.split_first() {
            Some((prog, args)) => {
                let mut c = Command::new(prog);
                c.args(args).arg(BIN);
                c
            }
            None => Command::new(BIN),
        };
        let child = cmd
            .args(["serve", "--config"])
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start blockmirror serve");
        self.child = Some(child);
        let admin = self.admin;
        wait_for("the node's admin server", Duration::from_secs(30), || {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("blockmirror serve exited early ({st}):\n{}", self.log());
            }
            if self.https {
                return self.log().contains("node running").then_some(());
            }
            // 401: up, with `[admin_auth] open_reads = false`.
            match http_get(admin, "/status") {
                Ok((200 | 401, _)) => Some(()),
                _ => None,
            }
        });
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("node.log")).unwrap_or_default()
    }

    pub fn uri(&self) -> &str {
        &self.uris[0]
    }

    pub fn image(&self) -> &Path {
        &self.images[0]
    }

    pub fn status_json(&self) -> serde_json::Value {
        let (code, body) = http_get(self.admin, "/status").unwrap();
        assert_eq!(code, 200);
        serde_json::from_str(&body).unwrap()
    }

    pub fn metrics(&self) -> String {
        let (code, body) = http_get(self.admin, "/metrics").unwrap();
        assert_eq!(code, 200);
        body
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Sends `signal` and waits for the process to exit.
    pub fn stop_with(&mut self, signal: &str) -> ExitStatus {
        let mut child = self.child.take().expect("node running");
        let _ = Command::new("kill")
            .args([format!("-{signal}"), child.id().to_string()])
            .status();
        wait_for("the node to exit", Duration::from_secs(30), || {
            child.try_wait().unwrap()
        })
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A file of `len` pseudo-random bytes (deterministic for `seed`).
pub fn random_file(path: &Path, len: usize, seed: u64) {
    let mut x = seed | 1;
    let mut data = vec![0u8; len];
    for chunk in data.chunks_mut(8) {
        // xorshift64
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
    std::fs::write(path, data).unwrap();
}

// ---------------------------------------------------------------------------
// Mirrored pairs: a mirror node and a primary node that replicates to it.

/// The volume name every pair uses (also its NBD export name).
pub const PAIR_VOLUME: &str = "vol";

/// Sums every sample of metric `name` (any labels) in a Prometheus text body;
/// None when there is no such sample.
pub fn metric(body: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in body.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        if !(rest.starts_with('{') || rest.starts_with(' ')) {
            continue;
        }
        let v: f64 = rest
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("unparsable sample: {line}"));
        *found.get_or_insert(0.0) += v;
    }
    found
}

/// A secret of 64 hex characters, different on every call.
pub fn new_secret() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let mut x = t ^ (u64::from(std::process::id()) << 32) ^ N.fetch_add(1, Ordering::Relaxed);
    (0..8)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            format!("{:08x}", x as u32)
        })
        .collect()
}

/// Builds a [`Pair`]: options first, then [`PairBuilder::start`].
pub struct PairBuilder {
    size: u64,
    primary_volume_extra: String,
    mirror_volume_extra: String,
    mirror_node_extra: String,
    primary_node_extra: String,
    mirror_table: String,
    delay: Option<blockmirror_testkit::delay::Shape>,
    faults: bool,
    wrong_secret: bool,
    /// Which nodes get no `secret_file` (TLS alone): (primary, mirror).
    no_secret: (bool, bool),
    wait_in_sync: bool,
    mirror_ip: String,
    mirror_launcher: Vec<String>,
    mirror_timeout: String,
    symmetric: Option<String>,
}

impl PairBuilder {
    pub fn new(size: u64) -> Self {
        Self {
            size,
            primary_volume_extra: String::new(),
            mirror_volume_extra: String::new(),
            mirror_node_extra: String::new(),
            primary_node_extra: String::new(),
            mirror_table: "mode = \"sync\"\n".into(),
            delay: None,
            faults: false,
            wrong_secret: false,
            no_secret: (false, false),
            wait_in_sync: true,
            mirror_ip: "127.0.0.1".into(),
            mirror_launcher: Vec::new(),
            mirror_timeout: "1s".into(),
            symmetric: None,
        }
    }

    /// Configure both nodes as each other's mirror (DRBD-style): the primary
    /// gets a replication listener, the mirror a `[[volume.mirror]]` table
    /// naming it, used once the mirror is promoted (failover and failback).
    pub fn symmetric(mut self) -> Self {
        self.symmetric = Some("127.0.0.1".into());
        self
    }

    /// [`PairBuilder::symmetric`], with the primary's replication listener
    /// on `ip` (reachable from a mirror in another namespace).
    pub fn symmetric_at(mut self, ip: &str) -> Self {
        self.symmetric = Some(ip.into());
        self
    }

    /// Extra keys for the primary's `[[volume]]` table (e.g. `on_mirror_failure = "fence"`).
    pub fn primary_volume(mut self, extra: &str) -> Self {
        self.primary_volume_extra += extra;
        self.primary_volume_extra.push('\n');
        self
    }

    /// Extra keys for the mirror's `[[volume]]` table (e.g. `direct_io = true`).
    pub fn mirror_volume(mut self, extra: &str) -> Self {
        self.mirror_volume_extra += extra;
        self.mirror_volume_extra.push('\n');
        self
    }

    /// Extra node-level keys for the mirror's config (e.g. `primary_silence = "1s"`).
    pub fn mirror_node(mut self, extra: &str) -> Self {
        self.mirror_node_extra += extra;
        self.mirror_node_extra.push('\n');
        self
    }

    /// Extra node-level keys or tables for the primary's config (e.g. a `[tls]` table).
    pub fn primary_node(mut self, extra: &str) -> Self {
        self.primary_node_extra += extra;
        self.primary_node_extra.push('\n');
        self
    }

    /// The keys of the primary's `[[volume.mirror]]` table besides `peer`
    /// (default `mode = "sync"`), e.g. `mode = "async"\nmax_lag_bytes = "4MiB"`.
    pub fn mirror_table(mut self, keys: &str) -> Self {
        self.mirror_table = keys.to_string() + "\n";
        self
    }

    /// Put a delay proxy (testkit's WAN stand-in) between the primary and
    /// the mirror's replication listener.
    pub fn through_delay(mut self, shape: blockmirror_testkit::delay::Shape) -> Self {
        self.delay = Some(shape);
        self
    }

    /// Put testkit's fault proxy (drop, stall, corrupt, cut) between the
    /// primary and the mirror's replication listener (not with a delay proxy).
    pub fn through_faults(mut self) -> Self {
        self.faults = true;
        self
    }

    /// The primary's `mirror_timeout` (default "1s", to keep tests quick).
    pub fn mirror_timeout(mut self, t: &str) -> Self {
        self.mirror_timeout = t.into();
        self
    }

    /// Give the primary a secret that differs from the mirror's.
    pub fn wrong_secret(mut self) -> Self {
        self.wrong_secret = true;
        self
    }

    /// Leave `secret_file` out of the primary's config (`primary`) and/or
    /// the mirror's (`mirror`): with `[tls]`, TLS alone authenticates.
    pub fn without_secret(mut self, primary: bool, mirror: bool) -> Self {
        self.no_secret = (primary, mirror);
        self
    }

    /// Return once both nodes answer, without waiting for the mirror to be in sync.
    pub fn no_wait(mut self) -> Self {
        self.wait_in_sync = false;
        self
    }

    /// Run the mirror node under `launcher` (e.g. `ip netns exec NS`), with
    /// every listener (replication, admin, NBD) on `ip`.
    pub fn mirror_at(mut self, ip: &str, launcher: &[&str]) -> Self {
        self.mirror_ip = ip.into();
        self.mirror_launcher = launcher.iter().map(|s| s.to_string()).collect();
        self
    }

    /// Starts the mirror node, then the primary node, and (unless
    /// [`PairBuilder::no_wait`]) waits until the mirror is connected and in sync.
    pub fn start(self) -> Pair {
        let secret = new_secret();
        let ip = &self.mirror_ip;
        // Ports on another address than loopback (a namespace's) are free
        // there whatever this namespace uses; pick them the same way anyway.
        let m_listen: SocketAddr = format!("{ip}:{}", free_port()).parse().unwrap();
        let m_admin: SocketAddr = format!("{ip}:{}", free_port()).parse().unwrap();
        let m_nbd: SocketAddr = format!("{ip}:{}", free_port()).parse().unwrap();
        let mdir = tempfile::tempdir().unwrap();
        std::fs::write(mdir.path().join("secret.key"), format!("{secret}\n")).unwrap();
        let mimg = mdir.path().join(format!("{PAIR_VOLUME}.img"));
        let p_listen: Option<SocketAddr> = self
            .symmetric
            .as_ref()
            .map(|ip| format!("{ip}:{}", free_port()).parse().unwrap());
        let back_table = p_listen.map_or(String::new(), |l| {
            format!(
                "mirror_timeout = \"{}\"\n[[volume.mirror]]\npeer = \"{l}\"\n{}",
                self.mirror_timeout, self.mirror_table
            )
        });
        let secret_line = |none: bool| {
            if none {
                ""
            } else {
                "secret_file = \"secret.key\"\n"
            }
        };
        let m_secret = secret_line(self.no_secret.1);
        let mtext = format!(
            "node = \"mirror\"\nlisten = \"{m_listen}\"\nadmin = \"{m_admin}\"\n{m_secret}{}\n\
             [[volume]]\nname = \"{PAIR_VOLUME}\"\npath = \"{}\"\nsize = {}\nrole = \"mirror\"\nnbd = \"{m_nbd}\"\n{}{back_table}",
            self.mirror_node_extra,
            mimg.display(),
            self.size,
            self.mirror_volume_extra
        );
        let mirror = TestNode::from_config(
            mdir,
            &mtext,
            m_admin,
            vec![format!("nbd://{m_nbd}/{PAIR_VOLUME}")],
            vec![mimg],
            self.mirror_launcher.clone(),
        );

        let proxy = self.delay.map(|shape| {
            blockmirror_testkit::delay::DelayProxy::start(
                "127.0.0.1:0".parse().unwrap(),
                m_listen,
                shape,
            )
            .unwrap()
        });
        let fault_proxy = self.faults.then(|| {
            blockmirror_testkit::faultnet::FaultProxy::start(
                "127.0.0.1:0".parse().unwrap(),
                m_listen,
            )
            .unwrap()
        });
        let peer = proxy
            .as_ref()
            .map(|p| p.addr())
            .or(fault_proxy.as_ref().map(|p| p.addr()))
            .unwrap_or(m_listen);
        let p_admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let p_nbd = format!("127.0.0.1:{}", free_port());
        let pdir = tempfile::tempdir().unwrap();
        let psecret = if self.wrong_secret {
            new_secret()
        } else {
            secret
        };
        std::fs::write(pdir.path().join("secret.key"), format!("{psecret}\n")).unwrap();
        let pimg = pdir.path().join(format!("{PAIR_VOLUME}.img"));
        let listen_line = p_listen.map_or(String::new(), |l| format!("listen = \"{l}\"\n"));
        let p_secret = secret_line(self.no_secret.0);
        let ptext = format!(
            "node = \"primary\"\n{listen_line}admin = \"{p_admin}\"\n{p_secret}{}\n\
             [[volume]]\nname = \"{PAIR_VOLUME}\"\npath = \"{}\"\nsize = {}\nrole = \"primary\"\nnbd = \"{p_nbd}\"\n\
             mirror_timeout = \"{}\"\n{}\n[[volume.mirror]]\npeer = \"{peer}\"\n{}",
            self.primary_node_extra,
            pimg.display(),
            self.size,
            self.mirror_timeout,
            self.primary_volume_extra,
            self.mirror_table
        );
        let primary = TestNode::from_config(
            pdir,
            &ptext,
            p_admin,
            vec![format!("nbd://{p_nbd}/{PAIR_VOLUME}")],
            vec![pimg],
            Vec::new(),
        );
        let pair = Pair {
            mirror,
            primary,
            mirror_listen: m_listen,
            primary_listen: p_listen,
            proxy,
            fault_proxy,
        };
        if self.wait_in_sync {
            pair.wait_in_sync(Duration::from_secs(30));
        }
        pair
    }
}

/// A primary node mirroring one volume ([`PAIR_VOLUME`]) synchronously to a mirror node.
pub struct Pair {
    // Field order is drop order: the primary stops first.
    pub primary: TestNode,
    pub mirror: TestNode,
    /// The mirror node's replication listener.
    pub mirror_listen: SocketAddr,
    /// The primary node's, when [`PairBuilder::symmetric`].
    pub primary_listen: Option<SocketAddr>,
    /// The delay proxy between them, if [`PairBuilder::through_delay`].
    pub proxy: Option<blockmirror_testkit::delay::DelayProxy>,
    /// The fault proxy between them, if [`PairBuilder::through_faults`].
    pub fault_proxy: Option<blockmirror_testkit::faultnet::FaultProxy>,
}

impl Pair {
    /// The primary's /status entry for its mirror.
    pub fn link(&self) -> serde_json::Value {
        self.primary.status_json()["volumes"][0]["mirrors"][0].clone()
    }

    /// Both nodes' logs, for failure messages.
    pub fn logs(&self) -> String {
        format!(
            "--- primary node.log ---\n{}\n--- mirror node.log ---\n{}",
            self.primary.all_logs(),
            self.mirror.all_logs()
        )
    }

    /// Polls the primary's view of the link until `pred` holds; returns that
    /// view. On timeout, panics with the last view and both logs.
    pub fn wait_link(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        let mut pause = Duration::from_millis(5);
        loop {
            let link = self.link();
            if pred(&link) {
                return link;
            }
            if Instant::now() > deadline {
                panic!(
                    "timed out after {timeout:?} waiting for the mirror link to be {what}; last: {link}\n{}",
                    self.logs()
                );
            }
            std::thread::park_timeout(pause);
            pause = (pause * 2).min(Duration::from_millis(100));
        }
    }

    /// Waits until the link is connected, in sync, with nothing out of sync,
    /// and the mirror names the primary as its feeder.
    pub fn wait_in_sync(&self, timeout: Duration) {
        self.wait_link("connected and in_sync", timeout, |l| {
            l["connection"] == "connected" && l["state"] == "in_sync" && l["out_of_sync_bytes"] == 0
        });
        let st = self.mirror.status_json();
        assert_eq!(st["volumes"][0]["role"], "mirror", "{st}");
        assert_eq!(st["volumes"][0]["primary"], "primary", "{st}");
    }

    /// A metric of the primary (summed over labels); 0 when absent.
    pub fn primary_metric(&self, name: &str) -> f64 {
        metric(&self.primary.metrics(), name).unwrap_or(0.0)
    }

    /// A FLUSH from a real client (qemu-io) on the primary.
    pub fn flush_primary(&self) {
        let out =
            run_ok(Command::new("qemu-io").args(["-f", "raw", "-c", "flush", self.primary.uri()]));
        assert!(!out.contains("failed"), "qemu-io flush: {out}");
    }

    /// `cmp` of the two backing files: they must be byte-identical.
    pub fn assert_images_identical(&self) {
        let out = run(Command::new("cmp")
            .arg(self.primary.image())
            .arg(self.mirror.image()));
        assert!(
            out.status.success(),
            "primary and mirror images differ: {}{}\nlink: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.link(),
            self.logs()
        );
    }
}

impl TestNode {
    /// A node from a config text written into `dir` (as `node.toml`), started under `launcher`.
    pub fn from_config(
        dir: tempfile::TempDir,
        text: &str,
        admin: SocketAddr,
        uris: Vec<String>,
        images: Vec<PathBuf>,
        launcher: Vec<String>,
    ) -> TestNode {
        Self::from_config_with(dir, text, admin, uris, images, launcher, false)
    }

    /// [`TestNode::from_config`]; `https`: the admin port speaks HTTPS.
    pub fn from_config_with(
        dir: tempfile::TempDir,
        text: &str,
        admin: SocketAddr,
        uris: Vec<String>,
        images: Vec<PathBuf>,
        launcher: Vec<String>,
        https: bool,
    ) -> TestNode {
        let config = dir.path().join("node.toml");
        std::fs::write(&config, text).unwrap();
        let mut node = TestNode {
            dir,
            config,
            admin,
            uris,
            images,
            launcher,
            https,
            child: None,
        };
        node.spawn();
        node
    }

    /// Starts the process again after it stopped, keeping the earlier run's
    /// log in `node.log.1`, `node.log.2`, ...
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "restart: the node is still running");
        let log = self.dir.path().join("node.log");
        let n = (1..)
            .find(|i| !self.dir.path().join(format!("node.log.{i}")).exists())
            .unwrap();
        let _ = std::fs::rename(&log, self.dir.path().join(format!("node.log.{n}")));
        self.spawn();
    }

    /// The logs of every run, oldest first.
    pub fn all_logs(&self) -> String {
        let mut out = String::new();
        for i in 1.. {
            match std::fs::read_to_string(self.dir.path().join(format!("node.log.{i}"))) {
                Ok(t) => out += &format!("[run {i}]\n{t}"),
                Err(_) => break,
            }
        }
        out + &self.log()
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => c.try_wait().unwrap().is_none(),
            None => false,
        }
    }
}

/// A time-based 4 KiB random-write load (QD 32) over the first 32 MiB.
pub fn fio_load(uri: &str, seconds: u32) -> Child {
    Command::new("fio")
        .args([
            "--name=load",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=32",
            "--size=32M",
            "--time_based",
            &format!("--runtime={seconds}"),
            "--randrepeat=0",
            "--norandommap",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start fio")
}

/// Waits for fio to exit and asserts it succeeded (every write answered OK).
pub fn fio_finish(child: Child) -> String {
    let out = child.wait_with_output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "fio failed ({}):\n{text}", out.status);
    assert!(text.contains("err= 0"), "fio reported errors:\n{text}");
    text
}

/// Whether the etcd binary runs (`$BLOCKMIRROR_ETCD`, as testkit's
/// `EtcdOpts` takes it, else `etcd`): cluster tests skip without it.
pub fn have_etcd() -> bool {
    let etcd = std::env::var_os("BLOCKMIRROR_ETCD").unwrap_or_else(|| "etcd".into());
    Command::new(etcd)
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}
