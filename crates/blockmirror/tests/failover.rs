//! Failover and failback with real processes and real clients (seed 004: a
//! failed primary promotes a mirror; issue 9): the drill end to end, a
//! returning old primary that demotes itself and gets only what differs, a
//! planned switchover (demote, promote) that copies exactly what was written
//! meanwhile, the refusals, and a promoted mirror that keeps mirroring to the
//! others.

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use common::*;

const MIB: u64 = 1 << 20;

fn cli_ok(args: &[&str]) -> String {
    let out = cli(args);
    assert!(
        out.status.success(),
        "blockmirror {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn cli_refused(args: &[&str], needle: &str) {
    let out = cli(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains(needle),
        "blockmirror {args:?} should be refused with {needle:?}: {err}"
    );
}

fn volume(node: &TestNode) -> serde_json::Value {
    node.status_json()["volumes"][0].clone()
}

/// The first mirror link of `node` (a primary), by /status.
fn link_of(node: &TestNode) -> serde_json::Value {
    volume(node)["mirrors"][0].clone()
}

fn wait_in_sync_from(primary: &TestNode, what: &str, logs: impl Fn() -> String) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let l = link_of(primary);
        if l["connection"] == "connected" && l["state"] == "in_sync" && l["out_of_sync_bytes"] == 0
        {
            return;
        }
        if std::time::Instant::now() > deadline {
            panic!("timed out waiting for {what}: {l}\n{}", logs());
        }
        std::thread::park_timeout(Duration::from_millis(20));
    }
}

/// Waits until `node` no longer names a primary feeding it (its primary's
/// loss or demote was noticed), then promotes `volume` there without
/// `--force`; returns the CLI's message.
fn promote_once_its_primary_is_gone(node: &TestNode, volume: &str) -> String {
    wait_for(
        "the mirror to see its primary gone",
        Duration::from_secs(30),
        || self::volume(node).get("primary").is_none().then_some(()),
    );
    cli_ok(&["promote", volume, "--admin", &node.admin.to_string()])
}

fn images_identical(a: &std::path::Path, b: &std::path::Path) -> bool {
    run(Command::new("cmp").arg(a).arg(b)).status.success()
}

/// The drill an operator runs: every step passes and the RTO is printed.
#[test]
fn demo_drill_passes_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(Command::new(BIN).args([
        "demo",
        "--drill",
        "--dir",
        dir.path().to_str().unwrap(),
        "--size",
        "64MiB",
    ]));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let logs = ["site-a.log", "site-b.log"]
        .iter()
        .map(|f| std::fs::read_to_string(dir.path().join("drill").join(f)).unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n---\n");
    assert!(
        out.status.success() && text.contains("result: PASS"),
        "drill failed ({}):\n{text}\n{}\n{logs}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    for step in [
        "site A killed",
        "RTO",
        "ok   B holds every byte written to A",
        "demoted itself",
        "ok   A and B are identical after the failback",
    ] {
        assert!(text.contains(step), "missing step {step:?}:\n{text}");
    }
    assert!(!text.contains("FAIL"), "{text}");
}

