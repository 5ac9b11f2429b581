//! Test harness: starts `blockmirror serve` as a real process and drives it
//! with real NBD clients. Waits poll a condition with a deadline; no sleeps.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_blockmirror");

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
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
            child: None,
        };
        node.spawn();
        node
    }

    /// Starts the process (again) and waits until its admin server answers.
    pub fn spawn(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("node.log")).unwrap();
        let child = Command::new(BIN)
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
            match http_get(admin, "/status") {
                Ok((200, _)) => Some(()),
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
