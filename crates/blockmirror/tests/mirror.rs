//! Synchronous mirroring end to end: a primary node and a mirror node as real
//! `blockmirror serve` processes on loopback, driven by real clients (fio,
//! qemu-io, nbdsh) and by the testkit's history writer, with the mirror or
//! the primary killed mid-load.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use blockmirror_testkit::history::{self, Require};
use blockmirror_testkit::writer::{self, End, Progress, WriterConfig};
use common::*;

const MIB: u64 = 1 << 20;

fn qemu_io(uri: &str, cmds: &[&str]) -> (bool, String) {
    qemu_io_with(&[], uri, cmds)
}

/// qemu-io with extra options (e.g. `-r` to open read-only); (success, output).
fn qemu_io_with(opts: &[&str], uri: &str, cmds: &[&str]) -> (bool, String) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]).args(opts);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = run(c.arg(uri));
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

fn still_running(c: &mut Child) -> bool {
    c.try_wait().unwrap().is_none()
}

#[test]
fn fio_verify_on_primary_leaves_identical_images() {
    require_tool("fio");
    require_tool("qemu-io");
    let pair = PairBuilder::new(64 * MIB).start();
    let before = pair.primary_metric("blockmirror_replicated_bytes_total");
    let uri = format!("--uri={}", pair.primary.uri());
    // Two jobs at once: 4 KiB random writes with crc32c verification over
    // the first half, 1 MiB sequential writes over the second half.
    let out = run_ok(Command::new("fio").args([
        "--ioengine=nbd",
        "--name=rand",
        &uri,
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=32",
        "--size=32M",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_state_save=0",
        "--randrepeat=0",
        "--name=seq",
        &uri,
        "--rw=write",
        "--bs=1M",
        "--iodepth=8",
        "--offset=32M",
        "--size=32M",
    ]));
    assert!(out.contains("err= 0"), "{out}");
    assert!(!out.contains("verify:"), "fio verification failed:\n{out}");
    pair.flush_primary();
    pair.assert_images_identical();
    // The mirror really holds data (not two all-zero files), and the
    // counter of replicated bytes counts both jobs.
    let img = std::fs::read(pair.mirror.image()).unwrap();
    assert!(img[(32 * MIB) as usize..].iter().any(|&b| b != 0));
    let grown = pair.primary_metric("blockmirror_replicated_bytes_total") - before;
    assert!(
        grown >= (64 * MIB) as f64,
        "replicated bytes grew by {grown}, expected at least 64 MiB"
    );
    let link = pair.link();
    assert_eq!(link["state"], "in_sync", "{link}");
    assert_eq!(link["out_of_sync_bytes"], 0, "{link}");
}

#[test]
fn mirror_export_refuses_writes_and_serves_replicated_data() {
    require_tool("qemu-io");
    let pair = PairBuilder::new(16 * MIB).start();
    let (ok, out) = qemu_io(pair.primary.uri(), &["write -P 0x5a 0 1M", "flush"]);
    assert!(ok && !out.contains("failed"), "{out}");
    let muri = pair.mirror.uri();
    // qemu sees READ_ONLY in the export flags and will not open it for writing.
    let (ok, out) = qemu_io(muri, &["write -P 0x11 0 4k"]);
    assert!(
        !ok && out.contains("Permission denied"),
        "qemu-io said: {out}"
    );
    // A client that sends the write anyway gets EPERM from the server, and
    // reads the replicated data.
    let script = format!(
        "import errno\nh.set_strict_mode(0)\nh.connect_uri({muri:?})\n\
         try:\n    h.pwrite(b'x' * 4096, 0)\n    print('WRITE ACCEPTED')\n\
         except nbd.Error as e:\n    print('errno', e.errno)\n\
         print('read', h.pread(4096, 0) == b'\\x5a' * 4096)\n"
    );
    let out = run_ok(Command::new("/usr/bin/python3").args(["-m", "nbd", "-c", &script]));
    assert!(
        out.contains("errno EPERM") && out.contains("read True"),
        "nbdsh said: {out}"
    );
    let (ok, out) = qemu_io_with(&["-r"], muri, &["read -P 0x5a 0 1M", "read -P 0 1M 1M"]);
    assert!(
        ok && out.contains("read 1048576/1048576") && !out.contains("fail"),
        "{out}"
    );
    // Nothing of the refused writes reached the mirror's file.
    let img = std::fs::read(pair.mirror.image()).unwrap();
    assert!(img[..MIB as usize].iter().all(|&b| b == 0x5a));
    pair.assert_images_identical();
}