/// The primary dies under a write load; the mirror is promoted and written;
/// the old primary restarts with its config unchanged, finds the mirror
/// promoted past it, demotes itself, reports the regions it may hold that
/// the new primary lacks, and the failback copies those (hashed first) and
/// what was written meanwhile, never the whole volume; the images end
/// identical, including whatever the old primary wrote in its last moment.
#[test]
fn old_primary_returns_as_a_mirror_and_gets_only_what_differs() {
    require_tool("qemu-io");
    require_tool("fio");
    let mut pair = PairBuilder::new(64 * MIB).symmetric().start();
    let (p_admin, m_admin) = (
        pair.primary.admin.to_string(),
        pair.mirror.admin.to_string(),
    );
    // While its primary feeds it, the mirror is not promoted without --force,
    // and a primary cannot be promoted.
    cli_refused(&["promote", PAIR_VOLUME, "--admin", &m_admin], "--force");
    cli_refused(
        &["promote", PAIR_VOLUME, "--admin", &p_admin],
        "already primary",
    );
    cli_refused(
        &["demote", PAIR_VOLUME, "--admin", &m_admin],
        "already a mirror",
    );

    // A write load over the first 32 MiB; the primary is killed under it.
    let load = fio_load(pair.primary.uri(), 30);
    wait_for(
        "host writes on the primary",
        Duration::from_secs(30),
        || {
            (metric(
                &pair.primary.metrics(),
                "blockmirror_host_bytes_written_total",
            )
            .unwrap_or(0.0)
                > (8 * MIB) as f64)
                .then_some(())
        },
    );
    pair.primary.stop_with("KILL");
    let _ = load.wait_with_output();
    let msg = promote_once_its_primary_is_gone(&pair.mirror, PAIR_VOLUME);
    assert!(msg.contains("promoted"), "{msg}");
    assert_eq!(volume(&pair.mirror)["role"], "primary");
    // The new primary is written while the old one is away.
    qemu_io_ok(pair.mirror.uri(), &["write -P 0x5a 40M 4M", "flush"]);

    // The old primary comes back with its config unchanged. A host that
    // writes to it at once is held (start_wait) until its link has met the
    // promoted mirror, then refused: no split brain.
    pair.primary.restart();
    let out = qemu_io(pair.primary.uri(), &["write -P 0x11 0 4k"]);
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() || text.contains("failed"),
        "a returning old primary took a write: {text}"
    );
    wait_for(
        "the old primary to demote itself",
        Duration::from_secs(30),
        || (volume(&pair.primary)["role"] == "mirror").then_some(()),
    );
    wait_in_sync_from(&pair.mirror, "the failback", || pair.logs());
    qemu_io_ok(pair.mirror.uri(), &["flush"]);
    assert!(
        images_identical(pair.primary.image(), pair.mirror.image()),
        "images differ after the failback\n{}",
        pair.logs()
    );
    let m = pair.mirror.metrics();
    let sent = metric(&m, "blockmirror_resync_bytes_total").unwrap_or(0.0);
    let reported = metric(&m, "blockmirror_resync_divergent_bytes_total").unwrap_or(0.0);
    let equal = metric(&m, "blockmirror_resync_skipped_bytes_total").unwrap_or(0.0);
    println!(
        "failback after a crash under fio: reported {reported} B, sent {sent} B, found equal {equal} B"
    );
    assert!(
        reported > 0.0,
        "the old primary reports the extents it was writing: {m}"
    );
    assert!(
        sent >= (4 * MIB) as f64,
        "what the new primary wrote is copied: {sent}"
    );
    assert!(
        sent < (64 * MIB) as f64 && equal > 0.0,
        "no full copy: sent {sent}, found equal {equal}\n{m}"
    );
    let st = volume(&pair.primary);
    assert_eq!(st["state"], "in_sync", "{st}");
    assert_eq!(st["primary"], "mirror", "{st}");
    assert_eq!(
        st["generations"],
        volume(&pair.mirror)["generations"],
        "both hold one lineage"
    );
    // The demoted role survives a restart: no second primary by rebooting.
    pair.primary.stop_with("TERM");
    pair.primary.restart();
    wait_in_sync_from(&pair.mirror, "the restarted mirror", || pair.logs());
    assert_eq!(volume(&pair.primary)["role"], "mirror");
}

