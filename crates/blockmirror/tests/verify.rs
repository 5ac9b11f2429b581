//! `blockmirror verify` end to end (seed 002): a primary and a mirror as
//! real processes, real clients (qemu-io, fio), bytes flipped in the
//! mirror's backing file behind its back, and the mirror's job table driven
//! to full by a raw job connection.

mod common;

use std::os::unix::fs::FileExt;
use std::process::Command;
use std::time::Duration;

use blockmirror_repl::{
    connect_for, Frame, FrameReader, FrameWriter, JobErrorCode, NodeHello, Purpose, VolumeIdentity,
};
use common::*;

const MIB: u64 = 1 << 20;
const BLOCK: u64 = 64 * 1024;

/// Runs `blockmirror verify` against the primary; (exit code, stdout, stderr).
fn verify(pair: &Pair, args: &[&str]) -> (i32, String, String) {
    let out = run(Command::new(BIN)
        .arg("verify")
        .arg(PAIR_VOLUME)
        .arg("--admin")
        .arg(pair.primary.admin.to_string())
        .args(args));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn qemu_io_ok(uri: &str, cmds: &[&str]) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = run_ok(c.arg(uri));
    assert!(!out.contains("failed"), "qemu-io: {out}");
}

/// Flips one byte of the mirror's backing file, behind the mirror's back.
fn flip(pair: &Pair, offset: u64) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(pair.mirror.image())
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, offset).unwrap();
    b[0] ^= 0xff;
    f.write_all_at(&b, offset).unwrap();
}

fn ranges(stdout: &str) -> Vec<(u64, u64)> {
    stdout
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            match (w.next(), w.next(), w.next(), w.next()) {
                (Some("offset"), Some(o), Some("length"), Some(n)) => {
                    Some((o.parse().unwrap(), n.parse().unwrap()))
                }
                _ => None,
            }
        })
        .collect()
}

