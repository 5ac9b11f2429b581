//! `blockmirror demo` as a new user runs it: start, read the printed URI,
//! use it with qemu-io, stop with Ctrl-C (SIGINT).

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

#[test]
fn demo_prints_a_working_uri_and_stops_on_sigint() {
    run_demo(false);
}

/// `demo --tls`: the link is mutual TLS, and the printed `nbds://` command works.
#[test]
fn demo_with_tls() {
    run_demo(true);
}

/// The demo binds its fixed default ports (7780, 10809, ...): the two tests
/// take turns.
static DEMO_PORTS: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn run_demo(tls: bool) {
    let _turn = DEMO_PORTS.lock().unwrap_or_else(|e| e.into_inner());
    require_tool("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(BIN)
        .args(["demo", "--size", "64MiB", "--dir"])
        .arg(dir.path().join("demo"))
        .args(if tls { &["--tls"][..] } else { &[][..] })
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut uri = None;
    let mut admin = None;
    let mut tls_cmd = None;
    // The demo prints its banner and then waits; read until "Press Ctrl-C".
    for line in lines.by_ref() {
        let line = line.unwrap();
        if line.contains("(read-write)") {
            uri = line
                .split_whitespace()
                .find(|w| w.starts_with("nbd://"))
                .map(str::to_owned);
        }
        if let Some(rest) = line.trim().strip_prefix("blockmirror status --admin ") {
            admin = Some(rest.trim().to_owned());
        }
        if let Some(rest) = line.trim().strip_prefix("nbdinfo 'nbds://") {
            tls_cmd = rest.split('\'').next().map(|u| format!("nbds://{u}"));
        }
        if line.starts_with("Press Ctrl-C") {
            break;
        }
    }
    let uri = uri.expect("the demo prints the primary's NBD URI");
    let admin = admin.expect("the demo prints the admin address");
    run_ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0xab 0 1M",
        "-c",
        "read -P 0xab 0 1M",
        &uri,
    ]));
    let table = run_ok(Command::new(BIN).args(["status", "--admin", &admin]));
    assert!(
        table.contains("demo") && table.contains("primary"),
        "{table}"
    );
    // The printed verify command works once the mirror is connected.
    let addr: std::net::SocketAddr = admin.parse().unwrap();
    wait_for("the demo's mirror link", Duration::from_secs(30), || {
        let (_, body) = http_get(addr, "/status").ok()?;
        let st: serde_json::Value = serde_json::from_str(&body).ok()?;
        (st["volumes"][0]["mirrors"][0]["connection"] == "connected").then_some(())
    });
    let out = run_ok(Command::new(BIN).args(["verify", "demo", "--admin", &admin]));
    assert!(out.contains("identical"), "{out}");
    if tls {
        require_tool("nbdinfo");
        let uri = tls_cmd.expect("demo --tls prints an nbds:// command");
        let out = run_ok(Command::new("nbdinfo").arg(&uri));
        assert!(out.contains("with TLS"), "{out}");
        let st =
            String::from_utf8_lossy(&std::fs::read(dir.path().join("demo/primary.toml")).unwrap())
                .into_owned();
        assert!(st.contains("[tls]"), "{st}");
    }

    let _ = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    let status = wait_for("the demo to exit", Duration::from_secs(30), || {
        child.try_wait().unwrap()
    });
    assert!(status.success(), "demo exited with {status}");
    let img = std::fs::read(dir.path().join("demo/primary/demo.img")).unwrap();
    assert!(img[..1 << 20].iter().all(|&b| b == 0xab));
}
