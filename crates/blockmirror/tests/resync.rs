//! Resync with real processes and real clients: generation ids decide what a
//! reconnecting mirror gets, a split brain stops automatic copying until an
//! operator discards one side, and a resync after an outage copies only what
//! changed.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

const MIB: u64 = 1 << 20;

/// Reads `len` bytes at `offset` of a file.
fn read_at(path: &std::path::Path, offset: u64, len: usize) -> Vec<u8> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    let mut b = vec![0; len];
    f.read_exact(&mut b).unwrap();
    b
}

fn all(b: &[u8], x: u8) -> bool {
    b.iter().all(|&y| y == x)
}

/// Promote a disconnected mirror, write on both sides, reconnect: a split
/// brain, reported and not copied over. `resync --discard-local` on the
/// promoted side resolves it: it becomes the mirror again, takes a full
/// copy, and both images end identical.
#[test]
fn split_brain_is_detected_and_resolved_by_discarding_one_side() {
    require_tool("qemu-io");
    let mut pair = PairBuilder::new(16 * MIB).start();
    let (p_admin, m_admin) = (
        pair.primary.admin.to_string(),
        pair.mirror.admin.to_string(),
    );
    qemu_io_ok(pair.primary.uri(), &["write -P 0x11 0 4M", "flush"]);
    pair.assert_images_identical();

    // While its primary feeds it, a mirror is not promoted without --force.
    let out = cli(&["promote", PAIR_VOLUME, "--admin", &m_admin]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--force"), "{err}");
    assert_eq!(pair.mirror.status_json()["volumes"][0]["role"], "mirror");

    // The primary site goes away; the mirror is promoted and written.
    pair.primary.stop_with("KILL");
    wait_for(
        "the mirror to see its primary gone",
        Duration::from_secs(30),
        || {
            pair.mirror.status_json()["volumes"][0]
                .get("primary")
                .is_none()
                .then_some(())
        },
    );
    let out = cli(&["promote", PAIR_VOLUME, "--admin", &m_admin, "--force"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let st = pair.mirror.status_json();
    assert_eq!(st["volumes"][0]["role"], "primary", "{st}");
    assert_eq!(st["volumes"][0]["read_only"], false, "{st}");
    qemu_io_ok(pair.mirror.uri(), &["write -P 0x22 1M 1M", "flush"]);

    // The old primary comes back and is written too: both sides diverged.
    pair.primary.restart();
    qemu_io_ok(pair.primary.uri(), &["write -P 0x33 2M 1M", "flush"]);
    let link = pair.wait_link("split_brain", Duration::from_secs(30), |l| {
        l["state"] == "split_brain"
    });
    assert!(
        link["last_error"]
            .as_str()
            .unwrap_or("")
            .contains("split brain"),
        "{link}"
    );
    let m = pair.primary.metrics();
    assert!(
        m.contains(&format!(
            "blockmirror_mirror_state{{volume=\"{PAIR_VOLUME}\",peer=\"{}\",state=\"split_brain\"}} 1",
            pair.mirror_listen
        )),
        "{m}"
    );
    // Nothing was copied either way: each side still holds its own writes.
    assert_eq!(pair.primary_metric("blockmirror_resync_bytes_total"), 0.0);
    assert!(all(&read_at(pair.mirror.image(), MIB, MIB as usize), 0x22));
    assert!(all(
        &read_at(pair.mirror.image(), 2 * MIB, MIB as usize),
        0x11
    ));
    assert!(all(&read_at(pair.primary.image(), MIB, MIB as usize), 0x11));
    assert!(all(
        &read_at(pair.primary.image(), 2 * MIB, MIB as usize),
        0x33
    ));
    // Asking the configured primary to discard itself is refused (that is failback).
    let out = cli(&[
        "resync",
        PAIR_VOLUME,
        "--admin",
        &p_admin,
        "--discard-local",
    ]);
    assert!(
        !out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // The promoted side gives up its changes; the CLI follows the full copy.
    let out = cli(&[
        "resync",
        PAIR_VOLUME,
        "--admin",
        &m_admin,
        "--discard-local",
    ]);
    assert!(
        out.status.success(),
        "resync --discard-local: {}{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        pair.logs()
    );
    pair.wait_in_sync(Duration::from_secs(60));
    pair.flush_primary();
    pair.assert_images_identical();
    assert!(all(&read_at(pair.mirror.image(), MIB, MIB as usize), 0x11));
    assert!(all(
        &read_at(pair.mirror.image(), 2 * MIB, MIB as usize),
        0x33
    ));
    // A full copy: the whole volume.
    assert!(pair.primary_metric("blockmirror_resync_bytes_total") >= (16 * MIB) as f64);
    // The discarded side is a read-only mirror again, holding the primary's generation.
    let st = pair.mirror.status_json();
    assert_eq!(st["volumes"][0]["role"], "mirror", "{st}");
    assert_eq!(st["volumes"][0]["state"], "in_sync", "{st}");
    assert_eq!(
        st["volumes"][0]["generations"],
        pair.primary.status_json()["volumes"][0]["generations"]
    );
    let out = qemu_io(pair.mirror.uri(), &["write -P 0x44 0 4k"]);
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() || text.contains("failed"),
        "mirror took a write: {text}"
    );
}

/// After a mirror outage only what was written meanwhile is copied; after
/// both nodes restart cleanly, nothing is.
#[test]
fn resync_after_an_outage_copies_only_what_changed() {
    require_tool("qemu-io");
    let mut pair = PairBuilder::new(64 * MIB).start();
    let initial = pair.primary_metric("blockmirror_resync_bytes_total");
    assert!(
        initial >= (64 * MIB) as f64,
        "a new mirror gets the whole volume: {initial}"
    );
    let gen_before = pair.primary.status_json()["volumes"][0]["generations"].clone();
    assert_eq!(
        pair.mirror.status_json()["volumes"][0]["generations"],
        gen_before
    );

    pair.mirror.stop_with("KILL");
    pair.wait_link("degraded", Duration::from_secs(30), |l| {
        l["state"] == "degraded"
    });
    let written = 3 * MIB;
    qemu_io_ok(
        pair.primary.uri(),
        &[
            "write -P 0x5a 4M 1M",
            "write -P 0x5b 20M 1M",
            "write -P 0x5c 63M 1M",
            "flush",
        ],
    );
    // The first write the mirror missed started a new generation.
    let gen_outage = pair.primary.status_json()["volumes"][0]["generations"].clone();
    assert_ne!(gen_outage, gen_before);
    assert!(
        gen_outage
            .as_str()
            .unwrap()
            .contains(gen_before.as_str().unwrap()),
        "the old generation is in the history: {gen_outage} vs {gen_before}"
    );

    pair.mirror.restart();
    pair.wait_in_sync(Duration::from_secs(60));
    let copied = pair.primary_metric("blockmirror_resync_bytes_total") - initial;
    assert!(
        copied >= written as f64 && copied <= (written + MIB) as f64,
        "resync copied {copied} bytes for {written} written"
    );
    pair.flush_primary();
    pair.assert_images_identical();
    assert_eq!(
        pair.mirror.status_json()["volumes"][0]["generations"],
        gen_outage
    );

    // Both stop cleanly and start again: same generation, nothing to copy.
    pair.primary.stop_with("TERM");
    pair.mirror.stop_with("TERM");
    pair.mirror.restart();
    pair.primary.restart();
    pair.wait_in_sync(Duration::from_secs(30));
    assert_eq!(pair.primary_metric("blockmirror_resync_bytes_total"), 0.0);
    assert_eq!(
        pair.primary.status_json()["volumes"][0]["generations"],
        gen_outage
    );
    pair.assert_images_identical();
}

/// A new mirror is filled from scratch (seed 004 FIG. 2) while a host keeps
/// writing (fio): passes copy while writes only mark the change mask, a final
/// copy suspends writes briefly (measured, reported in /status, /metrics and
/// the log), then the link is live; the images end byte-identical.
#[test]
fn initial_sync_under_a_write_load_ends_identical() {
    require_tool("fio");
    require_tool("qemu-io");
    let pair = PairBuilder::new(256 * MIB)
        .primary_volume("resync_threshold = \"8MiB\"\nresync_max_suspension = \"2s\"")
        .no_wait()
        .start();
    // A paced load: an unpaced one can dirty regions faster than a pass
    // copies them, and then (by design) the sync gives up on the iterative
    // scheme and goes live, which this test is not about.
    let fio = Command::new("fio")
        .args([
            "--name=load",
            "--ioengine=nbd",
            &format!("--uri={}", pair.primary.uri()),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=32",
            "--size=32M",
            "--time_based",
            "--runtime=15",
            "--rate_iops=2000",
            "--randrepeat=0",
            "--norandommap",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start fio");
    let link = pair.wait_link("in sync", Duration::from_secs(300), |l| {
        l["connection"] == "connected" && l["state"] == "in_sync"
    });
    let still_writing = pair.primary.metrics();
    fio_finish(fio);
    pair.wait_in_sync(Duration::from_secs(60));
    pair.flush_primary();
    pair.assert_images_identical();

    assert!(link["resync_passes"].as_u64().unwrap() >= 1, "{link}");
    assert!(pair.primary_metric("blockmirror_resync_bytes_total") >= (256 * MIB) as f64);
    assert_eq!(pair.mirror.status_json()["volumes"][0]["state"], "in_sync");
    let Some(suspended_us) = link["resync_suspension_us"].as_u64() else {
        // On a loaded machine the host writes can outpace every pass: the
        // documented fallback goes live with the range-locked catch-up and
        // suspends nothing. The images were compared above either way.
        assert!(
            pair.primary
                .log()
                .contains("host writes outpace the copy: going live"),
            "no suspension and no fallback: {link}\n{}",
            pair.logs()
        );
        eprintln!("SKIPPED the suspension checks: the passes did not converge under this load");
        return;
    };
    assert!(suspended_us > 0 && suspended_us < 2_000_000, "{link}");
    assert_eq!(
        metric(&still_writing, "blockmirror_resync_suspensions_total"),
        Some(1.0)
    );
    let total = metric(&still_writing, "blockmirror_resync_suspended_seconds_total").unwrap();
    assert!(
        (total - suspended_us as f64 / 1e6).abs() < 1e-3,
        "{total} vs {suspended_us}"
    );
    assert!(pair.primary.log().contains("host writes were suspended"));
    eprintln!(
        "initial sync of 256 MiB under fio: {} passes, host writes suspended {:.2} ms",
        link["resync_passes"],
        suspended_us as f64 / 1000.0
    );
}

/// `resync --rate` paces the copy, and a new rate applies to a copy that is
/// already running.
#[test]
fn resync_rate_is_enforced_and_adjustable_while_running() {
    require_tool("qemu-io");
    let mut pair = PairBuilder::new(64 * MIB).start();
    let p_admin = pair.primary.admin.to_string();
    let out = cli(&[
        "resync",
        PAIR_VOLUME,
        "--admin",
        &p_admin,
        "--rate",
        "2MiB",
        "--no-wait",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(pair.link()["resync_rate_bytes_per_sec"], 2 * MIB);

    pair.mirror.stop_with("KILL");
    pair.wait_link("degraded", Duration::from_secs(30), |l| {
        l["state"] == "degraded"
    });
    qemu_io_ok(pair.primary.uri(), &["write -P 0x77 0 32M", "flush"]);
    let before = pair.primary_metric("blockmirror_resync_bytes_total");
    let started = std::time::Instant::now();
    pair.mirror.restart();
    // At 2 MiB/s the 32 MiB take about 14 s: it is still copying after 2 s.
    let link = pair.wait_link("resyncing", Duration::from_secs(30), |l| {
        l["state"] == "resyncing" && l["resync_done_bytes"].as_u64().unwrap_or(0) > 0
    });
    wait_for(
        "two seconds of paced copying",
        Duration::from_secs(30),
        || (started.elapsed() >= Duration::from_secs(2)).then_some(()),
    );
    let copied = pair.primary_metric("blockmirror_resync_bytes_total") - before;
    let secs = started.elapsed().as_secs_f64();
    assert!(
        copied <= 2.0 * MIB as f64 * secs + 8.0 * MIB as f64,
        "copied {copied} bytes in {secs:.1} s at 2 MiB/s; {link}"
    );
    assert!(copied < (32 * MIB) as f64, "not paced: {copied}");
    // Unlimited from now on: the rest goes at once.
    let out = cli(&["resync", PAIR_VOLUME, "--admin", &p_admin, "--rate", "0"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    pair.wait_in_sync(Duration::from_secs(8));
    assert!(
        started.elapsed() < Duration::from_secs(12),
        "{:?}",
        started.elapsed()
    );
    pair.flush_primary();
    pair.assert_images_identical();
}

/// Checksum resync (`resync_checksum = true`): regions marked but equal on
/// the mirror are compared by BLAKE3 hash and not sent; only what differs is.
#[test]
fn checksum_resync_sends_only_regions_that_differ() {
    require_tool("qemu-io");
    let mut pair = PairBuilder::new(32 * MIB)
        .primary_volume("resync_checksum = true")
        .start();
    qemu_io_ok(pair.primary.uri(), &["write -P 0x11 0 8M", "flush"]);
    pair.assert_images_identical();

    pair.mirror.stop_with("KILL");
    pair.wait_link("degraded", Duration::from_secs(30), |l| {
        l["state"] == "degraded"
    });
    // 8 MiB rewritten with the same bytes (marked, but equal), 1 MiB changed.
    qemu_io_ok(
        pair.primary.uri(),
        &["write -P 0x11 0 8M", "write -P 0x22 16M 1M", "flush"],
    );
    let sent_before = pair.primary_metric("blockmirror_resync_bytes_total");
    let skipped_before = pair.primary_metric("blockmirror_resync_skipped_bytes_total");
    pair.mirror.restart();
    pair.wait_in_sync(Duration::from_secs(60));
    let sent = pair.primary_metric("blockmirror_resync_bytes_total") - sent_before;
    let skipped = pair.primary_metric("blockmirror_resync_skipped_bytes_total") - skipped_before;
    assert!(
        skipped >= (8 * MIB) as f64,
        "equal regions were sent: skipped {skipped}, sent {sent}"
    );
    assert!(
        sent >= MIB as f64 && sent <= (2 * MIB) as f64,
        "sent {sent}"
    );
    pair.flush_primary();
    pair.assert_images_identical();
    assert!(all(
        &read_at(pair.mirror.image(), 16 * MIB, MIB as usize),
        0x22
    ));
}

/// `--discard-local` on a connected mirror cuts its link; the primary
/// reconnects, finds it blank and copies the whole volume again.
#[test]
fn discard_local_on_a_connected_mirror_forces_a_full_copy() {
    require_tool("qemu-io");
    let pair = PairBuilder::new(16 * MIB).start();
    qemu_io_ok(pair.primary.uri(), &["write -P 0x66 0 2M", "flush"]);
    let before = pair.primary_metric("blockmirror_resync_bytes_total");
    let m_admin = pair.mirror.admin.to_string();
    let out = cli(&[
        "resync",
        PAIR_VOLUME,
        "--admin",
        &m_admin,
        "--discard-local",
    ]);
    assert!(
        out.status.success(),
        "{}{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        pair.logs()
    );
    pair.wait_in_sync(Duration::from_secs(60));
    let copied = pair.primary_metric("blockmirror_resync_bytes_total") - before;
    assert!(copied >= (16 * MIB) as f64, "copied {copied}");
    pair.flush_primary();
    pair.assert_images_identical();
}
