//! Asynchronous mirroring end to end (DESIGN.md guarantee 2): the host is
//! answered at local speed, and the mirror always holds a state the primary
//! passed through: if it holds write B, it holds every write that completed
//! before B was issued. Checked with the testkit's history writer and
//! checker after the primary or the mirror is killed at random points, and
//! with the lag bound and its policies over the testkit's delay proxy.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use blockmirror_testkit::delay::Shape;
use common::kill::{check_prefix, rng, seed, write_then_kill};
use common::*;

const MIB: u64 = 1 << 20;

#[test]
fn primary_killed_at_random_points_leaves_a_dependency_closed_mirror() {
    kill::primary_kill_rounds(kill::kills(20), |round| {
        // Every other round the mirror uses O_DIRECT: every write then goes
        // to one of its parallel apply tasks, the case epochs are for.
        let mirror = if round % 2 == 0 {
            "direct_io = true\napply_groups = 4\napply_tasks_per_group = 4"
        } else {
            ""
        };
        PairBuilder::new(16 * MIB)
            .mirror_table("mode = \"async\"")
            .mirror_volume(mirror)
    });
}

#[test]
fn mirror_killed_mid_apply_is_dependency_closed_and_catches_up() {
    kill::mirror_kill_rounds(kill::kills(20), |_| {
        PairBuilder::new(16 * MIB)
            .mirror_table("mode = \"async\"")
            .mirror_volume("direct_io = true\napply_groups = 4\napply_tasks_per_group = 4")
    });
}

/// Polls the link's lag while `load` runs; returns the largest seen.
fn max_lag_during(pair: &Pair, mut load: std::process::Child) -> (u64, String) {
    let mut max = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while load.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "load did not end");
        let l = pair.link();
        max = max.max(l["lag_bytes"].as_u64().unwrap_or(0));
        std::thread::park_timeout(Duration::from_millis(20));
    }
    (max, fio_finish(load))
}

fn fio_seq(uri: &str, seconds: u32) -> std::process::Child {
    Command::new("fio")
        .args([
            "--ioengine=nbd",
            "--name=seq",
            &format!("--uri={uri}"),
            "--rw=write",
            "--bs=256k",
            "--iodepth=8",
            "--size=32M",
            "--time_based",
            &format!("--runtime={seconds}"),
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("fio")
}

#[test]
fn throttle_keeps_the_lag_under_its_bound_over_a_slow_link() {
    require_tool("fio");
    require_tool("qemu-io");
    let pair = PairBuilder::new(32 * MIB)
        .through_delay(Shape {
            delay: Duration::from_millis(5),
            rate: Some(8 << 20),
        })
        .mirror_timeout("10s")
        .mirror_table("mode = \"async\"\nmax_lag_bytes = \"2MiB\"\nlag_policy = \"throttle\"")
        .start();
    let (max, out) = max_lag_during(&pair, fio_seq(pair.primary.uri(), 3));
    assert!(out.contains("err= 0"), "{out}");
    // The bound plus what the writes in flight when it was reached add:
    // at most one 256 KiB write per queue slot.
    assert!(
        max <= 2 * MIB + 8 * 256 * 1024,
        "lag reached {max} bytes with a 2 MiB bound"
    );
    let m = pair.primary.metrics();
    let throttled = metric(&m, "blockmirror_mirror_throttled_writes_total").unwrap_or(0.0);
    assert!(throttled > 0.0, "the link was never past its bound:\n{m}");
    let link = pair.link();
    assert_eq!(link["state"], "in_sync", "{link}");
    pair.flush_primary();
    wait_for("the mirror to catch up", Duration::from_secs(30), || {
        (pair.link()["lag_bytes"] == 0).then_some(())
    });
    pair.assert_images_identical();
}

#[test]
fn bitmap_policy_marks_the_mirror_inconsistent_then_resyncs_it() {
    require_tool("fio");
    require_tool("qemu-io");
    let pair = PairBuilder::new(32 * MIB)
        .through_delay(Shape {
            delay: Duration::from_millis(5),
            rate: Some(8 << 20),
        })
        .mirror_timeout("10s")
        .mirror_table("mode = \"async\"\nmax_lag_bytes = \"1MiB\"\nlag_policy = \"bitmap\"")
        .start();
    let load = fio_seq(pair.primary.uri(), 3);
    let mut seen_inconsistent = false;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut load = load;
    while load.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "load did not end");
        let l = pair.link();
        if l["state"] == "inconsistent" {
            seen_inconsistent = true;
        }
        std::thread::park_timeout(Duration::from_millis(10));
    }
    let out = fio_finish(load);
    assert!(out.contains("err= 0"), "{out}");
    assert!(seen_inconsistent, "never past the bound\n{}", pair.logs());
    let m = pair.primary.metrics();
    assert_eq!(
        metric(&m, "blockmirror_mirror_throttled_writes_total").unwrap_or(0.0),
        0.0,
        "the bitmap policy never makes the host wait"
    );
    // After the load, the recorded regions are resynced: consistent again.
    // A last small write brings the write path round to start it.
    let out = run_ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0x11 0 4k",
        "-c",
        "flush",
        pair.primary.uri(),
    ]));
    assert!(!out.contains("failed"), "{out}");
    pair.wait_in_sync(Duration::from_secs(60));
    wait_for("the last writes applied", Duration::from_secs(30), || {
        (pair.link()["lag_bytes"] == 0).then_some(())
    });
    pair.assert_images_identical();
}