/// A planned switchover: demote the primary, promote the mirror; with the
/// old primary away meanwhile, exactly what the new primary wrote is copied
/// when it returns, and nothing it reports.
#[test]
fn planned_switchover_copies_exactly_what_was_written() {
    require_tool("qemu-io");
    let mut pair = PairBuilder::new(32 * MIB).symmetric().start();
    let (p_admin, m_admin) = (
        pair.primary.admin.to_string(),
        pair.mirror.admin.to_string(),
    );
    qemu_io_ok(pair.primary.uri(), &["write -P 0x11 0 8M", "flush"]);
    let msg = cli_ok(&["demote", PAIR_VOLUME, "--admin", &p_admin]);
    assert!(msg.contains("demoted"), "{msg}");
    let st = volume(&pair.primary);
    assert_eq!(st["role"], "mirror", "{st}");
    assert_eq!(st["read_only"], true, "{st}");
    // The mirror sees its primary go and is promoted without --force.
    // The old primary is away (cleanly stopped) while the new one writes.
    pair.primary.stop_with("TERM");
    promote_once_its_primary_is_gone(&pair.mirror, PAIR_VOLUME);
    // The promotion survives a restart of B (its config still says mirror):
    // it comes back primary and read-write.
    pair.mirror.stop_with("TERM");
    pair.mirror.restart();
    let st = volume(&pair.mirror);
    assert_eq!(st["role"], "primary", "{st}");
    assert_eq!(st["read_only"], false, "{st}");
    qemu_io_ok(
        pair.mirror.uri(),
        &["write -P 0x22 1M 1M", "write -P 0x33 20M 3M", "flush"],
    );
    pair.primary.restart();
    wait_in_sync_from(&pair.mirror, "the switchover", || pair.logs());
    assert_eq!(volume(&pair.primary)["role"], "mirror");
    let m = pair.mirror.metrics();
    assert_eq!(
        metric(&m, "blockmirror_resync_bytes_total"),
        Some((4 * MIB) as f64),
        "exactly what was written while apart is copied: {m}"
    );
    assert_eq!(
        metric(&m, "blockmirror_resync_divergent_bytes_total"),
        Some(0.0),
        "a clean demote leaves nothing divergent: {m}"
    );
    qemu_io_ok(pair.mirror.uri(), &["flush"]);
    assert!(images_identical(pair.primary.image(), pair.mirror.image()));
    // And back again: demote B, promote A; A becomes primary, B its mirror.
    cli_ok(&["demote", PAIR_VOLUME, "--admin", &m_admin]);
    promote_once_its_primary_is_gone(&pair.primary, PAIR_VOLUME);
    qemu_io_ok(pair.primary.uri(), &["write -P 0x44 2M 64k", "flush"]);
    wait_in_sync_from(&pair.primary, "the switch back", || pair.logs());
    assert!(images_identical(pair.primary.image(), pair.mirror.image()));
}

/// A mirror whose resync did not finish is not promoted without --force.
#[test]
fn promoting_an_inconsistent_mirror_needs_force() {
    let mut pair = PairBuilder::new(64 * MIB)
        .symmetric()
        .primary_volume("resync_rate = \"4MiB\"")
        .no_wait()
        .start();
    let m_admin = pair.mirror.admin.to_string();
    wait_for(
        "the mirror to be resyncing",
        Duration::from_secs(30),
        || (volume(&pair.mirror)["state"] == "resyncing").then_some(()),
    );
    pair.primary.stop_with("KILL");
    wait_for(
        "the mirror to see its primary gone",
        Duration::from_secs(30),
        || (volume(&pair.mirror)["state"] == "inconsistent").then_some(()),
    );
    cli_refused(
        &["promote", PAIR_VOLUME, "--admin", &m_admin],
        "inconsistent",
    );
    assert_eq!(volume(&pair.mirror)["role"], "mirror");
    cli_ok(&["promote", PAIR_VOLUME, "--admin", &m_admin, "--force"]);
    assert_eq!(volume(&pair.mirror)["role"], "primary");
}

/// Three sites, each listing the other two as mirrors; site-a is the primary.
fn three_sites() -> (Vec<TestNode>, Vec<SocketAddr>) {
    let secret = new_secret();
    let ports: Vec<(SocketAddr, SocketAddr, SocketAddr)> = (0..3)
        .map(|_| {
            let p = |_| -> SocketAddr { format!("127.0.0.1:{}", free_port()).parse().unwrap() };
            (p(0), p(1), p(2))
        })
        .collect();
    let nodes = (0..3)
        .map(|i| {
            let (listen, admin, nbd) = ports[i];
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join("secret.key"), format!("{secret}\n")).unwrap();
            let img = dir.path().join("db.img");
            let role = if i == 0 { "primary" } else { "mirror" };
            let mut text = format!(
                "node = \"{}\"\nlisten = \"{listen}\"\nadmin = \"{admin}\"\nsecret_file = \"secret.key\"\n\n\
                 [[volume]]\nname = \"db\"\npath = \"{}\"\nsize = {}\nrole = \"{role}\"\nnbd = \"{nbd}\"\nmirror_timeout = \"1s\"\n",
                SITES[i],
                img.display(),
                32 * MIB
            );
            for (j, (l, _, _)) in ports.iter().enumerate() {
                if j != i {
                    text += &format!("\n[[volume.mirror]]\npeer = \"{l}\"\n");
                }
            }
            TestNode::from_config(dir, &text, admin, vec![format!("nbd://{nbd}/db")], vec![img], Vec::new())
        })
        .collect();
    (nodes, ports.iter().map(|p| p.0).collect())
}

