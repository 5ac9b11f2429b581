//! The status page at `GET /`, loaded by a real browser (Debian's chromium,
//! headless) from a running primary+mirror pair during a mirror outage and
//! during the resync after it. Checks the DOM (link states, charts with
//! points, resync progress) and saves screenshots under target/tmp/.
//!
//! Without chromium the test is skipped with a message, except in CI
//! (`CI=true`), where scripts/install-deps.sh has installed it.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;

const MIB: u64 = 1 << 20;

fn chromium() -> Option<&'static str> {
    let path = std::env::var_os("PATH")?;
    ["chromium", "chromium-browser"]
        .into_iter()
        .find(|tool| std::env::split_paths(&path).any(|d| d.join(tool).is_file()))
}

fn browser_args(url: &str) -> Vec<String> {
    browser_args_sized(url, "1000,1400")
}

/// `size` is the window's "WIDTH,HEIGHT" in CSS pixels.
fn browser_args_sized(url: &str, size: &str) -> Vec<String> {
    [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--virtual-time-budget=5000",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([format!("--window-size={size}"), url.to_string()])
    .collect()
}

/// The page's DOM after its scripts ran.
fn dump_dom(browser: &str, url: &str, profile: &Path) -> String {
    let mut args = browser_args(url);
    args.insert(0, format!("--user-data-dir={}", profile.display()));
    args.insert(0, "--dump-dom".into());
    let out = run(Command::new(browser).args(&args));
    assert!(
        out.status.success(),
        "{browser} --dump-dom failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn screenshot(browser: &str, url: &str, profile: &Path, name: &str) -> PathBuf {
    let file = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_file(&file);
    let mut args = browser_args(url);
    args.insert(0, format!("--user-data-dir={}", profile.display()));
    args.insert(0, format!("--screenshot={}", file.display()));
    let out = run(Command::new(browser).args(&args));
    assert!(
        out.status.success() && file.is_file(),
        "{browser} --screenshot failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("screenshot: {}", file.display());
    file
}

/// The largest `data-points="N"` of the page's charts.
fn max_points(dom: &str) -> usize {
    dom.match_indices("data-points=\"")
        .filter_map(|(i, m)| {
            let rest = &dom[i + m.len()..];
            rest[..rest.find('"')?].parse().ok()
        })
        .max()
        .unwrap_or(0)
}

fn progress(dom: &str, class: &str) -> Option<f64> {
    let at = dom.find(&format!("class=\"{class}\" data-progress=\""))?;
    let rest = &dom[at..];
    let rest = &rest[rest.find("data-progress=\"")? + 15..];
    rest[..rest.find('"')?].parse().ok()
}

#[test]
fn the_status_page_shows_an_outage_and_a_resync() {
    let Some(browser) = chromium() else {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "chromium is not installed: scripts/install-deps.sh installs it"
        );
        eprintln!("SKIPPED: chromium is not installed (scripts/install-deps.sh installs it)");
        return;
    };
    require_tool("qemu-io");
    let profile = tempfile::tempdir().unwrap();
    let mut pair = PairBuilder::new(64 * MIB).start();
    let admin = pair.primary.admin.to_string();
    let url = format!("http://{admin}/");
    // Some host writes for the charts, then a paced resync rate.
    qemu_io_ok(pair.primary.uri(), &["write -P 0x11 0 4M", "flush"]);
    let out = cli(&[
        "resync",
        PAIR_VOLUME,
        "--admin",
        &admin,
        "--rate",
        "1MiB",
        "--no-wait",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The outage.
    pair.mirror.stop_with("KILL");
    pair.wait_link("degraded", Duration::from_secs(30), |l| {
        l["state"] == "degraded"
    });
    qemu_io_ok(pair.primary.uri(), &["write -P 0x22 0 32M", "flush"]);
    // Two history samples at least, so the charts have a line.
    wait_for("two history samples", Duration::from_secs(10), || {
        let (_, body) = http_get(pair.primary.admin, "/history").ok()?;
        let h: serde_json::Value = serde_json::from_str(&body).ok()?;
        (h.as_array()?.len() >= 2).then_some(())
    });
    let dom = dump_dom(browser, &url, profile.path());
    assert!(dom.contains("data-volume=\"vol\""), "{dom}");
    assert!(dom.contains("data-role=\"primary\""), "{dom}");
    assert!(dom.contains("data-state=\"degraded\""), "{dom}");
    assert!(dom.contains("data-connection=\"disconnected\""), "{dom}");
    assert!(max_points(&dom) >= 2, "a chart with points: {dom}");
    assert!(dom.contains("host writes"), "{dom}");
    screenshot(browser, &url, profile.path(), "status-page-outage.png");

    // The resync: 32 MiB at 1 MiB/s, so it is under way for many seconds.
    pair.mirror.restart();
    pair.wait_link("resyncing", Duration::from_secs(30), |l| {
        l["state"] == "resyncing" && l["resync_done_bytes"].as_u64().unwrap_or(0) > 0
    });
    let dom = dump_dom(browser, &url, profile.path());
    assert!(dom.contains("data-state=\"resyncing\""), "{dom}");
    assert!(dom.contains("data-connection=\"connected\""), "{dom}");
    let first = progress(&dom, "resync").expect("resync progress on the page");
    assert!(first > 0.0 && first < 100.0, "{first}");
    assert!(dom.contains("ETA"), "{dom}");
    screenshot(browser, &url, profile.path(), "status-page-resync.png");
    // Progress moves.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let dom = dump_dom(browser, &url, profile.path());
        match progress(&dom, "resync") {
            Some(p) if p > first => break,
            None if dom.contains("data-state=\"in_sync\"") => break,
            _ => {}
        }
        assert!(
            std::time::Instant::now() < deadline,
            "resync progress did not move: {dom}"
        );
    }
    // A narrow window: everything fits, nothing scrolls sideways. Headless
    // chromium lays out at least 500 CSS pixels wide whatever is asked, so
    // this checks 500, not a 390-pixel phone.
    let mut args = browser_args_sized(&url, "500,900");
    args.insert(0, format!("--user-data-dir={}", profile.path().display()));
    args.insert(0, "--dump-dom".into());
    let out = run(Command::new(browser).args(&args));
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(dom.contains("data-volume=\"vol\""), "{dom}");
    assert!(
        dom.contains("data-fits=\"true\""),
        "the page is wider than a phone: {dom}"
    );
    let file = Path::new(env!("CARGO_TARGET_TMPDIR")).join("status-page-phone.png");
    let _ = std::fs::remove_file(&file);
    args[0] = format!("--screenshot={}", file.display());
    let out = run(Command::new(browser).args(&args));
    assert!(out.status.success() && file.is_file(), "phone screenshot");
    eprintln!("screenshot: {}", file.display());

    let (code, body) = http_get(pair.primary.admin, "/").unwrap();
    assert_eq!(code, 200);
    assert!(
        !body.contains("http://") && !body.contains("https://"),
        "no external assets"
    );
}