#[test]
fn flipped_bytes_are_found_marked_and_repaired() {
    require_tool("qemu-io");
    let pair = PairBuilder::new(64 * MIB).start();
    qemu_io_ok(pair.primary.uri(), &["write -P 0x5a 0 64M", "flush"]);
    pair.wait_in_sync(Duration::from_secs(30));

    let (code, out, err) = verify(&pair, &[]);
    assert_eq!(code, 0, "identical pair: {out}{err}\n{}", pair.logs());
    assert!(out.contains("identical"), "{out}");
    // Parallelism is the caller's within bounds; out of them, a clear refusal.
    let (code, out, _) = verify(&pair, &["--jobs", "1"]);
    assert_eq!(code, 0, "{out}");
    let (code, _, err) = verify(&pair, &["--jobs", "17"]);
    assert_eq!(code, 2);
    assert!(err.contains("jobs 17: must be 1..=16"), "{err}");
    // The verify ran as several jobs on the mirror and closed them all.
    let m = pair.mirror.metrics();
    assert!(
        metric(&m, "blockmirror_jobs_opened_total").unwrap() >= 2.0,
        "{m}"
    );
    assert_eq!(metric(&m, "blockmirror_jobs_live"), Some(0.0), "{m}");

    // Three corrupted blocks, one of them hit twice, one at its last byte.
    let hits = [MIB + 100, MIB + 200, 10 * MIB + BLOCK - 1, 40 * MIB];
    for h in hits {
        flip(&pair, h);
    }
    let want = vec![(MIB, BLOCK), (10 * MIB, BLOCK), (40 * MIB, BLOCK)];
    for mode in [&[][..], &["--full"][..]] {
        let (code, out, err) = verify(&pair, mode);
        assert_eq!(code, 1, "{mode:?}: {out}{err}\n{}", pair.logs());
        assert_eq!(ranges(&out), want, "{mode:?}: {out}");
    }
    let status = pair.link();
    let last = &status["last_verify"];
    assert_eq!(last["state"], "differ", "{status}");
    assert_eq!(last["differing_bytes"], 3 * BLOCK, "{status}");
    assert!(
        pair.primary_metric("blockmirror_verify_differing_bytes") == (3 * BLOCK) as f64,
        "{}",
        pair.primary.metrics()
    );

    // --mark: the differences are marked and copied over the live link.
    let resynced = pair.primary_metric("blockmirror_resync_bytes_total");
    let (code, out, _) = verify(&pair, &["--mark"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("marked for resync"), "{out}");
    wait_for(
        "the marked blocks to be copied",
        Duration::from_secs(30),
        || {
            (pair.primary_metric("blockmirror_resync_bytes_total") >= resynced + (3 * BLOCK) as f64)
                .then_some(())
        },
    );
    pair.wait_in_sync(Duration::from_secs(30));
    for mode in [&[][..], &["--full"][..]] {
        let (code, out, err) = verify(&pair, mode);
        assert_eq!(
            code,
            0,
            "{mode:?} after repair: {out}{err}\n{}",
            pair.logs()
        );
    }
    pair.flush_primary();
    pair.assert_images_identical();
}

#[test]
fn verify_under_a_concurrent_fio_load_reports_no_false_difference() {
    require_tool("fio");
    require_tool("qemu-io");
    let pair = PairBuilder::new(64 * MIB).start();
    let mut fio = fio_load(pair.primary.uri(), 30);
    wait_for("replicated writes", Duration::from_secs(20), || {
        (pair.primary_metric("blockmirror_replicated_bytes_total") >= (4 * MIB) as f64)
            .then_some(())
    });
    let mut waited = 0;
    for round in 0..2 {
        for mode in [&[][..], &["--full"][..]] {
            let (code, out, err) = verify(&pair, mode);
            assert_eq!(
                code,
                0,
                "round {round} {mode:?} under load: {out}{err}\n{}",
                pair.logs()
            );
            waited += pair.link()["last_verify"]["regions_waited"]
                .as_u64()
                .unwrap();
            assert!(
                fio.try_wait().unwrap().is_none(),
                "fio ended before the verify did: the test proved nothing"
            );
        }
    }
    fio_finish(fio);
    // The load really met the verify: regions with writes in flight were
    // waited for (and then found equal), at least once over four runs.
    assert!(waited > 0, "no verify region ever met a write in flight");
    pair.flush_primary();
    pair.assert_images_identical();
}

/// A raw job connection to the mirror, as a primary would open it.
struct JobConn {
    r: FrameReader<tokio::net::tcp::OwnedReadHalf>,
    w: FrameWriter<tokio::net::tcp::OwnedWriteHalf>,
}

impl JobConn {
    async fn open(pair: &Pair) -> JobConn {
        let secret = std::fs::read_to_string(pair.mirror.dir.path().join("secret.key")).unwrap();
        let mut s = tokio::net::TcpStream::connect(pair.mirror_listen)
            .await
            .unwrap();
        let hello = NodeHello {
            node: "primary".into(),
            volume: VolumeIdentity {
                name: PAIR_VOLUME.into(),
                volume_id: [0; 16],
                size: 16 * MIB,
                generation: 0,
                history: [0; blockmirror_repl::HISTORY_LEN],
            },
        };
        connect_for(&mut s, secret.trim().as_bytes(), &hello, Purpose::Jobs)
            .await
            .unwrap();
        let (r, w) = s.into_split();
        JobConn {
            r: FrameReader::new(r),
            w: FrameWriter::new(w),
        }
    }

    async fn call(&mut self, f: Frame) -> Frame {
        self.w.send(&f).await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), self.r.next())
            .await
            .expect("the mirror answers, never hangs")
            .unwrap()
            .unwrap()
    }

    async fn open_job(&mut self, id: u64) -> Frame {
        self.call(Frame::JobHash {
            id,
            link: 0,
            offset: 0,
            len: 4096,
            block: 4096,
        })
        .await
    }
}

#[test]
fn job_table_fills_answers_busy_and_frees_slots() {
    require_tool("qemu-io");
    let pair = PairBuilder::new(16 * MIB).start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut c = JobConn::open(&pair).await;
        let mut links = Vec::new();
        loop {
            match c.open_job(links.len() as u64).await {
                Frame::JobHashes { link, .. } => links.push(link),
                Frame::JobError {
                    code: JobErrorCode::Busy,
                    link: 0,
                    ..
                } => break,
                f => panic!("{f:?}"),
            }
            assert!(links.len() <= 1024, "the table never filled");
        }
        // The mirror's table is bounded (64 jobs), and every live job has
        // its own link id.
        assert_eq!(links.len(), 64);
        let m = pair.mirror.metrics();
        assert_eq!(metric(&m, "blockmirror_jobs_live"), Some(64.0), "{m}");
        assert_eq!(metric(&m, "blockmirror_jobs_busy_total"), Some(1.0), "{m}");
        let mut distinct = links.clone();
        distinct.sort();
        distinct.dedup();
        assert_eq!(distinct.len(), links.len());

        // A full table does not stop replication, and a verify from the
        // primary is refused with BUSY (exit 2) instead of hanging.
        qemu_io_ok(pair.primary.uri(), &["write -P 0x33 0 1M", "flush"]);
        let (code, out, err) = verify(&pair, &[]);
        assert_eq!(code, 2, "{out}{err}");
        assert!(err.contains("BUSY"), "{err}");

        // Closing one frees its slot; the next job gets it under a new
        // link id, and the old link id names nothing.
        let old = links[10];
        assert_eq!(
            c.call(Frame::JobClose { id: 500, link: old }).await,
            Frame::JobClosed { id: 500, link: old }
        );
        let Frame::JobHashes { link: new, .. } = c.open_job(501).await else {
            panic!("a freed slot is usable")
        };
        assert_ne!(new, old);
        assert!(!links.contains(&new));
        assert_eq!(new >> 32 & 0xffff, old >> 32 & 0xffff, "same slot");
        let f = c
            .call(Frame::JobRead {
                id: 502,
                link: old,
                offset: 0,
                len: 4096,
            })
            .await;
        assert!(
            matches!(
                f,
                Frame::JobError {
                    code: JobErrorCode::UnknownLink,
                    ..
                }
            ),
            "{f:?}"
        );
        // The mirror still answers; the job connection ends and its jobs
        // are closed, so a verify can run again.
        drop(c);
    });
    pair.wait_in_sync(Duration::from_secs(30));
    wait_for(
        "the closed connection's jobs to end",
        Duration::from_secs(20),
        || {
            let (code, _, _) = verify(&pair, &[]);
            (code == 0).then_some(())
        },
    );
}

