//! deploy/: the alert rules pass promtool, the systemd unit passes
//! systemd-analyze, the Grafana dashboard is valid and queries only metrics a
//! live node exports, and `serve` speaks sd_notify (READY=1, WATCHDOG=1).
//!
//! A missing tool skips its test with a message, except in CI (`CI=true`),
//! where scripts/install-deps.sh has installed it.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Whether `tool` is on PATH; outside CI a missing tool skips (false).
fn have(tool: &str) -> bool {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    if !found {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{tool} is not installed: scripts/install-deps.sh installs it"
        );
        eprintln!("SKIPPED: {tool} is not installed (scripts/install-deps.sh installs it)");
    }
    found
}

#[test]
fn alert_rules_pass_promtool() {
    if !have("promtool") {
        return;
    }
    let rules: Vec<PathBuf> = std::fs::read_dir(repo().join("deploy"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".rules.yml"))
        .collect();
    assert!(!rules.is_empty());
    let out = run_ok(
        Command::new("promtool")
            .arg("check")
            .arg("rules")
            .args(&rules),
    );
    eprintln!("{out}");
    assert!(out.contains("SUCCESS"), "{out}");
    // Each alert fires on the series a node exports, and not before its `for`.
    let out = run_ok(
        Command::new("promtool")
            .arg("test")
            .arg("rules")
            .arg(repo().join("deploy/blockmirror.rules.test.yml")),
    );
    eprintln!("{out}");
    assert!(out.contains("SUCCESS"), "{out}");
}

#[test]
fn systemd_unit_passes_systemd_analyze() {
    if !have("systemd-analyze") {
        return;
    }
    let text = std::fs::read_to_string(repo().join("deploy/blockmirror@.service")).unwrap();
    for key in [
        "Type=notify",
        "WatchdogSec=",
        "ProtectSystem=strict",
        "/etc/blockmirror/%i.toml",
    ] {
        assert!(text.contains(key), "the unit has {key}");
    }
    // An instance of the template, running the binary under test (the
    // packaged path /usr/bin/blockmirror does not exist here).
    let dir = tempfile::tempdir().unwrap();
    let unit = dir.path().join("blockmirror@test.service");
    std::fs::write(&unit, text.replace("/usr/bin/blockmirror", BIN)).unwrap();
    let out = run(Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&unit));
    let err = String::from_utf8_lossy(&out.stderr);
    // Only complaints about this unit count (the host's own units may have some).
    let ours: Vec<&str> = err.lines().filter(|l| l.contains("blockmirror")).collect();
    assert!(
        out.status.success() && ours.is_empty(),
        "systemd-analyze verify: {}\n{err}",
        out.status
    );
}

/// Every `blockmirror_*` name in `text`, histogram suffixes kept.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("blockmirror_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        out.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    out
}

