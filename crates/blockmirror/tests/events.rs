//! `GET /events` and `blockmirror events`: a mirror killed and restarted
//! shows up as link down, link up, resync started, in sync, resync finished,
//! in that order, with non-decreasing timestamps.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;

const MIB: u64 = 1 << 20;

/// `blockmirror events` as a child whose stdout lines are collected.
struct Follower {
    child: std::process::Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Follower {
    fn start(args: &[&str]) -> Follower {
        let mut child = Command::new(BIN)
            .arg("events")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start blockmirror events");
        let out = child.stdout.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let l = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                l.lock().unwrap().push(line);
            }
        });
        Follower { child, lines }
    }

    fn events(&self) -> Vec<serde_json::Value> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
            .collect()
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn kv(e: &serde_json::Value) -> String {
    let v = match &e["value"] {
        serde_json::Value::String(s) => s.clone(),
        v => v.to_string(),
    };
    format!("{}={v}", e["kind"].as_str().unwrap_or("?"))
}

#[test]
fn a_mirror_outage_arrives_as_ordered_events() {
    require_tool("qemu-io");
    let mut pair = PairBuilder::new(64 * MIB).start();
    let admin = pair.primary.admin.to_string();
    // The initial sync first, so that `--now` below finds the link in sync.
    pair.wait_in_sync(Duration::from_secs(60));
    // Paced, so the resync lasts long enough to be seen.
    let out = cli(&[
        "resync",
        PAIR_VOLUME,
        "--admin",
        &admin,
        "--rate",
        "4MiB",
        "--no-wait",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let f = Follower::start(&["--admin", &admin, "--json", "--now"]);
    // --now: the current state first.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    wait_for("the --now events", Duration::from_secs(25), || {
        let ev = f.events();
        assert!(
            std::time::Instant::now() < deadline,
            "no --now events; got {:?}\n{}",
            f.lines.lock().unwrap(),
            pair.logs()
        );
        ev.iter()
            .any(|e| e["now"] == true && kv(e) == "state=in_sync" && e["peer"].is_string())
            .then_some(())
    });
    let human = Follower::start(&["--admin", &admin]);

    pair.mirror.stop_with("KILL");
    pair.wait_link("degraded", Duration::from_secs(30), |l| {
        l["state"] == "degraded"
    });
    qemu_io_ok(pair.primary.uri(), &["write -P 0x33 0 8M", "flush"]);
    pair.mirror.restart();
    pair.wait_in_sync(Duration::from_secs(60));

    let want = [
        "connection=disconnected",
        "connection=connected",
        "resync=started",
        "state=in_sync",
        "resync=finished",
    ];
    let changes = wait_for("the outage's events", Duration::from_secs(20), || {
        let ev: Vec<_> = f
            .events()
            .into_iter()
            .filter(|e| e["now"] != true)
            .collect();
        let names: Vec<String> = ev.iter().map(kv).collect();
        // `want` must appear in this order (other events may lie between).
        let mut i = 0;
        for n in &names {
            if i < want.len() && *n == want[i] {
                i += 1;
            }
        }
        (i == want.len()).then_some(ev)
    });
    let mut last = String::new();
    for e in &changes {
        assert_eq!(e["volume"], PAIR_VOLUME, "{e}");
        assert_eq!(e["node"], "primary", "{e}");
        let t = e["time"].as_str().expect("time").to_owned();
        assert!(
            t.ends_with('Z') && t.len() == 24,
            "RFC 3339 with millis: {t}"
        );
        assert!(t >= last, "timestamps in order: {last} then {t}");
        last = t;
    }
    let state = changes.iter().find(|e| e["kind"] == "state").unwrap();
    assert_eq!(state["peer"], pair.mirror_listen.to_string(), "{state}");

    // The human form says the same, one line each.
    wait_for("the human lines", Duration::from_secs(20), || {
        let lines = human.lines.lock().unwrap().clone();
        lines
            .iter()
            .any(|l| l.contains("change resync volume:vol") && l.ends_with("resync:finished"))
            .then_some(())
    });
    eprintln!("{}", human.lines.lock().unwrap().join("\n"));
    // The status page's event log holds them too, and the history has samples.
    let (code, body) = http_get(pair.primary.admin, "/events/recent").unwrap();
    assert_eq!(code, 200);
    assert!(body.contains("\"resync\""), "{body}");
    let (code, body) = http_get(pair.primary.admin, "/history").unwrap();
    assert_eq!(code, 200);
    let h: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(!h.as_array().unwrap().is_empty(), "{body}");
    assert!(
        h[0]["volumes"][0]["links"][0]["lag_bytes"].is_u64(),
        "{body}"
    );
}