const SITES: [&str; 3] = ["site-a", "site-b", "site-c"];

fn all_logs(nodes: &[TestNode]) -> String {
    nodes
        .iter()
        .map(|n| n.all_logs())
        .collect::<Vec<_>>()
        .join("\n=====\n")
}

/// Every one of `n`'s links (a primary's) is connected and in sync.
fn all_in_sync(n: &TestNode, links: usize) -> bool {
    volume(n)["mirrors"].as_array().is_some_and(|ls| {
        ls.len() == links
            && ls.iter().all(|l| {
                l["connection"] == "connected"
                    && l["state"] == "in_sync"
                    && l["out_of_sync_bytes"] == 0
            })
    })
}

/// Seed 004's "with one less mirror": A mirrors to B and C; A is lost; B is
/// promoted and keeps mirroring to C (compared block by block, since nothing
/// recorded how C differs from B), and A, when it returns, becomes B's
/// mirror too. All three end identical.
#[test]
fn promoted_mirror_keeps_mirroring_to_the_others() {
    require_tool("qemu-io");
    let (mut nodes, listens) = three_sites();
    wait_for("A in sync with B and C", Duration::from_secs(60), || {
        all_in_sync(&nodes[0], 2).then_some(())
    });
    qemu_io_ok(nodes[0].uri(), &["write -P 0x11 0 8M", "flush"]);
    nodes[0].stop_with("KILL");
    promote_once_its_primary_is_gone(&nodes[1], "db");
    qemu_io_ok(nodes[1].uri(), &["write -P 0x22 16M 2M", "flush"]);
    // B mirrors to C (A is still away).
    wait_for("B's link to C in sync", Duration::from_secs(60), || {
        let v = volume(&nodes[1]);
        v["mirrors"]
            .as_array()?
            .iter()
            .any(|l| {
                l["peer"] == listens[2].to_string()
                    && l["connection"] == "connected"
                    && l["state"] == "in_sync"
            })
            .then_some(())
    });
    let equal = metric(
        &nodes[1].metrics(),
        "blockmirror_resync_skipped_bytes_total",
    )
    .unwrap_or(0.0);
    assert!(
        equal >= (16 * MIB) as f64,
        "C was compared block by block and mostly found equal: {equal}\n{}",
        all_logs(&nodes)
    );
    // A returns and becomes B's mirror as well.
    nodes[0].restart();
    wait_for("B in sync with A and C", Duration::from_secs(60), || {
        all_in_sync(&nodes[1], 2).then_some(())
    });
    assert_eq!(volume(&nodes[0])["role"], "mirror");
    assert_eq!(volume(&nodes[2])["role"], "mirror");
    qemu_io_ok(nodes[1].uri(), &["flush"]);
    for i in [0, 2] {
        assert!(
            images_identical(nodes[1].image(), nodes[i].image()),
            "{} differs from site-b\n{}",
            SITES[i],
            all_logs(&nodes)
        );
    }
}

/// Two mirrors, one away: the primary's new generation (C misses writes) is
/// told to the live, in-sync B, so promoting B after A is lost is a clean
/// failover, not a false split brain; A and C both come back as B's mirrors.
#[test]
fn promoting_the_live_mirror_while_another_was_away_is_no_split_brain() {
    require_tool("qemu-io");
    let (mut nodes, _) = three_sites();
    wait_for("A in sync with B and C", Duration::from_secs(60), || {
        all_in_sync(&nodes[0], 2).then_some(())
    });
    nodes[2].stop_with("TERM");
    qemu_io_ok(nodes[0].uri(), &["write -P 0x33 0 4M", "flush"]);
    let a_gens = volume(&nodes[0])["generations"].clone();
    wait_for(
        "B to hold A's new generation",
        Duration::from_secs(30),
        || (volume(&nodes[1])["generations"] == a_gens).then_some(()),
    );
    nodes[0].stop_with("KILL");
    promote_once_its_primary_is_gone(&nodes[1], "db");
    qemu_io_ok(nodes[1].uri(), &["write -P 0x44 8M 1M", "flush"]);
    nodes[0].restart();
    nodes[2].restart();
    wait_for("B in sync with A and C", Duration::from_secs(60), || {
        all_in_sync(&nodes[1], 2).then_some(())
    });
    let st = volume(&nodes[1]);
    assert!(
        !st.to_string().contains("split_brain"),
        "{st}\n{}",
        all_logs(&nodes)
    );
    qemu_io_ok(nodes[1].uri(), &["flush"]);
    for i in [0, 2] {
        assert!(
            images_identical(nodes[1].image(), nodes[i].image()),
            "{} differs from site-b\n{}",
            SITES[i],
            all_logs(&nodes)
        );
    }
}

