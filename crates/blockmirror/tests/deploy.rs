//! `deploy/`: the Prometheus rules pass `promtool check rules` and their own
//! `promtool test rules`, the Grafana dashboard is well-formed and queries only
//! metrics the node exports, and the systemd unit passes `systemd-analyze
//! verify`. A missing tool skips its test with a message, except under CI
//! (`CI` set), where scripts/install-deps.sh installs it.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// True when `tool` is on PATH; otherwise skips (false) or, under CI, fails.
fn have(tool: &str, package: &str) -> bool {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "{tool} is not installed under CI: scripts/install-deps.sh installs Debian's {package}"
        );
        eprintln!(
            "SKIP: {tool} is not installed (Debian package {package}; scripts/install-deps.sh)"
        );
    }
    found
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

/// Every `blockmirror_*` name in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("blockmirror_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        out.insert(tail[..end].to_owned());
        rest = &tail[end..];
    }
    out
}

/// The metric families the node's code renders (their names are string
/// literals beside the code that measures them), histograms with their
/// series suffixes.
fn exported_names() -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut dirs = vec![root().join("crates/node/src")];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                let text = std::fs::read_to_string(&p).unwrap();
                for piece in text.split('"').skip(1).step_by(2) {
                    if piece.starts_with("blockmirror_") && !piece.contains(['{', ' ']) {
                        names.insert(piece.to_owned());
                        for s in ["_bucket", "_sum", "_count"] {
                            names.insert(format!("{piece}{s}"));
                        }
                    }
                }
            }
        }
    }
    assert!(names.contains("blockmirror_mirror_state"), "{names:?}");
    names
}

fn assert_known(what: &str, used: &BTreeSet<String>) {
    let known = exported_names();
    let unknown: Vec<_> = used.difference(&known).collect();
    assert!(
        unknown.is_empty(),
        "{what} uses metrics the node does not export: {unknown:?}"
    );
}

#[test]
fn alert_rules_pass_promtool_and_their_unit_tests() {
    let deploy = root().join("deploy");
    let rules = deploy.join("blockmirror.rules.yml");
    let text = std::fs::read_to_string(&rules).unwrap();
    let used = metric_names(&text);
    for needed in [
        "blockmirror_mirror_state",
        "blockmirror_mirror_lag_seconds",
        "blockmirror_link_failures_total",
        "blockmirror_resync_bytes_total",
        "blockmirror_verify_differing_bytes",
    ] {
        assert!(used.contains(needed), "rules do not use {needed}");
    }
    assert_known("deploy/blockmirror.rules.yml", &used);
    if !have("promtool", "prometheus") {
        return;
    }
    let out = run_ok(
        Command::new("promtool")
            .arg("check")
            .arg("rules")
            .arg(&rules),
    );
    assert!(out.contains("SUCCESS"), "{out}");
    eprintln!("{out}");
    let out = run_ok(Command::new("promtool").current_dir(&deploy).args([
        "test",
        "rules",
        "blockmirror.rules.test.yml",
    ]));
    assert!(out.contains("SUCCESS"), "{out}");
}

#[test]
fn grafana_dashboard_is_well_formed_and_queries_exported_metrics() {
    let path = root().join("deploy/grafana-dashboard.json");
    let text = std::fs::read_to_string(&path).unwrap();
    let d: serde_json::Value = serde_json::from_str(&text).expect("dashboard is JSON");
    // The fields Grafana's dashboard schema requires to import it.
    assert!(d["title"].is_string() && d["uid"].is_string());
    assert!(d["schemaVersion"].as_u64().unwrap() >= 30);
    let panels = d["panels"].as_array().expect("panels");
    assert!(panels.len() >= 8);
    let mut ids = BTreeSet::new();
    let mut exprs = String::new();
    for p in panels {
        assert!(
            ids.insert(p["id"].as_u64().expect("panel id")),
            "duplicate id"
        );
        assert!(p["type"].is_string() && p["title"].is_string());
        for k in ["x", "y", "w", "h"] {
            assert!(p["gridPos"][k].is_u64(), "panel {} gridPos.{k}", p["title"]);
        }
        assert!(p["gridPos"]["x"].as_u64().unwrap() + p["gridPos"]["w"].as_u64().unwrap() <= 24);
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty());
        for t in targets {
            exprs.push_str(t["expr"].as_str().expect("expr"));
            exprs.push('\n');
        }
    }
    for v in d["templating"]["list"].as_array().unwrap() {
        if let Some(q) = v["definition"].as_str() {
            exprs.push_str(q);
        }
    }
    let used = metric_names(&exprs);
    for needed in [
        "blockmirror_host_bytes_written_total",
        "blockmirror_replicated_bytes_total",
        "blockmirror_request_duration_seconds_bucket",
        "blockmirror_out_of_sync_bytes",
        "blockmirror_mirror_lag_bytes",
    ] {
        assert!(used.contains(needed), "dashboard does not chart {needed}");
    }
    assert_known("deploy/grafana-dashboard.json", &used);
}

#[test]
fn systemd_unit_passes_systemd_analyze_verify() {
    let unit = std::fs::read_to_string(root().join("deploy/blockmirror@.service")).unwrap();
    for line in [
        "Type=notify",
        "WatchdogSec=",
        "ProtectSystem=strict",
        "CapabilityBoundingSet=",
        "ExecStart=/usr/bin/blockmirror serve --config /etc/blockmirror/%i.toml",
    ] {
        assert!(unit.contains(line), "unit lacks {line}");
    }
    if !have("systemd-analyze", "systemd") {
        return;
    }
    // verify checks that ExecStart exists: point it at the binary under test,
    // as an instance (a template cannot be verified on its own).
    let dir = tempfile::tempdir().unwrap();
    let inst = dir.path().join("blockmirror@test.service");
    std::fs::write(
        &inst,
        unit.replace("/usr/bin/blockmirror", env!("CARGO_BIN_EXE_blockmirror")),
    )
    .unwrap();
    // --man=no: the man pages come with the package, not with the build.
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&inst)
        .output()
        .expect("systemd-analyze");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && !text.contains("blockmirror@test.service:"),
        "systemd-analyze verify:\n{text}"
    );
}