#[test]
fn grafana_dashboard_queries_metrics_a_live_node_exports() {
    let text = std::fs::read_to_string(repo().join("deploy/grafana-dashboard.json")).unwrap();
    let dash: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    // The parts of Grafana's dashboard schema an import needs.
    assert!(dash["title"].is_string() && dash["uid"].is_string());
    assert!(dash["schemaVersion"].as_u64().unwrap() >= 30);
    let panels = dash["panels"].as_array().expect("panels");
    assert!(panels.len() >= 8);
    let mut exprs = String::new();
    for p in panels {
        assert!(p["title"].is_string() && p["type"].is_string(), "{p}");
        for k in ["x", "y", "w", "h"] {
            assert!(p["gridPos"][k].is_u64(), "gridPos.{k}: {p}");
        }
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{p}");
        for t in targets {
            exprs += t["expr"].as_str().expect("expr");
            exprs.push('\n');
        }
    }
    for v in dash["templating"]["list"].as_array().unwrap() {
        if let Some(q) = v["definition"].as_str() {
            exprs += q;
        }
    }
    let wanted = metric_names(&exprs);
    assert!(wanted.len() >= 10, "{wanted:?}");

    // A live pair, after a write and a verify (verify families appear once
    // one has run).
    require_tool("qemu-io");
    let pair = PairBuilder::new(16 << 20).start();
    qemu_io_ok(pair.primary.uri(), &["write -P 0x44 0 1M", "flush"]);
    let admin = pair.primary.admin.to_string();
    let out = cli(&["verify", PAIR_VOLUME, "--admin", &admin]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let have = metric_names(&pair.primary.metrics());
    let missing: Vec<&String> = wanted.iter().filter(|m| !have.contains(*m)).collect();
    assert!(
        missing.is_empty(),
        "the dashboard queries metrics the node lacks: {missing:?}"
    );
    // The alert rules too.
    let rules = std::fs::read_to_string(repo().join("deploy/blockmirror.rules.yml")).unwrap();
    let missing: Vec<String> = metric_names(&rules)
        .into_iter()
        .filter(|m| !have.contains(m))
        .collect();
    assert!(
        missing.is_empty(),
        "the alert rules use metrics the node lacks: {missing:?}"
    );

    // Both nodes' expositions pass promtool's checks (Prometheus text, what
    // a scraper that does not ask for OpenMetrics gets).
    if self::have("promtool") {
        for (who, text) in [
            ("primary", pair.primary.metrics()),
            ("mirror", pair.mirror.metrics()),
        ] {
            let mut child = Command::new("promtool")
                .args(["check", "metrics"])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            use std::io::Write as _;
            child
                .stdin
                .take()
                .unwrap()
                .write_all(text.as_bytes())
                .unwrap();
            let out = child.wait_with_output().unwrap();
            let complaints = String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr);
            // One name predates the check and is kept for its users.
            let real: Vec<&str> = complaints
                .lines()
                .filter(|l| {
                    !l.starts_with(
                        "blockmirror_apply_counter_waits_total metric name should not include type",
                    )
                })
                .collect();
            assert!(
                real.is_empty(),
                "promtool check metrics ({who}): {real:?}\n{text}"
            );
        }
    }

    // A scraper that asks for OpenMetrics (Prometheus does) gets it.
    let om = get_with_accept(
        pair.primary.admin,
        "/metrics",
        "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
    );
    assert!(
        om.contains("content-type: application/openmetrics-text"),
        "{om}"
    );
    assert!(om.ends_with("# EOF\n"), "{om}");
    assert!(om.contains("# TYPE blockmirror_requests counter\n"), "{om}");
}

/// A raw GET with an Accept header: the response's head (lower case) and
/// body, joined by a blank line.
fn get_with_accept(addr: std::net::SocketAddr, path: &str, accept: &str) -> String {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: {accept}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").expect("an HTTP response");
    format!("{}\r\n\r\n{body}", head.to_ascii_lowercase())
}

#[test]
fn serve_tells_systemd_it_is_ready_and_pings_the_watchdog() {
    use std::os::unix::net::UnixDatagram;
    let mut node = TestNode::start(&[VolumeSpec::new("v", 1 << 20)]);
    node.stop_with("TERM");
    let sock_path = node.dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    // As systemd does: WATCHDOG_PID names the service's own process (sh's
    // pid is the one exec keeps).
    let mut child = Command::new("sh")
        .args([
            "-c",
            "WATCHDOG_PID=$$ exec \"$0\" serve --config \"$1\"",
            BIN,
        ])
        .arg(&node.config)
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "200000")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 512];
    while !(got.iter().any(|m: &String| m.contains("READY=1"))
        && got.iter().any(|m| m.contains("WATCHDOG=1")))
    {
        let n = sock.recv(&mut buf).expect("a notification within 30 s");
        got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    // READY=1 only once the admin server answers.
    let (code, _) = http_get(node.admin, "/status").unwrap();
    assert_eq!(code, 200);
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let st = wait_for("serve to exit", Duration::from_secs(30), || {
        child.try_wait().unwrap()
    });
    assert!(st.success(), "{st}");
    let n = sock.recv(&mut buf).expect("STOPPING=1");
    assert!(String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1"));
    assert!(got[0].contains("READY=1"), "{got:?}");
}