/// Both sides written after the split (A came back while B was down, and
/// wrote): a split brain, seen by both, nothing copied; `resync
/// --discard-local` on A (a primary here) demotes it and throws its changes
/// away, and B copies the whole volume to it.
#[test]
fn split_brain_between_symmetric_sites_is_resolved_by_discarding_one() {
    require_tool("qemu-io");
    let mut pair = PairBuilder::new(16 * MIB).symmetric().start();
    let p_admin = pair.primary.admin.to_string();
    qemu_io_ok(pair.primary.uri(), &["write -P 0x11 0 4M", "flush"]);
    pair.primary.stop_with("KILL");
    promote_once_its_primary_is_gone(&pair.mirror, PAIR_VOLUME);
    qemu_io_ok(pair.mirror.uri(), &["write -P 0x22 1M 1M", "flush"]);
    // B goes down; A returns, finds nobody, and is written.
    pair.mirror.stop_with("TERM");
    pair.primary.restart();
    qemu_io_ok(pair.primary.uri(), &["write -P 0x33 2M 1M", "flush"]);
    pair.mirror.restart();
    // Each side sees the other as a split brain; nothing is copied.
    wait_for(
        "A to report the split brain",
        Duration::from_secs(30),
        || (link_of(&pair.primary)["state"] == "split_brain").then_some(()),
    );
    wait_for(
        "B to report the split brain",
        Duration::from_secs(30),
        || (link_of(&pair.mirror)["state"] == "split_brain").then_some(()),
    );
    assert_eq!(volume(&pair.primary)["role"], "primary");
    assert_eq!(volume(&pair.mirror)["role"], "primary");
    // A's changes are thrown away: it becomes B's mirror, fully copied.
    cli_ok(&[
        "resync",
        PAIR_VOLUME,
        "--admin",
        &p_admin,
        "--discard-local",
        "--no-wait",
    ]);
    wait_in_sync_from(&pair.mirror, "the full copy to A", || pair.logs());
    assert_eq!(volume(&pair.primary)["role"], "mirror");
    assert!(
        metric(&pair.mirror.metrics(), "blockmirror_resync_bytes_total").unwrap_or(0.0)
            >= (16 * MIB) as f64
    );
    qemu_io_ok(pair.mirror.uri(), &["flush"]);
    assert!(images_identical(pair.primary.image(), pair.mirror.image()));
    let out = run(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-r",
        "-c",
        "read -P 0x22 1M 1M",
        pair.primary.uri(),
    ]));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("read 1048576/1048576"),
        "A holds B's data: {out:?}"
    );
}

/// A returning old primary whose link to its (promoted) mirror is slow to
/// come up: a host that writes to it at once is held by `start_wait` until
/// the link has met the peer, then refused (the volume demoted itself), so
/// no split brain arises; with `start_wait = "0s"` the same write lands and
/// the two sides split.
#[test]
fn returning_primary_holds_host_writes_until_it_met_its_peer() {
    require_tool("qemu-io");
    for (wait, expect_split) in [("5s", false), ("0s", true)] {
        let mut pair = PairBuilder::new(8 * MIB)
            .symmetric()
            .primary_volume(&format!("start_wait = \"{wait}\""))
            .through_delay(blockmirror_testkit::delay::Shape {
                delay: Duration::from_millis(150),
                rate: None,
            })
            .start();
        pair.primary.stop_with("KILL");
        promote_once_its_primary_is_gone(&pair.mirror, PAIR_VOLUME);
        pair.primary.restart();
        let out = qemu_io(pair.primary.uri(), &["write -P 0x11 0 4k"]);
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        let took = out.status.success() && !text.contains("failed");
        assert_eq!(
            took,
            expect_split,
            "start_wait {wait}: the write {} taken: {text}\n{}",
            if took { "was" } else { "was not" },
            pair.logs()
        );
        if expect_split {
            // A wrote after the split: B sees a split brain, copies nothing.
            wait_for(
                "B to report the split brain",
                Duration::from_secs(30),
                || (link_of(&pair.mirror)["state"] == "split_brain").then_some(()),
            );
        } else {
            wait_in_sync_from(&pair.mirror, "the failback", || pair.logs());
            assert_eq!(volume(&pair.primary)["role"], "mirror");
        }
    }
}