#[test]
fn mirror_killed_under_load_degrades_then_catches_up() {
    require_tool("fio");
    require_tool("qemu-io");
    let mut pair = PairBuilder::new(64 * MIB).start();
    let resync_before = pair.primary_metric("blockmirror_resync_bytes_total");
    let mut fio = fio_load(pair.primary.uri(), 5);
    // The load is flowing through the mirror.
    wait_for("replicated writes", Duration::from_secs(20), || {
        (pair.primary_metric("blockmirror_replicated_bytes_total") >= (2 * MIB) as f64)
            .then_some(())
    });
    assert!(
        still_running(&mut fio),
        "fio ended before the mirror was killed"
    );
    pair.mirror.stop_with("KILL");
    let link = pair.wait_link("degraded", Duration::from_secs(10), |l| {
        l["state"] == "degraded" && l["out_of_sync_bytes"].as_u64().unwrap_or(0) > 0
    });
    assert_ne!(link["connection"], "connected", "{link}");
    // Host writes go on while degraded.
    let written = pair.primary_metric("blockmirror_host_bytes_written_total");
    wait_for(
        "host writes while degraded",
        Duration::from_secs(10),
        || {
            (pair.primary_metric("blockmirror_host_bytes_written_total") >= written + MIB as f64)
                .then_some(())
        },
    );
    assert!(
        still_running(&mut fio),
        "fio ended before writes were seen while degraded"
    );
    fio_finish(fio);
    assert!(pair.primary_metric("blockmirror_out_of_sync_bytes") > 0.0);

    // The same mirror comes back: reconnect, catch up, in sync.
    pair.mirror.restart();
    pair.wait_in_sync(Duration::from_secs(30));
    assert!(pair.primary_metric("blockmirror_link_reconnects_total") >= 1.0);
    let resynced = pair.primary_metric("blockmirror_resync_bytes_total") - resync_before;
    assert!(resynced > 0.0, "no bytes resynced after the outage");
    pair.flush_primary();
    pair.assert_images_identical();
}

#[test]
fn fence_policy_fails_writes_while_the_mirror_is_away() {
    require_tool("qemu-io");
    let mut pair = PairBuilder::new(16 * MIB)
        .primary_volume("on_mirror_failure = \"fence\"")
        .start();
    let uri = pair.primary.uri().to_owned();
    let (ok, out) = qemu_io(&uri, &["write -P 0x21 0 64k"]);
    assert!(ok && !out.contains("failed"), "{out}");

    pair.mirror.stop_with("KILL");
    pair.wait_link("away", Duration::from_secs(10), |l| {
        l["connection"] != "connected" && l["state"] == "degraded"
    });
    let (_, out) = qemu_io(&uri, &["write -P 0x77 0 64k"]);
    assert!(
        out.contains("write failed: Input/output error"),
        "a fenced write must fail with EIO; qemu-io said: {out}"
    );
    // Fenced before the local write: the primary did not change either.
    let img = std::fs::read(pair.primary.image()).unwrap();
    assert!(
        img[..64 * 1024].iter().all(|&b| b == 0x21),
        "a refused write reached the primary's disk"
    );

    pair.mirror.restart();
    pair.wait_in_sync(Duration::from_secs(30));
    let (ok, out) = qemu_io(&uri, &["write -P 0x78 0 64k", "flush"]);
    assert!(
        ok && !out.contains("failed"),
        "writes resume once in sync: {out}"
    );
    pair.assert_images_identical();
    let img = std::fs::read(pair.mirror.image()).unwrap();
    assert!(img[..64 * 1024].iter().all(|&b| b == 0x78));
}