#[test]
fn verify_during_a_resync_skips_what_is_not_copied_yet() {
    require_tool("qemu-io");
    let mut pair = PairBuilder::new(512 * MIB).start();
    // Whether the verify reaches a region before the resync copies it is a
    // race between the two; each attempt is a full check (exit 0, no false
    // difference), and one of them must have met regions still marked.
    let mut skipped = 0;
    for attempt in 0..4u8 {
        // The mirror goes away; the primary takes 512 MiB of writes it lacks.
        pair.mirror.stop_with("KILL");
        pair.wait_link("away", Duration::from_secs(10), |l| {
            l["connection"] != "connected"
        });
        let pattern = format!("write -P {} 0 512M", 0x60 + attempt);
        qemu_io_ok(pair.primary.uri(), &[&pattern, "flush"]);
        assert_eq!(pair.link()["out_of_sync_bytes"], 512 * MIB);
        // Back: it reconnects and copies. A verify now must skip the
        // regions still marked (seed 002's invalid tracks) and report no
        // difference.
        pair.mirror.restart();
        pair.wait_link("reconnected", Duration::from_secs(30), |l| {
            l["connection"] == "connected"
        });
        let (code, out, err) = verify(&pair, &[]);
        assert_eq!(code, 0, "attempt {attempt}: {out}{err}\n{}", pair.logs());
        assert!(out.contains("skipped as out of sync"), "{out}");
        skipped = pair.link()["last_verify"]["skipped_bytes"]
            .as_u64()
            .unwrap();
        pair.wait_in_sync(Duration::from_secs(60));
        if skipped > 0 {
            break;
        }
    }
    assert!(
        skipped > 0,
        "in every attempt the resync ended before the verify looked"
    );
    let (code, out, _) = verify(&pair, &[]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(pair.link()["last_verify"]["skipped_bytes"], 0);
    pair.flush_primary();
    pair.assert_images_identical();
}

/// A verify's result is stored with the volume's metadata record: after the
/// primary restarts, /status shows the same `last_verify`, and the next run
/// gets a later id.
#[test]
fn last_verify_survives_a_primary_restart() {
    require_tool("qemu-io");
    let mut pair = PairBuilder::new(16 * MIB).start();
    qemu_io_ok(pair.primary.uri(), &["write -P 0x33 0 16M", "flush"]);
    pair.wait_in_sync(Duration::from_secs(30));
    flip(&pair, 3 * MIB + 5);
    let (code, out, err) = verify(&pair, &["--full"]);
    assert_eq!(code, 1, "{out}{err}\n{}", pair.logs());
    let before = pair.link()["last_verify"].clone();
    assert_eq!(before["state"], "differ", "{before}");
    assert_eq!(before["differing"][0]["offset"], 3 * MIB, "{before}");

    let st = pair.primary.stop_with("TERM");
    assert!(st.success(), "primary exit: {st}\n{}", pair.logs());
    pair.primary.restart();
    let after = wait_for(
        "last_verify in the restarted primary's /status",
        Duration::from_secs(30),
        || {
            let v = pair.link()["last_verify"].clone();
            (!v.is_null()).then_some(v)
        },
    );
    assert_eq!(after, before, "\n{}", pair.logs());

    pair.wait_in_sync(Duration::from_secs(30));
    let (code, out, err) = verify(&pair, &[]);
    assert_eq!(code, 1, "{out}{err}");
    let next = pair.link()["last_verify"]["id"].as_u64().unwrap();
    assert!(next > before["id"].as_u64().unwrap(), "ids go on: {next}");
}