/// Rounds of disaster and failback with the roles swapping each time: the
/// history writer runs on whichever side is primary, that side is killed
/// at a random point, the other is promoted and must hold every write that
/// was acknowledged (sync mirror), the killed side returns as its mirror and
/// the two end identical. `BLOCKMIRROR_FAILOVER_ROUNDS` raises the count
/// (default 6), `BLOCKMIRROR_SEED` replays one run.
#[test]
fn repeated_failover_and_failback_lose_no_acknowledged_write() {
    failover_rounds(
        "mode = \"sync\"",
        blockmirror_testkit::history::Require::Acked,
    );
}

/// The same with async mirrors: the promoted side may lag (the RPO), but it
/// holds a state the old primary passed through (dependency closed), and the
/// failback still ends identical (the old primary's unacknowledged writes are
/// in the regions it reports).
#[test]
fn repeated_async_failover_keeps_the_mirror_dependency_closed() {
    failover_rounds(
        "mode = \"async\"",
        blockmirror_testkit::history::Require::Prefix,
    );
}

fn failover_rounds(mirror_table: &str, require: blockmirror_testkit::history::Require) {
    use blockmirror_testkit::history;
    use blockmirror_testkit::writer::{self, Progress, WriterConfig};
    use std::sync::atomic::Ordering::Relaxed;
    let rounds: u64 = std::env::var("BLOCKMIRROR_FAILOVER_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6);
    let mut seed: u64 = std::env::var("BLOCKMIRROR_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    println!("seed {seed} (BLOCKMIRROR_SEED replays it)");
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    const REGION: u64 = 4 * MIB; // each round writes its own region
    let pair = PairBuilder::new(rounds * REGION + 4 * MIB)
        .mirror_table(mirror_table)
        .symmetric()
        .start();
    let mut nodes = [pair.primary, pair.mirror];
    let logs = tempfile::tempdir().unwrap();
    let all_logs =
        |nodes: &[TestNode; 2]| format!("{}\n=====\n{}", nodes[0].all_logs(), nodes[1].all_logs());
    for r in 0..rounds {
        let (p, m) = ((r % 2) as usize, ((r + 1) % 2) as usize);
        let log = logs.path().join(format!("round{r}.log"));
        let acked = 200 + next() % 1500;
        let mut cfg =
            WriterConfig::new(nodes[p].uri(), &log, REGION / 4096, Duration::from_secs(30));
        cfg.offset = r * REGION;
        cfg.queue_depth = 16;
        cfg.flush_every = 64;
        cfg.seed = next();
        let progress = Progress::default();
        std::thread::scope(|s| {
            let w = s.spawn(|| writer::run(&cfg, &progress));
            wait_for("acknowledged writes", Duration::from_secs(30), || {
                assert!(!w.is_finished(), "the writer stopped early");
                (progress.writes_acked.load(Relaxed) >= acked).then_some(())
            });
            nodes[p].stop_with("KILL");
            let _ = w.join().unwrap();
        });
        wait_for(
            "the mirror to see its primary gone",
            Duration::from_secs(30),
            || volume(&nodes[m]).get("primary").is_none().then_some(()),
        );
        cli_ok(&[
            "promote",
            PAIR_VOLUME,
            "--admin",
            &nodes[m].admin.to_string(),
        ]);
        let report = history::check_image(nodes[m].image(), &log).unwrap();
        assert!(
            report.holds(require),
            "round {r} ({mirror_table}, killed after {acked} acknowledged writes): the promoted \
             mirror does not keep {require:?}:\n{}",
            report.summary()
        );
        nodes[p].restart();
        wait_for(
            "the old primary to demote itself",
            Duration::from_secs(30),
            || (volume(&nodes[p])["role"] == "mirror").then_some(()),
        );
        wait_in_sync_from(&nodes[m], "the failback", || all_logs(&nodes));
        qemu_io_ok(nodes[m].uri(), &["flush"]);
        assert!(
            images_identical(nodes[p].image(), nodes[m].image()),
            "round {r}: images differ after the failback\n{}",
            all_logs(&nodes)
        );
    }
}
