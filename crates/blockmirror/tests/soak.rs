//! Faults on purpose (issue 20): a corrupted byte on the replication link is
//! caught by the protocol's checksums (the link drops and reconnects,
//! nothing wrong is applied), a connection dropped mid-frame and a stall
//! resync to identical images, and a few `blockmirror-soak` cycles of every
//! fault pass in both modes.

mod common;

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use blockmirror_testkit::faultnet::{Direction, NetFault};
use blockmirror_testkit::history::{self, Require};
use blockmirror_testkit::soak::{self, Fault, Mode, SoakConfig};
use blockmirror_testkit::writer::{self, Progress, WriterConfig};
use common::*;

const MIB: u64 = 1 << 20;

/// Runs the history writer on the pair's primary while `fault` is injected
/// into the link; waits until it fired, lets the writer go on a little,
/// then stops it and checks: in sync again, every acknowledged write on the
/// mirror, images identical. Returns the mirror's log.
fn write_through(pair: &Pair, fault: NetFault, log: &std::path::Path) -> String {
    let proxy = pair.fault_proxy.as_ref().unwrap();
    let mut cfg = WriterConfig::new(pair.primary.uri(), log, 2048, Duration::from_secs(60));
    cfg.queue_depth = 8;
    // Above every earlier run's numbers on this pair: its blocks are reused.
    static RUN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    cfg.first_seq = RUN.fetch_add(1, Relaxed) << 32;
    let progress = Progress::default();
    let reconnects = pair.primary_metric("blockmirror_link_reconnects_total");
    std::thread::scope(|s| {
        let w = s.spawn(|| writer::run(&cfg, &progress));
        wait_for("some writes", Duration::from_secs(30), || {
            (progress.writes_acked.load(Relaxed) >= 200).then_some(())
        });
        proxy.inject(fault);
        wait_for("the fault to fire", Duration::from_secs(30), || {
            (!proxy.armed()).then_some(())
        });
        if !matches!(fault, NetFault::Stall(_)) {
            wait_for("the link to reconnect", Duration::from_secs(30), || {
                (pair.primary_metric("blockmirror_link_reconnects_total") > reconnects)
                    .then_some(())
            });
        }
        let n = progress.writes_acked.load(Relaxed);
        wait_for("more writes", Duration::from_secs(30), || {
            (progress.writes_acked.load(Relaxed) >= n + 200).then_some(())
        });
        progress.stop.store(true, Relaxed);
        let s = w.join().unwrap().unwrap();
        assert_eq!(s.writes_failed, 0, "{s:?}");
    });
    pair.wait_in_sync(Duration::from_secs(30));
    pair.flush_primary();
    wait_for("the last writes applied", Duration::from_secs(10), || {
        (pair.link()["lag_bytes"] == 0).then_some(())
    });
    let report = history::check_image(pair.mirror.image(), log).unwrap();
    assert!(
        report.holds(Require::Acked),
        "{fault}: the mirror lost acknowledged writes:\n{}",
        report.summary()
    );
    pair.assert_images_identical();
    pair.mirror.all_logs()
}

#[test]
fn a_corrupted_byte_is_caught_by_the_checksums_and_nothing_wrong_is_applied() {
    let pair = PairBuilder::new(16 * MIB).through_faults().start();
    let dir = tempfile::tempdir().unwrap();
    // A byte of a Write frame on its way to the mirror: the mirror's
    // decoder refuses the frame (header or payload crc32c) and closes the
    // link; the primary marks what was in flight and copies it again.
    let log = write_through(
        &pair,
        NetFault::Corrupt {
            dir: Direction::ToTarget,
            after: 300_000,
            mask: 0x01,
        },
        &dir.path().join("to-mirror.log"),
    );
    assert!(
        log.contains("checksum mismatch"),
        "the mirror names the checksum it caught:\n{log}"
    );
    // A byte of an acknowledgement on its way back: the primary refuses it.
    write_through(
        &pair,
        NetFault::Corrupt {
            dir: Direction::ToClient,
            after: 5_000,
            mask: 0x80,
        },
        &dir.path().join("to-primary.log"),
    );
    let plog = pair.primary.all_logs();
    assert!(
        plog.contains("checksum mismatch"),
        "the primary names the checksum it caught:\n{plog}"
    );
    assert_eq!(
        pair.fault_proxy
            .as_ref()
            .unwrap()
            .stats()
            .corrupted
            .load(Relaxed),
        2
    );
}

#[test]
fn a_link_dropped_mid_frame_or_stalled_resyncs_to_identical_images() {
    let pair = PairBuilder::new(16 * MIB).through_faults().start();
    let dir = tempfile::tempdir().unwrap();
    // Counted from when it is armed, so almost surely inside a frame (the
    // mirror then logs "mid-frame"); either way the link must come back.
    write_through(
        &pair,
        NetFault::Drop {
            dir: Direction::ToTarget,
            after: 100_001,
        },
        &dir.path().join("drop.log"),
    );
    // Longer than mirror_timeout (1 s): the watchdog fails the link.
    write_through(
        &pair,
        NetFault::Stall(Duration::from_millis(1500)),
        &dir.path().join("stall.log"),
    );
}

fn soak_each_fault(mode: Mode, seed: u64) {
    for (i, fault) in Fault::ALL.into_iter().enumerate() {
        let cfg = SoakConfig {
            mode,
            cycles: 1,
            first_cycle: i as u64,
            seed,
            dir: None,
            bin: BIN.into(),
            cycle_deadline: Duration::from_secs(90),
            faults: vec![fault],
            keep: false,
        };
        let mut lines = Vec::new();
        let r = soak::run(&cfg, &mut |l: &str| lines.push(l.to_string()));
        let text = lines.join("\n");
        let s = r.unwrap_or_else(|e| panic!("{}: {e}\n{text}", fault.name()));
        assert_eq!(s.violations, 0, "{}:\n{text}", fault.name());
        assert_eq!(s.cycles, 1);
        assert!(s.writes_checked > 0, "{text}");
        println!("{text}\n{}", s.line());
    }
}

#[test]
fn soak_cycles_of_every_fault_pass_in_sync_mode() {
    soak_each_fault(Mode::Sync, 11);
}

#[test]
fn soak_cycles_of_every_fault_pass_in_async_mode() {
    soak_each_fault(Mode::Async, 12);
}