#[test]
fn wrong_secret_and_garbage_are_refused() {
    let pair = PairBuilder::new(16 * MIB).wrong_secret().no_wait().start();
    let refusals = |log: &str| log.matches("replication peer refused").count();
    // The primary retries with backoff; wait for two refusals, so a retry
    // was refused as well.
    wait_for(
        "the mirror to refuse the primary",
        Duration::from_secs(20),
        || (refusals(&pair.mirror.log()) >= 2).then_some(()),
    );
    let mlog = pair.mirror.log();
    assert!(
        mlog.contains("authentication failed") || mlog.contains("AuthFailed"),
        "the mirror's log names the reason:\n{mlog}"
    );
    let plog = pair.primary.log();
    assert!(plog.contains("authentication failed"), "{plog}");
    let link = pair.link();
    assert_ne!(link["connection"], "connected", "{link}");
    assert_ne!(link["state"], "in_sync", "{link}");
    assert_eq!(
        pair.primary_metric("blockmirror_link_reconnects_total"),
        0.0
    );
    let st = pair.mirror.status_json();
    assert!(st["volumes"][0]["primary"].is_null(), "{st}");

    // A client speaking garbage on the replication port is cut off, and
    // nothing of what it sent is applied.
    let before = std::fs::read(pair.mirror.image()).unwrap();
    assert!(before.iter().all(|&b| b == 0));
    let seen = refusals(&pair.mirror.log());
    let mut s = TcpStream::connect(pair.mirror_listen).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut garbage = Vec::new();
    for i in 0..64 * 1024u32 {
        garbage.push((i.wrapping_mul(2_654_435_761) >> 13) as u8 | 1);
    }
    // The server may close before reading it all; that is fine.
    let _ = s.write_all(&garbage);
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => continue, // an Error frame, perhaps
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!(
                "the mirror did not close a garbage connection ({e} after {:?})",
                started.elapsed()
            ),
        }
    }
    wait_for(
        "the garbage refusal in the log",
        Duration::from_secs(10),
        || (refusals(&pair.mirror.log()) > seen).then_some(()),
    );
    let after = std::fs::read(pair.mirror.image()).unwrap();
    assert!(before == after, "garbage changed the mirror's image");
    // Still serving: its admin answers and the primary is still refused.
    assert!(pair.mirror.status_json()["volumes"][0]["primary"].is_null());
}

#[test]
fn primary_killed_mid_history_loses_nothing_acknowledged() {
    let mut pair = PairBuilder::new(64 * MIB).start();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("history.log");
    let cfg = WriterConfig::new(pair.primary.uri(), &log, 4096, Duration::from_secs(30));
    let progress = Progress::default();
    let summary = std::thread::scope(|s| {
        let w = s.spawn(|| writer::run(&cfg, &progress));
        wait_for(
            "acknowledged writes and flushes",
            Duration::from_secs(30),
            || {
                use std::sync::atomic::Ordering::Relaxed;
                assert!(!w.is_finished(), "the writer stopped early");
                (progress.flushes_acked.load(Relaxed) >= 60
                    && progress.writes_acked.load(Relaxed) >= 3000)
                    .then_some(())
            },
        );
        pair.primary.stop_with("KILL");
        w.join().unwrap().expect("history writer")
    });
    assert!(
        matches!(summary.end, End::ConnectionLost(_)),
        "the writer should have lost its connection: {summary:?}"
    );
    // Let the mirror finish applying what it received, then read its image.
    wait_for(
        "the mirror to see the link drop",
        Duration::from_secs(10),
        || {
            pair.mirror.status_json()["volumes"][0]["primary"]
                .is_null()
                .then_some(())
        },
    );
    let report = history::check_image(pair.mirror.image(), &log).unwrap();
    let text = format!("{summary:?}\n{}", report.summary());
    println!("{text}");
    assert!(
        report.required_flushed > 0,
        "nothing was covered by a flush: {text}"
    );
    assert!(
        report.holds(Require::Flushed),
        "flushed writes missing on the mirror:\n{text}"
    );
    // A sync mirror that stayed up holds every acknowledged write.
    assert!(
        report.holds(Require::Acked),
        "acknowledged writes missing on the mirror:\n{text}"
    );
    assert!(report.holds(Require::Prefix), "{text}");
}

/// `primary_silence` on the mirror node: a primary that is frozen (SIGSTOP:
/// the TCP connection stays up, no FIN, no ping) is given up after the
/// configured silence, well before the 10 s default; thawed, it reconnects.
#[test]
fn a_silent_primary_is_given_up_after_primary_silence() {
    let pair = PairBuilder::new(8 * MIB)
        .mirror_node("primary_silence = \"1500ms\"")
        .start();
    let pid = pair.primary.pid().to_string();
    let frozen = Instant::now();
    run_ok(Command::new("kill").args(["-STOP", &pid]));
    wait_for(
        "the mirror to give its silent primary up",
        Duration::from_secs(6),
        || {
            pair.mirror.status_json()["volumes"][0]["primary"]
                .is_null()
                .then_some(())
        },
    );
    let waited = frozen.elapsed();
    run_ok(Command::new("kill").args(["-CONT", &pid]));
    assert!(
        waited >= Duration::from_millis(1400),
        "given up after {waited:?}, before the silence"
    );
    assert!(
        pair.mirror
            .log()
            .contains("no frame from the primary (not even its pings)"),
        "{}",
        pair.logs()
    );
    // Thawed, the primary finds its link cut and connects again.
    wait_for("the primary to reconnect", Duration::from_secs(30), || {
        (pair.mirror.status_json()["volumes"][0]["primary"] == "primary").then_some(())
    });
    pair.wait_in_sync(Duration::from_secs(30));
}