#[test]
fn switching_between_sync_and_async_while_writing_loses_nothing() {
    require_tool("fio");
    require_tool("qemu-io");
    let pair = PairBuilder::new(32 * MIB).start();
    let admin = pair.primary.admin.to_string();
    let load = Command::new("fio")
        .args([
            "--ioengine=nbd",
            "--name=rand",
            &format!("--uri={}", pair.primary.uri()),
            "--rw=randwrite",
            "--bssplit=4k/70:64k/20:1m/10",
            "--iodepth=16",
            "--size=32M",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_state_save=0",
            "--randrepeat=0",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("fio");
    let mut switches = 0;
    let mut mode = "async";
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut load = load;
    while load.try_wait().unwrap().is_none() && switches < 40 {
        assert!(Instant::now() < deadline, "load did not end");
        let out = run_ok(Command::new(BIN).args(["set-mode", "vol", mode, "--admin", &admin]));
        assert!(out.contains(mode), "{out}");
        let st = pair.link();
        assert!(st["mode"] == "sync" || st["mode"] == "async", "{st}");
        mode = if mode == "async" { "sync" } else { "async" };
        switches += 1;
    }
    let out = fio_finish(load);
    assert!(out.contains("err= 0"), "{out}");
    assert!(!out.contains("verify:"), "{out}");
    assert!(switches >= 2, "the load ended before two switches");
    pair.flush_primary();
    wait_for("the last writes applied", Duration::from_secs(30), || {
        (pair.link()["lag_bytes"] == 0).then_some(())
    });
    pair.assert_images_identical();
    let link = pair.link();
    assert_eq!(link["state"], "in_sync", "{link}");
}

/// `durable_barriers = true`: every epoch is flushed on the mirror before
/// the next starts (crash consistency across the mirror's own OS crash).
/// The mirror flushes once per epoch, and a mirror killed mid-apply is still
/// dependency-closed and catches up.
#[test]
fn durable_barriers_flush_every_epoch() {
    let mut seed = seed();
    let mut pair = PairBuilder::new(16 * MIB)
        .mirror_table("mode = \"async\"\ndurable_barriers = true")
        .start();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("history.log");
    let acked = 500 + rng(&mut seed) % 1000;
    write_then_kill(&mut pair, &log, acked, false);
    let m = pair.mirror.log();
    check_prefix(
        pair.mirror.image(),
        &log,
        "mirror killed with durable barriers",
    );
    pair.mirror.spawn();
    pair.wait_in_sync(Duration::from_secs(30));
    pair.flush_primary();
    let sent = pair.primary_metric("blockmirror_mirror_epochs_total");
    assert!(sent > 0.0, "epochs were sent: {sent}\n{m}");
    // Three sequential writes are three epochs (each write after the
    // previous one was answered): the restarted mirror makes each durable.
    let out = run_ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0x11 0 4k",
        "-c",
        "write -P 0x12 8k 4k",
        "-c",
        "write -P 0x13 16k 4k",
        pair.primary.uri(),
    ]));
    assert!(!out.contains("failed"), "{out}");
    wait_for(
        "the epochs made durable on the mirror",
        Duration::from_secs(10),
        || {
            let d = metric(
                &pair.mirror.metrics(),
                "blockmirror_apply_durable_barriers_total",
            )?;
            (d >= 2.0).then_some(())
        },
    );
    pair.flush_primary();
    wait_for("the last writes applied", Duration::from_secs(10), || {
        (pair.link()["lag_bytes"] == 0).then_some(())
    });
    pair.assert_images_identical();
}
